"""The distributed part of a step engine plan (`muon.engine.Plan.dist`): who orthogonalizes what,
the collectives' buffers, the digest the ranks agree on, and the NS phase the engine runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .ownership import GroupShare


@dataclass
class GroupExchange:
    """One Muon group's NS split: which rows each rank orthogonalizes, and where they travel in the
    step's all-gather (the buffers themselves are the step's temporaries, `replicated_ns`)."""

    share: GroupShare
    rows: list[tuple[int, int]]  # this rank's (start, stop) rows of each bucket
    shapes: list[tuple[int, int, int]]  # (B, s, l) of each bucket
    dtype: torch.dtype  # the NS dtype (what travels)
    device: torch.device


@dataclass
class Exchange:
    """The distributed part of a plan (`muon.engine.Plan.dist`)."""

    pg: object
    world: int
    rank: int
    signature: tuple
    digest: int
    device: torch.device | None
    groups: dict[int, GroupExchange] = field(default_factory=dict)  # by group index
    sharded: bool = False  # FSDP2 (DTensor) parameters: `muon.distributed.sharded`
    ns_chunk_bytes: int | None = None  # the owners' NS in chunks of at most this (None: whole stacks)
    # the engine's NS phase for this plan: (plan, group plan, momentum phases) -> NS results per bucket
    ns_phase: Callable | None = None
    # (plan, flags) -> the agreed flags, where the plan's ranks do not share one process group
    # (`muon.distributed.gathered`); None: `agreement.agree` over `pg`
    agree: Callable | None = None


