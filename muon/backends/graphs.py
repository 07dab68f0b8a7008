"""CUDA-graph replay of a whole Newton–Schulz call: host cost of about one launch per call.

The first call for a key runs eagerly on a side stream (compiles the kernels), then captures the
call into a graph on static buffers owned by the cache; later calls copy the caller's stack into the
static input, replay, and copy the static output into a fresh tensor. Copies add ~8 bytes per input
element and 4 per output element of memory traffic, which is why backends use it only for calls
whose GPU work is small (launch-bound); see `triton_backend.GRAPH_MAX_FLOPS`.

Disabled (eager launches instead) on non-CUDA tensors, inside an outer stream capture (a graph in a
graph would capture our copies, which is the caller's business) and while torch.compile traces.
Bounded: at most `CAPACITY` graphs (least recently used dropped first). The process's cache is
`muon.backends.registry.REGISTRY.graphs`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from ..coefficients import Schedule

CAPACITY = 32


def graph_key(X: Tensor, schedule: Schedule, dtype: torch.dtype, variant: str) -> tuple:
    """What a captured graph depends on: device, input dtype and shape (strides do not matter: the
    input is copied into a contiguous static buffer), compute dtype, coefficients and scalars, and the
    kernel variant and the preconditioning (it changes the launches). The coefficients are baked into
    the captured launches as arguments."""
    coeffs = tuple(tuple(float(v) for v in abc) for abc in schedule.coefficients)
    return (str(X.device), X.dtype, tuple(X.shape), dtype, coeffs, float(schedule.fro_scale), float(schedule.eps),
            variant, schedule.precondition)


def unusable_reason(X: Tensor) -> str | None:
    """None when a graph may be captured/replayed for X now; otherwise why not."""
    if X.device.type != "cuda":
        return "not a CUDA tensor"
    if torch.compiler.is_compiling():
        return "inside torch.compile"
    if torch.cuda.is_current_stream_capturing():
        return "inside an outer CUDA-graph capture"
    return None


class _Entry:
    __slots__ = ("graph", "static_in", "static_out")

    def __init__(self, graph, static_in, static_out):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out


class GraphCache:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.captures = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def run(self, key: tuple, X: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """fn(X) through a cached graph (captured on first use of `key`)."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(X, fn)
            self._entries[key] = entry
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        entry.static_in.copy_(X)
        entry.graph.replay()
        self.replays += 1
        return entry.static_out.clone()

    def _capture(self, X: Tensor, fn: Callable[[Tensor], Tensor]) -> _Entry:
        static_in = torch.empty(X.shape, dtype=X.dtype, device=X.device)
        static_in.copy_(X)
        side = torch.cuda.Stream(X.device)
        side.wait_stream(torch.cuda.current_stream(X.device))
        with torch.cuda.stream(side):
            fn(static_in)  # warm-up: compiles (and autotunes) outside the capture
        torch.cuda.current_stream(X.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fn(static_in)
        self.captures += 1
        return _Entry(graph, static_in, static_out)

