"""`python -m bench all --out DIR`: the main job, every benchmark sensible for this device.

On a GPU: FLOP model for every preset, NS kernels on the large default shapes and the batched groups
of GPT-2 124M and Llama 3 8B, optimizer steps on GPT-2 124M and Essential AI 0.67B, and a profile.
On a CPU (a few minutes): the same commands at CPU sizes (the tiny/small presets, torch backend).
Everywhere: the muP telescoping sweep and the data-efficiency experiment at their --quick settings.
--quick runs each command at the smallest settings (the end-to-end test uses it).
Each stage writes its CSV/JSON/PNG under DIR; DIR/summary.md lists device, versions, commit, stages.
A failing stage is reported and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
import traceback
from pathlib import Path

from . import efficiency, flops_cmd, kernels, profile, step, telescope
from .common import Results, default_out, pick_device


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
            ("step", step, [*dev, "--model", QUICK_MODEL, "--batch", "1", "--rep-ms", "1"]),
            ("profile", profile, [*dev, "--model", QUICK_MODEL, "--steps", "1"]),
        ]
    gpu = device == "cuda"
    plan = [("flops", flops_cmd, []), ("kernels", kernels, dev)]
    if gpu:
        plan += [
            ("step gpt2-124m", step, [*dev, "--model", "gpt2-124m", "--batch", "8"]),
            ("step essential-0.67b", step, [*dev, "--model", "essential-0.67b", "--batch", "2"]),
            ("profile", profile, [*dev, "--model", "gpt2-124m"]),
        ]
    else:
        plan += [("step", step, dev), ("profile", profile, [*dev, "--model", "tiny", "--steps", "1"])]
    # The muP experiments train on the CPU (their --quick settings take 1–2 minutes each there).
    plan += [("telescope", telescope, ["--quick"]), ("efficiency", efficiency, ["--quick"])]
    return plan


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    out = args.out or default_out(device)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    meta = Results(device).meta
    lines = [f"# muon benchmarks on {meta['device']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "device"]
    lines += ["", "| stage | seconds | status | output |", "| --- | --- | --- | --- |"]
    failed = []
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
        lines.append(f"| {name} | {time.perf_counter() - start:.1f} | {status or 'ok'} | {log.name} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'summary.md'}")
    if failed:
        print(f"failed stages: {', '.join(failed)}")
    return 1 if failed else 0
