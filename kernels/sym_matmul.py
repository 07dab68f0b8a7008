"""Batched products whose result is known to be symmetric, and the general product they end with.

    sym_matmul(A, B, D=None, alpha=1, beta=0)   C = alpha·A·B + beta·D, C symmetric (m×m)
    matmul(A, B, D=None, alpha=1, beta=0)       the same for any C (every tile)

Gram Newton–Schulz's m×m products are all symmetric: X·Xᵀ, and R·R, Q·Z, R·Z, Z·(R·Z), which are
products of polynomials in one symmetric matrix (they commute, so (P·S)ᵀ = S·P = P·S). The caller
promises the symmetry (of A·B and of D); only the tiles on and below the diagonal are computed
(T(T+1)/2 of T² tiles) and each is stored twice, once mirrored. In a diagonal tile the lower half
comes from the tile and the strict upper half from its mirrored store, so every element is written
exactly once and the result is exactly symmetric even though the two halves' dot products round
differently.

Accumulation is fp32 (tl.dot) and the epilogue alpha·acc + beta·D is fp32; the result is rounded
once to C's dtype, as torch's bmm/baddbmm do. The tile code is kernels/tiles.py's (shared with the
standard NS kernels). Every stride is an argument (A = X, B = X.mT needs no
copy); the batch is grid axis 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, batch_chunks, dot_precision
from .tiles import dot_mainloop, lower_tile, scale_add, store_symmetric_tile


@triton.jit
def _matmul_kernel(
    A, B, D, C, M, N, K,
    s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_db, s_dm, s_dn, s_cb, s_cm, s_cn,
    alpha, beta,
    HAS_D: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    if SYMMETRIC:
        pid_m, pid_n = lower_tile(pid)  # the lower triangle of tiles, row by row
    else:
        grid_n = tl.cdiv(N, BLOCK)
        pid_m = pid // grid_n
        pid_n = pid % grid_n
    rm = pid_m * BLOCK + tl.arange(0, BLOCK)
    rn = pid_n * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    a_ptr = A + bid * s_ab + rm[:, None] * s_am + rk[None, :] * s_ak
    b_ptr = B + bid * s_bb + rk[:, None] * s_bk + rn[None, :] * s_bn
    acc = dot_mainloop(a_ptr, b_ptr, rm[:, None] < M, rn[None, :] < N, K, s_ak, s_bk, BLOCK, BLOCK, BLOCK_K,
                       PRECISION, None)
    valid = (rm[:, None] < M) & (rn[None, :] < N)
    acc = scale_add(acc, alpha, beta, D + bid * s_db + rm[:, None] * s_dm + rn[None, :] * s_dn, valid, HAS_D)
    out = acc.to(C.dtype.element_ty)
    c_base = C + bid * s_cb
    if SYMMETRIC:
        store_symmetric_tile(c_base, out, rm, rn, valid, s_cm, s_cn)
    else:
        tl.store(c_base + rm[:, None] * s_cm + rn[None, :] * s_cn, out, mask=valid)


def _config(M: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK, BLOCK_K, num_warps, num_stages). Hopper: 128×128 tiles with 64-deep K slices in 3 stages
    (compiled for sm_90a: 96 KB of shared memory in bf16/fp16, 128 KB in fp32, no register spills;
    tests/test_gram_ns.py checks it); 64×64 tiles for small matrices, so more programs run.
    Speed unmeasured: a first guess to tune on a GPU."""
    if INTERPRETED:
        return 16, 16, 1, 1  # several tiles and the triangle mapping on tiny test shapes
    if M <= 64:
        return 64, 64, 4, 3
    return 128, 64, 8, 3


def _check(A: torch.Tensor, B: torch.Tensor, D: torch.Tensor | None, symmetric: bool) -> tuple[int, int, int, int]:
    if A.ndim != 3 or B.ndim != 3:
        raise ValueError(
            f"A and B must be (batch, rows, cols) stacks, got shapes {tuple(A.shape)} and {tuple(B.shape)}"
        )
    (bs, M, K), (bs2, K2, N) = A.shape, B.shape
    if bs != bs2 or K != K2:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} do not multiply as batched matrices")
    if symmetric and M != N:
        raise ValueError(f"a symmetric product must be square, got {M}×{N}")
    if D is not None and tuple(D.shape) != (bs, M, N):
        raise ValueError(f"D must have shape {(bs, M, N)}, got {tuple(D.shape)}")
    if A.dtype != B.dtype or A.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"A and B must share a dtype among bf16/fp16/fp32, got {A.dtype} and {B.dtype}")
    return bs, M, N, K


def _launch(A, B, D, alpha, beta, symmetric: bool, out_dtype=None) -> torch.Tensor:
    bs, M, N, K = _check(A, B, D, symmetric)
    C = torch.empty((bs, M, N), dtype=out_dtype or A.dtype, device=A.device)
    if C.numel() == 0:
        return C
    if K == 0:
        return C.copy_(beta * D) if D is not None else C.zero_()
    block, block_k, warps, stages = _config(M, A.dtype)
    tiles_m, tiles_n = triton.cdiv(M, block), triton.cdiv(N, block)
    tiles = tiles_m * (tiles_m + 1) // 2 if symmetric else tiles_m * tiles_n
    Dt = D if D is not None else C
    for start, stop in batch_chunks(bs):
        a, b, d, c = A[start:stop], B[start:stop], Dt[start:stop], C[start:stop]
        _matmul_kernel[(tiles, stop - start)](
            a, b, d, c, M, N, K,
            *a.stride(), *b.stride(), *d.stride(), *c.stride(),
            float(alpha), float(beta),
            HAS_D=D is not None, SYMMETRIC=symmetric,
            BLOCK=block, BLOCK_K=block_k, PRECISION=dot_precision(A.dtype), num_warps=warps, num_stages=stages,
        )
    return C


def sym_matmul(A: torch.Tensor, B: torch.Tensor, D: torch.Tensor | None = None,
               alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """C = alpha·A·B + beta·D for (batch, m, k)·(batch, k, m) whose result (and D) is symmetric; one
    triangle of tiles computed, stored mirrored. The symmetry is the caller's promise, not checked."""
    return _launch(A, B, D, alpha, beta, symmetric=True)


def matmul(A: torch.Tensor, B: torch.Tensor, D: torch.Tensor | None = None,
           alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """C = alpha·A·B + beta·D for (batch, m, k)·(batch, k, n), every tile."""
    return _launch(A, B, D, alpha, beta, symmetric=False)
