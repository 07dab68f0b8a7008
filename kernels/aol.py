"""AOL preconditioning of the first Newton–Schulz step, from the Gram matrix that step already formed.

    d = aol_scales(A, fro_scale, eps)        d_i = 1 / (fro_scale·sqrt(max(Σ_j |A_ij|, eps)))
    aol_rescale_(X, A, fro_scale, eps)       X <- D·X, A <- D·A·D in place (D = diag(d))

The arithmetic of muon/backends/torch_backend.py `aol_scales` / `aol_rescale` (Turbo-Muon, arXiv
2512.04632): A = X0·X0ᵀ of the Frobenius start X0, row sums of |A| in fp32, D·A·D as A_ij·(d_i·d_j)
so the result stays exactly symmetric, one rounding to the stored dtype. No matmul: the tiled
drivers (ns_gemm, ns_persistent, gram_ns) call this between the first step's Gram product and the
rest of the step, three elementwise launches over the m×m and m×n stacks (O(m² + m·n) traffic beside
the step's O(m²·n) products). The fused small-matrix kernel does the same in registers (kernels/ns_small.py).

`diag`: the persistent driver's first Gram product is of the max-abs prescaled X (kernels/persistent.py
folds the Frobenius normalization into step 1), so A there is den²·A0 with den = fro_scale·‖X‖_F + eps
read off the fp32 diagonal it wrote; the scales then include the 1/den of the normalization.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, as_batched, batch_chunks, next_pow2

_TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal fp32: guards eps = 0 on a zero row
# rows per program and the column chunk; the interpreter takes small blocks so tiny test shapes walk
# several row blocks and column chunks
_ROWS = 8 if INTERPRETED else 16
_COLS = 32 if INTERPRETED else 256


@triton.jit
def _aol_scales_kernel(A, D, DIAG, M, s_ab, s_am, s_an, fro_scale, eps,
                       HAS_DIAG: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, CH: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = t * ROWS + tl.arange(0, ROWS)
    base = A + b * s_ab + rows.to(tl.int64)[:, None] * s_am
    acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    for c0 in range(0, M, COLS):
        cols = c0 + tl.arange(0, COLS)
        mask = (rows[:, None] < M) & (cols[None, :] < M)
        acc += tl.abs(tl.load(base + cols.to(tl.int64)[None, :] * s_an, mask=mask, other=0.0).to(tl.float32))
    total = tl.sum(acc, axis=1)
    if HAS_DIAG:
        # A is the Gram matrix of the prescaled X: A0 = A / den², and the X scale carries 1/den too
        dacc = tl.zeros((CH,), dtype=tl.float32)
        for r0 in range(0, M, CH):
            r = r0 + tl.arange(0, CH)
            dacc += tl.load(DIAG + b * M + r, mask=r < M, other=0.0)
        den = tl.maximum(tl.sqrt_rn(tl.sum(dacc, axis=0)) * fro_scale + eps, _TINY)
        total = tl.math.div_rn(tl.math.div_rn(total, den), den)
    d = tl.math.div_rn(1.0, fro_scale * tl.sqrt_rn(tl.maximum(total, tl.maximum(eps, _TINY))))
    if HAS_DIAG:
        d = tl.math.div_rn(d, den)
    tl.store(D + b * M + rows, d, mask=rows < M)


@triton.jit
def _scale_kernel(T, D, M, N, s_tb, s_tm, s_tn, SYMMETRIC: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """T <- d_i·T_ij (SYMMETRIC: T_ij·(d_i·d_j)), in place, fp32 then one rounding to T's dtype."""
    t = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = t * ROWS + tl.arange(0, ROWS)
    cols = c * COLS + tl.arange(0, COLS)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    ptrs = T + b * s_tb + rows.to(tl.int64)[:, None] * s_tm + cols.to(tl.int64)[None, :] * s_tn
    d_row = tl.load(D + b * M + rows, mask=rows < M, other=0.0)
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        d_col = tl.load(D + b * M + cols, mask=cols < N, other=0.0)
        y = x * (d_row[:, None] * d_col[None, :])
    else:
        y = x * d_row[:, None]
    tl.store(ptrs, y.to(T.dtype.element_ty), mask=mask)


def aol_scales(A: torch.Tensor, fro_scale: float, eps: float, diag: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 (B, m) AOL scales of a (B, m, m) (or (m, m)) Gram stack, any strides.

    diag: the fp32 (B, m) diagonal of the prescaled Gram product (kernels/persistent.py); the scales
    then also apply the Frobenius normalization the persistent driver folded into step 1.
    """
    A3 = as_batched(A, "A")
    B, M, M2 = A3.shape
    if M != M2:
        raise ValueError(f"A must be a square Gram stack, got shape {tuple(A.shape)}")
    d = torch.empty((B, M), dtype=torch.float32, device=A.device)
    if A3.numel() == 0:
        return d
    dg = diag if diag is not None else d
    for lo, hi in batch_chunks(B):
        a = A3[lo:hi]
        _aol_scales_kernel[(triton.cdiv(M, _ROWS), hi - lo)](
            a, d[lo:hi], dg[lo:hi], M, a.stride(0), a.stride(1), a.stride(2), float(fro_scale), float(eps),
            HAS_DIAG=diag is not None, ROWS=_ROWS, COLS=_COLS, CH=min(1024, next_pow2(M)), num_warps=4,
        )
    return d


def _scale_(T3: torch.Tensor, d: torch.Tensor, symmetric: bool) -> None:
    B, M, N = T3.shape
    for lo, hi in batch_chunks(B):
        t = T3[lo:hi]
        grid = (triton.cdiv(M, _ROWS), triton.cdiv(N, _COLS), hi - lo)
        _scale_kernel[grid](t, d[lo:hi], M, N, t.stride(0), t.stride(1), t.stride(2),
                            SYMMETRIC=symmetric, ROWS=_ROWS, COLS=_COLS, num_warps=4)


def aol_rescale_(X: torch.Tensor, A: torch.Tensor, fro_scale: float, eps: float,
                 diag: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: X <- D·X (B, m, n) and A <- D·A·D (B, m, m), D the AOL scales of A. Returns (X, A).

    X and A may have any strides but must not overlap; the batch stays on grid axis 2 (chunked at
    65,535 like every launcher here)."""
    X3, A3 = as_batched(X, "X"), as_batched(A, "A")
    if X3.shape[0] != A3.shape[0] or X3.shape[1] != A3.shape[1]:
        raise ValueError(f"A {tuple(A.shape)} is not the Gram stack of X {tuple(X.shape)}")
    if X3.numel() == 0:
        return X, A
    d = aol_scales(A3, fro_scale, eps, diag)
    _scale_(X3, d, symmetric=False)
    _scale_(A3, d, symmetric=True)
    return X, A


def check_precondition(precondition: str) -> None:
    if precondition not in ("frobenius", "aol"):
        raise ValueError(f"precondition must be 'frobenius' or 'aol' for the Triton kernels, got {precondition!r}")
