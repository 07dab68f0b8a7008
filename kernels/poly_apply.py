"""The last stage of a Newton–Schulz step: X' = a·X + B·X, with the a·X term in the GEMM epilogue.

B is the m×m polynomial of the Gram matrix and X the m×n iterate (m <= n). Each program owns one
BLOCK_M×BLOCK_N tile of X'; the X tile of its a·X term is read once in the epilogue, in fp32, before the
single rounding to the output dtype (as torch's baddbmm does). Tiles are visited in GROUP_M-row groups
so the programs running together share B's row panels and X's column panels in L2. The tile code is
kernels/tiles.py's, shared with the v2 kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, as_batched, batch_chunks, check_compute_dtype, check_out, dot_precision, next_pow2
from .tiles import add_tile, apply_tile, grouped_tile, store_tile


def _configs() -> list[triton.Config]:
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1)]
    # Hopper: 128×256 and 128×128 tiles with 64-deep K slices (the shapes Triton's own Hopper
    # matmul tutorial settles on), and 64-row tiles for small m.
    cfg = lambda bm, bn, bk, w, s: triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s
    )
    return [
        cfg(128, 256, 64, 8, 3),
        cfg(128, 128, 64, 8, 4),
        cfg(128, 128, 128, 8, 3),
        cfg(64, 128, 64, 4, 4),
        cfg(64, 256, 64, 4, 3),
    ]


def _prune(configs, named_args, **kwargs):
    """Drop tiles taller than the matrix and, for fp32, the configs whose stages would overflow
    the shared memory; keep at least one."""
    M = named_args["M"]
    fp32 = named_args["X"].dtype == torch.float32
    kept = []
    for c in configs:
        kw = c.kwargs
        smem = (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * c.num_stages * (4 if fp32 else 2)
        if kw["BLOCK_M"] <= max(64, next_pow2(M)) and smem <= 200 * 1024:
            kept.append(c)
    return kept or configs[-1:]


@triton.autotune(
    configs=_configs(),
    key=["M", "N", "s_xm", "s_xn"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _poly_apply_kernel(
    Bm, X, OUT, M, N,
    s_bb, s_bm, s_bk, s_xb, s_xm, s_xn, s_ob, s_om, s_on,
    a,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    tm, tn = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    om = (tm * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    on = (tn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = om[:, None] < M
    mask_n = on[None, :] < N
    acc = apply_tile(Bm + b * s_bb, X + b * s_xb, om, on, mask_m, mask_n, M, s_bm, s_bk, s_xm, s_xn,
                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, None)
    valid = mask_m & mask_n
    store_tile(OUT + b * s_ob, add_tile(acc, a, X + b * s_xb, om, on, valid, s_xm, s_xn), om, on, valid, s_om, s_on)


def poly_apply(Bm: torch.Tensor, X: torch.Tensor, a: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """X' = a·X + Bm·X for Bm (m, m) / (B, m, m) and X (m, n) / (B, m, n), any strides, one dtype.

    `out` must not alias X (other programs still read X's tiles); the result is in X's dtype.
    """
    check_compute_dtype(X.dtype)
    if Bm.dtype != X.dtype:
        raise ValueError(f"Bm and X must share a dtype, got {Bm.dtype} and {X.dtype}")
    if Bm.shape[:-2] != X.shape[:-2] or Bm.shape[-1] != Bm.shape[-2] or Bm.shape[-1] != X.shape[-2]:
        raise ValueError(f"Bm must be (..., m, m) for X (..., m, n); got Bm {tuple(Bm.shape)}, X {tuple(X.shape)}")
    out = check_out(out, tuple(X.shape), X.dtype, X.device)
    if X.numel() == 0:
        return out
    B3, X3, O3 = as_batched(Bm, "Bm"), as_batched(X, "X"), as_batched(out, "out")
    _, M, N = X3.shape
    for lo, hi in batch_chunks(X3.shape[0]):
        bm, x, o = B3[lo:hi], X3[lo:hi], O3[lo:hi]
        grid = lambda meta, nb=hi - lo: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), nb)
        _poly_apply_kernel[grid](
            bm, x, o, M, N,
            bm.stride(0), bm.stride(1), bm.stride(2), x.stride(0), x.stride(1), x.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            float(a),
            PRECISION=dot_precision(X.dtype),
        )
    return out
