"""Matmul and elementwise FLOPs of one Newton–Schulz call on an m×n matrix (exact closed forms).

The library weighs NS work with them: `muon.backends.dispatch.choose_algorithm` (standard or Gram NS
on a device without measurements) and `muon.distributed.ownership` (the greedy balance of matrices
over ranks). The FLOP model of a whole step against AdamW and training (`muon.flops`, a tool) builds
on them.
"""

from __future__ import annotations

from .coefficients import PRECONDITIONS, check_restarts

__all__ = ["newton_schulz_elementwise_flops", "newton_schulz_flops"]


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def newton_schulz_flops(
    m: int, n: int, steps: int = 5, symmetric: bool = False, algorithm: str = "standard", restarts=(2,),
    precondition: str = "frobenius",
) -> int:
    """Matmul FLOPs of `steps` NS iterations on one m×n matrix (exact int).

    precondition ("frobenius" or "aol") does not change the count: AOL's row scales come from the
    first step's Gram product, which that step forms anyway (elementwise work only:
    `newton_schulz_elementwise_flops`). Fewer FLOPs with AOL come from running fewer steps.

    With s = min(m, n), l = max(m, n) (tall inputs are transposed first):

    algorithm="standard": one step is A = X·Xᵀ (2·s²·l), A·A (2·s³) and B·X (2·s²·l):
    steps·(4·s²·l + 2·s³). symmetric=True counts kernels that compute one triangle of the two
    symmetric products (X·Xᵀ and A·A): steps·(3·s²·l + s³).

    algorithm="gram" (muon.backends.torch_backend.run_gram), with k = 1 + the restarts in [1, steps)
    segments: each segment computes R = X·Xᵀ (2·s²·l) and ends with X = Q·X (2·s²·l); each of its L
    steps computes Z = b·R + c·R·R (2·s³), Q·Z (2·s³, not on the segment's first step: Q = Z + a·I
    there) and R·Z, Z·(R·Z) (4·s³, not on its last step: no later step of the segment reads R):
    4·k·s²·l + (8·steps - 6·k)·s³. symmetric=True halves X·Xᵀ and every s×s product (each is symmetric:
    polynomials in R commute), not the general Q·X: 3·k·s²·l + (4·steps - 3·k)·s³. steps=0: 0.
    The elementwise terms (b·A, a·X, Z + a·I) are not matmul work: `newton_schulz_elementwise_flops`.
    """
    _check_int(m, "m", 0)
    _check_int(n, "n", 0)
    _check_int(steps, "steps", 0)
    _check_precondition(precondition)
    short, long = min(m, n), max(m, n)
    if algorithm == "gram":
        if steps == 0:
            return 0
        k = 1 + sum(1 for r in check_restarts(restarts) if r < steps)
        if symmetric:
            return 3 * k * short * short * long + (4 * steps - 3 * k) * short**3
        return 4 * k * short * short * long + (8 * steps - 6 * k) * short**3
    if algorithm != "standard":
        raise ValueError(f"algorithm must be 'standard' or 'gram', got {algorithm!r}")
    if symmetric:
        return steps * (3 * short * short * long + short**3)
    return steps * (4 * short * short * long + 2 * short**3)


def newton_schulz_elementwise_flops(m: int, n: int, steps: int = 5, precondition: str = "frobenius") -> int:
    """Non-matmul FLOPs of NS on one m×n matrix: the normalization and the per-step scalings.

    Normalization (scale-safe, see muon.backends.torch_backend.normalize): |x|, max, divide, square,
    accumulate, divide = 6 per element. Per step: B = b·A + c·(A·A) is 3 per element of the s×s
    Gram matrix and X = a·X + B·X is 2 per element of X. precondition="aol" (with steps >= 1, see
    muon.backends.torch_backend.aol_rescale) adds, on the s×s Gram matrix A, |A| and the row sums (2 per
    element), d_i·d_j and the product (2 per element), per row max, sqrt, times fro_scale and the
    reciprocal (4), and one multiply per element of X.
    """
    _check_precondition(precondition)
    short = min(m, n)
    aol = 4 * short * short + 4 * short + m * n if precondition == "aol" and steps > 0 else 0
    return 6 * m * n + steps * (3 * short * short + 2 * m * n) + aol


def _check_precondition(precondition) -> None:
    if precondition not in PRECONDITIONS:
        raise ValueError(f"precondition must be one of {PRECONDITIONS}, got {precondition!r}")
