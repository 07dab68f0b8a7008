"""`python -m bench state-dtype`: does low-precision optimizer state train the same? (issue 30)

    python -m bench state-dtype --quick                 # the efficiency experiment's CPU model, 3 seeds
    python -m bench state-dtype --quick --seeds 0 1 2 3 4 --batch 16 --lr 0.02

The bench GPT (bench/gpt.py) of `python -m bench efficiency --quick` (width 64, depth 2, 2^17 tokens,
linear warmup then constant lr) trained with muon.Muon over `muon.param_groups` at one learning rate
(0.02 at 16 sequences per step: the quick sweep's best Muon lr at that batch,
bench/results/efficiency_cpu_quick), once per seed and `state_dtype`: None (fp32 state), bf16 (Muon
momentum and AdamW moments in bf16, rounded to nearest) and int8 (Muon momentum blockwise quantized;
the AdamW groups then keep fp32). Same seed = same init, data order and validation batches across
state dtypes. Rows (bench/schema.py): op `state_dtype_training`, metric final_val_loss per seed and
dtype; `extra` holds seed, lr, batch, tokens, params, the curve, and for each dtype the mean and
standard deviation over seeds and the difference from fp32 state in percent.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from ..common import REPO, progress, wrap
from ..schema import Results

STATE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "int8": torch.int8}
QUICK = dict(width=64, depth=2, heads=4, seq_len=64, batch=16, tokens=2**17, lr=0.02, evals=8, val_count=3)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="the CPU model of `efficiency --quick` (the only preset)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dtypes", default="fp32,bf16,int8", help="comma-separated: fp32, bf16, int8")
    p.add_argument("--batch", type=int, help="sequences per step (default 16)")
    p.add_argument("--tokens", type=int, help="tokens per run (default 2^17)")
    p.add_argument("--lr", type=float, help="Muon's learning rate (default 0.02)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--data", help="a text file to train on (default: the Python stdlib sources)")
    p.add_argument("--max-bytes", type=int, default=16 * 2**20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "state-dtype-cpu")


def run(args) -> int:
    from .. import data as D
    from .. import gpt as G

    torch.set_num_threads(args.threads)
    s = dict(QUICK)
    for key in ("batch", "tokens", "lr"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    names = args.dtypes.split(",")
    unknown = [n for n in names if n not in STATE_DTYPES]
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; choose from {sorted(STATE_DTYPES)}")
    data = D.load(args.data, max_bytes=args.max_bytes)
    cfg = G.GPTConfig(width=s["width"], depth=s["depth"], heads=s["heads"], seq_len=s["seq_len"])
    steps = s["tokens"] // (s["batch"] * cfg.seq_len)
    results = Results(torch.device("cpu"), "state-dtype")
    finals: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    with progress(total=steps * len(names) * len(args.seeds), desc="state-dtype steps", unit="step") as bar:
        for seed in args.seeds:
            for name in names:
                model = G.build(cfg, seed=seed)
                params = sum(p.numel() for n, p in model.named_parameters() if "emb" not in n)
                opt = G.make_optimizer(model, "muon", s["lr"], args.weight_decay,
                                       ns_options={"state_dtype": STATE_DTYPES[name]})
                h = G.train(model, opt, data, batch=s["batch"], steps=steps, seed=seed, warmup=max(1, steps // 20),
                            eval_every=max(1, steps // s["evals"]), val_count=s["val_count"], progress=bar)
                finals[name].append(h["final_val_loss"])
                results.add("state_dtype_training", f"muon.Muon(state_dtype={name})", f"gpt-w{cfg.width}-d{cfg.depth}",
                            name, metric="final_val_loss", unit="nats", value=h["final_val_loss"], seed=seed,
                            lr=s["lr"], batch=s["batch"], tokens=s["tokens"], params=params,
                            curve={"tokens": h["tokens"], "val_loss": h["val_loss"]})  # fmt: skip
    base = statistics.mean(finals["fp32"]) if finals.get("fp32") else None
    summary = {}
    for name, values in finals.items():
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[name] = {"mean": mean, "std": std,
                         "vs_fp32_percent": None if base is None else 100 * (mean - base) / base}
    for row in results.rows:
        row["extra"]["summary"] = summary[row["dtype"]]
    results.write(args.out, "state_dtype")
    lines = [f"{n}: {v['mean']:.4f} ± {v['std']:.4f}"
             + ("" if v["vs_fp32_percent"] is None else f" ({v['vs_fp32_percent']:+.2f} % vs fp32 state)")
             for n, v in summary.items()]  # fmt: skip
    print(wrap(f"final validation loss over seeds {args.seeds}, {steps} steps of {s['batch']}x{cfg.seq_len} "
               f"tokens, lr {s['lr']} ({time.perf_counter() - start:.0f} s):"))
    print("\n".join(lines))
    if any(not math.isfinite(v) for vs in finals.values() for v in vs):
        print("a run diverged (inf)")
    return 0
