"""Symmetric rank-k products: the two m×m stages of a Newton–Schulz step, one triangle of tiles each.

    gram(X)            A = X·Xᵀ                 (X: m×n)
    sym_poly(A, b, c)  B = b·A + c·A·A          (A symmetric m×m; A·A = A·Aᵀ, the same kernel)

Both outputs are symmetric, so only the tiles on and below the diagonal are computed (T(T+1)/2 of the
T² tiles: half the FLOPs of a plain GEMM) and each is stored twice, once mirrored. Inside a diagonal
tile the lower half is stored from the tile and the strict upper half from its transpose, so every
element is written exactly once and the result is exactly symmetric (no two programs race on one
address). The b·A term of the polynomial is the epilogue (the A tile is read once, in fp32).

Accumulation is fp32 (tl.dot); the result is rounded once to the output dtype, as torch's bmm/baddbmm do.
The tile code (mainloop, epilogue, mirrored store) is kernels/tiles.py's, shared with the v2 kernels.
Batched over the leading dim with every stride an argument; per-step values (alpha, beta) are runtime.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, as_batched, batch_chunks, check_compute_dtype, check_out, dot_precision, next_pow2
from .tiles import gram_tile, lower_tile, sym_epilogue


def _configs() -> list[triton.Config]:
    if INTERPRETED:
        # one small config: several tiles (and the triangle mapping) on tiny test shapes
        return [triton.Config({"BLOCK": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    # Hopper (sm_90, 228 KB smem/SM): 128×128 tiles with a 64-deep K slice and 3–4 stages keep two
    # warpgroups busy on wgmma; 64×64 covers small m where 128-tiles would leave SMs idle.
    return [
        triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    ]


def _prune(configs, named_args, **kwargs):
    """Drop tiles larger than the matrix (all-padding work) and, for fp32, the 128-deep K slices that
    would not fit the shared memory at 4 bytes an element; always keep at least one config."""
    M = named_args["M"]
    fp32 = named_args["X"].dtype == torch.float32
    kept = [
        c for c in configs
        if c.kwargs["BLOCK"] <= max(64, next_pow2(M)) and not (fp32 and c.kwargs["BLOCK_K"] > 64)
    ]
    return kept or configs[-1:]


@triton.autotune(
    configs=_configs(),
    key=["M", "K", "s_xm", "s_xk", "HAS_C"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _syrk_kernel(
    X, C, OUT, M, K,
    s_xb, s_xm, s_xk, s_cb, s_cm, s_cn, s_ob, s_om, s_on,
    alpha, beta,
    HAS_C: tl.constexpr, PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT = alpha·X·Xᵀ (+ beta·C), lower-triangle tiles only, each stored to both triangles."""
    b = tl.program_id(1).to(tl.int64)
    ti, tj = lower_tile(tl.program_id(0))
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    mask_i = offs_i[:, None] < M
    mask_j = offs_j[None, :] < M
    acc = gram_tile(X + b * s_xb, offs_i, offs_j, mask_i, mask_j, K, s_xm, s_xk, BLOCK, BLOCK_K, PRECISION, None)
    sym_epilogue(acc, alpha, beta, C + b * s_cb, OUT + b * s_ob, offs_i, offs_j, mask_i & mask_j,
                 s_cm, s_cn, s_om, s_on, HAS_C)


def _launch(X3, C3, O3, alpha: float, beta: float, dtype: torch.dtype) -> None:
    B, M, K = X3.shape
    has_c = C3 is not None
    for lo, hi in batch_chunks(B):
        x, o = X3[lo:hi], O3[lo:hi]
        c = C3[lo:hi] if has_c else o  # C unused (HAS_C False): any valid pointer
        grid = lambda meta, nb=hi - lo: (triton.cdiv(M, meta["BLOCK"]) * (triton.cdiv(M, meta["BLOCK"]) + 1) // 2, nb)
        _syrk_kernel[grid](
            x, c, o, M, K,
            x.stride(0), x.stride(1), x.stride(2), c.stride(0), c.stride(1), c.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            float(alpha), float(beta),
            HAS_C=has_c, PRECISION=dot_precision(dtype),
        )


def gram(X: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A = X·Xᵀ for X (m, n) or (B, m, n), any strides; result in X's dtype (fp32 accumulation).

    Computes one triangle of tiles and mirrors it: about half the multiply-adds of the full GEMM.
    """
    check_compute_dtype(X.dtype)
    out = check_out(out, (*X.shape[:-1], X.shape[-2]), X.dtype, X.device)
    if X.shape[-2] == 0:
        return out
    if X.shape[-1] == 0:
        return out.zero_()
    _launch(as_batched(X, "X"), None, as_batched(out, "out"), 1.0, 0.0, X.dtype)
    return out


def sym_poly(A: torch.Tensor, b: float, c: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """B = b·A + c·A·A for symmetric A (m, m) or (B, m, m); only A's symmetry is assumed, not checked.

    One triangle of tiles of A·Aᵀ (= A·A for symmetric A), with b·A added in the epilogue.
    """
    check_compute_dtype(A.dtype)
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be square (symmetric), got shape {tuple(A.shape)}")
    out = check_out(out, tuple(A.shape), A.dtype, A.device)
    if A.shape[-1] == 0:
        return out
    A3 = as_batched(A, "A")
    _launch(A3, A3, as_batched(out, "out"), c, b, A.dtype)
    return out
