"""`python -m bench all --out DIR`: the main job, every benchmark sensible for this device.

On a GPU: FLOP model for every preset, NS kernels on the large default shapes and the batched groups
of GPT-2 124M and Llama 3 8B, optimizer steps on GPT-2 124M and GPT-2 1.5B, and a profile.
On a CPU: the same commands at CPU sizes (the tiny preset, torch backend, fp32 NS where muon chooses),
and the optimizer memory per configuration (`python -m bench memory`, bytes per parameter).
Everywhere: the muP telescoping sweep and the data-efficiency experiment at their --quick settings.
--quick runs each command at the smallest settings (the end-to-end test uses it).
Each stage writes its CSV/JSON/PNG under DIR. DIR/summary.md opens with the headline numbers read
from those files (NS speed-up over torch.optim.Muon per shape class, step time against
torch.optim.Muon and fused AdamW, FLOP overhead over AdamW, optimizer memory where it ran), then
device, versions, commit, stages.
A failing stage is reported and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import time
import traceback
from pathlib import Path

from . import models, schema
from .common import default_out, pick_device, set_threads
from .experiments import efficiency, telescope
from .kernel import newton_schulz as kernels  # the stages go by their command names
from .optimizer import flops, memory, profile
from .optimizer import step_time as step
from .timing import NOISY

# The batch at which the headline states the FLOP overhead: GPT-2's 0.5M tokens per step.
HEADLINE_BATCH_TOKENS = 524288


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/out/<device>)")
    parser.add_argument("--quick", action="store_true", help="smallest settings (tests, smoke runs)")
    parser.add_argument(
        "--only", default=None,
        help="comma-separated stages to run (flops,kernels,step,memory,profile,telescope,efficiency)",
    )


# A one-layer model that runs in well under a second on a CPU.
QUICK_MODEL = "custom:layers=1,d=32,heads=2,mlp_dim=64,vocab=64,seq=16"


def stages(device: str, quick: bool) -> list[tuple[str, object, list[str]]]:
    dev = ["--device", device]
    if quick:
        return [
            ("flops", flops, ["--model", "tiny", "--model", "gpt2-124m", "--sweep", "65536,524288"]),
            ("kernels", kernels, [*dev, "--shapes", "32x64,2x48x16", "--preset", "none",
                                  "--peers", "torch.optim.Muon", "--rep-ms", "1", "--gemm-size", "64"]),
            ("step", step, [*dev, "--model", QUICK_MODEL, "--rep-ms", "1"]),
            ("memory", memory, ["--layers", "2", "--dim", "128", "--configs", "muon,torch-adamw-foreach"]),
            ("profile", profile, [*dev, "--model", QUICK_MODEL, "--steps", "1"]),
        ]
    gpu = device == "cuda"
    plan = [("flops", flops, []), ("kernels", kernels, dev)]
    if gpu:
        plan += [
            ("step", step, [*dev, "--model", "gpt2-124m", "--model", "gpt2-1.5b"]),
            ("profile", profile, [*dev, "--model", "gpt2-124m"]),
        ]
    else:
        # optimizer memory is measured on the CPU (RSS of a process per configuration)
        plan += [("step", step, dev), ("memory", memory, []),
                 ("profile", profile, [*dev, "--model", "tiny", "--steps", "1"])]
    # The muP experiments train on the CPU (their --quick settings take 3–4 minutes each on 2 cores).
    plan += [("telescope", telescope, ["--quick"]), ("efficiency", efficiency, ["--quick"])]
    return plan


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    set_threads(None, device)  # every stage on one CPU thread (the training experiments' --threads default too)
    out = args.out or default_out(device)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    meta = schema.run_meta(device)
    lines = ["## Stages", "", "| stage | seconds | status | output |", "| --- | --- | --- | --- |"]
    failed, ran = [], set()
    for name, module, argv in stages(device.type, args.quick):
        if only and name.split()[0] not in only:
            continue
        parser = argparse.ArgumentParser(prog=f"bench {name}")
        module.add_arguments(parser)
        sub_args = parser.parse_args([*argv, "--out", str(out)])
        print(f"== {name}: python -m bench {name.split()[0]} {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):
                status = module.run(sub_args) or 0
        except (Exception, SystemExit) as exc:  # one failing stage must not lose the others' results
            status = f"failed: {type(exc).__name__}: {exc}"
            traceback.print_exc()
        text = captured.getvalue()
        print(text, end="", flush=True)
        log = out / f"{name.replace(' ', '_')}.log"
        log.write_text(text)
        if status:
            failed.append(name)
        else:
            ran.add(name.split()[0])
        lines.append(f"| {name} | {time.perf_counter() - start:.1f} | {status or 'ok'} | {log.name} |")
    (out / "summary.md").write_text(summary(out, meta, lines, ran))
    print(f"wrote {out / 'summary.md'}")
    if failed:
        print(f"failed stages: {', '.join(failed)}")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------ summary.md
def _num(v: float) -> str:
    """3 significant digits, without an exponent: 0.784, 59.8, 914, 3,704."""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _ms(row: dict | None) -> str:
    """'12.3 (11.9–13.0)': the median and min–max of a timed row."""
    if not row or row.get("median") is None:
        return "—"
    return f"{_num(row['median'])} ({_num(row['low'])}–{_num(row['high'])})" + (" noisy" if row.get("flag") else "")


def _times(r) -> str:
    """'2.31× (2.10–2.52)' from a [median, min, max] ratio."""
    return "—" if not r else f"{r[0]:.2f}× ({r[1]:.2f}–{r[2]:.2f})"


def ns_headline(rows: list[dict]) -> list[str]:
    """Per shape class: torch.optim.Muon's NS time over the fastest muon backend's (same steps,
    standard NS), per shape the median of the per-round ratios, geometric mean over the class's
    shapes (> 1: muon is faster)."""
    ok = [r for r in rows if r.get("op") == "newton_schulz" and r.get("status") == "ok"]
    peer = {r["shape"]: r for r in ok if r["provider"] == kernels.PEER}
    classes: dict[str, list[tuple[str, float, dict, dict]]] = {}
    for shape, theirs in peer.items():
        ours = [r for r in ok if r["shape"] == shape and r["provider"] in kernels.BASE_PROVIDERS]
        if ours:
            best = min(ours, key=lambda r: r["median"])
            up = best["extra"]["vs_torch_optim_muon"][0]
            classes.setdefault(theirs["extra"].get("kind", "?"), []).append((shape, up, best, theirs))
    if not classes:
        return ["No kernels rows with both muon and torch.optim.Muon (stage not run or failed in this invocation, "
                "or no shape had both)."]
    out = ["| shape class | shapes | speed-up over torch.optim.Muon (geo. mean) | range | fastest muon backend "
           "| dtype muon / torch.optim.Muon |", "| --- | --- | --- | --- | --- | --- |"]
    for kind, entries in classes.items():
        ups = [e[1] for e in entries]
        mean = math.exp(sum(math.log(u) for u in ups) / len(ups))
        names = sorted({e[2]["provider"] for e in entries})
        dtypes = f"{'/'.join(sorted({e[2]['dtype'] for e in entries}))} / {entries[0][3]['dtype']}"
        out.append(f"| {kind} | {', '.join(e[0] for e in entries)} | {mean:.2f}× | {min(ups):.2f}–{max(ups):.2f}× "
                   f"| {', '.join(names)} | {dtypes} |")
    rounds = next(iter(peer.values()))["rounds"]
    clock = next(iter(peer.values())).get("clock") or "?"
    out += ["", f"Per shape: torch.optim.Muon's NS time (one matrix per call) / the fastest muon backend's (one "
            f"batched call, same steps, standard NS), the median of {rounds} interleaved rounds' ratios "
            f"({clock}; kernels.json); > 1: muon is faster."]
    return out


def step_headline(rows: list[dict]) -> list[str]:
    steps = [r for r in rows if r.get("op") == step.STEP and r.get("status") == "ok"]
    specs = list(dict.fromkeys(r["shape"] for r in steps))
    if not specs:
        return ["No step rows (stage not run or failed in this invocation)."]
    parts = {(r["provider"], r["shape"]): r for r in rows if r.get("op") == step.NS_PART and r.get("status") == "ok"}
    out = ["| model | muon.Muon ms (backend) | its NS part ms | torch.optim.Muon + fused AdamW ms | fused AdamW ms "
           "| speed-up over torch.optim.Muon | time vs fused AdamW | ops/step muon vs torch.optim.Muon "
           f"| FLOP overhead vs AdamW at {HEADLINE_BATCH_TOKENS:,} tokens |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in specs:
        mine = [r for r in steps if r["shape"] == model]
        ours = [r for r in mine if r["extra"].get("optimizer") == "muon.Muon"]
        best = min(ours, key=lambda r: r["median"]) if ours else {"extra": {}}
        theirs = next((r for r in mine if r["provider"] == step.TORCH_MUON), {"extra": {}})
        adamw = next((r for r in mine if r["provider"] == step.ADAMW), {"extra": {}})
        try:
            overhead = f"{100 * models.overhead(model, HEADLINE_BATCH_TOKENS).overhead:.2f} %"
        except (ValueError, TypeError):
            overhead = "—"
        out.append(
            f"| {model} | {_ms(best)} ({best['extra'].get('backend', '—')}) "
            f"| {_ms(parts.get((best.get('provider'), model)))} | {_ms(theirs)} | {_ms(adamw)} "
            f"| {_times(best['extra'].get('speedup_vs_torch_optim_muon'))} "
            f"| {_times(best['extra'].get('time_vs_fused_adamw'))} "
            f"| {best['extra'].get('ops_per_step', '—')} vs {theirs['extra'].get('ops_per_step', '—')} | {overhead} |")
    rounds, clock = steps[0]["rounds"], steps[0].get("clock") or "?"
    what = (" (one thread: the time the step ran on its core, not the time other jobs held it; the same samples' "
            "wall time is in step.json, extra.wall_ms)" if clock == "process CPU time" else "")
    out += ["", f"Times: {clock}{what}, median of {rounds} interleaved rounds (min–max in brackets) of one "
            "optimizer step on the model's parameters with fixed gradients (step.json), every optimizer once per "
            "round in a rotated order; the fastest muon.Muon backend shown. Its NS part is timed inside the same "
            "steps, so it is "
            "never longer than the step (checked when step.json is written). Ratios are per round: speed-up = "
            "torch.optim.Muon's step / muon's (> 1: muon is faster), time vs fused AdamW = muon's / AdamW's. "
            "FLOP overhead: (muon.Muon step FLOPs − AdamW step FLOPs) / 6·N·B at "
            f"B = {HEADLINE_BATCH_TOKENS:,} tokens (muon.flops, analytic)."]
    return out


def memory_headline(rows: list[dict]) -> list[str]:
    """Per memory configuration (bench/optimizer/memory.py): what it keeps between steps and its step peak (RSS)."""
    by: dict[str, dict] = {}
    for r in rows:
        if r.get("op") == memory.OP and r.get("status") == "ok":
            by.setdefault(r["extra"]["config"], {})[r["metric"]] = r
    done = {k: m for k, m in by.items() if {"resident", "step_peak", "peak_total"} <= set(m)}
    if not done:
        return []
    first = next(iter(done.values()))["resident"]
    out = ["", "### Optimizer memory", "", "| config | parameters | resident B/param | step peak B/param "
           "| peak total B/param |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {k} | {m['resident']['dtype']} | {m['resident']['median']:.2f} | {m['step_peak']['median']:.2f} "
            f"| {m['peak_total']['median']:.2f} |" for k, m in done.items()]
    out += ["", f"RSS of one process per configuration, {first['shape']} matrices with gradients (memory.json; "
            "docs/benchmarks.md says how to read it): resident = kept between steps, step peak = the extra peak "
            "inside a step."]
    return out


def noisy_line(rows: list[dict], shown: int = 4) -> str:
    """The line that says which timed rows have a spread (IQR / median) above NOISY: every step row
    (the headline), the worst few kernel rows."""
    timed = [r for r in rows if r.get("status") == "ok" and r.get("rounds")]
    noisy = sorted((r for r in timed if r.get("flag")), key=lambda r: -r["spread"])
    if not timed:
        return ""
    if not noisy:
        return f"Spread: no timed row's IQR is above {100 * NOISY:.0f} % of its median ({len(timed)} rows)."
    named = [r for r in noisy if r["command"] == "step"] + [r for r in noisy if r["command"] != "step"][:shown]
    names = "; ".join(f"{r['command']} {r['provider']} {r['shape'][:24]}{' NS part' if r['part_of'] else ''} "
                      f"({100 * r['spread']:.0f} %)" for r in named)
    more = f" and {len(noisy) - len(named)} more kernel rows" if len(noisy) > len(named) else ""
    return (f"**Spread above {100 * NOISY:.0f} %** (IQR / median; flag `noisy` in the CSVs) in {len(noisy)} of "
            f"{len(timed)} timed rows: {names}{more}. Other jobs load this machine; those rows' medians move "
            "between runs by about their spread, their per-round ratios less.")


def summary(out: Path, meta: dict, stage_lines: list[str], ran: set[str]) -> str:
    """summary.md: the headline tables from this run's kernels.json and step.json (a stage that did
    not run ok in this invocation shows as such, never as an older file's numbers), then the stages."""
    kernel_rows = schema.read(out / "kernels.json") if "kernels" in ran else []
    step_rows = schema.read(out / "step.json") if "step" in ran else []
    lines = [f"# muon benchmarks on {meta['device']}", "",
             f"commit {meta['commit']}, {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, "
             f"CUDA {meta['cuda']}, muon {meta['muon']}, Python {meta['python']}", "",
             "## Headline", "", "### Newton–Schulz against torch.optim.Muon", ""]
    lines += ns_headline(kernel_rows)
    lines += ["", "### Optimizer step", ""]
    lines += step_headline(step_rows)
    noisy = noisy_line(kernel_rows + step_rows)
    if noisy:
        lines += ["", noisy]
    if "cpu" in meta["device"]:
        dtypes = sorted({r["dtype"] for r in step_rows if r.get("op") == step.STEP and r.get("status") == "ok"
                         and str(r.get("provider", "")).startswith("muon.")})
        lines += ["", "On a CPU these times show that everything runs; they say nothing about GPU speed. There "
                  f"muon.Muon computes NS in {'/'.join(dtypes) or 'fp32'} (ns_dtype=\"auto\", "
                  "muon.backends.dispatch.choose_ns_dtype) and torch.optim.Muon in bf16 (its only choice), which "
                  "is most of the step ratio: bf16 matmuls are 5-40x slower than fp32 on this CPU."]
    lines += memory_headline(schema.read(out / "memory.json") if "memory" in ran else [])
    lines += ["", *stage_lines]
    return "\n".join(lines) + "\n"
