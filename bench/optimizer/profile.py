"""`python -m bench profile`: the optimizer step under torch.profiler, or one kernel for Nsight Compute.

    python -m bench profile --model gpt2-124m               # Chrome trace + op table under --out
    nsys profile -t cuda,nvtx python -m bench profile        # the same NVTX ranges in Nsight Systems
    ncu --profile-from-start off -o ns python -m bench profile --kernel --shape 4096x4096 --backend triton --iters 1

Ranges: "muon.step<i>" around each optimizer step and, inside it, one range per NS call
("ns[<backend>] BxMxN"); for the torch backend also one per stage ("ns.normalize",
"ns.step<i>.gram" X·Xᵀ, "ns.step<i>.poly" b·A + c·A·A, "ns.step<i>.update" a·X + B·X). They are
torch.profiler record_function ranges, and NVTX ranges too when CUDA is in use (nothing touches
CUDA on a CPU run). --kernel runs one NS call --iters times between cudaProfilerStart/Stop.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import muon
from muon import backends
from muon.backends.torch_backend import normalize
from muon.coefficients import Schedule, resolve_schedule
from muon.newton_schulz import orthogonalize

from .. import models
from ..common import (
    default_out,
    dtype_of,
    fmt_table,
    parse_shape,
    pick_device,
    set_threads,
    shape_str,
    synchronize,
)

_NVTX = {"on": False}


@contextlib.contextmanager
def stage(name: str):
    """A profiler range (record_function) and, when CUDA is in use, an NVTX range of the same name."""
    with torch.profiler.record_function(name):
        if _NVTX["on"]:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if _NVTX["on"]:
                torch.cuda.nvtx.range_pop()


def staged_newton_schulz(X: torch.Tensor, schedule: Schedule, dtype: torch.dtype) -> torch.Tensor:
    """The torch backend's NS (muon.backends.torch_backend.newton_schulz_torch), op for op, with a range
    per stage; tests check it gives bit-identical results."""
    with stage("ns.normalize"):
        X = normalize(X, schedule).to(dtype)
    for i, (a, b, c) in enumerate(schedule.coefficients):
        with stage(f"ns.step{i}.gram"):
            A = torch.bmm(X, X.mT)
        with stage(f"ns.step{i}.poly"):
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        with stage(f"ns.step{i}.update"):
            X = torch.baddbmm(X, B, X, beta=a)
    return X


@contextlib.contextmanager
def instrumented_backends():
    """Route every importable backend's `run` through ranges (the torch backend stage by stage).

    The dispatcher looks `run` up on the backend module at each call, so replacing the attribute for
    the duration of the context is enough; the originals are restored on exit.
    """
    saved = []
    for name, module_name in backends._MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        original = module.run

        def wrapped(X, schedule, dtype, _name=name, _run=original):
            with stage(f"ns[{_name}] {shape_str(X.shape)}"):
                if _name == "torch":
                    return staged_newton_schulz(X, schedule, dtype)
                return _run(X, schedule, dtype)

        saved.append((module, original))
        module.run = wrapped
    try:
        yield
    finally:
        for module, original in saved:
            module.run = original


@contextlib.contextmanager
def quiet_kineto():
    """Drop the "USDT: ... profiler_start/stop" lines that the profiler's C++ side (kineto) writes
    straight to file descriptor 2; every other line written to stderr meanwhile is passed on."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith("USDT:")]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--model", default=None, help="preset or 'custom:...' (default: gpt2-124m GPU, tiny CPU)")
    parser.add_argument("--backend", default="auto", help="muon backend for the step or the kernel (default auto)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps profiled after one warm-up step")
    parser.add_argument("--out", type=Path, default=None, help="folder for the trace (default bench/out/<device>)")
    parser.add_argument("--kernel", action="store_true", help="Nsight Compute mode: one NS call, --iters times")
    parser.add_argument("--shape", default="4096x4096", help="--kernel: MxN or BxMxN (default 4096x4096)")
    parser.add_argument("--iters", type=int, default=1, help="--kernel: calls between profiler start/stop")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on a CPU)")
    parser.add_argument("--dtype", default="auto",
                        help="NS compute dtype (default auto: bf16 on CUDA; on a CPU fp32 unless muon's measured CPU "
                        "table says bf16 for the shape)")


def ns_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """--dtype: "auto" goes to muon as it is (ns_dtype="auto", resolved per shape where NS runs)."""
    return "auto" if name == "auto" else dtype_of(name)


def run_kernel(args: argparse.Namespace, device: torch.device) -> int:
    b, m, n = parse_shape(args.shape)
    G = torch.randn(b, m, n, device=device)
    schedule = resolve_schedule("keller", 5, 1e-7)
    dtype = ns_dtype(args.dtype, device)

    def call():
        return orthogonalize(G, schedule, dtype=dtype, backend=args.backend)

    for _ in range(2):  # compile / autotune outside the profiled region
        call()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.cudart().cudaProfilerStart()
    start = time.perf_counter()
    with instrumented_backends():
        for i in range(args.iters):
            with stage(f"kernel-iter{i}"):
                call()
    synchronize(device)
    elapsed = (time.perf_counter() - start) * 1e3
    if device.type == "cuda":
        torch.cuda.cudart().cudaProfilerStop()
    print(f"ran NS[{args.backend}] on {shape_str((b, m, n))} {args.iters} time(s): {elapsed:.3f} ms in all")
    return 0


def top_ops(averages, device: torch.device, limit: int = 8) -> str:
    """The `limit` ops with the most total time, in a table of at most 100 columns."""
    cuda = device.type == "cuda"

    def total(e) -> float:
        return getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) if cuda else e.cpu_time_total

    rows = [{"op or range": e.key[:52], "calls": e.count, f"{'CUDA' if cuda else 'CPU'} total ms": total(e) / 1e3,
             "self CPU ms": e.self_cpu_time_total / 1e3}
            for e in sorted(averages, key=total, reverse=True)[:limit]]
    return f"top {limit} of {len(averages)} ops and ranges by total time:\n" + fmt_table(rows, list(rows[0]))


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    set_threads(args.threads, device)
    _NVTX["on"] = device.type == "cuda"
    if args.kernel:
        return run_kernel(args, device)
    spec = args.model or ("gpt2-124m" if device.type == "cuda" else "tiny")
    cfg = models.parse_model(spec)
    if isinstance(cfg, models.TransformerConfig):
        module = models.build(cfg, device=device)
    else:  # a module: model built on meta; give it real (uninitialized) storage
        module = cfg.to_empty(device=device)
    opt = muon.Muon(muon.param_groups(module), lr=0.02, backend=args.backend, adjust_lr_fn="match_rms_adamw",
                    ns_dtype=ns_dtype(args.dtype, device))
    torch.manual_seed(0)
    for p in module.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # warm-up: state allocation, compilation
    synchronize(device)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with quiet_kineto(), instrumented_backends(), \
            torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for i in range(args.steps):
            with stage(f"muon.step{i}"):
                opt.step()
        synchronize(device)

    out = args.out or default_out(device)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"profile_{spec.replace(':', '_').replace(',', '_').replace('=', '')}"
    trace = out / f"{stem}.json.gz"  # gzip: Perfetto and chrome://tracing read it as is
    prof.export_chrome_trace(str(trace))
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    averages = prof.key_averages()
    (out / f"{stem}.txt").write_text(averages.table(sort_by=sort, row_limit=25) + "\n")
    print(top_ops(averages, device))
    print(f"wrote {trace.name} (Chrome trace: chrome://tracing, ui.perfetto.dev) and {stem}.txt in {out}")
    return 0
