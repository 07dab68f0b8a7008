"""The Triton kernels (kernels/, muon.kernels) and the triton backend against float64 references.

On a machine without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1), so shapes stay small; with a GPU the same tests run the compiled kernels.
Every output buffer is poisoned with NaN before the run, so a tile a kernel fails to write shows.

Tolerances: a stage's relative Frobenius error against float64 may be at most STAGE_FACTOR × the error
of torch's own op at the same precision on the same inputs (+ a floor of a fraction of the dtype's
epsilon for cases torch happens to get exact); whole NS uses tests/nsref.py `assert_ns_close` (factor 2).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from nsref import NS_ERROR_FACTOR, NS_ERROR_FLOOR, assert_ns_close, ns_float64, rel_err, torch_ns  # noqa: E402

import muon  # noqa: E402
from muon import kernels  # noqa: E402
from muon.backends import BackendUnavailable, triton_backend  # noqa: E402
from muon.backends.torch_backend import normalize as torch_normalize  # noqa: E402
from muon.coefficients import resolve_schedule  # noqa: E402

pytestmark = pytest.mark.interpret

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PRESETS = ("keller", "you", "polar_express", "cans")
# Measured here: the stages sit at 0.5–1.1× torch's own error (fp32 accumulation, one rounding);
# 2× fails on a wrong coefficient, a missing epilogue term or an unwritten tile.
STAGE_FACTOR = 2.0


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def stage_bound(theirs: float, dtype: torch.dtype) -> float:
    return STAGE_FACTOR * theirs + torch.finfo(dtype).eps / 16


def assert_stage_close(ours: torch.Tensor, ref64: torch.Tensor, torch_result: torch.Tensor, dtype, what: str):
    assert torch.isfinite(ours).all(), f"{what}: non-finite output (unwritten tile?)"
    err, theirs = rel_err(ours, ref64), rel_err(torch_result, ref64)
    assert err <= stage_bound(theirs, dtype), f"{what} {dtype}: error {err:.3e} vs torch {theirs:.3e}"


def unit_rows(shape, dtype, device) -> torch.Tensor:
    """Random rows scaled like a normalized NS iterate (‖X‖_F ≈ 1), so fp16 products stay in range."""
    X = torch.randn(shape, dtype=torch.float64, device=device)
    return (X / X.norm(dim=(-2, -1), keepdim=True)).to(dtype)


# ---------------------------------------------------------------------------------------------- stages

GRAM_SHAPES = [(1, 1), (7, 13), (3, 33, 70), (2, 45, 45)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GRAM_SHAPES)
def test_gram_matches_float64_and_is_exactly_symmetric(shape, dtype, device):
    X = unit_rows(shape, dtype, device) * 4
    out = poisoned((*shape[:-1], shape[-2]), dtype, device)
    A = kernels.gram(X, out=out)
    assert A is out
    ref = X.double() @ X.double().mT
    assert_stage_close(A, ref, X @ X.mT, dtype, "gram")
    assert torch.equal(A, A.mT), "the mirrored triangle must equal the computed one"


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_gram_takes_any_strides(layout, device):
    dtype = torch.bfloat16
    if layout == "transposed":
        X = unit_rows((2, 50, 37), dtype, device).mT  # (2, 37, 50), row stride 1
    else:
        X = unit_rows((2, 37, 100), dtype, device)[:, :, ::2]  # column stride 2
    A = kernels.gram(X, out=poisoned((2, 37, 37), dtype, device))
    assert_stage_close(A, X.double() @ X.double().mT, X @ X.mT, dtype, f"gram {layout}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 9, 40])
def test_sym_poly_matches_float64(m, dtype, device):
    a, b, c = resolve_schedule("polar_express", 5, 1e-7).coefficients[0]  # the largest b and c
    X = unit_rows((3, m, m + 5), dtype, device)
    A = X @ X.mT
    A = (A + A.mT) / 2  # exactly symmetric, as the Gram kernel produces
    P = kernels.sym_poly(A, b, c, out=poisoned(A.shape, dtype, device))
    ref = b * A.double() + c * A.double() @ A.double()
    assert_stage_close(P, ref, torch.baddbmm(A, A, A, beta=b, alpha=c), dtype, "sym_poly")
    assert torch.equal(P, P.mT)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (9, 31), (2, 40, 70)])
def test_poly_apply_matches_float64(shape, dtype, device):
    a = 3.4445
    X = unit_rows(shape, dtype, device)
    P = unit_rows((*shape[:-1], shape[-2]), dtype, device)
    out = kernels.poly_apply(P, X, a, out=poisoned(shape, dtype, device))
    ref = a * X.double() + P.double() @ X.double()
    theirs = torch.baddbmm(X.reshape(-1, *shape[-2:]), P.reshape(-1, *P.shape[-2:]), X.reshape(-1, *shape[-2:]), beta=a)
    assert_stage_close(out, ref, theirs.reshape(shape), dtype, "poly_apply")


def test_poly_apply_transposed_operands(device):
    dtype = torch.bfloat16
    X = unit_rows((2, 60, 35), dtype, device).mT  # (2, 35, 60)
    P = unit_rows((2, 35, 35), dtype, device).mT
    out = kernels.poly_apply(P, X, -1.5, out=poisoned((2, 35, 60), dtype, device))
    ref = -1.5 * X.double() + P.double() @ X.double()
    assert_stage_close(out, ref, torch.baddbmm(X, P, X, beta=-1.5), dtype, "poly_apply transposed")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 70), (3, 37, 41)])
def test_normalize_matches_reference(shape, dtype, device):
    schedule = resolve_schedule("polar_express", 5, 1e-7)  # fro_scale 1.02, eps 1e-6
    G = torch.randn(shape, device=device) * 3
    out = kernels.normalize(G, schedule.fro_scale, schedule.eps, dtype, out=poisoned(shape, dtype, device))
    ref = torch_normalize(G.double(), schedule)
    # same fp32 arithmetic, another summation order: at most one rounding of `dtype` apart
    assert_stage_close(out, ref, torch_normalize(G, schedule).to(dtype), dtype, "normalize")
    # scale-safe: the sum of squares of a 1e±25-scaled input neither overflows nor underflows
    for s in (1e-25, 1e25):
        scaled = kernels.normalize(G * s, schedule.fro_scale, schedule.eps, dtype)
        assert rel_err(scaled, ref) <= 2 * torch.finfo(dtype).eps


def test_normalize_wide_row_blocks_and_zero_matrix(monkeypatch, device):
    """Few partials per matrix force several rows per program (what m > 1024·rows does on real sizes)."""
    monkeypatch.setattr(importlib.import_module("muon.kernels.normalize"), "MAX_PARTS", 4)
    schedule = resolve_schedule("keller", 5, 1e-7)
    G = torch.randn(3, 37, 5, device=device)
    G[1] = 0
    out = poisoned(G.shape, torch.float32, device)
    kernels.normalize(G, schedule.fro_scale, schedule.eps, torch.float32, out=out)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = torch_normalize(G.double(), schedule)
    assert rel_err(out, ref) <= 4 * torch.finfo(torch.float32).eps


def test_launches_split_long_batches(monkeypatch, device):
    """Stacks longer than the grid's batch axis (65535) are launched in chunks: shrink the limit."""
    monkeypatch.setattr(kernels._common, "MAX_GRID_Y", 2)
    dtype = torch.float32
    X = unit_rows((5, 9, 20), dtype, device)
    A = kernels.gram(X, out=poisoned((5, 9, 9), dtype, device))
    assert_stage_close(A, X.double() @ X.double().mT, X @ X.mT, dtype, "gram chunked")
    Y = kernels.poly_apply(A, X, 2.0, out=poisoned(X.shape, dtype, device))
    assert_stage_close(Y, 2 * X.double() + A.double() @ X.double(), torch.baddbmm(X, A, X, beta=2.0), dtype, "chunked")
    out = kernels.ns_small(X, ((3.4445, -4.775, 2.0315),) * 2, 1.0, 1e-7, dtype, out=poisoned(X.shape, dtype, device))
    assert_ns_close(out, X, dtype, steps=2)


# ------------------------------------------------------------------------------------ whole Newton–Schulz


def _backend_ns(G, dtype, path, coefficients="keller", steps=5, eps=1e-7, precondition=None):
    """NS of G (any (..., m, n)) by one kernel path, forced; the output is poisoned through `out` first.
    Tall matrices are transposed as the dispatcher does (the kernels take m <= n)."""
    schedule = resolve_schedule(coefficients, steps, eps, precondition=precondition)
    m, n = G.shape[-2:]
    X = G.reshape(-1, m, n)
    X = X.mT if m > n else X
    out = poisoned(X.shape, dtype, G.device)
    fn = kernels.ns_small if path == "small" else kernels.ns_gemm
    assert fn(X, schedule.coefficients, schedule.fro_scale, schedule.eps, dtype, out=out,
              precondition=schedule.precondition) is out
    return (out.mT if m > n else out).reshape(G.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coefficients", PRESETS)
def test_newton_schulz_presets(coefficients, dtype, device):
    G = torch.randn(2, 20, 36, device=device)
    out = muon.newton_schulz(G, coefficients=coefficients, steps=None, dtype=dtype, backend="triton")
    assert out.shape == G.shape and out.dtype == G.dtype
    assert_ns_close(out, G, dtype, coefficients=coefficients)


@pytest.mark.parametrize("path", ["small", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_paths_forced(path, dtype, device):
    # 3 × 33 × 70: several tiles per matrix in the GEMM path under the interpreter (32-tiles)
    G = torch.randn(3, 33, 70, device=device)
    out = _backend_ns(G, dtype, path, "polar_express", steps=None)
    assert_ns_close(out, G, dtype, coefficients="polar_express", steps=None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("one_chunk", [True, False])
def test_small_path_register_and_memory_variants(one_chunk, dtype, device):
    """The fused kernel with X held in registers, and with X walked in column chunks in memory."""
    G = torch.randn(3, 24, 90, device=device)
    schedule = resolve_schedule("you", None, 1e-7)
    out = poisoned(G.shape, dtype, device)
    kernels.ns_small(G, schedule.coefficients, schedule.fro_scale, schedule.eps, dtype, out=out, one_chunk=one_chunk)
    assert_ns_close(out, G, dtype, coefficients="you", steps=None)


ODD_SHAPES = [(1, 1), (7, 7), (1, 33), (13, 37), (40, 17), (3, 5, 61), (2, 3, 11, 9)]
# (compute dtype, precondition): bf16 as the GPU default, fp16 and AOL (with 4 steps) like it
VARIANTS = [(torch.bfloat16, "frobenius"), (torch.float16, "frobenius"), (torch.bfloat16, "aol")]
VARIANT_IDS = ["bf16", "fp16", "bf16-aol"]


def _variant_kwargs(precondition: str) -> dict:
    return dict(coefficients="you", steps=4, precondition="aol") if precondition == "aol" else {}


@pytest.mark.parametrize("dtype, precondition", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("path", ["small", "gemm"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes(shape, path, dtype, precondition, device):
    G = torch.randn(shape, device=device)
    kw = _variant_kwargs(precondition)
    out = _backend_ns(G, dtype, path, **kw)
    assert_ns_close(out, G, dtype, **kw)


@pytest.mark.parametrize("dtype, precondition", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("shape", [(40, 17), (2, 3, 11, 9)])
def test_tall_and_batched_through_newton_schulz(shape, dtype, precondition, device):
    G = torch.randn(shape, device=device)
    kw = _variant_kwargs(precondition)
    out = muon.newton_schulz(G, dtype=dtype, backend="triton", **kw)
    assert out.shape == G.shape and out.dtype == G.dtype
    assert_ns_close(out, G, dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["small", "gemm"])
def test_aol_both_paths_forced(path, dtype, device):
    G = torch.randn(3, 33, 70, device=device)
    kw = dict(coefficients="polar_express", steps=4, precondition="aol")
    assert_ns_close(_backend_ns(G, dtype, path, **kw), G, dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("one_chunk", [True, False])
def test_aol_small_path_register_and_memory_variants(one_chunk, dtype, device):
    G = torch.randn(3, 24, 90, device=device)
    schedule = resolve_schedule("you", 4, 1e-7, precondition="aol")
    out = poisoned(G.shape, dtype, device)
    kernels.ns_small(G, schedule.coefficients, schedule.fro_scale, schedule.eps, dtype, out=out, one_chunk=one_chunk,
                     precondition="aol")
    assert_ns_close(out, G, dtype, coefficients="you", steps=4, precondition="aol")


@pytest.mark.parametrize("dtype", DTYPES)
def test_aol_rescale_stage_matches_the_torch_reference(dtype, device):
    """kernels/aol.py against muon.backends.torch_backend.aol_rescale: the same fp32 arithmetic, so at most
    one rounding of `dtype` apart; a zero row stays zero; D·A·D stays exactly symmetric."""
    from muon.kernels.aol import aol_rescale_
    from muon.kernels.aol import aol_scales as kernel_scales

    from muon.backends.torch_backend import aol_rescale, aol_scales

    schedule = resolve_schedule("polar_express", 4, 1e-7, precondition="aol")  # fro_scale 1.02
    X = unit_rows((3, 37, 70), torch.float64, device)
    X[1, 5] = 0
    X = X.to(dtype)
    A = X.double() @ X.double().mT
    A = ((A + A.mT) / 2).to(dtype)
    d = kernel_scales(A, schedule.fro_scale, schedule.eps)
    torch.testing.assert_close(d.double(), aol_scales(A.double(), schedule), rtol=1e-6, atol=0)
    X_ref, A_ref = aol_rescale(X.double(), A.double(), schedule)
    X1, A1 = aol_rescale_(X.clone(), A.clone(), schedule.fro_scale, schedule.eps)
    for ours, ref, what in ((X1, X_ref, "D·X"), (A1, A_ref, "D·A·D")):
        assert torch.isfinite(ours).all(), what
        assert rel_err(ours, ref) <= torch.finfo(dtype).eps, what
    assert torch.equal(A1, A1.mT) and torch.equal(X1[1, 5], torch.zeros_like(X1[1, 5]))
    # strided views are scaled in place too
    Xt = X.double().mT.contiguous().to(dtype).mT  # (3, 37, 70) with row stride 1
    aol_rescale_(Xt, A.clone(), schedule.fro_scale, schedule.eps)
    assert rel_err(Xt, X_ref) <= torch.finfo(dtype).eps


@pytest.mark.parametrize("precondition", ["frobenius", "aol"])
@pytest.mark.parametrize("path", ["small", "gemm"])
def test_non_finite_input_stays_in_its_matrix(path, precondition, device):
    G = torch.randn(3, 12, 40, device=device)
    G[1, 3, 4] = float("nan")
    G[2, 0, 1] = float("inf")
    kw = _variant_kwargs(precondition)
    out = _backend_ns(G, torch.float16, path, **kw)
    assert not torch.isfinite(out[1]).any() and not torch.isfinite(out[2]).any()
    assert torch.isfinite(out[0]).all()
    assert_ns_close(out[0], G[0], torch.float16, **kw)


@pytest.mark.parametrize("path", ["small", "gemm"])
def test_views_transposed_and_strided(path, device):
    dtype = torch.bfloat16
    wide = torch.randn(2, 70, 35, device=device).mT  # (2, 35, 70) transposed view
    strided = torch.randn(2, 35, 140, device=device)[:, :, ::2]
    for G in (wide, strided):
        assert not G.is_contiguous()
        assert_ns_close(_backend_ns(G, dtype, path), G, dtype)


@pytest.mark.parametrize("dtype, precondition", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("path", ["small", "gemm"])
def test_scale_invariance_and_zero_matrix(path, dtype, precondition, device):
    kw = _variant_kwargs(precondition)
    G = torch.randn(3, 20, 40, device=device)
    G[1] = 0  # a zero matrix in the stack stays zero and does not disturb its neighbours
    ref = ns_float64(G, **kw)
    theirs = rel_err(torch_ns(G[[0, 2]], dtype=dtype, **kw), ref[[0, 2]])
    bound = NS_ERROR_FACTOR[dtype] * theirs + NS_ERROR_FLOOR[dtype]
    for s in (1e-25, 1e-10, 1.0, 1e10, 1e25):
        out = _backend_ns(G * s, dtype, path, **kw)
        assert torch.equal(out[1], torch.zeros_like(out[1])), f"zero matrix at scale {s}"
        err = rel_err(out[[0, 2]], ref[[0, 2]])
        assert err <= bound, f"scale {s}: error {err:.3e} > bound {bound:.3e}"


def test_zero_steps_is_the_normalization(device):
    G = torch.randn(2, 9, 20, device=device)
    schedule = resolve_schedule("keller", 0, 1e-7)
    ref = torch_normalize(G.double(), schedule)
    for fn in (kernels.ns_small, kernels.ns_gemm):
        for precondition in ("frobenius", "aol"):  # no step, no Gram product to precondition from
            out = fn(G, (), 1.0, 1e-7, torch.float32, out=poisoned(G.shape, torch.float32, device),
                     precondition=precondition)
            assert rel_err(out, ref) <= 4 * torch.finfo(torch.float32).eps


def test_muon_optimizer_with_triton_backend(device):
    torch.manual_seed(1)
    layers = [torch.nn.Linear(20, 36, bias=False, device=device) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    start = layers[0].weight.detach().clone()
    opts = [muon.Muon(layers[0].parameters(), lr=0.02, backend="triton"),
            muon.Muon(layers[1].parameters(), lr=0.02, backend="torch")]
    for _ in range(2):
        x = torch.randn(8, 20, device=device)
        for layer, opt in zip(layers, opts, strict=True):
            opt.zero_grad()
            layer(x).square().sum().backward()
            opt.step()
    # both run bf16 NS: the parameters may differ by rounding only, a few % of the distance moved
    moved = (layers[1].weight.detach() - start).abs().max().item()
    diff = (layers[0].weight.detach() - layers[1].weight.detach()).abs().max().item()
    assert moved > 0 and diff <= 0.05 * moved, (diff, moved)


def test_float64_runs_the_reference(device):
    G = torch.randn(9, 14, device=device, dtype=torch.float64)
    schedule = resolve_schedule("keller", 5, 1e-7)
    out = triton_backend.run(G[None], schedule, torch.float64)
    assert torch.equal(out[0], ns_float64(G))


def test_bad_arguments_are_named(device):
    X = torch.randn(2, 8, 16, device=device)
    with pytest.raises(ValueError, match="path"):
        triton_backend.run(X, resolve_schedule("keller", 5, 1e-7), torch.bfloat16, path="fast")
    with pytest.raises(ValueError, match="out"):
        kernels.gram(X.bfloat16(), out=torch.empty(2, 8, 8, device=device))
    with pytest.raises(ValueError, match="m=200"):
        kernels.ns_small(torch.randn(200, 300, device=device), ((1.0, 0.0, 0.0),), 1.0, 0.0)
    with pytest.raises(ValueError, match="dtype"):
        kernels.normalize(X, 1.0, 0.0, torch.float64)
    for fn in (kernels.ns_small, kernels.ns_gemm, kernels.ns_persistent):
        with pytest.raises(ValueError, match="precondition"):
            fn(X, ((1.0, 0.0, 0.0),), 1.0, 0.0, precondition="spectral")


# ------------------------------------------------------------------------------------------ availability


def test_unavailable_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    X = torch.randn(4, 4)
    reason = triton_backend.unavailable_reason(X)
    assert reason is not None and "TRITON_INTERPRET=1" in reason and "CUDA" in reason
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        muon.newton_schulz(X, backend="triton")


def test_unavailable_without_triton_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    reason = triton_backend.unavailable_reason(torch.randn(4, 4))
    assert reason is not None and "pip install triton" in reason and "fused-muon[triton]" in reason


def test_unavailable_on_other_devices():
    reason = triton_backend.unavailable_reason(torch.empty(4, 4, device="meta"))
    assert reason is not None and "meta" in reason


def test_import_muon_does_not_import_triton(tmp_path):
    code = (
        "import sys, muon, muon.backends.triton_backend, muon.backends as b, torch\n"
        "b.unavailable_reason('triton', torch.zeros(2, 2))\n"
        "assert 'triton' not in sys.modules and 'muon.kernels' not in sys.modules, sorted(sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the installed muon, from a directory outside the checkout (tests/test_no_shadow.py)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=120)


def test_path_choice_by_shape_and_dtype():
    choose = triton_backend.use_small_path
    assert choose(1, 128, 768, torch.bfloat16) and choose(48, 64, 64, torch.float16)
    assert not choose(1, 129, 768, torch.bfloat16)  # beyond the on-chip m×m products
    assert choose(8, 64, 256, torch.float32) and not choose(8, 100, 256, torch.float32)  # fp32 spills past 64
    assert not choose(1, 64, 50304, torch.bfloat16)  # one long matrix: the tiled kernels' parallelism wins
    assert choose(256, 64, 50304, torch.bfloat16)  # ... unless the batch fills the GPU
