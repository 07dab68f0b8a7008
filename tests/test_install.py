"""Packaging: a built wheel is the `fused-muon` distribution and installs everything under the `muon` import name."""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import docblocks

import muon

ROOT = Path(__file__).resolve().parent.parent
# PyPI's `muon` (scverse) and `muon-optimizer` (Keller Jordan) are other projects with the same import name.
DISTRIBUTION = "fused-muon"


def test_wheel_layout(tmp_path):
    env = dict(os.environ, MUON_SKIP_CUDA_BUILD="1")
    # built from a copy of the sources: a checkout's build/ directory (setuptools reuses build/lib)
    # would hide a package the build leaves out
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                "*.so", "results", ".pytest_cache"))  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("*.whl")
    # the wheel's file name and metadata carry the distribution name and muon.__version__
    assert wheel.name.startswith(f"fused_muon-{muon.__version__}-"), wheel.name
    # no extension built (MUON_SKIP_CUDA_BUILD=1): a pure-Python wheel, installable on any platform
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert not [n for n in names if n.endswith((".so", ".pyd"))], names
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = email.message_from_bytes(archive.read(metadata))
    assert (meta["Name"], meta["Version"]) == (DISTRIBUTION, muon.__version__)
    top_level = {n.split("/")[0] for n in names}
    assert "muon/kernels/__init__.py" in names and "muon/__init__.py" in names
    assert "muon/backends/torch_backend.py" in names
    assert "muon/distributed/__init__.py" in names and "muon/distributed/replicated.py" in names
    # every package of the source tree is in the wheel (muon.engine once was not)
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "muon").rglob("__init__.py")}
    missing = {f"{p}/__init__.py" for p in packages} - set(names)
    assert not missing, f"packages left out of the wheel: {sorted(missing)}"
    # kernels/ must never become a top-level `kernels` module (PyPI's kernels is another package).
    assert top_level <= {"muon"} | {n for n in top_level if n.endswith((".dist-info", ".data"))}, top_level
    # the README's quick start runs on the wheel's files alone (not on this checkout)
    site = tmp_path / "site"
    archive.extractall(site)
    quick_start = docblocks.block("README.md", "Quick start")
    script = (
        "import muon, pathlib, sys\n"
        f"assert pathlib.Path(muon.__file__).is_relative_to({str(site)!r}), muon.__file__\n"
        + quick_start.code
    )
    out = subprocess.run([sys.executable, "-c", script], env=dict(env, PYTHONPATH=str(site)), cwd=tmp_path,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"loss \d", out.stdout), out.stdout


def test_changelog_records_this_version():
    """CHANGELOG.md has a section for muon.__version__, and the README says how to install the distribution."""
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(muon.__version__)}\b", changelog, re.M), "no CHANGELOG section for this version"
    head = (ROOT / "README.md").read_text()[:1500]
    assert f"pip install {DISTRIBUTION}" in head and "muon-optimizer" in head and "scverse" in head
