"""`python -m bench all --out DIR`: the main job, every benchmark sensible for this device.

On a GPU: FLOP model for every preset, NS kernels on the large default shapes and the batched groups
of GPT-2 124M and Llama 3 8B, optimizer steps on GPT-2 124M and GPT-2 1.5B, and a profile.
On a CPU: the same commands at CPU sizes (the tiny preset, torch backend, fp32 NS where muon chooses).
Everywhere: the muP telescoping sweep and the data-efficiency experiment at their --quick settings.
--quick runs each command at the smallest settings (the end-to-end test uses it).
Each stage writes its CSV/JSON/PNG under DIR. DIR/summary.md opens with the headline numbers read
from those files (NS speed-up over torch.optim.Muon per shape class, step time against
torch.optim.Muon and fused AdamW, FLOP overhead over AdamW), then device, versions, commit, stages.
A failing stage is reported and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import time
import traceback
from pathlib import Path

from . import efficiency, flops_cmd, kernels, profile, step, telescope
from .common import Results, default_out, pick_device
from .models import overhead as flop_overhead

# The batch at which the headline states the FLOP overhead: GPT-2's 0.5M tokens per step.
HEADLINE_BATCH_TOKENS = 524288


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/out/<device>)")
    parser.add_argument("--quick", action="store_true", help="smallest settings (tests, smoke runs)")
    parser.add_argument(
        "--only", default=None, help="comma-separated stages to run (flops,kernels,step,profile,telescope,efficiency)",
    )


# A one-layer model that runs in well under a second on a CPU.
QUICK_MODEL = "custom:layers=1,d=32,heads=2,mlp_dim=64,vocab=64,seq=16"


def stages(device: str, quick: bool) -> list[tuple[str, object, list[str]]]:
    dev = ["--device", device]
    if quick:
        return [
            ("flops", flops_cmd, ["--model", "tiny", "--model", "gpt2-124m", "--sweep", "65536,524288"]),
            ("kernels", kernels, [*dev, "--shapes", "32x64,2x48x16", "--preset", "none",
                                  "--peers", "torch.optim.Muon", "--rep-ms", "1", "--gemm-size", "64"]),
            ("step", step, [*dev, "--model", QUICK_MODEL, "--rep-ms", "1"]),
            ("profile", profile, [*dev, "--model", QUICK_MODEL, "--steps", "1"]),
        ]
    gpu = device == "cuda"
    plan = [("flops", flops_cmd, []), ("kernels", kernels, dev)]
    if gpu:
        plan += [
            ("step", step, [*dev, "--model", "gpt2-124m", "--model", "gpt2-1.5b"]),
            ("profile", profile, [*dev, "--model", "gpt2-124m"]),
        ]
    else:
        plan += [("step", step, dev), ("profile", profile, [*dev, "--model", "tiny", "--steps", "1"])]
    # The muP experiments train on the CPU (their --quick settings take 3–4 minutes each on 2 cores).
    plan += [("telescope", telescope, ["--quick"]), ("efficiency", efficiency, ["--quick"])]
    return plan


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    out = args.out or default_out(device)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    meta = Results(device).meta
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
def _load(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def _ms(v) -> str:
    return "—" if v is None else f"{v:.3g}"


def _ratio(num, den) -> str:
    return "—" if num is None or den is None or not den else f"{num / den:.2f}×"


def ns_headline(rows: list[dict]) -> list[str]:
    """Per shape class: torch.optim.Muon's NS time over the fastest muon backend's, geometric mean of
    the class's shapes (> 1: muon is faster)."""
    ok = [r for r in rows if r.get("op") == "newton_schulz" and r.get("status") == "ok"]
    peer = {r["shape"]: r for r in ok if r["provider"] == "torch.optim.Muon"}
    classes: dict[str, list[tuple[str, float, dict, dict]]] = {}
    for shape, theirs in peer.items():
        ours = [r for r in ok if r["shape"] == shape and r["provider"].startswith("muon[")]
        if ours:
            best = min(ours, key=lambda r: r["ms"])
            classes.setdefault(theirs.get("kind", "?"), []).append((shape, theirs["ms"] / best["ms"], best, theirs))
    if not classes:
        return ["No kernels rows with both muon and torch.optim.Muon (stage not run or failed in this invocation, "
                "or no shape had both)."]
    out = ["| shape class | shapes | speed-up over torch.optim.Muon (geo. mean) | range | fastest muon backend |",
           "| --- | --- | --- | --- | --- |"]
    for kind, entries in classes.items():
        ups = [e[1] for e in entries]
        mean = math.exp(sum(math.log(u) for u in ups) / len(ups))
        backends = sorted({e[2]["provider"] for e in entries})
        out.append(f"| {kind} | {', '.join(e[0] for e in entries)} | {mean:.2f}× | {min(ups):.2f}–{max(ups):.2f}× "
                   f"| {', '.join(backends)} |")
    dtype = next(iter(peer.values())).get("dtype", "?")
    out.append("")
    out.append(f"NS in {dtype}: torch.optim.Muon's own NS (one matrix per call) time / the fastest muon backend's "
               "(a batched call), median per shape (kernels.json); > 1: muon is faster.")
    return out


def step_headline(rows: list[dict]) -> list[str]:
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return ["No step rows (stage not run or failed in this invocation)."]
    out = ["| model | muon.Muon ms (backend) | its NS alone ms | torch.optim.Muon + fused AdamW ms | fused AdamW ms "
           "| speed-up over torch.optim.Muon | time vs fused AdamW | ops/step muon vs torch.optim.Muon "
           f"| FLOP overhead vs AdamW at {HEADLINE_BATCH_TOKENS:,} tokens |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        ours = [r for r in mine if r["optimizer"] == "muon.Muon" and r.get("median_ms") is not None]
        best = min(ours, key=lambda r: r["median_ms"]) if ours else {}
        theirs = next((r for r in mine if r["optimizer"].startswith("torch.optim.Muon")), {})
        adamw = next((r for r in mine if r["optimizer"] == "torch.optim.AdamW(fused)"), {})
        try:
            overhead = f"{100 * flop_overhead(model, HEADLINE_BATCH_TOKENS).overhead:.2f} %"
        except (ValueError, TypeError):
            overhead = "—"
        out.append(
            f"| {model} | {_ms(best.get('median_ms'))} ({best.get('backend', '—')}) | {_ms(best.get('ns_ms'))} "
            f"| {_ms(theirs.get('median_ms'))} | {_ms(adamw.get('median_ms'))} "
            f"| {_ratio(theirs.get('median_ms'), best.get('median_ms'))} "
            f"| {_ratio(best.get('median_ms'), adamw.get('median_ms'))} "
            f"| {best.get('ops_per_step', '—')} vs {theirs.get('ops_per_step', '—')} | {overhead} |")
    out.append("")
    out.append("Step times are medians of one optimizer step on the model's parameters with fixed gradients "
               "(step.json), the fastest muon.Muon backend shown; speed-up = torch.optim.Muon's time / muon's "
               "(> 1: muon is faster); time vs fused AdamW = muon's time / AdamW's. FLOP overhead: "
               f"(muon.Muon step FLOPs − AdamW step FLOPs) / 6·N·B at B = {HEADLINE_BATCH_TOKENS:,} tokens "
               "(muon.flops, analytic).")
    return out


def summary(out: Path, meta: dict, stage_lines: list[str], ran: set[str]) -> str:
    """summary.md: the headline tables from this run's kernels.json and step.json (a stage that did
    not run ok in this invocation shows as such, never as an older file's numbers), then the stages."""
    lines = [f"# muon benchmarks on {meta['device']}", "",
             f"commit {meta['commit']}, {meta['date']}; torch {meta['torch_version']}, "
             f"triton {meta['triton_version']}, "
             f"CUDA {meta['cuda_version']}, muon {meta['muon_version']}, Python {meta['python_version']}", "",
             "## Headline", "", "### Newton–Schulz against torch.optim.Muon", ""]
    lines += ns_headline(_load(out / "kernels.json") if "kernels" in ran else [])
    lines += ["", "### Optimizer step", ""]
    lines += step_headline(_load(out / "step.json") if "step" in ran else [])
    if "cpu" in meta["device"]:
        lines += ["", "On a CPU these times show that everything runs; they say nothing about GPU speed. There "
                  "muon.Muon computes NS in fp32 and torch.optim.Muon in bf16 (its only choice), which is most "
                  "of the step ratio: bf16 matmuls are 10-100x slower than fp32 on a CPU."]
    lines += ["", *stage_lines]
    return "\n".join(lines) + "\n"
