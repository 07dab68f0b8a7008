"""Which rank orthogonalizes which matrices, and what every rank must agree on.

Replicated parameters: the engine's plan (`muon.engine.build_plan`) groups a Muon group's matrices
into buckets of one shape (B matrices of s×l). `share_buckets` gives every matrix of the step an
owner by greedy longest-processing-time over its NS FLOPs (`muon.ns_flops.newton_schulz_flops`); the
matrices of one bucket cost the same, so only how many each rank gets matters, and each rank owns a
contiguous run of the bucket's rows (rank 0 first). Each rank's share of a group is one chunk of the
group's all-gather; chunks are padded to the busiest rank's share.

Sharded (FSDP2) parameters: `plan_sharded` gives each row-sharded matrix an owner the same way.

All of this is computed from shapes alone, so every rank computes the same plan, and
`muon.distributed.traffic` predicts the bytes from the same functions. `plan_signature` is what
ranks must agree on before any collective whose size depends on the plan.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from ..ns_flops import newton_schulz_flops
from .collectives import is_dtensor


def ns_flops(m: int, n: int, steps: int) -> int:
    """The balance weight: NS FLOPs steps·(4·s²·l + 2·s³) of one m×n matrix."""
    return newton_schulz_flops(m, n, steps)


def _assign(costs: Sequence[int], world: int, preload: Sequence[int] | None = None) -> list[int]:
    """Greedy longest-processing-time: each job, largest first, to the least loaded rank.

    Deterministic (ties: lower job index, lower rank), so every rank computes the same plan. For
    equal costs (a same-shape bucket) it deals the matrices round robin.
    """
    load = list(preload) if preload is not None else [0] * world
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += costs[j]
    return owner


def _buckets(keys: Sequence) -> dict:
    """key -> member positions, keys in first-appearance order."""
    out: dict = {}
    for j, key in enumerate(keys):
        out.setdefault(key, []).append(j)
    return out


def _chunk_rows(rows: int, world: int) -> list[tuple[int, int]]:
    """(offset, size) of each rank's rows under torch.chunk semantics (what Shard(0) and FSDP2 use)."""
    size = -(-rows // world) if rows else 0
    spans = []
    for r in range(world):
        start = min(r * size, rows)
        spans.append((start, min(rows, start + size) - start))
    return spans


# ------------------------------------------------------------------------- replicated buckets
@dataclass(frozen=True)
class GroupShare:
    """One Muon group's NS split over W ranks.

    rows[k][r]: (start, stop) rows of bucket k rank r orthogonalizes; offsets[k][r]: where they sit
    in rank r's all-gather chunk (elements); width: elements of every chunk (the busiest rank's).
    """

    rows: tuple[tuple[tuple[int, int], ...], ...]
    offsets: tuple[tuple[int, ...], ...]
    width: int


def share_buckets(buckets: Sequence[tuple[int, int, int]], world: int, steps: int, load: list[int]) -> GroupShare:
    """buckets[k] = (B, s, l) in plan order; load: NS FLOPs per rank assigned by earlier groups of
    the step (updated in place, so the balance is over the whole step)."""
    costs, which = [], []
    for k, (count, s, l) in enumerate(buckets):
        costs += [ns_flops(s, l, steps)] * count
        which += [k] * count
    owner = _assign(costs, world, load)
    counts = [[0] * world for _ in buckets]
    for j, r in enumerate(owner):
        counts[which[j]][r] += 1
        load[r] += costs[j]
    rows, offsets, used = [], [], [0] * world
    for (_, s, l), per_rank in zip(buckets, counts, strict=True):
        start, spans, offs = 0, [], []
        for r in range(world):
            spans.append((start, start + per_rank[r]))
            start += per_rank[r]
            offs.append(used[r])
            used[r] += per_rank[r] * s * l
        rows.append(tuple(spans))
        offsets.append(tuple(offs))
    return GroupShare(tuple(rows), tuple(offsets), max(used) if used else 0)


# ---------------------------------------------------------------------------- sharded (FSDP2)
@dataclass(frozen=True)
class _ShardedPlan:
    owner: tuple[int, ...]  # per row-sharded entry
    buckets: tuple[tuple[tuple, tuple[int, ...]], ...]  # (key, entry positions) in order


def plan_sharded(
    entries: Sequence[tuple[tuple, int, int]], local_costs: Sequence[int], world: int, steps: int
) -> _ShardedPlan:
    """entries[j] = (bucket key, m, n) of a row-sharded matrix; local_costs: NS FLOPs each rank
    already does on whole matrices it holds (expert stacks sharded on the expert dim)."""
    owner = _assign([ns_flops(m, n, steps) for _, m, n in entries], world, local_costs)
    buckets = tuple((key, tuple(members)) for key, members in _buckets([e[0] for e in entries]).items())
    return _ShardedPlan(tuple(owner), buckets)


# --------------------------------------------------------------------------------- agreement
def plan_signature(param_groups: Sequence[dict]) -> tuple:
    """What every rank's plan must have in common: per group, the options that shape the work and,
    per parameter, None (no gradient) or its shape, dtypes and device type (not index: every rank
    of a DDP job has its own cuda:<rank>)."""
    groups = []
    for group in param_groups:
        options = None
        if group["use_muon"]:
            options = (group["flatten"], group["batched"], repr(group["ns_coefficients"]), group["ns_steps"],
                       str(group["ns_dtype"]), group.get("transposed", False))  # fmt: skip
        params = tuple(
            None if (g := p.grad) is None else (tuple(p.shape), str(p.dtype), str(g.dtype), p.device.type)
            + ((str(tuple(p.placements)), tuple(p.device_mesh.mesh.shape)) if is_dtensor(p) else ())
            for p in group["params"]
        )
        groups.append((group["use_muon"], options, params))
    return tuple(groups)


def digest(signature: tuple) -> int:
    """A 62-bit digest of a signature: [d, -d] MIN-reduced over ranks is [min d, -max d]."""
    return int.from_bytes(hashlib.sha1(repr(signature).encode()).digest()[:8], "little") >> 2


def describe_difference(signatures: Sequence[tuple]) -> str:
    """The first difference between the ranks' plan signatures, in words."""

    def has(entry) -> str:
        return "no gradient" if entry is None else f"a gradient (shape {entry[0]}, {entry[2]})"

    ranks = range(len(signatures))
    if len({len(s) for s in signatures}) > 1:
        return ", ".join(f"rank {r} has {len(signatures[r])} param groups" for r in ranks)
    for g, groups in enumerate(zip(*signatures, strict=True)):
        if len({(kind, options) for kind, options, _ in groups}) > 1:
            return f"param_groups[{g}] has different options: " + ", ".join(
                f"rank {r} {groups[r][:2]}" for r in ranks
            )
        if len({len(params) for _, _, params in groups}) > 1:
            return f"param_groups[{g}] has " + ", ".join(f"{len(groups[r][2])} parameters on rank {r}" for r in ranks)
        for i, entries in enumerate(zip(*(params for _, _, params in groups), strict=True)):
            if len(set(entries)) > 1:
                return f"param_groups[{g}]['params'][{i}]: " + ", ".join(
                    f"rank {r} has {has(entries[r])}" for r in ranks
                )
    return "the plans differ (different process groups?)"
