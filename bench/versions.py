"""`python -m bench versions`: the resolved versions of the packages the suite runs on, and the file
`import kernels` resolves to (CI prints this first: a dependency that moved shows in its log).

Read from the installed distributions' metadata: nothing is imported, so a broken package is listed
with its version rather than failing here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

# the test extra's frameworks first (the ones that move under an unpinned extra), then the rest
PACKAGES = ("torch", "triton", "transformers", "accelerate", "lightning", "kernels", "numpy", "pytest",
            "pytest-xdist", "hypothesis", "fused-muon")  # fmt: skip


def resolved() -> dict[str, str]:
    """name -> installed version ("not installed" where there is none)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def kernels_origin() -> str:
    """The file `import kernels` would load from here (Hugging Face's `kernels` when it is installed,
    never this repository's kernels/ folder: bench/__init__.py)."""
    spec = importlib.util.find_spec("kernels")
    return "nothing" if spec is None else str(spec.origin)


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    print(f"python {platform.python_version()}")
    for name, version in resolved().items():
        print(f"{name} {version}")
    print(f"import kernels -> {kernels_origin()}")
    return 0
