"""Build script: installs muon/ and kernels/ (as muon.kernels), and builds the CUDA extension muon._C.

The extension is built through CMakeLists.txt when nvcc is found (PATH, $CUDACXX, $CUDA_HOME/bin or
/usr/local/cuda/bin). Without nvcc, or with MUON_SKIP_CUDA_BUILD=1, muon installs without it and says
so; backend="cuda" then explains what is missing (or runs through CuPy, if installed).
Environment: MUON_CUDA_ARCHS (default "80;90a"), MUON_BUILD_JOBS (parallel compile jobs).

The wheel follows what is built: without the extension it holds only Python (and the CUDA sources the
CuPy path compiles at run time) and is tagged py3-none-any; with it, for the platform and Python.
Building needs setuptools >= 77 (pyproject.toml's SPDX license) and wheel, which pip installs in its
isolated build environment; with --no-build-isolation install them first:
    pip install 'setuptools>=77' wheel pybind11 && pip wheel . --no-build-isolation --no-deps
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# Device sources the CuPy path compiles with NVRTC: shipped inside the package as muon/_csrc.
RTC_SOURCES = ("ns_index.h", "ns_device.cuh", "ns_sm80.cuh", "ns_rtc.cu")


def _check_setuptools() -> None:
    """setuptools < 77 stops on pyproject.toml's `license = "Apache-2.0"` with a schema error that does
    not say why; say it here (pip's isolated build installs what pyproject.toml requires)."""
    major = int(setuptools.__version__.split(".")[0])
    if major < 77:
        sys.exit(
            f"fused-muon needs setuptools >= 77 to build (found {setuptools.__version__}): pyproject.toml's license is "
            "an SPDX expression (PEP 639). Build with pip's isolation (pip install . / pip wheel .), or first "
            "pip install 'setuptools>=77' wheel pybind11 when passing --no-build-isolation."
        )


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def skip_cuda_reason() -> str | None:
    """Why the CUDA extension muon._C is not built (None: it is): decided once, so that the wheel's tag
    follows what it holds."""
    if os.environ.get("MUON_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "MUON_SKIP_CUDA_BUILD is set; installing without the CUDA extension muon._C"
    if find_nvcc() is None:
        return (
            "nvcc not found (PATH, CUDACXX, CUDA_HOME); installing without the CUDA extension muon._C. "
            "backend='cuda' will need CuPy (pip install 'fused-muon[cupy]') or a rebuild with nvcc."
        )
    if shutil.which("cmake") is None:
        return "cmake not found; installing without the CUDA extension muon._C (pip install cmake)"
    if importlib.util.find_spec("pybind11") is None:  # pip's isolated build installs it (pyproject.toml)
        return "pybind11 not installed (--no-build-isolation?); installing without the CUDA extension muon._C"
    return None


class BuildExt(build_ext):
    def run(self) -> None:
        if not self.extensions:
            return
        self.nvcc = find_nvcc()
        super().run()

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("MUON_CUDA_ARCHS", "80;90a")
        import pybind11

        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={self.nvcc}",
            f"-DMUON_CUDA_ARCHS={archs}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]
        jobs = os.environ.get("MUON_BUILD_JOBS", str(os.cpu_count() or 1))
        print(f"muon: building the CUDA extension for archs {archs} with {self.nvcc}")
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        dest = Path(self.build_lib) / "muon" / "_csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for name in RTC_SOURCES:
            shutil.copy2(ROOT / "csrc" / name, dest / name)


_check_setuptools()
SKIP_CUDA = skip_cuda_reason()
if SKIP_CUDA:
    print(f"muon: {SKIP_CUDA}")

setup(
    # every package under muon/ (found, not listed: a new subpackage cannot be left out of the wheel)
    packages=["muon", *(f"muon.{name}" for name in find_packages("muon")), "muon.kernels"],
    package_dir={"muon": "muon", "muon.kernels": "kernels"},
    # no extension: a pure-Python distribution, whose wheel is py3-none-any
    ext_modules=[] if SKIP_CUDA else [CMakeExtension("muon._C")],
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
