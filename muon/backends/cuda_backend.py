"""backend="cuda" (experimental): muon's CUDA C++ kernels (csrc/), through the extension muon._C or,
when it is not built, the same sources JIT-compiled by CuPy (muon/cupy_path.py).

Never chosen by backend="auto" (muon/backends/dispatch.py): measured on an H100 (commit 899c9f9,
bench/results/h100-899c9f9/kernels.csv) it is slower than the torch backend from 2048 up — 1×2048²
0.95 vs 0.63 ms, 1×4096² 4.32 vs 3.52, 1×8192² 32.0 vs 26.6, 16×2048² 10.4 vs 8.2, 1×4096×16384
14.8 vs 11.1 — and faster only on small batched matrices (64×128² 0.38 vs 0.47 ms), where the fused
Triton kernel is faster again (0.042 ms).

Computes in bf16 with fp32 accumulation (the tensor-core format); normalization, every NS step and
the final store are enqueued on torch's current stream by one C++ call, without host syncs, so the
call can be captured in a CUDA graph. Importing this module never touches the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from ..coefficients import Schedule

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def _cupy_reason(X: Tensor) -> str | None:
    from .. import cupy_path

    return cupy_path.unavailable_reason(X)


def unavailable_reason(X: Tensor) -> str | None:
    if X.device.type != "cuda":
        return (
            f"backend='cuda' runs on CUDA tensors, got a tensor on {X.device.type!r} (no GPU for it): "
            "move it with .cuda() or use backend='torch'"
        )
    ext = _native.load()
    if ext is None:
        cupy_reason = _cupy_reason(X)
        if cupy_reason is None:
            return None
        return f"backend='cuda' cannot run: {_native.load_error()}; {cupy_reason}"
    with torch.cuda.device(X.device):
        path = ext.device_path(-1)
    if isinstance(path, str):
        return f"backend='cuda' cannot run on {X.device}: {path}"
    return None


def run(X: Tensor, schedule: Schedule, dtype: torch.dtype) -> Tensor:
    """NS of a (B, m, n) CUDA stack (m <= n, any strides, any float dtype); returns bf16 (B, m, n)."""
    if dtype != torch.bfloat16:
        raise ValueError(
            f"dtype={dtype} is not supported by backend='cuda', which computes in torch.bfloat16 "
            "(bf16 tensor cores, fp32 accumulation); pass dtype=torch.bfloat16 or use backend='triton'/'torch'"
        )
    if schedule.precondition != "frobenius":
        raise ValueError(
            f"precondition={schedule.precondition!r} is not supported by backend='cuda' (its kernels form the "
            "Frobenius start only); use backend='triton' or 'torch', which have it"
        )
    if X.dtype not in _DTYPE_CODES:
        X = X.float()
    ext = _native.load()
    if ext is None:
        from .. import cupy_path

        return cupy_path.run(X, schedule)
    B, m, n = X.shape
    out = torch.empty((B, m, n), dtype=torch.bfloat16, device=X.device)
    # One workspace per call from torch's caching allocator (stream-ordered, graph-safe): two bf16
    # copies of X, A and B, and the normalization partials; the C++ side allocates nothing.
    workspace = torch.empty(ext.workspace_bytes(B, m, n), dtype=torch.uint8, device=X.device)
    coeffs = [float(v) for step in schedule.coefficients for v in step]
    with torch.cuda.device(X.device):
        ext.newton_schulz(
            X.data_ptr(), _DTYPE_CODES[X.dtype], B, m, n, tuple(X.stride()), out.data_ptr(), tuple(out.stride()),
            coeffs, float(schedule.fro_scale), float(schedule.eps), workspace.data_ptr(), workspace.numel(),
            torch.cuda.current_stream(X.device).cuda_stream,
        )
    return out
