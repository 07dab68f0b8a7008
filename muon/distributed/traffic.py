"""The communication model: bytes per step of distributed Muon against distributed AdamW.

`comm_bytes_per_step` predicts, for a list of shapes, the bytes each rank sends per step, from the
same ownership functions the optimizer executes (`muon.distributed.ownership`) and the same per-
collective cost model `count_comm_bytes` counts with (`muon.distributed.collectives`), so counted
and predicted bytes agree exactly. Modelled, not measured on GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .._shapes import matrix_shape
from .collectives import all_reduce_bytes
from .ownership import _assign, _chunk_rows, ns_flops, plan_sharded, share_buckets


@dataclass(frozen=True)
class CommBytes:
    """Bytes sent per step by the busiest rank, Muon against distributed AdamW on the same parameters.

    gradient_sync: the data-parallel traffic both share (DDP: gradient all-reduce; FSDP2: parameter
    all-gathers in forward and backward plus the gradient reduce-scatter). muon_optimizer: what
    Muon's step adds (NS gather/scatter; the plan-digest and finite-flag all-reduces); AdamW's step
    adds nothing.
    """

    world_size: int
    sharding: str
    gradient_sync: int
    muon_optimizer_per_rank: tuple[int, ...]
    adamw_optimizer: int = 0

    @property
    def muon_optimizer(self) -> int:
        return max(self.muon_optimizer_per_rank)

    @property
    def muon_total(self) -> int:
        return self.gradient_sync + self.muon_optimizer

    @property
    def adamw_total(self) -> int:
        return self.gradient_sync + self.adamw_optimizer

    @property
    def ratio(self) -> float:
        """Muon's bytes per step over distributed AdamW's (Moonlight reports 1–1.25)."""
        return self.muon_total / self.adamw_total if self.adamw_total else math.inf


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def comm_bytes_per_step(
    muon_shapes: Iterable[Sequence[int]],
    adamw_shapes: Iterable[Sequence[int]] = (),
    *,
    world_size: int,
    sharding: str = "replicated",
    param_dtype: torch.dtype = torch.float32,
    grad_dtype: torch.dtype | None = None,
    ns_dtype: torch.dtype = torch.bfloat16,
    ns_steps: int = 5,
    flatten: bool = False,
    reshard_after_forward: bool = True,
    mesh_shape: Sequence[int] | None = None,
    placements: Sequence | None = None,
) -> CommBytes:
    """Bytes per step of distributed Muon vs distributed AdamW, for the busiest rank.

    muon_shapes: shapes of the parameters in one Muon group (as in `Muon` with its defaults);
    adamw_shapes: those of one AdamW group. sharding: "replicated" (DDP), "fsdp" (FSDP2
    fully_shard, Shard(0) on a 1-D mesh) or "mesh" (any DTensor layout the plan takes: FSDP2 × TP,
    HSDP, Shard(1), uneven shards; give mesh_shape and per Muon shape its placements on that mesh).
    Computed from the plan the optimizer executes, with the
    collective cost model of `count_comm_bytes` (ring all-gather/all-reduce/reduce-scatter).
    """

    if sharding not in ("replicated", "fsdp", "mesh"):
        raise ValueError(f"sharding must be 'replicated', 'fsdp' or 'mesh', got {sharding!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    W = world_size
    muon_shapes = [tuple(s) for s in muon_shapes]
    adamw_shapes = [tuple(s) for s in adamw_shapes]
    grad_dtype = param_dtype if grad_dtype is None else grad_dtype
    pb, gb, nb = _dtype_bytes(param_dtype), _dtype_bytes(grad_dtype), _dtype_bytes(ns_dtype)
    total = sum(math.prod(s) for s in muon_shapes + adamw_shapes)
    if W == 1:
        return CommBytes(W, sharding, 0, (0,))
    if sharding == "mesh":
        return _mesh_bytes(muon_shapes, W, mesh_shape, placements, gb, nb, ns_steps, flatten)

    if sharding == "replicated":
        grad_sync = 2 * (W - 1) / W * total * gb
        # the plan's buckets (batched=True): matrices of one (small side, large side), in order
        buckets: dict[tuple[int, int], int] = {}
        for shape in muon_shapes:
            if math.prod(shape) == 0:
                continue
            batch, m, n = matrix_shape(torch.Size(shape), flatten)
            key = (min(m, n), max(m, n))
            buckets[key] = buckets.get(key, 0) + batch
        share = share_buckets([(b, s, l) for (s, l), b in buckets.items()], W, ns_steps, [0] * W)
        gather = (W - 1) * share.width * nb if buckets else 0
        # the agreement: int64 [digest, -digest, fits, finite] (the flags' own all-reduce runs only in a
        # step with a non-finite gradient)
        agreement = all_reduce_bytes(4, 8, W)
        return CommBytes(W, sharding, int(grad_sync), (int(gather) + agreement,) * W)

    gathers = 2 if reshard_after_forward else 1
    grad_sync = (W - 1) / W * total * (gathers * pb + gb)
    sent = [0.0] * W
    entries, local_costs = [], [0] * W
    for shape in muon_shapes:
        batch, m, n = matrix_shape(torch.Size(shape), flatten)
        if len(shape) > 2 and not flatten:
            for r, (_, count) in enumerate(_chunk_rows(shape[0], W)):
                local_costs[r] += count * (batch // shape[0]) * ns_flops(m, n, ns_steps)
        else:
            entries.append(((m, n), m, n))
    plan = plan_sharded(entries, local_costs, W, ns_steps)
    for _, bucket in plan.buckets:
        _, m, n = entries[bucket[0]]
        spans = _chunk_rows(m, W)
        for j in bucket:
            owner = plan.owner[j]
            for r in range(W):
                if r != owner:
                    sent[r] += spans[r][1] * n * gb  # gather: my rows of j to its owner
                    sent[owner] += spans[r][1] * n * nb  # scatter: the owner returns r's rows
    # the agreement on the mesh, as for replicated parameters
    flags = all_reduce_bytes(4, 8, W)
    return CommBytes(W, sharding, int(grad_sync), tuple(int(b) + flags for b in sent))


def _mesh_bytes(muon_shapes, W, mesh_shape, placements, gb, nb, steps, flatten) -> CommBytes:
    """sharding="mesh": DTensor parameters on a mesh of `mesh_shape` covering the world in order, one
    entry of `placements` per Muon shape (its placements on that mesh; None: a plain tensor). The
    sharded plan's owners (`muon.distributed.sharded.plan_muon_group`) and its packed all_to_alls:
    each owner receives each distinct block of its matrices once, from its closest holder, in the
    gradient dtype, and returns every other rank its block in the NS dtype. Only Muon's own bytes:
    gradient_sync (FSDP2's and TP's collectives, which AdamW has too) is not modelled here (0)."""
    from .layout import layout_of, mesh_coords, sources

    if mesh_shape is None or placements is None or len(placements) != len(muon_shapes):
        raise ValueError("sharding='mesh' needs mesh_shape and one placements entry per Muon shape")
    if math.prod(mesh_shape) != W:
        raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not hold world_size={W} ranks")
    coords = mesh_coords(tuple(mesh_shape))
    load, costs, matrices = [0] * W, [], []
    for shape, placed in zip(muon_shapes, placements, strict=True):
        if math.prod(shape) == 0:
            continue
        kind, geometry = layout_of(shape, mesh_shape, placed, flatten)
        _, m, n = matrix_shape(torch.Size(shape), flatten)
        cost = ns_flops(m, n, steps)
        if kind == "local":
            for r, count in enumerate(geometry):
                load[r] += count * cost
        else:
            costs.append(cost)
            matrices.append(geometry)
    owner = _assign(costs, W, load)
    sent = [0.0] * W
    for blocks, q in zip(matrices, owner, strict=True):
        for s, (_, nr, _, nc) in sources(blocks, q, coords):
            if s != q:
                sent[s] += nr * nc * gb  # gather: s's block to the owner
        for t, (_, nr, _, nc) in enumerate(blocks):
            if t != q:
                sent[q] += nr * nc * nb  # scatter: the owner returns t its block
    agreement = all_reduce_bytes(4, 8, W)
    return CommBytes(W, "mesh", 0, tuple(int(b) + agreement for b in sent))
