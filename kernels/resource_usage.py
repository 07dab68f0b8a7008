"""Compile the kernels for Hopper (sm_90a) without a GPU and report registers, spills and shared memory.

    python -m muon.kernels.resource_usage            # bf16 configs
    python -m muon.kernels.resource_usage --fp32     # also the fp32 ones (slow: FMA products compile long)
    python -m muon.kernels.resource_usage --only persistent --dtypes fp16,fp32

Runs Triton's full compiler (TTIR -> PTX -> cubin with the ptxas bundled in the Triton wheel) and reads
the cubin with the bundled cuobjdump, so it works on a machine with no GPU and no CUDA driver. Launch
specializations are mimicked the way Triton applies them at run time: unit inner strides become
constants and pointers/sizes carry the divisibility-by-16 hint (what enables cp.async/TMA pipelining).
Must run without TRITON_INTERPRET (the interpreter never compiles).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

_UNIT_STRIDES = {"s_xk", "s_cn", "s_on", "s_bk", "s_xn", "s_gn", "s_n", "o_n"}
# the persistent kernels' tile counts are 32-bit sizes like any other, never unit



def _mod(name: str):
    return importlib.import_module(f"muon.kernels.{name}")


def compile_one(kernel, signature: dict, constants: dict, num_warps: int, num_stages: int, **options) -> dict:
    """Compile one specialization for sm_90a; returns {'regs', 'stack', 'smem', 'wgmma', 'tma'}
    (wgmma: Hopper tensor-core MMA instructions in the PTX; tma: tensor-memory-accelerator bulk copies).
    options: further compile options of the kernel's launch (enable_fp_fusion=False)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    consts = {**constants, **{k: 1 for k in signature if k in _UNIT_STRIDES}}
    sig = {k: ("constexpr" if k in consts else signature[k]) for k in fn.arg_names}
    attrs = {
        (fn.arg_names.index(k),): [["tt.divisibility", 16]]
        for k, v in signature.items()
        if k not in consts and (v.startswith("*") or v == "i32")
    }
    compiled = triton.compile(
        ASTSource(fn, sig, consts, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages, **options},
    )
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {
        "regs": int(re.search(r"REG:(\d+)", usage).group(1)),
        "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "smem": compiled.metadata.shared,
        "wgmma": compiled.asm["ptx"].count("wgmma.mma_async"),
        "tma": compiled.asm["ptx"].count("cp.async.bulk.tensor"),
    }


def specializations(dtype: str = "bf16"):
    """(name, kernel, signature, constants, num_warps, num_stages) for every Hopper config of `dtype`."""
    p = f"*{dtype}"
    prec = "ieee" if dtype == "fp32" else "tf32"
    syrk, poly, small = _mod("syrk"), _mod("poly_apply"), _mod("ns_small")
    sig = dict(X=p, C=p, OUT=p, M="i32", K="i32", s_xb="i32", s_xm="i32", s_xk="i32", s_cb="i32", s_cm="i32",
               s_cn="i32", s_ob="i32", s_om="i32", s_on="i32", alpha="fp32", beta="fp32")
    for c in syrk._configs():
        if dtype == "fp32" and c.kwargs["BLOCK_K"] > 64:
            continue  # pruned for fp32 (syrk._prune)
        consts = dict(HAS_C=True, PRECISION=prec, **c.kwargs)
        yield f"syrk {c.kwargs}", syrk._syrk_kernel, sig, consts, c.num_warps, c.num_stages
    sig = dict(Bm=p, X=p, OUT=p, M="i32", N="i32", s_bb="i32", s_bm="i32", s_bk="i32", s_xb="i32", s_xm="i32",
               s_xn="i32", s_ob="i32", s_om="i32", s_on="i32", a="fp32")
    for c in poly._configs():
        kw = c.kwargs
        if dtype == "fp32" and (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * c.num_stages * 4 > 200 * 1024:
            continue  # pruned for fp32 (poly_apply._prune)
        yield f"poly_apply {kw}", poly._poly_apply_kernel, sig, dict(PRECISION=prec, **kw), c.num_warps, c.num_stages
    yield from persistent_specializations(dtype)
    sig = dict(G="*fp32", OUT=p, COEF="*fp32", steps="i32", M="i32", N="i32", s_gb="i32", s_gm="i32", s_gn="i32",
               s_ob="i32", s_om="i32", s_on="i32", fro_scale="fp32", eps="fp32")
    side = small.MAX_SMALL_SIDE_FP32 if dtype == "fp32" else small.MAX_SMALL_SIDE
    torch_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    import torch

    for m, n in ((side, 64), (side, 4096), (32, 512), (16, 64)):
        if m > side:
            continue
        mp, bn, regs = small.small_layout(m, n, getattr(torch, torch_dtype))
        warps = 8 if mp >= 128 or (dtype == "fp32" and mp >= 64) else 4
        for aol in (False, True):
            consts = dict(MP=mp, BN=bn, ONE_CHUNK=regs, PRECISION=prec, AOL=aol)
            yield (f"ns_small m={m} n={n} (BN={bn}, in registers={regs}{', aol' if aol else ''})",
                   small._ns_small_kernel, sig, consts, warps, 2)
    yield from aol_specializations(dtype)
    if dtype == "bf16":
        yield from momentum_specializations()


def momentum_specializations():
    """The fused low-precision momentum pass (kernels/lowp_momentum.py): its own dtypes (state int8 or
    bf16, gradient, NS output), contiguous and transposed U, a 256-element block and a short row. The
    7th item: the launch's compile options (no mul+add contraction)."""
    mod = _mod("lowp_momentum")
    strides = [f"s_{t}{d}" for t in "qsgopu" for d in "bmn"]
    for state, grad, u, u_layout, n in (("i8", "fp32", "bf16", "rows", 4096), ("i8", "fp32", "bf16", "cols", 4096),
                                        ("i8", "fp32", "fp32", "rows", 4096), ("i8", "bf16", "bf16", "rows", 4096),
                                        ("bf16", "fp32", "bf16", "rows", 4096), ("bf16", "fp32", "bf16", "cols", 4096),
                                        ("i8", "fp32", "bf16", "rows", 64)):
        sig = dict(Q=f"*{state}", S="*fp32", G=f"*{grad}", W="*fp32", QO=f"*{state}", SO="*fp32", U=f"*{u}",
                   M="i32", N="i32", n_blocks="i32", momentum="fp32", s_w="i32", **dict.fromkeys(strides, "i32"))
        rows, block = mod.tile_shape(n)
        unit = {"s_qn": 1, "s_sn": 1, "s_pn": 1, "s_un" if u_layout == "rows" else "s_um": 1}
        consts = dict(INT8=state == "i8", NESTEROV=True, ROWS=rows, BLOCK=block, **unit)
        yield (f"lowp_momentum state={state} grad={grad} U={u} ({u_layout} contiguous) n={n} ({rows}x{block})",
               mod._lowp_momentum_kernel, sig, consts, mod._WARPS, 1, {"enable_fp_fusion": False})


def aol_specializations(dtype: str = "bf16"):
    """The AOL row-scale and rescale kernels (kernels/aol.py) of the tiled drivers: elementwise, no MMA."""
    aol = _mod("aol")
    p = f"*{dtype}"
    sig = dict(A=p, D="*fp32", DIAG="*fp32", M="i32", s_ab="i32", s_am="i32", s_an="i32", fro_scale="fp32",
               eps="fp32")
    for diag in (False, True):
        consts = dict(HAS_DIAG=diag, ROWS=aol._ROWS, COLS=aol._COLS, CH=1024)
        yield f"aol scales diag={diag}", aol._aol_scales_kernel, sig, consts, 4, 1
    sig = dict(T=p, D="*fp32", M="i32", N="i32", s_tb="i32", s_tm="i32", s_tn="i32")
    for symmetric in (False, True):
        consts = dict(SYMMETRIC=symmetric, ROWS=aol._ROWS, COLS=aol._COLS)
        yield f"aol scale symmetric={symmetric}", aol._scale_kernel, sig, consts, 4, 1


def persistent_specializations(dtype: str = "bf16"):
    """The v2 persistent kernels (kernels/persistent.py) with the block sizes of their plan table, each
    with tensor-descriptor (TMA) and pointer loads."""
    import torch

    pers = _mod("persistent")
    p = f"*{dtype}"
    prec = "ieee" if dtype == "fp32" else "tf32"
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    sig = dict(X=p, C=p, OUT=p, DIAG="*fp32", TILES="*i32", n_tiles="i32", total="i32", num_progs="i32", M="i32",
               K="i32",
               s_xb="i32", s_xm="i32", s_xk="i32", s_cb="i32", s_cm="i32", s_cn="i32", s_ob="i32", s_om="i32",
               s_on="i32", alpha="fp32", beta="fp32", fro_scale="fp32", eps="fp32")
    for m in (4096, 256):
        plan = pers.sym_plan_params(m, tdt)
        for tma in (True, False):
            consts = dict(HAS_C=True, WRITE_DIAG=True, NORM_IN=True, USE_TMA=tma, PRECISION=prec, BLOCK=plan[0],
                          BLOCK_K=plan[1], STAGES=plan[3], WS=False)
            yield (f"persistent sym m={m} BLOCK={plan[0]} BLOCK_K={plan[1]} tma={tma}", pers._sym_persistent, sig,
                   consts, plan[2], plan[3])
    sig = dict(Bm=p, X=p, OUT=p, DIAG="*fp32", tiles_m="i32", tiles_n="i32", total="i32", num_progs="i32",
               M="i32", N="i32",
               s_bb="i32", s_bm="i32", s_bk="i32", s_xb="i32", s_xm="i32", s_xn="i32", s_ob="i32", s_om="i32",
               s_on="i32", a="fp32", fro_scale="fp32", eps="fp32")
    for m in (4096, 256):
        bm, bn, bk, warps, stages = pers.apply_plan_params(m, tdt)
        for tma in (True, False):
            consts = dict(NORM_IN=True, USE_TMA=tma, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                          STAGES=stages, WS=False)
            yield (f"persistent apply m={m} {bm}x{bn}x{bk} tma={tma}", pers._apply_persistent, sig, consts, warps,
                   stages)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", action="store_true", help="also compile the fp32 configs (slow)")
    parser.add_argument("--only", default=None, help="only the kernels whose name contains this (e.g. persistent)")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes (bf16,fp16,fp32); overrides --fp32")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",") if args.dtypes else (["bf16", "fp32"] if args.fp32 else ["bf16"])
    for dtype in dtypes:
        specs = persistent_specializations(dtype) if args.only == "persistent" else specializations(dtype)
        for name, kernel, sig, consts, warps, stages, *options in specs:
            if args.only and args.only not in name:
                continue
            r = compile_one(kernel, sig, consts, warps, stages, **(options[0] if options else {}))
            print(f"{dtype:5s} {name:70s} warps={warps} stages={stages} regs={r['regs']:3d} "
                  f"spill_stack={r['stack']:5d}B smem={r['smem'] // 1024:3d}KB wgmma={r['wgmma']} tma={r['tma']}",
                  flush=True)


if __name__ == "__main__":
    main()
