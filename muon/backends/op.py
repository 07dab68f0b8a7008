"""`muon::newton_schulz`: Newton–Schulz as one registered torch op (`torch.ops.muon.newton_schulz`).

    muon::newton_schulz(Tensor G, float[] coefficients, float fro_scale, float eps, str precondition,
                        ScalarType dtype, str backend, str algorithm, int[] restarts) -> Tensor

G is one m×n matrix or a (B, m, n) stack, either orientation (tall matrices run transposed, on their
small side), any strides and float dtype. coefficients are the schedule's (a, b, c) of every step,
flattened (3·steps floats); fro_scale, eps and precondition ("frobenius" or "aol") are the rest of
`muon.coefficients.Schedule`. dtype is the compute dtype, and the result's: G's shape in `dtype` (a
tall G's result is the transpose of a contiguous stack, as the kernels write it). backend is "torch",
"triton", "cuda" or "auto" (the measured dispatch table per call, `muon.backends.run_auto`); algorithm
"standard" or "gram" (resolved by the caller: `muon.backends.runner.resolve`); restarts are Gram NS's
(ignored by standard NS).

Kernels:
- default (every device, CompositeExplicitAutograd): the pure-torch backend (`torch_backend.run` /
  `run_gram`), the oracle every other kernel is tested against. backend="auto" asks the dispatch
  table per call, which names torch off CUDA (never a kernel on a CPU); backend="triton" on a CPU tensor runs the Triton
  kernels in Triton's interpreter (TRITON_INTERPRET=1, how CI tests them) and "cuda" raises the
  backend's error (`BackendUnavailable`).
- CUDA: the backend the argument names: the torch backend (cuBLAS), the Triton kernels
  (`triton_backend`) or the CUDA extension (`cuda_backend`), "auto" by the dispatch table.
- fake (meta): G's (transposed) layout in `dtype`, what FakeTensor and torch.compile see; the op is
  opaque to torch.compile, which calls the registered kernel (no graph break, eager's bits).
- autograd: the gradient of the torch oracle (recomputed in backward), as the torch backend had.

Each kernel looks the backend's `run` (`run_gram`) up on its module at every call, so instrumentation
that replaces the attribute (bench profile, the tests' spies) still sees the calls.

`call(X, schedule, dtype, backend, algorithm, restarts)` is how muon calls the op. Under a
TorchDispatchMode of the user's (profilers, op and FLOP counters, bench's half-precision emulation:
any mode not of torch's own tracing machinery) it runs the kernel directly, so the mode sees the
backend's aten ops as before rather than one opaque op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..coefficients import Schedule

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
OP_ALGORITHMS = ("standard", "gram")
OP_BACKENDS = ("auto", "torch", "triton", "cuda")


def schedule_args(schedule: Schedule) -> tuple[list[float], float, float, str]:
    """The op's (coefficients, fro_scale, eps, precondition) arguments of a Schedule."""
    coefficients = [float(v) for step in schedule.coefficients for v in step]
    return coefficients, float(schedule.fro_scale), float(schedule.eps), schedule.precondition


# the op's arguments -> Schedule (a handful of distinct schedules per process; bounded anyway)
_SCHEDULES: dict = {}


def _schedule(coefficients, fro_scale: float, eps: float, precondition: str) -> Schedule:
    key = (tuple(coefficients), fro_scale, eps, precondition)
    schedule = _SCHEDULES.get(key)
    if schedule is None:
        if len(_SCHEDULES) > 256:
            _SCHEDULES.clear()
        steps = tuple(key[0][i : i + 3] for i in range(0, len(coefficients), 3))
        schedule = _SCHEDULES[key] = Schedule(steps, fro_scale, eps, precondition)
    return schedule


def _check(G: Tensor, coefficients, dtype: torch.dtype, backend: str, algorithm: str) -> None:
    if G.ndim not in (2, 3):
        raise ValueError(f"muon::newton_schulz takes an m×n matrix or a (B, m, n) stack, got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"muon::newton_schulz takes a floating tensor, got {G.dtype}")
    if len(coefficients) % 3:
        raise ValueError(f"coefficients must be the flattened (a, b, c) of every step, got {len(coefficients)} values")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
    if backend not in OP_BACKENDS:
        raise ValueError(f"backend must be one of {OP_BACKENDS}, got {backend!r}")
    if algorithm not in OP_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {OP_ALGORITHMS} (resolve 'auto' first), got {algorithm!r}")


def _stack(G: Tensor) -> tuple[Tensor, bool]:
    """(X, transposed): G as a (B, s, l) stack with s <= l (views only)."""
    m, n = G.shape[-2:]
    X = G.reshape(-1, m, n)
    transposed = m > n
    return (X.mT if transposed else X), transposed


def _unstack(Y: Tensor, G: Tensor, transposed: bool) -> Tensor:
    return (Y.mT if transposed else Y).reshape(G.shape)


def _apply(G: Tensor, coefficients, fro_scale, eps, precondition, dtype, restarts, fn) -> Tensor:
    """fn(X, schedule, dtype[, restarts]) on G's (B, s, l) stack, the result in G's shape."""
    X, transposed = _stack(G)
    if G.numel() == 0:
        Y = torch.zeros(X.shape, dtype=dtype, device=G.device)
    else:
        Y = fn(X, _schedule(coefficients, fro_scale, eps, precondition), dtype, restarts).contiguous()
    return _unstack(Y, G, transposed)


_FNS: dict = {}


def _backend_fn(backend: str, algorithm: str):
    """fn(X, schedule, dtype, restarts) of a backend, its `run`/`run_gram` looked up at each call."""
    fn = _FNS.get((backend, algorithm))
    if fn is None:
        fn = _FNS[(backend, algorithm)] = _make_backend_fn(backend, algorithm)
    return fn


def _make_backend_fn(backend: str, algorithm: str):
    from . import _module, run_auto

    if algorithm == "gram":
        # "auto" runs the torch backend's Gram NS (muon.backends.select_gram)
        module = _module("torch" if backend == "auto" else backend)
        return lambda X, schedule, dtype, restarts: module.run_gram(X, schedule, dtype, tuple(restarts))
    if backend == "auto":
        return lambda X, schedule, dtype, restarts: run_auto(X, schedule, dtype)
    module = _module(backend)
    return lambda X, schedule, dtype, restarts: module.run(X, schedule, dtype)


def _torch_fn(algorithm: str):
    return _backend_fn("torch", algorithm)


def _default_kernel(G, coefficients, fro_scale, eps, precondition, dtype, backend, algorithm, restarts):
    _check(G, coefficients, dtype, backend, algorithm)
    if backend in ("triton", "cuda"):
        from . import BackendUnavailable, unavailable_reason

        X, _ = _stack(G)
        reason = unavailable_reason(backend, X)
        if reason is not None:
            raise BackendUnavailable(reason)
        fn = _backend_fn(backend, algorithm)
    else:
        fn = _backend_fn(backend, algorithm)  # "auto": the dispatch table, which names torch off CUDA
    return _apply(G, coefficients, fro_scale, eps, precondition, dtype, restarts, fn)


# (backend, algorithm, device) that passed the availability check on a CUDA device
_CUDA_CHECKED: set = set()


def _cuda_kernel(G, coefficients, fro_scale, eps, precondition, dtype, backend, algorithm, restarts):
    _check(G, coefficients, dtype, backend, algorithm)
    key = (backend, algorithm, str(G.device))
    if key not in _CUDA_CHECKED:
        from . import select, select_gram

        X, _ = _stack(G)
        (select_gram if algorithm == "gram" else select)(backend, X)  # BackendUnavailable with the fix
        _CUDA_CHECKED.add(key)
    fn = _backend_fn(backend, algorithm)
    return _apply(G, coefficients, fro_scale, eps, precondition, dtype, restarts, fn)


SCHEMA = (
    "newton_schulz(Tensor G, float[] coefficients, float fro_scale, float eps, str precondition, "
    "ScalarType dtype, str backend, str algorithm, int[] restarts) -> Tensor"
)

# A Library with a schema rather than torch.library.custom_op: custom_op wraps its kernels in
# torch._disable_dynamo, which imports torch._dynamo (and with it Triton) on the first call, and a
# plain eager NS call must import neither.
_LIB = torch.library.Library("muon", "DEF")
_LIB.define(SCHEMA)
_LIB.impl("newton_schulz", _default_kernel, "CompositeExplicitAutograd")
_LIB.impl("newton_schulz", _cuda_kernel, "CUDA")


def _fake(G, coefficients, fro_scale, eps, precondition, dtype, backend, algorithm, restarts):
    _check(G, coefficients, dtype, backend, algorithm)
    X, transposed = _stack(G)
    return _unstack(torch.empty(X.shape, dtype=dtype, device=G.device), G, transposed)


torch.library.register_fake("muon::newton_schulz", _fake, lib=_LIB)


def _setup_context(ctx, inputs, output) -> None:
    ctx.G = inputs[0]
    ctx.args = inputs[1:]


def _backward(ctx, grad: Tensor):
    coefficients, fro_scale, eps, precondition, dtype, _, algorithm, restarts = ctx.args
    with torch.enable_grad():
        G = ctx.G.detach().requires_grad_(True)
        Y = _apply(G, coefficients, fro_scale, eps, precondition, dtype, restarts, _torch_fn(algorithm))
        (dG,) = torch.autograd.grad(Y, G, grad)
    return dG, None, None, None, None, None, None, None, None


torch.library.register_autograd("muon::newton_schulz", _backward, setup_context=_setup_context, lib=_LIB)


def _user_mode_active() -> bool:
    """A TorchDispatchMode other than torch's own tracing machinery (fake tensors, proxies,
    functionalization: classes under torch._*) is active."""
    if not torch._C._len_torch_dispatch_stack():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(not type(mode).__module__.startswith("torch._") for mode in _get_current_dispatch_mode_stack())


def call(X: Tensor, schedule: Schedule, dtype: torch.dtype, backend: str, algorithm: str, restarts=()) -> Tensor:
    """The op on X with a Schedule (what the public function and the step engine call)."""
    coefficients, fro_scale, eps, precondition = schedule_args(schedule)
    args = (X, coefficients, fro_scale, eps, precondition, dtype, backend, algorithm, [int(r) for r in restarts])
    if not torch.compiler.is_compiling() and _user_mode_active():
        kernel = _cuda_kernel if X.device.type == "cuda" else _default_kernel
        return kernel(*args)
    return torch.ops.muon.newton_schulz.default(*args)
OPERATOR = torch.ops.muon.newton_schulz.default  # the registered op
