"""`python -m bench step`: one optimizer step on a model preset's real parameters, per optimizer.

    python -m bench step                                   # GPU: gpt2-124m and gpt2-1.5b; CPU: tiny
    python -m bench step --model gpt2-124m --model custom:layers=4,d=512,heads=8

Optimizers: muon.Muon per runnable backend (and with foreach=False where the constructor has it),
torch.optim.Muon on the Muon matrices with torch.optim.AdamW(fused=True) on the rest, and
torch.optim.AdamW(fused=True) on every parameter. Gradients are fixed random tensors; every
optimizer sees the same parameters routed by muon.param_groups.

Timing (bench/timing.py): all optimizers of a model exist at once and are timed in --rounds
interleaved rounds (each runs once per round, the order rotated), so load from other jobs falls on
every one alike; on a CPU with one thread the clock is the process's CPU time (wall time in
extra.wall_ms), on CUDA events; rows give the median, the IQR / median ("spread"), min and max over the rounds, and a
"noisy" flag above 10 %. The Newton–Schulz part of a step is timed inside the same steps (the
backends' NS functions, or torch.optim.Muon's `_zeropower_via_newtonschulz`, wrapped with a clock), so
it can never exceed the step it is part of (bench/schema.py checks). The speed-ups are per-round
ratios (torch.optim.Muon's step / muon's in the same round), median and range.

Rows (step.csv / step.json, bench/schema.py columns; shape = the model, dtype = the NS compute dtype):
    op optimizer_step           the step, ms; extra: model, optimizer, backend, ops_per_step
                                (muon.profiling.count_dispatched_ops), host_ms (calling-thread CPU time
                                of one step, no sync), state_bytes, peak_bytes (CUDA max_memory_allocated
                                during a step above what existed before that optimizer; None on a CPU:
                                unmeasured), and for muon.Muon rows speedup_vs_torch_optim_muon and
                                time_vs_fused_adamw ([median, min, max] of the per-round ratios)
    op newton_schulz_in_step    its NS part, ms (part_of optimizer_step)
Skipped optimizers (backend unavailable, torch without torch.optim.Muon) are rows with status
"skipped: why", summed up in one console line.

NS compute dtype for muon.Muon: ns_dtype="auto" as the optimizer resolves it per matrix shape
(muon.backends.dispatch.choose_ns_dtype: bf16 on CUDA; on a CPU the measured CPU table, fp32 where it
says nothing); --ns-dtype overrides it. torch.optim.Muon always computes NS in bf16.
CPU threads: --threads (default 1 on a CPU: on a shared 2-core machine two threads each wait on the
other job's cores, and a step's time moves by 5x between runs).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import muon
from muon import backends
from muon.newton_schulz import resolve_dtype
from muon.optim import matrix_shape
from muon.profiling import count_dispatched_ops

from .. import models, plots
from ..common import default_out, dtype_of, fmt_table, pick_device, progress, set_threads, skip_line, wrap
from ..schema import Results
from ..timing import PartClock, interleaved, ratio, synchronize

GPU_MODELS = ["gpt2-124m", "gpt2-1.5b"]  # GPT-2 small and the 1B-class GPT-2 XL (1.56B, 1.47B on Muon)
CPU_MODELS = ["tiny"]  # torch.optim.Muon computes NS in bf16: ~16 s a step for "small" on a 2-core CPU
TORCH_MUON = "torch.optim.Muon+AdamW(fused)"
ADAMW = "torch.optim.AdamW(fused)"
STEP, NS_PART = "optimizer_step", "newton_schulz_in_step"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--model", action="append", default=None,
                        help=f"preset or 'custom:...', repeatable (default: {', '.join(GPU_MODELS)} on a GPU, "
                             f"{', '.join(CPU_MODELS)} on a CPU)")
    parser.add_argument("--backends", default=None,
                        help=f"muon backends, comma-separated from {backends.BACKENDS} (default: every one that "
                             "runs here; on a CPU only torch, the others would run in an interpreter)")
    parser.add_argument("--ns-dtype", default="auto",
                        help="muon.Muon's NS dtype (default auto: what the optimizer picks per shape)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15 CPU, 10 GPU)")
    parser.add_argument("--rep-ms", type=float, default=None,
                        help="time per optimizer over all rounds, about (ms; default 300 CPU, 200 GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on a CPU)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/out/<device>)")
    parser.add_argument("--no-plot", action="store_true")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.numel() and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


def has_foreach_option() -> bool:
    return "foreach" in inspect.signature(muon.Muon.__init__).parameters


def _fused_adamw_reason(device: torch.device) -> str | None:
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        return f"torch.optim.AdamW(fused=True) is unsupported here: {exc}"
    return None


class Candidate:
    """One optimizer configuration: its name, NS backend and dtype, and how to build it."""

    def __init__(self, optimizer: str, backend: str, dtype: str, build: Callable[[], list], has_ns: bool):
        self.optimizer, self.backend, self.dtype, self.build, self.has_ns = optimizer, backend, dtype, build, has_ns

    @property
    def provider(self) -> str:
        return f"{self.optimizer}[{self.backend}]" if self.optimizer.startswith("muon.") else self.optimizer


def muon_ns_dtypes(model: torch.nn.Module, device: torch.device, ns_dtype) -> str:
    """The NS compute dtype(s) muon.Muon resolves for this model's matrices ("float32", or
    "bfloat16+float32" where the CPU table splits them by shape)."""
    seen = []
    for g in muon.param_groups(model):
        if not g["use_muon"]:
            continue
        for p in g["params"]:
            _, m, n = matrix_shape(p.shape, g.get("flatten", False))
            name = str(resolve_dtype(ns_dtype, device, (m, n))).removeprefix("torch.")
            if name not in seen:
                seen.append(name)
    return "+".join(sorted(seen)) or "none"


def candidates(model: torch.nn.Module, device: torch.device, names: list[str], explicit: set[str],
               ns_dtype) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """(runnable candidates, (provider, reason) skips) for this model and device."""
    groups = muon.param_groups(model)
    matrices = [p for g in groups if g["use_muon"] for p in g["params"]]
    rest = [p for g in groups if not g["use_muon"] for p in g["params"]]
    params = list(model.parameters())
    probe = torch.zeros(1, 8, 8, device=device)
    muon_dtype = muon_ns_dtypes(model, device, ns_dtype)
    out, skipped = [], []
    variants = [("muon.Muon", {})]
    if has_foreach_option():
        variants.append(("muon.Muon(foreach=False)", {"foreach": False}))
    for name in names:
        reason = backends.unavailable_reason(name, probe)
        if reason is None and device.type == "cpu" and name != "torch" and name not in explicit:
            reason = "not timed on a CPU unless named in --backends (it would run in an interpreter)"
        for label, extra in variants:
            if reason is not None:
                skipped.append((f"{label}[{name}]", reason))
                continue
            build = lambda name=name, extra=extra: [muon.Muon(
                muon.param_groups(model), lr=0.02, backend=name, ns_dtype=ns_dtype, adjust_lr_fn="match_rms_adamw",
                **extra)]
            out.append(Candidate(label, name, muon_dtype, build, True))
    fused_reason = _fused_adamw_reason(device)
    if fused_reason:
        skipped += [(TORCH_MUON, fused_reason), (ADAMW, fused_reason)]
        return out, skipped
    if not hasattr(torch.optim, "Muon"):
        skipped.append((TORCH_MUON, f"this torch ({torch.__version__}) has no torch.optim.Muon"))
    elif any(p.ndim != 2 for p in matrices):
        skipped.append((TORCH_MUON, "it takes 2-D parameters only, this model has others on Muon"))
    else:
        out.append(Candidate(
            TORCH_MUON, "torch", "bfloat16",
            lambda: [torch.optim.Muon(matrices, lr=0.02, adjust_lr_fn="match_rms_adamw"),
                     *([torch.optim.AdamW(rest, lr=1e-3, fused=True)] if rest else [])], True))
    dtype = str(params[0].dtype).removeprefix("torch.") if params else "float32"
    out.append(Candidate(ADAMW, "torch", dtype, lambda: [torch.optim.AdamW(params, lr=1e-3, fused=True)], False))
    return out, skipped


@contextlib.contextmanager
def ns_timed(clock: PartClock):
    """Every NS entry point a step can reach, wrapped with `clock`: each importable muon backend's
    `run` / `run_gram` (the step engine and the dispatcher look them up on the module at each call)
    and torch.optim.Muon's `_zeropower_via_newtonschulz` (a module global of torch.optim._muon)."""
    saved = []
    modules = []
    for module_name in backends._MODULES.values():
        with contextlib.suppress(ImportError):
            modules.append((importlib.import_module(module_name), ("run", "run_gram")))
    with contextlib.suppress(ImportError):
        modules.append((importlib.import_module("torch.optim._muon"), ("_zeropower_via_newtonschulz",)))
    for module, attrs in modules:
        for attr in attrs:
            original = getattr(module, attr, None)
            if original is not None:
                saved.append((module, attr, original))
                setattr(module, attr, clock.wrap(original))
    try:
        yield
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)


def _host_ms(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Median CPU time of the calling thread while it issues fn() (no synchronization inside; the
    device is drained before each repetition so no earlier work is waited on)."""
    samples = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.thread_time()
        fn()
        samples.append((time.thread_time() - t0) * 1e3)
    synchronize(device)
    return statistics.median(samples)


def prepare(c: Candidate, device: torch.device) -> tuple[Callable[[], None], dict]:
    """Build c's optimizers, take the first step (state allocation, compilation), and measure what
    is not a time: peak memory, dispatched ops, host time. Returns (step, facts)."""
    synchronize(device)
    # what exists before this optimizer does (parameters, gradients, the other optimizers' state)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    opts = c.build()

    def step():
        for opt in opts:
            opt.step()

    step()
    synchronize(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    with count_dispatched_ops() as ops:
        step()
    synchronize(device)
    facts = {"ops_per_step": ops.total, "host_ms": _host_ms(step, device),
             "state_bytes": sum(state_bytes(o) for o in opts), "peak_bytes": peak}
    return step, facts


def _range(stats) -> list[float]:
    return [stats.median, stats.low, stats.high]


def measure_model(spec: str, model: torch.nn.Module, device: torch.device, found: list[Candidate],
                  results: Results, rounds: int, rep_ms: float) -> None:
    """Rows for one model: every candidate timed in the same interleaved rounds."""
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    steps, facts, ready = {}, {}, []
    for c in progress(found, desc=f"step {spec}", unit="optimizer"):
        try:
            steps[c.provider], facts[c.provider] = prepare(c, device)
            ready.append(c)
        except Exception as exc:  # one failing optimizer must not lose the others' rows
            results.add(STEP, c.provider, spec, c.dtype, status=f"error: {type(exc).__name__}: {exc}")
    clock = PartClock(device)
    with ns_timed(clock):
        samples = interleaved(steps, device, rounds=rounds, budget_ms=rep_ms,
                              parts={c.provider: clock for c in ready if c.has_ns}, warmup=0)
    theirs = samples.get(TORCH_MUON)
    adamw = samples.get(ADAMW)
    for c in ready:
        s = samples[c.provider]
        extra = {"model": spec, "optimizer": c.optimizer, "backend": c.backend, **facts[c.provider]}
        if c.optimizer.startswith("muon."):
            if theirs is not None:
                extra["speedup_vs_torch_optim_muon"] = _range(ratio(theirs.whole, s.whole))
            if adamw is not None:
                extra["time_vs_fused_adamw"] = _range(ratio(s.whole, adamw.whole))
        results.add(STEP, c.provider, spec, c.dtype, stats=s.stats, **extra)
        if c.has_ns:
            results.add(NS_PART, c.provider, spec, c.dtype, stats=s.part_stats, part_of=STEP, model=spec)
    del steps, samples
    for p in model.parameters():
        p.grad = None


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    set_threads(args.threads, device)
    specs = args.model or (GPU_MODELS if device.type == "cuda" else CPU_MODELS)
    names = args.backends.split(",") if args.backends else list(backends.BACKENDS)
    for name in names:
        if name not in backends.BACKENDS:
            raise SystemExit(f"--backends: unknown backend {name!r}; choose from {backends.BACKENDS}")
    explicit = set(names) if args.backends else set()
    ns_dtype = "auto" if args.ns_dtype == "auto" else dtype_of(args.ns_dtype)
    rounds = args.rounds or (10 if device.type == "cuda" else 15)
    rep_ms = args.rep_ms or (200.0 if device.type == "cuda" else 300.0)
    results = Results(device, "step")

    for spec in specs:
        try:
            cfg = models.parse_model(spec)
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"--model {spec}: {exc}") from None
        if not isinstance(cfg, models.TransformerConfig):
            raise SystemExit(f"--model {spec}: the step benchmark takes a preset or a custom: transformer")
        torch.manual_seed(0)
        model = models.build(cfg, device=device)
        found, skipped = candidates(model, device, names, explicit, ns_dtype)
        for provider, reason in skipped:
            dtype = found[0].dtype if found else ""
            results.add(STEP, provider, spec, dtype, status=f"skipped: {reason}")
        measure_model(spec, model, device, found, results, rounds, rep_ms)
        del model, found
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    out = args.out or default_out(device)
    paths = results.write(out, "step")
    clock = next((r["clock"] for r in results.ok(STEP)), "")
    print(wrap(f"optimizer step on {results.meta['device']}, commit {results.meta['commit']}: {clock}, median "
               f"of {rounds} interleaved rounds; NS part timed inside the same steps"))
    print(console_table(results.rows))
    line = skip_line(results.rows, "step.csv")
    if line:
        print(line)
    if not args.no_plot and results.ok(STEP):
        png = plots.step(results.rows, out / "step.png")
        paths += [png] if png else []
    print("wrote " + ", ".join(p.name for p in paths) + f" in {out}")
    return 0


def console_table(rows: list[dict]) -> str:
    """One line per model × optimizer, at most 100 columns: step and NS part medians, spread, ops."""
    parts = {(r["provider"], r["shape"]): r for r in rows if r["op"] == NS_PART and r["status"] == "ok"}
    lines = []
    for r in rows:
        if r["op"] != STEP or r["status"] != "ok":
            continue
        ns = parts.get((r["provider"], r["shape"]))
        up = r["extra"].get("speedup_vs_torch_optim_muon")
        lines.append({"model": r["shape"][:14], "optimizer [backend]": r["provider"][:31], "NS dtype": r["dtype"][:9],
                      "step ms": r["median"], "spread": f"{100 * r['spread']:.0f} %", "NS ms": ns and ns["median"],
                      "ops": r["extra"].get("ops_per_step"), "vs torch": up and f"{up[0]:.2f}x",
                      "flag": r["flag"]})
    if not lines:
        return "no optimizer ran"
    return fmt_table(lines, list(lines[0]))
