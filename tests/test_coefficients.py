"""Coefficient presets: published numbers, their derivation, and a sweep of every preset × safety factor.

The sweep predicts each matrix result from the float64 scalar composition P = p_T ∘ … ∘ p_1 (NS acts
on every singular value separately: σ_out = P(σ / (fro_scale·||G||_F + eps))), then checks fp32 and
bf16 against it on 64×128 inputs at the normalization edge (rank-1 dominated: normalized σ_max ≈
1/fro_scale), with all singular values equal, and Gaussian.
"""

from __future__ import annotations

import io
import math

import docblocks
import pytest
import torch

import muon
from muon.coefficients import (
    POLAR_EXPRESS_CUSHION,
    PRESETS,
    Preset,
    optimal_composition,
    optimal_quintic,
    polar_express,
    resolve_schedule,
)

# --------------------------------------------------------------------- numbers copied from sources
# Paper (arXiv 2505.16932, Algorithm 1) = HeavyBall heavyball/utils.py ABC_LIST (commit 07887bd) =
# gram-newton-schulz gram_newton_schulz/coefficients.py _unmodified_polar_express_coefficients
# (commit f08f25e, first five): the list before the safety factor.
PAPER_UNSAFE = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
# HeavyBall heavyball/utils.py (commit 07887bd), as written there:
HEAVYBALL_STABLE = [(a / 1.01, b / 1.01**3, c / 1.01**5) for (a, b, c) in PAPER_UNSAFE[:-1]] + [PAPER_UNSAFE[-1]]
# gram-newton-schulz gram_newton_schulz/coefficients.py (commit f08f25e), as written there:
safety_factor = 1.05
GRAM_NS = [(a / safety_factor, b / safety_factor**3, c / safety_factor**5) for (a, b, c) in PAPER_UNSAFE[:5]]
# Emerging-Optimizers emerging_optimizers/orthogonalized_optimizers/muon_utils.py "polar_express"
# (commit fd77292): the paper's /1.01 list rounded to 4 decimals.
EMERGING_OPTIMIZERS = [
    (8.2051, -22.9019, 16.4607),
    (4.0664, -2.8612, 0.5184),
    (3.9096, -2.8234, 0.5250),
    (3.2856, -2.4153, 0.4853),
    (2.2779, -1.6198, 0.3985),
    (1.8726, -1.2307, 0.3585),
    (1.8564, -1.2132, 0.3568),
    (1.8750, -1.2500, 0.3750),
]
# modded-nanogpt train_gpt.py polar_express_coeffs (commit f411b3d, "Computed for num_iters=5,
# safety_factor=2e-2, cushion=2") = dion dion/polar_express.py _POLAR_EXPRESS_COEFFS (commit 0a059a4).
MODDED_NANOGPT = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def _close(got, want, rel):
    for g, w in zip(got, want, strict=True):
        for x, y in zip(g, w, strict=True):
            assert abs(x - y) <= rel * abs(y), (g, w)


def test_named_presets_reproduce_published_numbers():
    assert list(PRESETS["polar_express"].steps) == MODDED_NANOGPT  # bit for bit
    assert PRESETS["polar_express_1.02"] is PRESETS["polar_express"]
    assert list(PRESETS["polar_express_1.01"].steps) == HEAVYBALL_STABLE[:5]
    assert list(PRESETS["polar_express_1.05"].steps) == GRAM_NS
    assert list(polar_express(1.01, 8).steps) == HEAVYBALL_STABLE
    for got, want in zip(polar_express(1.01, 8).steps, EMERGING_OPTIMIZERS, strict=True):
        # 4-decimal values; their 8.2051 sits 6.04e-5 below 8.205160 (truncated, not rounded)
        assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-4
    # The safety factors as data, and the normalizations each source uses.
    assert [PRESETS[k].safety for k in ("polar_express", "polar_express_1.01", "polar_express_1.05")] == [
        1.02,
        1.01,
        1.05,
    ]
    assert (PRESETS["polar_express"].normalization.fro_scale, PRESETS["polar_express"].normalization.eps) == (
        1.02,
        1e-6,
    )
    assert PRESETS["polar_express_1.01"].normalization.fro_scale == 1.01  # paper: ||X||_F * 1.01 + 1e-7
    assert PRESETS["polar_express_1.05"].normalization.fro_scale == 1.0  # gram-NS: ||X||_F + eps
    assert all(PRESETS[k].safety is None for k in ("keller", "you", "cans"))


def test_derivation_reproduces_published_numbers():
    # The paper's list before scaling: its own derivation with the cushion it states.
    derived = optimal_composition(1e-3, 8, cushion=POLAR_EXPRESS_CUSHION)
    _close(derived[:6], PAPER_UNSAFE[:6], 1e-12)
    _close(derived[6:7], PAPER_UNSAFE[6:7], 1e-9)  # near the fixed point the Remez system is ill-conditioned
    _close(derived[7:], PAPER_UNSAFE[7:], 1e-8)  # the paper writes the limit (15/8, -10/8, 3/8) itself
    # modded-nanogpt / dion: safety 1.02 inside the recursion (cushion 0.02), last step unscaled.
    _close(optimal_composition(1e-3, 5, cushion=0.02, safety=1.02), MODDED_NANOGPT, 1e-12)
    # ... which is not the paper's list divided by 1.02 afterwards.
    assert abs(PAPER_UNSAFE[0][0] / 1.02 - MODDED_NANOGPT[0][0]) > 1e-2


def test_optimal_quintic_equioscillates():
    lo, hi = 0.1, 1.0
    a, b, c = optimal_quintic(lo, hi)
    x = torch.linspace(lo, hi, 200001, dtype=torch.float64)
    err = (a * x + b * x**3 + c * x**5 - 1).abs()
    p = lambda t: a * t + b * t**3 + c * t**5  # noqa: E731
    E = abs(p(lo) - 1)
    assert abs(abs(p(hi) - 1) - E) < 1e-12 and abs(err.max().item() - E) < 1e-9


def test_polar_express_builder_checks_arguments():
    with pytest.raises(ValueError, match="safety"):
        polar_express(0.99)
    with pytest.raises(ValueError, match="safety"):
        polar_express(float("nan"))
    with pytest.raises(ValueError, match="steps"):
        polar_express(1.01, steps=0)
    with pytest.raises(ValueError, match="lower"):
        optimal_quintic(0.5, 0.1)
    with pytest.raises(ValueError, match="cushion"):
        optimal_composition(1e-3, 5, cushion=1.5)
    with pytest.raises(ValueError, match="safety"):
        optimal_composition(1e-3, 5, safety=0.5)
    with pytest.raises(ValueError, match="steps"):
        optimal_composition(1e-3, 0)
    assert polar_express(1.02, steps=10).steps[-3:] == ((1.875, -1.25, 0.375),) * 3  # fixed point repeats
    assert polar_express(1.02, normalize=False).normalization.fro_scale == 1.0


def test_preset_objects_are_accepted_everywhere_names_are():
    pre = polar_express(1.03, steps=6)
    schedule = resolve_schedule(pre, None, 1e-7)
    assert schedule.coefficients == pre.steps and schedule.fro_scale == 1.03 and schedule.eps == 1e-7
    assert resolve_schedule(pre, 3, 1e-7).steps == 3
    with pytest.raises(ValueError, match="steps"):
        resolve_schedule(pre, 7, 1e-7)
    with pytest.raises(ValueError, match=r"coefficients.steps\[0\]"):
        resolve_schedule(Preset(((1.0, 2.0),)), None, 1e-7)
    G = torch.randn(16, 24)
    assert torch.equal(
        muon.newton_schulz(G, steps=None, coefficients=polar_express(1.01), dtype=torch.float32),
        muon.newton_schulz(G, steps=None, coefficients="polar_express_1.01", dtype=torch.float32),
    )
    W = torch.nn.Parameter(torch.randn(8, 12))
    opt = muon.Muon([W], lr=0.01, ns_coefficients=pre, ns_steps=None)
    W.grad = torch.randn_like(W)
    opt.step()
    assert torch.isfinite(W).all()
    # ... and through a checkpoint loaded with torch.load's default weights_only=True
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    restored = muon.Muon([W], lr=0.01)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.param_groups[0]["ns_coefficients"] == pre


# ---------------------------------------------------------------------------------------- the sweep
SAFETY_FACTORS = (1.0, 1.01, 1.02, 1.05)
SWEEP: dict[str, Preset | str] = {name: name for name in PRESETS}
SWEEP.update({f"polar_express(safety={s})": polar_express(s) for s in SAFETY_FACTORS})
# No headroom above the normalization edge: CANS, and the paper's list without its factor.
NO_MARGIN = {"cans", "polar_express(safety=1.0)"}


def _schedule(name):
    return resolve_schedule(SWEEP[name], None, 1e-7)


def _compose(schedule, x: torch.Tensor) -> torch.Tensor:
    for a, b, c in schedule.coefficients:
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return x


def _headroom(schedule, ceiling=1.3) -> float:
    """How far (as a ratio) the normalized top singular value may pass the edge 1/fro_scale before the
    output exceeds `ceiling`: the room bf16 rounding of the normalization gets."""
    x = torch.linspace(0, 1.3, 130_001, dtype=torch.float64)  # a 1e-5 grid
    over = (_compose(schedule, x) > ceiling).nonzero()
    return math.inf if len(over) == 0 else x[over[0, 0]].item() * schedule.fro_scale


@pytest.mark.parametrize("name", sorted(SWEEP))
def test_headroom_above_the_normalization_edge(name):
    headroom = _headroom(_schedule(name))
    if name in NO_MARGIN:
        assert headroom < 1.0001, headroom  # a normalized σ of 1 + 1e-4 already leaves [0, 1.3]
    else:
        assert headroom > 1.02, headroom  # ≥ 2.5× the bf16 rounding of the norm (2^-8 relative)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(64, 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, 128, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(128, 64, generator=g, dtype=torch.float64)).Q.T.contiguous()
    return {
        "edge": 30 * u @ v + 0.01 * torch.randn(64, 128, generator=g, dtype=torch.float64),
        "equal": Q,
        "gauss": torch.randn(2, 64, 128, generator=g, dtype=torch.float64),
    }


INPUTS = _inputs()


def _svals(G, name, dtype):
    out = muon.newton_schulz(G.float(), steps=None, coefficients=SWEEP[name], dtype=dtype, backend="torch")
    return torch.linalg.svdvals(out.double())


def _predicted(G, schedule):
    s = torch.linalg.svdvals(G)
    norm = torch.linalg.matrix_norm(G).unsqueeze(-1)
    return _compose(schedule, s / (norm * schedule.fro_scale + schedule.eps))


@pytest.mark.parametrize("name", sorted(SWEEP))
def test_fp32_singular_values_follow_the_scalar_composition(name):
    schedule = _schedule(name)
    for kind, G in INPUTS.items():
        got = _svals(G, name, torch.float32).sort(dim=-1).values
        want = _predicted(G, schedule).sort(dim=-1).values
        # Measured ≤ 5.7e-6 (≈ 50 fp32 ulps at 1) for every schedule with headroom; the two without
        # amplify fp32 rounding at the edge to 2.5e-3 (CANS) and 7.9e-3 (unsafe list).
        bound = 5e-2 if name in NO_MARGIN else 5e-5
        assert (got - want).abs().max() < bound, (kind, (got - want).abs().max().item())


# Measured bf16 bands (min, max singular value after the preset's steps) over the Gaussian inputs,
# and the largest singular value on the edge and equal inputs (see docs/newton-schulz.md, "Coefficient presets").
# Bounds are the measured values widened by 0.01 (≈ bf16 rounding noise between runs of other
# summation orders); the scalar composition gives the fp32 value each sits near.
BF16_BANDS = {
    "keller": (0.670, 1.147),  # measured [0.6802, 1.1368]
    "you": (0.965, 1.043),  # [0.9755, 1.0325]
    "polar_express": (0.848, 1.152),  # [0.8587, 1.1420]
    "polar_express_1.02": (0.848, 1.152),  # the same preset
    "polar_express_1.01": (0.858, 1.134),  # [0.8685, 1.1237]
    "polar_express_1.05": (0.836, 1.136),  # [0.8469, 1.1251]
    "polar_express(safety=1.01)": (0.858, 1.134),  # [0.8685, 1.1237]
    "polar_express(safety=1.02)": (0.854, 1.135),  # [0.8648, 1.1244]
    "polar_express(safety=1.05)": (0.840, 1.135),  # [0.8506, 1.1242]
}


@pytest.mark.parametrize("name", sorted(BF16_BANDS))
def test_bf16_largest_singular_value_at_the_edge_and_spread(name):
    edge = _svals(INPUTS["edge"], name, torch.bfloat16).max().item()
    equal = _svals(INPUTS["equal"], name, torch.bfloat16).max().item()
    # Top singular value at the normalization edge stays ≤ 1 + 0.03: measured ≤ 1.018
    # (polar_express_1.05, whose edge sits at 1/1.05 of its design interval).
    assert edge <= 1.03 and equal <= 1.03, (edge, equal)
    s = _svals(INPUTS["gauss"], name, torch.bfloat16)
    low, high = BF16_BANDS[name]
    assert low <= s.min().item() and s.max().item() <= high, (s.min().item(), s.max().item())


def test_presets_without_margin_overshoot_at_the_edge():
    # The paper's list without its factor maps the edge itself to 1.12 (fp32 and exact alike).
    sched = _schedule("polar_express(safety=1.0)")
    assert _compose(sched, torch.tensor(1.0, dtype=torch.float64)).item() > 1.1
    assert _svals(INPUTS["edge"], "polar_express(safety=1.0)", torch.float32).max() > 1.1


def test_readme_example_runs():
    scope = docblocks.run(docblocks.block("docs/newton-schulz.md", "Coefficient presets and safety factors"))
    assert scope["O"].shape == (64, 128) and torch.isfinite(scope["O"]).all()
    _close(scope["derived"], MODDED_NANOGPT, 1e-12)
