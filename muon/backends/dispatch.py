"""What backend="auto" runs: decisions taken from GPU measurements, never from guesses.

## Backend table — `choose_backend(X, dtype)`

Source: bench/results/h100-899c9f9/kernels.csv — NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0,
commit 899c9f9, NS of 5 Keller steps on fp32 inputs in bf16, `triton.testing.do_bench` medians, every
provider in one process (its "muon torch / triton / cuda" columns decide).
`BACKEND_TABLE` below is `table_from_csv` of that file (tests/test_dispatch.py checks they agree);
`python -m muon.backends.dispatch CSV...` prints the table of new `python -m bench kernels` results
(same CSV format) to paste here after a GPU run.

Rule, per (batch, small side s, large side l, dtype) on a CUDA tensor:
- the nearest measured shape of the same dtype, nearness = the largest |log2 ratio| over batch, s and l;
  if it lies within a factor 2 on all three (`REACH`) and a muon kernel provider beat muon's torch
  backend there, that provider runs; ties in distance with different winners run torch;
- everything else runs torch (cuBLAS): unmeasured classes, other dtypes (only bf16 was measured), CPU.
Only kernel versions that were measured can win: a row names its kernel version ("triton-v1": the
fused small path for s <= 128 and the 3-launch tiled path above, as `triton_backend` path "auto" runs
them; the persistent v2 kernels are unmeasured and absent). The CUDA extension is never chosen by auto
(slower than torch from 2048 up in that run).
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------- backend table

SOURCE = "bench/results/h100-899c9f9/kernels.csv"
REACH = 1.0  # log2: a measurement speaks for shapes within a factor 2 of it in batch, s and l
BASELINE = "muon[torch]"
# provider (as bench/kernels.py names it) -> (backend, keyword arguments of its run) that auto may pick
AUTO_PROVIDERS = {
    "muon[triton]": ("triton", {"path": "auto"}),
    "muon[triton:small]": ("triton", {"path": "small"}),
    "muon[triton:gemm]": ("triton", {"path": "gemm"}),
    "muon[triton:persistent]": ("triton", {"path": "persistent"}),
}
# providers auto never picks whatever their numbers: the experimental CUDA extension, auto itself
NEVER_AUTO = ("muon[cuda]", "muon[auto]")


@dataclass(frozen=True)
class Entry:
    """One measured shape: the fastest muon provider there and its margin over the torch backend."""

    batch: int
    short: int
    long: int
    dtype: str
    winner: str  # a key of AUTO_PROVIDERS, or BASELINE
    kernel_version: str
    winner_ms: float
    torch_ms: float


# table_from_csv("bench/results/h100-899c9f9/kernels.csv"); regenerate with `python -m muon.backends.dispatch`
BACKEND_TABLE: tuple[Entry, ...] = (
    Entry(1, 1024, 1024, "bfloat16", "muon[torch]", "torch", 0.86, 0.86),
    Entry(1, 2048, 2048, "bfloat16", "muon[torch]", "torch", 0.63, 0.63),
    Entry(1, 4096, 4096, "bfloat16", "muon[triton]", "triton-v1", 3.4, 3.52),
    Entry(1, 8192, 8192, "bfloat16", "muon[triton]", "triton-v1", 25.08, 26.56),
    Entry(1, 2048, 8192, "bfloat16", "muon[triton]", "triton-v1", 1.6, 1.62),
    Entry(1, 4096, 16384, "bfloat16", "muon[triton]", "triton-v1", 9.16, 11.13),
    Entry(12, 768, 768, "bfloat16", "muon[torch]", "torch", 0.63, 0.63),
    Entry(24, 768, 3072, "bfloat16", "muon[triton]", "triton-v1", 2.92, 3.18),
    Entry(4, 1024, 4096, "bfloat16", "muon[torch]", "torch", 1.11, 1.11),
    Entry(16, 2048, 2048, "bfloat16", "muon[torch]", "torch", 8.15, 8.15),
    Entry(64, 128, 128, "bfloat16", "muon[triton]", "triton-v1", 0.042, 0.47),
    Entry(32, 64, 1024, "bfloat16", "muon[triton]", "triton-v1", 0.13, 0.43),
)


@dataclass(frozen=True)
class Choice:
    backend: str  # "torch" or "triton"
    kwargs: dict = field(default_factory=dict)  # extra arguments of the backend's run (e.g. path)
    reason: str = ""


def _parse_shape(text: str) -> tuple[int, int, int]:
    dims = [int(v) for v in text.split("x")]
    b, m, n = dims if len(dims) == 3 else [1, *dims]
    return b, min(m, n), max(m, n)


def table_from_rows(rows) -> tuple[Entry, ...]:
    """Entries from `python -m bench kernels` rows (dicts with op, provider, shape, dtype, ms, status,
    kernel_version): per (shape, dtype), the fastest of the torch backend and the AUTO_PROVIDERS rows.
    Shapes without a torch-backend row are left out (nothing to compare against)."""
    groups: dict[tuple, dict[str, tuple[float, str]]] = {}
    for r in rows:
        if r.get("op") != "newton_schulz" or r.get("status") != "ok" or not r.get("ms"):
            continue
        provider = r["provider"]
        if provider != BASELINE and provider not in AUTO_PROVIDERS:
            continue
        if (r.get("kernel_version") or "").endswith("-ws"):
            continue  # warp-specialized variant: not what the backend runs by default
        key = (*_parse_shape(r["shape"]), r["dtype"])
        best = groups.setdefault(key, {})
        ms = float(r["ms"])
        if provider not in best or ms < best[provider][0]:
            best[provider] = (ms, r.get("kernel_version") or "")
    table = []
    for (b, s, l, dtype), by in groups.items():
        if BASELINE not in by:
            continue
        torch_ms = by[BASELINE][0]
        winner = min(by, key=lambda p: (by[p][0], p != BASELINE))  # a tie goes to torch
        table.append(Entry(b, s, l, dtype, winner, by[winner][1] or "torch", by[winner][0], torch_ms))
    return tuple(table)


def table_from_csv(*paths) -> tuple[Entry, ...]:
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows.extend(csv.DictReader(f))
    return table_from_rows(rows)


def _distance(e: Entry, batch: int, short: int, long: int) -> float:
    return max(abs(math.log2(batch / e.batch)), abs(math.log2(short / e.short)), abs(math.log2(long / e.long)))


def choose_for_shape(batch: int, m: int, n: int, dtype: torch.dtype, device_type: str = "cuda",
                     table: tuple[Entry, ...] | None = None) -> Choice:
    """The auto choice for a (batch, m, n) stack computed in `dtype` on `device_type` (see module doc)."""
    if device_type != "cuda":
        return Choice("torch", {}, f"{device_type}: the kernels run only in an interpreter there")
    table = BACKEND_TABLE if table is None else table
    short, long = min(m, n), max(m, n)
    name = str(dtype).removeprefix("torch.")
    if batch < 1 or short < 1:
        return Choice("torch", {}, "empty")
    same = [e for e in table if e.dtype == name]
    if not same:
        return Choice("torch", {}, f"no measurement in {name}")
    dist = {e: _distance(e, batch, short, long) for e in same}
    best = min(dist.values())
    if best > REACH:
        return Choice("torch", {}, f"unmeasured shape class (nearest measurement {best:.2f} octaves away)")
    winners = {e.winner for e in same if dist[e] == best}
    if len(winners) != 1:
        return Choice("torch", {}, "equidistant measurements disagree")
    (winner,) = winners
    if winner == BASELINE:
        return Choice("torch", {}, "torch measured fastest nearby")
    backend, kwargs = AUTO_PROVIDERS[winner]
    e = next(e for e in same if dist[e] == best)
    return Choice(backend, dict(kwargs), f"{winner} ({e.kernel_version}) {e.winner_ms} ms vs torch {e.torch_ms} ms at "
                  f"{e.batch}x{e.short}x{e.long}")


_CHOICES: dict[tuple, Choice] = {}


def choose_backend(X: Tensor, dtype: torch.dtype = torch.bfloat16) -> Choice:
    """The auto choice for a (B, m, n) stack X computed in `dtype`; cached per shape class key."""
    B, m, n = X.shape if X.ndim == 3 else (1, *X.shape[-2:])
    key = (B, m, n, dtype, X.device.type)
    choice = _CHOICES.get(key)
    if choice is None:
        if len(_CHOICES) > 4096:
            _CHOICES.clear()
        choice = _CHOICES[key] = choose_for_shape(B, m, n, dtype, X.device.type)
    return choice


def main(argv=None) -> None:
    """Print BACKEND_TABLE entries for the given kernels.csv files (to paste above after a GPU run)."""
    paths = (argv if argv is not None else sys.argv[1:]) or [SOURCE]
    for e in table_from_csv(*paths):
        print(f"    {e!r},".replace("Entry(batch=", "Entry(").replace("short=", "").replace("long=", "")
              .replace("dtype=", "").replace("winner=", "").replace("kernel_version=", "")
              .replace("winner_ms=", "").replace("torch_ms=", ""))


if __name__ == "__main__":
    main()
