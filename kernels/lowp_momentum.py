"""The fused low-precision momentum pass of Muon (issue 30): one launch reads the stored momentum (int8
blockwise-quantized with its scales, or bf16) and the gradient once, and writes the next momentum in
its stored form and the Newton–Schulz input U.

    lowp_momentum(state, scale, grad, weight, momentum, nesterov, u_out, state_out, scale_out)

Every tensor is a (B, M, L) stack of rows with its own strides (scales (B, M, ceil(L / 256))): B
same-shape parameters, each of M rows (its dim 0) of L elements (the rest of it, flattened), as
`muon.functional.quantize_blockwise` cuts a parameter into rows; a single parameter is B = 1. U can be
a view into a stacked, transposed NS buffer. weight holds 1 or B values (one per parameter).

Per element, in fp32, the arithmetic of `muon.functional` (read_momentum, muon_momentum,
store_momentum), bit for bit:

    buf = q · scale (int8 state, one scale per block)   or   float(state) (bf16 state)
    nxt = lerp(buf, G, w)                 w: 1 - momentum, or 0 for a skipped parameter
    U   = lerp(G, nxt, momentum) if nesterov else nxt
    int8: scale' = absmax(nxt of the block) / 127, q' = round_half_even(nxt / scale') clamped to ±127
          (0 where scale' = 0); w = 0 (skipped): the stored q and scale, bit for bit
    bf16: nxt rounded to nearest even (w = 0 gives the stored bits back by itself)

`lerp` is torch's: w small (|w| < 0.5) -> fma(w, end - start, start), else fma(w - 1, end - start, end),
one rounding (torch's vectorized CPU kernel and its CUDA kernel both fuse it). Divisions are IEEE
(`div_rn`), rounding to an integer is `(y + 1.5·2^23) - 1.5·2^23` (exact round-half-even for |y| <= 2^22;
the interpreter has no `rint`), and the launch turns off the compiler's mul+add contraction
(`enable_fp_fusion=False`) so the dequantizing product is rounded on its own, as torch rounds it.

A block is QUANT_BLOCK = 256 consecutive elements of a row (the last block of a row may be shorter).
The next state goes to separate outputs: the caller copies them into the optimizer state at its
commit (a failed step writes no state). One program per ROWS rows × one block (L < 256: one block
per row, BLOCK = next_pow2(L), more rows per program); grid (row tiles × blocks, B), B in chunks of
65,535.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, batch_chunks, next_pow2

QUANT_BLOCK = 256  # muon.functional.QUANT_BLOCK (kept equal by tests/test_low_precision_momentum.py)
QUANT_MAX = tl.constexpr(127.0)
# elements per program: 4096 on a GPU (16 per thread at 8 warps: one 16-byte int8 load; 40-64 registers
# on sm_90a, where 4 warps took up to 126); the interpreter takes small tiles so tiny test shapes walk
# several row tiles
_TILE = 1024 if INTERPRETED else 4096
_WARPS = 8
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
def _lowp_momentum_kernel(Q, S, G, W, QO, SO, U, M, N, n_blocks, momentum, s_w,
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
        q = tl.load(Q + b * s_qb + r * s_qm + c * s_qn, mask=mask, other=0)
        scale = tl.load(S + b * s_sb + rows.to(tl.int64) * s_sm + blk * s_sn, mask=row_ok, other=0.0)
        buf = q.to(tl.float32) * scale[:, None]
    else:
        buf = tl.load(Q + b * s_qb + r * s_qm + c * s_qn, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + b * s_w)
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
        # a skipped parameter (w = 0: nxt = buf) keeps its stored bits, whatever its scale
        keep = w == 0.0
        tl.store(out, tl.where(keep, q, y.to(tl.int8)), mask=mask)
        tl.store(SO + b * s_pb + rows.to(tl.int64) * s_pm + blk * s_pn, tl.where(keep, scale, new_scale),
                 mask=row_ok)
    else:
        tl.store(out, nxt.to(QO.dtype.element_ty), mask=mask)


def tile_shape(n: int) -> tuple[int, int]:
    """(ROWS, BLOCK) of a row length n: BLOCK = one quantization block (next_pow2(n) below 256)."""
    block = QUANT_BLOCK if n >= QUANT_BLOCK else next_pow2(n)
    return max(1, _TILE // block), block


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2)


def lowp_momentum(state: torch.Tensor, scale: torch.Tensor | None, grad: torch.Tensor, weight: torch.Tensor,
                  momentum: float, nesterov: bool, u_out: torch.Tensor, state_out: torch.Tensor,
                  scale_out: torch.Tensor | None) -> None:
    """The fused pass over (B, M, L) stacks (any strides; muon/backends/momentum_op.py makes these views
    of a parameter or a stack): writes u_out, state_out and (int8) scale_out, reads the rest. state
    int8 with fp32 scales (B, M, ceil(L / 256)), or bf16 with scale None; grad and u_out fp32, bf16
    or fp16; weight fp32 on the device, 1 or B contiguous values."""
    int8 = state.dtype == torch.int8
    if state.dtype not in STATE_DTYPES or (scale is None) == int8 or (scale_out is None) == int8:
        raise ValueError(f"state must be int8 with scales or bf16 without, got {state.dtype}, scale "
                         f"{'given' if scale is not None else 'None'}")
    if grad.dtype not in GRAD_DTYPES or u_out.dtype not in U_DTYPES:
        raise ValueError(f"grad must be one of {GRAD_DTYPES} and u_out one of {U_DTYPES}, got {grad.dtype}, "
                         f"{u_out.dtype}")
    if state.ndim != 3:
        raise ValueError(f"state must be a (B, M, L) stack, got shape {tuple(state.shape)}")
    shape = tuple(state.shape)
    B, M, L = shape
    if tuple(grad.shape) != shape or tuple(u_out.shape) != shape or tuple(state_out.shape) != shape \
            or state_out.dtype != state.dtype:
        raise ValueError(f"grad, u_out and state_out must have the state's shape {shape} (state_out its dtype)")
    if weight.numel() not in (1, B) or weight.dtype != torch.float32 or weight.device != state.device \
            or (weight.numel() > 1 and not weight.is_contiguous()):
        raise ValueError(f"weight must be 1 or {B} contiguous fp32 values on the state's device")
    rows, block = tile_shape(L)
    n_blocks = -(-L // block)
    if int8:
        sshape = (B, M, n_blocks)
        if tuple(scale.shape) != sshape or tuple(scale_out.shape) != sshape or \
                scale.dtype != torch.float32 or scale_out.dtype != torch.float32:
            raise ValueError(f"scale and scale_out must be fp32 of shape {sshape}")
    if state.numel() == 0:
        return
    s, p = (scale, scale_out) if int8 else (state, state_out)  # unused pointers for a bf16 state
    s_w = 0 if weight.numel() == 1 else 1
    grid0 = triton.cdiv(M, rows) * n_blocks
    for lo, hi in batch_chunks(B):
        w = weight.reshape(-1)[lo:hi] if s_w else weight.reshape(-1)
        q_, s_, g_, o_, p_, u_ = (t[lo:hi] for t in (state, s, grad, state_out, p, u_out))
        _lowp_momentum_kernel[(grid0, hi - lo)](
            q_, s_, g_, w, o_, p_, u_, M, L, n_blocks, float(momentum), s_w,
            *_strides(q_), *_strides(s_), *_strides(g_), *_strides(o_), *_strides(p_), *_strides(u_),
            INT8=int8, NESTEROV=bool(nesterov), ROWS=rows, BLOCK=block, num_warps=_WARPS,
            enable_fp_fusion=False,
        )
