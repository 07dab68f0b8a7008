"""The one result schema of `python -m bench`: every command, every device, the same CSV columns.

A row is one measured (or computed) value: what (`command`, `op`, `provider`, `shape`, `dtype`), the
value (`metric`, `unit`, `median`), how it was spread over the interleaved rounds that measured it
(`spread` = IQR / median, `q1`, `q3`, `low` = min, `high` = max, `rounds`, `clock`: what timed it,
`flag`), `part_of` (the op
of the same provider and shape this value is a part of: a part is never reported longer than its
whole, `check_parts`), `status` (ok, skipped: why, error: what), `extra` (the command's own fields,
JSON in the CSV) and where it ran (`device`, `threads`, versions, `commit`, `date`). Computed values
(FLOP counts, losses) leave the spread columns empty.

`Results.write(out, stem)` writes <stem>.csv and <stem>.json (the same rows, `extra` as an object)
and refuses rows whose part exceeds their whole. `read(path)` reads either back as dicts.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
from pathlib import Path

import torch

from .timing import Stats

COLUMNS = (
    "command", "op", "provider", "shape", "dtype", "metric", "unit",
    "median", "spread", "q1", "q3", "low", "high", "rounds", "clock", "flag", "part_of", "status", "extra",
    "device", "threads", "muon", "torch", "triton", "cuda", "python", "commit", "date",
)  # fmt: skip
META = ("device", "threads", "muon", "torch", "triton", "cuda", "python", "commit", "date")


def run_meta(device: torch.device) -> dict:
    """The columns that say where and from what a row came: device, threads, versions, commit, date."""
    from .common import device_name, git_commit, versions

    return {"device": device_name(device), "threads": torch.get_num_threads(), **versions(),
            "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


class PartExceedsWhole(ValueError):
    """A row's part (part_of) is longer than its whole: a measurement bug, never written out."""


def check_parts(rows: list[dict]) -> None:
    """Every row with `part_of` has its whole (same command, provider, shape; op = part_of), and its
    median, min and max are at most the whole's. Parts are timed inside the same runs as their whole
    (bench/timing.py), so each sample of the part is at most its run's sample of the whole, and order
    statistics keep that order; a violation is a bug, raised here rather than written."""
    wholes = {(r["command"], r["op"], r["provider"], r["shape"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if not r.get("part_of") or r.get("status") != "ok":
            continue
        whole = wholes.get((r["command"], r["part_of"], r["provider"], r["shape"]))
        if whole is None:
            raise PartExceedsWhole(f"{r['provider']} {r['shape']}: {r['op']} is part of {r['part_of']}, "
                                   "which has no row")
        for key in ("median", "low", "high"):
            if r.get(key) is not None and whole.get(key) is not None and r[key] > whole[key] * (1 + 1e-9):
                raise PartExceedsWhole(f"{r['provider']} {r['shape']}: {r['op']} {key} {r[key]:.4g} "
                                       f"> {r['part_of']} {key} {whole[key]:.4g}")


class Results:
    """The rows of one command's run, all with the same meta columns; `write` (re)writes the files."""

    def __init__(self, device: torch.device, command: str) -> None:
        self.device, self.command = device, command
        self.meta = run_meta(device)
        self.rows: list[dict] = []

    def add(self, op: str, provider: str, shape: str, dtype: str, *, metric: str = "time", unit: str = "ms",
            value: float | None = None, stats: Stats | None = None, part_of: str = "", status: str = "ok",
            **extra) -> dict:
        """One row: a timing (`stats`), a single value (`value`), or neither (a skip or an error)."""
        row = dict.fromkeys(COLUMNS)
        row.update(command=self.command, op=op, provider=provider, shape=shape, dtype=dtype, metric=metric,
                   unit=unit, part_of=part_of, status=status, flag="", extra=extra, **self.meta)
        if stats is not None:
            row.update(median=stats.median, spread=stats.spread, q1=stats.q1, q3=stats.q3, low=stats.low,
                       high=stats.high, rounds=stats.rounds, clock=stats.clock, flag=stats.flag)
            if stats.wall is not None:
                extra["wall_ms"] = list(stats.wall)  # median, min, max of the same samples' wall time
        elif value is not None:
            row.update(median=float(value))
        self.rows.append(row)
        return row

    def ok(self, op: str | None = None) -> list[dict]:
        return [r for r in self.rows if r["status"] == "ok" and (op is None or r["op"] == op)]

    def write(self, out: Path, stem: str) -> list[Path]:
        check_parts(self.rows)
        return write(self.rows, out, stem)


def _cell(v):
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=_json_default) if v else ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return "" if v is None else v


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return str(v)


def write(rows: list[dict], out: Path, stem: str) -> list[Path]:
    """<stem>.csv (COLUMNS, in order) and <stem>.json (the same rows) under out."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{k: _cell(r.get(k)) for k in COLUMNS} for r in rows])
    json_path.write_text(json.dumps([{k: r.get(k) for k in COLUMNS} for r in rows], indent=1,
                                    default=_json_default) + "\n")
    return [csv_path, json_path]


_NUMERIC = ("median", "spread", "q1", "q3", "low", "high")


def read(path: Path) -> list[dict]:
    """Rows of a <stem>.json or <stem>.csv written by `write` ([] when missing or unreadable), numbers
    as numbers and `extra` as a dict."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
        else:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
    except (OSError, ValueError):
        return []
    for r in rows:
        for key in _NUMERIC:
            if isinstance(r.get(key), str):
                r[key] = float(r[key]) if r[key] else None
        for key in ("rounds", "threads"):
            if isinstance(r.get(key), str):
                r[key] = int(r[key]) if r[key] else None
        if isinstance(r.get("extra"), str):
            r["extra"] = json.loads(r["extra"]) if r["extra"] else {}
        r.setdefault("extra", {})
    return rows
