"""Scale-safe Frobenius normalization of a (B, m, n) stack: X0 = (X / max|X|) / (fro_scale·‖X / max|X|‖_F + eps).

The same arithmetic as muon/backends/torch_backend.py `normalize`: dividing by the max-abs entry first brings
every matrix to max |x| = 1, so the fp32 sum of squares lies in [1, m·n] and can neither under- nor
overflow for inputs anywhere in the fp32 range (1e-25 and 1e25 alike); a zero matrix maps to zero.
Three launches, all per-matrix values staying on the device (no host sync), deterministic (no atomics):

1. `_amax_partial`: one program per block of rows writes that block's max |x|;
2. `_sumsq_partial`: reduces the row-block maxima, writes the block's Σ (x / amax)²;
3. `_scale_cast`: reduces both, writes (x / amax) / denom in the compute dtype.

Each program owns ROWS rows and walks all n columns; ROWS grows with m so that the partial buffers
never exceed MAX_PARTS entries and every program can reduce them in one load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, as_batched, batch_chunks, check_compute_dtype, check_out, next_pow2

MAX_PARTS = 1024
# Under the interpreter small blocks make the column loop and several row blocks run on tiny test shapes.
_COLS = 32 if INTERPRETED else 512
_MIN_ROWS = 8 if INTERPRETED else 4


@triton.jit
def _row_block_ptrs(base, r0, c0, M, N, s_m, s_n, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = r0 + tl.arange(0, ROWS)
    cols = c0 + tl.arange(0, COLS)
    # int64 row offsets: m·n may pass 2^31 for one matrix
    ptrs = base + rows.to(tl.int64)[:, None] * s_m + cols.to(tl.int64)[None, :] * s_n
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    return ptrs, mask


@triton.jit
def _amax_partial(X, PART_MAX, M, N, s_b, s_m, s_n, n_parts, ROWS: tl.constexpr, COLS: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    base = X + b * s_b
    acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    for c0 in range(0, N, COLS):
        ptrs, mask = _row_block_ptrs(base, t * ROWS, c0, M, N, s_m, s_n, ROWS, COLS)
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x))
    tl.store(PART_MAX + b * n_parts + t, tl.max(tl.max(acc, axis=1), axis=0))


@triton.jit
def _matrix_amax(PART_MAX, b, n_parts, PARTS: tl.constexpr):
    """max |x| of matrix b from its row-block maxima; a zero matrix gets 1 (it then stays zero)."""
    offs = tl.arange(0, PARTS)
    amax = tl.max(tl.load(PART_MAX + b * n_parts + offs, mask=offs < n_parts, other=0.0), axis=0)
    return tl.where(amax > 0.0, amax, 1.0)


@triton.jit
def _sumsq_partial(X, PART_MAX, PART_SS, M, N, s_b, s_m, s_n, n_parts,
                   ROWS: tl.constexpr, COLS: tl.constexpr, PARTS: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    amax = _matrix_amax(PART_MAX, b, n_parts, PARTS)
    base = X + b * s_b
    acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    for c0 in range(0, N, COLS):
        ptrs, mask = _row_block_ptrs(base, t * ROWS, c0, M, N, s_m, s_n, ROWS, COLS)
        # IEEE division (not the approximate one) so subnormal maxima divide exactly as in torch
        x = tl.math.div_rn(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), amax)
        acc += x * x
    tl.store(PART_SS + b * n_parts + t, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _scale_cast(X, OUT, PART_MAX, PART_SS, M, N, s_b, s_m, s_n, o_b, o_m, o_n, n_parts, fro_scale, eps,
                ROWS: tl.constexpr, COLS: tl.constexpr, PARTS: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    amax = _matrix_amax(PART_MAX, b, n_parts, PARTS)
    offs = tl.arange(0, PARTS)
    sumsq = tl.sum(tl.load(PART_SS + b * n_parts + offs, mask=offs < n_parts, other=0.0), axis=0)
    # the smallest normal fp32 guards eps = 0 on a zero matrix (0 / tiny = 0, never 0 / 0)
    denom = tl.maximum(tl.sqrt_rn(sumsq) * fro_scale + eps, 1.1754943508222875e-38)
    for c0 in range(0, N, COLS):
        ptrs, mask = _row_block_ptrs(X + b * s_b, t * ROWS, c0, M, N, s_m, s_n, ROWS, COLS)
        x = tl.math.div_rn(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), amax)
        optrs, _ = _row_block_ptrs(OUT + b * o_b, t * ROWS, c0, M, N, o_m, o_n, ROWS, COLS)
        tl.store(optrs, tl.math.div_rn(x, denom).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _prescale_cast(X, OUT, PART_MAX, M, N, s_b, s_m, s_n, o_b, o_m, o_n, n_parts,
                   ROWS: tl.constexpr, COLS: tl.constexpr, PARTS: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    amax = _matrix_amax(PART_MAX, b, n_parts, PARTS)
    for c0 in range(0, N, COLS):
        ptrs, mask = _row_block_ptrs(X + b * s_b, t * ROWS, c0, M, N, s_m, s_n, ROWS, COLS)
        x = tl.math.div_rn(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), amax)
        optrs, _ = _row_block_ptrs(OUT + b * o_b, t * ROWS, c0, M, N, o_m, o_n, ROWS, COLS)
        tl.store(optrs, x.to(OUT.dtype.element_ty), mask=mask)


def _row_split(m: int) -> tuple[int, int]:
    rows = max(_MIN_ROWS, next_pow2(triton.cdiv(m, MAX_PARTS)))
    return rows, triton.cdiv(m, rows)


def _layout(X: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None):
    """What `normalize` and `prescale` share: checks, the (B, m, n) views of X and out, and the row split
    of the partial reductions: (out, X3, O3, rows, n_parts, parts); X3 is None for an empty X."""
    check_compute_dtype(dtype)
    out = check_out(out, tuple(X.shape), dtype, X.device)
    X3, O3 = as_batched(X, "X"), as_batched(out, "out")
    if X3.numel() == 0:
        return out, None, None, 0, 0, 0
    rows, n_parts = _row_split(X3.shape[1])
    return out, X3, O3, rows, n_parts, next_pow2(n_parts)


def normalize(
    X: torch.Tensor, fro_scale: float, eps: float, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
) -> torch.Tensor:
    """X0 for each matrix of X ((m, n) or (B, m, n), any strides, any float dtype), in `dtype`.

    Returns a new contiguous tensor of X's shape, or writes into `out` (any strides) and returns it.
    fro_scale and eps are runtime arguments: changing them never recompiles.
    """
    out, X3, O3, rows, n_parts, parts = _layout(X, dtype, out)
    if X3 is None:
        return out
    B, m, n = X3.shape
    part_max = torch.empty((B, n_parts), dtype=torch.float32, device=X.device)
    part_ss = torch.empty((B, n_parts), dtype=torch.float32, device=X.device)
    num_warps = 4
    for lo, hi in batch_chunks(B):
        x, o, pm, ps = X3[lo:hi], O3[lo:hi], part_max[lo:hi], part_ss[lo:hi]
        grid = (n_parts, hi - lo)
        xs = (x.stride(0), x.stride(1), x.stride(2))
        _amax_partial[grid](x, pm, m, n, *xs, n_parts, ROWS=rows, COLS=_COLS, num_warps=num_warps)
        _sumsq_partial[grid](x, pm, ps, m, n, *xs, n_parts, ROWS=rows, COLS=_COLS, PARTS=parts,
                             num_warps=num_warps)
        _scale_cast[grid](x, o, pm, ps, m, n, *xs, o.stride(0), o.stride(1), o.stride(2), n_parts,
                          float(fro_scale), float(eps), ROWS=rows, COLS=_COLS, PARTS=parts, num_warps=num_warps)
    return out


def prescale(X: torch.Tensor, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """X / max|X| per matrix (a zero matrix stays zero), in `dtype`: the first half of `normalize`, for
    kernels that take the Frobenius norm from the Gram diagonal instead (kernels/persistent.py).
    Every entry lies in [-1, 1], so the squares summed later can neither under- nor overflow."""
    out, X3, O3, rows, n_parts, parts = _layout(X, dtype, out)
    if X3 is None:
        return out
    B, m, n = X3.shape
    part_max = torch.empty((B, n_parts), dtype=torch.float32, device=X.device)
    for lo, hi in batch_chunks(B):
        x, o, pm = X3[lo:hi], O3[lo:hi], part_max[lo:hi]
        grid = (n_parts, hi - lo)
        xs = (x.stride(0), x.stride(1), x.stride(2))
        _amax_partial[grid](x, pm, m, n, *xs, n_parts, ROWS=rows, COLS=_COLS, num_warps=4)
        _prescale_cast[grid](x, o, pm, m, n, *xs, o.stride(0), o.stride(1), o.stride(2), n_parts,
                             ROWS=rows, COLS=_COLS, PARTS=parts, num_warps=4)
    return out


def ns_prologue(name: str, G: torch.Tensor, coefficients, fro_scale: float, eps: float, dtype: torch.dtype,
                out: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """The checks and trivial cases every tiled NS driver starts with: (out, finished).

    Raises on a bad compute dtype or a tall G (drivers take m <= n); finished is True when nothing is
    left to compute: an empty G (out returned as allocated) or zero steps (out = the normalized G).
    """
    check_compute_dtype(dtype)
    m, n = G.shape[-2], G.shape[-1]
    if m > n:
        raise ValueError(f"{name} expects m <= n (transpose tall inputs first), got {m}×{n}")
    out = check_out(out, tuple(G.shape), dtype, G.device)
    if G.numel() == 0:
        return out, True
    if len(coefficients) == 0:
        return normalize(G, fro_scale, eps, dtype, out=out), True
    return out, False
