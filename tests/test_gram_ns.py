"""Gram Newton–Schulz (algorithm="gram"): the torch reference and the Triton kernels against float64
standard NS, the restart's effect in fp16, the "auto" choice, and bad arguments.

Tolerance (the project rule, nsref.assert_ns_close): error against float64 standard NS at most
GRAM_FACTOR × torch's own error of standard NS at the same precision on the same input. Measured over
8 seeds × 8 shapes (1:2 to 1:16, odd, batched, tall) × keller/polar_express/you: Gram NS with its
restart reached 2.09× torch's error in bf16 and 2.06× in fp16 (standard NS: up to 1.5×); on
ill-conditioned inputs (singular values 1 … 1e-6) at most 1.08×. Gram NS forms the output as Q·X with
‖Q‖ ≫ 1 on the small singular directions, so its rounding is relative to a larger matrix. fp32 is
looser still (up to 14× with polar_express, 29× with cans, 2.4× with keller: the first steps' large a
make ‖Q‖ ≈ 30), which is why "auto" never picks Gram NS in fp32; fp32 appears here only where the
dtype is not the point.
"""

from __future__ import annotations

import pytest
import torch
from nsref import assert_ns_close, ns_float64, rel_err, torch_ns

import muon
from muon.backends import BackendUnavailable
from muon.backends.dispatch import GRAM_MIN_SIDE_CUDA, choose_algorithm
from muon.coefficients import PRESETS

try:
    import triton
except ImportError:  # the torch tests still run; the Triton ones skip
    triton = None

GRAM_FACTOR = {torch.bfloat16: 3.0, torch.float16: 3.0, torch.float32: 4.0}
HALF = [torch.bfloat16, torch.float16]
# 1:2 to 1:16, odd sizes, batches (3-D and 4-D), tall (transposed to wide), a 1-row matrix
SHAPES = [(16, 32), (12, 48), (8, 64), (8, 128), (33, 70), (3, 9, 40), (2, 2, 10, 35), (70, 20), (1, 9)]


def ill_conditioned(b: int, m: int, n: int, smallest: float = 1e-6, seed: int = 0) -> torch.Tensor:
    """b random m×n matrices (m <= n) with singular values log-spaced from 1 down to `smallest`."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(b, m, m, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(b, n, m, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), m, dtype=torch.float64)
    return ((U * s) @ V.mT).float()


def gram(G, **kwargs):
    kwargs.setdefault("backend", "torch")
    kwargs.setdefault("dtype", torch.bfloat16)  # Gram NS is for half precision; "auto" is fp32 on a CPU
    return muon.newton_schulz(G, algorithm="gram", **kwargs)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", SHAPES)
def test_gram_matches_float64_reference(shape, dtype):
    G = torch.randn(shape)
    out = gram(G, dtype=dtype)
    assert out.shape == G.shape and out.dtype == G.dtype and torch.isfinite(out).all()
    assert_ns_close(out, G, dtype, factor=GRAM_FACTOR[dtype])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gram_presets(preset):
    G = torch.randn(2, 24, 80)
    # CANS's first step is bf16-fragile for standard NS too (muon/coefficients.py): fp16 for it.
    dtype = torch.float16 if preset == "cans" else torch.bfloat16
    out = gram(G, steps=None, coefficients=preset, dtype=dtype)
    assert_ns_close(out, G, dtype, coefficients=preset, steps=None, factor=GRAM_FACTOR[dtype])


def test_gram_fp32_keller():
    G = torch.randn(3, 20, 90)
    assert_ns_close(gram(G, dtype=torch.float32), G, torch.float32, factor=GRAM_FACTOR[torch.float32])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("preset", ["keller", "polar_express", "you"])
def test_gram_ill_conditioned(preset, dtype):
    G = ill_conditioned(2, 24, 120, seed=1)
    out = gram(G, steps=None, coefficients=preset, dtype=dtype)
    assert_ns_close(out, G, dtype, coefficients=preset, steps=None, factor=GRAM_FACTOR[dtype])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_restart_is_what_keeps_fp16_gram_accurate(seed):
    """Without a restart, R_t = Q_t·R_0·Q_t built by repeated fp16 products drifts from X_t·X_tᵀ: the
    small eigenvalues of R (σ² down to 1e-12, far below fp16's resolution relative to 1) come out
    wrong, and the polynomial amplifies them. Measured over 8 seeds on this input: without restart
    16–33× torch's own fp16 error (polar_express: 340× or NaN), with the restart at step 2 0.66–0.70×."""
    G = ill_conditioned(4, 32, 128, seed=seed)
    ref = ns_float64(G)
    theirs = rel_err(torch_ns(G, dtype=torch.float16), ref)
    with_restart = rel_err(gram(G, dtype=torch.float16), ref)
    without = rel_err(gram(G, dtype=torch.float16, restarts=()), ref)
    assert with_restart < 1.0 * theirs, (with_restart, theirs)
    assert without > 8.0 * theirs, (without, theirs)
    # the restart position is configurable: restarting before every step is standard NS's accuracy too
    every = rel_err(gram(G, dtype=torch.float16, restarts=(1, 2, 3, 4)), ref)
    assert every < 1.0 * theirs


def test_restarts_past_the_last_step_do_nothing_and_duplicates_collapse():
    G = torch.randn(16, 48)
    base = gram(G, dtype=torch.float32)
    assert torch.equal(gram(G, dtype=torch.float32, restarts=[2, 2, 7]), base)
    two_steps = gram(G, dtype=torch.float32, steps=2, restarts=(2,))
    assert torch.equal(two_steps, gram(G, dtype=torch.float32, steps=2, restarts=()))


def test_gram_equals_standard_in_float64():
    # The algorithm is exact: in float64 Gram NS is standard NS up to rounding, restarts or not.
    G = torch.randn(2, 12, 50, dtype=torch.float64)
    std = muon.newton_schulz(G, dtype=torch.float64)
    for restarts in [(), (2,), (1, 3)]:
        torch.testing.assert_close(gram(G, dtype=torch.float64, restarts=restarts), std, rtol=0, atol=1e-12)


@pytest.mark.parametrize("precondition", ["frobenius", "aol"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("scale", [1e-25, 1e-12, 1e5, 1e25])
def test_gram_scale_invariant(scale, dtype, precondition):
    G = torch.randn(24, 72)
    base = gram(G, dtype=dtype, precondition=precondition)
    scaled = gram(G * scale, dtype=dtype, precondition=precondition)
    assert torch.isfinite(scaled).all()
    assert rel_err(scaled, base) < 0.25 * rel_err(base, ns_float64(G, precondition=precondition))


@pytest.mark.parametrize("precondition", ["frobenius", "aol"])
@pytest.mark.parametrize("dtype", HALF)
def test_gram_non_finite_input_stays_in_its_matrix(dtype, precondition):
    G = torch.randn(3, 12, 40)
    G[1, 2, 3] = float("nan")
    G[2, 0, 0] = float("inf")
    out = gram(G, dtype=dtype, precondition=precondition)
    assert not torch.isfinite(out[1]).any() and not torch.isfinite(out[2]).any()
    assert torch.equal(out[0], gram(G[0], dtype=dtype, precondition=precondition))


# ------------------------------------------------------------------------------------ AOL
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", SHAPES)
def test_gram_aol_matches_float64_reference(shape, dtype):
    G = torch.randn(shape)
    kw = dict(steps=4, coefficients="polar_express", precondition="aol")
    out = gram(G, dtype=dtype, **kw)
    assert out.shape == G.shape and torch.isfinite(out).all()
    assert_ns_close(out, G, dtype, factor=GRAM_FACTOR[dtype], **kw)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gram_aol_presets(preset):
    G = torch.randn(2, 24, 80)
    for dtype in HALF:
        out = gram(G, steps=4, coefficients=preset, dtype=dtype, precondition="aol")
        assert_ns_close(out, G, dtype, coefficients=preset, steps=4, precondition="aol", factor=GRAM_FACTOR[dtype])


@pytest.mark.parametrize("dtype", HALF)
def test_gram_aol_ill_conditioned(dtype):
    G = ill_conditioned(2, 24, 120, seed=2)
    out = gram(G, steps=4, coefficients="you", dtype=dtype, precondition="aol")
    assert_ns_close(out, G, dtype, coefficients="you", steps=4, precondition="aol", factor=GRAM_FACTOR[dtype])


def test_gram_aol_equals_standard_aol_in_float64():
    G = torch.randn(2, 12, 50, dtype=torch.float64)
    kw = dict(steps=4, coefficients="you", precondition="aol", dtype=torch.float64)
    std = muon.newton_schulz(G, **kw)
    for restarts in [(), (2,), (1, 3)]:
        torch.testing.assert_close(gram(G, restarts=restarts, **kw), std, rtol=0, atol=1e-12)


def test_gram_power_of_two_scaling_is_exact_and_zero_maps_to_zero():
    G = torch.randn(3, 16, 40)
    assert torch.equal(gram(G * 2.0**-80), gram(G))
    Z = torch.zeros(2, 16, 40)
    Z[1] = G[0]
    out = gram(Z)
    assert torch.equal(out[0], torch.zeros(16, 40)) and torch.isfinite(out).all()
    assert torch.equal(gram(torch.zeros(5, 3), eps=0.0), torch.zeros(5, 3))


def test_gram_structure():
    G = torch.randn(4, 20, 36)
    batched = gram(G)
    assert all(torch.equal(batched[i], gram(G[i])) for i in range(4))
    T = torch.randn(90, 30)
    assert torch.equal(gram(T), gram(T.T.contiguous()).T)
    assert gram(torch.randn(3, 0, 4)).shape == (3, 0, 4)
    X0 = gram(T.double(), steps=0, dtype=torch.float64)
    assert abs(X0.norm().item() - 1) < 1e-6


def test_orthogonalize_default_is_standard():
    from muon.coefficients import resolve_schedule
    from muon.newton_schulz import orthogonalize

    G = torch.randn(16, 64)
    schedule = resolve_schedule("keller", 5, 1e-7)
    std = orthogonalize(G, schedule, backend="torch")
    assert torch.equal(std, orthogonalize(G, schedule, backend="torch", algorithm="standard"))
    assert not torch.equal(std, orthogonalize(G, schedule, backend="torch", algorithm="gram"))


# ---------------------------------------------------------------------------------- "auto"
def test_choose_algorithm():
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    # CPU: Gram NS where its model FLOPs are lower (5 steps, one restart: n > 1.5·m), half precision only
    assert choose_algorithm(64, 97, "cpu", bf16) == "gram"
    assert choose_algorithm(64, 96, "cpu", bf16) == "standard"
    assert choose_algorithm(256, 64, "cpu", fp16) == "gram"  # tall: the sides are ordered
    assert choose_algorithm(64, 256, "cpu", fp32) == "standard"
    assert choose_algorithm(64, 64, "cpu", bf16) == "standard"
    assert choose_algorithm(64, 256, "cpu", bf16, steps=0) == "standard"
    # more restarts cost more: at 1:2, 5 steps with restarts before steps 1..4 are dearer than standard
    assert choose_algorithm(64, 128, "cpu", bf16, restarts=(1, 2, 3, 4)) == "standard"
    # CUDA: measured thresholds
    side = GRAM_MIN_SIDE_CUDA
    assert choose_algorithm(side, 4 * side, "cuda", bf16) == "gram"
    assert choose_algorithm(side // 2, 4 * side, "cuda", bf16) == "standard"
    assert choose_algorithm(side, 2 * side, "cuda", bf16) == "standard"
    assert choose_algorithm(side, 4 * side, "cuda", fp32) == "standard"


def test_auto_runs_the_chosen_algorithm():
    wide = torch.randn(2, 16, 64)
    assert torch.equal(muon.newton_schulz(wide, algorithm="auto", backend="torch", dtype=torch.bfloat16), gram(wide))
    square = torch.randn(2, 16, 20)
    assert torch.equal(muon.newton_schulz(square, algorithm="auto"), muon.newton_schulz(square))
    assert torch.equal(muon.newton_schulz(wide, algorithm="auto", dtype=torch.float32),
                       muon.newton_schulz(wide, dtype=torch.float32))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"algorithm": "fast"}, ValueError, "algorithm must be one of"),
        ({"algorithm": "gram", "restarts": (0,)}, ValueError, "restarts must be >= 1"),
        ({"algorithm": "gram", "restarts": (-2,)}, ValueError, "restarts must be >= 1"),
        ({"algorithm": "gram", "restarts": (2.0,)}, TypeError, "restarts must hold ints"),
        ({"algorithm": "gram", "restarts": 2}, TypeError, "restarts must be a sequence"),
        ({"algorithm": "gram", "backend": "numpy"}, BackendUnavailable, "unknown backend"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    G = torch.randn(4, 12)
    before = G.clone()
    with pytest.raises(error, match=match):
        muon.newton_schulz(G, **kwargs)
    assert torch.equal(G, before)


def test_backend_without_gram_says_so(monkeypatch):
    from muon import backends
    from muon.backends import cuda_backend

    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda X: None)
    with pytest.raises(BackendUnavailable, match="backend='cuda' has no Gram Newton–Schulz"):
        backends.select_gram("cuda", torch.randn(1, 4, 12))


def test_bench_kernels_times_gram(tmp_path):
    import json

    from bench.cli import main

    assert main(["kernels", "--device", "cpu", "--shapes", "16x64", "--preset", "none", "--peers", "",
                 "--dtype", "bf16", "--rep-ms", "1", "--gemm-size", "32", "--no-plot", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "kernels.json").read_text())
    gram_rows = [r for r in rows if r["provider"] == "muon[gram]"]
    assert len(gram_rows) == 1 and gram_rows[0]["status"] == "ok" and gram_rows[0]["median"] > 0
    assert gram_rows[0]["dtype"] == "bfloat16"
    assert gram_rows[0]["extra"]["rel_err_fp64"] < 0.05  # bf16 Gram NS against float64 standard NS (measured ~0.03)


# --------------------------------------------------------------------- Triton (interpreter on CPU)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_ready() -> bool:
    from muon.backends import unavailable_reason

    if triton is None:
        return False
    return unavailable_reason("triton", torch.randn(1, 2, 2, device=DEVICE)) is None


needs_triton = pytest.mark.skipif(not _triton_ready(), reason="Triton kernels cannot run here (no GPU, no interpreter)")


@needs_triton
def test_sym_matmul_is_exactly_symmetric_and_matches_torch():
    from muon.kernels.sym_matmul import matmul, sym_matmul

    X = torch.randn(2, 37, 21, device=DEVICE)  # 3 row tiles of 16 in the interpreter: 6 triangle tiles
    R = sym_matmul(X, X.mT)
    assert torch.equal(R, R.mT)
    torch.testing.assert_close(R, X @ X.mT, rtol=1e-5, atol=1e-5)
    S = R / 21
    Z = sym_matmul(S, S, S, alpha=2.0, beta=-3.0)
    assert torch.equal(Z, Z.mT)
    torch.testing.assert_close(Z, 2 * S @ S - 3 * S, rtol=1e-5, atol=1e-5)
    Y = matmul(S, X, X, beta=0.5)
    torch.testing.assert_close(Y, S @ X + 0.5 * X, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize(
    "shape, dtype",
    [((20, 45), torch.bfloat16), ((2, 12, 40), torch.float16), ((40, 17), torch.bfloat16)],
)
def test_triton_gram_matches_float64_reference(shape, dtype):
    G = torch.randn(shape, device=DEVICE)
    out = gram(G, dtype=dtype, backend="triton")
    assert out.shape == G.shape and torch.isfinite(out).all()
    assert_ns_close(out.cpu(), G.cpu(), dtype, factor=GRAM_FACTOR[dtype])


@needs_triton
def test_triton_gram_follows_the_torch_reference_in_fp32():
    # Same algorithm, same stages: only the summation order differs (fp32: ~1e-6).
    G = torch.randn(1, 17, 36, device=DEVICE)
    for restarts in [(2,), ()]:
        torch.testing.assert_close(gram(G, dtype=torch.float32, backend="triton", restarts=restarts),
                                   gram(G, dtype=torch.float32, restarts=restarts), rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("shape, dtype", [((2, 12, 40), torch.bfloat16), ((30, 17), torch.float16)])
def test_triton_gram_aol_matches_float64_reference(shape, dtype):
    G = torch.randn(shape, device=DEVICE)
    kw = dict(steps=4, coefficients="you", precondition="aol")
    out = gram(G, dtype=dtype, backend="triton", **kw)
    assert out.shape == G.shape and torch.isfinite(out).all()
    assert_ns_close(out.cpu(), G.cpu(), dtype, factor=GRAM_FACTOR[dtype], **kw)
    torch.testing.assert_close(gram(G, dtype=torch.float32, backend="triton", **kw),
                               gram(G, dtype=torch.float32, **kw), rtol=1e-4, atol=1e-5)


@needs_triton
def test_triton_gram_ill_conditioned_fp16():
    G = ill_conditioned(1, 16, 48, seed=0).to(DEVICE)
    out = gram(G, dtype=torch.float16, backend="triton")
    assert_ns_close(out.cpu(), G.cpu(), torch.float16, factor=GRAM_FACTOR[torch.float16])


_COMPILE = r"""
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from muon.kernels.sym_matmul import _config, _matmul_kernel as fn

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
strides = ["s_ab", "s_am", "s_ak", "s_bb", "s_bk", "s_bn", "s_db", "s_dm", "s_dn", "s_cb", "s_cm", "s_cn"]
for symmetric in (True, False):
    block, block_k, warps, stages = _config(1024, None)
    sig = dict(A="*bf16", B="*bf16", D="*bf16", C="*bf16", M="i32", N="i32", K="i32", alpha="fp32", beta="fp32")
    sig.update({k: "i32" for k in strides})
    # unit inner strides specialize to constants at launch, as Triton does for contiguous operands
    consts = dict(HAS_D=True, SYMMETRIC=symmetric, BLOCK=block, BLOCK_K=block_k, PRECISION="tf32",
                  s_ak=1, s_bn=1, s_dn=1, s_cn=1)
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
             for k, v in sig.items() if k not in consts and (v.startswith("*") or v == "i32")}
    sig = {k: "constexpr" if k in consts else sig[k] for k in fn.arg_names}
    c = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"]); f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    print(symmetric, stack, c.metadata.shared, c.asm["ptx"].count("wgmma.mma_async"))
"""


def test_sym_matmul_compiles_for_sm90_without_spills(tmp_path):
    """The interpreter never runs Triton's compiler: compile the bf16 Hopper config (TTIR -> PTX -> cubin
    with the wheel's ptxas), in a subprocess without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    if triton is None:
        pytest.skip("needs Triton")
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bundled, tool)) for tool in ("ptxas", "cuobjdump")):
        pytest.skip("this Triton wheel carries no ptxas/cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the installed muon, from a directory outside the checkout (tests/test_no_shadow.py)
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", _COMPILE], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    assert [r[0] for r in rows] == ["True", "False"], run.stdout
    for _, stack, smem, wgmma in rows:
        assert int(stack) == 0 and int(smem) <= 227 * 1024 and int(wgmma) > 0, run.stdout
