"""The distributed part of a step engine plan (`muon.engine.Plan.dist`): who orthogonalizes what,
the collectives' buffers, the digest the ranks agree on, and the NS phase the engine runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .ownership import GroupShare


@dataclass
class GroupExchange:
    """One Muon group's NS split and all-gather buffers (see the module docstring)."""

    share: GroupShare
    rows: list[tuple[int, int]]  # this rank's (start, stop) rows of each bucket
    send: Tensor  # (width,) this rank's chunk, in the NS dtype (padding stays zero)
    gathered: Tensor  # (W·width,) every rank's chunk
    send_views: list[Tensor]  # (stop - start, s, l) views of send, per bucket with rows here
    results: list[Tensor]  # (B, s, l) per bucket: every rank's NS results, in plan order
    recv_views: list[Tensor]  # pieces of gathered ...
    result_views: list[Tensor]  # ... and where they go in results


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
    # the engine's NS phase for this plan: (plan, group plan, momentum phases) -> NS results per bucket
    ns_phase: Callable | None = None


