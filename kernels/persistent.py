"""Persistent Hopper kernels for the GEMM stages of Newton–Schulz (kernel version v2, speed unmeasured).

Compared with the v1 stages (kernels/syrk.py, kernels/poly_apply.py: one program per tile, autotuned):

- persistent grid: as many programs as the GPU has SMs; each loops over tiles (`tl.range` with a
  software pipeline depth, warp-specialized where the Triton version offers it), so tile set-up and
  epilogues overlap the next tile's loads and no wave quantization tail is left;
- tensor-descriptor (TMA) loads (`tl.make_tensor_descriptor`, 3-D so out-of-bounds rows of a tile are
  zero-filled per matrix) when the Triton version has them and the operand allows it (unit inner
  stride, 16-byte aligned base and outer strides); otherwise masked pointer loads, any strides;
- symmetric products walk only the lower-triangle tiles, in a grouped order read from a small tile
  table (GROUP tile-rows at a time, column by column: the programs running together share one column
  panel and GROUP row panels in L2);
- the normalization is folded into the first step: the input is only prescaled by its max-abs entry
  (kernels/normalize.py `prescale`, as the scale-safe reference does), the first Gram product also
  writes its fp32 diagonal, whose sum is ‖X / max|X|‖_F² (the trace of X·Xᵀ); the next two stages of
  that step read it and apply 1/d² (polynomial) and 1/d (update) with d = fro_scale·‖·‖_F + eps.
  Normalization is 2 launches reading G twice instead of 3 launches reading it three times.
- a launch plan per (stage, shape, dtype, device, layout) is cached after the first call
  (REGISTRY.launch_plans, bounded): block sizes from a small table (no autotuning), number of
  programs, the tile table on the device.

Arithmetic: fp32 accumulation, one rounding of each stage's result to the compute dtype, as in v1 and
torch's bmm/baddbmm; the folded scaling is applied in fp32 before that rounding. The pointer-load
mainloops, the epilogues, the grouped tile order and the mirrored store are v1's own code
(kernels/tiles.py); what is v2's is the persistent tile loop, the descriptor loads and the folding.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..backends.registry import REGISTRY
from ._common import INTERPRETED, as_batched, check_compute_dtype, dot_precision
from .tiles import add_tile, apply_tile, gram_tile, grouped_tile, store_tile, sym_epilogue

VERSION = "v2"
# Feature detection: GPU machines may carry an older Triton than the one this was written against.
HAS_TMA: bool = hasattr(tl, "make_tensor_descriptor")
HAS_WARP_SPECIALIZE: bool = "warp_specialize" in inspect.signature(tl.range.__init__).parameters
# Warp specialization of the persistent tile loop: off unless MUON_TRITON_WARP_SPECIALIZE=1 (read at
# import). Compiled for sm_90a with Triton 3.9 it yields the same registers, shared memory and
# instruction counts as without (kernels/NOTES.md); bench rows with it say kernel_version triton-v2-ws.
WARP_SPECIALIZE = os.environ.get("MUON_TRITON_WARP_SPECIALIZE", "0") == "1"

_TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal fp32: guards eps = 0 on a zero matrix


@triton.jit
def _inv_denom(DIAG, b, M, fro_scale, eps, CH: tl.constexpr):
    """1 / (fro_scale·sqrt(Σ diag) + eps) of matrix b: the normalization read off the Gram diagonal."""
    acc = tl.zeros((CH,), dtype=tl.float32)
    for r0 in range(0, M, CH):
        r = r0 + tl.arange(0, CH)
        acc += tl.load(DIAG + b * M + r, mask=r < M, other=0.0)
    d = tl.maximum(tl.sqrt_rn(tl.sum(acc, axis=0)) * fro_scale + eps, _TINY)
    return tl.math.div_rn(1.0, d)


@triton.jit
def _sym_persistent(
    X, C, OUT, DIAG, TILES, n_tiles, total, num_progs, M, K,
    s_xb, s_xm, s_xk, s_cb, s_cm, s_cn, s_ob, s_om, s_on,
    alpha, beta, fro_scale, eps,
    HAS_C: tl.constexpr, WRITE_DIAG: tl.constexpr, NORM_IN: tl.constexpr, USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr, WS: tl.constexpr,
):
    """OUT = alpha·X·Xᵀ (+ beta·C) over the lower-triangle tiles listed in TILES, mirrored store.

    WRITE_DIAG: diagonal tiles also store the fp32 diagonal (row sums of squares) to DIAG.
    NORM_IN: X is the prescaled iterate of step 1: alpha and beta are scaled by 1/d⁴ and 1/d² read
    off DIAG (alpha multiplies the product of two d-scaled matrices, beta one).
    """
    pid = tl.program_id(0)
    if USE_TMA:
        desc = tl.make_tensor_descriptor(X, shape=[total // n_tiles, M, K], strides=[s_xb, s_xm, 1],
                                         block_shape=[1, BLOCK, BLOCK_K])
    for t in tl.range(pid, total, num_progs, warp_specialize=WS):
        b = t // n_tiles
        loc = t - b * n_tiles
        ti = tl.load(TILES + 2 * loc)
        tj = tl.load(TILES + 2 * loc + 1)
        b64 = b.to(tl.int64)
        offs_i = ti * BLOCK + tl.arange(0, BLOCK)
        offs_j = tj * BLOCK + tl.arange(0, BLOCK)
        mask_i = offs_i[:, None] < M
        mask_j = offs_j[None, :] < M
        if USE_TMA:
            acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                a = desc.load([b, ti * BLOCK, k0]).reshape(BLOCK, BLOCK_K)
                bt = desc.load([b, tj * BLOCK, k0]).reshape(BLOCK, BLOCK_K)
                acc = tl.dot(a, tl.trans(bt), acc, input_precision=PRECISION)
        else:
            acc = gram_tile(X + b64 * s_xb, offs_i, offs_j, mask_i, mask_j, K, s_xm, s_xk, BLOCK, BLOCK_K,
                            PRECISION, STAGES)

        if WRITE_DIAG:
            if ti == tj:
                on_diag = offs_i[:, None] == offs_j[None, :]
                dg = tl.sum(tl.where(on_diag, acc, 0.0), axis=1)
                tl.store(DIAG + b64 * M + offs_i, dg, mask=offs_i < M)
        al = alpha
        be = beta
        if NORM_IN:
            inv = _inv_denom(DIAG, b64, M, fro_scale, eps, 1024)
            be = beta * inv * inv
            al = alpha * (inv * inv) * (inv * inv)
        sym_epilogue(acc, al, be, C + b64 * s_cb, OUT + b64 * s_ob, offs_i, offs_j, mask_i & mask_j,
                     s_cm, s_cn, s_om, s_on, HAS_C)


@triton.jit
def _apply_persistent(
    Bm, X, OUT, DIAG, tiles_m, tiles_n, total, num_progs, M, N,
    s_bb, s_bm, s_bk, s_xb, s_xm, s_xn, s_ob, s_om, s_on,
    a, fro_scale, eps,
    NORM_IN: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STAGES: tl.constexpr, WS: tl.constexpr,
):
    """OUT = a·X + Bm·X (times 1/d of DIAG when NORM_IN), grouped tile order, persistent."""
    pid = tl.program_id(0)
    per_mat = tiles_m * tiles_n
    if USE_TMA:
        n_mat = total // per_mat
        b_desc = tl.make_tensor_descriptor(Bm, shape=[n_mat, M, M], strides=[s_bb, s_bm, 1],
                                           block_shape=[1, BLOCK_M, BLOCK_K])
        x_desc = tl.make_tensor_descriptor(X, shape=[n_mat, M, N], strides=[s_xb, s_xm, 1],
                                           block_shape=[1, BLOCK_K, BLOCK_N])
    for t in tl.range(pid, total, num_progs, warp_specialize=WS):
        b = t // per_mat
        tm, tn = grouped_tile(t - b * per_mat, tiles_m, tiles_n, GROUP_M)
        b64 = b.to(tl.int64)
        om = (tm * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        on = (tn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_m = om[:, None] < M
        mask_n = on[None, :] < N
        if USE_TMA:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in tl.range(0, M, BLOCK_K, num_stages=STAGES):
                bt = b_desc.load([b, tm * BLOCK_M, k0]).reshape(BLOCK_M, BLOCK_K)
                xt = x_desc.load([b, k0, tn * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
                acc = tl.dot(bt, xt, acc, input_precision=PRECISION)
        else:
            acc = apply_tile(Bm + b64 * s_bb, X + b64 * s_xb, om, on, mask_m, mask_n, M, s_bm, s_bk, s_xm, s_xn,
                             BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, STAGES)
        valid = mask_m & mask_n
        acc = add_tile(acc, a, X + b64 * s_xb, om, on, valid, s_xm, s_xn)
        if NORM_IN:
            acc = acc * _inv_denom(DIAG, b64, M, fro_scale, eps, 1024)
        store_tile(OUT + b64 * s_ob, acc, om, on, valid, s_om, s_on)


# --------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class SymPlan:
    block: int
    block_k: int
    group: int
    num_warps: int
    stages: int
    programs: int
    tiles: torch.Tensor  # (T, 2) int32 lower-triangle (ti, tj) in visiting order, on the device


@dataclass(frozen=True)
class ApplyPlan:
    block_m: int
    block_n: int
    block_k: int
    group: int
    num_warps: int
    stages: int
    programs: int




def triangle_order(T: int, group: int) -> list[tuple[int, int]]:
    """Lower-triangle tiles (ti >= tj) of a T×T tile grid, `group` tile-rows at a time, column-major
    inside a group: consecutive tiles share their column panel, a group shares its row panels."""
    order = []
    for g0 in range(0, T, group):
        rows = range(g0, min(T, g0 + group))
        for tj in range(0, rows[-1] + 1):
            order.extend((ti, tj) for ti in rows if ti >= tj)
    return order


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs, each looping over several tiles


def sym_plan_params(M: int, dtype: torch.dtype, K: int = 0) -> tuple[int, int, int, int]:
    """(BLOCK, BLOCK_K, num_warps, stages) of the symmetric stages. sm_90: 128×128 tiles with 64-deep K
    slices in 4 stages (128 KB of smem) for m > 512, 64×64 tiles below (more tiles for the SMs)."""
    fp32 = dtype == torch.float32
    if INTERPRETED:
        # several tiles and a multi-tile triangle on tiny test shapes; long rows in fewer K steps
        return 32, 32 if K <= 256 else 128, 4, 1
    if fp32:
        # ieee fp32 runs on FMA units (no tensor cores): 64×64 tiles over 8 warps compile spill-free
        # with either load path (128×128 spilled 5.6 KB, 64×64 on 4 warps 416 B with descriptors)
        return 64, 32, 8, 2
    if M > 512:
        return 128, 64, 8, 4
    return 64, 64, 4, 4


def apply_plan_params(M: int, dtype: torch.dtype, N: int = 0) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, stages) of the update stage: 128×256×64 in 3 stages
    (144 KB smem, the tile Triton's Hopper matmul tutorial settles on) for m > 512, 64×128 below."""
    fp32 = dtype == torch.float32
    if INTERPRETED:
        return 32, 32 if N <= 256 else 128, 32, 4, 1
    if fp32:
        return 64, 128, 16, 8, 2  # FMA products: spill-free with both load paths (128×128×32 spilled 5.5 KB)
    if M > 512:
        return 128, 256, 64, 8, 3
    return 64, 128, 64, 4, 4


def sym_plan(B: int, M: int, K: int, dtype: torch.dtype, device: torch.device) -> SymPlan:
    """The cached launch plan: block sizes (sym_plan_params), programs, the tile table on the device."""
    key = ("sym", B, M, K, dtype, str(device))
    plan = REGISTRY.launch_plans.get(key)
    if plan is not None:
        return plan
    block, block_k, warps, stages = sym_plan_params(M, dtype, K)
    T = triton.cdiv(M, block)
    tiles = torch.tensor(triangle_order(T, 8), dtype=torch.int32, device=device).reshape(-1, 2)
    programs = max(1, min(B * tiles.shape[0], num_sms(device)))
    return REGISTRY.launch_plans.put(key, SymPlan(block, block_k, 8, warps, stages, programs, tiles))


def apply_plan(B: int, M: int, N: int, dtype: torch.dtype, device: torch.device) -> ApplyPlan:
    """The cached launch plan: block sizes (apply_plan_params) and the number of programs (the
    program count is a runtime argument: a new shape never recompiles)."""
    key = ("apply", B, M, N, dtype, str(device))
    plan = REGISTRY.launch_plans.get(key)
    if plan is not None:
        return plan
    bm, bn, bk, warps, stages = apply_plan_params(M, dtype, N)
    total = B * triton.cdiv(M, bm) * triton.cdiv(N, bn)
    programs = max(1, min(total, num_sms(device)))
    return REGISTRY.launch_plans.put(key, ApplyPlan(bm, bn, bk, 8, warps, stages, programs))


def tma_ok(T: torch.Tensor) -> bool:
    """Whether a (B, r, c) operand can be read by a tensor descriptor: unit inner stride, 16-byte
    aligned base and outer strides (the batch stride only matters with more than one matrix)."""
    if not HAS_TMA:
        return False
    e = T.element_size()
    return (
        T.stride(2) == 1
        and T.data_ptr() % 16 == 0
        and (T.stride(1) * e) % 16 == 0
        and (T.shape[0] == 1 or (T.stride(0) * e) % 16 == 0)
        and T.shape[2] * e >= 16
    )


def _desc_batch_stride(T: torch.Tensor) -> int:
    # a single matrix: any 16-byte aligned positive stride (no second matrix is addressed)
    return T.stride(0) if T.shape[0] > 1 else T.shape[1] * T.stride(1)


def _ensure_allocator(device: torch.device) -> None:
    """Device-side tensor descriptors need a little global scratch per launch: from torch's
    (stream-ordered, graph-capturable) caching allocator, installed only where none was set (Triton
    keeps the allocator in a context variable: per thread, so this is checked on every launch)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        # "cuda" = the current device at launch time (the interpreter runs on the CPU)
        dev = "cuda" if device.type == "cuda" else "cpu"
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=dev))


def _use_tma(tma: bool | None, *operands) -> bool:
    ok = all(tma_ok(t) for t in operands)
    if tma is None:
        return ok
    if tma and not ok:
        raise ValueError("tma=True needs unit inner strides and 16-byte aligned operands (and a Triton with "
                         "tl.make_tensor_descriptor)")
    return tma


# --------------------------------------------------------------------------------------------- stages


def sym_product(
    X3: torch.Tensor, O3: torch.Tensor, alpha: float, C3: torch.Tensor | None = None, beta: float = 0.0,
    *, diag: torch.Tensor | None = None, norm_diag: torch.Tensor | None = None,
    fro_scale: float = 1.0, eps: float = 0.0, tma: bool | None = None,
) -> torch.Tensor:
    """O3 = alpha·X3·X3ᵀ (+ beta·C3) for (B, m, k) stacks; O3 (B, m, m) exactly symmetric.

    diag: an fp32 (B, m) buffer that receives diag(X3·X3ᵀ) in fp32. norm_diag: such a buffer from the
    previous Gram product; alpha and beta are then scaled by 1/d⁴ and 1/d² (d from its sum).
    tma: force tensor-descriptor loads (True), pointer loads (False), or pick by layout (None).
    """
    B, M, K = X3.shape
    dtype = X3.dtype
    check_compute_dtype(dtype)
    plan = sym_plan(B, M, K, dtype, X3.device)
    use_tma = _use_tma(tma, X3)
    if use_tma:
        _ensure_allocator(X3.device)
    c = C3 if C3 is not None else O3
    dg = diag if diag is not None else (norm_diag if norm_diag is not None else O3)
    n_tiles = plan.tiles.shape[0]
    _sym_persistent[(plan.programs,)](
        X3, c, O3, dg, plan.tiles, n_tiles, B * n_tiles, plan.programs, M, K,
        _desc_batch_stride(X3) if use_tma else X3.stride(0), X3.stride(1), X3.stride(2),
        c.stride(0), c.stride(1), c.stride(2), O3.stride(0), O3.stride(1), O3.stride(2),
        float(alpha), float(beta), float(fro_scale), float(eps),
        HAS_C=C3 is not None, WRITE_DIAG=diag is not None, NORM_IN=norm_diag is not None, USE_TMA=use_tma,
        PRECISION=dot_precision(dtype), BLOCK=plan.block, BLOCK_K=plan.block_k, STAGES=plan.stages,
        WS=WARP_SPECIALIZE and HAS_WARP_SPECIALIZE and not INTERPRETED,
        num_warps=plan.num_warps,
    )
    return O3


def apply_product(
    P3: torch.Tensor, X3: torch.Tensor, O3: torch.Tensor, a: float, *, norm_diag: torch.Tensor | None = None,
    fro_scale: float = 1.0, eps: float = 0.0, tma: bool | None = None,
) -> torch.Tensor:
    """O3 = a·X3 + P3·X3 (× 1/d from norm_diag when given) for P3 (B, m, m), X3 (B, m, n); O3 must not
    alias X3."""
    B, M, N = X3.shape
    dtype = X3.dtype
    check_compute_dtype(dtype)
    plan = apply_plan(B, M, N, dtype, X3.device)
    use_tma = _use_tma(tma, P3, X3)
    if use_tma:
        _ensure_allocator(X3.device)
    tiles_m, tiles_n = triton.cdiv(M, plan.block_m), triton.cdiv(N, plan.block_n)
    dg = norm_diag if norm_diag is not None else O3
    _apply_persistent[(plan.programs,)](
        P3, X3, O3, dg, tiles_m, tiles_n, B * tiles_m * tiles_n, plan.programs, M, N,
        _desc_batch_stride(P3) if use_tma else P3.stride(0), P3.stride(1), P3.stride(2),
        _desc_batch_stride(X3) if use_tma else X3.stride(0), X3.stride(1), X3.stride(2),
        O3.stride(0), O3.stride(1), O3.stride(2),
        float(a), float(fro_scale), float(eps),
        NORM_IN=norm_diag is not None, USE_TMA=use_tma, PRECISION=dot_precision(dtype),
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, GROUP_M=plan.group,
        STAGES=plan.stages, WS=WARP_SPECIALIZE and HAS_WARP_SPECIALIZE and not INTERPRETED,
        num_warps=plan.num_warps,
    )
    return O3


def ns_persistent(
    G: torch.Tensor,
    coefficients,
    fro_scale: float,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    tma: bool | None = None,
    precondition: str = "frobenius",
) -> torch.Tensor:
    """NS of G ((m, n) or (B, m, n), m <= n, any strides/float dtype) in `dtype` by the persistent kernels.

    2 + 3·steps launches: prescale (max-abs, 2 launches), then per step Gram / polynomial / update; the
    Frobenius normalization rides on step 1 (see the module docstring). `out` must not alias G.
    tma forces the tensor-descriptor loads on (True) or off (False); None picks them per operand.
    precondition="aol": after step 1's Gram product, kernels/aol.py turns its row sums and fp32
    diagonal into scales that apply the normalization and AOL at once (X and A rescaled in place,
    3 elementwise launches); the polynomial and update stages of step 1 then run unscaled.
    """
    from .aol import aol_rescale_, check_precondition
    from .normalize import ns_prologue, prescale

    check_precondition(precondition)
    out, finished = ns_prologue("ns_persistent", G, coefficients, fro_scale, eps, dtype, out)
    if finished:
        return out
    m, n = G.shape[-2], G.shape[-1]
    steps = len(coefficients)
    G3, O3 = as_batched(G, "G"), as_batched(out, "out")
    B = G3.shape[0]
    # scratch: contiguous (16-byte aligned rows whenever m, n are multiples of 8: TMA-eligible)
    X = prescale(G3, dtype, out=_scratch((B, m, n), dtype, G.device))
    spare = _scratch((B, m, n), dtype, G.device) if steps > 1 else None
    A = _scratch((B, m, m), dtype, G.device)
    P = _scratch((B, m, m), dtype, G.device)
    diag = torch.empty((B, m), dtype=torch.float32, device=G.device)
    aol = precondition == "aol"
    for i, (a, b, c) in enumerate(coefficients):
        first = i == 0
        sym_product(X, A, 1.0, diag=diag if first else None, tma=tma)
        if first and aol:
            aol_rescale_(X, A, fro_scale, eps, diag=diag)
        folded = first and not aol  # the 1/d of the normalization still to apply in this step's stages
        sym_product(A, P, c, A, b, norm_diag=diag if folded else None, fro_scale=fro_scale, eps=eps, tma=tma)
        target = O3 if i == steps - 1 else spare
        apply_product(P, X, target, a, norm_diag=diag if folded else None, fro_scale=fro_scale, eps=eps, tma=tma)
        X, spare = target, X
    return out


def _scratch(shape, dtype, device) -> torch.Tensor:
    """A contiguous buffer whose row stride is padded to 8 elements (16 bytes in bf16) so that tensor
    descriptors can read it whatever the side lengths; a view of the unpadded shape."""
    *lead, r, c = shape
    c_pad = -(-c // 8) * 8
    return torch.empty((*lead, r, c_pad), dtype=dtype, device=device)[..., :c]


__all__ = ["HAS_TMA", "VERSION", "apply_product", "ns_persistent", "sym_product", "triangle_order"]
