"""Running a distributed step: replicated parameters on the engine's plan, DTensors in the loop.

Replicated parameters (DDP, or plain tensors once a multi-rank process group exists) run the
engine's plan (`muon.engine`), the same buckets and stacked state as one process. `prepare` adds
to the plan who orthogonalizes which rows of every Muon bucket (`ownership.share_buckets`) and the
all-gather buffers. A step (`execute`), per Muon group:

1. momentum on every bucket's stack, as in one process (every rank keeps the full momentum, as
   DDP keeps full gradients);
2. each rank runs NS on its rows of each bucket stack (one batched call per bucket it owns rows
   of) and copies the results into its chunk of the group's all-gather buffer (one multi-tensor
   copy);
3. one all-gather per group hands every rank every result; one multi-tensor copy puts them back
   into per-bucket result stacks;
4. the same batched apply as one process, so every rank applies the same update and the ranks
   stay bit-identical.

Before that, `agreement.agree` checks that all ranks hold the same plan and agrees the finite
flags (one small all-reduce and one host sync; a second all-reduce of the flags only in a step
with a non-finite gradient). The loop (foreach=False, or parameters on several
devices) does the same check and agreement (`loop_agree`) and runs the NS of replicated parameters
on every rank, unsplit: it is the readable reference.

DTensor parameters (FSDP2, FSDP2 × TP, HSDP, uneven shards) run the plan
(`muon.distributed.sharded`: one packed owner all_to_all out and one back per Muon group); layouts
it does not take are errors naming the parameter. foreach=False runs the per-parameter loop of
`muon.optim` with `orthogonalize_all`, the readable reference,
after `check_sharded_plan` (the plan-digest all-reduce on their mesh, one host sync). Momentum is
a DTensor, so each rank stores only its shard (ZeRO-1 memory, one buffer). Each row-sharded
matrix gets an owner rank (same greedy balance); per same-shape bucket one all_to_all gathers the
owners' full momentum-corrected matrices, the owner orthogonalizes them batched, and a second
all_to_all scatters each result's rows back to the rank holding them. The gathers of all buckets
are issued before the first NS so that communication overlaps the NS of earlier buckets.
Expert stacks sharded on their expert dim hold whole matrices locally and need no communication.
In the loop, other placements (Shard(1), 2-D meshes) gather full matrices on every rank (correct,
but the NS work is not split); tall matrices are orthogonalized as their contiguous transposes, as
one process and the plan do, so all paths give the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._shapes import matrix_shape
from ..coefficients import Schedule
from ..engine import Plan, bucket_ns
from .agreement import agree
from .collectives import _all_to_all_async, all_gather_into, dist, is_dtensor
from .exchange import Exchange, GroupExchange
from .ownership import _chunk_rows, digest, ns_flops, plan_sharded, plan_signature, share_buckets
from .sharded import as_dtensor


# ------------------------------------------------------------------------ replicated, on the plan
def prepare(plan: Plan, param_groups: list[dict], pg) -> Exchange:
    """Attach to `plan` who orthogonalizes which rows (the all-gather's buffers are per step)."""
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    signature = plan_signature(param_groups)
    device = plan.flag_params[0].device if plan.flag_params else None
    ex = Exchange(pg, world, rank, signature, digest(signature), device, ns_phase=replicated_ns)
    load = [0] * world
    for gplan in plan.groups:
        if not gplan.use_muon or not gplan.buckets:
            continue
        buckets = gplan.buckets
        shapes = [tuple(b.shape) for b in buckets]
        share = share_buckets(shapes, world, buckets[0].schedule.steps, load)
        ex.groups[gplan.index] = GroupExchange(share, [spans[rank] for spans in share.rows], shapes,
                                               buckets[0].ns_dtype, buckets[0].device)  # fmt: skip
    plan.dist = ex
    return ex


def agree_plan(plan: Plan, ok: Tensor | None) -> Tensor | None:
    """`agreement.agree` with this plan's digest: the agreed flags (see muon.distributed.agreement)."""
    ex: Exchange = plan.dist
    if ex.agree is not None:
        return ex.agree(plan, ok)
    return agree(ex.pg, ex.digest, ex.signature, ok, ex.device)


def replicated_ns(plan: Plan, gplan, phases: list) -> list[Tensor]:
    """The NS phase of replicated parameters (`muon.engine.step`): each rank orthogonalizes its
    rows of every bucket of the group into its chunk of the send buffer, one all-gather hands every
    rank every result, placed into per-bucket result stacks (all of them the step's temporaries)."""
    ex: Exchange = plan.dist
    gx = ex.groups[gplan.index]
    share, world, rank = gx.share, ex.world, ex.rank
    send = torch.zeros(share.width, dtype=gx.dtype, device=gx.device)  # padding stays zero
    send_views, mine = [], []
    for k, (b, ph, (start, stop)) in enumerate(zip(gplan.buckets, phases, gx.rows, strict=True)):
        if stop > start:
            _, s, l = gx.shapes[k]
            offset = share.offsets[k][rank]
            send_views.append(send[offset : offset + (stop - start) * s * l].view(stop - start, s, l))
            mine.append(bucket_ns(b, ph.U[start:stop]))
    if mine:
        torch._foreach_copy_(send_views, mine)
    del mine
    gathered = torch.empty(world * share.width, dtype=gx.dtype, device=gx.device)
    all_gather_into("all_gather of the orthogonalized updates", ex.pg, gathered, send)
    del send
    results, recv_views, result_views = [], [], []
    for k, (count, s, l) in enumerate(gx.shapes):
        results.append(torch.empty((count, s, l), dtype=gx.dtype, device=gx.device))
        for r in range(world):
            start, stop = share.rows[k][r]
            if stop > start:
                offset = r * share.width + share.offsets[k][r]
                recv_views.append(gathered[offset : offset + (stop - start) * s * l].view(stop - start, s, l))
                result_views.append(results[-1][start:stop])
    torch._foreach_copy_(result_views, recv_views)
    return results


# ---------------------------------------------------------------------------- the loop's hooks
def splits_work(updates: list, process_group) -> bool:
    """True when the loop's NS of these updates runs here: some are DTensors (the loop runs the NS
    of replicated parameters locally on every rank, the readable reference)."""
    return any(U is not None and is_dtensor(U) for U in updates)


def loop_agree(flags_by_group: list, param_groups: list[dict], pg) -> list:
    """The loop's flags agreed over `pg` (replicated parameters), same checks as the plan's."""
    flat = [f for flags in flags_by_group for f in flags if f is not None]
    device = flat[0].device if flat else None
    signature = plan_signature(param_groups)
    agreed = agree(pg, digest(signature), signature, torch.stack(flat) if flat else None, device)
    if agreed is None:
        return flags_by_group
    it = iter(agreed.unbind())
    return [[None if f is None else next(it) for f in flags] for flags in flags_by_group]


def orthogonalize_all(updates: list, params: list, schedule: Schedule, group: dict, flatten: bool) -> list:
    """Muon._orthogonalize_all for DTensor updates (`splits_work`); group["ns_dtype"] is a resolved
    torch dtype.

    Returns, per update, its orthogonalized (B, m, n) stack in the group's ns_dtype (a plain tensor),
    or for DTensor updates a DTensor laid out like the parameter. None updates stay None.
    """
    from ..newton_schulz import orthogonalize

    def ns(stack: Tensor) -> Tensor:
        # tall matrices as their contiguous transposes, as one process and the plan round them
        if stack.shape[-2] > stack.shape[-1]:
            return orthogonalize(stack.mT.contiguous(), schedule, dtype=group["ns_dtype"], backend=group["backend"]).mT
        return orthogonalize(stack, schedule, dtype=group["ns_dtype"], backend=group["backend"])

    out: list = [None] * len(updates)
    sharded = [i for i, U in enumerate(updates) if U is not None and is_dtensor(U)]
    if sharded:
        _sharded_step(updates, params, sharded, out, ns, group["ns_dtype"], schedule.steps, flatten)
    for i, U in enumerate(updates):
        if U is not None and not is_dtensor(U):
            out[i] = ns(U.reshape(matrix_shape(params[i].shape, flatten)))
    return out


# ------------------------------------------------------------------------------- sharded (FSDP2)
def check_sharded_plan(params: list, param_groups: list[dict]) -> None:
    """The plan-digest all-reduce of `agreement.agree` over every mesh of these DTensor parameters
    (one per step for FSDP2's 1-D mesh), before the loop's first collective whose size depends on
    the parameters with gradients: a gradient missing on one rank is a DistributedStepError on
    every rank, never a mismatched collective."""
    signature = plan_signature(param_groups)
    meshes: dict = {}  # DeviceMesh -> a local shard's device; fully_shard builds equal meshes per module
    for p in params:
        meshes.setdefault(p.device_mesh, p.to_local().device)
    for mesh, device in meshes.items():
        for d in range(mesh.ndim):
            agree(mesh.get_group(d), digest(signature), signature, None, device)


def _row_sharded(t) -> bool:
    """A DTensor on a 1-D mesh sharded on dim 0: the layout FSDP2's fully_shard gives by default."""
    from torch.distributed.tensor import Shard

    return t.device_mesh.ndim == 1 and tuple(t.placements) == (Shard(0),)


def _sharded_step(updates, params, indices, out, ns, ns_dtype, steps, flatten) -> None:
    from torch.distributed.tensor import DTensor, Replicate

    rows_sharded, local, generic = [], [], []
    for i in indices:
        U = updates[i]
        batch, m, n = matrix_shape(params[i].shape, flatten)
        if not _row_sharded(U):
            generic.append(i)
        elif params[i].ndim > 2 and not flatten:
            local.append(i)  # Shard(0) splits the stack of matrices: whole matrices on each rank
        else:
            rows_sharded.append(i)
    meshes: dict = {}  # DeviceMesh -> members: one plan for all modules fully_shard put on equal meshes
    for i in sorted(rows_sharded + local):
        meshes.setdefault(updates[i].device_mesh, []).append(i)
    for members in meshes.values():
        _row_sharded_step(updates, params, members, out, ns, ns_dtype, steps, flatten)
    for i in generic:
        U = updates[i]
        full = ns(U.full_tensor().reshape(matrix_shape(params[i].shape, flatten)))
        mesh = U.device_mesh
        replicated = DTensor.from_local(full.reshape(U.shape), mesh, [Replicate()] * mesh.ndim, run_check=False)
        out[i] = replicated.redistribute(mesh, U.placements)


def _row_sharded_step(updates, params, members, out, ns, ns_dtype, steps, flatten) -> None:
    """Owner-based NS for Shard(0) DTensors of one 1-D mesh (see the module docstring)."""
    pg = updates[members[0]].device_mesh.get_group()
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    entries, positions, local_costs = [], [], [0] * world
    for i in members:
        batch, m, n = matrix_shape(params[i].shape, flatten)
        if params[i].ndim > 2 and not flatten:
            for r, (_, count) in enumerate(_chunk_rows(params[i].shape[0], world)):
                local_costs[r] += count * (batch // params[i].shape[0]) * ns_flops(m, n, steps)
        else:
            entries.append(((m, n, updates[i].dtype), m, n))
            positions.append(i)
    plan = plan_sharded(entries, local_costs, world, steps)

    # 1. issue every bucket's gather before the first NS: communication overlaps earlier NS work
    gathers = []
    for (m, n, _), bucket in plan.buckets:
        spans = _chunk_rows(m, world)
        rows_me = spans[rank][1]
        owned = [j for j in bucket if plan.owner[j] == rank]
        to = [[j for j in bucket if plan.owner[j] == r] for r in range(world)]
        pieces = []
        for r in range(world):
            for j in to[r]:
                local = updates[positions[j]].to_local()
                if local.shape[0] != rows_me:
                    raise NotImplementedError(
                        f"a Shard(0) DTensor of shape {tuple(params[positions[j]].shape)} holds {local.shape[0]} "
                        f"rows on rank {rank}, not torch.chunk's {rows_me}: unsupported uneven sharding"
                    )
                pieces.append(local.reshape(rows_me, n))
        send = torch.cat(pieces) if pieces else updates[positions[bucket[0]]].to_local().new_empty(0)
        send = send.reshape(-1).contiguous()
        send_splits = [len(to[r]) * rows_me * n for r in range(world)]
        recv_splits = [len(owned) * spans[s][1] * n for s in range(world)]
        recv, work = _all_to_all_async(
            "all_to_all gathering full matrices on their owner ranks", pg, rank, send, send_splits, recv_splits
        )
        gathers.append((work, recv, recv_splits, owned, to, spans, n))

    # 2. per bucket: wait for its gather, orthogonalize the owned matrices, scatter the rows back
    scatters = []
    for work, recv, recv_splits, owned, to, spans, n in gathers:
        work.wait()
        blocks, offset = [], 0
        for s in range(world):
            blocks.append(recv[offset : offset + recv_splits[s]].view(len(owned), spans[s][1], n))
            offset += recv_splits[s]
        if owned:
            result = ns(torch.cat(blocks, dim=1))  # (owned, m, n) in ns_dtype
            send = torch.cat([result[:, start : start + size].reshape(-1) for start, size in spans])
        else:
            send = torch.empty(0, dtype=ns_dtype, device=recv.device)
        rows_me = spans[rank][1]
        send_splits = [len(owned) * spans[r][1] * n for r in range(world)]
        back_splits = [len(to[s]) * rows_me * n for s in range(world)]
        back, work = _all_to_all_async(
            "all_to_all scattering orthogonalized rows back to their shards", pg, rank, send, send_splits, back_splits
        )
        scatters.append((work, back, back_splits, to, rows_me, n))

    # expert stacks sharded on the stack dim: whole matrices locally, no communication
    for i in members:
        if params[i].ndim > 2 and not flatten:
            U = updates[i]
            batch, m, n = matrix_shape(params[i].shape, flatten)
            local = U.to_local()
            result = ns(local.reshape(-1, m, n))
            out[i] = as_dtensor(result.reshape(local.shape), U)

    # 3. unpack the scattered rows into DTensors laid out like the parameters
    for work, back, back_splits, to, rows_me, n in scatters:
        work.wait()
        offset = 0
        for s in range(world):
            block = back[offset : offset + back_splits[s]].view(len(to[s]), rows_me, n)
            offset += back_splits[s]
            for j, rows in zip(to[s], block.unbind(), strict=True):
                i = positions[j]
                U = updates[i]
                out[i] = as_dtensor(rows.view(U.to_local().shape), U)


