"""`python -m bench efficiency`: Muon vs AdamW data efficiency across batch sizes.

For each batch size, each optimizer is swept over its own learning-rate grid on the same token budget
and the best final validation loss picks its lr (the JSON flags a best lr at the edge of its grid).
The common target loss is the worse of the two best final losses (one that both reach); the tokens
each needs to reach it are read off its validation curve (running minimum, linear interpolation
between evaluations), and token_ratio = adamw_tokens / muon_tokens is the paper's R_L(B) (> 1: Muon
needs fewer tokens).

Muon runs use `muon.Muon(muon.param_groups(model), adjust_lr_fn="match_rms_adamw")`, so one lr serves
its Muon and AdamW groups (embeddings, head, norms) and an lr means the same thing for both
optimizers, though each gets its own grid (AdamW's sits lower: its best lr is lower, and its loss
spikes at lrs Muon trains well with); AdamW runs use torch.optim.AdamW over every parameter. Same
betas (0.9, 0.95), weight decay, warmup (5 % of steps, then constant lr: a curve's every point is a
fair "tokens to reach" reading), init, data order and validation batches for both.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from .. import data as D

QUICK = dict(width=64, depth=2, head_dim=16, seq_len=64, batches=[8, 16, 32], tokens=2**17,
             muon_lrs=[5e-3, 1e-2, 2e-2, 4e-2, 8e-2], adamw_lrs=[6.25e-4, 1.25e-3, 2.5e-3, 5e-3, 1e-2], evals=12,
             val_count=3)
FULL = dict(width=512, depth=8, head_dim=64, seq_len=512, batches=[32, 64, 128, 256, 512], tokens=2**28,
            muon_lrs=[2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2], adamw_lrs=[2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3], evals=40,
            val_count=16)
OPTIMIZERS = ("muon", "adamw")


def tokens_to_reach(tokens: list[float], losses: list[float], target: float, start: tuple[float, float]) -> float:
    """Tokens at which the running minimum of the curve first reaches `target` (linear interpolation).

    `start` is (0, initial loss). Returns inf if the curve never reaches the target.
    """
    xs, ys = [start[0]], [start[1]]
    for t, loss in zip(tokens, losses, strict=True):
        xs.append(t)
        ys.append(min(ys[-1], loss))
    if ys[0] <= target:
        return float(xs[0])
    for i in range(1, len(xs)):
        if ys[i] <= target:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return float(x1 if y0 == y1 else x0 + (x1 - x0) * (y0 - target) / (y0 - y1))
    return math.inf


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="CPU settings: width 64, 3 batch sizes (minutes): a smoke "
                   "test, one seed, constant lr (same as --preset quick)")
    p.add_argument("--preset", choices=("quick", "cpu", "gpu"),
                   help="cpu: the committed sweep (0.12 M parameters to 20 tokens each, 4 batch sizes, lr grids "
                   "extended until each best is inside, 3 seeds; 1-2 hours on 2 cores); gpu: the same sweep "
                   "at 3.2 M parameters on a CUDA device; quick: --quick (bench/experiments/efficiency_sweep.py)")
    p.add_argument("--seeds", type=int, help="seeds at each best lr (--preset cpu|gpu; default 3)")
    p.add_argument("--workers", type=int, help="runs at a time, one process each (--preset cpu|gpu)")
    p.add_argument("--device", help="cpu or cuda (--preset cpu|gpu; default: the preset's)")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS,
                   help="run only these optimizers' share of the sweep (--preset cpu|gpu: processes sharing one "
                   "--out split a sweep between them, each its own batches or optimizers; the analysis needs both)")
    p.add_argument("--max-extensions", type=int,
                   help="lrs added beyond each edge of a grid at most (--preset cpu|gpu; default 3)")
    p.add_argument("--width", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--head-dim", type=int, help="heads = width / head_dim")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes, in sequences per step")
    p.add_argument("--tokens", type=int, help="token budget of every run")
    p.add_argument("--lrs", type=float, nargs="+", help="learning rates swept for both optimizers")
    p.add_argument("--muon-lrs", type=float, nargs="+", help="learning rates swept for Muon (overrides --lrs)")
    p.add_argument("--adamw-lrs", type=float, nargs="+", help="learning rates swept for AdamW (overrides --lrs)")
    p.add_argument("--evals", type=int, help="validation evaluations per run")
    p.add_argument("--val-count", type=int, help="validation batches of 16 sequences per evaluation")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--ns", default="", metavar="KEY=VALUE,...",
                   help="Muon's Newton–Schulz: coefficients=PRESET, steps=N, precondition=frobenius|aol, "
                   "dtype=bf16|fp16|fp32|auto, algorithm=standard|gram|auto (default: muon.Muon's)")
    D.add_run_arguments(p, "bench/results/efficiency")


NS_KEYS = ("coefficients", "steps", "precondition", "dtype", "algorithm")


def ns_options(text: str) -> tuple[dict, dict]:
    """--ns as (muon.Muon keyword arguments, the options as given). precondition travels inside the
    coefficients (muon.coefficients.preconditioned), which every Muon accepts."""
    from muon.coefficients import KELLER, preconditioned

    from ..common import dtype_of

    given = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in NS_KEYS:
            raise SystemExit(f"--ns: expected KEY=VALUE with KEY in {NS_KEYS}, got {item!r}")
        given[key] = value
    kwargs: dict = {}
    coefficients = given.get("coefficients", KELLER)
    if "precondition" in given:
        try:
            coefficients = preconditioned(coefficients, given["precondition"])
        except ValueError as exc:
            raise SystemExit(f"--ns: {exc}") from None
    if "coefficients" in given or "precondition" in given:
        kwargs["ns_coefficients"] = coefficients
    if "steps" in given:
        kwargs["ns_steps"] = int(given["steps"])
    if "dtype" in given:
        kwargs["ns_dtype"] = given["dtype"] if given["dtype"] == "auto" else dtype_of(given["dtype"])
    if "algorithm" in given:
        kwargs["ns_algorithm"] = given["algorithm"]
    return kwargs, given


def _settings(args) -> dict:
    s = D.settings(args, QUICK, FULL, ("width", "depth", "head_dim", "seq_len", "tokens", "evals", "val_count"))
    if s["width"] % s["head_dim"]:
        raise SystemExit(f"--width ({s['width']}) must be a multiple of --head-dim ({s['head_dim']})")
    for name in OPTIMIZERS:
        given = getattr(args, f"{name}_lrs", None) or getattr(args, "lrs", None)
        if given is not None:
            s[f"{name}_lrs"] = given
    if any(b < 1 for b in s["batches"]) or any(not lr > 0 for n in OPTIMIZERS for lr in s[f"{n}_lrs"]):
        raise SystemExit("--batches must be >= 1 and learning rates > 0")
    for b in s["batches"]:
        if s["tokens"] < b * s["seq_len"]:
            raise SystemExit(f"--tokens ({s['tokens']}) is less than one batch of {b} x {s['seq_len']} tokens")
    return s


def run(args) -> int:
    import torch

    from .. import gpt as G
    from ..common import progress

    torch.set_num_threads(args.threads)
    if args.preset == "quick":
        args.quick = True
    elif args.preset is not None:
        from . import efficiency_sweep

        return efficiency_sweep.run(args)
    s = _settings(args)
    ns_kwargs, ns_given = ns_options(args.ns)
    ns_dtype = ns_kwargs.pop("ns_dtype", "auto")
    data = D.load(args.data, max_bytes=args.max_bytes)
    cfg = G.GPTConfig(width=s["width"], depth=s["depth"], heads=s["width"] // s["head_dim"], seq_len=s["seq_len"])
    val = D.val_batches(data.val, 16, cfg.seq_len, s["val_count"])
    initial_loss = G.evaluate(G.build(cfg, seed=args.seed), val)
    start = time.perf_counter()

    runs_per_batch = sum(len(s[f"{n}_lrs"]) for n in OPTIMIZERS)
    total_steps = sum(s["tokens"] // (b * cfg.seq_len) for b in s["batches"]) * runs_per_batch
    rows = []
    with progress(total=total_steps, desc="efficiency steps", unit="step") as bar:
        for b in s["batches"]:
            steps = s["tokens"] // (b * cfg.seq_len)
            runs = {}
            for opt_name in OPTIMIZERS:
                sweep = []
                lrs = s[f"{opt_name}_lrs"]
                for lr in lrs:
                    bar.set_postfix(batch=b, opt=opt_name, lr=lr)
                    model = G.build(cfg, seed=args.seed)
                    opt = (G.make_optimizer(model, opt_name, lr, args.weight_decay, ns_dtype=ns_dtype,
                                            ns_options=ns_kwargs) if opt_name == "muon"
                           else G.make_optimizer(model, opt_name, lr, args.weight_decay))
                    h = G.train(model, opt, data, batch=b, steps=steps, seed=args.seed, warmup=max(1, steps // 20),
                                eval_every=max(1, steps // s["evals"]), val_count=s["val_count"], progress=bar)
                    bar.update(steps - round(h["tokens"][-1] / (b * cfg.seq_len)))  # diverged runs stop early
                    sweep.append({"lr": lr, **h})
                finite = [r for r in sweep if math.isfinite(r["final_val_loss"])]
                if not finite:
                    raise SystemExit(f"every {opt_name} run diverged at batch {b}; lower its learning rates")
                best = min(finite, key=lambda r: r["final_val_loss"])
                # a best lr at the edge of its grid means the sweep did not bracket the optimum
                at_edge = len(lrs) > 1 and best["lr"] in (min(lrs), max(lrs))
                runs[opt_name] = {"best_lr": best["lr"], "best_lr_at_edge": at_edge,
                                  "curve": {"tokens": best["tokens"], "val_loss": best["val_loss"]},
                                  "final_val_loss": best["final_val_loss"],
                                  "sweep": [{"lr": r["lr"], "final_val_loss": r["final_val_loss"]} for r in sweep]}
            target = max(runs["muon"]["final_val_loss"], runs["adamw"]["final_val_loss"])
            need = {name: tokens_to_reach(r["curve"]["tokens"], r["curve"]["val_loss"], target, (0, initial_loss))
                    for name, r in runs.items()}
            rows.append({"batch_sequences": b, "batch_tokens": b * cfg.seq_len, "steps": steps,
                         "target_loss": target, "muon_tokens": need["muon"], "adamw_tokens": need["adamw"],
                         "token_ratio": need["adamw"] / need["muon"], "muon": runs["muon"], "adamw": runs["adamw"]})
    result = {
        "batches": rows, "settings": s, "model": G.config_dict(cfg), "weight_decay": args.weight_decay,
        "initial_val_loss": initial_loss, "data": data.describe(), "device": "cpu", "torch_threads": args.threads,
        "seed": args.seed, "quick": bool(args.quick), "wall_s": round(time.perf_counter() - start, 1),
        "muon_ns": ns_given or "muon.Muon defaults",
        "token_ratio_definition": "adamw_tokens / muon_tokens to reach the worse of the two best final val losses",
    }
    D.write_result(args, result, "efficiency", plot)
    write_rows(result, Path(args.out))
    if not args.json:
        for r in rows:
            print(f"batch {r['batch_tokens']:>7} tokens: target {r['target_loss']:.4f}  muon {r['muon_tokens']:.0f} "
                  f"(lr {r['muon']['best_lr']:g})  adamw {r['adamw_tokens']:.0f} (lr {r['adamw']['best_lr']:g})  "
                  f"ratio {r['token_ratio']:.3f}")
        print(f"{result['wall_s']} s; wrote {args.out}/efficiency.json")
    return 0


def write_rows(result: dict, out: Path) -> None:
    """efficiency.csv (bench/schema.py): one row per run (its final validation loss) and one per batch
    size (the token ratio)."""
    import torch

    from ..schema import Results

    rows = Results(torch.device("cpu"), "efficiency")
    for r in result["batches"]:
        shape = f"batch={r['batch_tokens']}"
        for name in OPTIMIZERS:
            for run in r[name]["sweep"]:
                rows.add("efficiency_run", name, shape, "auto" if name == "muon" else "float32",
                         metric="final_val_loss", unit="nats per byte token", value=run["final_val_loss"],
                         lr=run["lr"], best=run["lr"] == r[name]["best_lr"], steps=r["steps"])
        rows.add("token_ratio", "adamw/muon", shape, "", metric="token_ratio",
                 unit="adamw tokens / muon tokens to the target", value=r["token_ratio"],
                 target_loss=r["target_loss"], muon_tokens=r["muon_tokens"], adamw_tokens=r["adamw_tokens"])
    rows.write(out, "efficiency")


def plot(result: dict, path: Path) -> None:
    """efficiency.png: bench.plots.efficiency."""
    from .. import plots

    plots.efficiency(result, path)
