"""`python -m bench telescope`: the telescoping hyperparameter sweep over widths with muP.

Algorithm 1 of "Practical Efficiency of Muon for Pretraining" (Essential AI): a full grid of the k
hyperparameters at the base width; then at each doubling of width (a run costs about 4× more) a grid
centred on the previous stage's optimum, with the spacing halved and the points per dimension
multiplied by 4^(-1/k), so each stage costs about the same and the total is O(C·log N) for a final
run cost C. The optimum drifts as O(1/width) under muP, so the finer, smaller grid keeps tracking it.

Points per dimension after the base stage are n0·4^(-s/k) rounded to the nearest odd number (ties
up), so the previous optimum is always a grid point: k = 2 with n0 = 8 gives 8×8 → 5×5 → 3×3 → 1×1,
the paper's grids. Hyperparameters are swept in log2 coordinates (a spacing of 1 is a factor of 2).

The sweep itself (`telescope`) takes any objective(width, point) and any k; the command trains the
bench GPT as a muP model (muon.mup) with Muon, over lr and weight decay by default.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import data as D

Point = tuple[float, ...]


# ------------------------------------------------------------------------------- the schedule
def points_per_dim(n0: int, k: int, stage: int) -> int:
    """Grid points per hyperparameter at `stage` (0 = base width): n0, then odd round(n0·4^(-stage/k))."""
    if n0 < 1 or k < 1 or stage < 0:
        raise ValueError(f"need n0 >= 1, k >= 1, stage >= 0; got n0={n0}, k={k}, stage={stage}")
    if stage == 0:
        return n0
    ideal = n0 * 4.0 ** (-stage / k)
    return 2 * math.floor(ideal / 2) + 1  # nearest odd number, ties up: 4 -> 5, 2 -> 3, 1 -> 1


def grid(center: Sequence[float], spacing: Sequence[float], n: int) -> list[Point]:
    """The n^k points of a grid with the given spacing per dimension, centred on `center`."""
    axes = [[c + (i - (n - 1) / 2) * h for i in range(n)] for c, h in zip(center, spacing, strict=True)]
    return [tuple(p) for p in itertools.product(*axes)]


def widths(base_width: int, final_width: int) -> list[int]:
    """base_width, 2·base_width, ... up to final_width (which must be base_width·2^s)."""
    if base_width < 1 or final_width < base_width:
        raise ValueError(f"need 1 <= base_width <= final_width, got {base_width}, {final_width}")
    out = [base_width]
    while out[-1] < final_width:
        out.append(out[-1] * 2)
    if out[-1] != final_width:
        raise ValueError(f"final_width ({final_width}) must be base_width ({base_width}) times a power of 2")
    return out


MAX_EXTENSIONS = 4  # per stage: slabs added when the best point lies on the grid's edge


def _edge(best: Point, axes: list[list[float]]) -> tuple[int, int] | None:
    """(dimension, -1 low / +1 high) of the first grid edge `best` lies on, or None when inside."""
    for d, (x, axis) in enumerate(zip(best, axes, strict=True)):
        if len(axis) > 1 and x == axis[0]:
            return d, -1
        if len(axis) > 1 and x == axis[-1]:
            return d, 1
    return None


def telescope(
    objective: Callable[[int, Point], float],
    *,
    center: Sequence[float],
    spacing: Sequence[float],
    n0: int,
    base_width: int,
    final_width: int,
    cost: Callable[[int], float] | None = None,
    names: Sequence[str] | None = None,
    progress=None,
    max_extensions: int = MAX_EXTENSIONS,
) -> dict:
    """Run the telescoping sweep; `objective(width, point)` returns the loss (lower is better).

    Grid extension: a stage with more than one point per dimension whose best point lies on an edge
    of its grid (the smallest or largest value of a hyperparameter) did not bracket its optimum; the
    grid is then extended by one slab beyond that edge (one more value of that hyperparameter, at the
    stage's spacing, across every value of the others), and again, until the best point is inside or
    `max_extensions` slabs were added (the stage then says best_on_edge). Stages of one point are the
    transfer itself and are never extended.

    cost(width) is the cost of one run at that width (default (width/base_width)^2: width doubling
    multiplies a transformer's compute per token by about 4). Returns a dict with
    "stages": [{width, points_per_dim, spacing, center, grid: [{point, loss, extension}], best: {point,
    loss}, cost, extensions, best_on_edge}], "best" (the last stage's optimum, at the final width), "cost"
    (total), "brute_force_cost" (the base grid, n0^k runs, at the final width) and
    "cost_ratio_vs_brute_force".
    """
    k = len(center)
    if k == 0 or len(spacing) != k:
        raise ValueError(f"center and spacing need the same k >= 1 entries, got {len(center)} and {len(spacing)}")
    if any(h <= 0 for h in spacing):
        raise ValueError(f"spacing must be > 0 in every dimension, got {list(spacing)}")
    if max_extensions < 0:
        raise ValueError(f"max_extensions must be >= 0, got {max_extensions}")
    names = list(names) if names is not None else [f"x{i}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"names has {len(names)} entries for k = {k} hyperparameters")
    cost = cost or (lambda w: (w / base_width) ** 2)
    stages, total = [], 0.0
    current = tuple(float(c) for c in center)
    for s, width in enumerate(widths(base_width, final_width)):
        n = points_per_dim(n0, k, s)
        h = tuple(x / 2**s for x in spacing)
        axes = [[c + (i - (n - 1) / 2) * hd for i in range(n)] for c, hd in zip(current, h, strict=True)]
        tried: dict[Point, dict] = {}

        def run_grid(extension: int, width=width, axes=axes, tried=tried) -> None:
            new = [tuple(p) for p in itertools.product(*axes) if tuple(p) not in tried]
            if extension and progress is not None and getattr(progress, "total", None) is not None:
                progress.total += len(new)
            for point in new:
                loss = float(objective(width, point))
                tried[point] = {"point": dict(zip(names, point, strict=True)), "loss": loss, "extension": extension}
                if progress is not None:
                    progress.update(1)

        def best_point(tried=tried) -> Point:
            # NaN/inf (diverged) never win; ties go to the first point tried
            return min(tried, key=lambda p: (not math.isfinite(tried[p]["loss"]), tried[p]["loss"]))

        run_grid(0)
        extensions = 0
        edge = _edge(best_point(), axes) if n > 1 else None
        while edge is not None and extensions < max_extensions and math.isfinite(tried[best_point()]["loss"]):
            d, side = edge
            axes[d] = [axes[d][0] - h[d], *axes[d]] if side < 0 else [*axes[d], axes[d][-1] + h[d]]
            extensions += 1
            run_grid(extensions)
            edge = _edge(best_point(), axes)
        best = best_point()
        grid_entries = list(tried.values())
        stage_cost = len(grid_entries) * cost(width)
        total += stage_cost
        stages.append({
            "width": width, "points_per_dim": n, "spacing": dict(zip(names, h, strict=True)),
            "center": dict(zip(names, current, strict=True)),
            "grid": grid_entries, "best": tried[best], "cost": stage_cost, "extensions": extensions,
            "best_on_edge": edge is not None and n > 1,
            "axes": {name: list(axis) for name, axis in zip(names, axes, strict=True)},
        })
        current = best
    brute = n0**k * cost(final_width)
    return {"stages": stages, "best": stages[-1]["best"], "cost": total, "brute_force_cost": brute,
            "cost_ratio_vs_brute_force": total / brute}


def total_runs(n0: int, k: int, n_stages: int) -> int:
    return sum(points_per_dim(n0, k, s) ** k for s in range(n_stages))


# ------------------------------------------------------------------------------------ the CLI
QUICK = dict(base_width=32, final_width=128, depth=2, head_dim=16, seq_len=64, batch=16, steps=150, n0=4)
FULL = dict(base_width=128, final_width=1024, depth=6, head_dim=64, seq_len=256, batch=64, steps=4000, n0=8)
HPARAMS = ("lr", "weight_decay", "adamw_lr")
DEFAULT_CENTERS = {"lr": 0.04, "weight_decay": 0.1, "adamw_lr": 0.008}


def _parse_hparam(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in HPARAMS:
        raise argparse.ArgumentTypeError(f"--hparam name must be one of {HPARAMS}, got {name!r}")
    try:
        v = float(value) if value else DEFAULT_CENTERS[name]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--hparam {name}: centre {value!r} is not a number") from exc
    if not v > 0:
        raise argparse.ArgumentTypeError(f"--hparam {name}: centre must be > 0 (swept in log2), got {v}")
    return name, v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="CPU settings: widths 32->128, 4x4 base grid (minutes)")
    p.add_argument("--hparam", action="append", type=_parse_hparam, metavar="NAME[=CENTRE]",
                   help=f"a swept hyperparameter, one of {HPARAMS}, with its base-grid centre; repeat for k > 1 "
                        "(default: lr and weight_decay)")
    p.add_argument("--spacing", type=float, default=1.0, help="base-grid spacing in log2 units (1 = factor 2)")
    p.add_argument("--max-extensions", type=int, default=MAX_EXTENSIONS,
                   help="slabs a stage may add while its best point lies on its grid's edge (default %(default)s)")
    p.add_argument("--n0", type=int, help="points per hyperparameter in the base grid")
    p.add_argument("--base-width", type=int)
    p.add_argument("--final-width", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--head-dim", type=int, help="heads = width / head_dim (fixed head size as width grows)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch", type=int, help="sequences per step")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--adamw-lr-ratio", type=float, default=0.2,
                   help="AdamW groups' lr = ratio x lr, when adamw_lr is not swept")
    p.add_argument("--weight-decay", type=float, default=0.0, help="when weight_decay is not swept")
    D.add_run_arguments(p, "bench/results/telescope")


def _settings(args) -> dict:
    positive = ("base_width", "final_width", "depth", "head_dim", "seq_len", "batch", "steps", "n0")
    base = D.settings(args, QUICK, FULL, positive)
    if base["base_width"] % base["head_dim"]:
        raise SystemExit(f"--base-width ({base['base_width']}) must be a multiple of --head-dim ({base['head_dim']})")
    return base


def run(args) -> int:
    import torch

    from .. import gpt as G
    from ..common import progress

    torch.set_num_threads(args.threads)
    s = _settings(args)
    hparams = dict(args.hparam or [("lr", DEFAULT_CENTERS["lr"]), ("weight_decay", DEFAULT_CENTERS["weight_decay"])])
    names = list(hparams)
    data = D.load(args.data, max_bytes=args.max_bytes)
    stage_widths = widths(s["base_width"], s["final_width"])
    cfg_at = lambda w: G.GPTConfig(width=w, depth=s["depth"], heads=w // s["head_dim"], seq_len=s["seq_len"])
    tokens = s["steps"] * s["batch"] * s["seq_len"]

    def objective(width: int, point) -> float:
        values = {name: 2.0**x for name, x in zip(names, point, strict=True)}
        lr = values.get("lr", DEFAULT_CENTERS["lr"])
        model = G.build(cfg_at(width), seed=args.seed, mup_base_width=s["base_width"])
        opt = G.make_optimizer(model, "muon", lr, values.get("weight_decay", args.weight_decay),
                               adamw_lr=values.get("adamw_lr", args.adamw_lr_ratio * lr),
                               mup_base_width=s["base_width"])
        return G.train(model, opt, data, batch=s["batch"], steps=s["steps"], seed=args.seed,
                       warmup=max(1, s["steps"] // 20))["final_val_loss"]

    start = time.perf_counter()
    n_runs = total_runs(s["n0"], len(names), len(stage_widths))
    with progress(total=n_runs, desc="telescope runs", unit="run") as bar:
        result = telescope(
            objective, center=[math.log2(hparams[n]) for n in names], spacing=[args.spacing] * len(names),
            n0=s["n0"], base_width=s["base_width"], final_width=s["final_width"], names=names, progress=bar,
            max_extensions=args.max_extensions,
            cost=lambda w: cfg_at(w).flops_per_token() * tokens,
        )
    # log2 coordinates -> values for the reader
    for stage in result["stages"]:
        for entry in stage["grid"] + [stage["best"]]:
            entry["values"] = {n: 2.0 ** entry["point"][n] for n in names}
    result["best"] = result["stages"][-1]["best"]
    result.update({
        "hyperparameters": names, "coordinates": "log2", "cost_unit": "training FLOPs (6N per token + attention)",
        "settings": s, "runs": sum(len(st["grid"]) for st in result["stages"]),
        "wall_s": round(time.perf_counter() - start, 1),
        "data": data.describe(), "device": "cpu", "torch_threads": args.threads, "seed": args.seed,
        "quick": bool(args.quick),
    })
    D.write_result(args, result, "telescope", plot)
    write_rows(result, Path(args.out))
    if not args.json:
        b = result["best"]
        for st in result["stages"]:
            edge = "; best still on the edge" if st["best_on_edge"] else ""
            print(f"width {st['width']}: {len(st['grid'])} run(s) ({st['extensions']} grid extension(s){edge}), "
                  f"best val loss {st['best']['loss']:.4f}")
        values = ", ".join(f"{k} {v:.3g}" for k, v in b["values"].items())
        print(f"best at width {s['final_width']}: {values} (val loss {b['loss']:.4f}); cost vs brute force "
              f"{result['cost_ratio_vs_brute_force']:.3f}; {result['runs']} runs, {result['wall_s']} s")
        print(f"wrote telescope.json, telescope.csv{'' if args.no_plot else ', telescope.png'} in {args.out}")
    return 0


def write_rows(result: dict, out: Path) -> None:
    """telescope.csv (bench/schema.py): one row per run, its final validation loss."""
    import torch

    from ..schema import Results

    rows = Results(torch.device("cpu"), "telescope")
    for i, st in enumerate(result["stages"]):
        for e in st["grid"]:
            rows.add("telescope_run", "muon.Muon (muP)", f"width={st['width']}", "auto", metric="final_val_loss",
                     unit="nats per byte token", value=e["loss"], stage=i, log2_point=e["point"], values=e["values"],
                     extension=e["extension"], best=e is st["best"])
    rows.write(out, "telescope")


def plot(result: dict, path: Path) -> None:
    """telescope.png: bench.plots.telescope."""
    from .. import plots

    plots.telescope(result, path)
