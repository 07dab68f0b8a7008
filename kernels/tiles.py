"""The tile code of the GEMM stages, written once: @triton.jit helpers (inlined where they are called)
that the v1 kernels (syrk.py, poly_apply.py), the v2 persistent kernels (persistent.py) and Gram NS's
symmetric products (sym_matmul.py) share.

    lower_tile(pid)                      linear id -> (ti, tj), ti >= tj: the lower triangle of tiles
    grouped_tile(loc, tiles_m, tiles_n)  linear id -> (tm, tn) in GROUP_M-row groups (L2 reuse)
    dot_mainloop(...)                    fp32 acc of a row panel times a column panel, masked loads
    gram_tile(...)                       the X_i·X_jᵀ tile of X·Xᵀ (dot_mainloop on X and X's transpose)
    apply_tile(...)                      the B·X tile of a·X + B·X (B m×m: the inner dim is m)
    scale_add(...)                       alpha·acc (+ beta·C), fp32
    sym_epilogue(...)                    scale_add, one rounding, mirrored store (store_symmetric_tile)
    add_tile(...)                        acc + a·X, X's tile read once in fp32 (a·X + B·X's epilogue)
    store_tile(...)                      one rounding, store

Arithmetic: fp32 accumulation (tl.dot), fp32 epilogues, one rounding to the output dtype, as torch's
bmm/baddbmm. Offsets along a matrix's rows are int64 (a matrix may hold more than 2^31 elements).
STAGES is the software-pipeline depth of the K loop (`tl.range`); None leaves it to the launch's
num_stages (the v1 kernels, which autotune it).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lower_tile(pid):
    """(ti, tj), ti >= tj, of linear id pid = ti·(ti+1)/2 + tj: the fp32 square root is within one of
    the exact root for any realistic tile count, and the two corrections make it exact."""
    ti = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    ti = tl.where((ti + 1) * (ti + 2) // 2 <= pid, ti + 1, ti)
    ti = tl.where(ti * (ti + 1) // 2 > pid, ti - 1, ti)
    return ti, pid - ti * (ti + 1) // 2


@triton.jit
def grouped_tile(loc, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(tm, tn) of linear id loc, GROUP_M tile-rows at a time, column by column inside a group: the
    programs running together share the B row panels and X column panels in L2."""
    per_group = GROUP_M * tiles_n
    first_m = (loc // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (loc % per_group) % group_rows, (loc % per_group) // group_rows


@triton.jit
def dot_mainloop(a_ptrs, b_ptrs, mask_a, mask_b, K, step_a, step_b,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, STAGES: tl.constexpr):
    """Σ_k A[:, k]·B[k, :] over K in BLOCK_K slices, fp32: a_ptrs (BLOCK_M, BLOCK_K) and b_ptrs
    (BLOCK_K, BLOCK_N) point at the first slice, mask_a (BLOCK_M, 1) / mask_b (1, BLOCK_N) mask the
    rows / columns, step_a / step_b are the strides along K."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_a & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & mask_b, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * step_a
        b_ptrs += BLOCK_K * step_b
    return acc


@triton.jit
def gram_tile(x, offs_i, offs_j, mask_i, mask_j, K, s_xm, s_xk,
              BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr):
    """The (offs_i, offs_j) tile of X·Xᵀ for the matrix at x (m×K, strides s_xm, s_xk), fp32."""
    offs_k = tl.arange(0, BLOCK_K)
    xi = x + offs_i.to(tl.int64)[:, None] * s_xm + offs_k[None, :] * s_xk
    xj = x + offs_j.to(tl.int64)[None, :] * s_xm + offs_k[:, None] * s_xk
    return dot_mainloop(xi, xj, mask_i, mask_j, K, s_xk, s_xk, BLOCK, BLOCK, BLOCK_K, PRECISION, STAGES)


@triton.jit
def apply_tile(bm, x, om, on, mask_m, mask_n, M, s_bm, s_bk, s_xm, s_xn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr, STAGES: tl.constexpr):
    """The (om, on) tile of B·X for B at bm (m×m) and X at x (m×n), fp32; om, on int64."""
    ok = tl.arange(0, BLOCK_K)
    bp = bm + om[:, None] * s_bm + ok[None, :] * s_bk
    xp = x + ok.to(tl.int64)[:, None] * s_xm + on[None, :] * s_xn
    return dot_mainloop(bp, xp, mask_m, mask_n, M, s_bk, s_xm, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, STAGES)


@triton.jit
def scale_add(acc, alpha, beta, c_ptrs, valid, HAS_C: tl.constexpr):
    """alpha·acc (+ beta·C, C read once where valid), in fp32."""
    acc = acc * alpha
    if HAS_C:
        acc += beta * tl.load(c_ptrs, mask=valid, other=0.0).to(tl.float32)
    return acc


@triton.jit
def store_symmetric_tile(base, res, offs_i, offs_j, valid, s_m, s_n):
    """Store tile (ti, tj), ti >= tj, of a symmetric result and its mirror (tj, ti).

    offs_i/offs_j: the tile's row/column indices; valid: their in-bounds mask; s_m/s_n: the output's
    strides. Off the diagonal every row index exceeds every column index, so the whole tile is
    "lower"; in a diagonal tile the lower half comes from the tile and the strict upper half from the
    mirror, so every element is written exactly once and the result is exactly symmetric even though
    (i, j) and (j, i) were rounded from different dot products. The mirror is stored from the
    transposed tile so its writes stay row-contiguous.
    """
    oi = offs_i.to(tl.int64)
    oj = offs_j.to(tl.int64)
    lower = offs_i[:, None] >= offs_j[None, :]
    tl.store(base + oi[:, None] * s_m + oj[None, :] * s_n, res, mask=valid & lower)
    upper_t = offs_j[:, None] < offs_i[None, :]
    tl.store(base + oj[:, None] * s_m + oi[None, :] * s_n, tl.trans(res), mask=tl.trans(valid) & upper_t)


@triton.jit
def sym_epilogue(acc, alpha, beta, c, out, offs_i, offs_j, valid, s_cm, s_cn, s_om, s_on, HAS_C: tl.constexpr):
    """OUT tile = alpha·acc (+ beta·C) of a symmetric product, rounded once, stored with its mirror;
    c and out point at the matrix."""
    oi = offs_i.to(tl.int64)
    oj = offs_j.to(tl.int64)
    acc = scale_add(acc, alpha, beta, c + oi[:, None] * s_cm + oj[None, :] * s_cn, valid, HAS_C)
    store_symmetric_tile(out, acc.to(out.dtype.element_ty), offs_i, offs_j, valid, s_om, s_on)


@triton.jit
def add_tile(acc, a, x, om, on, valid, s_xm, s_xn):
    """acc + a·X for the (om, on) tile of the matrix at x, X's tile read once in fp32."""
    x_tile = tl.load(x + om[:, None] * s_xm + on[None, :] * s_xn, mask=valid, other=0.0)
    return acc + a * x_tile.to(tl.float32)


@triton.jit
def store_tile(out, acc, om, on, valid, s_om, s_on):
    """acc rounded once to the output's dtype, stored at the (om, on) tile of the matrix at out."""
    tl.store(out + om[:, None] * s_om + on[None, :] * s_on, acc.to(out.dtype.element_ty), mask=valid)
