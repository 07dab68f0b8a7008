"""The kernels compile for Hopper (sm_90a) without a GPU, with no register spills in the bf16 configs.

The interpreter tests never run Triton's compiler; this does (TTIR -> PTX -> cubin with the ptxas in
the Triton wheel), so a kernel that only the interpreter accepts, or a config that spills, fails here.
Runs in a subprocess without TRITON_INTERPRET (the interpreter is fixed per process at import).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _resource_usage(*args: str) -> subprocess.CompletedProcess:
    """`python -m muon.kernels.resource_usage ARGS` compiled for sm_90a (not interpreted), or a skip
    when this Triton wheel carries no ptxas/cuobjdump."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bundled, tool)) for tool in ("ptxas", "cuobjdump")):
        pytest.skip("this Triton wheel carries no ptxas/cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the installed muon, from a directory outside the checkout (tests/test_no_shadow.py)
    run = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "muon.kernels.resource_usage", *args],
        env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_bf16_kernels_compile_for_sm90_without_spills():
    run = _resource_usage()
    rows = [line for line in run.stdout.splitlines() if line.startswith("bf16")]
    assert len(rows) >= 12, run.stdout
    for line in rows:
        assert int(re.search(r"spill_stack=\s*(\d+)B", line).group(1)) == 0, line
        assert int(re.search(r"smem=\s*(\d+)KB", line).group(1)) <= 227, line  # sm_90 per-block limit
    # the GEMM stages use Hopper's wgmma (the AOL rescale kernels and the momentum pass are elementwise)
    assert all(int(re.search(r"wgmma=(\d+)", line).group(1)) > 0 for line in rows
               if "ns_small" not in line and " aol " not in line and "lowp_momentum" not in line)
    assert sum("lowp_momentum" in line for line in rows) == 7, run.stdout
    # the fused kernel with AOL preconditioning and the AOL rescale kernels of the tiled drivers
    assert sum("aol" in line for line in rows if "ns_small" in line) == 4, run.stdout
    assert sum(line.split()[1] == "aol" for line in rows) == 4, run.stdout
    # the v2 persistent kernels: both stages, with tensor-descriptor (TMA) loads and with the pointer
    # fallback; TMA bulk copies appear exactly where descriptors are used
    persistent = [line for line in rows if "persistent" in line]
    assert {"persistent sym", "persistent apply"} <= {" ".join(line.split()[1:3]) for line in persistent}
    for line in persistent:
        tma = int(re.search(r"tma=(\d+)$", line).group(1))
        assert (tma > 0) == ("tma=True" in line), line


def test_persistent_kernels_compile_without_spills_in_every_dtype():
    """fp16 and fp32 plans of the v2 kernels too (fp32: FMA products, no wgmma, smaller tiles)."""
    run = _resource_usage("--only", "persistent", "--dtypes", "fp16,fp32")
    rows = [line for line in run.stdout.splitlines() if line.startswith(("fp16", "fp32"))]
    assert len(rows) == 16, run.stdout
    for line in rows:
        assert int(re.search(r"spill_stack=\s*(\d+)B", line).group(1)) == 0, line
        assert (int(re.search(r"tma=(\d+)$", line).group(1)) > 0) == ("tma=True" in line), line
        if line.startswith("fp16"):
            assert int(re.search(r"wgmma=(\d+)", line).group(1)) > 0, line
