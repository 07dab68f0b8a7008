"""`python -m bench flops`: FLOP overhead of a Muon step over an AdamW step, per model and batch size.

    python -m bench flops --model gpt2-124m --batch-tokens 524288 --json
    python -m bench flops --out bench/out/flops          # every preset, batch sweep, CSV/JSON + PNG

Overhead = (FLOPs of a muon.Muon step - FLOPs of a torch.optim.AdamW step) / training FLOPs, with
training FLOPs = 6·N·B (N: parameters used per token; attention reported beside it). The Muon step
routes parameters exactly as muon.param_groups does and batches same-shape matrices as the optimizer.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import torch

from muon import flops

from .. import models, plots
from ..common import CONSOLE_WIDTH, fmt_table, progress
from ..schema import Results

PUBLISHED = [name for name, cfg in models.PRESETS.items() if cfg.published_params is not None]
SWEEP = [2**k for k in range(14, 26)]  # 16K ... 32M tokens per step
# console columns (every field is in flops.csv's extra): short headers, so the table fits 100 columns
CONSOLE = {"model": "model", "params": "params", "muon_params": "on Muon", "batch_tokens": "batch",
           "ns_flops": "NS FLOPs", "gram_vs_standard": "Gram/std", "adamw_flops": "AdamW FLOPs",
           "overhead": "overhead", "overhead_bound": "bound", "overhead_with_attention": "w/ attn"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=None,
                        help="preset name, 'custom:layers=..,d=..,heads=..' or 'module:pkg.mod:factory'; "
                        f"repeatable (default: every published preset: {', '.join(PUBLISHED)})")
    parser.add_argument("--batch-tokens", type=int, default=524288, help="tokens per optimizer step (default 524288)")
    parser.add_argument("--steps", type=int, default=5, help="Newton-Schulz steps (default 5)")
    parser.add_argument("--symmetric", action="store_true",
                        help="count symmetric-GEMM kernels (one triangle of X·Xᵀ and A·A)")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per model) instead of a table")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for flops.csv/json over the batch sweep and flops_overhead.png")
    parser.add_argument("--sweep", type=str, default=None,
                        help="comma-separated batch sizes in tokens for --out (default 2^14 ... 2^25)")


def compute(specs: list[str], batch_tokens: int, steps: int, symmetric: bool) -> list[flops.Overhead]:
    results = []
    for spec in progress(specs, desc="flops", unit="model"):
        try:
            results.append(models.overhead(spec, batch_tokens, steps, symmetric=symmetric))
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"--model {spec}: {exc}") from None
    return results


def write(reports: list[flops.Overhead], sweep: list[int], out: Path) -> list[Path]:
    results = Results(torch.device("cpu"), "flops")
    # The FLOP model is device independent: the device column is not where it was computed.
    results.meta.update(device="any (analytic)", threads=None)
    for r in reports:
        for b in sweep:
            d = r.at(b).to_dict()
            d.pop("groups")
            model = d.pop("model")
            results.add("muon_step_flops", "muon.flops", model, "n/a", metric="overhead",
                        unit="(muon - adamw step FLOPs) / 6NB", value=d["overhead"], **d)
    paths = results.write(out, "flops")
    png = plots.flops_overhead(reports, sweep, out / "flops_overhead.png")
    return paths + ([png] if png else [])


def _count(v: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if v >= scale:
            return f"{v / scale:.4g}{unit}"
    return str(v)


def _readable(r: flops.Overhead) -> dict:
    d = r.to_dict()
    for k in ("params", "muon_params", "batch_tokens"):
        d[k] = _count(d[k])
    for k in ("ns_flops", "ns_flops_gram", "muon_flops", "adamw_flops", "training_flops"):
        d[k] = f"{d[k]:.3e}"
    # Gram Newton–Schulz (one restart) against standard NS, same groups: below 1 where Gram saves FLOPs
    d["gram_vs_standard"] = f"{r.ns_flops_gram / r.ns_flops:.3f}" if r.ns_flops else "n/a"
    for k in ("overhead", "overhead_bound", "overhead_with_attention"):
        d[k] = f"{100 * d[k]:.3f} %"
    return d


def run(args: argparse.Namespace) -> int:
    specs = args.model or PUBLISHED
    reports = compute(specs, args.batch_tokens, args.steps, args.symmetric)
    if args.json:
        objects = [r.to_dict() for r in reports]
        print(json.dumps(objects[0] if len(objects) == 1 else objects, indent=1))
    else:
        print(textwrap.fill(
            f"Muon vs AdamW FLOPs per step, {args.steps} NS steps{' (symmetric kernels)' if args.symmetric else ''}; "
            "Gram/std: NS FLOPs with Gram Newton–Schulz (restart at step 2) / standard; overhead over training "
            f"FLOPs, {reports[0].training_flop_model}", CONSOLE_WIDTH))
        table = [{CONSOLE[k]: v for k, v in _readable(r).items() if k in CONSOLE} for r in reports]
        print(fmt_table(table, list(CONSOLE.values())))
    if args.out is not None:
        sweep = sorted({int(v) for v in args.sweep.split(",")} if args.sweep else set(SWEEP) | {args.batch_tokens})
        paths = write(reports, sweep, args.out)
        if not args.json:
            print("wrote " + ", ".join(p.name for p in paths) + f" in {args.out}")
    return 0
