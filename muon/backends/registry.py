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

import importlib

from torch import Tensor


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


# name -> module path; each module defines `run` and `unavailable_reason(tensor) -> str | None`.
_MODULES = {
    "torch": "muon.backends.torch_backend",
    "triton": "muon.backends.triton_backend",
    "cuda": "muon.backends.cuda_backend",
}
BACKENDS = tuple(_MODULES)


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and how to fix it."""


def module(name: str):
    """The imported module of backend `name` (kept in REGISTRY.modules); BackendUnavailable if it
    cannot be imported."""
    mod = REGISTRY.modules.get(name)
    if mod is not None:
        return mod
    try:
        mod = REGISTRY.modules[name] = importlib.import_module(_MODULES[name])
        return mod
    except ModuleNotFoundError as exc:
        if exc.name == _MODULES[name]:
            raise BackendUnavailable(f"backend={name!r} is not part of this muon build") from exc
        raise BackendUnavailable(f"backend={name!r} needs a missing package: {exc}") from exc
    except ImportError as exc:
        raise BackendUnavailable(f"backend={name!r} could not be imported: {exc}") from exc


def unavailable_reason(name: str, X: Tensor) -> str | None:
    """None when backend `name` can run on X; otherwise the reason, with the fix. "auto" can always
    run (torch is its fallback). Answers for a CUDA device are kept in REGISTRY.reasons."""
    if name == "auto":
        return None
    if name not in _MODULES:
        return f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}"
    cuda = X.device.type == "cuda"
    key = (name, str(X.device))
    if cuda and key in REGISTRY.reasons:
        return REGISTRY.reasons[key]
    try:
        reason = module(name).unavailable_reason(X)
    except BackendUnavailable as exc:
        reason = str(exc)
    if cuda:
        REGISTRY.reasons[key] = reason
    return reason


class Reasons:
    """backend -> why it cannot run on `probe`'s device (None: it can), asked only for the backends a
    choice needs (auto never imports the CUDA extension to learn that it would not pick it)."""

    __slots__ = ("probe",)

    def __init__(self, probe: Tensor) -> None:
        self.probe = probe

    def __getitem__(self, name: str) -> str | None:
        return unavailable_reason(name, self.probe)
