"""The CuPy path of backend="cuda": the extension's own device sources (csrc/ns_rtc.cu and the
headers it includes), JIT-compiled by NVRTC through cupy.RawModule, driven from Python.

Used when the extension `muon._C` is not built. It runs the normalization and the mma.sync GEMMs
(every GPU from sm_80 on, Hopper included); the wgmma/TMA kernels need tensor maps encoded by a
driver call and stay extension-only. Kernels take raw device pointers, so torch tensors are passed
without copies; CuPy arrays reach here through `muon.newton_schulz`'s zero-copy DLPack conversion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .backends.registry import REGISTRY
from .coefficients import Schedule

# Installed packages carry the sources in muon/_csrc (setup.py's build_py); a checkout has csrc/.
_HERE = Path(__file__).resolve().parent
SOURCE_DIR = _HERE / "_csrc" if (_HERE / "_csrc" / "ns_rtc.cu").exists() else _HERE.parent / "csrc"

# Mirrors of the constants in csrc/ (ns_device.cuh NORM_THREADS, ns_sm80.cuh tile and smem sizes);
# tests/test_cuda_index.py checks them against the built extension where it exists.
NORM_THREADS = 256
SM80_BM = SM80_BN = 128
SM80_THREADS = 128
SM80_SMEM_BYTES = max(4 * (128 * 32 + 128 * 32) * 2, 128 * 129 * 4)
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


def unavailable_reason(X: Tensor) -> str | None:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed either (pip install 'fused-muon[cupy]' compiles the kernels at run time)"
    if not (SOURCE_DIR / "ns_rtc.cu").exists():
        return f"the CUDA sources for the CuPy path are missing ({SOURCE_DIR}); reinstall fused-muon"
    major, minor = torch.cuda.get_device_capability(X.device)
    if major < 8:
        return (
            f"muon's CUDA kernels need bf16 tensor cores (compute capability >= 8.0); this GPU is sm_{major}{minor}; "
            "use backend='triton' or backend='torch'"
        )
    return None


def _module(device_index: int):
    """The compiled CuPy module of the CUDA sources on a device (kept in REGISTRY.native)."""
    key = ("cupy", device_index)
    module = REGISTRY.native.get(key)
    if module is None:
        import cupy

        with cupy.cuda.Device(device_index):
            code = (SOURCE_DIR / "ns_rtc.cu").read_text()
            module = REGISTRY.native[key] = cupy.RawModule(code=code, options=("-std=c++17", f"-I{SOURCE_DIR}"),
                                                           backend="nvrtc")
    return module


def _function(device_index: int, name: str, smem: int = 0):
    fn = _module(device_index).get_function(name)
    if smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = smem
    return fn


def norm_parts(m: int, n: int) -> int:
    """Blocks per matrix of the normalization passes (csrc/ns_driver.cu norm_parts)."""
    return max(1, min(256, -(-m * n // (NORM_THREADS * 16))))


def _ptr(t: Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def run(X: Tensor, schedule: Schedule) -> Tensor:
    """Normalize and run every NS step on X ((B, m, n) CUDA tensor, m <= n, any strides and float
    dtype) on torch's current stream; returns a bf16 (B, m, n) tensor. Same steps as the C++ driver."""
    import cupy

    if X.dtype not in _DTYPES:
        X = X.float()
    B, m, n = X.shape
    dev = X.device.index if X.device.index is not None else torch.cuda.current_device()
    out = torch.empty((B, m, n), dtype=torch.bfloat16, device=X.device)
    ldn, ldm = -(-n // 8) * 8, -(-m // 8) * 8  # rows 16-B aligned for cp.async
    xs = torch.empty((2, B, m, ldn), dtype=torch.bfloat16, device=X.device)
    ab = torch.empty((2, B, m, ldm), dtype=torch.bfloat16, device=X.device)
    parts = norm_parts(m, n)
    partials = torch.empty((2, B, parts), dtype=torch.float64, device=X.device)
    i64, i32, f32 = np.int64, np.int32, np.float32
    steps = schedule.steps

    with cupy.cuda.Device(dev), cupy.cuda.ExternalStream(torch.cuda.current_stream(X.device).cuda_stream):
        dst = out if steps == 0 else xs[0]
        ds = dst.stride()
        norm_args = (
            _ptr(X), *(i64(s) for s in X.stride()), _ptr(dst), i64(ds[0]), i64(ds[1]), i64(ds[2]), i64(m), i64(n),
            i32(parts), _ptr(partials[0]), _ptr(partials[1]), f32(schedule.fro_scale), f32(schedule.eps),
        )
        name = _DTYPES[X.dtype]
        for stage in ("amax", "sumsq", "apply"):
            _function(dev, f"muon_norm_{stage}_{name}")((B * parts,), (NORM_THREADS,), norm_args)

        syrk = _function(dev, "muon_syrk", SM80_SMEM_BYTES)
        gemm = _function(dev, "muon_gemm", SM80_SMEM_BYTES)
        tm, tn = -(-m // SM80_BM), -(-n // SM80_BN)
        tri = tm * (tm + 1) // 2
        A, Bm = ab[0], ab[1]
        for s, (a, b, c) in enumerate(schedule.coefficients):
            cur, nxt = xs[s % 2], (out if s == steps - 1 else xs[(s + 1) % 2])
            # A = X·Xᵀ;  B = b·A + c·A·A;  X' = a·X + B·X (the C++ driver's three launches)
            syrk((B * tri,), (SM80_THREADS,), (
                _ptr(cur), i64(m * ldn), i64(ldn), i32(m), i32(n), i64(tri),
                _ptr(None), i64(0), i64(0), _ptr(A), i64(m * ldm), i64(ldm), i64(1), f32(1.0), f32(0.0),
            ), shared_mem=SM80_SMEM_BYTES)
            syrk((B * tri,), (SM80_THREADS,), (
                _ptr(A), i64(m * ldm), i64(ldm), i32(m), i32(m), i64(tri),
                _ptr(A), i64(m * ldm), i64(ldm), _ptr(Bm), i64(m * ldm), i64(ldm), i64(1), f32(c), f32(b),
            ), shared_mem=SM80_SMEM_BYTES)
            os_ = nxt.stride()
            gemm((B * tm * tn,), (SM80_THREADS,), (
                _ptr(Bm), i64(m * ldm), i64(ldm), _ptr(cur), i64(m * ldn), i64(ldn), i32(m), i32(n),
                i64(tn), i64(tm * tn), _ptr(cur), i64(m * ldn), i64(ldn), _ptr(nxt), i64(os_[0]), i64(os_[1]),
                i64(os_[2]), f32(1.0), f32(a),
            ), shared_mem=SM80_SMEM_BYTES)
    return out
