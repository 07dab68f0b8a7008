"""The collectives of the distributed step: process groups, error wrapping, byte counting.

Every collective runs on the process group's own timeout (`init_process_group(timeout=...)`); a
rank that raised, exited or fell out of step turns into a `DistributedStepError` naming the
collective and the rank, not a hang. Bytes a rank sends are counted per collective with the
bandwidth-optimal (ring / pairwise) model NCCL uses: all-gather (W-1)·chunk, all-reduce
2·(W-1)/W·size, reduce-scatter (W-1)/W·size, all-to-all the bytes addressed to other ranks;
`muon.distributed.traffic` predicts with the same formulas, so counted and predicted bytes agree.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor

try:  # torch.distributed is optional in some builds (and absent on some platforms)
    import torch.distributed as dist
except ImportError:  # pragma: no cover - exercised only on builds without distributed
    dist = None


class DistributedStepError(RuntimeError):
    """A collective of the distributed Muon step failed (another rank raised, exited or timed out),
    or the ranks are not stepping the same parameters."""


DistributedStepError.__module__ = "muon.distributed"  # its public name

_COUNTERS: list[CommCounter] = []


@dataclass
class CommCounter:
    bytes: int = 0
    collectives: int = 0


@contextlib.contextmanager
def count_comm_bytes() -> Iterator[CommCounter]:
    """Count the bytes this rank sends in Muon's collectives inside the block (per the model above)."""
    counter = CommCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _record(nbytes: float) -> None:
    for counter in _COUNTERS:
        counter.bytes += int(nbytes)
        counter.collectives += 1


def all_reduce_bytes(numel: int, element_size: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce (as counted: rounded down per collective)."""
    return int(2 * (world - 1) / world * numel * element_size)


def _failed(what: str, group, exc: BaseException) -> DistributedStepError:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return DistributedStepError(
        f"muon distributed step: {what} failed on rank {rank} of {world}. Another rank raised, exited "
        "or is not running the same step (all ranks must step the optimizer with the same parameters "
        "having gradients); collectives time out after init_process_group(timeout=...). "
        f"Cause: {type(exc).__name__}: {exc}"
    )


class _Pending:
    """An async collective whose failure surfaces as a DistributedStepError on wait()."""

    def __init__(self, work, what: str, group) -> None:
        self.work, self.what, self.group = work, what, group

    def wait(self) -> None:
        try:
            self.work.wait()
        except RuntimeError as exc:
            raise _failed(self.what, self.group, exc) from exc


def _collective(what: str, group, nbytes: float, fn):
    _record(nbytes)
    try:
        work = fn()
    except RuntimeError as exc:
        raise _failed(what, group, exc) from exc
    return _Pending(work, what, group) if work is not None else None


def all_reduce(what: str, group, tensor: Tensor, op) -> None:
    """In-place all_reduce of `tensor` over `group` (synchronous; errors as DistributedStepError)."""
    world = dist.get_world_size(group)
    nbytes = all_reduce_bytes(tensor.numel(), tensor.element_size(), world)
    _collective(what, group, nbytes, lambda: dist.all_reduce(tensor, op=op, group=group))


def all_gather_into(what: str, group, output: Tensor, input: Tensor) -> None:
    """all_gather of equal-size chunks into one tensor (rank r's chunk at r·input.numel())."""
    world = dist.get_world_size(group)
    # all_gather_single is torch >= 2.13's name for all_gather_into_tensor (now deprecated)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _collective(what, group, (world - 1) * input.numel() * input.element_size(),
                lambda: gather(output, input, group=group))  # fmt: skip


def all_gather_object(what: str, group, obj) -> list:
    """Every rank's `obj` (pickled; sizes exchanged first, so unequal objects are safe)."""
    out: list = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(out, obj, group=group)
    except RuntimeError as exc:
        raise _failed(what, group, exc) from exc
    return out


def _all_to_all_async(what: str, pg, rank: int, send, send_splits: list[int], recv_splits: list[int]):
    """Start all_to_all_single(send -> a new receive buffer); returns (buffer, work). The bytes
    counted are those this rank sends to others."""
    recv = send.new_empty(sum(recv_splits))
    nbytes = (sum(send_splits) - send_splits[rank]) * send.element_size()
    work = _collective(
        what,
        pg,
        nbytes,
        lambda: dist.all_to_all_single(recv, send, recv_splits, send_splits, group=pg, async_op=True),
    )
    return recv, work


def replicated_group(process_group):
    """The process group replicated parameters split their NS over, or None for a local step.

    process_group=None takes the default group once torch.distributed is initialized; a group of
    one rank (or no initialized torch.distributed) means every rank orthogonalizes everything.
    """
    if dist is None or not dist.is_available() or not dist.is_initialized():
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialized")
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def is_dtensor(t) -> bool:
    # No DTensor exists before torch.distributed.tensor is imported: `import muon` stays light
    # (importing it costs ~0.5 s) and only FSDP2/DTensor users pay for it.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)
