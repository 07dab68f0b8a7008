"""Every Python block of README.md and docs/*.md runs as written (tests/docblocks.py finds them).

Each block runs on its own in a fresh namespace, with warnings turned into errors (a false warning in
an example is a bug). Blocks that need a GPU or several processes carry a visible marker on their
first line (see tests/docblocks.py); docs/recipes.md's blocks need optional frameworks and are run,
with checks on their results, by tests/test_recipes.py.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from docblocks import MARKERS, PAGES, ROOT, all_blocks, blocks, one_thread, run  # noqa: F401 (one_thread: autouse)

# Pages whose blocks another test runs (and checks): that test must cover every block of the page.
RUN_ELSEWHERE = {"docs/recipes.md": "tests/test_recipes.py"}
MAX_MARKED = 3  # blocks not run on a CPU-only machine: a handful at most
ALLOWED_FENCES = {"python", "bash", ""}  # "" is for formulas; shell commands are bash


@pytest.mark.parametrize(
    "block", [pytest.param(b, id=b.where) for b in all_blocks() if b.page not in RUN_ELSEWHERE]
)
def test_block_runs(block):
    if block.marker is not None:
        kind = MARKERS.fullmatch(block.marker)
        assert kind, f"{block.where}: unknown marker {block.marker!r}"
        if kind[1] != "needs CUDA":
            pytest.skip(f"{block.where}: {block.marker}; the docs test runs one process")
        if not torch.cuda.is_available():
            pytest.skip(f"{block.where}: {block.marker}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(block)


def test_markers_are_few_spelled_right_and_give_a_reason():
    marked = [b for b in all_blocks() if b.marker is not None]
    for b in marked:
        expected = "'needs CUDA (why)' or 'needs N processes (why)'"
        assert MARKERS.fullmatch(b.marker), f"{b.where}: marker {b.marker!r} is not {expected}"
    assert len(marked) <= MAX_MARKED, [b.where for b in marked]
    for b in all_blocks():  # a marker anywhere but the first line would be ignored: there must be none
        rest = b.code.lstrip().split("\n", 1)[-1]
        assert "docs-test:" not in rest, f"{b.where}: a docs-test marker must be the block's first line"


def test_every_code_fence_is_known_and_python_is_labelled():
    """An unlabelled or misspelled fence would hide Python from the docs test."""
    for page in PAGES:
        fence, lang = False, ""
        body: list[str] = []
        for number, line in enumerate((ROOT / page).read_text().split("\n"), 1):
            match = re.match(r"^\s*```([\w+-]*)\s*$", line)
            if not match:
                body.append(line)
                continue
            if not fence:
                lang, body = match[1], []
                assert lang in ALLOWED_FENCES, f"{page}:{number}: fence language {lang!r}"
            elif lang == "":
                text = "\n".join(body)
                assert not re.search(r"^\s*(import|from) \w", text, re.M), f"{page}: an unlabelled fence holds Python"
            fence = not fence
        assert not fence, f"{page}: unclosed fence"


def test_pages_run_elsewhere_are_covered_and_the_docs_exist():
    for page, test in RUN_ELSEWHERE.items():
        assert blocks(page), page
        assert page in (ROOT / test).read_text(), f"{test} does not run {page}"
    expected = {"optimizer", "newton-schulz", "guarantees", "distributed", "qk-clip", "mup", "kernels",
                "benchmarks", "contributing", "migration", "recipes", "efficiency"}
    assert {p.removeprefix("docs/").removesuffix(".md") for p in PAGES if p.startswith("docs/")} >= expected
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024, "README.md is over 12 KB: move detail to docs/"
    for name in expected:  # every page is linked from the README
        assert f"(docs/{name}.md)" in readme, name
