"""`muon::newton_schulz`: Newton–Schulz as one registered torch op (`torch.ops.muon.newton_schulz`).

    muon::newton_schulz(Tensor G, float[] coefficients, float fro_scale, float eps, str precondition,
                        ScalarType dtype, str backend, str algorithm, int[] restarts) -> Tensor

G is one m×n matrix or a (B, m, n) stack, either orientation (tall matrices run transposed, on their
small side), any strides and float dtype. coefficients are the schedule's (a, b, c) of every step,
flattened (3·steps floats); fro_scale, eps and precondition ("frobenius" or "aol") are the rest of
`muon.coefficients.Schedule`. dtype is the compute dtype, and the result's: G's shape in `dtype` (a
tall G's result is the transpose of a contiguous stack, as the kernels write it). backend names the
kernel: "torch", "triton" (v1, its path by shape), "triton:small", "triton:gemm", "triton:persistent",
"cuda" — what a `Kernel` resolved by `muon.backends.resolve` passes — or "auto" (resolved at the call,
for callers of the op itself and a compiled step's first trace); algorithm "standard" or "gram"
(resolved by the caller); restarts are Gram NS's (ignored by standard NS).

Kernels:
- every device (one kernel, registered as CompositeExplicitAutograd and for CUDA): the backend the
  argument names, checked first (`BackendUnavailable` with the fix). On CUDA: the torch backend
  (cuBLAS), the Triton kernels (`triton_backend`, the path after the colon) or the CUDA extension
  (`cuda_backend`). Elsewhere the
  pure-torch backend (`torch_backend.run` / `run_gram`), the oracle every other kernel is tested
  against ("auto" names it there: never a kernel on a CPU), or the Triton kernels in Triton's
  interpreter on a CPU tensor (TRITON_INTERPRET=1, how CI tests them); "cuda" raises.
- fake (meta): G's (transposed) layout in `dtype`, what FakeTensor and torch.compile see; the op is
  opaque to torch.compile, which calls the registered kernel (no graph break, eager's bits).
- autograd: the gradient of the torch oracle (recomputed in backward), as the torch backend had.

Each kernel looks the backend's `run` (`run_gram`) up on its module at every call, so instrumentation
that replaces the attribute (bench profile, the tests' spies) still sees the calls.

`Kernel(backend, algorithm, path, restarts)` is one resolved kernel (what `muon.backends.dispatch.
choose_kernel` answers and a plan keeps per bucket); called as `kernel(X, schedule, dtype)` it runs
the op through `call(X, schedule, dtype, name, algorithm, restarts)`, how muon calls the op. Under a
TorchDispatchMode of the user's (profilers, op and FLOP counters, bench's half-precision emulation:
any mode not of torch's own tracing machinery) it runs the kernel directly, so the mode sees the
backend's aten ops as before rather than one opaque op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..coefficients import DEFAULT_RESTARTS, Schedule
from . import dispatch
from .dispatch import KernelChoice, kernel_name  # noqa: F401
from .registry import REGISTRY, Reasons, module

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
OP_ALGORITHMS = ("standard", "gram")
TRITON_PATHS = ("small", "gemm", "persistent")  # "triton" alone: v1, its path by shape
OP_BACKENDS = ("auto", "torch", "triton", *(f"triton:{p}" for p in TRITON_PATHS), "cuda")


class Kernel(KernelChoice):
    """One resolved Newton–Schulz kernel (`dispatch.KernelChoice`) that runs: called, it runs
    muon::newton_schulz with it."""

    __slots__ = ()

    @classmethod
    def of(cls, choice: KernelChoice) -> Kernel:
        return cls(choice.backend, choice.algorithm, path=choice.path, restarts=choice.restarts, reason=choice.reason)

    def __call__(self, X: Tensor, schedule: Schedule, dtype: torch.dtype) -> Tensor:
        return call(X, schedule, dtype, self.name, self.algorithm, self.restarts)


class BatchKernel:
    """A bucket's kernel where the dispatch table's answer depends on the batch (backend="auto" on
    CUDA) and the plan was built without it: `choose(batch)` runs at the first call with each batch
    size and its Kernel is kept here (a bucket has one or two chunk sizes). While torch.compile traces
    a batch not chosen yet, the op is called with "auto" and chooses at run time."""

    __slots__ = ("choose", "by_batch", "algorithm")

    def __init__(self, choose) -> None:
        self.choose, self.by_batch, self.algorithm = choose, {}, "standard"

    def __call__(self, X: Tensor, schedule: Schedule, dtype: torch.dtype) -> Tensor:
        batch = X.shape[0] if X.ndim == 3 else 1
        kernel = self.by_batch.get(batch)
        if kernel is None:
            if torch.compiler.is_compiling():
                return call(X, schedule, dtype, "auto", "standard", ())
            kernel = self.by_batch[batch] = self.choose(batch)
        return kernel(X, schedule, dtype)


def schedule_args(schedule: Schedule) -> tuple[list[float], float, float, str]:
    """The op's (coefficients, fro_scale, eps, precondition) arguments of a Schedule."""
    coefficients = [float(v) for step in schedule.coefficients for v in step]
    return coefficients, float(schedule.fro_scale), float(schedule.eps), schedule.precondition


def _schedule(coefficients, fro_scale: float, eps: float, precondition: str) -> Schedule:
    """The op's arguments -> Schedule (REGISTRY.schedules: a handful per process, bounded anyway)."""
    key = (tuple(coefficients), fro_scale, eps, precondition)
    schedule = REGISTRY.schedules.get(key)
    if schedule is None:
        steps = tuple(key[0][i : i + 3] for i in range(0, len(coefficients), 3))
        schedule = REGISTRY.schedules.put(key, Schedule(steps, fro_scale, eps, precondition))
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
    """(X, transposed): G as a (B, s, l) stack with s <= l (views only; a stack is not reshaped, which
    would dispatch an op for nothing)."""
    m, n = G.shape[-2:]
    X = G if G.ndim == 3 else G.reshape(-1, m, n)
    transposed = m > n
    return (X.mT if transposed else X), transposed


def _unstack(Y: Tensor, G: Tensor, transposed: bool) -> Tensor:
    Y = Y.mT if transposed else Y
    return Y if G.ndim == 3 else Y.reshape(G.shape)


def _apply(G: Tensor, coefficients, fro_scale, eps, precondition, dtype, restarts, fn) -> Tensor:
    """fn(X, schedule, dtype[, restarts]) on G's (B, s, l) stack, the result in G's shape."""
    X, transposed = _stack(G)
    if G.numel() == 0:
        Y = torch.zeros(X.shape, dtype=dtype, device=G.device)
    else:
        Y = fn(X, _schedule(coefficients, fro_scale, eps, precondition), dtype, restarts).contiguous()
    return _unstack(Y, G, transposed)


def _backend_fn(name: str, algorithm: str):
    """fn(X, schedule, dtype, restarts) of kernel `name`: its backend's `run`/`run_gram` looked up at
    each call (instrumentation that replaces the attribute sees the calls)."""
    backend, _, path = name.partition(":")
    mod = module(backend)
    if algorithm == "gram":
        return lambda X, schedule, dtype, restarts: mod.run_gram(X, schedule, dtype, tuple(restarts))
    if path:
        return lambda X, schedule, dtype, restarts: mod.run(X, schedule, dtype, path=path)
    return lambda X, schedule, dtype, restarts: mod.run(X, schedule, dtype)


def _kernel(G, coefficients, fro_scale, eps, precondition, dtype, backend, algorithm, restarts):
    """The op's kernel on every device: the backend `backend` names ("auto": resolved here), checked
    first (BackendUnavailable with the fix). The backend function is kept in REGISTRY.fns per
    (kernel, algorithm, device) where the check's answer cannot change: torch everywhere, any named
    kernel on a CUDA device."""
    _check(G, coefficients, dtype, backend, algorithm)
    key = (backend, algorithm, G.device)
    fn = REGISTRY.fns.get(key)
    if fn is None:
        name = backend
        if backend != "torch":
            X, _ = _stack(G)
            kernel = resolve(backend.partition(":")[0], algorithm, X, dtype, len(coefficients) // 3)
            name = kernel.name if backend == "auto" else backend
        fn = _backend_fn(name, algorithm)
        if backend == "torch" or (G.device.type == "cuda" and backend != "auto"):
            REGISTRY.fns[key] = fn
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
_LIB.impl("newton_schulz", _kernel, "CompositeExplicitAutograd")
_LIB.impl("newton_schulz", _kernel, "CUDA")  # the same kernel: a CUDA tensor's backend is the argument's


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
        Y = _apply(G, coefficients, fro_scale, eps, precondition, dtype, restarts, _backend_fn("torch", algorithm))
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


def _plain_eager(X: Tensor) -> bool:
    """Nothing would see the op on X: a plain tensor, no dispatch or function mode, no functorch
    transform, no gradient to record. The dispatcher would then run `_kernel` itself, after a Python
    round trip through the autograd wrapper and a redispatch (about 60 µs a call on a CPU)."""
    return (
        type(X) is Tensor
        and not torch._C._len_torch_dispatch_stack()
        and not (X.requires_grad and torch.is_grad_enabled())
        and not torch._C._is_torch_function_mode_enabled()
        and not torch._C._are_functorch_transforms_active()
    )


def call(X: Tensor, schedule: Schedule, dtype: torch.dtype, backend: str, algorithm: str, restarts=()) -> Tensor:
    """The op on X with a Schedule (what the public function and the step engine call). Eager calls
    that nothing would see the op in (`_plain_eager`) and calls under a user's dispatch mode run its
    kernel directly, the same function on the same arguments."""
    coefficients, fro_scale, eps, precondition = schedule_args(schedule)
    args = (X, coefficients, fro_scale, eps, precondition, dtype, backend, algorithm, [int(r) for r in restarts])
    if not torch.compiler.is_compiling() and (_plain_eager(X) or _user_mode_active()):
        return _kernel(*args)
    return torch.ops.muon.newton_schulz.default(*args)
OPERATOR = torch.ops.muon.newton_schulz.default  # the registered op


def _shape(X: Tensor) -> tuple[int, int, int]:
    return tuple(X.shape) if X.ndim == 3 else (1, *X.shape[-2:])


def choose(backend: str, algorithm: str, shape: tuple[int, int, int], probe: Tensor, ns_dtype: torch.dtype,
           steps: int, restarts=DEFAULT_RESTARTS):
    """The kernel (`muon.backends.op.Kernel`) of (backend, algorithm) for a (B, s, l) stack (s <= l) on
    `probe`'s device computed in `ns_dtype`: `dispatch.choose_kernel` with this process's facts.
    BackendUnavailable when the backend cannot run there."""
    choice = dispatch.choose_kernel(backend, algorithm, *shape, ns_dtype, probe.device.type, steps=steps,
                                    restarts=tuple(restarts), reasons=Reasons(probe))
    return Kernel.of(choice)


def resolve(backend: str, algorithm: str, X: Tensor, ns_dtype: torch.dtype, steps: int,
            restarts=DEFAULT_RESTARTS):
    """`choose` for the (B, s, l) stack X (s <= l): its shape and device."""
    return choose(backend, algorithm, _shape(X), X, ns_dtype, steps, restarts)
