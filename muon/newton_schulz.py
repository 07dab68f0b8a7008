"""`muon.newton_schulz`: approximate orthogonalization of a matrix or a batch of matrices."""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .coefficients import Schedule, resolve_schedule

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """dtype="auto": bf16 on CUDA (tensor-core GEMMs), fp32 elsewhere (bf16 GEMMs are slow on CPUs)."""
    if isinstance(dtype, str) and dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype


def newton_schulz(
    G: Tensor,
    steps: int | None = 5,
    coefficients="keller",
    eps: float = 1e-7,
    *,
    dtype: torch.dtype | str = "auto",
    backend: str = "auto",
) -> Tensor:
    """Orthogonalize G (m×n, or a batch (..., m, n) of independent matrices) by Newton–Schulz.

    Returns U·S'·Vᵀ with S' ≈ 1 (how close depends on the coefficients) in G's shape and dtype.

    Args:
        G: a floating tensor with at least 2 dims, any strides.
        steps: NS iterations; None takes the preset's own length.
        coefficients: a preset name ("keller", "you", "polar_express", "cans"), one (a, b, c) tuple
            repeated every step, or a list with one tuple per step.
        eps: added to the Frobenius norm of the (max-abs prescaled) input; presets with their own
            normalization (polar_express) use theirs.
        dtype: compute dtype: "auto" (default: bfloat16 on CUDA, float32 elsewhere), torch.bfloat16,
            float16 or float32 (float64 for references).
        backend: "auto" (fastest available for G's device), "torch", "triton" or "cuda".

    Scale invariant: NS(s·G) equals NS(G) up to rounding for s across the fp32 range, and a zero
    matrix maps to zero. Tall inputs are transposed so the work runs on the small side.
    A CuPy array is accepted too (zero-copy through DLPack) and a CuPy array is returned.
    """
    if type(G).__module__.split(".")[0] == "cupy":
        import cupy

        result = newton_schulz(torch.from_dlpack(G), steps, coefficients, eps, dtype=dtype, backend=backend)
        return cupy.from_dlpack(result)
    check_input(G)
    schedule = resolve_schedule(coefficients, steps, eps)
    return orthogonalize(G, schedule, dtype=dtype, backend=backend, out_dtype=G.dtype)


def check_input(G: Tensor, name: str = "G") -> None:
    if not isinstance(G, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(G).__name__}")
    if G.is_complex():
        raise TypeError(f"{name} is complex ({G.dtype}); Newton–Schulz here takes real floating tensors")
    if not G.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {G.dtype}")
    if G.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dims (a matrix or a batch of matrices), got shape {tuple(G.shape)}"
        )


def orthogonalize(
    G: Tensor,
    schedule: Schedule,
    *,
    dtype: torch.dtype | str = "auto",
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """NS with a resolved schedule; the entry point the optimizer and the kernels' tests share.

    out_dtype=None returns the compute dtype (what the optimizer adds to parameters).
    """
    check_input(G)
    dtype = resolve_dtype(dtype, G.device)
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
    out_dtype = dtype if out_dtype is None else out_dtype
    *batch, m, n = G.shape
    if G.numel() == 0:
        return torch.zeros(G.shape, dtype=out_dtype, device=G.device)
    X = G.reshape(-1, m, n)
    transposed = m > n
    if transposed:
        X = X.mT
    run = backends.select(backend, X)
    X = run(X, schedule, dtype)
    if transposed:
        X = X.mT
    return X.reshape(G.shape).to(out_dtype)
