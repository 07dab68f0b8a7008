"""Newton–Schulz through the three tiled kernels, for matrices too large for the fused path.

    X0 = normalize(G)                         kernels/normalize.py (3 small launches)
    per step:  A = gram(X)                    kernels/syrk.py, one triangle of tiles
               B = sym_poly(A, b, c)          kernels/syrk.py, one triangle, b·A in the epilogue
               X = poly_apply(B, X, a)        kernels/poly_apply.py, a·X in the epilogue

precondition="aol": after step 1's gram, kernels/aol.py rescales X and A in place from A's row sums
(3 elementwise launches, no product) before sym_poly and poly_apply.

3 launches per step and no host sync: the per-step coefficients are Python floats handed to the
launches as runtime arguments (no recompilation when they change), and nothing is read back.
Work per step: 3m²n + m³ FLOPs against the 4m²n + 2m³ of three full GEMMs (the symmetric stages do
half their tiles): a ceiling of 1.5× for square matrices.
"""

from __future__ import annotations

import torch

from .aol import aol_rescale_, check_precondition
from .normalize import normalize, ns_prologue
from .poly_apply import poly_apply
from .syrk import gram, sym_poly


def ns_gemm(
    G: torch.Tensor,
    coefficients,
    fro_scale: float,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    precondition: str = "frobenius",
) -> torch.Tensor:
    """NS of G ((m, n) or (B, m, n), m <= n, any strides/float dtype) in `dtype` by the tiled kernels.

    coefficients: one (a, b, c) per step; precondition "frobenius" or "aol" (muon.coefficients).
    Returns a new contiguous tensor or writes `out` (which must not alias G). Scratch: two X-sized
    buffers and two m×m buffers per matrix, allocated per call.
    """
    check_precondition(precondition)
    out, finished = ns_prologue("ns_gemm", G, coefficients, fro_scale, eps, dtype, out)
    if finished:
        return out
    m = G.shape[-2]
    steps = len(coefficients)
    gram_shape = (*G.shape[:-1], m)
    A = torch.empty(gram_shape, dtype=dtype, device=G.device)
    P = torch.empty(gram_shape, dtype=dtype, device=G.device)
    # ping-pong between two X buffers; the last step writes `out`
    X = normalize(G, fro_scale, eps, dtype)
    spare = torch.empty_like(X) if steps > 1 else None
    for i, (a, b, c) in enumerate(coefficients):
        gram(X, out=A)
        if i == 0 and precondition == "aol":
            aol_rescale_(X, A, fro_scale, eps)
        sym_poly(A, b, c, out=P)
        target = out if i == steps - 1 else spare
        poly_apply(P, X, a, out=target)
        X, spare = target, X
    return out

