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
from pathlib import Path

import torch

from muon import flops

from .common import Results, fmt_table, progress, pyplot
from .models import PRESETS, overhead

PUBLISHED = [name for name, cfg in PRESETS.items() if cfg.published_params is not None]
SWEEP = [2**k for k in range(14, 26)]  # 16K ... 32M tokens per step
COLUMNS = ["model", "params", "muon_params", "batch_tokens", "ns_flops", "ns_flops_gram", "gram_vs_standard",
           "muon_flops", "adamw_flops", "training_flops", "overhead", "overhead_bound", "overhead_with_attention"]


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


def compute(models: list[str], batch_tokens: int, steps: int, symmetric: bool) -> list[flops.Overhead]:
    results = []
    for spec in progress(models, desc="flops", unit="model"):
        try:
            results.append(overhead(spec, batch_tokens, steps, symmetric=symmetric))
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"--model {spec}: {exc}") from None
    return results


def plot(reports: list[flops.Overhead], sweep: list[int], path: Path) -> Path:
    plt = pyplot()
    if plt is None:
        return None

    families: dict[str, list[flops.Overhead]] = {}
    for r in reports:
        families.setdefault(r.model.split("-")[0] if "-" in r.model else "other", []).append(r)
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.8), squeeze=False, sharey=True)
    for ax, (family, members) in zip(axes[0], families.items(), strict=True):
        for i, r in enumerate(members):
            color = plt.cm.viridis(i / max(1, len(members) - 1) * 0.85)
            points = [r.at(b) for b in sweep]
            ax.plot(sweep, [100 * p.overhead for p in points], color=color, label=r.model, marker=".")
            ax.plot(sweep, [100 * p.overhead_bound for p in points], color=color, linestyle="--", linewidth=0.8,
                    label=f"{r.model}: bound T·d/B")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(family)
        ax.set_xlabel("batch (tokens per step)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("Muon FLOP overhead over AdamW (% of 6NB)")
    fig.suptitle(f"FLOP overhead of a Muon step ({reports[0].steps} NS steps; analytic, any device); "
                 "dashed: Keller's bound T·d/B",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(reports: list[flops.Overhead], sweep: list[int], out: Path) -> list[Path]:
    results = Results(torch.device("cpu"))
    for r in reports:
        for b in sweep:
            d = r.at(b).to_dict()
            d.pop("groups")
            results.add("flops", "muon.flops", d.pop("model"), "n/a", **d)
    # The FLOP model is device independent: the device column is not where it was computed.
    for row in results.rows:
        row["device"] = "any (analytic)"
    paths = results.write(out, "flops")
    png = plot(reports, sweep, out / "flops_overhead.png")
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
        d[k] = f"{d[k]:.4e}"
    # Gram Newton–Schulz (one restart) against standard NS, same groups: below 1 where Gram saves FLOPs
    d["gram_vs_standard"] = f"{r.ns_flops_gram / r.ns_flops:.3f}" if r.ns_flops else "n/a"
    for k in ("overhead", "overhead_bound", "overhead_with_attention"):
        d[k] = f"{100 * d[k]:.3f}%"
    return d


def run(args: argparse.Namespace) -> int:
    models = args.model or PUBLISHED
    reports = compute(models, args.batch_tokens, args.steps, args.symmetric)
    if args.json:
        objects = [r.to_dict() for r in reports]
        print(json.dumps(objects[0] if len(objects) == 1 else objects, indent=1))
    else:
        print(f"Muon vs AdamW FLOPs per step, {args.steps} NS steps{' (symmetric kernels)' if args.symmetric else ''}; "
              "ns_flops_gram: the same NS with Gram Newton–Schulz (restart at step 2)")
        print(f"training FLOP model: {reports[0].training_flop_model}")
        print(fmt_table([_readable(r) for r in reports], COLUMNS))
    if args.out is not None:
        sweep = sorted({int(v) for v in args.sweep.split(",")} if args.sweep else set(SWEEP) | {args.batch_tokens})
        for path in write(reports, sweep, args.out):
            if not args.json:
                print(f"wrote {path}")
    return 0
