"""The pure-PyTorch Newton–Schulz backend: runs on every device and is the reference for the kernels.

Run with `dtype=torch.float64` it is the float64 reference the tests compare every backend against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..coefficients import Schedule


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


def newton_schulz_torch(X: Tensor, schedule: Schedule, dtype: torch.dtype) -> Tensor:
    """NS on a (B, m, n) stack with m <= n (any strides), in `dtype`. Returns (B, m, n) in `dtype`.

    Per step: A = X Xᵀ; B = b A + c A A; X = a X + B X — three batched GEMMs, exactly as
    torch.optim.Muon does them (addmm with beta/alpha folds the scalars into the GEMM).
    """
    X = normalize(X, schedule).to(dtype)
    for a, b, c in schedule.coefficients:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X
