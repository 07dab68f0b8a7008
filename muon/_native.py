"""Loads muon's CUDA extension `muon._C` without ever failing the import of muon.

`load()` returns the module or None; `load_error()` says why it is missing (not built, built for
another Python, broken). Importing `muon._C` does not touch the GPU (the CUDA runtime is linked
statically and initializes on the first call that needs it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

_state: dict[str, object] = {}


def load() -> ModuleType | None:
    if "module" not in _state:
        try:
            _state["module"] = importlib.import_module("muon._C")
            _state["error"] = None
        except ImportError as exc:  # not built (ModuleNotFoundError) or unloadable (missing symbol, ABI)
            _state["module"] = None
            missing = isinstance(exc, ModuleNotFoundError) and exc.name == "muon._C"
            _state["error"] = (
                "muon's CUDA extension muon._C is not built (the install found no nvcc, or "
                "MUON_SKIP_CUDA_BUILD=1 was set); reinstall with the CUDA toolkit on PATH "
                "(pip install --no-build-isolation --force-reinstall fused-muon) or pip install 'fused-muon[cupy]'"
                if missing
                else f"muon's CUDA extension muon._C failed to load ({exc}); "
                "rebuild it (pip install --force-reinstall fused-muon)"
            )
    return _state["module"]  # type: ignore[return-value]


def load_error() -> str | None:
    load()
    return _state["error"]  # type: ignore[return-value]
