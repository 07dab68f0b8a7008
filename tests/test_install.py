"""Packaging: a built wheel installs everything under the `muon` import name."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_layout(tmp_path):
    env = dict(os.environ, MUON_SKIP_CUDA_BUILD="1")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("muon-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert "muon/kernels/__init__.py" in names and "muon/__init__.py" in names
    assert "muon/backends/torch_ref.py" in names
    assert "muon/distributed/__init__.py" in names and "muon/distributed/execute.py" in names
    # kernels/ must never become a top-level `kernels` module (PyPI's kernels is another package).
    assert top_level <= {"muon"} | {n for n in top_level if n.endswith((".dist-info", ".data"))}, top_level
