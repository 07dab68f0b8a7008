"""muon.newton_schulz with the torch backend against the float64 reference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from nsref import assert_ns_close, ns_float64, rel_err

import muon
from muon.backends import BackendUnavailable
from muon.coefficients import PRESETS, resolve_schedule

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
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


def test_float64_reference_is_orthogonal_for_many_steps():
    # Sanity of the reference itself: with enough steps the cubic NS (1.5, -0.5, 0) converges to U Vᵀ.
    G = torch.randn(20, 50, dtype=torch.float64)
    O = ns_float64(G, coefficients=(1.5, -0.5, 0.0), steps=60)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(O, U @ Vh, rtol=0, atol=1e-10)


@pytest.mark.parametrize("scale", [1e-25, 1e-12, 1e-3, 1e5, 1e18, 1e25])
def test_scale_invariant_across_fp32_range(scale):
    G = torch.randn(40, 72)
    # bf16 compute (the CUDA default): in fp32 the rounding of G*scale is as large as NS's own error
    base = muon.newton_schulz(G, dtype=torch.bfloat16)
    scaled = muon.newton_schulz(G * scale, dtype=torch.bfloat16)
    assert torch.isfinite(scaled).all()
    # G*scale is itself rounded in fp32, so equality holds up to bf16 rounding noise: far below NS's own error.
    assert rel_err(scaled, base) < 0.25 * rel_err(base, ns_float64(G))


@pytest.mark.parametrize("power", [-80, -30, 30, 80])
def test_power_of_two_scaling_is_exact(power):
    G = torch.randn(3, 24, 40)
    assert torch.equal(muon.newton_schulz(G * 2.0**power), muon.newton_schulz(G))


def test_subnormal_and_huge_fp32_inputs_are_finite():
    G = torch.randn(16, 32)
    for s in (1e-40, 3e37):
        out = muon.newton_schulz((G * s).float())
        assert torch.isfinite(out).all() and out.abs().max() > 0.1


def test_zero_matrix_maps_to_zero_without_nan():
    G = torch.zeros(2, 16, 24)
    G[1] = torch.randn(16, 24)
    out = muon.newton_schulz(G)
    assert torch.equal(out[0], torch.zeros(16, 24))
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], muon.newton_schulz(G[1]))
    assert torch.equal(muon.newton_schulz(torch.zeros(5, 3), eps=0.0), torch.zeros(5, 3))


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
