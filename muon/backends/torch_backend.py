"""The pure-PyTorch Newton–Schulz backend (always available): runs on every device and is the
reference the kernels are tested against.

`run` is standard Newton–Schulz (`newton_schulz_torch`), `run_gram` Gram Newton–Schulz; both start
from the scale-safe `normalize` and, with precondition "aol", rescale by `aol_rescale`. Run with
`dtype=torch.float64` it is the float64 reference the tests compare every backend against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..coefficients import DEFAULT_RESTARTS, Schedule


def normalize(X: Tensor, schedule: Schedule) -> Tensor:
    """X / (fro_scale * ||X||_F + eps) per matrix of a (B, m, n) stack, scale-safe over the fp32 range.

    A naive ||X||_F in fp32 squares the entries: 1e-25**2 underflows to 0 and 1e25**2 overflows to inf.
    Dividing by the max-abs entry first brings every matrix to max |x| = 1 (a division, not a reciprocal,
    so subnormal maxima work too), after which the norm lies in [1, sqrt(m n)] and cannot over- or
    underflow; eps therefore acts relative to the matrix's scale and NS(s G) == NS(G) up to rounding.
    A zero matrix stays zero (its max is replaced by 1, its norm guarded by eps or the smallest normal).
    Computed in fp32 (fp64 when X is fp64): one elementwise pass, negligible beside the GEMMs.
    """
    work = torch.float64 if X.dtype == torch.float64 else torch.float32
    X = X.to(work)
    amax = X.abs().amax(dim=(-2, -1), keepdim=True)
    X = X / torch.where(amax > 0, amax, torch.ones_like(amax))
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    denom = (norm * schedule.fro_scale + schedule.eps).clamp_min(torch.finfo(work).tiny)
    return X / denom


def aol_scales(A: Tensor, schedule: Schedule) -> Tensor:
    """The AOL row scales d (B, m) of a Gram stack A = X0·X0ᵀ (B, m, m), in fp32 (fp64 for fp64 A).

    d_i = 1 / (fro_scale·sqrt(max(Σ_j |A_ij|, eps))). By the Schur test ‖D·A·D‖_2 <= max_i d_i²·Σ_j |A_ij|
    <= 1/fro_scale², so X1 = D·X0 has spectral norm <= 1/fro_scale (Prach & Lampert 2022's AOL bound,
    used by Turbo-Muon on the small side of X). X0 is the scale-safe Frobenius start, so Σ_j |A_ij| <=
    sqrt(m) and eps acts relative to the matrix: a row with less than eps of ‖X0‖_F² is amplified at
    most 1/sqrt(eps) (a zero row stays zero); the smallest normal number guards eps = 0.
    """
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    rows = A.to(work).abs().sum(dim=-1)
    floor = max(float(schedule.eps), torch.finfo(work).tiny)
    return 1.0 / (schedule.fro_scale * torch.sqrt(rows.clamp_min(floor)))


def aol_rescale(X: Tensor, A: Tensor, schedule: Schedule) -> tuple[Tensor, Tensor]:
    """(D·X, D·A·D) in X's and A's dtypes, D from `aol_scales(A)`: the AOL start, from the Gram product
    the first NS step formed anyway (no extra matmul). D·A·D is computed as A_ij·(d_i·d_j), so it stays
    exactly symmetric; both are rounded once from fp32."""
    d = aol_scales(A, schedule)
    work = d.dtype
    X1 = (X.to(work) * d[..., :, None]).to(X.dtype)
    A1 = (A.to(work) * (d[..., :, None] * d[..., None, :])).to(A.dtype)
    return X1, A1


def newton_schulz_torch(X: Tensor, schedule: Schedule, dtype: torch.dtype) -> Tensor:
    """NS on a (B, m, n) stack with m <= n (any strides), in `dtype`. Returns (B, m, n) in `dtype`.

    Per step: A = X Xᵀ; B = b A + c A A; X = a X + B X — three batched GEMMs, exactly as
    torch.optim.Muon does them (addmm with beta/alpha folds the scalars into the GEMM).
    schedule.precondition "aol": the first step's A also rescales X and A (`aol_rescale`).
    """
    X = normalize(X, schedule).to(dtype)
    aol = schedule.precondition == "aol"
    for i, (a, b, c) in enumerate(schedule.coefficients):
        A = torch.bmm(X, X.mT)
        if aol and i == 0:
            X, A = aol_rescale(X, A, schedule)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        # each product is dropped as soon as nothing reads it: the workspace is X, A and B, then
        # X, B and the next X (on square matrices one stack fewer than holding all four)
        del A
        X = torch.baddbmm(X, B, X, beta=a)
        del B
    return X


run = newton_schulz_torch  # the backend's standard NS


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
    rescales X and the first R = X·Xᵀ (`aol_rescale`): the product is reused, as in
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
