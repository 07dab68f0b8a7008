"""`REGISTRY`: the one owner of muon's process-wide Newton–Schulz state.

Nothing here is a choice: which kernel runs is `muon.backends.dispatch.choose_kernel`, a pure
function, and each optimizer's plan keeps its buckets' answers. What is kept here is what those
choices and the kernels read about the process, and the bounded caches of values the kernels
rebuild otherwise:

    modules        backend name -> its imported module (muon.backends.<name>_backend); the step looks
                   modules up here, never through importlib (which torch.compile cannot trace)
    reasons        (backend, CUDA device) -> why the backend cannot run there, None when it can (an
                   installed package, a built extension: fixed for a CUDA device; CPU answers are not
                   kept, they depend on TRITON_INTERPRET)
    host           the CPU model, and the (CPU model, threads) an eager call last read (torch.compile
                   reads it, it cannot read a file)
    native         muon._C's load state (muon._native): the module or None, and why
    fns            (kernel name, algorithm) -> the op's call of that backend (muon.backends.op)
    schedules      the op's schedule arguments -> Schedule (bounded)
    coefficients   ns_small's (steps, 3) fp32 coefficient tables on a device (bounded)
    launch_plans   the persistent kernels' launch plans (kernels/persistent.py; bounded)
    graphs         captured CUDA graphs of launch-bound Triton calls (muon.backends.graphs.GraphCache,
                   least recently used dropped beyond its capacity)

Lifetime: the process. Every entry is keyed by all it depends on, or is a fact that cannot change
while the process runs, so nothing needs invalidating in normal use. `REGISTRY.clear()` empties it
all in place (tests that fake a fact — a missing extension, another CPU — call it or swap one
attribute with monkeypatch); the next use rebuilds what it needs.
"""

from __future__ import annotations


class BoundedCache(dict):
    """A dict that drops its oldest entry when `put` would exceed `capacity`."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def put(self, key, value):
        if key not in self and len(self) >= self.capacity:
            self.pop(next(iter(self)))
        self[key] = value
        return value


class Registry:
    """Process-wide NS state (see the module docstring for what each attribute holds)."""

    def __init__(self) -> None:
        self.modules: dict = {}
        self.reasons: dict = {}
        self.host: dict = {}
        self.native: dict = {}
        self.fns: dict = {}
        self.schedules = BoundedCache(256)
        self.coefficients = BoundedCache(256)
        self.launch_plans = BoundedCache(256)
        self._graphs = None

    @property
    def graphs(self):
        """The CUDA-graph cache (created on first use: importing muon never touches CUDA)."""
        if self._graphs is None:
            from .graphs import GraphCache

            self._graphs = GraphCache()
        return self._graphs

    def clear(self) -> None:
        """Forget everything, in place (a module holding one of these dicts sees it emptied)."""
        for cache in (self.modules, self.reasons, self.host, self.native, self.fns, self.schedules,
                      self.coefficients, self.launch_plans):
            cache.clear()
        if self._graphs is not None:
            self._graphs.clear()

    def sizes(self) -> dict[str, int]:
        """Entries per cache (what `clear` would drop)."""
        names = ("modules", "reasons", "host", "native", "fns", "schedules", "coefficients", "launch_plans")
        sizes = {name: len(getattr(self, name)) for name in names}
        sizes["graphs"] = 0 if self._graphs is None else len(self._graphs)
        return sizes


REGISTRY = Registry()
