"""Newton–Schulz backends and the one dispatcher that chooses between them.

Each backend is a function `run(X, schedule, dtype) -> Tensor` taking a (B, m, n) stack with m <= n
(any strides, any float dtype; normalization is the backend's job) and returning the orthogonalized
(B, m, n) stack in the compute `dtype`. Backends that need optional software are imported lazily, so
`import muon` never needs Triton, the CUDA extension or a GPU.

backend="auto" is `run_auto`: per call, `dispatch.choose_backend(X, dtype)` names the backend from the
measured table in muon/backends/dispatch.py (torch wherever nothing faster was measured).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch
from torch import Tensor

from ..coefficients import Schedule

BackendFn = Callable[[Tensor, Schedule, torch.dtype], Tensor]

# name -> module path; each module defines `run` and `unavailable_reason(tensor) -> str | None`.
_MODULES = {
    "torch": "muon.backends.torch_backend",
    "triton": "muon.backends.triton_backend",
    "cuda": "muon.backends.cuda_backend",
}
BACKENDS = tuple(_MODULES)


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and how to fix it."""


# name -> imported backend module: the step looks modules up here, never through importlib (which
# torch.compile cannot trace) once a backend has been imported
_LOADED: dict = {}


def _module(name: str):
    module = _LOADED.get(name)
    if module is not None:
        return module
    try:
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
        return module
    except ModuleNotFoundError as exc:
        if exc.name == _MODULES[name]:
            raise BackendUnavailable(f"backend={name!r} is not part of this muon build") from exc
        raise BackendUnavailable(f"backend={name!r} needs a missing package: {exc}") from exc
    except ImportError as exc:
        raise BackendUnavailable(f"backend={name!r} could not be imported: {exc}") from exc


# The torch backend is always there and light: loaded with the package, so that a first step run
# inside torch.compile (auto falling back to it) finds it in _LOADED, whatever ran before.
_module("torch")


def unavailable_reason(name: str, X: Tensor) -> str | None:
    """None when backend `name` can run on X; otherwise the reason, with the fix. "auto" can always
    run (torch is its fallback)."""
    if name == "auto":
        return None
    if name not in _MODULES:
        return f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}"
    try:
        mod = _module(name)
    except BackendUnavailable as exc:
        return str(exc)
    return mod.unavailable_reason(X)


def auto_order(X: Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[str, ...]:
    """Backends backend="auto" tries for X computed in `dtype`, first choice first; torch is last and
    always available. The first choice comes from the measured table (muon.backends.dispatch): never
    the CUDA extension, never a kernel on the CPU (it would run in an interpreter)."""
    from .dispatch import choose_backend

    first = choose_backend(X, dtype).backend
    return (first, "torch") if first != "torch" else ("torch",)


# (backend, device) -> whether it can run there; the answer cannot change within a process for CUDA
# devices (an installed package, a built extension), so auto asks once per device
_AUTO_AVAILABLE: dict[tuple[str, str], bool] = {}


def run_auto(X: Tensor, schedule: Schedule, dtype: torch.dtype) -> Tensor:
    """backend="auto": the backend `dispatch.choose_backend` names for this shape class, if it can run
    here, else torch."""
    from .dispatch import choose_backend

    choice = choose_backend(X, dtype)
    if choice.backend != "torch":
        key = (choice.backend, str(X.device))
        ok = _AUTO_AVAILABLE.get(key)
        if ok is None:
            ok = unavailable_reason(choice.backend, X) is None
            if X.device.type == "cuda":
                _AUTO_AVAILABLE[key] = ok
        if ok:
            return _module(choice.backend).run(X, schedule, dtype, **choice.kwargs)
    return _module("torch").run(X, schedule, dtype)


def select(name: str, X: Tensor) -> BackendFn:
    """The run function of backend `name` for X, or a clear error. "auto" returns `run_auto`, which
    decides per call from the measured dispatch table (the compute dtype is known only then)."""
    if name == "auto":
        return run_auto
    reason = unavailable_reason(name, X)
    if reason is not None:
        raise BackendUnavailable(reason)
    return _module(name).run


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_gram(name: str, X: Tensor):
    """The Gram Newton–Schulz function `run_gram(X, schedule, dtype, restarts)` of backend `name`.

    "auto" runs the torch backend (cuBLAS on CUDA): muon's Triton Gram kernels are unmeasured on a GPU,
    and auto picks only measured kernels (muon.backends.dispatch). A named backend without Gram NS
    raises BackendUnavailable naming the ones that have it.
    """
    candidates = ("torch",) if name == "auto" else (name,)
    for candidate in candidates:
        reason = unavailable_reason(candidate, X)
        if reason is not None:
            if name == "auto":
                continue
            raise BackendUnavailable(reason)
        fn = getattr(_module(candidate), "run_gram", None)
        if fn is not None:
            return fn
        if name != "auto":
            raise BackendUnavailable(
                f"backend={name!r} has no Gram Newton–Schulz: use algorithm='standard', or backend='torch' "
                "or 'triton' for algorithm='gram'"
            )
    raise BackendUnavailable(f"no Gram Newton–Schulz backend can run on a {X.device.type} tensor")


def has_gram(name: str, X: Tensor) -> bool:
    """Whether select_gram(name, X) would succeed (algorithm="auto" falls back to standard when not)."""
    try:
        select_gram(name, X)
    except BackendUnavailable:
        return False
    return True
