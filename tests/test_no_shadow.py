"""The top-level kernels/ folder never shadows an installed distribution named `kernels`.

transformers imports Hugging Face's `kernels` package when it builds a model; run from the repository
root, `python -m pytest` and `python -m bench` put the root first on sys.path, where this project's
kernels/ folder (reached only as `muon.kernels`) would be found instead. bench/__init__.py moves the
root after the installed packages (tests/conftest.py imports it first); kernels/__init__.py refuses
to load as a top-level `kernels`. The subprocess tests install a stub distribution named `kernels` in
a temporary site directory and run the suite's own commands from the root, as `make test` runs them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB = "muon-test-stub"


def _resolved(entry: str) -> Path:
    return Path(entry or os.curdir).resolve()


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_installed_kernels_distribution_wins_over_the_repository_folder():
    """In this process, as the suite runs: every installed-package directory comes before the root,
    and where a distribution named `kernels` is installed (Hugging Face's with the test extra, or the
    stub of the subprocess test below), `import kernels` resolves to it."""
    entries = [_resolved(p) for p in sys.path]
    assert ROOT in entries, "bench must stay importable from the checkout"
    root_at = entries.index(ROOT)
    assert entries.count(ROOT) == 1
    site_dirs = {Path(p).resolve() for p in site.getsitepackages() + [site.getusersitepackages()]}
    site_at = [i for i, p in enumerate(entries) if p in site_dirs]
    assert site_at, sys.path
    assert root_at > max(site_at), f"the repository root comes before the installed packages: {sys.path}"
    if _installed("kernels"):
        origin = Path(importlib.util.find_spec("kernels").origin).resolve()
        assert origin.parent != ROOT / "kernels", f"import kernels resolves to this repository's folder: {origin}"
        if os.environ.get("MUON_EXPECT_KERNELS"):
            assert origin == Path(os.environ["MUON_EXPECT_KERNELS"]).resolve(), origin


def test_repository_kernels_refuse_a_top_level_import():
    """Even with the root first and nothing else named `kernels`, the folder does not load as `kernels`."""
    code = (
        "import sys\n"
        f"sys.path[:] = [{str(ROOT)!r}] + [p for p in sys.path if 'site-packages' not in p]\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as exc:\n"
        "    assert exc.name == 'kernels' and 'muon.kernels' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError(kernels.__file__)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture
def stub_site(tmp_path: Path) -> Path:
    """A site directory holding a distribution named `kernels` (a package and its dist-info)."""
    site_dir = tmp_path / "site"
    (site_dir / "kernels").mkdir(parents=True)
    (site_dir / "kernels" / "__init__.py").write_text(f"STUB = {STUB!r}\n")
    info = site_dir / "kernels-99.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 99.0\n")
    return site_dir


def _env(stub_site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub_site), env.get("PYTHONPATH")]))
    env["MUON_EXPECT_KERNELS"] = str(stub_site / "kernels" / "__init__.py")
    return env


def test_pytest_from_the_root_imports_the_installed_kernels(stub_site: Path):
    """`python -m pytest` from the root (what make test and CI run) sees the installed `kernels`."""
    node = f"{Path(__file__).name}::test_installed_kernels_distribution_wins_over_the_repository_folder"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", f"tests/{node}"],
        cwd=ROOT, env=_env(stub_site), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "1 passed" in run.stdout, run.stdout[-2000:]


def test_bench_from_the_root_imports_the_installed_kernels(stub_site: Path):
    """`python -m bench` from the root (make bench) sees the installed `kernels` too."""
    run = subprocess.run([sys.executable, "-m", "bench", "versions"], cwd=ROOT, env=_env(stub_site),
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    lines = run.stdout.splitlines()
    assert "kernels 99.0" in lines, run.stdout
    assert f"import kernels -> {stub_site / 'kernels' / '__init__.py'}" in lines, run.stdout
