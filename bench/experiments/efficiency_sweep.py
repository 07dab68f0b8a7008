"""`python -m bench efficiency --preset cpu|gpu`: the data-efficiency sweep a reader can check.

Method (docs/efficiency.md defends it): a byte-level GPT trained to about 20 tokens per non-embedding
parameter at 4 batch sizes 4x apart; at each batch size each optimizer is swept over a learning-rate
grid (factor 2) with seed 0, the grid extended past an edge while the best lr sits on it, and the best
lr is rerun with further seeds (same init, data order and validation batches per seed for both
optimizers). Every run is warmup-stable-decay (linear decay over the last 20 % of its steps) and
yields, from one trajectory, the end-of-decay validation loss of runs of 9 lengths (the full length
times 2^(-k/2), k = 0..8: `bench.gpt.train_wsd`), so "tokens to reach a loss" is read only where a run
has finished its decay, never off a constant-lr curve.

Runs are cached one per line in <out>/runs.jsonl (with the settings that made them: a line of other
settings is ignored), so an interrupted sweep resumes where it stopped; `plan` says which runs are still
needed given the cache, `analyze` turns the cache into R(B) and the critical batch sizes.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from .. import data as D

OPTIMIZERS = ("muon", "adamw")
# 0.115 M non-embedding parameters (blocks, final norm and the untied 256 x 64 head) on 2.36 M tokens
# (20.5 tokens per parameter); 4 batch sizes 4x apart, 256 to 16,384 tokens. 58 runs; 1 h 56 min on the 2-core machine
# while other jobs shared it (bench/results/efficiency_cpu).
CPU = dict(width=64, depth=2, head_dim=16, seq_len=64, batches=[4, 16, 64, 256], tokens=2_359_296,
           muon_lrs=[2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2], adamw_lrs=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3], seeds=3,
           val_count=16, workers=2, device="cpu")
# 3.2 M non-embedding parameters on 2^26 tokens (20.9 per parameter), 4k to 262k tokens per batch.
GPU = dict(width=256, depth=4, head_dim=64, seq_len=256, batches=[16, 64, 256, 1024], tokens=2**26,
           muon_lrs=[1.25e-3, 2.5e-3, 5e-3, 1e-2, 2e-2], adamw_lrs=[2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3], seeds=3,
           val_count=32, workers=1, device="cuda")
PRESETS = {"cpu": CPU, "gpu": GPU}
COMMON = dict(weight_decay=0.1, clip=1.0, warmup_frac=0.05, decay_frac=0.2, lengths=9, lr_factor=2.0,
              max_extensions=3)
RUN_KEYS = ("width", "depth", "head_dim", "seq_len", "tokens", "val_count", "weight_decay", "clip",
            "warmup_frac", "decay_frac", "lengths", "device", "data", "max_bytes")


def non_embedding_params(model) -> int:
    """Parameters outside the token and position embeddings (the untied output head counts)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("tok_emb.", "pos_emb.")))


def run_lengths(steps: int, count: int) -> list[int]:
    """The run lengths read from one trajectory of `steps`: steps·2^(-k/2), k = 0..count-1."""
    return sorted({max(1, round(steps * 2 ** (-k / 2))) for k in range(count)})


def lr_key(lr: float) -> str:
    return f"{lr:.6g}"


def settings(args) -> dict:
    s = {**COMMON, **PRESETS[args.preset]}
    for key in ("width", "depth", "head_dim", "seq_len", "batches", "tokens", "val_count", "seeds", "workers",
                "device", "weight_decay", "max_extensions"):
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    for name in OPTIMIZERS:
        given = getattr(args, f"{name}_lrs", None) or getattr(args, "lrs", None)
        if given is not None:
            s[f"{name}_lrs"] = sorted(given)
    s["optimizers"] = tuple(getattr(args, "optimizers", None) or OPTIMIZERS)
    s["data"], s["max_bytes"] = args.data, args.max_bytes
    if s["width"] % s["head_dim"]:
        raise SystemExit(f"--width ({s['width']}) must be a multiple of --head-dim ({s['head_dim']})")
    for b in s["batches"]:
        if b < 1 or s["tokens"] % (b * s["seq_len"]):
            raise SystemExit(f"--tokens ({s['tokens']}) must be a multiple of every batch's tokens "
                             f"({b} x {s['seq_len']})")
    if min(s["seeds"], s["workers"]) < 1:
        raise SystemExit("--seeds and --workers must be >= 1")
    return s


def steps_of(s: dict, batch: int) -> int:
    return s["tokens"] // (batch * s["seq_len"])


# ------------------------------------------------------------------------------------------ cache
def run_config(s: dict) -> dict:
    """The settings a cached run must share with this sweep to be reused."""
    return {k: s[k] for k in RUN_KEYS}


def load_cache(path: Path, s: dict) -> dict[tuple, dict]:
    """{(batch, optimizer, lr_key, seed): run} of the runs in `path` made with this sweep's settings."""
    done: dict[tuple, dict] = {}
    if not path.exists():
        return done
    want = run_config(s)
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut short by an interrupted write
        if r.get("config") == want:
            done[(r["batch"], r["optimizer"], lr_key(r["lr"]), r["seed"])] = r
    return done


def append_run(path: Path, run: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(run) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------- plan
def final_loss(run: dict) -> float:
    return run["decayed"][-1]


def grid_state(s: dict, done: dict, batch: int, name: str) -> dict:
    """One (batch size, optimizer) grid given the cache: the lrs tried so far (the preset's grid and its
    extensions), the seed-0 run still missing, the best lr, how far the grid was extended each way and
    whether the best lr is still on an edge."""
    grid = [float(lr_key(lr)) for lr in s[f"{name}_lrs"]]
    tried = sorted({*grid, *(float(k[2]) for k in done if k[:2] == (batch, name) and k[3] == 0)})
    missing = [lr for lr in tried if (batch, name, lr_key(lr), 0) not in done]
    state = {"grid": grid, "tried": tried, "missing": missing, "best": None, "next": None, "at_edge": False,
             "below": sum(lr < min(grid) for lr in tried), "above": sum(lr > max(grid) for lr in tried)}
    if missing:
        return state
    finals = {lr: final_loss(done[(batch, name, lr_key(lr), 0)]) for lr in tried}
    finite = [lr for lr in tried if math.isfinite(finals[lr])]
    best = min(finite, key=lambda lr: finals[lr]) if finite else tried[0]
    state["best"] = best
    if best == tried[0] and state["below"] < s["max_extensions"]:
        state["next"] = float(lr_key(best / s["lr_factor"]))
    elif best == tried[-1] and finite and state["above"] < s["max_extensions"]:
        state["next"] = float(lr_key(best * s["lr_factor"]))
    state["at_edge"] = best in (tried[0], tried[-1])
    return state


def plan(s: dict, done: dict) -> list[tuple[int, str, float, int]]:
    """The runs (batch, optimizer, lr, seed) that can start now: the grids' seed-0 runs, one extension
    beyond an edge a finished grid's best lr sits on, then the further seeds at each settled best lr."""
    jobs = []
    for batch in s["batches"]:
        for name in s.get("optimizers", OPTIMIZERS):
            st = grid_state(s, done, batch, name)
            if st["missing"]:
                jobs += [(batch, name, lr, 0) for lr in st["missing"]]
            elif st["next"] is not None:
                jobs.append((batch, name, st["next"], 0))
            else:
                jobs += [(batch, name, st["best"], seed) for seed in range(1, s["seeds"])
                         if (batch, name, lr_key(st["best"]), seed) not in done]
    return jobs


def job_cost(s: dict, job: tuple) -> float:
    """Relative cost of a run (for scheduling the longest first): steps times (sequences + a per-step
    overhead worth ~8 sequences, twice that for Muon's NS on this model's small matrices)."""
    batch, name = job[0], job[1]
    return steps_of(s, batch) * (batch + (16 if name == "muon" else 8))


# -------------------------------------------------------------------------------------------- run
_WORKER: dict = {}


def _init_worker(s: dict, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER["data"] = D.load(s["data"], max_bytes=s["max_bytes"])


def train_one(s: dict, job: tuple) -> dict:
    """One run of the sweep: batch, optimizer, lr, seed; the record cached in runs.jsonl."""
    import torch

    from .. import gpt as G
    from ..common import git_commit

    batch, name, lr, seed = job
    if "data" not in _WORKER:
        _init_worker(s, torch.get_num_threads())
    data = _WORKER["data"]
    device = torch.device(s["device"])
    cfg = G.GPTConfig(width=s["width"], depth=s["depth"], heads=s["width"] // s["head_dim"], seq_len=s["seq_len"])
    model = G.build(cfg, seed=seed).to(device)
    opt = G.make_optimizer(model, name, lr, s["weight_decay"])
    steps = steps_of(s, batch)
    val = D.val_batches(data.val, 16, cfg.seq_len, s["val_count"])
    start = time.perf_counter()
    h = G.train_wsd(model, opt, data, batch=batch, lengths=run_lengths(steps, s["lengths"]),
                    warmup=max(1, round(s["warmup_frac"] * steps)), decay_frac=s["decay_frac"], seed=seed,
                    val=val, clip=s["clip"], device=device)
    wall = time.perf_counter() - start
    tokens = [n * batch * cfg.seq_len for n in h["lengths"]]
    return {"config": run_config(s), "batch": batch, "optimizer": name, "lr": lr, "seed": seed, "steps": steps,
            "batch_tokens": batch * cfg.seq_len, "lengths": h["lengths"], "tokens": tokens,
            "decayed": h["decayed"], "stable": h["stable"], "params": non_embedding_params(model),
            "wall_s": round(wall, 1), "commit": git_commit(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def sweep(s: dict, cache: Path, threads: int = 1, log=print) -> dict:
    """Run what `plan` asks for until it asks for nothing, `workers` runs at a time, each run appended
    to `cache` as it ends; returns the cache's runs."""
    done = load_cache(cache, s)
    start, new = time.perf_counter(), 0
    if done:
        log(f"resuming: {len(done)} runs cached in {cache}")

    def finished(run: dict) -> None:
        nonlocal new
        append_run(cache, run)
        done[(run["batch"], run["optimizer"], lr_key(run["lr"]), run["seed"])] = run
        new += 1
        left = plan(s, done)
        log(f"[{len(done)} done, {len(left)}+ to go, {time.perf_counter() - start:.0f} s] batch {run['batch']} "
            f"{run['optimizer']} lr {run['lr']:g} seed {run['seed']}: final val loss {final_loss(run):.4f} "
            f"({run['wall_s']:.0f} s)")

    if s["workers"] == 1:
        _init_worker(s, threads)
        while jobs := plan(s, done):
            finished(train_one(s, max(jobs, key=lambda j: job_cost(s, j))))
        return done
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(s["workers"], mp_context=ctx, initializer=_init_worker, initargs=(s, threads)) as ex:
        inflight: dict = {}
        while True:
            ready = [j for j in plan(s, done) if j not in inflight.values()]
            for job in sorted(ready, key=lambda j: -job_cost(s, j))[: s["workers"] - len(inflight)]:
                inflight[ex.submit(train_one, s, job)] = job
            if not inflight:
                break
            finished_now, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for fut in finished_now:
                del inflight[fut]
                finished(fut.result())
    return done


# ---------------------------------------------------------------------------------------- analyze
def tokens_to(tokens: list[float], losses: list[float], target: float) -> tuple[float, str]:
    """Tokens at which the end-of-decay losses of runs of increasing length first reach `target`:
    their running minimum, interpolated linearly in log tokens. Returns (tokens, how): "interpolated";
    "at most" when even the shortest run reaches it (its tokens are an upper bound); "not reached"
    (inf) when the longest does not."""
    best, xs, ys = math.inf, [], []
    for t, loss in zip(tokens, losses, strict=True):
        best = min(best, loss)
        xs.append(math.log(t))
        ys.append(best)
    if ys[0] <= target:
        return float(tokens[0]), "at most"
    for i in range(1, len(xs)):
        if ys[i] <= target:
            y0, y1 = ys[i - 1], ys[i]
            if not math.isfinite(y0):  # the shorter runs diverged: this length is all that is known
                return float(tokens[i]), "at most"
            x = xs[i] if y0 == y1 else xs[i - 1] + (xs[i] - xs[i - 1]) * (y0 - target) / (y0 - y1)
            return math.exp(x), "interpolated"
    return math.inf, "not reached"


def _mean_sd(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.inf, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else math.nan


def fit_critical(batch_tokens: list[float], tokens: list[float]) -> dict:
    """McCandlish et al.'s E(B) = E_min·(1 + B/B_crit) fitted to tokens-to-target E at batch B by least
    squares on the relative error (E is linear in B: weights 1/E). B_crit is the batch whose tokens
    are twice the minimum; `bracketed` when it lies between the smallest and largest batch measured."""
    pts = [(b, e) for b, e in zip(batch_tokens, tokens, strict=True) if math.isfinite(e)]
    if len(pts) < 2:
        return {"e_min": math.nan, "b_crit": math.nan, "bracketed": False}
    w = [1 / e**2 for _, e in pts]
    sw, sb, se = sum(w), sum(wi * b for wi, (b, _) in zip(w, pts)), sum(wi * e for wi, (_, e) in zip(w, pts))
    sbb = sum(wi * b * b for wi, (b, _) in zip(w, pts))
    sbe = sum(wi * b * e for wi, (b, e) in zip(w, pts))
    det = sw * sbb - sb * sb
    a = (sbb * se - sb * sbe) / det
    c = (sw * sbe - sb * se) / det
    b_crit = a / c if c > 0 and a > 0 else math.inf
    lo, hi = min(b for b, _ in pts), max(b for b, _ in pts)
    return {"e_min": a, "b_crit": b_crit, "bracketed": bool(lo <= b_crit <= hi)}


def analyze(s: dict, done: dict) -> dict:
    """R(B) and the critical batch sizes from the cached runs (those a finished plan asked for).

    Per batch size: each optimizer's best lr (seed 0's final loss over its grid); the target loss is the
    highest final (longest-run) loss among both optimizers' seeds at their best lrs, so every one of
    those runs reaches it; per seed, R = AdamW's tokens / Muon's tokens to the target, read off the
    end-of-decay losses (`tokens_to`), reported as mean and sample standard deviation over seeds. A
    check with lrs tuned at every length: the same reading on the lower envelope of seed 0's grid.
    Critical batch: per optimizer, tokens to the highest final loss over batch sizes (seed means),
    fitted by `fit_critical`.
    """
    rows = []
    for batch in s["batches"]:
        row: dict = {"batch_sequences": batch, "batch_tokens": batch * s["seq_len"], "steps": steps_of(s, batch)}
        for name in OPTIMIZERS:
            st = grid_state(s, done, batch, name)
            if st["best"] is None:
                continue
            best = st["best"]
            seeds = [done[k] for k in ((batch, name, lr_key(best), sd) for sd in range(s["seeds"])) if k in done]
            grid = [done[(batch, name, lr_key(lr), 0)] for lr in st["tried"]]
            envelope = [min(r["decayed"][i] for r in grid) for i in range(len(grid[0]["decayed"]))]
            row[name] = {"best_lr": best, "best_lr_at_edge": st["at_edge"], "grid": st["grid"],
                         "extensions": {"below": st["below"], "above": st["above"]},
                         "sweep": [{"lr": r["lr"], "final_val_loss": final_loss(r)} for r in grid],
                         "tokens": seeds[0]["tokens"], "seeds": [r["seed"] for r in seeds],
                         "decayed": [r["decayed"] for r in seeds], "envelope": envelope,
                         "final_val_loss": [final_loss(r) for r in seeds], "params": seeds[0]["params"]}
            row["lengths"] = seeds[0]["lengths"]
        if not all(name in row for name in OPTIMIZERS):
            rows.append(row)
            continue
        common = [sd for sd in row["muon"]["seeds"] if sd in row["adamw"]["seeds"]]
        target = max(f for name in OPTIMIZERS for f in row[name]["final_val_loss"])
        row["target_loss"], row["seeds"] = target, common
        # every seed of both optimizers run, both grids settled: otherwise a partial row (an unfinished sweep)
        row["complete"] = len(common) == s["seeds"] and all(
            not plan({**s, "batches": [batch], "optimizers": (n,)}, done) for n in OPTIMIZERS)
        per_seed = []
        for sd in common:
            need = {}
            for name in OPTIMIZERS:
                i = row[name]["seeds"].index(sd)
                need[name] = tokens_to(row[name]["tokens"], row[name]["decayed"][i], target)
            per_seed.append({"seed": sd, "muon_tokens": need["muon"][0], "adamw_tokens": need["adamw"][0],
                             "muon_read": need["muon"][1], "adamw_read": need["adamw"][1],
                             "ratio": need["adamw"][0] / need["muon"][0]})
        row["per_seed"] = per_seed
        row["ratio_mean"], row["ratio_sd"] = _mean_sd([p["ratio"] for p in per_seed])
        env = {n: tokens_to(row[n]["tokens"], row[n]["envelope"], target)[0] for n in OPTIMIZERS}
        row["ratio_envelope_seed0"] = env["adamw"] / env["muon"]
        rows.append(row)
    complete = [r for r in rows if r.get("complete")]
    critical = {}
    for name in OPTIMIZERS:
        means = {r["batch_tokens"]: [statistics.fmean(c) for c in zip(*r[name]["decayed"], strict=True)]
                 for r in complete}
        if not means:
            continue
        target = max(curve[-1] for curve in means.values())
        reads = {b: tokens_to(complete[i][name]["tokens"], curve, target) for i, (b, curve) in enumerate(means.items())}
        fit = fit_critical(list(reads), [t for t, _ in reads.values()])
        critical[name] = {"target_loss": target, "tokens": {str(b): t for b, (t, _) in reads.items()},
                          "read": {str(b): how for b, (_, how) in reads.items()}, **fit}
    params = next((r[n]["params"] for r in rows for n in OPTIMIZERS if n in r), None)
    return {"batches": rows, "critical_batch": critical, "params": params,
            "tokens_per_param": s["tokens"] / params if params else None,
            "complete": len(complete) == len(s["batches"]),
            "ratio_definition": "per seed, AdamW tokens / Muon tokens to reach the batch size's target loss (the "
            "highest final loss of both optimizers' seeds at their best lrs), read off end-of-decay losses of "
            "warmup-stable-decay runs of 9 lengths; mean and sample sd over seeds"}


# ------------------------------------------------------------------------------------------ write
def write_rows(s: dict, done: dict, result: dict, out: Path) -> None:
    """efficiency.csv / efficiency.json (bench/schema.py): one row per run (its final validation loss) and
    one per batch size and seed (R), each with seed, lr, best, tokens and params in `extra`."""
    import torch

    from ..schema import Results

    rows = Results(torch.device(s["device"] if s["device"] != "cuda" or torch.cuda.is_available() else "cpu"),
                   "efficiency")
    best = {(r["batch_sequences"], n): r[n]["best_lr"] for r in result["batches"] for n in OPTIMIZERS if n in r}
    for (batch, name, _, seed), run in sorted(done.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[1]["lr"], kv[0][3])):
        if batch not in s["batches"]:
            continue
        rows.add("efficiency_run", name, f"batch={run['batch_tokens']}", "auto" if name == "muon" else "float32",
                 metric="final_val_loss", unit="nats per byte token", value=final_loss(run), seed=seed,
                 lr=run["lr"], best=run["lr"] == best.get((batch, name)), tokens=run["tokens"][-1],
                 params=run["params"], steps=run["steps"], end_of_decay={"tokens": run["tokens"],
                                                                         "val_loss": run["decayed"]})
    for r in result["batches"]:
        if "per_seed" not in r:
            continue
        lr = {n: r[n]["best_lr"] for n in OPTIMIZERS}
        for p in r["per_seed"]:
            rows.add("token_ratio", "adamw/muon", f"batch={r['batch_tokens']}", "", metric="token_ratio",
                     unit="adamw tokens / muon tokens to the target", value=p["ratio"], seed=p["seed"], lr=lr,
                     best=True, tokens={"muon": p["muon_tokens"], "adamw": p["adamw_tokens"]},
                     params=result["params"], target_loss=r["target_loss"],
                     read={"muon": p["muon_read"], "adamw": p["adamw_read"]})
        rows.add("token_ratio_mean", "adamw/muon", f"batch={r['batch_tokens']}", "", metric="token_ratio",
                 unit="mean over seeds (sd in extra)", value=r["ratio_mean"], seed=r["seeds"], lr=lr, best=True,
                 tokens=s["tokens"], params=result["params"], sd=r["ratio_sd"], target_loss=r["target_loss"],
                 ratio_envelope_seed0=r["ratio_envelope_seed0"])
    rows.write(out, "efficiency")


def run(args) -> int:
    """The sweep of --preset cpu|gpu: run what the cache lacks, then analyze and write."""
    import torch

    s = settings(args)
    out = Path(args.out)
    cache = out / "runs.jsonl"
    log = (lambda *a: None) if os.environ.get("MUON_BENCH_QUIET") else (lambda m: print(m, file=sys.stderr,
                                                                                        flush=True))
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu: no CUDA device here (pass --device cpu to run its sizes on the CPU)")
    start = time.perf_counter()
    done = sweep(s, cache, threads=args.threads, log=log)
    result = {"preset": args.preset, "settings": s, **analyze(s, done),
              "runs": len(done), "run_wall_s": round(sum(r["wall_s"] for r in done.values()), 1),
              "this_call_wall_s": round(time.perf_counter() - start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "efficiency_sweep.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_rows(s, done, result, out)
    if not args.no_plot:
        from .. import plots

        plots.efficiency_sweep(result, out / "efficiency.png")
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for r in result["batches"]:
            if "per_seed" in r:
                print(f"batch {r['batch_tokens']:>6} tokens: target {r['target_loss']:.4f}  "
                      f"muon lr {r['muon']['best_lr']:g}  adamw lr {r['adamw']['best_lr']:g}  "
                      f"R = {r['ratio_mean']:.3f} ± {r['ratio_sd']:.3f} over seeds {r['seeds']}")
        for name, c in result["critical_batch"].items():
            print(f"{name}: critical batch {c['b_crit']:.0f} tokens (bracketed: {c['bracketed']})")
        print(f"{result['runs']} runs, {result['run_wall_s']} s of runs; wrote {out}")
    return 0
