"""Test setup: CPU is always a test device; Triton kernels run in its interpreter when there is no GPU.

Nothing here touches CUDA at import or collection time (torch.cuda.is_available() asks NVML only).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The repository root goes after the installed packages (bench/__init__.py, `put_root_last`):
# `python -m pytest` puts it first, where the top-level kernels/ folder would shadow an installed
# distribution named `kernels` (Hugging Face's, imported by transformers). `bench` is found there.
sys.path.append(str(Path(__file__).resolve().parents[1]))
import pytest  # noqa: E402
import torch  # noqa: E402

import bench  # noqa: E402,F401  (importing it puts the root last)

HAS_CUDA = torch.cuda.is_available()
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one pytest-xdist worker per core (make test): no oversubscription
if not HAS_CUDA:
    # Kernels are decorated at import time: the interpreter must be chosen before muon.kernels loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_bf16_dot() -> None:
    """Test-only shim for triton-lang/triton#11584: the interpreter's tl.dot multiplies the raw uint16
    bit patterns of bf16 operands. Upcast bf16 operands to fp32 (exact) before the matmul; the
    accumulator is fp32 either way, so this is what the GPU's bf16 MMA computes."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    import numpy as np
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_muon_bf16_shim", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def up(t):
                if t.dtype.scalar != tl.bfloat16:
                    return t
                bits = t.data.astype(np.uint32) << np.uint32(16)
                return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
            a, b = up(a), up(b)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._muon_bf16_shim = True
    builder.create_dot = create_dot


def _patch_interpreter_bf16_rounding() -> None:
    """Test-only shim: Triton's interpreter converts fp32 -> bf16 by truncation (round toward zero;
    subnormals mangled), where the GPU's `.to(tl.bfloat16)` rounds to nearest even (cvt.rn.bf16.f32).
    Truncation doubles the kernels' bf16 error in the interpreter only; round like the GPU does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "_muon_rtne_shim", False):
        return
    cast_impl, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp
    rtne = interpreter._ir.ROUNDING_MODE.RTNE

    def to_bf16(src):
        f = src.data.astype(np.float32)
        bits = f.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x40)
        return interpreter.TensorHandle(np.where(np.isnan(f), quiet_nan, rounded).astype(np.uint16), tl.bfloat16)

    def patched_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bf16(src)
        return cast_impl(self, src, dst_type)

    def patched_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16 and rounding_mode in (None, rtne):
            return to_bf16(src)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    patched_cast._muon_rtne_shim = True
    builder.cast_impl = patched_cast
    builder.create_fp_to_fp = patched_fp_to_fp


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        _patch_interpreter_bf16_dot()
        _patch_interpreter_bf16_rounding()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
