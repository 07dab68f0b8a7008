"""Newton–Schulz backends, and how a group's `backend` and `ns_algorithm` become one kernel.

Each backend is a module with `run(X, schedule, dtype) -> Tensor` taking a (B, m, n) stack with m <= n
(any strides, any float dtype; normalization is the backend's job) and returning the orthogonalized
(B, m, n) stack in the compute `dtype`, and `unavailable_reason(X) -> str | None`; torch and triton
also have `run_gram` (Gram NS). Backends that need optional software are imported lazily, so
`import muon` never needs Triton, the CUDA extension or a GPU.

How a kernel is chosen: `resolve(backend, algorithm, X, ns_dtype, steps)` hands the stack's shape,
dtype and device, the options and this process's facts (which backends can run here, from
`REGISTRY`) to `dispatch.choose_kernel`, a pure function of them and the measured dispatch table,
and returns its answer, a `Kernel` (muon.backends.op): called, it runs the op `muon::newton_schulz`
with that backend. The optimizer's plan resolves once per bucket when it is built and keeps the
kernel (`plan_kernel`); `muon.newton_schulz` resolves once per call. Process-wide state (imported
modules, availability, caches) lives in one object, `muon.backends.registry.REGISTRY`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from ..coefficients import DEFAULT_RESTARTS, Schedule
from .registry import REGISTRY

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


# The torch backend is always there and light: loaded with the package, so that a first step run
# inside torch.compile finds it in the registry, whatever ran before.
module("torch")


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


class _Reasons:
    """backend -> why it cannot run on `probe`'s device (None: it can), asked only for the backends a
    choice needs (auto never imports the CUDA extension to learn that it would not pick it)."""

    __slots__ = ("probe",)

    def __init__(self, probe: Tensor) -> None:
        self.probe = probe

    def __getitem__(self, name: str) -> str | None:
        return unavailable_reason(name, self.probe)


def _shape(X: Tensor) -> tuple[int, int, int]:
    return tuple(X.shape) if X.ndim == 3 else (1, *X.shape[-2:])


def choose(backend: str, algorithm: str, shape: tuple[int, int, int], probe: Tensor, ns_dtype: torch.dtype,
           steps: int, restarts=DEFAULT_RESTARTS):
    """The kernel (`muon.backends.op.Kernel`) of (backend, algorithm) for a (B, s, l) stack (s <= l) on
    `probe`'s device computed in `ns_dtype`: `dispatch.choose_kernel` with this process's facts.
    BackendUnavailable when the backend cannot run there."""
    from .dispatch import choose_kernel

    return choose_kernel(backend, algorithm, *shape, ns_dtype, probe.device.type, steps=steps,
                         restarts=tuple(restarts), reasons=_Reasons(probe))


def resolve(backend: str, algorithm: str, X: Tensor, ns_dtype: torch.dtype, steps: int,
            restarts=DEFAULT_RESTARTS):
    """`choose` for the (B, s, l) stack X (s <= l): its shape and device."""
    return choose(backend, algorithm, _shape(X), X, ns_dtype, steps, restarts)


def plan_kernel(backend: str, algorithm: str, X: Tensor, ns_dtype: torch.dtype, steps: int,
                restarts=DEFAULT_RESTARTS):
    """What a plan keeps for a bucket whose stacks look like X: `resolve`'s kernel, or, where the
    dispatch table's answer depends on the batch (backend="auto", standard NS, a CUDA device) and the
    plan's probe does not carry it, a `BatchKernel` that chooses once per batch size and keeps it."""
    from .dispatch import batch_matters
    from .op import BatchKernel

    kernel = resolve(backend, algorithm, X, ns_dtype, steps, restarts)  # raises where it cannot run
    if not batch_matters(backend, kernel.algorithm, X.device.type):
        return kernel
    (_, s, l), probe, algorithm = _shape(X), X.new_empty(0), kernel.algorithm  # a 0-element stand-in
    return BatchKernel(lambda batch: choose(backend, algorithm, (batch, s, l), probe, ns_dtype, steps, restarts))


def run_auto(X: Tensor, schedule: Schedule, dtype: torch.dtype) -> Tensor:
    """backend="auto" as a run function: the kernel `resolve` names for this stack."""
    return resolve("auto", "standard", X, dtype, schedule.steps)(X, schedule, dtype)


def auto_order(X: Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[str, ...]:
    """Backends backend="auto" may run for X computed in `dtype`, first choice first; torch is last and
    always available (the first choice: the measured table, `dispatch.choose_for_shape`)."""
    from .dispatch import choose_for_shape

    first = choose_for_shape(*_shape(X), dtype, X.device.type).backend
    return (first, "torch") if first != "torch" else ("torch",)


def select(name: str, X: Tensor) -> BackendFn:
    """The run function of backend `name` for X, or a clear error. "auto" returns `run_auto`."""
    if name == "auto":
        return run_auto
    reason = unavailable_reason(name, X)
    if reason is not None:
        raise BackendUnavailable(reason)
    return module(name).run


def select_gram(name: str, X: Tensor):
    """The Gram Newton–Schulz function `run_gram(X, schedule, dtype, restarts)` of backend `name`
    ("auto": torch's); BackendUnavailable when it cannot run or has none."""
    return module(resolve(name, "gram", X, torch.float32, 1).backend).run_gram
