"""DTensor parameters (FSDP2, FSDP2 × TP, HSDP) on the engine's plan: buckets over the local shards.

Eligible (`plan_mesh`): DTensor parameters on one device mesh (1-D or n-D) and its named sub-meshes,
each rank's shard one rectangular block of each matrix (`muon.distributed.layout`: Shard(0) and
Shard(1) on any mesh dim, FSDP2's strided shards over TP, Replicate(), uneven torch.chunk shards),
Muon groups with the plain Muon update (no split/heads, standard NS, not NorMuon, not transposed). Anything else is
refused with an error naming the parameter or group and what to do — never a silent route to the
gathered NS phase, which gathers every full matrix on every rank (`foreach=False` asks for it:
`muon.distributed.gathered`).

The plan (`plan_muon_group`), per Muon group, has two kinds of bucket, both over local shards, so
each rank keeps only its shard of the momentum (ZeRO-1 memory):

* block buckets: the matrices of one full shape (m, n), dtypes and layout (every rank's block); the
  stack is (B, nr, nc), this rank's block of each. Every matrix has one owner rank of the mesh's
  flattened group (greedy balance of NS FLOPs over the whole step, `ownership._assign`); the
  bucket's stack is ordered by owner, so what goes to one owner is one contiguous run of it;
* local buckets: expert stacks sharded on the expert dim (whole matrices on each rank), and plain
  tensors mixed in (replicated: every rank orthogonalizes its own, as the loop does): NS where they are.

`state[p]["momentum_buffer"]` is a DTensor laid out like the parameter whose local tensor is the
parameter's view of its bucket's stack, so sharded (DCP) and full state dicts see the usual state.

A step (`sharded_ns`), per Muon group and gradient dtype, whatever the number of layers and buckets:
one all_to_all sends every owner the blocks of its matrices (each distinct block once: from the
owner itself, else the holder closest to it on the mesh, so HSDP gathers within a replica group),
started before the first NS; the local buckets' NS runs while it is in flight; the owner places the
blocks into full matrices (one multi-tensor copy) and orthogonalizes them batched per shape; one
all_to_all returns every rank (replicas included) its block of each result. Then the engine's apply
phase on the local stacks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._shapes import matrix_shape, update_scale
from ..coefficients import resolve_schedule
from ..engine import Plan, bucket_ns, chunked_ns
from ..engine.plan import Member, Planner, link_empty_muon, local, muon_bucket
from ..newton_schulz import orthogonalize, resolve_dtype
from .collectives import DistributedStepError, _all_to_all_async, is_dtensor
from .exchange import Exchange
from .layout import LocalShardMismatch, MeshView, matrix_layout, mesh_dims, mesh_view, sources
from .ownership import _assign, digest, ns_flops, plan_signature


def check_options(param_groups: list[dict]) -> None:
    """Options of a Muon group with DTensor parameters that no distributed NS phase implements (the
    owner plan's or foreach=False's gathered one): refused before any work, naming the group."""
    for gi, group in enumerate(param_groups):
        if not group["use_muon"] or not any(p.grad is not None and is_dtensor(p) for p in group["params"]):
            continue
        if group["split"] is not None or group["heads"] is not None or group["ns_algorithm"] != "standard":
            raise NotImplementedError(
                f"param_groups[{gi}]: split, heads and ns_algorithm other than 'standard' are not supported yet "
                "for FSDP2 (DTensor) parameters; they work in one process and on replicated (DDP) parameters"
            )
        if group.get("transposed", False):
            raise NotImplementedError(
                f"param_groups[{gi}]: transposed=True ((in, out) matrices) is not supported yet for FSDP2 "
                "(DTensor) parameters: their shards would be columns of the matrix"
            )
        if group["variant"] != "muon":
            raise NotImplementedError(
                f"param_groups[{gi}]: variant={group['variant']!r} is not supported for DTensor parameters (its "
                "per-row moments and norm need whole rows of the update, which a rank's shard may not hold)"
            )


def plan_mesh(param_groups: list[dict]) -> MeshView:
    """The plan mesh of these groups' DTensor parameters (module docstring); refuses options and
    meshes the plan does not take, naming the group or parameter."""
    check_options(param_groups)
    meshes = [p.device_mesh for group in param_groups for p in group["params"]
              if p.grad is not None and is_dtensor(p)]  # fmt: skip
    view = mesh_view(max(meshes, key=lambda m: m.ndim))  # the first mesh of most dims
    for gi, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            if p.grad is not None and is_dtensor(p):
                mesh_dims(p, view, f"param_groups[{gi}]['params'][{i}]")
    return view


@dataclass
class BlockExchange:
    """One block bucket's owners and every rank's block (stack order: by owner, rank 0's first)."""

    m: int
    n: int
    blocks: tuple  # per group rank, its (r0, nr, c0, nc) block of every matrix of the bucket
    sent: list[int]  # per owner rank: how many of the bucket's matrices it owns
    before: list[int]  # per owner rank: where its matrices start in the stack
    sources: list[list]  # per owner rank: [(group rank, block)] that send it each distinct block


class _Orthogonalize:
    """A bucket's NS: `muon.newton_schulz.orthogonalize` with the group's backend, as the loop calls it."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def __call__(self, X: Tensor, schedule, dtype: torch.dtype) -> Tensor:
        return orthogonalize(X, schedule, dtype=dtype, backend=self.backend)


def as_dtensor(view: Tensor, like) -> Tensor:
    """A DTensor laid out like `like` whose local tensor is `view` (a state entry loaded for a
    sharded parameter); the view itself for a plain tensor."""
    if not is_dtensor(like):
        return view
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(view, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())  # fmt: skip


def planner_for(view: MeshView):
    """`muon.engine.build_plan`'s plan_muon for this mesh."""
    return functools.partial(plan_muon_group, view)


def plan_muon_group(view: MeshView, planner: Planner, gplan, group, with_grad, flag_pos) -> None:
    """`muon.engine.plan.plan_muon_group` for DTensor parameters (module docstring): buckets of local
    blocks; a block bucket's `exchange` is its BlockExchange, a local bucket's None."""
    flatten = group["flatten"]
    schedule = resolve_schedule(group["ns_coefficients"], group["ns_steps"], group["eps"])
    world, rank = view.world, view.rank
    load = planner.__dict__.setdefault("ns_load", [0] * world)  # NS FLOPs per rank, over the whole step
    layout: dict[tuple, list] = {}
    costs = []
    for i, p in with_grad:
        where = f"param_groups[{gplan.index}]['params'][{i}]"
        if p.numel() == 0:  # nothing to orthogonalize; state as the loop keeps it
            link_empty_muon(planner, gplan, i, p)
            continue
        kind, geometry = matrix_layout(p, flatten, view, where)
        _, m, n = matrix_shape(p.shape, flatten)
        cost = ns_flops(m, n, schedule.steps)
        if kind == "local":
            for r, count in enumerate(geometry):
                load[r] += count * cost
            count = local(p).numel() // (m * n)
            layout.setdefault(("local", m, n, p.dtype, p.grad.dtype, None), []).append((i, p, count, None))
        else:
            layout.setdefault(("blocks", m, n, p.dtype, p.grad.dtype, geometry), []).append((i, p, 1, len(costs)))
            costs.append(cost)
    owner = _assign(costs, world, load)
    for j, q in enumerate(owner):
        load[q] += costs[j]
    for (kind, m, n, pdtype, gdtype, blocks), members in layout.items():
        device = local(members[0][1]).device
        if kind == "blocks":
            members = sorted(members, key=lambda mb: owner[mb[3]])  # stable: plan order within an owner
            _, nr, _, nc = blocks[rank]
            shape = (nr, nc) if nr else (0, n)
        else:
            shape = (m, n)
        scale = update_scale(group["adjust_lr_fn"], m, n)
        entries_of = [(Member(i, p, 0, count, False), scale) for i, p, count, _ in members]
        bucket = muon_bucket(planner, gplan.index, group, entries_of, shape, pdtype, gdtype, device, flag_pos,
                             schedule, _Orthogonalize(group["backend"]), resolve_dtype(group["ns_dtype"], device),
                             sharded=True)  # fmt: skip
        if kind == "blocks":
            sent = [sum(1 for mb in members if owner[mb[3]] == q) for q in range(world)]
            before = [sum(sent[:q]) for q in range(world)]
            bucket.exchange = BlockExchange(
                m, n, blocks, sent, before, [sources(blocks, q, view.coords) for q in range(world)]
            )
        gplan.buckets.append(bucket)


# ------------------------------------------------------------------------------ the packed exchange
@dataclass
class Pack:
    """The two all_to_alls of one Muon group's block buckets of one gradient dtype, laid out at plan
    time: what each rank sends and receives, in which order, and where each piece goes."""

    buckets: list  # positions in the group's buckets
    dtype: torch.dtype  # the gather's (the gradient's: the owner normalizes what one process would)
    ns_dtype: torch.dtype  # the scatter's
    device: torch.device
    send_splits: list[int] = field(default_factory=list)
    recv_splits: list[int] = field(default_factory=list)
    send_parts: list = field(default_factory=list)  # (bucket pos, start, count): rows of U, in send order
    recv_parts: list = field(default_factory=list)  # (size, ns shape, offset, k, block), in receive order
    ns_shapes: list = field(default_factory=list)  # (k, m, n) full stacks this rank orthogonalizes
    ns_buckets: list = field(default_factory=list)  # a bucket of each (its NS run)
    ns_tall: list = field(default_factory=list)  # per full stack: its matrices are stored transposed
    scatter_splits: list[int] = field(default_factory=list)
    back_splits: list[int] = field(default_factory=list)
    scatter_parts: list = field(default_factory=list)  # (size, ns shape, offset, k, block), in send order
    back_parts: list = field(default_factory=list)  # (size, bucket pos, start, count), in receive order


def _size(k: int, block) -> int:
    return k * block[1] * block[3]


def _pack(buckets: list, positions: list[int], world: int, rank: int) -> Pack:
    first = buckets[positions[0]]
    pack = Pack(positions, first.gdtype, first.ns_dtype, first.device)
    xs = {k: buckets[k].exchange for k in positions}
    # this rank as a sender: its block of the matrices each owner owns, where it is that block's source
    for q in range(world):
        total = 0
        for k, x in xs.items():
            if x.sent[q] and any(s == rank for s, _ in x.sources[q]) and x.blocks[rank][1]:
                pack.send_parts.append((k, x.before[q], x.sent[q]))
                total += _size(x.sent[q], x.blocks[rank])
        pack.send_splits.append(total)
    # this rank as an owner: its matrices, one full stack per shape, filled from the sources' blocks
    where: dict[int, tuple[int, int]] = {}  # bucket pos -> (ns shape, offset)
    shapes: dict[tuple[int, int], int] = {}
    for k, x in xs.items():
        owned = x.sent[rank]
        if owned:
            si = shapes.setdefault((x.m, x.n), len(shapes))
            if si == len(pack.ns_shapes):
                # on the small side, as one process stacks them: a tall matrix is orthogonalized as its
                # (contiguous) transpose, so both round alike
                pack.ns_shapes.append([0, min(x.m, x.n), max(x.m, x.n)])
                pack.ns_tall.append(x.m > x.n)
                pack.ns_buckets.append(buckets[k])
            where[k] = (si, pack.ns_shapes[si][0])
            pack.ns_shapes[si][0] += owned
    pack.ns_shapes = [tuple(s) for s in pack.ns_shapes]
    for s in range(world):
        total = 0
        for k, x in xs.items():
            owned = x.sent[rank]
            for src, block in x.sources[rank] if owned else ():
                if src == s:
                    pack.recv_parts.append((_size(owned, block), *where[k], owned, block))
                    total += _size(owned, block)
        pack.recv_splits.append(total)
    # the results: every rank its block of this rank's matrices, and this rank's block back from the owners
    for t in range(world):
        total = 0
        for k, x in xs.items():
            owned, block = x.sent[rank], x.blocks[t]
            if owned and block[1]:
                pack.scatter_parts.append((_size(owned, block), *where[k], owned, block))
                total += _size(owned, block)
        pack.scatter_splits.append(total)
    for q in range(world):
        total = 0
        for k, x in xs.items():
            if x.sent[q] and x.blocks[rank][1]:
                pack.back_parts.append((_size(x.sent[q], x.blocks[rank]), k, x.before[q], x.sent[q]))
                total += _size(x.sent[q], x.blocks[rank])
        pack.back_splits.append(total)
    return pack


def prepare(plan: Plan, param_groups: list[dict], view: MeshView, ns_chunk_bytes: int | None = None) -> None:
    """Attach the Exchange (the flattened mesh group, the digest, the packed all_to_alls, the NS
    phase) to a plan of DTensor groups; the owners orthogonalize in chunks of `ns_chunk_bytes`."""
    signature = plan_signature(param_groups)
    device = local(plan.flag_params[0]).device if plan.flag_params else None
    ex = Exchange(view.pg, view.world, view.rank, signature, digest(signature), device, sharded=True,
                  ns_phase=sharded_ns, ns_chunk_bytes=ns_chunk_bytes)  # fmt: skip
    for gplan in plan.groups:
        if not gplan.use_muon:
            continue
        by_dtype: dict = {}
        for k, b in enumerate(gplan.buckets):
            if b.exchange is not None:
                by_dtype.setdefault(b.gdtype, []).append(k)
        ex.groups[gplan.index] = [_pack(gplan.buckets, positions, view.world, view.rank)
                                  for positions in by_dtype.values()]  # fmt: skip
    plan.dist = ex


def refuse(view: MeshView, param_groups: list[dict], message: str) -> None:
    """A rank whose shards do not fit the plan (`layout.LocalShardMismatch`, known on that rank only):
    it takes part in the step's agreement with a refusal, so every rank raises (none waits)."""
    from .agreement import agree

    signature = plan_signature(param_groups)
    agree(view.pg, digest(signature), signature, None, None, refusal=message)
    raise DistributedStepError(message)  # pragma: no cover - agree raises


def _region(stack: Tensor, tall: bool, off: int, k: int, block) -> Tensor:
    """Matrices [off, off + k) of a full stack, block (r0, nr, c0, nc) of each, as (k, nr, nc)."""
    r0, nr, c0, nc = block
    if tall:  # stored transposed
        return stack[off : off + k, c0 : c0 + nc, r0 : r0 + nr].mT
    return stack[off : off + k, r0 : r0 + nr, c0 : c0 + nc]


def local_ns(b, U: Tensor) -> Tensor:
    """NS of whole local matrices (B, m, n), tall ones as their contiguous transposes (one process's way)."""
    if U.shape[-2] > U.shape[-1]:
        return bucket_ns(b, U.mT.contiguous()).mT
    return bucket_ns(b, U)


def _blocks_of(t: Tensor, k: int, block) -> Tensor:
    _, nr, _, nc = block
    return t.view(k, nr, nc)


def sharded_ns(plan: Plan, gplan, phases: list) -> list[Tensor]:
    """The NS phase of a sharded plan (`muon.engine.step`, module docstring)."""
    ex = plan.dist
    pg, rank = ex.pg, ex.rank
    packs = ex.groups.get(gplan.index, [])
    # 1. every pack's gather, before any NS
    gathers = []
    for pack in packs:
        send = torch.empty(sum(pack.send_splits), dtype=pack.dtype, device=pack.device)
        if pack.send_parts:
            src = [phases[k].U[start : start + count] for k, start, count in pack.send_parts]
            dst = [d.view(s.shape) for d, s in zip(send.split([s.numel() for s in src]), src, strict=True)]
            torch._foreach_copy_(dst, src)
            del src, dst
        for k in pack.buckets:
            phases[k].U = None  # packed: the commit does not read it
        gathers.append(_all_to_all_async("all_to_all gathering full matrices on their owner ranks", pg, rank, send,
                                         pack.send_splits, pack.recv_splits))  # fmt: skip
        del send  # the collective holds it until it is finished
    # local buckets (expert stacks, plain tensors): NS where the matrices are, while the gathers run
    results: list = [None] * len(gplan.buckets)
    for k, (b, ph) in enumerate(zip(gplan.buckets, phases, strict=True)):
        if b.exchange is None:
            results[k] = local_ns(b, ph.U) if ph.U.numel() else ph.U
    # 2. per pack: full matrices on their owner, NS per shape in chunks, every rank its block back
    scatters = []
    for i, pack in enumerate(packs):
        recv, work = gathers[i]
        gathers[i] = None
        work.wait()
        fulls = [torch.empty(shape, dtype=pack.dtype, device=pack.device) for shape in pack.ns_shapes]
        if pack.recv_parts:
            pieces = recv.split([part[0] for part in pack.recv_parts])
            dst = [_region(fulls[si], pack.ns_tall[si], off, k, block) for _, si, off, k, block in pack.recv_parts]
            src = [_blocks_of(piece, k, block) for piece, (_, _, _, k, block) in zip(pieces, pack.recv_parts)]
            torch._foreach_copy_(dst, src)
            del pieces, dst, src
        del recv, work
        outs = []
        for si, b in enumerate(pack.ns_buckets):
            outs.append(chunked_ns(b, fulls[si], ex.ns_chunk_bytes))
            fulls[si] = None
        send = torch.empty(sum(pack.scatter_splits), dtype=pack.ns_dtype, device=pack.device)
        if pack.scatter_parts:
            pieces = send.split([part[0] for part in pack.scatter_parts])
            dst = [_blocks_of(piece, k, block) for piece, (_, _, _, k, block) in zip(pieces, pack.scatter_parts)]
            src = [_region(outs[si], pack.ns_tall[si], off, k, block) for _, si, off, k, block in pack.scatter_parts]
            torch._foreach_copy_(dst, src)
            del pieces, dst, src
        del outs
        scatters.append((pack, *_all_to_all_async("all_to_all scattering orthogonalized blocks back to their shards",
                                                  pg, rank, send, pack.scatter_splits, pack.back_splits)))  # fmt: skip
        del send  # the collective holds it until it is finished
    # 3. every rank's blocks into its buckets' result stacks, each receive buffer freed once read
    for i, (pack, back, work) in enumerate(scatters):
        scatters[i] = None
        work.wait()
        del work
        for k in pack.buckets:
            results[k] = torch.empty(gplan.buckets[k].shape, dtype=pack.ns_dtype, device=pack.device)
        if pack.back_parts:
            pieces = back.split([part[0] for part in pack.back_parts])
            dst = [results[k][start : start + count] for _, k, start, count in pack.back_parts]
            torch._foreach_copy_(dst, [piece.view(d.shape) for piece, d in zip(pieces, dst, strict=True)])
            del pieces, dst
        del back
    return results


__all__ = ["BlockExchange", "LocalShardMismatch", "Pack", "as_dtensor", "plan_mesh", "planner_for", "prepare",
           "refuse", "sharded_ns"]  # fmt: skip
