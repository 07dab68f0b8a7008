"""What the ranks agree on before they update: the plan, and which gradients are finite.

Every multi-rank step, plan or loop, replicated or DTensor (`agree`), **one collective and one
host sync** when the gradients are finite:

1. a MIN all-reduce of int64 [d, -d, fits, finite] over the plan's process group (for DTensors:
   the mesh flattened), d a digest of this rank's plan signature (which parameters have gradients,
   their shapes, dtypes and placements, the options that shape the work: `plan_signature`), fits 0
   where this rank's shards do not fit the plan, finite 0 where one of its gradients is not finite.
   The result is [min d, -max d, ...]: equal halves iff every rank has the same plan. Its size is
   fixed, so it is safe whatever the ranks hold, and it precedes every collective whose size
   depends on the plan. The verdict is read on the host (a device-to-host copy of 32 bytes; it
   waits for the work queued before the step, so a distributed step cannot be captured in a CUDA
   graph). On a mismatch every rank sees the same verdict, gathers the signatures (pickled,
   size-safe) and raises the same DistributedStepError naming the first parameter that differs;
   nothing was updated.
2. only in a step where some rank holds a non-finite gradient: a MIN all-reduce of the finite flags
   (int32, one per parameter with a gradient; the plan is agreed, so the sizes are), so a NaN on one
   rank skips that parameter on every rank (and nonfinite="raise" raises on every rank).

Why the digest is checked every step and not only when this rank's plan key changes: a rank whose
gradients changed (one missing) cannot tell the others, whose keys did not change; only a collective
every rank runs every step, of a fixed size, turns that into an error rather than mismatched
collectives. It costs nothing extra: the finite verdict rides in the same word.

DTensor gradients are tested on each rank's local shard (`muon.engine.finite_flags`) and agreed
the same way: over the plan mesh flattened (`muon.distributed.sharded`), or per mesh dim under
foreach=False (`muon.distributed.gathered`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .collectives import DistributedStepError, all_gather_object, all_reduce, dist
from .ownership import describe_difference


def _device(pg, like: torch.device | None) -> torch.device:
    if like is not None:
        return like
    if dist.get_backend(pg) == "nccl":  # NCCL only moves CUDA tensors
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(pg, digest: int, signature: tuple, flags: Tensor | None, device: torch.device | None,
          refusal: str | None = None) -> Tensor | None:
    """The plan check, then the agreed (N,) finite flags (None when no rank has a gradient).

    pg: a process group, or a list of groups whose ranks step together (DTensors on several meshes
    and mesh dims, `muon.distributed.gathered`): the word and the flags are MIN-reduced over each in
    turn, and only then judged, so a rank that raises never leaves another waiting in a later group.
    flags: this rank's (N,) bool flags; device: where the step's tensors live (None: no gradient
    on this rank). refusal: why this rank cannot step (its shards do not fit the plan, known here
    only): it still takes part, and every rank raises.
    """
    groups = list(pg) if isinstance(pg, (list, tuple)) else [pg]
    device = _device(groups[0], device if flags is None else flags.device)
    word = torch.tensor([digest, -digest, 0 if refusal else 1, 1], dtype=torch.int64, device=device)
    if flags is not None:
        word[3:].copy_(flags.all().view(1))  # on the device: no host sync before the collective
    for group in groups:
        all_reduce("all_reduce of the plan digest", group, word, dist.ReduceOp.MIN)
    low, neg_high, fits, finite = word.tolist()  # the step's host sync: it decides the next collectives
    if not fits:
        why = refusal or (
            "another rank refused the plan: its local DTensor shards do not fit their placements (its error "
            "names the parameter)"
        )
        raise DistributedStepError(f"muon distributed step: {why}; nothing was updated this step")
    if low != -neg_high:
        # every group's signatures gathered before anyone raises (a group whose ranks agree says so)
        seen = [all_gather_object("all_gather of the plan signatures", group, signature) for group in groups]
        differing = [s for s in seen if any(x != s[0] for x in s)] or seen
        raise DistributedStepError(
            "muon distributed step: the ranks of the process group are not stepping the same parameters: "
            f"{describe_difference(differing[0])}. Replicated parameters need the same parameters with gradients on "
            "every rank of `process_group` (for pipeline or tensor parallelism pass the data-parallel group "
            "as Muon(..., process_group=...)); nothing was updated this step"
        )
    if flags is None:  # the digest says every rank has no gradient either
        return None
    if finite:  # every flag of every rank is True: this rank's flags are the agreed ones
        return flags
    agreed = flags.to(torch.int32)
    for group in groups:
        all_reduce("all_reduce of the non-finite gradient flags", group, agreed, dist.ReduceOp.MIN)
    return agreed.bool()
