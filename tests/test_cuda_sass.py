"""The built module's machine code, read with cuobjdump (no GPU needed): the sm_90a kernels issue
HGMMA (wgmma) and TMA loads, the sm_80 kernels HMMA, and no main kernel spills registers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from muon import _native

ext = _native.load()
pytestmark = pytest.mark.skipif(ext is None, reason="muon._C is not built here")

MAIN_KERNELS = ("sm8011syrk_kernel", "sm8011gemm_kernel", "sm9012wgmma_kernel")


def find_cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump, else the one Triton's wheel ships."""
    found = shutil.which("cuobjdump")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and home and (Path(home) / "bin" / "cuobjdump").exists():
            found = str(Path(home) / "bin" / "cuobjdump")
    if not found:
        try:
            import triton
        except ImportError:
            return None
        candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        found = str(candidate) if candidate.exists() else None
    return found


@pytest.fixture(scope="module")
def cuobjdump() -> str:
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's wheel) on this machine")
    return tool


def sass_by_arch(tool: str) -> dict[str, dict[str, str]]:
    """{arch: {mangled kernel name: SASS text}} of muon._C."""
    text = subprocess.run([tool, "-sass", ext.__file__], capture_output=True, text=True, check=True).stdout
    out: dict[str, dict[str, str]] = {}
    arch, name = None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch, name = m.group(1), None
            out.setdefault(arch, {})
        elif m := re.match(r"\s*Function : (\S+)", line):
            name = m.group(1)
            out[arch][name] = ""
        elif name is not None:
            out[arch][name] += line + "\n"
    return out


def test_sm90a_kernels_use_hgmma_and_tma(cuobjdump):
    if not ext.built_sm90():
        pytest.skip("built without 90a")
    sass = sass_by_arch(cuobjdump)
    wgmma = {k: v for k, v in sass.get("sm_90a", {}).items() if "wgmma_kernel" in k}
    assert len(wgmma) == 2, f"expected the Gram and B·X wgmma kernels in sm_90a, found {sorted(wgmma)}"
    for name, code in wgmma.items():
        assert re.search(r"\bHGMMA\.64x(128|256)x16\.F32\.BF16\b", code), f"{name}: no bf16 HGMMA in its SASS"
        assert "UTMALDG" in code, f"{name}: no TMA load (UTMALDG) in its SASS"
        assert "HMMA" not in code.replace("HGMMA", ""), f"{name}: falls back to mma.sync"


def test_sm80_kernels_use_hmma(cuobjdump):
    sass = sass_by_arch(cuobjdump)
    arch = "sm_80" if "sm_80" in sass else None
    if arch is None:
        pytest.skip("built without sm_80")
    for kernel in ("syrk_kernel", "gemm_kernel"):
        (code,) = [v for k, v in sass[arch].items() if kernel in k]
        assert re.search(r"\bHMMA\.16816\.F32\.BF16\b", code), f"{kernel}: no bf16 HMMA.16816"
        assert "LDSM" in code, f"{kernel}: no ldmatrix"


def test_main_kernels_do_not_spill(cuobjdump):
    text = subprocess.run([cuobjdump, "-res-usage", ext.__file__], capture_output=True, text=True, check=True).stdout
    usage = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    main = [(name, int(reg), int(stack), int(local)) for name, reg, stack, local in usage
            if any(k in name for k in MAIN_KERNELS)]
    assert len(main) >= 2, f"main kernels not found in the resource report:\n{text[:2000]}"
    for name, reg, stack, local in main:
        assert stack == 0 and local == 0, f"{name} spills: REG {reg}, STACK {stack} B, LOCAL {local} B"
