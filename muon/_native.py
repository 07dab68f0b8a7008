"""Loads muon's CUDA extension `muon._C` without ever failing the import of muon.

`load()` returns the module or None; `load_error()` says why it is missing (not built, built for
another Python, broken). The answer is kept in `muon.backends.registry.REGISTRY.native` (the process's
state). Importing `muon._C` does not touch the GPU (the CUDA runtime is linked statically and
initializes on the first call that needs it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .backends.registry import REGISTRY


def load() -> ModuleType | None:
    state = REGISTRY.native
    if "module" not in state:
        try:
            state["module"] = importlib.import_module("muon._C")
            state["error"] = None
        except ImportError as exc:  # not built (ModuleNotFoundError) or unloadable (missing symbol, ABI)
            state["module"] = None
            missing = isinstance(exc, ModuleNotFoundError) and exc.name == "muon._C"
            state["error"] = (
                "muon's CUDA extension muon._C is not built (the install found no nvcc, or "
                "MUON_SKIP_CUDA_BUILD=1 was set); reinstall with the CUDA toolkit on PATH "
                "(pip install --no-build-isolation --force-reinstall fused-muon) or pip install 'fused-muon[cupy]'"
                if missing
                else f"muon's CUDA extension muon._C failed to load ({exc}); "
                "rebuild it (pip install --force-reinstall fused-muon)"
            )
    return state["module"]  # type: ignore[return-value]


def load_error() -> str | None:
    load()
    return REGISTRY.native["error"]  # type: ignore[return-value]
