"""Shared benchmark plumbing: device and version facts, argument parsing, progress, console tables.

Timing lives in bench/timing.py, the result rows (one CSV schema for every command) in
bench/schema.py, every plot in bench/plots.py.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from .plots import _PLOT_NOTE, pyplot  # noqa: F401  (re-exported: the commands import them from here)
from .timing import synchronize  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


def pick_device(name: str | None) -> torch.device:
    """The device from --device (default: cuda when available, else cpu), with a clear error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from muon.backends.dispatch import cpu_model

    cpu = cpu_model() or platform.machine()
    return f"cpu: {cpu} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit() -> str:
    """Short commit of the checkout, with "-dirty" for uncommitted changes; "unknown" outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    import muon

    out = {"muon": muon.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "none"
    out["cuda"] = torch.version.cuda or "none"
    return out


def default_out(device: torch.device) -> Path:
    return REPO / "bench" / "out" / slug(device_name(device).split("(")[0])


def dtype_of(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "float64": torch.float64}
    if name not in table:
        raise SystemExit(f"--dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_shape(text: str) -> tuple[int, int, int]:
    """'1024x4096' -> (1, 1024, 4096); '12x768x3072' -> (12, 768, 3072)."""
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"shape {text!r}: expected MxN or BxMxN with integers") from None
    if len(dims) == 2:
        dims = (1, *dims)
    if len(dims) != 3 or min(dims) < 1:
        raise SystemExit(f"shape {text!r}: expected MxN or BxMxN with positive integers")
    return dims  # type: ignore[return-value]


def shape_str(shape) -> str:
    return "x".join(str(int(v)) for v in shape)


def set_threads(threads: int | None, device: torch.device) -> None:
    """torch's CPU threads for a timing command: --threads, else 1 on a CPU (on a machine shared with
    other jobs, two threads on two cores wait on each other's preempted half and a step's time moves
    by several times between runs; one thread is what the project's CPU figures use) and torch's
    default on a GPU machine (the host only issues work there)."""
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)


def tflops(flops: int, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


class _Lines:
    """The plain-text stand-in for a tqdm bar: a few lines on stderr (start, each quarter, end), so a
    log file gets a handful of lines instead of thousands of carriage-return redraws."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", disable=False, **_ignored) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.n, self.postfix, self._start = 0, "", time.perf_counter()
        self._quarter, self._printed = -1, None
        self._emit()

    def _emit(self, force: bool = False) -> None:
        if self.disable:
            return
        quarter = int(4 * self.n / self.total) if self.total else 0
        if not force and quarter <= self._quarter:
            return
        self._quarter, self._printed = quarter, self.n
        of = f"/{self.total}" if self.total is not None else ""
        post = f" ({self.postfix})" if self.postfix else ""
        elapsed = time.perf_counter() - self._start
        print(f"{self.desc}: {self.n}{of} {self.unit}, {elapsed:.0f} s{post}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._emit()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if self._printed != self.n:
            self._emit(force=True)
        self.disable = True

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", **kwargs):
    """A progress bar on stderr: tqdm when it is installed and stderr is a terminal; otherwise a few
    plain lines (a bar redrawn into a log file is thousands of lines). Silent when MUON_BENCH_QUIET is
    set (tests). Usable as an iterable wrapper or, with total=, as a context manager with update()."""
    quiet = bool(os.environ.get("MUON_BENCH_QUIET"))
    if not quiet and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, total=total, desc=desc, unit=unit, **kwargs)
    return _Lines(iterable, total=total, desc=desc, unit=unit, disable=quiet)


CONSOLE_WIDTH = 100  # every console table and line of `python -m bench` fits this
MAX_CELL = 24  # longer cells (custom: model specs) are cut in console tables


def fmt_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table of the given columns (floats to 4 significant digits)."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        text = "" if v is None else str(v)
        return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"  # the files hold it whole

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def wrap(text: str) -> str:
    """A console paragraph in lines of at most CONSOLE_WIDTH."""
    import textwrap

    return textwrap.fill(text, CONSOLE_WIDTH, break_on_hyphens=False)


def skip_line(rows: list[dict], where: str) -> str:
    """One console line for every row skipped or failed in a stage: how many, which providers (as
    many as fit in CONSOLE_WIDTH), and where the reasons are (the status column of `where`)."""
    bad = list(dict.fromkeys(r["provider"] for r in rows if r.get("status", "ok") != "ok"))
    if not bad:
        return ""
    errors = sum(1 for r in rows if str(r.get("status", "")).startswith("error"))
    head = f"skipped {len(bad)} provider(s)" + (f", {errors} error row(s)" if errors else "")
    tail = f" (why: status column of {where})"
    names, shown = "", 0
    for name in bad:
        more = f" +{len(bad) - shown - 1} more" if shown + 1 < len(bad) else ""
        candidate = names + (", " if names else ": ") + name
        if len(head + candidate + more + tail) > CONSOLE_WIDTH:
            break
        names, shown = candidate, shown + 1
    rest = f" +{len(bad) - shown} more" if shown < len(bad) else ""
    return head + names + rest + tail
