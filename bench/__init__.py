"""muon's benchmark suite: `python -m bench <command>` from the repository root.

Importing it puts the repository root *after* the installed packages on `sys.path`
(`put_root_last`). `python -m bench`, like `python -m pytest` and `python -c`, puts the current
directory first, and from the root that makes the top-level `kernels/` folder (this project's Triton
kernels, which are reached only as `muon.kernels`) shadow any installed distribution named `kernels`
— Hugging Face's, which transformers imports when it builds a model. With the root last, `bench`
(found nowhere else) still imports from the checkout while every installed package wins over a
folder of the same name. tests/conftest.py applies the same rule; docs/contributing.md explains it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or os.curdir).resolve() == ROOT  # "" and "." are the current directory
    except OSError:
        return False


def put_root_last(path: list[str] | None = None) -> None:
    """Move every `path` entry that names the repository root to one entry at its end (in place;
    default `sys.path`). Idempotent; the root is appended if it is not there."""
    path = sys.path if path is None else path
    path[:] = [entry for entry in path if not _is_root(entry)] + [str(ROOT)]


put_root_last()
