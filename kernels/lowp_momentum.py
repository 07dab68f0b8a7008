"""The fused low-precision momentum pass of Muon (issue 30): one launch reads the stored momentum (int8
blockwise-quantized with its scales, or bf16) and the gradient once, and writes the next momentum in
its stored form and the Newton–Schulz input U.

    lowp_momentum(state, scale, grad, weight, momentum, nesterov, u_out, state_out, scale_out)

Per element, in fp32, the arithmetic of `muon.functional` (read_momentum, muon_momentum,
store_momentum), bit for bit:

    buf = q · scale (int8 state, one scale per block)   or   float(state) (bf16 state)
    nxt = lerp(buf, G, w)                 w: a 0-dim fp32 tensor on the device (1 - momentum, 0 = skipped)
    U   = lerp(G, nxt, momentum) if nesterov else nxt
    int8: scale' = absmax(nxt of the block) / 127, q' = round_half_even(nxt / scale') clamped to ±127
          (0 where scale' = 0);   bf16: nxt rounded to nearest even

`lerp` is torch's: w small (|w| < 0.5) -> fma(w, end - start, start), else fma(w - 1, end - start, end),
one rounding (torch's vectorized CPU kernel and its CUDA kernel both fuse it). Divisions are IEEE
(`div_rn`), rounding to an integer is `(y + 1.5·2^23) - 1.5·2^23` (exact round-half-even for |y| <= 2^22,
the interpreter has no `rint`), and the launch turns off the compiler's mul+add contraction
(`enable_fp_fusion=False`) so the dequantizing product is rounded on its own, as torch rounds it.

A block is QUANT_BLOCK = 256 consecutive elements of a row of the last dim (the last block of a row may
be shorter). Every tensor is seen as a (B, M, N) stack of rows with its own strides (a parameter is
(1, M, N); a stack of same-shape parameters one launch), so U can be a view into a stacked, possibly
transposed NS buffer. The next state goes to separate outputs: the caller copies them into the
optimizer state at its commit (a failed step writes no state). One program per ROWS rows × one block
(n < 256: one block per row, BLOCK = next_pow2(n), more rows per program).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, batch_chunks, next_pow2

QUANT_BLOCK = 256  # muon.functional.QUANT_BLOCK (kept equal by tests/test_low_precision_momentum.py)
QUANT_MAX = tl.constexpr(127.0)
# elements per program: 4096 on a GPU (32 per thread at 4 warps: 16-byte int8 loads); the interpreter
# takes small tiles so tiny test shapes walk several row tiles
_TILE = 1024 if INTERPRETED else 4096
_WARPS = 4
STATE_DTYPES = (torch.int8, torch.bfloat16)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
U_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ROUND = tl.constexpr(12582912.0)  # 1.5 · 2^23: (x + _ROUND) - _ROUND rounds x to an integer, half to even


@triton.jit
def _lerp(start, end, w):
    """torch.lerp(start, end, w) for a scalar fp32 weight: one fused multiply-add, as torch computes it."""
    small = tl.abs(w) < 0.5
    coeff = tl.where(small, w, w - 1.0)
    return tl.fma(coeff, end - start, tl.where(small, start, end))


@triton.jit
def _lowp_momentum_kernel(Q, S, G, W, QO, SO, U, M, N, n_blocks, momentum,
                          s_qb, s_qm, s_qn, s_sb, s_sm, s_sn, s_gb, s_gm, s_gn,
                          s_ob, s_om, s_on, s_pb, s_pm, s_pn, s_ub, s_um, s_un,
                          INT8: tl.constexpr, NESTEROV: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tile = pid // n_blocks
    blk = pid % n_blocks
    rows = tile * ROWS + tl.arange(0, ROWS)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    r = rows.to(tl.int64)[:, None]
    c = cols.to(tl.int64)[None, :]
    g = tl.load(G + b * s_gb + r * s_gm + c * s_gn, mask=mask, other=0.0).to(tl.float32)
    if INT8:
        q = tl.load(Q + b * s_qb + r * s_qm + c * s_qn, mask=mask, other=0).to(tl.float32)
        scale = tl.load(S + b * s_sb + rows.to(tl.int64) * s_sm + blk * s_sn, mask=row_ok, other=0.0)
        buf = q * scale[:, None]
    else:
        buf = tl.load(Q + b * s_qb + r * s_qm + c * s_qn, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W)
    nxt = _lerp(buf, g, w)  # masked lanes: buf = g = 0, so nxt = 0 (never above a block's absmax)
    if NESTEROV:
        # an fp32 scalar (the interpreter would otherwise take momentum - 1 in Python's double)
        u = _lerp(g, nxt, tl.full((), momentum, tl.float32))
    else:
        u = nxt
    tl.store(U + b * s_ub + r * s_um + c * s_un, u.to(U.dtype.element_ty), mask=mask)
    out = QO + b * s_ob + r * s_om + c * s_on
    if INT8:
        new_scale = tl.math.div_rn(tl.max(tl.abs(nxt), axis=1), QUANT_MAX)
        # a block of zeros (scale 0) divides by 1 instead: its q is 0 either way, and no 0 / 0 is formed
        y = tl.math.div_rn(nxt, tl.where(new_scale > 0.0, new_scale, 1.0)[:, None])
        y = (y + _ROUND) - _ROUND  # round half to even (|y| <= 127 + ulps)
        y = tl.minimum(tl.maximum(y, -QUANT_MAX), QUANT_MAX)
        tl.store(out, y.to(tl.int8), mask=mask)
        tl.store(SO + b * s_pb + rows.to(tl.int64) * s_pm + blk * s_pn, new_scale, mask=row_ok)
    else:
        tl.store(out, nxt.to(QO.dtype.element_ty), mask=mask)


def tile_shape(n: int) -> tuple[int, int]:
    """(ROWS, BLOCK) of a row length n: BLOCK = one quantization block (next_pow2(n) below 256)."""
    block = QUANT_BLOCK if n >= QUANT_BLOCK else next_pow2(n)
    return max(1, _TILE // block), block


def _as3(t: torch.Tensor, M: int, N: int) -> torch.Tensor | None:
    """t as a (B, M, N) view (None where its leading dims cannot be viewed as one)."""
    if t.ndim == 1:
        return t.unsqueeze(0).unsqueeze(0)
    if t.ndim == 2:
        return t.unsqueeze(0)
    if t.ndim == 3:
        return t
    try:
        return t.view(-1, M, N)
    except RuntimeError:
        return None


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2)


def lowp_momentum(state: torch.Tensor, scale: torch.Tensor | None, grad: torch.Tensor, weight: torch.Tensor,
                  momentum: float, nesterov: bool, u_out: torch.Tensor, state_out: torch.Tensor,
                  scale_out: torch.Tensor | None) -> None:
    """One launch (per 65,535 stacked matrices) of the fused pass; writes u_out, state_out and (int8)
    scale_out, reads the rest. state int8 (scale fp32 of shape (..., ceil(n/256))) or bf16 (scale None);
    grad fp32/bf16/fp16 and u_out fp32/bf16/fp16 of state's shape, any strides; weight a 0-dim fp32
    tensor on the device. Outputs whose leading dims cannot be viewed as one are written through a
    contiguous temporary."""
    int8 = state.dtype == torch.int8
    if state.dtype not in STATE_DTYPES or (scale is None) == int8 or (scale_out is None) == int8:
        raise ValueError(f"state must be int8 with scales or bf16 without, got {state.dtype}, scale "
                         f"{'given' if scale is not None else 'None'}")
    if grad.dtype not in GRAD_DTYPES or u_out.dtype not in U_DTYPES:
        raise ValueError(f"grad must be one of {GRAD_DTYPES} and u_out one of {U_DTYPES}, got {grad.dtype}, "
                         f"{u_out.dtype}")
    shape = tuple(state.shape)
    if grad.shape != shape or u_out.shape != shape or state_out.shape != shape or state_out.dtype != state.dtype:
        raise ValueError(f"grad, u_out and state_out must have the state's shape {shape} (state_out its dtype)")
    if weight.numel() != 1 or weight.dtype != torch.float32 or weight.device != state.device:
        raise ValueError("weight must be a 1-element fp32 tensor on the state's device")
    if state.numel() == 0:
        return
    N = shape[-1] if shape else 1
    M = shape[-2] if len(shape) >= 2 else 1
    if int8:
        nb = -(-N // QUANT_BLOCK)
        sshape = (*shape[:-1], nb)
        if tuple(scale.shape) != sshape or tuple(scale_out.shape) != sshape or \
                scale.dtype != torch.float32 or scale_out.dtype != torch.float32:
            raise ValueError(f"scale and scale_out must be fp32 of shape {sshape}")
    rows, block = tile_shape(N)
    n_blocks = -(-N // block)
    q3, g3 = _as3(state, M, N), _as3(grad, M, N)
    q3 = q3 if q3 is not None else state.reshape(-1, M, N)
    g3 = g3 if g3 is not None else grad.reshape(-1, M, N)
    u3, o3 = _as3(u_out, M, N), _as3(state_out, M, N)
    u_tmp = u3 is None
    o_tmp = o3 is None
    if u_tmp:
        u3 = torch.empty(g3.shape, dtype=u_out.dtype, device=u_out.device)
    if o_tmp:
        o3 = torch.empty(q3.shape, dtype=state.dtype, device=state.device)
    if int8:
        s3, p3 = _as3(scale, M, n_blocks), _as3(scale_out, M, n_blocks)
        s3 = s3 if s3 is not None else scale.reshape(-1, M, n_blocks)
        p_tmp = p3 is None
        if p_tmp:
            p3 = torch.empty(s3.shape, dtype=torch.float32, device=state.device)
    else:
        s3 = p3 = q3  # unused pointers (INT8=False); one block per row only for int8
        p_tmp = False
    B = q3.shape[0]
    grid0 = triton.cdiv(M, rows) * n_blocks
    for lo, hi in batch_chunks(B):
        q, s, g, o, p, u = (t[lo:hi] for t in (q3, s3, g3, o3, p3, u3))
        _lowp_momentum_kernel[(grid0, hi - lo)](
            q, s, g, weight, o, p, u, M, N, n_blocks, float(momentum),
            *_strides(q), *_strides(s), *_strides(g), *_strides(o), *_strides(p), *_strides(u),
            INT8=int8, NESTEROV=bool(nesterov), ROWS=rows, BLOCK=block, num_warps=_WARPS,
            enable_fp_fusion=False,
        )
    if u_tmp:
        u_out.copy_(u3.view(shape))
    if o_tmp:
        state_out.copy_(o3.view(shape))
    if p_tmp:
        scale_out.copy_(p3.view(scale_out.shape))
