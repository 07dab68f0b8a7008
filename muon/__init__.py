"""muon: the Muon optimizer for PyTorch, with fused Triton and CUDA Newton–Schulz kernels.

Importing muon never initializes CUDA and never needs Triton or the native extension; the backend
that needs them says what to install when it is asked for.
"""

from __future__ import annotations

from pathlib import Path as _Path

from . import coefficients, mup
from .backends import BackendUnavailable
from .coefficients import PRESETS
from .newton_schulz import newton_schulz
from .optim import Muon, update_scale
from .param_groups import format_routing, param_groups, param_routing
from .qk_clip import QKClip, qk_clip_

__all__ = [
    "BackendUnavailable",
    "Muon",
    "PRESETS",
    "QKClip",
    "coefficients",
    "format_routing",
    "mup",
    "newton_schulz",
    "param_groups",
    "param_routing",
    "qk_clip_",
    "update_scale",
]
# The one place the version lives: pyproject.toml reads it (tool.setuptools.dynamic), CHANGELOG.md records it.
__version__ = "0.1.0"


def _map_checkout_kernels() -> None:
    """In a source checkout, resolve `muon.kernels` to the top-level kernels/ folder.

    setup.py installs kernels/ as muon/kernels; in a checkout (running `python -m bench` or the tests
    from the repository, or an editable install) the folder sits beside muon/ instead. Installed
    copies have muon/kernels and never reach the finder.
    """
    import importlib.util
    import sys

    here = _Path(__file__).resolve().parent
    source = here.parent / "kernels"
    if (here / "kernels").exists() or not (source / "__init__.py").exists():
        return

    class _CheckoutKernels:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "muon.kernels":
                return None
            return importlib.util.spec_from_file_location(
                name, source / "__init__.py", submodule_search_locations=[str(source)]
            )

    # First: an editable install of another checkout (a git worktree) must not shadow this one's kernels/.
    sys.meta_path.insert(0, _CheckoutKernels)


_map_checkout_kernels()
