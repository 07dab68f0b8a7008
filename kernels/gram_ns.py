"""Gram Newton–Schulz with symmetric Triton kernels (muon.backends.triton_backend.run_gram).

The algorithm is muon.backends.torch_backend.run_gram's (the reference these kernels are tested
against), stage for stage: R = X·Xᵀ, per step Z = b·R + c·R·R, Q = a·Q + Q·Z, R·Z and Z·(R·Z) —
every one a symmetric product (kernels/sym_matmul.py: one triangle of tiles, mirrored store, the
b·R / a·Q / a·R / a·RZ terms in the epilogue) — restarts X = Q·X, R = X·Xᵀ, and the final X = Q·X,
the only general GEMM. Batched over the (B, m, m) stack like standard NS.
"""

from __future__ import annotations

import torch

from .sym_matmul import matmul, sym_matmul


def gram_ns(G: torch.Tensor, coefficients, fro_scale: float, eps: float, dtype: torch.dtype,
            restarts=(2,), precondition: str = "frobenius") -> torch.Tensor:
    """Gram NS of a (B, m, n) stack with m <= n (any strides) in `dtype`; returns (B, m, n) in `dtype`.

    restarts: 0-based steps before which X = Q·X and R = X·Xᵀ are recomputed (0 and indices past the
    last step do nothing). Normalization is the torch reference's (scale-safe; one elementwise pass).
    precondition="aol": the first R = X·Xᵀ rescales X and itself (kernels/aol.py), no extra product.
    """
    from muon.backends.torch_backend import normalize
    from muon.coefficients import Schedule

    from .aol import aol_rescale_, check_precondition

    check_precondition(precondition)

    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bf16, fp16 or fp32 for the Triton kernels, got {dtype}")
    if G.ndim != 3 or G.shape[-2] > G.shape[-1]:
        raise ValueError(f"G must be a (B, m, n) stack with m <= n, got shape {tuple(G.shape)}")
    coefficients = tuple(tuple(float(v) for v in c) for c in coefficients)
    X = normalize(G, Schedule(coefficients, fro_scale, eps)).to(dtype)
    steps = len(coefficients)
    if steps == 0 or X.numel() == 0:
        return X
    cuts = {int(i) for i in restarts if 0 < int(i) < steps}
    R = sym_matmul(X, X.mT)
    if precondition == "aol":
        aol_rescale_(X, R, fro_scale, eps)
    Q = None
    for i, (a, b, c) in enumerate(coefficients):
        if i in cuts:
            X = matmul(Q, X)
            R = sym_matmul(X, X.mT)
            Q = None
        Z = sym_matmul(R, R, R, alpha=c, beta=b)
        if Q is None:
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)  # Q = Z + a·I on a segment's first step: no product
        else:
            Q = sym_matmul(Q, Z, Q, beta=a)
        if i + 1 < steps and i + 1 not in cuts:
            RZ = sym_matmul(R, Z, R, beta=a)
            R = sym_matmul(Z, RZ, RZ, beta=a)
    return matmul(Q, X)
