"""`muon.newton_schulz`: approximate orthogonalization of a matrix or a batch of matrices."""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .backends.dispatch import ALGORITHMS, choose_ns_dtype
from .backends.op import COMPUTE_DTYPES
from .coefficients import DEFAULT_RESTARTS, Schedule, check_restarts, resolve_schedule


def resolve_dtype(dtype, device: torch.device, shape: tuple[int, int] | None = None) -> torch.dtype:
    """dtype="auto" for an m×n matrix (`shape`, or a stack of them): bf16 on CUDA (tensor-core GEMMs);
    on a CPU what `muon.backends.dispatch.choose_ns_dtype` reads from the measured CPU table, fp32
    without a shape or a measurement (bf16 GEMMs are slow on most CPUs). Other values pass through."""
    if isinstance(dtype, str) and dtype == "auto":
        if shape is None:
            return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return choose_ns_dtype(shape[0], shape[1], device)
    return dtype


def newton_schulz(
    G: Tensor,
    steps: int | None = 5,
    coefficients="keller",
    eps: float = 1e-7,
    *,
    dtype: torch.dtype | str = "auto",
    backend: str = "auto",
    algorithm: str = "standard",
    restarts=DEFAULT_RESTARTS,
    precondition: str | None = None,
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
        dtype: compute dtype: "auto" (default: bfloat16 on CUDA; on a CPU float32 unless the
            measured CPU table of muon.backends.dispatch says bf16 for this CPU and shape), torch.bfloat16,
            float16 or float32 (float64 for references).
        backend: "auto" (fastest available for G's device), "torch", "triton" or "cuda".
        algorithm: "standard" (three GEMMs per step on X), "gram" (Gram Newton–Schulz: the same
            polynomial iterated on the m×m Gram matrix X·Xᵀ, far fewer FLOPs when n ≫ m; torch and
            triton backends) or "auto" (Gram where muon.backends.dispatch.choose_algorithm says so).
        restarts: Gram NS only: 0-based steps before which X and X·Xᵀ are recomputed from the running
            product (default (2,): after two steps), what keeps Gram NS accurate in half precision.
        precondition: how X0 is formed: None (the preset's own: "frobenius" for the named presets),
            "frobenius" (X0 = G / (‖G‖_F + eps)) or "aol" (Turbo-Muon: the Frobenius start rescaled
            row by row from |X0·X0ᵀ|, the Gram product the first step forms anyway, so no extra
            matmul; its start is closer to orthogonal, so fewer steps reach the same quality). With
            "aol" a per-step preset shorter than `steps` takes its last `steps` tuples
            (`muon.coefficients.resolve_schedule`); `precondition="aol", steps=4` is Turbo-Muon's
            setting. Every backend but "cuda" has it; see docs/newton-schulz-quality.md for its error
            per FLOP against the float64 polar factor.

    Scale invariant: NS(s·G) equals NS(G) up to rounding for s across the fp32 range (in every
    compute dtype, fp16 included: the start is formed in fp32 before the cast), and a zero matrix
    maps to zero; a matrix with a NaN or inf entry comes out non-finite (its neighbours in a batch
    are unaffected). Tall inputs are transposed so the work runs on the small side.
    A CuPy array is accepted too (zero-copy through DLPack) and a CuPy array is returned.
    """
    if type(G).__module__.split(".")[0] == "cupy":
        import cupy

        result = newton_schulz(
            torch.from_dlpack(G), steps, coefficients, eps, dtype=dtype, backend=backend,
            algorithm=algorithm, restarts=restarts, precondition=precondition,
        )
        return cupy.from_dlpack(result)
    check_input(G)
    schedule = resolve_schedule(coefficients, steps, eps, precondition=precondition)
    return orthogonalize(
        G, schedule, dtype=dtype, backend=backend, out_dtype=G.dtype, algorithm=algorithm, restarts=restarts
    )


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
    algorithm: str = "standard",
    restarts=DEFAULT_RESTARTS,
) -> Tensor:
    """NS with a resolved schedule; the entry point the optimizer and the kernels' tests share.

    out_dtype=None returns the compute dtype (what the optimizer adds to parameters).
    algorithm/restarts: as in `newton_schulz`.
    """
    check_input(G)
    dtype = resolve_dtype(dtype, G.device, G.shape[-2:])
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    restarts = check_restarts(restarts)
    out_dtype = dtype if out_dtype is None else out_dtype
    *batch, m, n = G.shape
    if G.numel() == 0:
        return torch.zeros(G.shape, dtype=out_dtype, device=G.device)
    X = G.reshape(-1, m, n)
    # "auto" (backend and algorithm) is decided in one place, as for the optimizer's plan, on the
    # stack as NS sees it (tall matrices on their small side); the op transposes them itself
    probe = X.mT if m > n else X
    run = backends.resolve(backend, algorithm, probe, dtype, schedule.steps, restarts)
    return run(X, schedule, dtype).reshape(G.shape).to(out_dtype)
