"""FSDP2 (DTensor) parameters on the engine's plan: buckets over the local shards.

Eligible (`plan_mesh`): every parameter with a gradient is a DTensor sharded Shard(0) on one 1-D
mesh (FSDP2's fully_shard default), with torch.chunk's rows locally, and the Muon groups use the
plain Muon update (no split/heads, standard NS, not NorMuon, not transposed). Other layouts (Shard(1), 2-D meshes,
uneven shards), those options, and a mix of DTensors and plain tensors run the per-parameter loop.

The plan (`plan_muon_group`), per Muon group, has two kinds of bucket, both over local shards, so
each rank keeps only its rows of the momentum (ZeRO-1 memory):

* row buckets: the parameters of one full matrix shape (m, n) and dtypes; the stack is (B, r, n),
  r this rank's rows of each matrix. Every matrix has an owner rank (`ownership.plan_sharded`, the
  greedy balance of the loop and of the traffic model);
* local buckets: expert stacks (3-D, sharded on the expert dim) hold whole matrices locally: a
  (E_local, m, n) stack orthogonalized where it is, no communication.

`state[p]["momentum_buffer"]` is a DTensor laid out like the parameter whose local tensor is the
parameter's view of its bucket's stack, so sharded (DCP) and full state dicts see the usual state.

A step (`execute`), per Muon group: the engine's momentum phase on every local stack; per row
bucket one all_to_all sends each owner its matrices' rows (one index_select puts the stack in
owner order), the owner orthogonalizes the full matrices batched, and a second all_to_all returns
each rank its rows; the gathers of all buckets are issued before the first NS. Then the engine's
apply phase on the local stacks. AdamW groups are the engine's multi-tensor AdamW over the local
shards. The plan digest and the finite flags (local shard flags, MIN-reduced) are agreed first, as
for replicated parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._shapes import matrix_shape, update_scale
from ..coefficients import resolve_schedule
from ..engine import Plan, bucket_ns
from ..engine.plan import Member, Planner, link_empty_muon, local, muon_bucket
from ..newton_schulz import orthogonalize, resolve_dtype
from .collectives import _all_to_all_async, dist, is_dtensor
from .exchange import Exchange
from .ownership import _chunk_rows, digest, ns_flops, plan_sharded, plan_signature


def plan_mesh(param_groups: list[dict]):
    """The 1-D mesh every DTensor parameter with a gradient is row-sharded on, or None when the
    parameters need the loop (see the module docstring)."""
    from torch.distributed.tensor import Shard

    mesh = None
    for group in param_groups:
        if group["use_muon"] and (
            group["split"] is not None or group["heads"] is not None or group["ns_algorithm"] != "standard"
            or group["variant"] != "muon" or group.get("transposed", False)
        ):  # fmt: skip
            return None
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if not (is_dtensor(p) and is_dtensor(g)):
                return None
            for t in (p, g):
                if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
                    return None
            if mesh is None:
                mesh = p.device_mesh
            elif p.device_mesh != mesh or g.device_mesh != mesh:
                return None
            if p.ndim == 0:
                return None
            world, rank = mesh.size(), mesh.get_local_rank()
            rows = _chunk_rows(p.shape[0], world)[rank][1]
            for t in (p, g):
                loc = t.to_local()
                if loc.ndim != p.ndim or (loc.shape[0] != rows) or tuple(loc.shape[1:]) != tuple(p.shape[1:]):
                    return None
    return mesh


@dataclass
class RowExchange:
    """One row bucket's owner exchange."""

    perm: Tensor  # (B,) the bucket's matrices in owner order (rank 0's first)
    inverse: Tensor  # (B,) back to bucket order
    sent: list[int]  # per owner rank: how many of the bucket's matrices it owns
    owned: int  # matrices this rank owns
    spans: list[tuple[int, int]]  # (offset, rows) of each rank's rows of every matrix
    n: int


class _Orthogonalize:
    """A bucket's NS: `muon.newton_schulz.orthogonalize` with the group's backend, as the loop calls it."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def __call__(self, X: Tensor, schedule, dtype: torch.dtype) -> Tensor:
        return orthogonalize(X, schedule, dtype=dtype, backend=self.backend)


def as_dtensor(view: Tensor, like) -> Tensor:
    """A DTensor laid out like `like` whose local tensor is `view` (state of a sharded parameter)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(view, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())  # fmt: skip


def plan_muon_group(planner: Planner, gplan, group, with_grad, flag_pos) -> None:
    """`muon.engine.plan.plan_muon_group` for row-sharded DTensors (module docstring): buckets of
    local rows; a row bucket's `exchange` is its RowExchange, a local bucket's None."""
    flatten = group["flatten"]
    schedule = resolve_schedule(group["ns_coefficients"], group["ns_steps"], group["eps"])
    layout: dict[tuple, list] = {}
    entries, world, rank = [], 1, 0
    local_costs = None
    for i, p in with_grad:
        mesh = p.device_mesh
        world, rank = mesh.size(), mesh.get_local_rank()
        if local_costs is None:
            local_costs = [0] * world
        if p.numel() == 0:  # nothing to orthogonalize; state as the loop keeps it
            link_empty_muon(planner, p, group, f"param_groups[{gplan.index}]['params'][{i}]")
            continue
        batch, m, n = matrix_shape(p.shape, flatten)
        if p.ndim > 2 and not flatten:  # an expert stack: whole matrices on each rank
            for r, (_, count) in enumerate(_chunk_rows(p.shape[0], world)):
                local_costs[r] += count * (batch // p.shape[0]) * ns_flops(m, n, schedule.steps)
            count = local(p).numel() // (m * n)
            layout.setdefault(("local", m, n, p.dtype, p.grad.dtype), []).append((i, p, count, None))
        else:
            layout.setdefault(("rows", m, n, p.dtype, p.grad.dtype), []).append((i, p, 1, len(entries)))
            entries.append(((m, n, p.grad.dtype), m, n))
    owner = plan_sharded(entries, local_costs or [0] * world, world, schedule.steps).owner if entries else ()
    for (kind, m, n, pdtype, gdtype), members in layout.items():
        device = local(members[0][1]).device
        r = _chunk_rows(m, world)[rank][1] if kind == "rows" else m
        scale = update_scale(group["adjust_lr_fn"], m, n)
        entries_of = [(Member(i, p, 0, count, False), scale) for i, p, count, _ in members]
        bucket = muon_bucket(planner, gplan.index, group, entries_of, (r, n), pdtype, gdtype, device, flag_pos,
                             schedule, _Orthogonalize(group["backend"]), resolve_dtype(group["ns_dtype"], device),
                             state_value=as_dtensor, sharded=True)  # fmt: skip
        B = bucket.grad_stack.shape[0]
        if kind == "rows":
            owners = [owner[j] for _, _, _, j in members]
            order = [k for q in range(world) for k, o in enumerate(owners) if o == q]
            inverse = [0] * B
            for pos, k in enumerate(order):
                inverse[k] = pos
            bucket.exchange = RowExchange(
                perm=torch.tensor(order, dtype=torch.int64, device=device),
                inverse=torch.tensor(inverse, dtype=torch.int64, device=device),
                sent=[owners.count(q) for q in range(world)],
                owned=owners.count(rank),
                spans=_chunk_rows(m, world),
                n=n,
            )
        gplan.buckets.append(bucket)


def prepare(plan: Plan, param_groups: list[dict], mesh) -> None:
    """Attach the Exchange (the mesh's process group, the digest, the NS phase) to a plan of sharded groups."""
    pg = mesh.get_group()
    signature = plan_signature(param_groups)
    device = local(plan.flag_params[0]).device if plan.flag_params else None
    plan.dist = Exchange(pg, dist.get_world_size(pg), dist.get_rank(pg), signature, digest(signature), device,
                         sharded=True, ns_phase=sharded_ns)  # fmt: skip


def sharded_ns(plan: Plan, gplan, phases: list) -> list[Tensor]:
    """The NS phase of a sharded plan (`muon.engine.execute`, module docstring): per row bucket an
    owner all-to-all of the momentum-corrected local rows, NS of the owned full matrices, an
    all-to-all of the results' rows back; local buckets (expert stacks) orthogonalize in place."""
    ex = plan.dist
    pg, world, rank = ex.pg, ex.world, ex.rank
    # 1. every row bucket's gather: this rank's rows of each matrix to the matrix's owner
    gathers = []
    for b, ph in zip(gplan.buckets, phases, strict=True):
        x = b.exchange
        if x is None:
            continue
        rows_me = x.spans[rank][1]
        send = ph.U.index_select(0, x.perm).reshape(-1)
        send_splits = [x.sent[q] * rows_me * x.n for q in range(world)]
        recv_splits = [x.owned * x.spans[q][1] * x.n for q in range(world)]
        recv, work = _all_to_all_async(
            "all_to_all gathering full matrices on their owner ranks", pg, rank, send, send_splits, recv_splits
        )
        gathers.append((b, work, recv, recv_splits))
    # local buckets (expert stacks): NS where the matrices are
    results = {}
    for b, ph in zip(gplan.buckets, phases, strict=True):
        if b.exchange is None:
            results[id(b)] = bucket_ns(b, ph.U) if ph.U.numel() else ph.U
    # 2. per row bucket: wait for its gather, NS of the owned matrices, scatter the rows back
    scatters = []
    for b, work, recv, recv_splits in gathers:
        x = b.exchange
        work.wait()
        if x.owned:
            blocks = [piece.view(x.owned, rows, x.n) for piece, (_, rows) in zip(
                recv.split(recv_splits), x.spans, strict=True)]  # fmt: skip
            result = bucket_ns(b, torch.cat(blocks, dim=1))  # (owned, m, n) in ns_dtype
            send = torch.cat([result[:, start : start + size].reshape(-1) for start, size in x.spans])
        else:
            send = torch.empty(0, dtype=b.ns_dtype, device=recv.device)
        rows_me = x.spans[rank][1]
        send_splits = [x.owned * x.spans[q][1] * x.n for q in range(world)]
        back_splits = [x.sent[q] * rows_me * x.n for q in range(world)]
        back, work = _all_to_all_async(
            "all_to_all scattering orthogonalized rows back to their shards", pg, rank, send, send_splits,
            back_splits,
        )
        scatters.append((b, work, back))
    for b, work, back in scatters:
        work.wait()
        results[id(b)] = back.view(b.grad_stack.shape).index_select(0, b.exchange.inverse)
    return [results[id(b)] for b in gplan.buckets]
