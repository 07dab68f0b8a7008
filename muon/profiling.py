"""Host-cost accounting: count the aten ops a block of code dispatches.

Each dispatched op is at least one kernel launch on a GPU, so the count is a device-independent
measure of an optimizer step's host cost (the step engine's tests and `python -m bench step` use it).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "count_dispatched_ops"]

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
