"""`python -m bench step`: one optimizer step on a model preset's real parameters, per optimizer.

    python -m bench step                                   # GPU: gpt2-124m and gpt2-1.5b; CPU: tiny
    python -m bench step --model gpt2-124m --model custom:layers=4,d=512,heads=8

Optimizers: muon.Muon per runnable backend (and with foreach=False where the constructor has it),
torch.optim.Muon on the Muon matrices with torch.optim.AdamW(fused=True) on the rest, and
torch.optim.AdamW(fused=True) on every parameter. Gradients are fixed random tensors; every
optimizer sees the same parameters routed by muon.param_groups.

One row per model × optimizer (step.json / step.csv), exactly these keys:
    model, optimizer, backend, device, torch, triton, commit,
    median_ms      median wall time of one step (CUDA: triton.testing.do_bench; CPU: median of reps)
    ns_ms          the same step's Newton–Schulz calls alone (same buckets, backend and dtype), so
                   median_ms / ns_ms shows what the rest of the step costs; None for AdamW
    ops_per_step   aten ops dispatched by one step (muon.profiling.count_dispatched_ops): each is at
                   least one launch on a GPU, the step's host cost independent of the device
    host_ms        CPU time of the calling thread during one step, without synchronizing (on a GPU:
                   the Python + dispatch cost of issuing the step; on a CPU it includes the share of
                   the compute that runs on the calling thread)
    state_bytes    optimizer state tensors (momentum, exp_avg, ...)
    peak_bytes     CUDA: torch.cuda.max_memory_allocated over one step minus what was allocated before
                   the optimizer existed (parameters, gradients, benchmark inputs): the optimizer's
                   state plus the step's temporaries at their peak; None on a CPU (no allocator
                   statistics: unmeasured)
Skipped optimizers (backend unavailable, torch without torch.optim.Muon) are printed, not rows.

NS compute dtype for muon.Muon: bf16 on CUDA, fp32 on a CPU (bf16 matmuls are 10-100x slower there),
what ns_dtype="auto" picks; --ns-dtype overrides it. torch.optim.Muon always computes NS in bf16.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import muon
from muon import backends
from muon.coefficients import KELLER, resolve_schedule
from muon.newton_schulz import orthogonalize
from muon.optim import matrix_shape
from muon.profiling import count_dispatched_ops

from .common import Results, default_out, dtype_of, fmt_table, pick_device, progress, pyplot, synchronize, time_ms
from .models import TransformerConfig, parse_model
from .models import build as build_model

COLUMNS = ["model", "optimizer", "backend", "device", "torch", "triton", "commit", "median_ms", "ns_ms",
           "ops_per_step", "host_ms", "state_bytes", "peak_bytes"]
GPU_MODELS = ["gpt2-124m", "gpt2-1.5b"]  # GPT-2 small and the 1B-class GPT-2 XL (1.56B, 1.47B on Muon)
CPU_MODELS = ["tiny"]  # torch.optim.Muon computes NS in bf16: ~16 s a step for "small" on a 2-core CPU
NS_STEPS, NS_EPS = 5, 1e-7  # muon.Muon's and torch.optim.Muon's defaults, with Keller's coefficients


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--model", action="append", default=None,
                        help=f"preset or 'custom:...', repeatable (default: {', '.join(GPU_MODELS)} on a GPU, "
                             f"{', '.join(CPU_MODELS)} on a CPU)")
    parser.add_argument("--backends", default=None,
                        help=f"muon backends, comma-separated from {backends.BACKENDS} (default: every one that "
                             "runs here; on a CPU only torch, the others would run in an interpreter)")
    parser.add_argument("--ns-dtype", default="auto", help="muon.Muon's NS dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--rep-ms", type=float, default=None, help="time budget per measurement (ms)")
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
    """One optimizer configuration: how to build it and which NS calls its step makes."""

    def __init__(self, optimizer: str, backend: str, build: Callable[[], list], ns: Callable[[], object] | None):
        self.optimizer, self.backend, self.build, self.ns = optimizer, backend, build, ns


def candidates(model: torch.nn.Module, device: torch.device, names: list[str], explicit: set[str],
               ns_dtype: torch.dtype) -> tuple[list[Candidate], list[str]]:
    """(runnable candidates, skip notes) for this model and device."""
    groups = muon.param_groups(model)
    matrices = [(p, g.get("flatten", False)) for g in groups if g["use_muon"] for p in g["params"]]
    rest = [p for g in groups if not g["use_muon"] for p in g["params"]]
    params = list(model.parameters())
    schedule = resolve_schedule(KELLER, NS_STEPS, NS_EPS)
    gen = torch.Generator(device=device).manual_seed(1)
    # NS inputs: fp32 like the momentum the optimizer orthogonalizes, one stack per same-shape bucket
    # of a group, as muon.Muon (batched=True, the default) calls NS.
    buckets: dict[tuple[int, int], int] = {}
    for p, flatten in matrices:
        b, m, n = matrix_shape(p.shape, flatten)
        buckets[(m, n)] = buckets.get((m, n), 0) + b
    stacks = [torch.randn(b, m, n, device=device, generator=gen) for (m, n), b in buckets.items()]

    def muon_ns(backend: str):
        return lambda: [orthogonalize(X, schedule, dtype=ns_dtype, backend=backend) for X in stacks]

    out, skipped = [], []
    probe = stacks[0] if stacks else torch.zeros(1, 8, 8, device=device)
    fused_reason = _fused_adamw_reason(device)
    variants = [("muon.Muon", {})]
    if has_foreach_option():
        variants.append(("muon.Muon(foreach=False)", {"foreach": False}))
    for name in names:
        reason = backends.unavailable_reason(name, probe)
        if reason is None and device.type == "cpu" and name != "torch" and name not in explicit:
            reason = "not timed on a CPU unless named in --backends (it would run in an interpreter)"
        for label, extra in variants:
            if reason is not None:
                skipped.append(f"{label} [{name}]: {reason}")
                continue
            build = lambda name=name, extra=extra: [muon.Muon(
                muon.param_groups(model), lr=0.02, backend=name, ns_dtype=ns_dtype, adjust_lr_fn="match_rms_adamw",
                **extra)]
            out.append(Candidate(label, name, build, muon_ns(name)))
    if fused_reason:
        skipped.append(f"torch.optim.AdamW(fused=True): {fused_reason}")
    else:
        if not hasattr(torch.optim, "Muon"):
            skipped.append(f"torch.optim.Muon: this torch ({torch.__version__}) has none")
        elif any(p.ndim != 2 for p, _ in matrices):
            skipped.append("torch.optim.Muon: it takes 2-D parameters only, this model has others on Muon")
        else:
            from torch.optim._muon import _zeropower_via_newtonschulz

            mats = [torch.randn(p.shape, device=device, generator=gen) for p, _ in matrices]
            out.append(Candidate(
                "torch.optim.Muon+AdamW(fused)", "torch",
                lambda: [torch.optim.Muon([p for p, _ in matrices], lr=0.02, adjust_lr_fn="match_rms_adamw"),
                         *([torch.optim.AdamW(rest, lr=1e-3, fused=True)] if rest else [])],
                lambda: [_zeropower_via_newtonschulz(M, KELLER, NS_STEPS, NS_EPS) for M in mats]))
        out.append(Candidate("torch.optim.AdamW(fused)", "torch",
                             lambda: [torch.optim.AdamW(params, lr=1e-3, fused=True)], None))
    return out, skipped


def _cpu_times(fn: Callable[[], object], rep_ms: float) -> tuple[float, float]:
    """(median wall ms, median calling-thread CPU ms) of fn() on a CPU, from the same repetitions."""
    fn()
    walls, threads = [], []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(walls) < 3 or (time.perf_counter() < deadline and len(walls) < 50):
        w0, t0 = time.perf_counter(), time.thread_time()
        fn()
        threads.append((time.thread_time() - t0) * 1e3)
        walls.append((time.perf_counter() - w0) * 1e3)
    return statistics.median(walls), statistics.median(threads)


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


def measure(c: Candidate, model: torch.nn.Module, grads: dict, device: torch.device, rep_ms: float) -> dict:
    for p in model.parameters():
        p.grad = grads[p].clone()
    synchronize(device)
    # Parameters, gradients and the benchmark's own inputs: what exists before the optimizer does.
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    opts = c.build()

    def step():
        for opt in opts:
            opt.step()

    step()  # state is allocated (and kernels compiled / autotuned) on the first step: not timed
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
    if device.type == "cuda":
        host = _host_ms(step, device)
        median = time_ms(step, device, rep_ms=rep_ms)
        ns = None if c.ns is None else time_ms(c.ns, device, rep_ms=rep_ms)
    else:
        median, host = _cpu_times(step, rep_ms)
        ns = None if c.ns is None else _cpu_times(c.ns, rep_ms)[0]
    result = {"median_ms": median, "ns_ms": ns, "ops_per_step": ops.total, "host_ms": host,
              "state_bytes": sum(state_bytes(o) for o in opts), "peak_bytes": peak}
    opts.clear()  # the optimizers and their state go before the next candidate is built
    for p in model.parameters():
        p.grad = None
    return result


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    specs = args.model or (GPU_MODELS if device.type == "cuda" else CPU_MODELS)
    names = args.backends.split(",") if args.backends else list(backends.BACKENDS)
    for name in names:
        if name not in backends.BACKENDS:
            raise SystemExit(f"--backends: unknown backend {name!r}; choose from {backends.BACKENDS}")
    explicit = set(names) if args.backends else set()
    if args.ns_dtype == "auto":
        ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        ns_dtype = dtype_of(args.ns_dtype)
    rep_ms = args.rep_ms or (200.0 if device.type == "cuda" else 300.0)
    results = Results(device)
    meta = results.meta
    skipped_all = []

    for spec in specs:
        try:
            cfg = parse_model(spec)
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"--model {spec}: {exc}") from None
        if not isinstance(cfg, TransformerConfig):
            raise SystemExit(f"--model {spec}: the step benchmark takes a preset or a custom: transformer")
        torch.manual_seed(0)
        model = build_model(cfg, device=device)
        grads = {p: torch.randn_like(p) * 1e-3 for p in model.parameters()}
        found, skipped = candidates(model, device, names, explicit, ns_dtype)
        skipped_all += [f"{spec}: {s}" for s in skipped]
        for c in progress(found, desc=f"step {spec}", unit="optimizer"):
            row = {"model": spec, "optimizer": c.optimizer, "backend": c.backend, "device": meta["device"],
                   "torch": meta["torch_version"], "triton": meta["triton_version"], "commit": meta["commit"]}
            try:
                row.update(measure(c, model, grads, device, rep_ms))
            except Exception as exc:  # one failing optimizer must not lose the others' rows
                skipped_all.append(f"{spec}: {c.optimizer} [{c.backend}]: error: {type(exc).__name__}: {exc}")
                continue
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.rows.append({k: row.get(k) for k in COLUMNS})
        del model, grads, found

    out = args.out or default_out(device)
    paths = results.write(out, "step")
    print(f"optimizer step on {meta['device']} (muon.Muon NS in {str(ns_dtype).removeprefix('torch.')}; "
          "torch.optim.Muon NS in bfloat16)")
    print(fmt_table(results.rows, ["model", "optimizer", "backend", "median_ms", "ns_ms", "ops_per_step", "host_ms",
                                   "state_bytes", "peak_bytes"]))
    for note in skipped_all:
        print(f"skipped {note}")
    if not args.no_plot and results.rows:
        png = plot(results.rows, out / "step.png")
        paths += [png] if png else []
    for p in paths:
        print(f"wrote {p}")
    return 0


def plot(rows: list[dict], path: Path) -> Path | None:
    """Step time per optimizer, one panel per model: the NS share (the same buckets timed alone)
    stacked under the rest of the step."""
    plt = pyplot()
    if plt is None:
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 0.5 * max(
        sum(r["model"] == m for r in rows) for m in models) + 1.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        labels = [f"{r['optimizer']} [{r['backend']}]" for r in mine]
        total = [r["median_ms"] for r in mine]
        ns = [min(r["ns_ms"] or 0.0, r["median_ms"]) for r in mine]  # NS alone can exceed a step by noise
        y = range(len(mine))
        ax.barh(y, ns, color="C0", label="Newton–Schulz (same calls, timed alone)")
        ax.barh(y, [t - n for t, n in zip(total, ns)], left=ns, color="C1", label="rest of the step")
        for i, t in enumerate(total):
            ax.text(t, i, f" {t:.3g}", va="center", fontsize=7)
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("median step time (ms)")
        ax.set_ylabel("optimizer [NS backend]")
        ax.set_title(model, fontsize=9)
        ax.set_xlim(0, max(total) * 1.25)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=2)
    fig.suptitle(f"One optimizer step, {rows[0]['device']} (commit {rows[0]['commit']})", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
