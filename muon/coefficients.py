"""Newton–Schulz coefficient presets and their normalization: the one place they are defined.

Every backend (torch reference, Triton, CUDA) and every benchmark imports from here.
Sources: Keller Jordan's Muon; "You" 5-step set; Polar Express (Amsel, Persson, Musco, Gower 2025,
as used in modded-nanogpt and dion); CANS (NVIDIA Emerging-Optimizers).
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

_POLAR_EXPRESS: tuple[Coefficient, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

_CANS: tuple[Coefficient, ...] = (
    (8.4703, -25.1081, 18.6293),
    (4.1828, -3.1087, 0.5806),
    (3.9619, -2.9541, 0.5630),
    (3.2866, -2.4647, 0.5074),
    (2.2737, -1.6447, 0.4162),
)


@dataclass(frozen=True)
class Normalization:
    """X0 = G / (fro_scale * ||G||_F + eps), applied after an exact max-abs prescale (see below).

    `eps=None` means "use the caller's eps". Polar Express divides by ||G||_F * 1.02 + 1e-6 so that
    its aggressive first step never sees a singular value above 1 after bf16 rounding.
    """

    fro_scale: float = 1.0
    eps: float | None = None


@dataclass(frozen=True)
class Preset:
    steps: tuple[Coefficient, ...]  # one tuple per step; a 1-tuple repeats for any step count
    normalization: Normalization = Normalization()


PRESETS: dict[str, Preset] = {
    "keller": Preset((KELLER,)),
    "you": Preset(_YOU),
    "polar_express": Preset(_POLAR_EXPRESS, Normalization(fro_scale=1.02, eps=1e-6)),
    # CANS's first polynomial is built for singular values below ~0.7 (it maps 0.8 to 0.025 and 1 to
    # 1.99): fine after Frobenius normalization of a random matrix in fp32, fragile in bf16.
    "cans": Preset(_CANS),
}


@dataclass(frozen=True)
class Schedule:
    """A resolved NS schedule: the (a, b, c) of every step and how X0 is normalized."""

    coefficients: tuple[Coefficient, ...]
    fro_scale: float
    eps: float

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


def resolve_schedule(coefficients, steps: int | None, eps: float) -> Schedule:
    """Turn the user's `coefficients` (preset name, one tuple, or one tuple per step) into a Schedule.

    steps=None takes the preset's own length (5 for the named presets, 5 for a single tuple).
    """
    if isinstance(steps, bool) or (steps is not None and not isinstance(steps, int)):
        raise ValueError(f"steps must be an int, got {steps!r}")
    if steps is not None and not 0 <= steps < 100:
        raise ValueError(f"steps must be in [0, 100), got {steps}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")

    normalization = Normalization()
    if isinstance(coefficients, str):
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
    eps_used = float(eps) if normalization.eps is None else normalization.eps
    return Schedule(tuple(schedule), normalization.fro_scale, eps_used)
