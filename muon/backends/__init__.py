"""Newton–Schulz backends and the one dispatcher that chooses between them.

Each backend is a function `run(X, schedule, dtype) -> Tensor` taking a (B, m, n) stack with m <= n
(any strides, any float dtype; normalization is the backend's job) and returning the orthogonalized
(B, m, n) stack in the compute `dtype`. Backends that need optional software are imported lazily, so
`import muon` never needs Triton, the CUDA extension or a GPU.
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


def _module(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as exc:
        if exc.name == _MODULES[name]:
            raise BackendUnavailable(f"backend={name!r} is not part of this muon build") from exc
        raise BackendUnavailable(f"backend={name!r} needs a missing package: {exc}") from exc
    except ImportError as exc:
        raise BackendUnavailable(f"backend={name!r} could not be imported: {exc}") from exc


def unavailable_reason(name: str, X: Tensor) -> str | None:
    """None when backend `name` can run on X; otherwise the reason, with the fix."""
    if name not in _MODULES:
        return f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}"
    try:
        mod = _module(name)
    except BackendUnavailable as exc:
        return str(exc)
    return mod.unavailable_reason(X)


def auto_order(X: Tensor) -> tuple[str, ...]:
    """Backends tried by backend="auto", fastest first, for X's device and shape.

    The torch backend is last and always available. On the CPU the Triton interpreter and the CUDA
    extension are never picked automatically, even under TRITON_INTERPRET=1 (they are far slower there).
    """
    if X.device.type == "cuda":
        return ("triton", "torch")
    return ("torch",)


def select(name: str, X: Tensor) -> BackendFn:
    """The run function of backend `name` ("auto" resolves per tensor) for X, or a clear error."""
    if name == "auto":
        for candidate in auto_order(X):
            if unavailable_reason(candidate, X) is None:
                return _module(candidate).run
        raise BackendUnavailable(f"no Newton–Schulz backend can run on a {X.device.type} tensor")
    reason = unavailable_reason(name, X)
    if reason is not None:
        raise BackendUnavailable(reason)
    return _module(name).run


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_gram(name: str, X: Tensor):
    """The Gram Newton–Schulz function `run_gram(X, schedule, dtype, restarts)` of backend `name`.

    "auto" takes the first backend of `auto_order` that can run X and has Gram NS; a named backend
    without it raises BackendUnavailable naming the ones that have it.
    """
    candidates = auto_order(X) if name == "auto" else (name,)
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
