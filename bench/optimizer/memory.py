"""`python -m bench memory`: optimizer memory on the CPU in bytes per parameter, per configuration.

    python -m bench memory                                  # 8 matrices 1024x1024, every config
    python -m bench memory --layers 16 --dim 1536 --configs muon,torch-muon,torch-adamw-foreach

Method (RSS). Each configuration runs in a process of its own, started with MALLOC_MMAP_THRESHOLD_=65536
so that every big allocation is an mmap and a free returns its pages (RSS goes down again), and with
one thread. The process holds L fp32 (or bf16) matrices dim x dim with random gradients; a warm-up
optimizer of the same configuration first takes two steps on a tiny model (code pages and lazily
built caches of the first op are not the optimizer's memory). Then:
    base       RssAnon before the optimizer exists (parameters and gradients included)
    step 1     creates the state and whatever the optimizer keeps
    resident   RssAnon after step 1 - base: what the optimizer keeps between steps
    step 2     after writing 5 to /proc/self/clear_refs (VmHWM := VmRSS):
    step_peak  VmHWM after step 2 - VmRSS before it: the extra peak inside a step
    peak_total resident + step_peak: the peak above parameters and gradients
    state      bytes of the tensors in opt.state, each distinct storage once (the momentum views
               into one stacked buffer count once)
all divided by the number of parameters (B/param). ns_steps=1 for the Muon configurations: one
Newton–Schulz iteration needs the memory five need.

Method (counting), `LiveTensors` / `count_step_memory`: a TorchDispatchMode that follows every
tensor an aten op returns, counts each untyped storage created while it is active once (by its
data_ptr and nbytes) and drops it when the last tensor seen on it dies (weakref finalizers). It
gives the same two figures from live tensors: the bytes created in step 1 still alive after it, and
the peak of live bytes in step 2 above those before it. It is deterministic, fast and in-process
(tests/test_memory.py asserts the optimizer's figures with it); it does not see scratch memory
inside one kernel (BLAS packing buffers), which RSS does. Every row carries both: `median` from RSS,
`extra.counted` from a fresh optimizer counted in the same process after the RSS measurement.

Configurations (`--configs`, default all): muon.Muon default, foreach=False, atomic=False (a
skipped row where muon.Muon has no `atomic` argument), variant="normuon", bf16 parameters,
state_dtype=bfloat16 and int8 (low-precision momentum), DDP on
2 gloo ranks (rank 0 measured; skipped with the reason where it cannot run), the same matrices in a
muon AdamW group (use_muon=False) with nonfinite="skip", "raise", foreach=False, state_dtype=bfloat16
and bf16 parameters,
torch.optim.Muon (its Newton–Schulz patched to compute in fp32: its bf16 NS is very slow on a CPU;
the memory pattern is the same) and torch.optim.AdamW fused and foreach.

Rows (memory.csv / memory.json, bench/schema.py columns): op optimizer_memory, metric state,
resident, step_peak or peak_total, unit B/param, shape LxDxD, dtype the parameters'; computed values,
so the spread columns are empty; extra: config, params, bytes, counted (the counting mode's B/param
for the same metric; none for state), and a note where the configuration is patched.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import inspect
import json
import os
import socket
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

OP = "optimizer_memory"
METRICS = ("state", "resident", "step_peak", "peak_total")
UNIT = "B/param"
MMAP_THRESHOLD = "65536"  # bytes: every larger malloc is an mmap, and its free returns the pages
CHILD_TIMEOUT_S = 600


# ------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    """One optimizer configuration: its provider name (bench/step.py's spelling) and how to build it."""

    provider: str
    kind: str  # "muon" (muon.Muon), "adamw" (a muon.Muon AdamW group) or "torch" (torch.optim)
    options: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    ranks: int = 1
    note: str = ""


TORCH_MUON_NOTE = ("torch.optim.Muon's Newton-Schulz patched to compute in fp32 (its bf16 NS is very slow on a "
                   "CPU); the same memory pattern")
CONFIGS: dict[str, Config] = {
    "muon": Config("muon.Muon[torch]", "muon"),
    "muon-loop": Config("muon.Muon(foreach=False)[torch]", "muon", {"foreach": False}),
    "muon-nonatomic": Config("muon.Muon(atomic=False)[torch]", "muon", {"atomic": False}),
    "muon-normuon": Config("muon.Muon(variant=normuon)[torch]", "muon", {"variant": "normuon"}),
    "muon-bf16-params": Config("muon.Muon[torch]", "muon", dtype=torch.bfloat16),
    "muon-state-bf16": Config("muon.Muon(state_dtype=bfloat16)[torch]", "muon", {"state_dtype": torch.bfloat16}),
    "muon-state-int8": Config("muon.Muon(state_dtype=int8)[torch]", "muon", {"state_dtype": torch.int8}),
    "muon-ddp": Config("muon.Muon[torch]+DDP(2 gloo ranks)", "muon", ranks=2,
                       note="rank 0 of 2 gloo processes on loopback, replicated parameters and gradients"),
    "muon-adamw": Config("muon.Muon(use_muon=False)[torch]", "adamw"),
    "muon-adamw-raise": Config("muon.Muon(use_muon=False,nonfinite=raise)[torch]", "adamw",
                               {"nonfinite": "raise"}),
    "muon-adamw-loop": Config("muon.Muon(use_muon=False,foreach=False)[torch]", "adamw", {"foreach": False}),
    "muon-adamw-state-bf16": Config("muon.Muon(use_muon=False,state_dtype=bfloat16)[torch]", "adamw",
                                    {"state_dtype": torch.bfloat16}),
    "muon-adamw-bf16-params": Config("muon.Muon(use_muon=False)[torch]", "adamw", dtype=torch.bfloat16),
    "torch-muon": Config("torch.optim.Muon", "torch", note=TORCH_MUON_NOTE),
    "torch-adamw-fused": Config("torch.optim.AdamW(fused)", "torch", {"fused": True}),
    "torch-adamw-foreach": Config("torch.optim.AdamW(foreach)", "torch", {"foreach": True}),
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def has_atomic_option() -> bool:
    import muon

    return "atomic" in inspect.signature(muon.Muon.__init__).parameters


def skip_reason(key: str) -> str | None:
    """Why configuration `key` cannot run here (None: it can)."""
    if key == "muon-nonatomic" and not has_atomic_option():
        return "muon.Muon takes no atomic argument in this version"
    if key == "torch-muon" and not hasattr(torch.optim, "Muon"):
        return f"this torch ({torch.__version__}) has no torch.optim.Muon"
    if CONFIGS[key].ranks > 1:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_gloo_available():
            return "torch.distributed with the gloo backend is not available in this torch build"
    return None


def _ns_fp32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's Newton–Schulz, computed in fp32 (the same tensors and order; the CPU's fast dtype)."""
    a, b, c = ns_coefficients
    X = grad.float()
    if grad.size(0) > grad.size(1):
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a, alpha=1.0)
    if grad.size(0) > grad.size(1):
        X = X.T
    return X


@contextlib.contextmanager
def torch_muon_fp32_ns() -> Iterator[None]:
    """torch.optim.Muon with its Newton–Schulz in fp32 inside the block (a module global of torch.optim._muon)."""
    import torch.optim._muon as tm

    saved = tm._zeropower_via_newtonschulz
    tm._zeropower_via_newtonschulz = _ns_fp32
    try:
        yield
    finally:
        tm._zeropower_via_newtonschulz = saved


def make_params(layers: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """`layers` parameters dim x dim with random gradients (the same on every rank for one seed)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(layers):
        p = torch.nn.Parameter((torch.randn(dim, dim, generator=gen) * 0.02).to(dtype))
        p.grad = torch.randn(dim, dim, generator=gen).to(dtype)
        params.append(p)
    return params


def build(key: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """Configuration `key`'s optimizer on `params` (ns_steps=1 for every Muon; torch.optim.Muon's NS is
    fp32 only inside `torch_muon_fp32_ns`)."""
    import muon

    cfg = CONFIGS[key]
    if key == "torch-muon":
        return torch.optim.Muon(params, lr=0.02, ns_steps=1)
    if cfg.kind == "torch":
        return torch.optim.AdamW(params, lr=1e-3, **cfg.options)
    group = {"params": params}
    if cfg.kind == "adamw":
        group.update(use_muon=False, lr=1e-3)
    return muon.Muon([group], lr=0.02, ns_steps=1, backend="torch", **cfg.options)


# ----------------------------------------------------------------------------- counting mode
def _storage(t):
    """The storage a tensor's bytes live in: its own, or for a wrapper subclass (a DTensor, a
    collective's async result) its inner tensor's (the mode sees the subclass's op, not the ops on
    what it wraps); None for a meta tensor or a non-tensor."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    while is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        t = getattr(t, attrs[0])
    return t.untyped_storage()


class LiveTensors(TorchDispatchMode):
    """The bytes of live tensor storages created while the mode is active.

    Every tensor an aten op returns is looked at: a storage that is not one of the op's inputs' and
    not already followed is new (its nbytes counted once, keyed by data_ptr); each tensor seen on a
    followed storage gets a weakref finalizer, and when the last of them dies the storage is dropped.
    `bytes` is what is alive now, `peak` the most alive at once since the start or `reset_peak()`.
    Storages that existed before the mode (parameters, gradients, earlier state) are never counted,
    and their frees are not seen; allocations inside a kernel that no returned tensor holds (BLAS
    scratch) are not seen either."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # data_ptr -> [nbytes, tensors seen on it still alive]
        self.bytes = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.bytes

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.bytes -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_flatten(out)[0]:
            storage = _storage(t)
            if storage is None:
                continue
            key = storage.data_ptr()
            if key == 0:  # an empty tensor
                continue
            entry = self.live.get(key)
            if entry is None:
                if inputs is None:
                    inputs = {s.data_ptr() for a in tree_flatten((args, kwargs))[0] if (s := _storage(a)) is not None}
                if key in inputs:  # a view of (or in place on) a storage from before: not new
                    continue
                entry = self.live[key] = [storage.nbytes(), 0]
                self.bytes += entry[0]
                self.peak = max(self.peak, self.bytes)
            entry[1] += 1
            weakref.finalize(t, self._drop, key)
        return out


@dataclass
class Counted:
    """Bytes from the counting mode: `kept` created in the block and alive after it, `peak` the most
    alive at once inside it (both above what existed before it)."""

    kept: int
    peak: int


@contextlib.contextmanager
def count_bytes() -> Iterator[Counted]:
    """Count the live tensor bytes created in the block: `.kept` and `.peak` are set when it ends."""
    result = Counted(0, 0)
    with LiveTensors() as live:
        try:
            yield result
        finally:
            result.kept, result.peak = live.bytes, live.peak


def count_step_memory(make: Callable[[], torch.optim.Optimizer]) -> dict[str, int]:
    """The counting mode's figures for one optimizer, in bytes: `resident`, the storages created by
    its construction and first step still alive after it, and `step_peak`, the peak of live storages
    in its second step above those alive before it (the storages from the first step are followed,
    so the second step's frees of them count). Also `state` (bench/optimizer/memory.py's `state_bytes`)."""
    with LiveTensors() as live:
        opt = make()
        opt.step()
        resident = live.bytes
        live.reset_peak()
        opt.step()
        step_peak = live.peak - resident
    return {"resident": resident, "step_peak": step_peak, "state": state_bytes(opt)}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in opt.state, each distinct untyped storage once."""
    seen: dict[int, int] = {}
    for state in opt.state.values():
        for v in state.values():
            s = _storage(v) if isinstance(v, torch.Tensor) and v.numel() else None
            if s is not None:  # a DTensor's: its local shard's
                seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------------- the child
def _kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def child(key: str, layers: int, dim: int, rank: int, port: int, count: bool) -> dict:
    """One configuration's figures in this process (bytes), measured as the module docstring says."""
    import muon  # noqa: F401  imported by every configuration: not the optimizer's memory

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = CONFIGS[key]
    if cfg.ranks > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg.ranks)
    patch = torch_muon_fp32_ns() if key == "torch-muon" else contextlib.nullcontext()
    with patch:
        warm = make_params(2, 64, cfg.dtype, seed=1)
        opt = build(key, warm)
        opt.step()
        opt.step()
        del opt, warm
        params = make_params(layers, dim, cfg.dtype)
        n = sum(p.numel() for p in params)
        base = _kib("RssAnon")
        opt = build(key, params)
        opt.step()
        resident = (_kib("RssAnon") - base) * 1024
        state = state_bytes(opt)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _kib("VmRSS")
        opt.step()
        peak = (_kib("VmHWM") - before) * 1024
        out = {"params": n, "state": state, "resident": resident, "step_peak": peak}
        del opt
        gc.collect()
        if count:
            counted = count_step_memory(lambda: build(key, params))
            out["counted"] = {"resident": counted["resident"], "step_peak": counted["step_peak"]}
    if cfg.ranks > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    from muon.newton_schulz import resolve_dtype

    out["ns_dtype"] = dtype_name(resolve_dtype("auto", torch.device("cpu"), (dim, dim))) if cfg.kind == "muon" else ""
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def run_config(key: str, layers: int, dim: int, count: bool = True) -> dict:
    """Configuration `key` measured in fresh processes (one per rank); rank 0's figures, or
    {"error": why}."""
    from ..common import REPO

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    ranks = CONFIGS[key].ranks
    port = _free_port() if ranks > 1 else 0
    cmd = [sys.executable, "-m", "bench.optimizer.memory", "--child", key, "--layers", str(layers), "--dim", str(dim),
           "--port", str(port), *([] if count else ["--no-count"])]
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=REPO) for r in range(ranks)]
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", f"no result in {CHILD_TIMEOUT_S} s"
        outs.append((p.returncode if p.returncode is not None else -1, stdout, stderr))
        if outs[-1][0]:  # the other ranks would wait for this one in a collective
            for q in procs:
                if q.poll() is None:
                    q.kill()
                    q.wait()
            break
    for r, (code, _, err) in enumerate(outs):
        if code:
            return {"error": f"rank {r} of {ranks}: {_last_line(err)}" if ranks > 1 else _last_line(err)}
    return json.loads(_last_line(outs[0][1]))


# ------------------------------------------------------------------------------------ command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=8, help="matrices (default 8)")
    parser.add_argument("--dim", type=int, default=1024, help="each matrix dim x dim (default 1024)")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated, from {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="configurations measured at once, each in its own process (default 2; RSS is per "
                             "process, so they do not disturb each other's figures)")
    parser.add_argument("--no-count", action="store_true",
                        help="RSS only, without the counting mode's figures (extra.counted)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/out/<device>)")
    parser.add_argument("--no-plot", action="store_true")


def per_param(value: int, n: int) -> float:
    return round(value / n, 3)


def run(args: argparse.Namespace) -> int:
    from .. import plots
    from ..common import default_out, progress, skip_line, wrap
    from ..schema import Results

    keys = args.configs.split(",") if args.configs else list(CONFIGS)
    for key in keys:
        if key not in CONFIGS:
            raise SystemExit(f"--configs: unknown configuration {key!r}; choose from {', '.join(CONFIGS)}")
    if args.layers < 1 or args.dim < 2:
        raise SystemExit("--layers must be >= 1 and --dim >= 2")
    device = torch.device("cpu")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the children run on one thread: so say the meta columns
    results = Results(device, "memory")
    torch.set_num_threads(saved)
    shape = f"{args.layers}x{args.dim}x{args.dim}"
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    measured: dict[str, dict] = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {}
        for key in keys:
            reason = skip_reason(key)
            if reason:
                measured[key] = {"skipped": reason}
            else:
                futures[pool.submit(run_config, key, args.layers, args.dim, not args.no_count)] = key
        with progress(total=len(futures), desc="memory", unit="config") as bar:
            for future in concurrent.futures.as_completed(futures):
                measured[futures[future]] = future.result()
                bar.update(1)
    for key in keys:
        cfg, got = CONFIGS[key], measured[key]
        base = {"config": key, **({"note": cfg.note} if cfg.note else {})}
        if "skipped" in got or "error" in got:
            # a multi-process configuration that cannot start its ranks here is skipped, not an error
            status = (f"skipped: {got['skipped']}" if "skipped" in got else
                      f"skipped: {got['error']}" if cfg.ranks > 1 else f"error: {got['error']}")
            for metric in METRICS:
                results.add(OP, cfg.provider, shape, dtype_name(cfg.dtype), metric=metric, unit=UNIT,
                            status=status, **base)
            continue
        n = got["params"]
        values = {m: got[m] for m in ("state", "resident", "step_peak")}
        values["peak_total"] = got["resident"] + got["step_peak"]
        counted = got.get("counted")
        if counted:
            counted = {**counted, "peak_total": counted["resident"] + counted["step_peak"]}
        for metric in METRICS:
            extra = {**base, "params": n, "bytes": values[metric], "method": "RSS"}
            if got.get("ns_dtype"):
                extra["ns_dtype"] = got["ns_dtype"]
            if counted and metric in counted:
                extra["counted"] = per_param(counted[metric], n)
            results.add(OP, cfg.provider, shape, dtype_name(cfg.dtype), metric=metric, unit=UNIT,
                        value=per_param(values[metric], n), **extra)

    out = args.out or default_out(device)
    paths = results.write(out, "memory")
    print(wrap(f"optimizer memory on {results.meta['device']}, commit {results.meta['commit']}: {args.layers} "
               f"matrices {args.dim}x{args.dim} with gradients, bytes per parameter; RSS of one process per "
               "configuration (counted: live tensors, the counting mode); ns_steps=1"))
    print(console_table(results.rows))
    line = skip_line(results.rows, "memory.csv")
    if line:
        print(line)
    if not args.no_plot and results.ok():
        png = plots.memory(results.rows, out / "memory.png")
        paths += [png] if png else []
    print("wrote " + ", ".join(p.name for p in paths) + f" in {out}")
    return 0


def console_table(rows: list[dict]) -> str:
    """One line per configuration, at most 100 columns: state, resident, step peak, peak total (RSS)
    and the counting mode's resident and step peak."""
    by: dict[str, dict] = {}
    for r in rows:
        if r["op"] == OP and r["status"] == "ok":
            by.setdefault(r["extra"]["config"], {"config": r["extra"]["config"], "params": r["dtype"][:8]})
            by[r["extra"]["config"]][r["metric"]] = r
    lines = []
    for key, got in by.items():
        lines.append({"config": key, "params": got["params"],
                      **{name: got[m]["median"] if m in got else None
                         for name, m in (("state", "state"), ("resident", "resident"),
                                         ("step peak", "step_peak"), ("peak total", "peak_total"))},
                      "counted res.": got.get("resident", {}).get("extra", {}).get("counted"),
                      "counted peak": got.get("step_peak", {}).get("extra", {}).get("counted")})
    if not lines:
        return "no configuration ran"
    from ..common import fmt_table

    return fmt_table(lines, list(lines[0]))


def _child_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.optimizer.memory")
    ap.add_argument("--child", required=True, choices=list(CONFIGS))
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--no-count", action="store_true")
    a = ap.parse_args(argv)
    print(json.dumps(child(a.child, a.layers, a.dim, a.rank, a.port, not a.no_count)), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
