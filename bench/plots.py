"""Every plot of `python -m bench`, one function per command, drawn from that command's rows.

Timed plots (step, kernels) read bench/schema.py rows and draw medians over interleaved rounds with
min–max whiskers; their titles say so. The others draw what their command computed (FLOP counts,
sweep losses, error against the polar factor). matplotlib is optional: without it `pyplot()` says
once how to get plots and every function returns None; the numbers never depend on it.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

_PLOT_NOTE = {"said": False}


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (saying once how to get plots) when matplotlib is
    not installed."""
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


def _save(fig, path: Path, plt, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **{"dpi": 120, **kwargs})
    plt.close(fig)
    return path


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _where(row: dict) -> str:
    return f"{row.get('device', '?')}, commit {row.get('commit', '?')}"


# ------------------------------------------------------------------------------------------ step
def step(rows: list[dict], path: Path) -> Path | None:
    """One panel per model: each optimizer's median step time as a bar, its Newton–Schulz part
    (timed inside the same steps) as the bar's first segment, min–max of the step over the rounds
    as a whisker."""
    plt = pyplot()
    if plt is None:
        return None
    steps = [r for r in rows if r["op"] == "optimizer_step" and r["status"] == "ok"]
    parts = {(r["provider"], r["shape"]): r for r in rows if r["op"] == "newton_schulz_in_step"
             and r["status"] == "ok"}
    models = list(dict.fromkeys(r["shape"] for r in steps))
    most = max(sum(r["shape"] == m for r in steps) for m in models)
    fig, axes = plt.subplots(1, len(models), figsize=(max(7.5, 5.6 * len(models)), 0.5 * most + 2.6),
                             squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in steps if r["shape"] == model]
        y = list(range(len(mine)))
        total = [r["median"] for r in mine]
        ns = [parts[(r["provider"], model)]["median"] if (r["provider"], model) in parts else 0.0 for r in mine]
        ax.barh(y, ns, color="C0", label="Newton–Schulz part (timed inside the same steps)")
        ax.barh(y, [t - n for t, n in zip(total, ns, strict=True)], left=ns, color="C1", label="rest of the step")
        err = [[r["median"] - r["low"] for r in mine], [r["high"] - r["median"] for r in mine]]
        ax.errorbar(total, y, xerr=err, fmt="none", ecolor="black", elinewidth=0.8, capsize=3,
                    label="min–max over the rounds")
        for i, (r, n) in enumerate(zip(mine, ns, strict=True)):
            label = f"  {_num(r['median'])} ms" + (f", NS {_num(n)}" if n else "") + (" (noisy)" if r["flag"] else "")
            ax.text(r["high"], i, label, va="center", fontsize=7)
        ax.set_yticks(y, [r["provider"] for r in mine], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"step time, ms (median; {mine[0].get('clock') or '?'})")
        ax.set_title(textwrap.fill(f"{model}: median of {mine[0]['rounds']} interleaved rounds", 60), fontsize=9)
        ax.set_xlim(0, max(r["high"] for r in mine) * 1.45)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=2)
    fig.suptitle(f"One optimizer step, {_where(steps[0])}", fontsize=9)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    return _save(fig, path, plt)


# --------------------------------------------------------------------------------------- kernels
def kernels(rows: list[dict], path: Path) -> Path | None:
    """Effective TFLOP/s per NS input shape, one marker per provider (the median over the rounds,
    whiskers from the rounds' slowest and fastest sample), the same run's X·Xᵀ GEMM as a dashed
    line and its large square GEMM as the device line."""
    plt = pyplot()
    if plt is None:
        return None
    ok = [r for r in rows if r["status"] == "ok" and r["metric"] == "time"]
    timed = [r for r in ok if r["extra"].get("kind") != "peak"]
    shapes = list(dict.fromkeys(r["shape"] for r in timed))
    providers = list(dict.fromkeys(r["provider"] for r in timed if r["op"] == "newton_schulz"))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.8 * len(shapes) + 4), 4.6))
    x = {s: i for i, s in enumerate(shapes)}

    def rate(r, ms):
        return r["extra"]["tflops"] * r["median"] / ms

    gemm = [r for r in timed if r["op"] == "gemm"]
    ax.plot([x[r["shape"]] for r in gemm], [r["extra"]["tflops"] for r in gemm], "k--", marker="_",
            label="GEMM X·Xᵀ of the shape (same run)")
    width = 0.6 / max(1, len(providers))
    for j, provider in enumerate(providers):
        mine = [r for r in timed if r["provider"] == provider]
        xs = [x[r["shape"]] - 0.3 + (j + 0.5) * width for r in mine]
        ys = [r["extra"]["tflops"] for r in mine]
        err = [[y - rate(r, r["high"]) for y, r in zip(ys, mine, strict=True)],
               [rate(r, r["low"]) - y for y, r in zip(ys, mine, strict=True)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", markersize=4, linestyle="", capsize=2, elinewidth=0.7,
                    label=f"{provider} ({mine[0]['dtype']})")
    peak = [r for r in ok if r["extra"].get("kind") == "peak"]
    if peak:
        # effective TFLOP/s counts NS as non-symmetric GEMMs: a symmetric kernel can sit above this line
        ax.axhline(peak[0]["extra"]["tflops"], color="grey", linewidth=0.8,
                   label=f"square GEMM {peak[0]['shape']} {peak[0]['dtype']} (device rate, same run)")
    ax.set_xticks(range(len(shapes)), shapes, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("NS input shape B×m×n (batch × rows × columns)")
    ax.set_ylabel("effective TFLOP/s (standard-NS FLOPs / median time)")
    clock = timed[0].get("clock") if timed else ""
    ax.set_yscale("log")
    rounds = timed[0]["rounds"] if timed else "?"
    ax.set_title(f"Newton–Schulz per provider (compute dtype in the legend), median of {rounds} interleaved "
                 f"rounds ({clock}), whiskers min–max\n{_where(ok[0]) if ok else ''}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _save(fig, path, plt, bbox_inches="tight")


# ------------------------------------------------------------------------------------------ flops
def flops_overhead(reports: list, sweep: list[int], path: Path) -> Path | None:
    """Muon's FLOP overhead over AdamW against the batch, one panel per model family (analytic)."""
    plt = pyplot()
    if plt is None:
        return None
    families: dict[str, list] = {}
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
                 "dashed: Keller's bound T·d/B", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, plt)


# -------------------------------------------------------------------------------------- telescope
def telescope(result: dict, path: Path) -> Path | None:
    """One panel per stage (width), each on its own axes so every run of the stage is drawn: a square
    per run coloured by its validation loss (written beside it), runs added by grid extensions
    outlined in red, the stage's best starred."""
    plt = pyplot()
    if plt is None:
        return None
    names = result["hyperparameters"]
    stages = result["stages"]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.4 * len(stages), 4.2), squeeze=False,
                             constrained_layout=True)
    finite = [e["loss"] for st in stages for e in st["grid"] if math.isfinite(e["loss"])]
    vmin, vmax = (min(finite), max(finite)) if finite else (0, 1)
    sc = None
    for ax, st in zip(axes[0], stages, strict=True):
        grid = st["grid"]
        xs = [e["point"][names[0]] for e in grid]
        ys = [e["point"][names[1]] if len(names) > 1 else e["loss"] for e in grid]
        cs = [e["loss"] if math.isfinite(e["loss"]) else vmax for e in grid]
        edges = ["red" if e.get("extension") else "none" for e in grid]
        sc = ax.scatter(xs, ys, c=cs, cmap="viridis_r", vmin=vmin, vmax=vmax, s=150 if len(names) > 1 else 40,
                        marker="s", edgecolors=edges, linewidths=1.5)
        for x, y, e in zip(xs, ys, grid, strict=True):
            ax.annotate(f"{e['loss']:.3f}" if math.isfinite(e["loss"]) else "nan", (x, y), fontsize=5,
                        xytext=(0, -11), textcoords="offset points", ha="center")
        best = st["best"]["point"]
        ax.plot(best[names[0]], best[names[1]] if len(names) > 1 else st["best"]["loss"], "r*", ms=13)
        pad = lambda vals, h: (min(vals) - 0.6 * h, max(vals) + 0.6 * h)  # noqa: E731
        hx = st["spacing"][names[0]]
        ax.set_xlim(*pad(xs, hx))
        if len(names) > 1:
            ax.set_ylim(*pad(ys, st["spacing"][names[1]]))
            ax.set_ylabel(f"log2 {names[1]}")
        else:
            ax.set_ylabel("val loss")
        ax.set_xlabel(f"log2 {names[0]}")
        n, ext = st["points_per_dim"], st.get("extensions", 0)
        grid_text = "×".join([str(n)] * len(names))
        ext_text = f" + {ext} extension{'s' if ext != 1 else ''}" if ext else ""
        edge = ", best still on the edge" if st.get("best_on_edge") else ""
        runs = f"{len(grid)} run{'s' if len(grid) != 1 else ''}"
        ax.set_title(f"width {st['width']}: {runs} drawn ({grid_text} grid{ext_text}{edge})\n"
                     f"best {st['best']['loss']:.3f} (star)", fontsize=8)
    fig.colorbar(sc, ax=axes[0].tolist(), label="val loss")
    fig.suptitle(f"telescoping sweep ({result.get('device', '?')}{', quick' if result.get('quick') else ''}): "
                 f"every run, red outline = added by a grid extension; cost "
                 f"{result['cost_ratio_vs_brute_force']:.2f}x of a brute-force grid at the final width", fontsize=9)
    return _save(fig, path, plt, dpi=110, bbox_inches="tight")


# ------------------------------------------------------------------------------------- efficiency
def efficiency(result: dict, path: Path) -> Path | None:
    """Per batch size the best-lr validation curves of both optimizers and the common target; then
    the token ratio R_L(B) against the batch."""
    plt = pyplot()
    if plt is None:
        return None
    rows = result["batches"]
    fig, axes = plt.subplots(1, len(rows) + 1, figsize=(4 * (len(rows) + 1), 3.6), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=False):
        for name, style in (("muon", "C0-"), ("adamw", "C1-")):
            c = r[name]["curve"]
            ax.plot(c["tokens"], c["val_loss"], style, label=f"{name} (lr {r[name]['best_lr']:g})")
            if math.isfinite(r[f"{name}_tokens"]):
                ax.axvline(r[f"{name}_tokens"], color=style[:2], ls=":", lw=1, label=f"{name} reaches target")
        ax.axhline(r["target_loss"], color="gray", ls="--", lw=1, label="target (worse best final loss)")
        ax.set_title(f"batch {r['batch_tokens']} tokens: ratio {r['token_ratio']:.2f}", fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("val loss")
        lo = min(min(r["muon"]["curve"]["val_loss"]), min(r["adamw"]["curve"]["val_loss"]))
        ax.set_ylim(lo - 0.05, lo + 1.0)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    ax.plot([r["batch_tokens"] for r in rows], [r["token_ratio"] for r in rows], "ko-", label="measured")
    ax.axhline(1.0, color="gray", lw=1, label="1.0: equal tokens")
    ax.axhline(1.1, color="gray", ls="--", lw=1, label="1.1: the paper's ~10 %")
    ax.legend(fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch tokens")
    ax.set_ylabel("token ratio adamw / muon")
    ax.set_title("R_L(B)", fontsize=9)
    fig.suptitle(f"Muon vs AdamW data efficiency ({result['device']}{', quick' if result['quick'] else ''}, "
                 f"width {result['model']['width']}, depth {result['model']['depth']})", fontsize=9)
    return _save(fig, path, plt, dpi=110, bbox_inches="tight")


def efficiency_sweep(result: dict, path: Path) -> Path | None:
    """The sweep of `--preset cpu|gpu` (bench/experiments/efficiency_sweep.py): R(B) with its mean ± sd over seeds
    beside the papers' figures; tokens to each optimizer's common target against the batch (the critical
    batch fit); then per batch size the end-of-decay validation loss against tokens (mean over seeds,
    min–max shaded) of both optimizers at their best lrs, with the target."""
    plt = pyplot()
    if plt is None:
        return None
    rows = [r for r in result["batches"] if "per_seed" in r]
    if not rows:
        return None
    fig, axes = plt.subplots(2, max(2, len(rows)), figsize=(4.2 * max(2, len(rows)), 7.6), squeeze=False)
    ax = axes[0][0]
    bt = [r["batch_tokens"] for r in rows]
    ax.errorbar(bt, [r["ratio_mean"] for r in rows], fmt="ko-", capsize=4,
                yerr=[r["ratio_sd"] if math.isfinite(r["ratio_sd"]) else 0.0 for r in rows],
                label="measured (mean ± sd over seeds)")
    for r in rows:
        ax.plot([r["batch_tokens"]] * len(r["per_seed"]), [p["ratio"] for p in r["per_seed"]], "k.", alpha=0.4)
    ax.plot(bt, [r["ratio_envelope_seed0"] for r in rows], "s:", color="C2", ms=4,
            label="lr tuned per length (seed 0)")
    ax.axhline(1.0, color="gray", lw=1)
    ax.axhspan(1.10, 1.15, color="C1", alpha=0.2, label="Essential AI: 1.10–1.15")
    ax.axhspan(1.1, 1.4, color="C0", alpha=0.08, label="Wen et al.: 1.1 (1.2B) – 1.4 (0.1B)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch tokens")
    ax.set_ylabel("R(B) = AdamW tokens / Muon tokens")
    ax.set_title("token ratio to the same loss", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for name, style in (("muon", "C0o-"), ("adamw", "C1s-")):
        c = result["critical_batch"].get(name)
        if not c:
            continue
        xs = [int(b) for b in c["tokens"]]
        ax.plot(xs, list(c["tokens"].values()), style,
                label=f"{name}: to {c['target_loss']:.3f}, B_crit ≈ {c['b_crit']:.3g}")
        if math.isfinite(c["b_crit"]):
            grid = [min(xs) * (max(xs) / min(xs)) ** (i / 40) for i in range(41)]
            ax.plot(grid, [c["e_min"] * (1 + b / c["b_crit"]) for b in grid], style[:2] + ":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch tokens")
    ax.set_ylabel("tokens to the target (seed mean)")
    ax.set_title("critical batch: E(B) = E_min (1 + B / B_crit)", fontsize=9)
    if result["critical_batch"]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "needs complete batch sizes", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[0][2:]:
        ax.axis("off")
    for ax, r in zip(axes[1], rows, strict=False):
        for name, colour in (("muon", "C0"), ("adamw", "C1")):
            curves = r[name]["decayed"]
            mean = [sum(c) / len(c) for c in zip(*curves, strict=True)]
            ax.plot(r[name]["tokens"], mean, "o-", color=colour, ms=3, label=f"{name} (lr {r[name]['best_lr']:g})")
            ax.fill_between(r[name]["tokens"], [min(c) for c in zip(*curves, strict=True)],
                            [max(c) for c in zip(*curves, strict=True)], color=colour, alpha=0.2)
        ax.axhline(r["target_loss"], color="gray", ls="--", lw=1, label="target")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (end of decay of each run length)")
        ax.set_ylabel("val loss")
        lo = min(min(c) for n in ("muon", "adamw") for c in r[n]["decayed"])
        ax.set_ylim(lo - 0.05, lo + 1.2)
        partial = "" if r.get("complete", True) else f" (partial: {len(r['seeds'])} seed(s))"
        ax.set_title(f"batch {r['batch_tokens']} tokens: R = {r['ratio_mean']:.2f} ± {r['ratio_sd']:.2f}{partial}",
                     fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes[1][len(rows):]:
        ax.axis("off")
    s = result["settings"]
    fig.suptitle(f"Muon vs AdamW, --preset {result['preset']}: width {s['width']}, depth {s['depth']}, "
                 f"{result['params']:,} non-embedding params, {result['tokens_per_param']:.1f} tokens/param",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path, plt, dpi=110, bbox_inches="tight")


# ---------------------------------------------------------------------------------------- quality
def quality(rows: list[dict], path: Path, meta: dict, *, y_max: float, is_reference) -> None:
    """Error against FLOPs (relative to Keller-5), a panel per spectrum, one marker per configuration:
    colour = preset, shape = algorithm and preconditioning, filled = bf16 / open = fp16, the step count
    written beside it; Keller-5 bf16 (the reference) circled, with its error as a dotted line. Errors
    above `y_max` (a schedule that diverged: CANS's first polynomial after an AOL start) sit on the top
    edge, marked with an upward arrow. `is_reference(row)` says whether a row is the reference (both
    from bench.experiments.quality, which calls this: plots import no command)."""
    plt = pyplot()
    if plt is None:
        return
    spectra = list(dict.fromkeys(r["spectrum"] for r in rows))
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    colours = {p: f"C{i}" for i, p in enumerate(presets)}
    markers = {("standard", "frobenius"): "o", ("standard", "aol"): "s", ("gram", "frobenius"): "^",
               ("gram", "aol"): "D"}
    cols = min(3, len(spectra))
    nrows = math.ceil(len(spectra) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    for ax, spectrum in zip(axes.flat, spectra, strict=False):
        here = [r for r in rows if r["spectrum"] == spectrum]
        for r in here:
            filled = r["dtype"] != "fp16"
            colour = colours[r["preset"]]
            y = r["rel_err"] if math.isfinite(r["rel_err"]) and r["rel_err"] <= y_max else y_max
            ax.scatter(r["flops_vs_keller5"], y, marker=markers[(r["algorithm"], r["precondition"])],
                       s=30, facecolors=colour if filled else "none", edgecolors=colour, linewidths=1.0, zorder=3)
            label = str(r["steps"]) + ("↑" if y == y_max else "")
            ax.annotate(label, (r["flops_vs_keller5"], y), fontsize=5, xytext=(3, 2), textcoords="offset points",
                        color=colour)
            if is_reference(r):
                ax.scatter(r["flops_vs_keller5"], r["rel_err"], marker="o", s=160, facecolors="none",
                           edgecolors="black", linewidths=1.2, zorder=4)
                ax.axhline(r["rel_err"], color="black", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(top=y_max * 1.15)
        ax.set_title(f"{spectrum} ({here[0]['shape'] if here else ''})", fontsize=9)
        ax.set_xlabel("matmul FLOPs / Keller-5's (same shape)")
        ax.set_ylabel("rel. Frobenius error vs float64 U·Vᵀ")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(spectra):]:
        ax.axis("off")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=colours[p], label=p) for p in presets]
    handles += [Line2D([], [], linestyle="", marker=m, color="grey", label=f"{a}, {pc}") for (a, pc), m in
                markers.items()]
    handles += [Line2D([], [], linestyle="", marker="o", color="grey", label="bf16 (filled)"),
                Line2D([], [], linestyle="", marker="o", markerfacecolor="none", color="grey", label="fp16 (open)"),
                Line2D([], [], linestyle="", marker="o", markersize=11, markerfacecolor="none", color="black",
                       label="Keller 5 steps bf16 (reference)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    fig.suptitle(f"Newton–Schulz error per FLOP (number beside a marker: steps) — {meta['device']}, "
                 f"commit {meta['commit']}, torch {meta['torch_version']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- memory
def memory(rows: list[dict], path: Path) -> Path | None:
    """One bar per configuration (bench/optimizer/memory.py): what the optimizer keeps between steps
    (resident) and, stacked on it, the extra peak inside a step, in bytes per parameter (RSS); the
    state in opt.state as a black tick, the counting mode's peak total as a cross."""
    plt = pyplot()
    if plt is None:
        return None
    ok = [r for r in rows if r["op"] == "optimizer_memory" and r["status"] == "ok"]
    by: dict[str, dict] = {}
    for r in ok:
        by.setdefault(r["extra"]["config"], {})[r["metric"]] = r
    configs = [c for c, m in by.items() if {"resident", "step_peak"} <= set(m)]
    if not configs:
        return None
    fig, ax = plt.subplots(figsize=(8.0, 0.38 * len(configs) + 1.8))
    y = list(range(len(configs)))
    resident = [by[c]["resident"]["median"] for c in configs]
    peak = [by[c]["step_peak"]["median"] for c in configs]
    ax.barh(y, resident, color="C0", label="resident: kept between steps")
    ax.barh(y, peak, left=resident, color="C1", label="step peak: extra inside a step")
    states = [(i, by[c]["state"]["median"]) for i, c in enumerate(configs) if "state" in by[c]]
    ax.plot([s for _, s in states], [i for i, _ in states], "k|", ms=14, mew=2, label="opt.state")
    counted = [(i, by[c]["peak_total"]["extra"].get("counted")) for i, c in enumerate(configs)
               if "peak_total" in by[c]]
    counted = [(i, v) for i, v in counted if v is not None]
    if counted:
        ax.plot([v for _, v in counted], [i for i, _ in counted], "kx", ms=6, label="peak total, counting mode")
    for i, (r, p) in enumerate(zip(resident, peak, strict=True)):
        ax.text(r + p, i, f"  {r:.2f} + {p:.2f}", va="center", fontsize=7)
    dtypes = [by[c]["resident"]["dtype"] for c in configs]
    ax.set_yticks(y, [c + ("" if d == "float32" else f" ({d})") for c, d in zip(configs, dtypes, strict=True)],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(r + p for r, p in zip(resident, peak, strict=True)) * 1.3 + 0.5)
    ax.set_xlabel("bytes per parameter above parameters and gradients (RSS)")
    first = by[configs[0]]["resident"]
    ax.set_title(textwrap.fill(f"Optimizer memory, {first['shape']} matrices with gradients, one process per "
                               f"configuration; {_where(first)}", 90), fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path, plt)
