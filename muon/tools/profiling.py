"""Host-cost accounting: count the aten ops a block of code dispatches.

Each dispatched op is at least one kernel launch on a GPU, so the count is a device-independent
measure of an optimizer step's host cost (the step engine's tests and `python -m bench step` use it).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["FlopCount", "OpCount", "count_dispatched_ops", "count_matmul_flops"]

# Ops that only describe a tensor (no data touched, no launch on any device).
_METADATA_OPS = frozenset({"aten.detach.default", "aten.alias.default", "prim.device.default"})


class OpCount(Counter):
    """op name -> times dispatched; `total` is the sum (metadata-only ops excluded)."""

    @property
    def total(self) -> int:
        return sum(self.values())


class _Counter(TorchDispatchMode):
    def __init__(self, counts: OpCount) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name not in _METADATA_OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_dispatched_ops() -> Iterator[OpCount]:
    """Count the aten ops dispatched inside the block, by name.

    >>> with count_dispatched_ops() as ops:
    ...     opt.step()
    >>> ops.total, ops.most_common(5)
    """
    counts = OpCount()
    with _Counter(counts):
        yield counts


# Matmul ops and how to read (batch, m, k, n) from their arguments; 2·m·n·k FLOPs per matrix.
def _mm_dims(args):
    a, b = args[0], args[1]
    return 1, a.shape[0], a.shape[1], b.shape[1]


def _bmm_dims(args):
    a, b = args[0], args[1]
    return a.shape[0], a.shape[1], a.shape[2], b.shape[2]


def _addmm_dims(args):
    return _mm_dims(args[1:])


def _baddbmm_dims(args):
    return _bmm_dims(args[1:])


_MATMUL_DIMS = {
    "aten.mm.default": _mm_dims,
    "aten.bmm.default": _bmm_dims,
    "aten.addmm.default": _addmm_dims,
    "aten.baddbmm.default": _baddbmm_dims,
}


class FlopCount(Counter):
    """op name -> matmul FLOPs (2·m·n·k per matrix product); `total` is the sum."""

    @property
    def total(self) -> int:
        return sum(self.values())


class _FlopCounter(TorchDispatchMode):
    def __init__(self, counts: FlopCount) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        dims = _MATMUL_DIMS.get(name)
        if dims is not None:
            batch, m, k, n = dims(args)
            self.counts[name] += 2 * batch * m * n * k
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_matmul_flops() -> Iterator[FlopCount]:
    """Sum 2·m·n·k over the mm/bmm/addmm/baddbmm calls dispatched inside the block (matmul/@ decompose
    into these). Counts what runs, independently of torch.utils.flop_counter's formulas.

    >>> with count_matmul_flops() as flops:
    ...     muon.newton_schulz(G, algorithm="gram", backend="torch")
    >>> flops.total
    """
    counts = FlopCount()
    with _FlopCounter(counts):
        yield counts
