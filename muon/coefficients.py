"""Newton–Schulz coefficient presets and their normalization: the one place they are defined.

Every backend (torch reference, Triton, CUDA) and every benchmark imports from here.
Sources: Keller Jordan's Muon; "You" 5-step set; Polar Express (Amsel, Persson, Musco, Gower 2025,
arXiv 2505.16932) at the three safety factors public packages ship; CANS (NVIDIA Emerging-Optimizers).

Safety factor s: a Polar Express polynomial p built for singular values in [l, 1] is replaced by
p(x / s) = (a/s)·x + (b/s³)·x³ + (c/s⁵)·x⁵, which accepts inputs up to s (bf16 rounding can push the
normalized top singular value past 1). Every Polar Express preset records its s as data (`Preset.safety`);
`polar_express(safety)` builds the paper's schedule at any s, and `optimal_composition` re-derives the
published tuples from scratch (tests/test_coefficients.py checks both against the packages' numbers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Coefficient = tuple[float, float, float]

KELLER: Coefficient = (3.4445, -4.7750, 2.0315)

_YOU: tuple[Coefficient, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# modded-nanogpt (train_gpt.py, "Computed for num_iters=5, safety_factor=2e-2, cushion=2") and dion
# (dion/polar_express.py): optimal_composition(l=1e-3, steps=5, cushion=0.02, safety=1.02), the factor
# applied inside the recursion to all but the last step. Not the paper's list divided by 1.02.
_POLAR_EXPRESS: tuple[Coefficient, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# The paper's Algorithm 1 list before its safety factor (arXiv 2505.16932; also HeavyBall
# heavyball/utils.py ABC_LIST, gram-newton-schulz gram_newton_schulz/coefficients.py): the unsafe
# optimal_composition(l=1e-3, steps=8, cushion=0.02407327424182761). The last entry is the fixed point
# every later step equals; the paper leaves it unscaled.
_POLAR_EXPRESS_UNSAFE: tuple[Coefficient, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_CUSHION = 0.02407327424182761  # the paper's cushion for the list above
POLAR_EXPRESS_L = 1e-3  # the smallest normalized singular value the schedules are built for

_CANS: tuple[Coefficient, ...] = (
    (8.4703, -25.1081, 18.6293),
    (4.1828, -3.1087, 0.5806),
    (3.9619, -2.9541, 0.5630),
    (3.2866, -2.4647, 0.5074),
    (2.2737, -1.6447, 0.4162),
)


# How X0 is formed from G (`Normalization.precondition`, `resolve_schedule(..., precondition=)`):
# "frobenius": X0 = G / (fro_scale·‖G‖_F + eps), the classic start;
# "aol": the Frobenius start, then the first step's Gram matrix A = X0·X0ᵀ rescales it (Turbo-Muon,
#   Boissin et al. 2025, arXiv 2512.04632, after Prach & Lampert's AOL bound): X1 = D·X0, A1 = D·A·D
#   with D = diag(d), d_i = 1 / (fro_scale·sqrt(max(Σ_j |A_ij|, eps))) — no extra product.
PRECONDITIONS = ("frobenius", "aol")


@dataclass(frozen=True)
class Normalization:
    """X0 = G / (fro_scale * ||G||_F + eps), applied after an exact max-abs prescale (see below).

    `eps=None` means "use the caller's eps". Polar Express divides by ||G||_F * 1.02 + 1e-6 so that
    its aggressive first step never sees a singular value above 1 after bf16 rounding.
    `precondition="aol"` adds the AOL rescaling on top (see PRECONDITIONS): a Preset can carry it, so
    `Muon(ns_coefficients=Preset(..., Normalization(precondition="aol")))` uses it.
    """

    fro_scale: float = 1.0
    eps: float | None = None
    precondition: str = "frobenius"


@dataclass(frozen=True)
class Preset:
    """A coefficient schedule with its normalization and, where it has one, its safety factor.

    `safety` is data, not applied again: the tuples in `steps` already include it. None means the
    schedule was not derived with one (Keller, You, CANS). A Preset can be passed wherever a preset
    name is accepted (`newton_schulz(G, coefficients=polar_express(1.03))`, `Muon(ns_coefficients=...)`).
    """

    steps: tuple[Coefficient, ...]  # one tuple per step; a 1-tuple repeats for any step count
    normalization: Normalization = Normalization()
    safety: float | None = None
    source: str = ""


def _scaled(coefficients: Sequence[Coefficient], safety: float) -> tuple[Coefficient, ...]:
    # Written as the packages write it, so the floats come out bit-identical to theirs.
    return tuple((a / safety, b / safety**3, c / safety**5) for (a, b, c) in coefficients)


def polar_express(safety: float = 1.01, steps: int = 5, *, normalize: bool = True) -> Preset:
    """The paper's Polar Express schedule (Algorithm 1) at safety factor `safety`.

    Every step but the fixed point (1.875, -1.25, 0.375) is scaled to (a/s, b/s³, c/s⁵), as in the
    paper, HeavyBall (s=1.01) and gram-newton-schulz (s=1.05); steps past 8 repeat the fixed point.
    normalize=True divides the input by ||G||_F·s + 1e-7 as the paper does; False by ||G||_F + eps
    (the caller's eps), as HeavyBall, Emerging-Optimizers and gram-newton-schulz do.
    """
    if isinstance(safety, bool) or not isinstance(safety, (int, float)) or not math.isfinite(safety):
        raise ValueError(f"safety must be a finite number >= 1, got {safety!r}")
    if safety < 1:
        raise ValueError(f"safety must be >= 1 (1 means no safety margin), got {safety}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
        raise ValueError(f"steps must be an int in [1, 100), got {steps!r}")
    base = _POLAR_EXPRESS_UNSAFE
    per_step = _scaled(base[:-1], float(safety)) + base[-1:]
    per_step = per_step[:steps] + per_step[-1:] * max(0, steps - len(per_step))
    norm = Normalization(fro_scale=float(safety), eps=1e-7) if normalize else Normalization()
    return Preset(per_step, norm, float(safety), f"Polar Express paper, Algorithm 1, safety {safety}")


def optimal_quintic(lower: float, upper: float) -> Coefficient:
    """The odd quintic p(x) = a·x + b·x³ + c·x⁵ closest to 1 in max norm on [lower, upper] (Remez, float64).

    The paper's simplified Remez exchange: p - 1 equioscillates at lower, q, r, upper, with q and r the
    interior critical points of p.
    """
    if not 0 < upper or not 0 <= lower <= upper:
        raise ValueError(f"need 0 <= lower <= upper and upper > 0, got lower={lower}, upper={upper}")
    if lower / upper >= 1 - 5e-6:
        # the equioscillating quintic is numerically the Taylor one at this width
        return (15 / 8) / upper, (-10 / 8) / upper**3, (3 / 8) / upper**5
    q, r = (3 * lower + upper) / 4, (lower + 3 * upper) / 4
    error, old_error = math.inf, None
    for _ in range(200):
        if old_error is not None and abs(old_error - error) <= 1e-15:
            break
        old_error = error
        rows = [[x, x**3, x**5, sign, 1.0] for x, sign in ((lower, 1.0), (q, -1.0), (r, 1.0), (upper, -1.0))]
        a, b, c, error = _solve4(rows)
        disc = math.sqrt(9 * b * b - 20 * a * c)
        q, r = math.sqrt((-3 * b - disc) / (10 * c)), math.sqrt((-3 * b + disc) / (10 * c))
    return a, b, c


def _solve4(rows: list[list[float]]) -> list[float]:
    """Gaussian elimination with partial pivoting on an augmented n×(n+1) system."""
    n = len(rows)
    for col in range(n):
        pivot = max(range(col, n), key=lambda i: abs(rows[i][col]))
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for i in range(col + 1, n):
            f = rows[i][col] / rows[col][col]
            rows[i] = [v - f * w for v, w in zip(rows[i], rows[col])]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (rows[i][n] - sum(rows[i][j] * x[j] for j in range(i + 1, n))) / rows[i][i]
    return x


def optimal_composition(
    lower: float, steps: int, *, cushion: float = 0.0, safety: float = 1.0
) -> tuple[Coefficient, ...]:
    """Derive a Polar Express schedule from scratch (float64), as the paper's repository does.

    Each step takes the optimal quintic on [max(l, cushion·u), u], re-centres it so p(l) and p(u)
    straddle 1 symmetrically, divides by the safety factor (a/s, b/s³, c/s⁵) except on the last step,
    and maps the interval through it: l <- p(l), u <- 2 - l. With safety > 1 the factor changes the
    later intervals, so this is not the safety=1 list divided afterwards.
    optimal_composition(1e-3, 5, cushion=0.02, safety=1.02) is the "polar_express" preset;
    optimal_composition(1e-3, 8, cushion=POLAR_EXPRESS_CUSHION) is the paper's list before scaling.
    """
    if not (isinstance(lower, (int, float)) and 0 < lower <= 1):
        raise ValueError(f"lower must be in (0, 1], got {lower!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
        raise ValueError(f"steps must be an int in [1, 100), got {steps!r}")
    if not (isinstance(cushion, (int, float)) and 0 <= cushion < 1):
        raise ValueError(f"cushion must be in [0, 1), got {cushion!r}")
    if not (isinstance(safety, (int, float)) and math.isfinite(safety) and safety >= 1):
        raise ValueError(f"safety must be a finite number >= 1, got {safety!r}")
    lo, hi = float(lower), 1.0
    out = []
    for i in range(steps):
        a, b, c = optimal_quintic(max(lo, cushion * hi), hi)
        if cushion * hi > lo:
            p_lo = a * lo + b * lo**3 + c * lo**5
            p_hi = a * hi + b * hi**3 + c * hi**5
            k = 2 / (p_lo + p_hi)
            a, b, c = a * k, b * k, c * k
        if i < steps - 1:
            a, b, c = a / safety, b / safety**3, c / safety**5
        out.append((a, b, c))
        lo = a * lo + b * lo**3 + c * lo**5
        hi = 2 - lo
    return tuple(out)


_PE_PAPER = polar_express(1.01)

PRESETS: dict[str, Preset] = {
    "keller": Preset((KELLER,)),
    "you": Preset(_YOU),
    "polar_express": Preset(
        _POLAR_EXPRESS,
        Normalization(fro_scale=1.02, eps=1e-6),
        1.02,
        "modded-nanogpt train_gpt.py, dion polar_express.py",
    ),
    # CANS's first polynomial is built for singular values below ~0.7 (it maps 0.8 to 0.025 and 1 to
    # 1.99): fine after Frobenius normalization of a random matrix in fp32, fragile in bf16.
    "cans": Preset(_CANS),
    # The paper's own factor (Algorithm 1: coefficients and the normalization both use 1.01);
    # HeavyBall ships these tuples bit for bit, Emerging-Optimizers rounded to 4 decimals.
    "polar_express_1.01": Preset(
        _PE_PAPER.steps[:5], _PE_PAPER.normalization, 1.01, "arXiv 2505.16932 Algorithm 1, HeavyBall"
    ),
    # gram-newton-schulz scales all five steps by 1.05 and normalizes by ||X||_F + eps alone.
    "polar_express_1.05": Preset(
        _scaled(_POLAR_EXPRESS_UNSAFE[:5], 1.05), Normalization(), 1.05, "gram-newton-schulz coefficients.py"
    ),
}
PRESETS["polar_express_1.02"] = PRESETS["polar_express"]


@dataclass(frozen=True)
class Schedule:
    """A resolved NS schedule: the (a, b, c) of every step and how X0 is normalized.

    precondition "aol" rescales the Frobenius-normalized X0 by the row sums of |X0·X0ᵀ| inside the
    first step, reusing that step's Gram product (PRECONDITIONS); with zero steps there is no product
    to reuse and X0 is the Frobenius start whatever the precondition.
    """

    coefficients: tuple[Coefficient, ...]
    fro_scale: float
    eps: float
    precondition: str = "frobenius"

    @property
    def steps(self) -> int:
        return len(self.coefficients)


def _as_triple(value, what: str) -> Coefficient:
    try:
        triple = tuple(float(v) for v in value)
    except TypeError:
        raise ValueError(f"{what} must be an (a, b, c) tuple of numbers, got {value!r}") from None
    if len(triple) != 3:
        raise ValueError(f"{what} must have exactly 3 values (a, b, c), got {len(triple)}: {value!r}")
    if not all(math.isfinite(v) for v in triple):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return triple  # type: ignore[return-value]


def check_precondition(precondition) -> str | None:
    """None (the preset's own) or one of PRECONDITIONS, else a ValueError naming the choices."""
    if precondition is None or (isinstance(precondition, str) and precondition in PRECONDITIONS):
        return precondition
    raise ValueError(f"precondition must be one of {PRECONDITIONS} or None (the preset's own), got {precondition!r}")


def resolve_schedule(coefficients, steps: int | None, eps: float, precondition: str | None = None) -> Schedule:
    """Turn the user's `coefficients` (preset name, one tuple, or one tuple per step) into a Schedule.

    steps=None takes the preset's own length (5 for the named presets, 5 for a single tuple).
    precondition: None takes the preset's (`Normalization.precondition`: "frobenius" for every named
    preset), "frobenius" or "aol" overrides it. With "aol" a per-step list longer than `steps` gives
    its last `steps` tuples, not its first: the AOL start is already close to orthogonal, so the
    steps dropped are the first, most aggressive ones, built to lift the tiny singular values of a
    Frobenius start (Turbo-Muon's rule; `python -m bench quality` measures both, see
    docs/newton-schulz-quality.md).
    """
    precondition = check_precondition(precondition)
    if isinstance(steps, bool) or (steps is not None and not isinstance(steps, int)):
        raise ValueError(f"steps must be an int, got {steps!r}")
    if steps is not None and not 0 <= steps < 100:
        raise ValueError(f"steps must be in [0, 100), got {steps}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")

    normalization = Normalization()
    if isinstance(coefficients, Preset):
        per_step = tuple(_as_triple(c, f"coefficients.steps[{i}]") for i, c in enumerate(coefficients.steps))
        if not per_step:
            raise ValueError("coefficients is a Preset with no steps")
        normalization = coefficients.normalization
    elif isinstance(coefficients, str):
        if coefficients not in PRESETS:
            raise ValueError(
                f"coefficients={coefficients!r} is not a preset; choose one of {sorted(PRESETS)} "
                "or pass (a, b, c) tuples"
            )
        preset = PRESETS[coefficients]
        per_step, normalization = preset.steps, preset.normalization
    elif isinstance(coefficients, Sequence) and all(isinstance(c, (int, float)) for c in coefficients):
        per_step = (_as_triple(coefficients, "coefficients"),)
    elif isinstance(coefficients, Sequence) and len(coefficients) > 0:
        per_step = tuple(_as_triple(c, f"coefficients[{i}]") for i, c in enumerate(coefficients))
    else:
        raise ValueError(
            f"coefficients must be a preset name, an (a, b, c) tuple or a list of them, got {coefficients!r}"
        )

    if len(per_step) == 1:
        n = 5 if steps is None else steps
        schedule = per_step * n
    else:
        n = len(per_step) if steps is None else steps
        if n > len(per_step):
            raise ValueError(
                f"steps={n} but only {len(per_step)} per-step coefficient tuples were given; "
                "pass one tuple per step or a single tuple to repeat"
            )
        schedule = per_step[:n]
    if precondition is None:
        precondition = check_precondition(getattr(normalization, "precondition", "frobenius"))
    if precondition == "aol" and len(per_step) > 1:
        schedule = per_step[len(per_step) - n:]
    eps_used = float(eps) if normalization.eps is None else normalization.eps
    return Schedule(tuple(schedule), normalization.fro_scale, eps_used, precondition)


def preconditioned(coefficients, precondition: str) -> Preset:
    """`coefficients` (a preset name, a Preset, one (a, b, c) tuple or a list of them) as a Preset whose
    normalization carries `precondition`: the form any API that takes `coefficients` accepts, e.g.
    `Muon(params, ns_coefficients=preconditioned("you", "aol"), ns_steps=4)` (Turbo-Muon's setting)."""
    precondition = check_precondition(precondition)
    if precondition is None:
        raise ValueError(f"precondition must be one of {PRECONDITIONS}, got None")
    if isinstance(coefficients, str):
        resolve_schedule(coefficients, None, 0.0)  # a clear error for an unknown name
        base = PRESETS[coefficients]
    elif isinstance(coefficients, Preset):
        base = coefficients
    else:
        per_step = resolve_schedule(coefficients, None, 0.0).coefficients
        base = Preset(per_step[:1] if len(set(per_step)) == 1 else per_step)
    norm = base.normalization
    return Preset(base.steps, Normalization(norm.fro_scale, norm.eps, precondition), base.safety,
                  (base.source + f"; precondition {precondition}").lstrip("; "))


def _allow_in_checkpoints() -> None:
    # A Preset in a param group travels in optimizer.state_dict(); torch.load(weights_only=True), the
    # default since torch 2.6, refuses any class it was not told about.
    import torch.serialization

    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add([Preset, Normalization])


_allow_in_checkpoints()


# Gram Newton–Schulz restarts: 0-based steps before which X and X·Xᵀ are recomputed.
DEFAULT_RESTARTS = (2,)  # one restart after two steps (Zhang, Amsel, Chen, Dao 2026's default)


def check_restarts(restarts) -> tuple[int, ...]:
    """Gram NS restart steps as a sorted tuple of distinct ints >= 1 (indices past the last step do nothing)."""
    try:
        values = tuple(restarts)
    except TypeError:
        raise TypeError(f"restarts must be a sequence of step indices, got {restarts!r}") from None
    for r in values:
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError(f"restarts must hold ints (0-based step indices), got {r!r} in {restarts!r}")
        if r < 1:
            raise ValueError(
                f"restarts must be >= 1 (a restart before step 0 is the start itself), got {r} in {restarts!r}"
            )
    return tuple(sorted(set(values)))
