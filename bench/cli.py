"""`python -m bench <command>`: one module per command, each with add_arguments(parser) and run(args):
kernel microbenchmarks in bench/kernel/, optimizer-step benchmarks (time, memory, FLOPs, profile) in
bench/optimizer/ (memory too), experiments (muP telescope, NS quality, NS dtype) in
bench/experiments/ (efficiency and state-dtype too); `all` (bench/run_all.py) runs the main job.

Commands are imported only when chosen, so a command whose optional dependency is missing does not
break the others.
"""

from __future__ import annotations

import argparse
import importlib

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "flops": ("bench.optimizer.flops", "FLOP overhead of Muon over AdamW for model presets"),
    "kernels": ("bench.kernel.newton_schulz", "Newton–Schulz kernel microbenchmarks per backend and shape"),
    "step": ("bench.optimizer.step_time", "optimizer step time and memory against AdamW and torch.optim.Muon"),
    "profile": ("bench.optimizer.profile", "the optimizer step under torch.profiler / Nsight Compute"),
    "telescope": ("bench.experiments.telescope", "telescoping muP hyperparameter sweep"),
    "efficiency": ("bench.experiments.efficiency", "Muon vs AdamW data efficiency across batch sizes"),
    "quality": ("bench.experiments.quality", "Newton–Schulz error against the float64 polar factor per FLOP"),
    "memory": ("bench.optimizer.memory", "optimizer memory per configuration on the CPU, bytes per parameter (RSS)"),
    "ns-dtype": ("bench.experiments.ns_dtype",
                 "fp32 vs bf16 Newton–Schulz on this CPU: the table ns_dtype='auto' reads"),
    "state-dtype": ("bench.experiments.state_dtype", "does bf16 / int8 optimizer state train like fp32 state (seeds)"),
    "versions": ("bench.versions", "the resolved versions of the suite's packages, and what `import kernels` loads"),
    "all": ("bench.run_all", "the main job: every benchmark for this device, results to a folder"),
}


def _load(command: str):
    return importlib.import_module(COMMANDS[command][0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    available = {}
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = _load(name)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # command not written yet in this version
                continue
            raise
        available[name] = mod
        mod.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return int(available[args.command].run(args) or 0)
