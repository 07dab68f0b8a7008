"""Replicated parameters (DDP, or plain tensors once a multi-rank process group exists) on the
engine's plan (`muon.engine`): the same buckets and chunks as one process, with the NS split over
the ranks.

`prepare` adds to the plan who orthogonalizes which rows of every Muon bucket
(`ownership.share_buckets`) and the all-gather's layout. A step, per Muon group:

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
with a non-finite gradient); `agree_plan` is that check for every kind of plan (a gathered plan,
`muon.distributed.gathered`, brings its own per mesh).

DTensor parameters run the owner plan (`muon.distributed.sharded`) or, under foreach=False, the
gathered one (`muon.distributed.gathered`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine import Plan, chunked_ns
from .agreement import agree
from .collectives import all_gather_into, dist
from .exchange import Exchange, GroupExchange
from .ownership import digest, plan_signature, share_buckets


# ------------------------------------------------------------------------ replicated, on the plan
def prepare(plan: Plan, param_groups: list[dict], pg, ns_chunk_bytes: int | None = None) -> Exchange:
    """Attach to `plan` who orthogonalizes which rows (the all-gather's buffers are per step); each
    rank orthogonalizes its rows in chunks of `ns_chunk_bytes`."""
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    signature = plan_signature(param_groups)
    device = plan.flag_params[0].device if plan.flag_params else None
    ex = Exchange(pg, world, rank, signature, digest(signature), device, ns_phase=replicated_ns,
                  ns_chunk_bytes=ns_chunk_bytes)
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
            view = send[offset : offset + (stop - start) * s * l].view(stop - start, s, l)
            O = chunked_ns(b, ph.U[start:stop], ex.ns_chunk_bytes, out=view)
            if O is not view:  # one chunk: copied with the others' below
                send_views.append(view)
                mine.append(O)
            del O
        ph.U = None  # orthogonalized (or another rank's rows): the commit does not read it
    if mine:
        torch._foreach_copy_(send_views, mine)
    del mine, send_views
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
