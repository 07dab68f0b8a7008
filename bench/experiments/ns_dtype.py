"""`python -m bench ns-dtype`: measure what ns_dtype="auto" should compute in on this CPU, per shape.

    python -m bench ns-dtype                      # default shapes, 1 thread: ns_dtype.csv + the table
    python -m bench ns-dtype --threads 2 --shapes 128x128,128x512

For each m×n shape, Newton–Schulz (the torch backend, what backend="auto" runs on a CPU; 5 Keller
steps on fp32 momentum-like input) in fp32 and in bf16, timed in interleaved rounds (bench/timing.py:
both dtypes once per round, the order rotated, so both see the same load). Writes ns_dtype.csv /
ns_dtype.json (bench/schema.py rows, the CPU model in `extra`) and prints the `CPU_DTYPE_TABLE`
entries of muon/backends/dispatch.py (`dtype_table_from_rows`: bf16 wins where its median is below
BF16_MARGIN × fp32's) to paste there, with the CSV committed beside it as the table's provenance
(bench/results/ns-dtype-cpu/). On a CUDA machine there is nothing to measure: auto is bf16 there.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from muon.backends import dispatch
from muon.coefficients import resolve_schedule
from muon.newton_schulz import orthogonalize

from ..common import REPO, device_name, fmt_table, parse_shape, progress, set_threads, shape_str, wrap
from ..schema import Results
from ..timing import interleaved, ratio

# squares and 1:4 rectangles over the sizes a CPU user trains (small models, tests); bf16 at 512x2048
# takes ~15 s a call on a 2-core CPU without bf16 instructions, so the list stops at 256x1024 / 512^2
SHAPES = ["32x32", "64x64", "128x128", "256x256", "512x512", "32x128", "64x256", "128x512", "256x1024"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated MxN (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per shape (default 7)")
    parser.add_argument("--rep-ms", type=float, default=200.0, help="time per dtype and shape over all rounds (ms)")
    parser.add_argument("--threads", default="1", help="torch CPU thread counts, comma-separated (default 1)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "ns-dtype-cpu",
                        help="folder for ns_dtype.csv/json (default bench/out/ns-dtype-cpu)")


def run(args: argparse.Namespace) -> int:
    device = torch.device("cpu")
    try:
        thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--threads: expected comma-separated integers, got {args.threads!r}") from None
    schedule = resolve_schedule("keller", 5, 1e-7)
    cpu = dispatch.cpu_model()
    results = Results(device, "ns-dtype")
    shapes = [parse_shape(t.strip()) for t in args.shapes.split(",") if t.strip()]
    jobs = [(t, shape) for t in thread_counts for shape in shapes]
    for threads, (b, m, n) in progress(jobs, desc="ns-dtype", unit="shape"):
        set_threads(threads, device)
        G = torch.randn(b, m, n, generator=torch.Generator().manual_seed(m * 10007 + n))
        calls = {name: (lambda d=d, G=G: orthogonalize(G, schedule, dtype=d, backend="torch"))
                 for name, d in DTYPES.items()}
        samples = interleaved(calls, device, rounds=args.rounds, budget_ms=args.rep_ms)
        load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None  # other jobs' load, provenance
        speed = ratio(samples["float32"].whole, samples["bfloat16"].whole)  # > 1: bf16 faster
        for name, s in samples.items():
            row = results.add("newton_schulz", "muon[torch]", shape_str((b, m, n)), name, stats=s.stats,
                              cpu_model=cpu, bf16_speedup_over_fp32=[speed.median, speed.low, speed.high],
                              load_1min=load)
            row.update(threads=threads, device=device_name(device))
        results.write(args.out, "ns_dtype")
    paths = results.write(args.out, "ns_dtype")
    table = dispatch.dtype_table_from_rows(results.rows)
    print(wrap(f"NS fp32 vs bf16 on {cpu}, commit {results.meta['commit']}, torch "
               f"{results.meta['torch']}: median of {args.rounds} interleaved rounds"))
    print(fmt_table([{"threads": e.threads, "shape": f"{e.short}x{e.long}", "fp32 ms": e.fp32_ms, "bf16 ms": e.bf16_ms,
                      "bf16 / fp32": e.bf16_ms / e.fp32_ms, "auto picks": e.winner} for e in table],
                    ["threads", "shape", "fp32 ms", "bf16 ms", "bf16 / fp32", "auto picks"]))
    print("wrote " + ", ".join(p.name for p in paths) + f" in {args.out}; CPU_DTYPE_TABLE entries for "
          "muon/backends/dispatch.py:")
    for e in table:
        print(f"    {entry_source(e)},")
    return 0


def entry_source(e: dispatch.DtypeEntry) -> str:
    return (f"DtypeEntry({e.cpu!r}, {e.threads}, {e.short}, {e.long}, {e.winner!r}, {e.fp32_ms!r}, {e.bf16_ms!r})")
