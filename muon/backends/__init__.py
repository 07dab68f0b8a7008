"""Newton–Schulz backends, and how a group's `backend` and `ns_algorithm` become one kernel.

Each backend is a module with `run(X, schedule, dtype) -> Tensor` taking a (B, m, n) stack with m <= n
(any strides, any float dtype; normalization is the backend's job) and returning the orthogonalized
(B, m, n) stack in the compute `dtype`, and `unavailable_reason(X) -> str | None`; torch and triton
also have `run_gram` (Gram NS). Backends that need optional software are imported lazily, so
`import muon` never needs Triton, the CUDA extension or a GPU.

How a kernel is chosen: `resolve(backend, algorithm, X, ns_dtype, steps)` hands the stack's shape,
dtype and device, the options and this process's facts (which backends can run here, from
`REGISTRY`) to `dispatch.choose_kernel`, a pure function of them and the measured dispatch table,
and returns its answer as a `Kernel` (muon.backends.op): called, it runs the op `muon::newton_schulz`
with that backend. The optimizer's plan resolves once per bucket when it is built and keeps the
kernel (`plan_kernel`); `muon.newton_schulz` resolves once per call. Process-wide state (imported
modules, availability, caches) lives in one object, `muon.backends.registry.REGISTRY`.

The modules in the order they import each other (no circle): `registry` (the process's facts: the
backend modules, `BackendUnavailable`, `unavailable_reason`, the caches) <- `dispatch` (the pure
choice, a `KernelChoice`) <- `op` (the registered op, `Kernel`, `choose`/`resolve` with this process's
facts) <- this package (what a plan keeps, `select`). The backends themselves (`torch_backend`,
`triton_backend`, `cuda_backend`) are loaded by name (`registry.module`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..coefficients import DEFAULT_RESTARTS, Schedule
from . import dispatch
from .op import BatchKernel, _shape, choose, resolve
from .registry import _MODULES, BACKENDS, REGISTRY, BackendUnavailable, Reasons, module, unavailable_reason  # noqa: F401

BackendFn = Callable[[Tensor, Schedule, torch.dtype], Tensor]

# The torch backend is always there and light: loaded with the package, so that a first step run
# inside torch.compile finds it in the registry, whatever ran before.
module("torch")


def plan_kernel(backend: str, algorithm: str, X: Tensor, ns_dtype: torch.dtype, steps: int,
                restarts=DEFAULT_RESTARTS):
    """What a plan keeps for a bucket whose stacks look like X: `resolve`'s kernel, or, where the
    dispatch table's answer depends on the batch (backend="auto", standard NS, a CUDA device) and the
    plan's probe does not carry it, a `BatchKernel` that chooses once per batch size and keeps it."""
    kernel = resolve(backend, algorithm, X, ns_dtype, steps, restarts)  # raises where it cannot run
    if not dispatch.batch_matters(backend, kernel.algorithm, X.device.type):
        return kernel
    (_, s, l), probe, algorithm = _shape(X), X.new_empty(0), kernel.algorithm  # a 0-element stand-in
    return BatchKernel(lambda batch: choose(backend, algorithm, (batch, s, l), probe, ns_dtype, steps, restarts))


def run_auto(X: Tensor, schedule: Schedule, dtype: torch.dtype) -> Tensor:
    """backend="auto" as a run function: the kernel `resolve` names for this stack."""
    return resolve("auto", "standard", X, dtype, schedule.steps)(X, schedule, dtype)


def auto_order(X: Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[str, ...]:
    """Backends backend="auto" may run for X computed in `dtype`, first choice first; torch is last and
    always available (the first choice: the measured table, `dispatch.choose_for_shape`)."""
    first = dispatch.choose_for_shape(*_shape(X), dtype, X.device.type).backend
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
