"""Shared launcher helpers: interpreter detection, dtype mapping, batch chunks, output checks (the
shared tile code of the kernels is kernels/tiles.py)."""

from __future__ import annotations

import torch
import triton
from triton import knobs

# Kernels are decorated at import: the interpreter (TRITON_INTERPRET=1) is fixed for the process then.
INTERPRETED: bool = bool(knobs.runtime.interpret)

# grid axis 1 (the batch) is limited to 65535 programs by CUDA; longer stacks are launched in chunks.
MAX_GRID_Y = 65535

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 NS must be true fp32 ("ieee"), not TF32 (10-bit mantissa), to match
    torch's fp32 matmul; bf16/fp16 operands are exact in the MMA either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def check_compute_dtype(dtype: torch.dtype) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES} for the Triton kernels, got {dtype}")


def as_batched(X: torch.Tensor, name: str) -> torch.Tensor:
    """A (m, n) matrix as a (1, m, n) view (batch stride 0 in the kernel); (B, m, n) unchanged."""
    if X.ndim == 2:
        return X.unsqueeze(0)
    if X.ndim != 3:
        raise ValueError(f"{name} must be 2-D (m, n) or 3-D (B, m, n), got shape {tuple(X.shape)}")
    return X


def batch_stride(X: torch.Tensor) -> int:
    """Stride of the batch dim; 0 for a single matrix (so 2-D and 3-D share one kernel path)."""
    return 0 if X.shape[0] == 1 else X.stride(0)


def check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device, name: str = "out"):
    """Validate a caller-given output buffer, or allocate one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != torch.device(device):
        raise ValueError(
            f"{name} must have shape {tuple(shape)}, dtype {dtype} on {device}; "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out


def batch_chunks(B: int):
    """(start, stop) ranges of at most MAX_GRID_Y matrices: one launch each."""
    for start in range(0, B, MAX_GRID_Y):
        yield start, min(B, start + MAX_GRID_Y)
