"""The Triton backend: fused Newton–Schulz kernels from kernels/ (installed as muon.kernels).

Triton is imported on first use only, so `import muon` works without it. CUDA tensors run the compiled
kernels; CPU tensors run them in Triton's interpreter when TRITON_INTERPRET=1 was set before the
kernels were first imported (how CI tests them; far too slow for real work).

`run` chooses per shape between the fused small-matrix path (m <= 128: every step of a matrix in one
program, the whole batch in one launch) and the tiled GEMM path (3 launches per step) — kernel
version v1, the one measured on an H100 (kernels/NOTES.md). path="persistent" runs the v2 persistent
TMA kernels (kernels/persistent.py), unmeasured so far and therefore only when asked for.

On CUDA, calls whose GPU work is small (launch-bound, below GRAPH_MAX_FLOPS) replay a cached CUDA
graph of the whole sequence (muon/backends/graphs.py; the cache is REGISTRY.graphs): one launch of
host cost instead of 3 + 3·steps.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch
from torch import Tensor

from ..coefficients import Schedule

Path = Literal["auto", "small", "gemm", "persistent"]
PATHS = ("auto", "small", "gemm", "persistent")
KERNEL_VERSIONS = {"auto": "triton-v1", "small": "triton-v1", "gemm": "triton-v1", "persistent": "triton-v2"}


def kernel_version(path: str) -> str:
    """The kernel version a path runs (what bench rows and the dispatch table record)."""
    if path == "persistent" and os.environ.get("MUON_TRITON_WARP_SPECIALIZE", "0") == "1":
        return "triton-v2-ws"
    return KERNEL_VERSIONS[path]
# Replay a CUDA graph for calls below this many NS matmul FLOPs (about 0.3 ms of H100 bf16 work):
# there the ~3 + 3·steps Python launches dominate; above it the copies in and out of the graph's static
# buffers would cost more than the launches they save.
GRAPH_MAX_FLOPS = 1e11
USE_GRAPHS = True

_INSTALL = "pip install triton (or pip install 'fused-muon[triton]')"


def _env_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(X: Tensor) -> str | None:
    """None when the Triton kernels can run on X, else why not and how to fix it."""
    if importlib.util.find_spec("triton") is None:
        return f"backend='triton' needs Triton, which is not installed: {_INSTALL}"
    device = X.device.type
    if device == "cuda":
        return None
    if device != "cpu":
        return f"backend='triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a {device} tensor"
    if not _env_interpreting():
        return (
            "backend='triton' got a CPU tensor: move it to a CUDA GPU, or set TRITON_INTERPRET=1 in the "
            "environment before muon.kernels is imported to run the kernels in Triton's CPU interpreter (slow)"
        )
    # Triton picks the interpreter when a kernel is defined: muon.kernels, imported now if it was not
    # before, says whether it was imported with TRITON_INTERPRET=1 set
    from muon import kernels

    if not kernels.INTERPRETED:
        return (
            "backend='triton' got a CPU tensor, but muon.kernels was imported before TRITON_INTERPRET=1 was set "
            "(Triton picks the interpreter when a kernel is defined): set it before the first import"
        )
    return None


def use_small_path(batch: int, m: int, n: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """The fused path for a small side up to 128 (64 in fp32) unless one matrix is so long that a single program per
    matrix leaves the GPU idle (few matrices, n large): then the tiled kernels' parallelism wins.
    Thresholds are a first guess (GPU timings unmeasured so far): tune with `python -m bench kernels`."""
    from muon.kernels import max_small_side

    if m > max_small_side(dtype):
        return False
    return n <= 4096 or batch * n >= 64 * 4096


def use_graph(X: Tensor, schedule: Schedule, graphs: bool | None) -> bool:
    """Whether this call replays a CUDA graph: asked for (graphs=True) or, by default, when the call is
    launch-bound (below GRAPH_MAX_FLOPS) — and only where graphs can run (graphs.unusable_reason)."""
    from . import graphs as _graphs

    if graphs is False or (graphs is None and not USE_GRAPHS):
        return False
    if _graphs.unusable_reason(X) is not None:
        return False
    if graphs:
        return True
    B, m, n = X.shape
    return B * len(schedule.coefficients) * (4 * m * m * n + 2 * m**3) < GRAPH_MAX_FLOPS


def run(
    X: Tensor, schedule: Schedule, dtype: torch.dtype, *, path: Path = "auto", graphs: bool | None = None
) -> Tensor:
    """NS of a (B, m, n) stack (m <= n, any strides/float dtype) in `dtype`; returns (B, m, n) in dtype.

    path: "auto" (v1 by shape), "small" (fused, m <= 128), "gemm" (tiled v1 kernels) or "persistent"
    (v2 persistent/TMA kernels); float64, the reference precision, has no kernels and runs the torch
    reference on the same device. schedule.precondition "aol" runs in every path (kernels/aol.py; the
    fused path in registers). graphs: replay a cached CUDA graph (True), never (False), or when the
    call is launch-bound (None); ignored off CUDA, under an outer capture and under torch.compile.
    """
    if dtype == torch.float64:
        from .torch_backend import newton_schulz_torch

        return newton_schulz_torch(X, schedule, dtype)
    from muon import kernels

    B, m, n = X.shape
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "persistent":
        fn = kernels.ns_persistent
    else:
        small = use_small_path(B, m, n, dtype) if path == "auto" else path == "small"
        fn = kernels.ns_small if small else kernels.ns_gemm
    call = lambda X: fn(X, schedule.coefficients, schedule.fro_scale, schedule.eps, dtype,
                        precondition=schedule.precondition)
    if use_graph(X, schedule, graphs):
        from .graphs import graph_key
        from .registry import REGISTRY

        return REGISTRY.graphs.run(graph_key(X, schedule, dtype, fn.__name__), X, call)
    return call(X)


def run_gram(X: Tensor, schedule: Schedule, dtype: torch.dtype, restarts=(2,)) -> Tensor:
    """Gram NS of a (B, m, n) stack (m <= n) in `dtype` with the symmetric kernels of
    kernels/gram_ns.py; float64 runs the torch reference (muon.backends.torch_backend.run_gram)."""
    if dtype == torch.float64:
        from .torch_backend import run_gram as reference

        return reference(X, schedule, dtype, restarts)
    from muon.kernels.gram_ns import gram_ns

    return gram_ns(X, schedule.coefficients, schedule.fro_scale, schedule.eps, dtype, restarts,
                   precondition=schedule.precondition)
