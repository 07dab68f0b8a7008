"""muon.newton_schulz with the torch backend against the float64 reference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from nsref import assert_ns_close, ns_float64, rel_err

import muon
from muon.backends import BackendUnavailable
from muon.coefficients import PRECONDITIONS, PRESETS, Normalization, Preset, resolve_schedule

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
HALF = [torch.bfloat16, torch.float16]
SHAPES = [(1, 7), (7, 1), (33, 65), (65, 33), (31, 31), (3, 17, 40), (2, 3, 8, 12), (1, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, dtype):
    G = torch.randn(shape)
    out = muon.newton_schulz(G, dtype=dtype, backend="torch")
    assert out.shape == G.shape and out.dtype == G.dtype
    assert torch.isfinite(out).all()
    assert_ns_close(out, G, dtype)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_presets_match_reference(preset, dtype):
    G = torch.randn(48, 80)
    out = muon.newton_schulz(G, steps=None, coefficients=preset, dtype=dtype, backend="torch")
    assert_ns_close(out, G, dtype, coefficients=preset, steps=None)


@pytest.mark.parametrize(
    "preset, dtype, low, high",
    [
        ("keller", torch.bfloat16, 0.6, 1.2),  # reference.md: roughly [0.68, 1.15]
        ("polar_express", torch.bfloat16, 0.8, 1.2),  # roughly [0.86, 1.14]
        ("you", torch.bfloat16, 0.9, 1.1),
        ("cans", torch.float32, 0.8, 1.2),  # its first step is bf16-fragile (see muon/coefficients.py)
    ],
)
def test_singular_values_near_one_on_rectangular_inputs(preset, dtype, low, high):
    G = torch.randn(4, 64, 160, dtype=torch.float64)
    s = torch.linalg.svdvals(muon.newton_schulz(G, steps=None, coefficients=preset, dtype=dtype).double())
    assert low < s.min() and s.max() < high, (s.min().item(), s.max().item())


# ------------------------------------------------------------------------- AOL preconditioning
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_aol_matches_float64_reference(shape, dtype):
    G = torch.randn(shape)
    out = muon.newton_schulz(G, steps=4, coefficients="you", dtype=dtype, backend="torch", precondition="aol")
    assert out.shape == G.shape and out.dtype == G.dtype and torch.isfinite(out).all()
    assert_ns_close(out, G, dtype, coefficients="you", steps=4, precondition="aol")


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", [4, 5])
def test_aol_presets_match_reference(preset, dtype, steps):
    G = torch.randn(2, 48, 80)
    out = muon.newton_schulz(G, steps=steps, coefficients=preset, dtype=dtype, backend="torch", precondition="aol")
    assert_ns_close(out, G, dtype, coefficients=preset, steps=steps, precondition="aol")


def test_aol_schedule_takes_the_last_steps_of_a_per_step_preset():
    you = PRESETS["you"].steps
    assert resolve_schedule("you", 4, 1e-7).coefficients == you[:4]
    aol = resolve_schedule("you", 4, 1e-7, precondition="aol")
    assert aol.coefficients == you[1:] and aol.precondition == "aol"
    assert resolve_schedule("you", None, 1e-7, precondition="aol").coefficients == you
    pe3 = resolve_schedule("polar_express", 3, 1e-7, precondition="aol")
    assert pe3.coefficients == PRESETS["polar_express"].steps[2:]
    assert resolve_schedule("keller", 4, 1e-7, precondition="aol").coefficients == (PRESETS["keller"].steps[0],) * 4
    assert resolve_schedule("you", 0, 1e-7, precondition="aol").coefficients == ()
    # the normalization of the preset is kept: fro_scale and its eps
    pe = resolve_schedule("polar_express", 4, 1e-7, precondition="aol")
    assert (pe.fro_scale, pe.eps) == (1.02, 1e-6)
    assert resolve_schedule("keller", 5, 1e-7).precondition == "frobenius"


def test_a_preset_can_carry_the_preconditioning():
    """Normalization(precondition="aol") in a Preset: what Muon(ns_coefficients=...) can pass today."""
    preset = Preset(PRESETS["you"].steps, Normalization(precondition="aol"))
    schedule = resolve_schedule(preset, 4, 1e-7)
    assert schedule.precondition == "aol" and schedule.coefficients == PRESETS["you"].steps[1:]
    G = torch.randn(20, 50)
    assert torch.equal(muon.newton_schulz(G, steps=4, coefficients=preset),
                       muon.newton_schulz(G, steps=4, coefficients="you", precondition="aol"))
    # an explicit precondition overrides the preset's
    assert resolve_schedule(preset, 4, 1e-7, precondition="frobenius").coefficients == PRESETS["you"].steps[:4]
    import io

    buffer = io.BytesIO()
    torch.save({"c": preset}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["c"] == preset


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_aol_four_steps_as_close_to_orthogonal_as_five_without(dtype):
    """Turbo-Muon's claim on a rectangular Gaussian input (measured here: you 5 steps without AOL
    σ in [0.97, 1.03]; with AOL, 4 steps (the last four tuples) the same)."""
    G = torch.randn(4, 64, 160, dtype=torch.float64)
    s5 = torch.linalg.svdvals(muon.newton_schulz(G, steps=5, coefficients="you", dtype=dtype).double())
    s4 = torch.linalg.svdvals(muon.newton_schulz(G, steps=4, coefficients="you", dtype=dtype,
                                                 precondition="aol").double())
    plain4 = torch.linalg.svdvals(muon.newton_schulz(G, steps=4, coefficients="you", dtype=dtype).double())
    assert 0.95 < s4.min() and s4.max() < 1.05, (s4.min().item(), s4.max().item())
    assert (s4 - 1).abs().max() <= (s5 - 1).abs().max() + 0.01
    assert (plain4 - 1).abs().max() > 2 * (s4 - 1).abs().max()  # without AOL, 4 steps are not enough


def test_aol_start_has_spectral_norm_at_most_one():
    """The AOL bound on the preconditioned start itself (float64, a step of the identity polynomial)."""
    from muon.backends.torch_backend import aol_rescale, normalize

    for G in (torch.randn(3, 30, 70, dtype=torch.float64), torch.randn(2, 40, 40, dtype=torch.float64) ** 3):
        schedule = resolve_schedule("keller", 1, 1e-7, precondition="aol")
        X0 = normalize(G, schedule)
        A = X0 @ X0.mT
        X1, A1 = aol_rescale(X0, (A + A.mT) / 2, schedule)  # a symmetric A (as the kernels store it) stays so
        assert torch.linalg.matrix_norm(X1, ord=2).max() <= 1 + 1e-12
        torch.testing.assert_close(A1, X1 @ X1.mT, rtol=1e-12, atol=1e-14)
        assert torch.equal(A1, A1.mT)
        # closer to orthogonal than the Frobenius start: its smallest singular value is larger
        assert (torch.linalg.svdvals(X1)[..., -1] > torch.linalg.svdvals(X0)[..., -1]).all()


def test_aol_zero_steps_is_the_frobenius_start():
    G = torch.randn(12, 20, dtype=torch.float64)
    assert torch.equal(muon.newton_schulz(G, steps=0, precondition="aol", dtype=torch.float64),
                       muon.newton_schulz(G, steps=0, dtype=torch.float64))


def test_aol_tall_batched_and_strided():
    bf16 = torch.bfloat16
    kw = dict(dtype=bf16, steps=4, coefficients="polar_express", precondition="aol")
    G = torch.randn(90, 30)
    assert torch.equal(muon.newton_schulz(G, **kw), muon.newton_schulz(G.T.contiguous(), **kw).T)
    B = torch.randn(5, 20, 36)
    batched = muon.newton_schulz(B, **kw)
    assert all(torch.equal(batched[i], muon.newton_schulz(B[i], **kw)) for i in range(5))
    view = torch.randn(5, 40, 24).transpose(1, 2)
    torch.testing.assert_close(muon.newton_schulz(view, **kw), muon.newton_schulz(view.contiguous(), **kw),
                               rtol=0, atol=0)


def test_float64_reference_is_orthogonal_for_many_steps():
    # Sanity of the reference itself: with enough steps the cubic NS (1.5, -0.5, 0) converges to U Vᵀ.
    G = torch.randn(20, 50, dtype=torch.float64)
    O = ns_float64(G, coefficients=(1.5, -0.5, 0.0), steps=60)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(O, U @ Vh, rtol=0, atol=1e-10)


@pytest.mark.parametrize("precondition", PRECONDITIONS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("scale", [1e-25, 1e-12, 1e-3, 1e5, 1e18, 1e25])
def test_scale_invariant_across_fp32_range(scale, dtype, precondition):
    G = torch.randn(40, 72)
    # half-precision compute (bf16 is the CUDA default; fp16's range is 1e-8…65504, so a naive
    # normalization in fp16 would overflow at 1e5 already): in fp32 the rounding of G*scale is as
    # large as NS's own error
    base = muon.newton_schulz(G, dtype=dtype, precondition=precondition)
    scaled = muon.newton_schulz(G * scale, dtype=dtype, precondition=precondition)
    assert torch.isfinite(scaled).all()
    # G*scale is itself rounded in fp32, so equality holds up to rounding noise: far below NS's own error.
    assert rel_err(scaled, base) < 0.25 * rel_err(base, ns_float64(G, precondition=precondition))


@pytest.mark.parametrize("precondition", PRECONDITIONS)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("power", [-80, -30, 30, 80])
def test_power_of_two_scaling_is_exact(power, dtype, precondition):
    G = torch.randn(3, 24, 40)
    kw = dict(dtype=dtype, precondition=precondition)
    assert torch.equal(muon.newton_schulz(G * 2.0**power, **kw), muon.newton_schulz(G, **kw))


def test_subnormal_and_huge_fp32_inputs_are_finite():
    G = torch.randn(16, 32)
    for s in (1e-40, 3e37):
        out = muon.newton_schulz((G * s).float())
        assert torch.isfinite(out).all() and out.abs().max() > 0.1


@pytest.mark.parametrize("precondition", PRECONDITIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_matrix_maps_to_zero_without_nan(dtype, precondition):
    kw = dict(dtype=dtype, precondition=precondition)
    G = torch.zeros(2, 16, 24)
    G[1] = torch.randn(16, 24)
    out = muon.newton_schulz(G, **kw)
    assert torch.equal(out[0], torch.zeros(16, 24))
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], muon.newton_schulz(G[1], **kw))
    assert torch.equal(muon.newton_schulz(torch.zeros(5, 3), eps=0.0, **kw), torch.zeros(5, 3))
    # AOL: a zero row (a dead neuron) stays zero, the others are orthogonalized as without it
    Z = torch.randn(12, 30)
    Z[3] = 0
    out = muon.newton_schulz(Z, eps=0.0, **kw)
    assert torch.isfinite(out).all() and torch.equal(out[3], torch.zeros(30))


@pytest.mark.parametrize("precondition", PRECONDITIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_gives_non_finite_output_for_that_matrix_only(bad, dtype, precondition):
    """A NaN/inf entry is not silently orthogonalized into a finite update: its matrix comes out
    non-finite everywhere (the normalization spreads it), and the other matrices of the batch are
    exactly what they are alone."""
    kw = dict(dtype=dtype, precondition=precondition)
    G = torch.randn(3, 12, 20)
    G[1, 4, 7] = bad
    out = muon.newton_schulz(G, **kw)
    assert not torch.isfinite(out[1]).any()
    for i in (0, 2):
        assert torch.equal(out[i], muon.newton_schulz(G[i], **kw))


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_stays_finite_on_extreme_inputs(dtype):
    """fp16's largest value is 65504: the start is formed in fp32 before the cast, so rank-one, huge,
    subnormal and long inputs never overflow a product, with or without AOL."""
    ones = torch.ones(8, 4096)
    rank_one = torch.randn(64, 1) @ torch.randn(1, 300)
    near_max = torch.randn(3, 5000)
    near_max = near_max / near_max.abs().max() * 3e38  # the largest entry at 3e38, within fp32's range
    for G in (ones, rank_one * 1e30, rank_one * 1e-40, near_max):
        for precondition in PRECONDITIONS:
            out = muon.newton_schulz(G, dtype=dtype, precondition=precondition)
            assert torch.isfinite(out).all(), (tuple(G.shape), precondition)
            assert torch.linalg.matrix_norm(out.double(), ord=2) > 0.5  # orthogonalized, not flushed to zero


def test_tall_input_is_transpose_of_wide():
    G = torch.randn(90, 30)
    # in bf16: the fp32 normalization of a transposed layout sums in another order (an fp32 ulp)
    bf16 = torch.bfloat16
    assert torch.equal(muon.newton_schulz(G, dtype=bf16), muon.newton_schulz(G.T.contiguous(), dtype=bf16).T)


def test_any_strides():
    base = torch.randn(5, 40, 24)
    views = [base.transpose(1, 2), base[:, ::2, :], base[:, :, ::3], base.permute(1, 0, 2)]
    for view in views:
        assert not view.is_contiguous()
        # bf16 compute: fp32 reductions over other strides differ by an ulp, below bf16's rounding
        out, ref = (muon.newton_schulz(v, dtype=torch.bfloat16) for v in (view, view.contiguous()))
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_batch_equals_per_matrix():
    G = torch.randn(6, 20, 36)
    batched = muon.newton_schulz(G)
    for i in range(6):
        assert torch.equal(batched[i], muon.newton_schulz(G[i]))


def test_output_dtype_and_float64_input():
    G = torch.randn(10, 14, dtype=torch.float64)
    out = muon.newton_schulz(G, dtype=torch.float32)
    assert out.dtype == torch.float64
    assert_ns_close(out, G, torch.float32)
    assert muon.newton_schulz(G.half()).dtype == torch.float16


def test_zero_size_inputs():
    for shape in [(0, 5), (5, 0), (3, 0, 4)]:
        out = muon.newton_schulz(torch.randn(shape))
        assert out.shape == shape


def test_coefficient_forms():
    G = torch.randn(12, 20)
    one = muon.newton_schulz(G, steps=3, coefficients=(3.4445, -4.775, 2.0315))
    listed = muon.newton_schulz(G, steps=3, coefficients=[(3.4445, -4.775, 2.0315)] * 3)
    named = muon.newton_schulz(G, steps=3, coefficients="keller")
    assert torch.equal(one, listed) and torch.equal(one, named)
    per_step = resolve_schedule("you", None, 1e-7)
    assert per_step.steps == 5 and per_step.coefficients[0] == (4.0848, -6.8946, 2.9270)
    assert resolve_schedule("polar_express", 5, 1e-7).fro_scale == 1.02
    assert resolve_schedule("polar_express", 5, 1e-7).eps == 1e-6
    # Zero steps: only the normalization, ||X0||_F = 1.
    X0 = muon.newton_schulz(G.double(), steps=0, dtype=torch.float64)
    assert abs(X0.norm().item() - 1) < 1e-6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"coefficients": "quintic"}, "not a preset"),
        ({"coefficients": (1.0, 2.0)}, "exactly 3"),
        ({"coefficients": [(1.0, 2.0, 3.0), (1.0, 2.0)]}, r"coefficients\[1\]"),
        ({"coefficients": "you", "steps": 7}, "only 5"),
        ({"coefficients": (float("nan"), 1.0, 1.0)}, "finite"),
        ({"steps": 100}, "steps"),
        ({"steps": -1}, "steps"),
        ({"eps": -1.0}, "eps"),
        ({"dtype": torch.int32}, "dtype"),
        ({"precondition": "spectral"}, "precondition must be one of"),
        ({"precondition": True}, "precondition must be one of"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        muon.newton_schulz(torch.randn(4, 6), **kwargs)


def test_bad_tensors_raise():
    with pytest.raises(ValueError, match="at least 2 dims"):
        muon.newton_schulz(torch.randn(5))
    with pytest.raises(TypeError, match="floating"):
        muon.newton_schulz(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="complex"):
        muon.newton_schulz(torch.randn(3, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        muon.newton_schulz([[1.0, 2.0]])
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        muon.newton_schulz(torch.randn(3, 3), backend="numpy")


def test_import_is_lazy_and_never_initializes_cuda():
    code = (
        "import sys, torch, muon\n"
        "muon.newton_schulz(torch.randn(4, 6))\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialized'\n"
        "heavy = [m for m in ('triton', 'cupy', 'muon._C', 'muon.kernels') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_muon_takes_aol_through_a_preconditioned_preset():
    """muon.coefficients.preconditioned: AOL in a Muon group today, through ns_coefficients (what
    bench/experiments/efficiency.py --ns precondition=aol passes); the update is NS with AOL of the gradient."""
    from muon.coefficients import preconditioned

    g = torch.randn(32, 80)
    W = torch.nn.Parameter(torch.zeros(32, 80))
    opt = muon.Muon([W], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0, ns_steps=4,
                    ns_coefficients=preconditioned("you", "aol"), ns_dtype=torch.float32)
    W.grad = g.clone()
    opt.step()
    expected = muon.newton_schulz(g, steps=4, coefficients="you", precondition="aol", dtype=torch.float32)
    torch.testing.assert_close(-W.detach(), expected, rtol=0, atol=1e-5)
    assert (expected - muon.newton_schulz(g, steps=4, coefficients="you", dtype=torch.float32)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="precondition must be one of"):
        preconditioned("you", "spectral")
    with pytest.raises(ValueError, match="not a preset"):
        preconditioned("quintic", "aol")
