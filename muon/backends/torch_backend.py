"""Backend registration for the pure-PyTorch reference (always available).

`run` is standard Newton–Schulz (muon.backends.torch_ref); `run_gram` is Gram Newton–Schulz, the
reference the Triton Gram kernels are tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..coefficients import DEFAULT_RESTARTS, Schedule
from .torch_ref import aol_rescale, normalize
from .torch_ref import newton_schulz_torch as run  # noqa: F401


def unavailable_reason(X: Tensor) -> str | None:
    return None


def _add_identity(Z: Tensor, a: float) -> Tensor:
    """Z + a·I on a (B, m, m) stack (elementwise on the diagonal, no matmul)."""
    Q = Z.clone()
    Q.diagonal(dim1=-2, dim2=-1).add_(a)
    return Q


def run_gram(X: Tensor, schedule: Schedule, dtype: torch.dtype, restarts=DEFAULT_RESTARTS) -> Tensor:
    """Gram Newton–Schulz on a (B, m, n) stack with m <= n, in `dtype`; returns (B, m, n) in `dtype`.

    Every standard NS step multiplies X by P = a·I + b·A + c·A² with A = X·Xᵀ, a polynomial in the Gram
    matrix. So X_t = Q_t·X_0 where Q_t, and R_t = X_t·X_tᵀ, are polynomials in R_0 = X_0·X_0ᵀ (all
    symmetric and commuting), and the iteration runs on m×m matrices only (Zhang, Amsel, Chen, Dao 2026):

        Z = b·R + c·R·R;  Q = a·Q + Q·Z (Q = Z + a·I on a segment's first step);
        RZ = a·R + R·Z;   R = a·RZ + Z·RZ   (= P·R·P, skipped where no later step of the segment uses it)

    and X = Q·X once at the end. R_t built by repeated products drifts from X_t·X_tᵀ in half precision
    (small eigenvalues of R go negative and the polynomial amplifies them); a restart before step i
    (i in `restarts`, 0-based: the default (2,) restarts after two of the five steps) sets
    X = Q·X, R = X·Xᵀ, Q = I. Restart indices of 0 or >= the step count have no effect.
    Same normalization as standard NS (scale-safe, zero maps to zero); schedule.precondition "aol"
    rescales X and the first R = X·Xᵀ (`torch_ref.aol_rescale`): the product is reused, as in
    standard NS.
    """
    X = normalize(X, schedule).to(dtype)
    steps = schedule.steps
    if steps == 0:
        return X
    cuts = {i for i in restarts if 0 < i < steps}
    R = torch.bmm(X, X.mT)
    if schedule.precondition == "aol":
        X, R = aol_rescale(X, R, schedule)
    Q = None
    for i, (a, b, c) in enumerate(schedule.coefficients):
        if i in cuts:
            X = torch.bmm(Q, X)
            R = torch.bmm(X, X.mT)
            Q = None
        Z = torch.baddbmm(R, R, R, beta=b, alpha=c)
        Q = _add_identity(Z, a) if Q is None else torch.baddbmm(Q, Q, Z, beta=a)
        if i + 1 < steps and i + 1 not in cuts:
            RZ = torch.baddbmm(R, R, Z, beta=a)
            R = torch.baddbmm(RZ, Z, RZ, beta=a)
    return torch.bmm(Q, X)
