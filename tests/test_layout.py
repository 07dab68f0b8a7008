"""The layout of the house (docs/contributing.md, "Map of the house"), checked from the sources.

* No import circle anywhere in the tree: the graph of every import statement in muon/, kernels/ (as
  `muon.kernels`), bench/ and tests/ — module level and deferred (inside functions) alike, absolute
  and relative — has no cycle. A deferred import hides a circle from the interpreter, not from a reader.
* The library does not import its tools (`muon.tools`) nor the benchmarks (`bench`).
* bench/'s parts stand apart: the kernel microbenchmarks (bench.kernel), the optimizer-step benchmarks
  (bench.optimizer) and the experiments (bench.experiments) import bench's shared top-level modules
  (common, schema, timing, plots, models, data, gpt) and their own part, never another part; only
  the entry points (bench.cli, bench.run_all) bring them together.
* The tools keep their public names: `muon.flops` and `muon.profiling` are the tools' own objects.

The graph is read with `ast` (nothing is imported), so it covers code that needs a GPU, Triton or
torchrun as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package name its files are imported as (tests/ is on sys.path: its modules are top-level)
PACKAGES = {"muon": "muon", "kernels": "muon.kernels", "bench": "bench", "tests": ""}
# the library's own modules that may import muon.tools: the tools themselves and their public names
TOOL_NAMES = ("muon.tools", "muon.flops", "muon.profiling")


def modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__) for every .py file under PACKAGES."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [*([package] if package else []), *path.relative_to(root / folder).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph(mods: dict[str, tuple[Path, bool]]) -> dict[str, dict[str, str]]:
    """module -> {imported module of the tree: "file:line" of the first import of it}. An import of a
    name resolves to the deepest module of the tree it names (`from .a import b` is a.b when b is a
    module, else a); imports from outside the tree are left out."""
    graph = {}
    for name, (path, is_package) in mods.items():
        package = name if is_package else name.rpartition(".")[0]
        edges = graph[name] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(p for p in [*parts, node.module] if p)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, f"{path.relative_to(ROOT)}:{node.lineno}")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_every_kind_of_import():
    """The reader itself: relative, absolute, deferred and `from . import module` imports are edges."""
    graph = import_graph(modules())
    assert "muon.optim" in graph["muon"]  # from .optim import Muon
    assert "muon.kernels._common" in graph["muon.kernels.aol"]  # kernels/ is muon.kernels
    assert "muon.backends.torch_backend" in graph["muon.kernels.gram_ns"]  # deferred, absolute
    assert "bench.common" in graph["bench.cli"] or "bench.cli" in graph["bench.__main__"]
    assert "helpers" in graph["test_optim"]  # tests/ modules are top-level
    ring = {"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}, "d": {"a": ""}}
    assert cycles(ring) == [["a", "b", "c"]]


def test_no_import_circle_anywhere():
    graph = import_graph(modules())
    found = cycles(graph)
    where = [[f"{a} -> {b} ({graph[a][b]})" for a in ring for b in ring if b in graph[a]] for ring in found]
    assert not found, "import circles:\n" + "\n".join("\n".join(edges) + "\n" for edges in where)


def test_the_library_imports_neither_its_tools_nor_the_benchmarks():
    graph = import_graph(modules())
    library = [m for m in graph if m.startswith("muon") and not m.startswith(TOOL_NAMES)]
    wrong = {f"{m} -> {t} ({graph[m][t]})" for m in library for t in graph[m] if t.startswith((*TOOL_NAMES, "bench"))}
    assert not wrong, sorted(wrong)


BENCH_PARTS = ("bench.kernel", "bench.optimizer", "bench.experiments")


def test_bench_parts_import_no_other_part_and_shared_modules_import_no_part():
    graph = import_graph(modules())
    part = lambda m: next((p for p in BENCH_PARTS if m == p or m.startswith(p + ".")), None)  # noqa: E731
    entry = ("bench.cli", "bench.run_all", "bench.__main__")
    wrong = {f"{m} -> {t} ({graph[m][t]})" for m in graph if m.startswith("bench") and m not in entry
             for t in graph[m] if part(t) and part(t) != part(m)}
    assert not wrong, sorted(wrong)
    assert all(p in graph for p in BENCH_PARTS)


def test_tools_keep_their_public_names():
    import muon.flops
    import muon.profiling
    from muon.tools import flops, profiling

    assert muon.flops.__all__ == flops.__all__ and muon.profiling.__all__ == profiling.__all__
    for public, tool in ((muon.flops, flops), (muon.profiling, profiling)):
        assert all(getattr(public, name) is getattr(tool, name) for name in tool.__all__)
