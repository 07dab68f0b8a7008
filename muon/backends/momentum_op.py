"""`muon::low_precision_momentum`: Muon's momentum pass over a low-precision state as one registered
torch op (`torch.ops.muon.low_precision_momentum`), issue 30.

    muon::low_precision_momentum(Tensor state, Tensor? scale, Tensor grad, Tensor weight, float momentum,
                                 bool nesterov, Tensor(a!) u_out, Tensor(b!) state_out,
                                 Tensor(c!)? scale_out) -> ()

state is the stored momentum of one parameter, or of a stack of B same-shape parameters: int8
blockwise-quantized with `scale` fp32 (`muon.functional.quantize_blockwise`: rows = dim 0, the rest
flattened, blocks of 256 along a row; scale (rows, blocks) = `F.scale_shape` for one parameter,
(B, rows, blocks) for a stack), or bf16 with scale None (a bf16 state of 3 or more dims is taken as
a stack of its dim 0: the same bits either way). grad (fp32/bf16/fp16; fp64 on the torch kernel)
has the state's shape; u_out (the NS input, in the NS dtype) the state's shape or its rows' ((rows,
row length) for one parameter, (B, rows, row length) for a stack), any strides: a slot of a stacked,
possibly transposed NS buffer. weight holds 1 value, or one per stacked parameter: 1 - momentum, or
0 for a skipped parameter (masked on the device, no host sync). The op writes

    u_out     = U = lerp(G, B', momentum) if nesterov else B'      B' = lerp(read(state), G, weight)
    state_out = B' in the state's stored form (int8 requantized / bf16 rounded to nearest even;
                weight 0: the stored bits, as `F.store_momentum` keeps a skipped parameter's)
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

import math

import torch
from torch import Tensor

from .. import functional as F

STATE_DTYPES = (torch.int8, torch.bfloat16)
_KERNEL_GRAD = (torch.float32, torch.bfloat16, torch.float16)


def _opmath(grad: Tensor) -> torch.dtype:
    return torch.float64 if grad.dtype == torch.float64 else torch.float32


def layout(state: Tensor, scale: Tensor | None) -> tuple[int, int, int]:
    """(B, M, L): the state as B parameters of M rows (dim 0) of L elements (the rest, flattened), the
    rows `muon.functional.quantize_blockwise` cuts a parameter into. An int8 state says which by its
    scale: (M, blocks) one parameter, (B, M, blocks) a stack of B. A bf16 state (elementwise, no
    blocks): a 3-D or larger state is a stack of its dim 0, anything else one parameter."""
    shape = tuple(state.shape)
    if (scale.ndim == 3) if scale is not None else len(shape) >= 3:
        return shape[0], (shape[1] if len(shape) > 1 else 1), math.prod(shape[2:])
    return 1, (shape[0] if shape else 1), math.prod(shape[1:])


def _check(state, scale, grad, weight, u_out, state_out, scale_out) -> tuple[int, int, int]:
    if state.dtype not in STATE_DTYPES:
        raise ValueError(f"muon::low_precision_momentum takes an int8 or bf16 state, got {state.dtype}")
    int8 = state.dtype == torch.int8
    if (scale is None) == int8 or (scale_out is None) == int8:
        raise ValueError("an int8 state comes with its scale and scale_out, a bf16 state with neither")
    if int8 and (scale.ndim not in (2, 3) or (scale.ndim == 3 and state.ndim < 2) or state.ndim < 1):
        raise ValueError(f"scale must be (rows, blocks) for one parameter or (B, rows, blocks) for a stack, "
                         f"got {tuple(scale.shape)} for a state of shape {tuple(state.shape)}")
    B, M, L = layout(state, scale)
    shape = tuple(state.shape)
    if not grad.is_floating_point() or tuple(grad.shape) != shape:
        raise ValueError(f"grad must be a floating tensor of the state's shape {shape}, got {grad.dtype} "
                         f"{tuple(grad.shape)}")
    u_shapes = [shape, (B, M, L)] + ([(M, L)] if B == 1 else [])  # a list: sizes may be SymInts
    if not u_out.is_floating_point() or tuple(u_out.shape) not in u_shapes:
        raise ValueError(f"u_out must be a floating tensor of the state's shape {shape} (or its rows "
                         f"{(M, L) if B == 1 else (B, M, L)}), got {u_out.dtype} {tuple(u_out.shape)}")
    if state_out.dtype != state.dtype or tuple(state_out.shape) != shape:
        raise ValueError(f"state_out must be {state.dtype} of shape {shape}, got {state_out.dtype} "
                         f"{tuple(state_out.shape)}")
    if weight.numel() not in (1, B) or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating tensor of 1 value (or one per stacked parameter: {B}), got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if int8:
        sshape = (M, F.quant_blocks(L)) if B == 1 and scale.ndim == 2 else (B, M, F.quant_blocks(L))
        for name, t in (("scale", scale), ("scale_out", scale_out)):
            if t.dtype != torch.float32 or tuple(t.shape) != sshape:
                raise ValueError(f"{name} must be fp32 of shape {sshape}, got {t.dtype} {tuple(t.shape)}")
    return B, M, L


def torch_momentum(state: Tensor, scale: Tensor | None, grad: Tensor, weight: Tensor, momentum: float,
                   nesterov: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(U, next state, next scale or None) in torch ops, U of shape (B, M, L), the state and scales in
    their own shapes: the arithmetic every kernel is held to (`muon.functional`, one parameter's rows
    after another's for a stack)."""
    B, M, L = layout(state, scale)
    dtype = _opmath(grad)
    rows = (B * M, L)
    q = state.reshape(rows)
    s = None if scale is None else scale.reshape(B * M, -1)
    buf = F.read_momentum(q, s, dtype).view(B, M, L)  # a new tensor (upcast or dequantized): scratch
    G = grad.reshape(B, M, L).to(dtype, copy=True)  # overwritten by U with nesterov
    w = weight.to(dtype).reshape(-1, 1, 1)
    nxt, U = F.muon_momentum(buf, G, w if w.numel() > 1 else w.reshape(()), momentum, nesterov, scratch=True)
    ok = None if s is None else (w != 0).expand(B, M, 1).reshape(B * M, 1)
    new_state, new_scale = F.store_momentum(nxt.reshape(rows), state.dtype, ok, (q, s))
    return U, new_state.view(state.shape), None if new_scale is None else new_scale.view(scale.shape)


def _torch_kernel(state, scale, grad, weight, momentum, nesterov, u_out, state_out, scale_out) -> None:
    _check(state, scale, grad, weight, u_out, state_out, scale_out)
    U, new_state, new_scale = torch_momentum(state, scale, grad, weight, momentum, nesterov)
    u_out.copy_(U.view(u_out.shape))
    state_out.copy_(new_state)
    if scale_out is not None:
        scale_out.copy_(new_scale)


def kernel_takes(grad: Tensor, u_out: Tensor) -> bool:
    """The Triton kernel's dtypes: fp32/bf16/fp16 gradients and NS inputs (fp64 runs the torch kernel)."""
    return grad.dtype in _KERNEL_GRAD and u_out.dtype in _KERNEL_GRAD


def _view3(t: Tensor, shape3: tuple[int, int, int]) -> Tensor | None:
    """t as a (B, M, L) view, or None where its strides do not allow one."""
    try:
        return t.view(shape3)
    except RuntimeError:
        return None


def _triton_kernel(state, scale, grad, weight, momentum, nesterov, u_out, state_out, scale_out) -> None:
    """The fused kernel on the tensors' device (CUDA; a CPU tensor runs in Triton's interpreter under
    TRITON_INTERPRET=1, how the tests call it), on (B, M, L) views: inputs that have none are copied,
    outputs that have none are written through a contiguous temporary."""
    from muon import kernels

    B, M, L = shape3 = layout(state, scale)
    nb = F.quant_blocks(L)
    ins = []
    for t, sh in ((state, shape3), (grad, shape3), (scale, (B, M, nb))):
        ins.append(None if t is None else (_view3(t, sh) if _view3(t, sh) is not None else t.reshape(sh)))
    q3, g3, s3 = ins
    outs, temps = [], []
    for t, sh in ((u_out, shape3), (state_out, shape3), (scale_out, (B, M, nb))):
        v = None if t is None else _view3(t, sh)
        if t is not None and v is None:
            v = torch.empty(sh, dtype=t.dtype, device=t.device)
            temps.append((t, v))
        outs.append(v)
    u3, o3, p3 = outs
    w = weight.to(device=state.device, dtype=torch.float32).reshape(-1).contiguous()
    kernels.lowp_momentum(q3, s3, g3, w, momentum, nesterov, u3, o3, p3)
    for t, v in temps:
        t.copy_(v.view(t.shape))


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
    scalar, no host sync), one value per parameter of a stack ((B,) or (B, 1, 1)), or a Python float.
    A stack: state (B, ...) with scale (B, rows, blocks) (int8), each parameter quantized on its own."""
    if not isinstance(weight, Tensor):
        weight = torch.tensor(float(weight), dtype=_opmath(grad), device=grad.device)
    if state_out is None:
        state_out = torch.empty(state.shape, dtype=state.dtype, device=state.device)
    if scale_out is None and scale is not None:
        scale_out = torch.empty(scale.shape, dtype=torch.float32, device=scale.device)
    OPERATOR(state, scale, grad, weight, float(momentum), bool(nesterov), u_out, state_out, scale_out)
    return state_out, scale_out
