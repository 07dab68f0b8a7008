"""The Python code blocks of README.md and docs/*.md, for the tests that run them (tests/test_docs.py,
tests/test_recipes.py and the tests that check what one block computes).

A block is a ```python fence, at any indentation; each runs on its own, in a fresh namespace. A block
whose first line is a marker comment is run only where it can be:

    # docs-test: needs CUDA (why)           run where torch.cuda.is_available(), skipped elsewhere
    # docs-test: needs N processes (why)    not run by the docs test: a multi-process launch

tests/test_docs.py checks that markers are few, spelled like these and give a reason.
"""

from __future__ import annotations

import importlib
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))
MARKER = re.compile(r"#\s*docs-test:\s*(.*)")
MARKERS = re.compile(r"(needs CUDA|needs \d+ processes) \((\S.*)\)")
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # line number of the opening fence (1-based)
    heading: str  # the nearest Markdown heading above it
    code: str  # dedented source
    marker: str | None  # the text after "# docs-test:" on the block's first line, if any

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """The ```python blocks of one page, in order."""
    lines = (ROOT / page).read_text().split("\n")
    found, heading, i = [], "", 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            if lines[i].startswith("#"):
                heading = lines[i].lstrip("#").strip()
            i += 1
            continue
        start, indent, lang = i, fence["indent"], fence["lang"]
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if i == len(lines):
            raise ValueError(f"{page}:{start + 1}: unclosed code fence")
        if lang == "python":
            body = [line[len(indent):] if line.startswith(indent) else line for line in lines[start + 1 : i]]
            code = textwrap.dedent("\n".join(body)) + "\n"
            first = code.lstrip().split("\n", 1)[0]
            marker = MARKER.match(first)
            found.append(Block(page, start + 1, heading, code, marker[1].strip() if marker else None))
        i += 1
    return found


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page)]


def block(page: str, heading: str, index: int = 0) -> Block:
    """The index-th Python block under the heading that starts with `heading`."""
    matching = [b for b in blocks(page) if b.heading.startswith(heading)]
    if len(matching) <= index:
        raise LookupError(f"{page} has {len(matching)} Python blocks under a heading starting {heading!r}")
    return matching[index]


def run(b: Block) -> dict:
    """Execute a block in a fresh namespace; returns the namespace. Tracebacks name page and line."""
    scope: dict = {"__name__": "docs_block"}
    code = compile("\n" * b.line + b.code, b.page, "exec")  # line numbers as in the page
    exec(code, scope)
    return scope


@pytest.fixture(autouse=True)
def one_thread():
    """Examples use tiny matrices, which gain nothing from a second intra-op thread, while on a shared
    2-core machine two threads spin against other jobs: measured under load, the README's quick start
    took 20.9 s with two threads and 2.9 s with one, the Trainer recipe 24.6 s of CPU against 1.5 s.
    (Imported by the test modules that run blocks, so it applies there.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_ci() -> bool:
    """CI (`CI` set, as .ci/run's runner does) or `make test` (make exports MAKELEVEL to its commands):
    both install the test extra, so a missing framework is an error there, not a skip."""
    return bool(os.environ.get("CI")) or "MAKELEVEL" in os.environ


def require(module: str, install: str):
    """Import an optional framework the docs use, or skip saying what to install (fail in CI)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        message = f"needs {module} ({error}): pip install {install}"
        if in_ci():
            pytest.fail(f"{message} — CI and `make test` install it with the test extra", pytrace=False)
        pytest.skip(message)
