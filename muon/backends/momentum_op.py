"""`muon::low_precision_momentum`: Muon's momentum pass over a low-precision state as one registered
torch op (`torch.ops.muon.low_precision_momentum`), issue 30.

    muon::low_precision_momentum(Tensor state, Tensor? scale, Tensor grad, Tensor weight, float momentum,
                                 bool nesterov, Tensor(a!) u_out, Tensor(b!) state_out,
                                 Tensor(c!)? scale_out) -> ()

state is the stored momentum of one parameter (or of a stack of same-shape parameters): int8
blockwise-quantized with `scale` fp32 (..., ceil(n / 256)) (`muon.functional.quantize_blockwise`), or
bf16 with scale None. grad (fp32/bf16/fp16, fp64 on the torch kernel) and u_out (the NS input, in
the NS dtype) have the state's shape, any strides: u_out may be a view into a stacked, transposed NS
buffer. weight is a 0-dim tensor: 1 - momentum, or 0 for a skipped parameter. The op writes

    u_out     = U = lerp(G, B', momentum) if nesterov else B'      B' = lerp(read(state), G, weight)
    state_out = B' in the state's stored form (int8 requantized / bf16 rounded to nearest even)
    scale_out = its scales (int8; None for bf16)

and never writes state or scale: the caller copies state_out / scale_out into the optimizer state at
its commit, so a step that fails before it changes nothing.

Kernels:
- CompositeExplicitAutograd (every device; the oracle): `muon.functional` read_momentum,
  muon_momentum and store_momentum in torch ops, in fp32 (fp64 for fp64 gradients).
- CUDA: the fused Triton kernel `muon.kernels.lowp_momentum` (one pass: the state and G read once,
  the next state and U written once), bit for bit the oracle's arithmetic; the torch kernel where Triton
  is not installed or a dtype is outside the kernel's (fp64).
- fake (meta): checks, writes nothing.

`low_precision_momentum(...)` below is how muon calls it (it allocates the outputs unless given).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F

STATE_DTYPES = (torch.int8, torch.bfloat16)
_KERNEL_GRAD = (torch.float32, torch.bfloat16, torch.float16)


def _opmath(grad: Tensor) -> torch.dtype:
    return torch.float64 if grad.dtype == torch.float64 else torch.float32


def _check(state, scale, grad, weight, u_out, state_out, scale_out) -> None:
    if state.dtype not in STATE_DTYPES:
        raise ValueError(f"muon::low_precision_momentum takes an int8 or bf16 state, got {state.dtype}")
    int8 = state.dtype == torch.int8
    if (scale is None) == int8 or (scale_out is None) == int8:
        raise ValueError("an int8 state comes with its scale and scale_out, a bf16 state with neither")
    shape = tuple(state.shape)
    if not grad.is_floating_point() or tuple(grad.shape) != shape:
        raise ValueError(f"grad must be a floating tensor of the state's shape {shape}, got {grad.dtype} "
                         f"{tuple(grad.shape)}")
    if not u_out.is_floating_point() or tuple(u_out.shape) != shape:
        raise ValueError(f"u_out must be a floating tensor of the state's shape {shape}, got {u_out.dtype} "
                         f"{tuple(u_out.shape)}")
    if state_out.dtype != state.dtype or tuple(state_out.shape) != shape:
        raise ValueError(f"state_out must be {state.dtype} of shape {shape}, got {state_out.dtype} "
                         f"{tuple(state_out.shape)}")
    if weight.numel() != 1 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 0-dim floating tensor, got {weight.dtype} {tuple(weight.shape)}")
    if int8:
        sshape = (*shape[:-1], F.quant_blocks(shape[-1] if shape else 1))
        for name, t in (("scale", scale), ("scale_out", scale_out)):
            if t.dtype != torch.float32 or tuple(t.shape) != sshape:
                raise ValueError(f"{name} must be fp32 of shape {sshape}, got {t.dtype} {tuple(t.shape)}")


def torch_momentum(state: Tensor, scale: Tensor | None, grad: Tensor, weight: Tensor, momentum: float,
                   nesterov: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(U, next state, next scale or None) in torch ops: the arithmetic every kernel is held to."""
    dtype = _opmath(grad)
    buf = F.read_momentum(state, scale, dtype)  # a new tensor (upcast or dequantized): scratch
    G = grad.to(dtype, copy=True)  # overwritten by U with nesterov
    nxt, U = F.muon_momentum(buf, G, weight.to(dtype).reshape(()), momentum, nesterov, scratch=True)
    new_state, new_scale = F.store_momentum(nxt, state.dtype)
    return U, new_state, new_scale


def _torch_kernel(state, scale, grad, weight, momentum, nesterov, u_out, state_out, scale_out) -> None:
    _check(state, scale, grad, weight, u_out, state_out, scale_out)
    U, new_state, new_scale = torch_momentum(state, scale, grad, weight, momentum, nesterov)
    u_out.copy_(U)
    state_out.copy_(new_state)
    if scale_out is not None:
        scale_out.copy_(new_scale)


def kernel_takes(grad: Tensor, u_out: Tensor) -> bool:
    """The Triton kernel's dtypes: fp32/bf16/fp16 gradients and NS inputs (fp64 runs the torch kernel)."""
    return grad.dtype in _KERNEL_GRAD and u_out.dtype in _KERNEL_GRAD


def _triton_kernel(state, scale, grad, weight, momentum, nesterov, u_out, state_out, scale_out) -> None:
    """The fused kernel on the tensors' device (CUDA; a CPU tensor runs in Triton's interpreter under
    TRITON_INTERPRET=1, how the tests call it)."""
    from muon import kernels

    w = weight.to(device=state.device, dtype=torch.float32).reshape(())
    kernels.lowp_momentum(state, scale, grad, w, momentum, nesterov, u_out, state_out, scale_out)


def _cuda_kernel(state, scale, grad, weight, momentum, nesterov, u_out, state_out, scale_out) -> None:
    _check(state, scale, grad, weight, u_out, state_out, scale_out)
    if kernel_takes(grad, u_out):
        try:
            import muon.kernels  # noqa: F401
        except ModuleNotFoundError as exc:
            if exc.name != "triton":
                raise
        else:
            return _triton_kernel(state, scale, grad, weight, momentum, nesterov, u_out, state_out, scale_out)
    return _torch_kernel(state, scale, grad, weight, momentum, nesterov, u_out, state_out, scale_out)


SCHEMA = (
    "low_precision_momentum(Tensor state, Tensor? scale, Tensor grad, Tensor weight, float momentum, "
    "bool nesterov, Tensor(a!) u_out, Tensor(b!) state_out, Tensor(c!)? scale_out) -> ()"
)

# A fragment of the "muon" namespace (muon/backends/op.py defines it); a Library with a schema, not
# torch.library.custom_op, for the reason op.py gives (no torch._dynamo import on an eager call).
_LIB = torch.library.Library("muon", "FRAGMENT")
_LIB.define(SCHEMA)
_LIB.impl("low_precision_momentum", _torch_kernel, "CompositeExplicitAutograd")
_LIB.impl("low_precision_momentum", _cuda_kernel, "CUDA")


def _fake(state, scale, grad, weight, momentum, nesterov, u_out, state_out, scale_out) -> None:
    _check(state, scale, grad, weight, u_out, state_out, scale_out)


torch.library.register_fake("muon::low_precision_momentum", _fake, lib=_LIB)

OPERATOR = torch.ops.muon.low_precision_momentum.default


def low_precision_momentum(state: Tensor, scale: Tensor | None, grad: Tensor, weight: Tensor | float,
                           momentum: float, nesterov: bool, u_out: Tensor, state_out: Tensor | None = None,
                           scale_out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """One parameter's (or one stack's) momentum pass: writes U into u_out and returns the next state
    (new_state, new_scale) — int8 and its fp32 scales, or bf16 and None — in new contiguous tensors
    (or state_out / scale_out where given) for the caller to copy into the state at its commit.

    weight: 1 - momentum, or 0 for a skipped parameter; a 0-dim tensor on the device (a masked
    scalar, no host sync), or a Python float."""
    if not isinstance(weight, Tensor):
        weight = torch.tensor(float(weight), dtype=_opmath(grad), device=grad.device)
    if state_out is None:
        state_out = torch.empty(state.shape, dtype=state.dtype, device=state.device)
    if scale_out is None and scale is not None:
        scale_out = torch.empty(scale.shape, dtype=torch.float32, device=scale.device)
    OPERATOR(state, scale, grad, weight, float(momentum), bool(nesterov), u_out, state_out, scale_out)
    return state_out, scale_out
