"""The CUDA extension without a GPU: it was built where nvcc exists, imports, reports its build, and
backend="cuda" fails with an error that names the cause and the fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import muon
from muon import _native
from muon.backends import BackendUnavailable, cuda_backend
from muon.backends.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_BUILD = os.environ.get("MUON_SKIP_CUDA_BUILD", "0") not in ("", "0")


def nvcc_present() -> bool:
    """setup.py's rule (find_nvcc) for "the install can build the extension"."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    has_cmake = shutil.which("cmake") is not None
    return has_cmake and any(c and Path(c).is_file() and os.access(c, os.X_OK) for c in candidates)


needs_ext = pytest.mark.skipif(_native.load() is None, reason="muon._C is not built here")


def test_extension_built_wherever_nvcc_is():
    if SKIPPED_BUILD or not nvcc_present():
        pytest.skip("no nvcc here (or MUON_SKIP_CUDA_BUILD=1): the install skips the extension by design")
    assert _native.load() is not None, f"nvcc is installed but muon._C is missing: {_native.load_error()}"


@needs_ext
def test_extension_reports_its_build():
    ext = _native.load()
    archs = ext.built_archs().split(",")
    assert archs == os.environ.get("MUON_CUDA_ARCHS", "80;90a").split(";")
    assert ext.built_sm90() == ("90a" in archs)
    assert ext.DTYPE_CODES == {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}


def test_import_does_not_initialize_cuda():
    code = ("import torch, muon, muon._native as n; n.load(); import muon.backends.cuda_backend; "
            "print(torch.cuda.is_initialized())")
    # the installed muon, from a directory outside the checkout (tests/test_no_shadow.py)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                         check=True)
    assert res.stdout.strip() == "False"


def test_cuda_backend_on_cpu_tensor_names_cause_and_fix():
    with pytest.raises(BackendUnavailable, match=r"backend='cuda' runs on CUDA tensors.*'cpu'.*\.cuda\(\)"):
        muon.newton_schulz(torch.randn(8, 16), backend="cuda")


def test_muon_optimizer_backend_cuda_on_cpu_raises():
    p = torch.nn.Parameter(torch.randn(8, 16))
    # at construction, before any state: a ValueError that is also a BackendUnavailable
    with pytest.raises(ValueError, match=r"param_groups\[0\].*backend='cuda'"):
        muon.Muon([p], backend="cuda")
    with pytest.raises(BackendUnavailable, match="backend='cuda'"):
        muon.Muon([p], backend="cuda")


@needs_ext
def test_no_gpu_reason_names_it():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    reason = _native.load().device_path(-1)
    assert isinstance(reason, str) and "no CUDA GPU" in reason and "backend='torch'" in reason


def test_missing_extension_message(monkeypatch):
    monkeypatch.setattr(REGISTRY, "native", {})

    def fail(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(_native.importlib, "import_module", fail)
    assert _native.load() is None
    msg = _native.load_error()
    assert "muon._C is not built" in msg and "nvcc" in msg and "fused-muon[cupy]" in msg
    monkeypatch.setattr(REGISTRY, "native", {})
    monkeypatch.setattr(_native.importlib, "import_module",
                        lambda name: (_ for _ in ()).throw(ImportError("undefined symbol: cudaFoo")))
    assert _native.load() is None and "failed to load (undefined symbol: cudaFoo)" in _native.load_error()
    monkeypatch.setattr(REGISTRY, "native", {})


def test_non_bf16_compute_dtype_is_rejected():
    from muon.coefficients import resolve_schedule

    with pytest.raises(ValueError, match=r"dtype=torch.float32 .*backend='cuda'.*bfloat16"):
        cuda_backend.run(torch.randn(1, 4, 8), resolve_schedule("keller", 5, 1e-7), torch.float32)


@needs_ext
def test_bad_arguments_raise_value_errors():
    ext = _native.load()
    args = dict(inp=1, in_dtype=0, batch=1, m=8, n=4, in_strides=(32, 4, 1), out=1, out_strides=(32, 4, 1),
                coeffs=[1.0, 0.0, 0.0], fro_scale=1.0, eps=1e-7, workspace=1, workspace_size=1 << 20, stream=0)
    with pytest.raises(ValueError, match="m must be <= n"):
        ext.newton_schulz(**args)
    with pytest.raises(ValueError, match="workspace must hold"):
        ext.newton_schulz(**{**args, "m": 4, "n": 8, "workspace_size": 16})
    with pytest.raises(ValueError, match=r"\(a, b, c\) per step"):
        ext.newton_schulz(**{**args, "m": 4, "n": 8, "coeffs": [1.0, 2.0]})
