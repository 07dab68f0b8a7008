"""The whole Newton–Schulz of a small matrix in one program; the whole batch in one launch.

For m <= 128 (the small side) the m×m Gram matrix A and polynomial B fit on-chip (an fp32 128×128
accumulator is 64 KB of registers across 8 warps), so one program runs normalization and every step:

    X0 = scale-safe normalize(G)                     (as muon/backends/torch_backend.py)
    per step (a, b, c):  A = X·Xᵀ;  B = b·A + c·A·A;  X = a·X + B·X

with the same roundings as the three-GEMM loop (A, B and X rounded to the compute dtype after each
fp32-accumulated product). Two variants, chosen by the launcher (constexpr ONE_CHUNK):

- the padded m×n matrix fits in registers (m_pad·n_pad <= 16K elements): X is loaded once, all steps
  run in registers and X is stored once;
- otherwise X lives in the output buffer (L2-resident for these sizes) and each step walks it in
  column chunks: the Gram pass accumulates A over chunks, then the update pass rewrites each chunk in
  place — column chunks of a·X + B·X depend only on the same chunk of X, so in-place is exact; a CTA
  barrier separates the passes.

precondition="aol" (constexpr AOL): the first step's Gram tile also gives the AOL row scales d, and
x <- D·x, A <- D·A·D (fp32, one rounding each) before that step's polynomial, in registers or, in the
chunked variant, on the update pass's loads (kernels/aol.py has the formula).

Coefficients come from a (steps, 3) fp32 tensor on the device: runtime values, never constexpr, so
a new schedule never recompiles and no host sync happens between steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends.registry import REGISTRY
from ._common import INTERPRETED, as_batched, batch_chunks, check_compute_dtype, check_out, dot_precision, next_pow2
from .aol import check_precondition

MAX_SMALL_SIDE = 128
# fp32 has no tensor-core path (input_precision="ieee" runs on FMA units) and its 128×128 products spill
# registers (compiled for sm_90a: 20 KB of stack at m_pad = 128); up to 64 it compiles spill-free.
MAX_SMALL_SIDE_FP32 = 64
# registers budget for the in-register variant: m_pad·n_pad elements of X. Compiled for sm_90a, 8K
# elements fit every shape spill-free (32×512 at 16K spills); under the interpreter a smaller budget so
# that tiny test shapes take both variants
_REG_ELEMS = 2048 if INTERPRETED else 8192
_REG_ELEMS_FP32 = 2048 if INTERPRETED else 4096
# column chunk of the in-memory variant (interpreter: small, so tiny test shapes take several chunks)
_CHUNK_ELEMS = 512 if INTERPRETED else 8192


@triton.jit
def _load_tile(base, M, N, s_m, s_n, c0, MP: tl.constexpr, BN: tl.constexpr):
    rows = tl.arange(0, MP).to(tl.int64)
    cols = (c0 + tl.arange(0, BN)).to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    return base + rows[:, None] * s_m + cols[None, :] * s_n, mask


@triton.jit
def _ns_step(x, a, b, c, PRECISION: tl.constexpr):
    """One NS step on an on-chip (MP, BN) tile holding the whole (zero-padded) matrix."""
    dt = x.dtype
    A = tl.dot(x, tl.trans(x), input_precision=PRECISION).to(dt)
    # A is symmetric, so A·A = A·Aᵀ
    Bp = (b * A.to(tl.float32) + c * tl.dot(A, A, input_precision=PRECISION)).to(dt)
    return (a * x.to(tl.float32) + tl.dot(Bp, x, input_precision=PRECISION)).to(dt)


@triton.jit
def _aol_scales(A, fro_scale, eps):
    """AOL row scales of an on-chip Gram tile: d_i = 1 / (fro_scale·sqrt(max(Σ_j |A_ij|, eps))), fp32
    (muon/backends/torch_backend.py `aol_scales`); zero-padded rows get a finite scale and stay zero."""
    rows = tl.sum(tl.abs(A.to(tl.float32)), axis=1)
    floor = tl.maximum(eps, 1.1754943508222875e-38)
    return tl.math.div_rn(1.0, fro_scale * tl.sqrt_rn(tl.maximum(rows, floor)))


@triton.jit
def _aol_step(x, a, b, c, fro_scale, eps, PRECISION: tl.constexpr):
    """The first NS step with AOL preconditioning: its Gram tile A rescales x and itself (D·x, D·A·D,
    each rounded once), then the step goes on with them; no product beyond the step's three."""
    dt = x.dtype
    A = tl.dot(x, tl.trans(x), input_precision=PRECISION).to(dt)
    d = _aol_scales(A, fro_scale, eps)
    x = (x.to(tl.float32) * d[:, None]).to(dt)
    A = (A.to(tl.float32) * (d[:, None] * d[None, :])).to(dt)
    Bp = (b * A.to(tl.float32) + c * tl.dot(A, A, input_precision=PRECISION)).to(dt)
    return (a * x.to(tl.float32) + tl.dot(Bp, x, input_precision=PRECISION)).to(dt)


@triton.jit
def _gram_pass(o, M, N, s_om, s_on, MP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    """A = X·Xᵀ (rounded to X's dtype) of the matrix held in memory at o, over its column chunks."""
    acc = tl.zeros((MP, MP), dtype=tl.float32)
    for c0 in range(0, N, BN):
        op, mask = _load_tile(o, M, N, s_om, s_on, c0, MP, BN)
        x = tl.load(op, mask=mask, other=0.0)
        acc = tl.dot(x, tl.trans(x), acc, input_precision=PRECISION)
    return acc.to(o.dtype.element_ty)


@triton.jit
def _update_pass(o, Bp, a, d, M, N, s_om, s_on, SCALE: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr,
                 PRECISION: tl.constexpr):
    """X <- a·X + Bp·X chunk by chunk in place (SCALE: X first replaced by D·X, rounded, as the AOL
    step does); column chunks depend only on the same chunk of X, so in place is exact."""
    dt = o.dtype.element_ty
    for c0 in range(0, N, BN):
        op, mask = _load_tile(o, M, N, s_om, s_on, c0, MP, BN)
        x = tl.load(op, mask=mask, other=0.0)
        if SCALE:
            x = (x.to(tl.float32) * d[:, None]).to(dt)
        y = a * x.to(tl.float32) + tl.dot(Bp, x, input_precision=PRECISION)
        tl.store(op, y.to(dt), mask=mask)


@triton.jit
def _ns_small_kernel(
    G, OUT, COEF, steps, M, N,
    s_gb, s_gm, s_gn, s_ob, s_om, s_on,
    fro_scale, eps,
    MP: tl.constexpr, BN: tl.constexpr, ONE_CHUNK: tl.constexpr, PRECISION: tl.constexpr, AOL: tl.constexpr,
):
    """AOL (constexpr, set only when steps >= 1): the first step is the preconditioned one."""
    pid = tl.program_id(0).to(tl.int64)
    g = G + pid * s_gb
    o = OUT + pid * s_ob
    dt = OUT.dtype.element_ty

    # scale-safe normalization: max |g|, then ‖g / max|g|‖_F (see kernels/normalize.py)
    amax_t = tl.zeros((MP, BN), dtype=tl.float32)
    for c0 in range(0, N, BN):
        p, mask = _load_tile(g, M, N, s_gm, s_gn, c0, MP, BN)
        amax_t = tl.maximum(amax_t, tl.abs(tl.load(p, mask=mask, other=0.0).to(tl.float32)))
    amax = tl.max(tl.max(amax_t, axis=1), axis=0)
    amax = tl.where(amax > 0.0, amax, 1.0)
    ss_t = tl.zeros((MP, BN), dtype=tl.float32)
    for c0 in range(0, N, BN):
        p, mask = _load_tile(g, M, N, s_gm, s_gn, c0, MP, BN)
        x = tl.math.div_rn(tl.load(p, mask=mask, other=0.0).to(tl.float32), amax)
        ss_t += x * x
    sumsq = tl.sum(tl.sum(ss_t, axis=1), axis=0)
    denom = tl.maximum(tl.sqrt_rn(sumsq) * fro_scale + eps, 1.1754943508222875e-38)

    if ONE_CHUNK:
        p, mask = _load_tile(g, M, N, s_gm, s_gn, 0, MP, BN)
        x = tl.math.div_rn(tl.math.div_rn(tl.load(p, mask=mask, other=0.0).to(tl.float32), amax), denom).to(dt)
        first = 0
        if AOL:
            x = _aol_step(x, tl.load(COEF), tl.load(COEF + 1), tl.load(COEF + 2), fro_scale, eps, PRECISION)
            first = 1
        for s in range(first, steps):
            a = tl.load(COEF + 3 * s)
            b = tl.load(COEF + 3 * s + 1)
            c = tl.load(COEF + 3 * s + 2)
            x = _ns_step(x, a, b, c, PRECISION)
        op, omask = _load_tile(o, M, N, s_om, s_on, 0, MP, BN)
        tl.store(op, x, mask=omask)
    else:
        for c0 in range(0, N, BN):
            p, mask = _load_tile(g, M, N, s_gm, s_gn, c0, MP, BN)
            x = tl.math.div_rn(tl.math.div_rn(tl.load(p, mask=mask, other=0.0).to(tl.float32), amax), denom)
            op, _ = _load_tile(o, M, N, s_om, s_on, c0, MP, BN)
            tl.store(op, x.to(dt), mask=mask)
        # stores of one thread are read by others below: a CTA barrier orders global memory in the block
        tl.debug_barrier()
        first = 0
        if AOL:
            A = _gram_pass(o, M, N, s_om, s_on, MP, BN, PRECISION)
            d = _aol_scales(A, fro_scale, eps)
            A = (A.to(tl.float32) * (d[:, None] * d[None, :])).to(dt)
            Bp = (tl.load(COEF + 1) * A.to(tl.float32) + tl.load(COEF + 2) * tl.dot(A, A, input_precision=PRECISION)
                  ).to(dt)
            _update_pass(o, Bp, tl.load(COEF), d, M, N, s_om, s_on, True, MP, BN, PRECISION)
            tl.debug_barrier()
            first = 1
        for s in range(first, steps):
            a = tl.load(COEF + 3 * s)
            b = tl.load(COEF + 3 * s + 1)
            c = tl.load(COEF + 3 * s + 2)
            A = _gram_pass(o, M, N, s_om, s_on, MP, BN, PRECISION)
            Bp = (b * A.to(tl.float32) + c * tl.dot(A, A, input_precision=PRECISION)).to(dt)
            _update_pass(o, Bp, a, Bp, M, N, s_om, s_on, False, MP, BN, PRECISION)
            tl.debug_barrier()


def coefficient_tensor(coefficients, device) -> torch.Tensor:
    """The (steps, 3) fp32 coefficient table on `device`, cached (REGISTRY.coefficients, bounded) so
    repeated calls copy nothing to the device (and a CUDA-graph capture after the first call sees no
    host-to-device copy)."""
    key = (tuple(tuple(float(v) for v in abc) for abc in coefficients), str(torch.device(device)))
    table = REGISTRY.coefficients.get(key)
    if table is None:
        # never empty (a zero-step schedule still passes a valid pointer; the kernel reads no row)
        table = torch.tensor(key[0] or ((0.0, 0.0, 0.0),), dtype=torch.float32, device=device)
        REGISTRY.coefficients.put(key, table)
    return table


def max_small_side(dtype: torch.dtype) -> int:
    """The largest small side the fused path is chosen for (it accepts up to MAX_SMALL_SIDE when forced)."""
    return MAX_SMALL_SIDE_FP32 if dtype == torch.float32 else MAX_SMALL_SIDE


def small_layout(m: int, n: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, bool]:
    """(MP, BN, ONE_CHUNK): padded rows, column chunk, and whether X stays in registers."""
    mp = max(16, next_pow2(m))  # tl.dot needs every dim >= 16
    budget = _REG_ELEMS_FP32 if dtype == torch.float32 else _REG_ELEMS
    if mp * max(16, next_pow2(n)) <= budget:
        return mp, max(16, next_pow2(n)), True
    return mp, max(16, min(next_pow2(n), _CHUNK_ELEMS // mp)), False


def ns_small(
    G: torch.Tensor,
    coefficients,
    fro_scale: float,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    one_chunk: bool | None = None,
    precondition: str = "frobenius",
) -> torch.Tensor:
    """Fused NS of G ((m, n) or (B, m, n), m <= n, m <= 128, any strides/float dtype) in `dtype`.

    coefficients: one (a, b, c) per step; precondition "frobenius" or "aol" (the first step's Gram tile
    rescales X and itself in registers, muon.coefficients). Returns a new contiguous tensor in `dtype`
    or writes `out`. one_chunk forces the in-register (True) or in-memory (False) variant; None picks
    by size.
    """
    check_compute_dtype(dtype)
    check_precondition(precondition)
    m, n = G.shape[-2], G.shape[-1]
    if m > n:
        raise ValueError(f"ns_small expects m <= n (transpose tall inputs first), got {m}×{n}")
    if m > MAX_SMALL_SIDE:
        raise ValueError(f"ns_small handles a small side up to {MAX_SMALL_SIDE}, got m={m}")
    out = check_out(out, tuple(G.shape), dtype, G.device)
    if G.numel() == 0:
        return out
    G3, O3 = as_batched(G, "G"), as_batched(out, "out")
    mp, bn, fits = small_layout(m, n, dtype)
    if one_chunk is True:
        bn = max(16, next_pow2(n))
    elif one_chunk is False:
        bn = max(16, min(next_pow2(n) // 2, bn)) if n > 16 else 16
    use_regs = fits if one_chunk is None else one_chunk
    coef = coefficient_tensor(coefficients, G.device)
    steps = len(coefficients)
    # 8 warps (two warpgroups) for the 128-row tiles, 4 below (fp32's FMA products: 8 from 64 rows);
    # compiled for sm_90a these fit without spills (kernels/NOTES.md); speed unmeasured so far
    num_warps = 8 if mp >= 128 or (dtype == torch.float32 and mp >= 64) else 4
    for lo, hi in batch_chunks(G3.shape[0]):
        g, o = G3[lo:hi], O3[lo:hi]
        _ns_small_kernel[(hi - lo,)](
            g, o, coef, steps, m, n,
            g.stride(0), g.stride(1), g.stride(2), o.stride(0), o.stride(1), o.stride(2),
            float(fro_scale), float(eps),
            MP=mp, BN=bn, ONE_CHUNK=use_regs, PRECISION=dot_precision(dtype),
            AOL=precondition == "aol" and steps > 0,
            num_warps=num_warps, num_stages=2,
        )
    return out
