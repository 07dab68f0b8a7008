"""Shared benchmark plumbing: device and version facts, timing, result rows (CSV/JSON), output folders.

Every result is a row keyed by op, provider, shape, dtype and device, with the software versions and
the git commit of the run, so rows from different machines and commits can be concatenated.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

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
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
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


# ------------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, rep_ms: float = 100.0, graph: bool = False) -> float:
    """Median time of fn() in milliseconds.

    CUDA: triton.testing.do_bench (warm-up, L2 flush before every run, median); graph=True replays
    a CUDA graph instead (do_bench_cudagraph), for kernels so short that launch overhead dominates.
    CPU: warm-up, then the median of repeated wall-clock runs (at least 3, about rep_ms in all).
    """
    if device.type == "cuda":
        import triton.testing

        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=max(1, int(rep_ms // 4)), rep=rep_ms, return_mode="median"))
    fn()  # warm-up (first-call allocations, lazy init)
    start = time.perf_counter()
    fn()
    first = (time.perf_counter() - start) * 1e3
    reps = int(min(50, max(3, rep_ms / max(first, 1e-3))))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def tflops(flops: int, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------------------ results
class Results:
    """Rows of one run; `write` appends nothing, it (re)writes <stem>.csv and <stem>.json."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.meta = {
            "device": device_name(device),
            **{f"{k}_version": v for k, v in versions().items()},
            "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        self.rows: list[dict] = []

    def add(self, op: str, provider: str, shape: str, dtype: str, **values) -> dict:
        row = {"op": op, "provider": provider, "shape": shape, "dtype": dtype, **values, **self.meta}
        self.rows.append(row)
        return row

    def write(self, out: Path, stem: str) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        json_path.write_text(json.dumps(self.rows, indent=1, default=str) + "\n")
        return [csv_path, json_path]


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


_PLOT_NOTE = {"said": False}


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (saying once how to get plots) when matplotlib is
    not installed: the numbers (CSV/JSON) never depend on it."""
    try:
        import matplotlib
    except ImportError:
        if not _PLOT_NOTE["said"]:
            print("plots skipped: matplotlib is not installed (pip install 'fused-muon[bench]')", flush=True)
            _PLOT_NOTE["said"] = True
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table of the given columns."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
