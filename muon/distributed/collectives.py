"""The collectives of the distributed step: process groups, error wrapping, byte counting.

Every collective runs on the process group's own timeout (`init_process_group(timeout=...)`); a
rank that raised, exited or fell out of step turns into a `DistributedStepError` naming the
collective and the rank, not a hang. Bytes a rank sends are counted per collective with the
bandwidth-optimal (ring / pairwise) model NCCL uses: all-gather (W-1)·chunk, all-reduce
2·(W-1)/W·size, reduce-scatter (W-1)/W·size, all-to-all the bytes addressed to other ranks;
`muon.distributed.traffic` predicts with the same formulas, so counted and predicted bytes agree.

A collective is finished only when the backend has let go of its tensors. gloo runs collectives on
worker threads (`ProcessGroupGloo::runLoop`), and a worker destroys the finished work object, with
its vectors of tensors, only after the caller's `wait()` has returned. In a fraction of collectives
(one in five to one in twenty, measured on two cores) the caller has dropped its references by
then, so the worker drops the last C++ reference to a tensor, which releases the tensor's Python
object and takes the GIL (torch checks `Py_IsInitialized` there, which stays true during
finalization: pytorch/pytorch#190489). If the main thread is already in `Py_FinalizeEx` (a
DistributedStepError, or the last step, followed by the end of the process), `take_gil` ends the
worker with `pthread_exit`, whose forced unwind through the work's destructor calls
`std::terminate`: the process aborts ("terminate called without an active exception"; the core
dump's worker stack reads runLoop → ~AsyncAllgatherWork → THPVariable_dealloc → take_gil →
pthread_exit). So every collective here waits, then drops the work and waits (GIL released) until
the tensors' use counts are back to what they were before it started; and none is left pending: a
failing collective first finishes every other one still in flight (as does an exit handler, for
work a caller abandoned).
"""

from __future__ import annotations

import atexit
import contextlib
import pickle
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
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


# How long a finished collective waits for the backend to release its tensors before giving up
# (the release takes microseconds; only a starved worker thread takes longer).
_RELEASE_TIMEOUT_S = 5.0
_PENDING: list[_Pending] = []  # started asynchronously, not yet waited
_DRAIN_AT_EXIT: list[bool] = []


def _use_counts(tensors: Sequence[Tensor]) -> list[int] | None:
    """The tensors' use counts, or None where no settling applies: CUDA tensors (NCCL keeps its own
    references until its watchdog retires the work) and torch builds without `Tensor._use_count`."""
    if not tensors or any(t.device.type != "cpu" for t in tensors) or not hasattr(tensors[0], "_use_count"):
        return None
    return [t._use_count() for t in tensors]


def _finish(box: list, tensors: Sequence[Tensor], before: list[int] | None) -> None:
    """Wait for the work in `box` (its only reference), then drop it and wait until the backend has
    released `tensors` (use counts back to `before`, taken before the collective started), so that no
    backend thread is left to release them later (module docstring)."""
    work = box.pop()
    try:
        work.wait()
    finally:
        del work
        if before is not None:
            deadline = time.monotonic() + _RELEASE_TIMEOUT_S
            pause = 1e-5
            while any(t._use_count() > b for t, b in zip(tensors, before)) and time.monotonic() < deadline:
                time.sleep(pause)  # releases the GIL, which the releasing worker thread needs
                pause = min(2 * pause, 1e-3)


def _drain() -> None:
    """Finish every collective still pending (their errors are not this caller's to raise)."""
    while _PENDING:
        try:
            _PENDING[-1].wait()
        except DistributedStepError:
            pass


class _Pending:
    """An async collective; wait() finishes it (module docstring), a failure surfaces as a
    DistributedStepError after every other pending collective has been finished."""

    def __init__(self, work, what: str, group, tensors: Sequence[Tensor], before: list[int] | None) -> None:
        self._box, self.what, self.group = [work], what, group
        self._tensors, self._before = list(tensors), before
        _PENDING.append(self)
        if not _DRAIN_AT_EXIT:  # work a caller abandoned (an exception between start and wait)
            atexit.register(_drain)
            _DRAIN_AT_EXIT.append(True)

    def wait(self) -> None:
        if self in _PENDING:
            _PENDING.remove(self)
        if not self._box:
            return
        try:
            _finish(self._box, self._tensors, self._before)
        except RuntimeError as exc:
            _drain()
            raise _failed(self.what, self.group, exc) from exc
        finally:
            self._tensors = []


def _collective(what: str, group, nbytes: float, tensors: Sequence[Tensor], start: Callable, wait: bool = True):
    """Run `start()` (a torch.distributed call with async_op=True) on `tensors`; with wait, finish it
    here, else return a _Pending."""
    _record(nbytes)
    before = _use_counts(tensors)
    try:
        work = start()
    except RuntimeError as exc:
        _drain()
        raise _failed(what, group, exc) from exc
    if work is None:  # not a member of the group
        return None
    pending = _Pending(work, what, group, tensors, before)
    del work
    if not wait:
        return pending
    pending.wait()
    return None


def all_reduce(what: str, group, tensor: Tensor, op) -> None:
    """In-place all_reduce of `tensor` over `group` (synchronous; errors as DistributedStepError)."""
    world = dist.get_world_size(group)
    nbytes = all_reduce_bytes(tensor.numel(), tensor.element_size(), world)
    _collective(what, group, nbytes, [tensor], lambda: dist.all_reduce(tensor, op=op, group=group, async_op=True))


def all_gather_into(what: str, group, output: Tensor, input: Tensor) -> None:
    """all_gather of equal-size chunks into one tensor (rank r's chunk at r·input.numel())."""
    world = dist.get_world_size(group)
    # all_gather_single is torch >= 2.13's name for all_gather_into_tensor (now deprecated)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _collective(what, group, (world - 1) * input.numel() * input.element_size(), [output, input],
                lambda: gather(output, input, group=group, async_op=True))  # fmt: skip


def _object_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":  # NCCL only moves CUDA tensors
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(what: str, group, obj) -> list:
    """Every rank's `obj` (pickled; the sizes are gathered first, so unequal objects are safe). Not
    torch.distributed.all_gather_object, whose collectives are not finished as described above."""
    world = dist.get_world_size(group)
    device = _object_device(group)
    data = pickle.dumps(obj)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_into(what, group, sizes, size)
    lengths = sizes.tolist()
    width = max(lengths)
    mine = torch.zeros(width, dtype=torch.uint8)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(device)
    gathered = torch.empty(world * width, dtype=torch.uint8, device=device)
    all_gather_into(what, group, gathered, mine)
    flat = gathered.cpu().numpy().tobytes()
    return [pickle.loads(flat[r * width : r * width + n]) for r, n in enumerate(lengths)]


def _all_to_all_async(what: str, pg, rank: int, send, send_splits: list[int], recv_splits: list[int]):
    """Start all_to_all_single(send -> a new receive buffer); returns (buffer, pending work). The bytes
    counted are those this rank sends to others."""
    recv = send.new_empty(sum(recv_splits))
    nbytes = (sum(send_splits) - send_splits[rank]) * send.element_size()
    work = _collective(
        what,
        pg,
        nbytes,
        [recv, send],
        lambda: dist.all_to_all_single(recv, send, recv_splits, send_splits, group=pg, async_op=True),
        wait=False,
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
