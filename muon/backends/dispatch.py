"""The one dispatch table: which Newton–Schulz backend and algorithm "auto" runs for a given problem.

Every threshold here says where it comes from: a GPU measurement (device and commit) or a public
reference implementation, never a guess.

## Algorithm table — `choose_algorithm(m, n, device, dtype)`

Standard or Gram Newton–Schulz for algorithm="auto"; sources beside each constant in its section below.

## NS compute dtype — `choose_ns_dtype(m, n, device)`

What ns_dtype="auto" computes in: bf16 on CUDA (tensor cores); on a CPU the measured table
`CPU_DTYPE_TABLE` (one entry per CPU model, thread count and shape, `python -m bench ns-dtype`), fp32
wherever it has nothing to say (another CPU, an unmeasured shape class, sharded groups).

## The kernel — `choose_kernel(backend, algorithm, batch, s, l, dtype, device_type, steps=, reasons=)`

The one function that maps a stack's shape, compute dtype and device, a group's `backend` and
`ns_algorithm`, the facts of the process (`reasons`: which backends can run here, from
`muon.backends.registry.REGISTRY`) and the tables below to the kernel that runs (a `KernelChoice`;
`muon.backends.op.Kernel` runs it). Pure: the plan calls it (through `muon.backends.plan_kernel`)
once per bucket when it is built and keeps the answer; `muon.newton_schulz` once per call.

## Backend table — `choose_for_shape(batch, m, n, dtype, device_type)`

Source: bench/results/h100-899c9f9/kernels.csv — NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0,
commit 899c9f9, NS of 5 Keller steps on fp32 inputs in bf16, `triton.testing.do_bench` medians, every
provider in one process (its "muon torch / triton / cuda" columns decide).
`BACKEND_TABLE` below is `table_from_csv` of that file (tests/test_dispatch.py checks they agree);
`python -m muon.backends.dispatch CSV...` prints the table of new `python -m bench kernels` results
(same CSV format) to paste here after a GPU run.

Rule, per (batch, small side s, large side l, dtype) on a CUDA tensor:
- the nearest measured shape of the same dtype, nearness = the largest |log2 ratio| over batch, s and l;
  if it lies within a factor 2 on all three (`REACH`) and a muon kernel provider beat muon's torch
  backend there, that provider runs; ties in distance with different winners run torch;
- everything else runs torch (cuBLAS): unmeasured classes, other dtypes (only bf16 was measured), CPU.
Only kernel versions that were measured can win: a row names its kernel version ("triton-v1": the
fused small path for s <= 128 and the 3-launch tiled path above, as `triton_backend` path "auto" runs
them; the persistent v2 kernels are unmeasured and absent). The CUDA extension is never chosen by auto
(slower than torch from 2048 up in that run).
"""

from __future__ import annotations

import csv
import math
import platform
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .registry import BACKENDS, REGISTRY, BackendUnavailable

# ----------------------------------------------------------------------------- NS algorithm

def kernel_name(backend: str, path: str = "") -> str:
    """The op's backend argument of a backend and its path ("" or "auto": the backend's default)."""
    return f"{backend}:{path}" if path and path != "auto" else backend


class KernelChoice:
    """One resolved Newton–Schulz kernel: a backend ("torch", "triton", "cuda"), its path (triton's:
    "" for v1 by shape, "small", "gemm", "persistent"), the algorithm ("standard", "gram") and Gram's
    restarts, and why it was chosen: what `choose_kernel` answers. `muon.backends.op.Kernel` is the one
    that runs (called, it runs muon::newton_schulz with it); a choice equals the Kernel of the same key."""

    __slots__ = ("backend", "path", "algorithm", "restarts", "reason", "name")

    def __init__(self, backend: str, algorithm: str = "standard", *, path: str = "", restarts=(),
                 reason: str = "") -> None:
        self.backend, self.path, self.algorithm = backend, "" if path == "auto" else path, algorithm
        self.restarts = tuple(restarts) if algorithm == "gram" else ()
        self.reason = reason
        self.name = kernel_name(backend, path)

    def _key(self) -> tuple:
        return self.name, self.algorithm, self.restarts

    def __eq__(self, other) -> bool:
        return isinstance(other, KernelChoice) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        restarts = f", restarts={self.restarts}" if self.restarts else ""
        return f"{type(self).__name__}({self.name!r}, {self.algorithm!r}{restarts})"


# algorithm="auto": standard Newton–Schulz or Gram Newton–Schulz (muon.backends.torch_backend.run_gram).
#
# Gram NS only in half precision (bf16, fp16): that is what it is built for (its restart keeps it
# within ~2x of torch's own half-precision error, see tests/test_gram_ns.py), while in fp32 its error
# reached 15x standard NS's on our inputs (the output is Q·X with ‖Q‖ up to ~30 on the small singular
# directions, and Q's rounding is relative to ‖Q‖). fp32/fp64 callers asked for accuracy: standard.
GRAM_DTYPES = (torch.bfloat16, torch.float16)

# Aspect ratio: Gram NS only for long/short > 2. Source: the FLOP model (muon.flops, 5 steps, one
# restart): Gram/standard = (8e + 28) / (20e + 10) at n = e·m, i.e. 0.88 at 1:2, 0.67 at 1:4, 0.54 at
# 1:8; a 12 % saving at 1:2 is within what kernel efficiency differences eat (the one measurement
# below realised 0.79 where the model says 0.67). Public reference: Dao-AILab/gram-newton-schulz keeps
# standard NS on square matrices (its Gram path engages only above aspect ratio 1).
GRAM_MIN_ASPECT = 2.0

# Small side on CUDA: Gram NS from 2048 up. Source: measurement, H100, commit 899c9f9
# (/work/shared/measurements.md; gram-newton-schulz 0.1.6's own kernels, Gram vs its standard NS, ms):
#   1×4096×16384: 5.71 vs 8.49 (0.67x)    1×2048×8192: 1.96 vs 2.47 (0.79x)
#   24×768×3072:  2.43 vs 2.26 (1.08x)    4×1024×4096: 2.68 vs 1.40 (1.91x)
# so Gram wins at 2048 and 4096 and loses at 768 and 1024 (batched). Muon's own Gram kernels are
# unmeasured. Public reference: gram-newton-schulz runs dense (non-symmetric) kernels below a small
# side of 256, where symmetric tiling has nothing to save; our CUDA threshold is above that anyway.
GRAM_MIN_SIDE_CUDA = 2048

# Other devices (the CPU): the FLOP model decides (see choose_algorithm). A check, not the source of
# the rule: CPU timings (2-thread AMD EPYC shared with other jobs, so noisy; `python -m bench kernels`,
# bf16, 300 ms per point), Gram vs standard ms: 2×32×128 10.8 vs 18.2; 8×32×128 40.8 vs 75.2;
# 64×96 72 vs 188; 64×256 20.6 vs 59.8; 2×64×256 236 vs 392; 128×256 390 vs 497; 128×512 408 vs 668.

ALGORITHMS = ("standard", "gram", "auto")


def choose_algorithm(m: int, n: int, device, dtype: torch.dtype, *, steps: int = 5, restarts=(2,)) -> str:
    """"standard" or "gram" for one m×n matrix (or a batch of them) of NS in compute `dtype` on `device`.

    CUDA: Gram for half precision, aspect > GRAM_MIN_ASPECT and small side >= GRAM_MIN_SIDE_CUDA.
    Other devices (the CPU): Gram for half precision wherever the FLOP model (muon.flops with this
    `steps` and `restarts`) counts fewer matmul FLOPs than standard NS — at 5 steps with one restart
    that is n > 1.5·m — because there is no measurement to go on and the CPU's matmul time follows
    its FLOPs; half precision because Gram NS is stable there (restart) and less accurate in fp32.
    """
    from ..ns_flops import newton_schulz_flops

    short, long = min(m, n), max(m, n)
    if dtype not in GRAM_DTYPES or short == 0 or steps == 0:
        return "standard"
    if torch.device(device).type == "cuda":
        if long > GRAM_MIN_ASPECT * short and short >= GRAM_MIN_SIDE_CUDA:
            return "gram"
        return "standard"
    gram = newton_schulz_flops(short, long, steps, algorithm="gram", restarts=restarts)
    return "gram" if gram < newton_schulz_flops(short, long, steps) else "standard"


# ----------------------------------------------------------------------------- NS compute dtype
# ns_dtype="auto". CUDA: bf16 (tensor-core GEMMs; what torch.optim.Muon and every public Muon use).
# CPU: bf16 only where `python -m bench ns-dtype` measured it clearly faster than fp32 on this CPU
# model (CPU_DTYPE_TABLE), fp32 everywhere else: bf16 changes the numerics (about 1e-2 relative error
# against 1e-6 in fp32), so it has to pay for itself, and most CPUs without bf16 instructions
# (AVX512-BF16, AMX) run bf16 GEMMs 5-40x slower than fp32.
#
# Rule on a CPU, for an m×n matrix (batch ignored: both dtypes scale alike with it): the entries of
# this CPU model (`cpu_model()`, exact match) at the nearest measured thread count; among them the
# nearest shape, nearness = the larger |log2 ratio| of the small and large sides; within a factor 2
# (REACH) its winner, else fp32. An entry's winner is bf16 when bf16's median time was below
# BF16_MARGIN × fp32's (interleaved rounds, so both saw the same load).
BF16_MARGIN = 0.9

CPU_DTYPE_SOURCE = "bench/results/ns-dtype-cpu/ns_dtype.csv"


@dataclass(frozen=True)
class DtypeEntry:
    """One measured CPU shape: NS (torch backend, 5 Keller steps) in fp32 and in bf16, median ms."""

    cpu: str
    threads: int
    short: int
    long: int
    winner: str  # "float32" or "bfloat16"
    fp32_ms: float
    bf16_ms: float


# dtype_table_from_csv(CPU_DTYPE_SOURCE); regenerate with `python -m bench ns-dtype --threads 1,2`
# (prints these lines). Provenance (every row of CPU_DTYPE_SOURCE carries it, and its README): the
# project's 2-vCPU "AMD EPYC" (AVX2 + FMA, no AVX512-BF16 or AMX), torch 2.13.0+cpu, commit 5f51a74,
# 2026-12-02, 7 interleaved rounds per shape, other jobs sharing the cores (load average 3.4–8.6).
# fp32 won every shape, by 2.5–43x on one thread, 2.6–15x on two. An earlier two-thread run at a
# load average of ~5 had bf16 ahead at 32²–128² and 128×512 (128²: fp32 445 ms, bf16 126 ms, against
# 1.5 ms for fp32 on one thread): threads waiting on each other, not bf16 arithmetic; not committed.
CPU_DTYPE_TABLE: tuple[DtypeEntry, ...] = (
    DtypeEntry('AMD EPYC', 1, 32, 32, 'float32', 0.483, 1.207),
    DtypeEntry('AMD EPYC', 1, 64, 64, 'float32', 0.507, 5.357),
    DtypeEntry('AMD EPYC', 1, 128, 128, 'float32', 1.5, 26.74),
    DtypeEntry('AMD EPYC', 1, 256, 256, 'float32', 12.09, 426.6),
    DtypeEntry('AMD EPYC', 1, 512, 512, 'float32', 95.19, 4091.0),
    DtypeEntry('AMD EPYC', 1, 32, 128, 'float32', 0.4766, 1.911),
    DtypeEntry('AMD EPYC', 1, 64, 256, 'float32', 0.8963, 9.917),
    DtypeEntry('AMD EPYC', 1, 128, 512, 'float32', 5.404, 182.2),
    DtypeEntry('AMD EPYC', 1, 256, 1024, 'float32', 33.01, 1235.0),
    DtypeEntry('AMD EPYC', 2, 32, 32, 'float32', 2.293, 6.827),
    DtypeEntry('AMD EPYC', 2, 64, 64, 'float32', 10.85, 29.52),
    DtypeEntry('AMD EPYC', 2, 128, 128, 'float32', 20.19, 61.1),
    DtypeEntry('AMD EPYC', 2, 256, 256, 'float32', 466.9, 659.6),
    DtypeEntry('AMD EPYC', 2, 512, 512, 'float32', 252.4, 3787.0),
    DtypeEntry('AMD EPYC', 2, 32, 128, 'float32', 4.102, 10.9),
    DtypeEntry('AMD EPYC', 2, 64, 256, 'float32', 13.56, 34.98),
    DtypeEntry('AMD EPYC', 2, 128, 512, 'float32', 32.71, 284.4),
    DtypeEntry('AMD EPYC', 2, 256, 1024, 'float32', 198.7, 1670.0),
)

def cpu_model() -> str:
    """This machine's CPU model name (/proc/cpuinfo "model name", else platform.processor()); "" if
    neither says. Read once per process (kept in REGISTRY.host)."""
    model = REGISTRY.host.get("cpu_model")
    if model is None:
        model = ""
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        model = REGISTRY.host["cpu_model"] = model or platform.processor() or ""
    return model


def _this_machine() -> tuple[str, int]:
    """(CPU model, torch threads). torch.compile builds the optimizer's plan inside a compiled step
    and can trace neither a file read nor torch.get_num_threads: there it reads what the last eager
    call saw (REGISTRY.host; before any, the CPU model read at import and one thread). Not
    torch.compiler.assume_constant_result, which would import torch._dynamo (and Triton) with muon."""
    if torch.compiler.is_compiling():
        return REGISTRY.host.get("facts", (REGISTRY.host.get("cpu_model", ""), 1))
    facts = REGISTRY.host["facts"] = (cpu_model(), torch.get_num_threads())
    return facts


def choose_ns_dtype(m: int, n: int, device, *, cpu: str | None = None, threads: int | None = None,
                    table: tuple[DtypeEntry, ...] | None = None) -> torch.dtype:
    """The compute dtype of ns_dtype="auto" for an m×n matrix (or a stack of them) on `device`."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    if torch.device(device).type != "cpu":
        return torch.float32
    table = CPU_DTYPE_TABLE if table is None else table
    if cpu is None or threads is None:
        here_cpu, here_threads = _this_machine()
        cpu = here_cpu if cpu is None else cpu
        threads = here_threads if threads is None else threads
    mine = [e for e in table if e.cpu == cpu] if cpu else []
    short, long = min(m, n), max(m, n)
    if not mine or short < 1:
        return torch.float32
    nearest = min(abs(math.log2(e.threads / threads)) for e in mine)
    mine = [e for e in mine if abs(math.log2(e.threads / threads)) == nearest]
    dist = {e: max(abs(math.log2(short / e.short)), abs(math.log2(long / e.long))) for e in mine}
    best = min(dist.values())
    if best > REACH:
        return torch.float32
    winners = {e.winner for e in mine if dist[e] == best}
    return torch.bfloat16 if winners == {"bfloat16"} else torch.float32


def dtype_table_from_rows(rows) -> tuple[DtypeEntry, ...]:
    """Entries from `python -m bench ns-dtype` rows (bench/schema.py columns): per (CPU, threads,
    shape), the fp32 and bf16 medians; bf16 wins below BF16_MARGIN × fp32."""
    import json

    by: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("op") != "newton_schulz" or r.get("status") != "ok" or r.get("metric") != "time":
            continue
        extra = r.get("extra") or {}
        extra = json.loads(extra) if isinstance(extra, str) else extra
        cpu = extra.get("cpu_model")
        if not cpu:
            continue
        _, short, long = _parse_shape(r["shape"])
        by.setdefault((cpu, int(r["threads"]), short, long), {})[r["dtype"]] = float(r["median"])
    table = []
    for (cpu, threads, short, long), ms in by.items():
        if {"float32", "bfloat16"} <= set(ms):
            winner = "bfloat16" if ms["bfloat16"] < BF16_MARGIN * ms["float32"] else "float32"
            table.append(DtypeEntry(cpu, threads, short, long, winner, float(f"{ms['float32']:.4g}"),
                                    float(f"{ms['bfloat16']:.4g}")))
    return tuple(table)


def read_rows(*paths) -> list[dict]:
    """The rows of `python -m bench` CSV files, in order."""
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def dtype_table_from_csv(*paths) -> tuple[DtypeEntry, ...]:
    return dtype_table_from_rows(read_rows(*paths))


# ---------------------------------------------------------------------------------------- backend table

SOURCE = "bench/results/h100-899c9f9/kernels.csv"
REACH = 1.0  # log2: a measurement speaks for shapes within a factor 2 of it in batch, s and l
BASELINE = "muon[torch]"
# provider (as bench/kernel/newton_schulz.py names it) -> (backend, keyword arguments of its run) that auto may pick
AUTO_PROVIDERS = {
    "muon[triton]": ("triton", {"path": "auto"}),
    "muon[triton:small]": ("triton", {"path": "small"}),
    "muon[triton:gemm]": ("triton", {"path": "gemm"}),
    "muon[triton:persistent]": ("triton", {"path": "persistent"}),
}
# providers auto never picks whatever their numbers: the experimental CUDA extension, auto itself
NEVER_AUTO = ("muon[cuda]", "muon[auto]")


@dataclass(frozen=True)
class Entry:
    """One measured shape: the fastest muon provider there and its margin over the torch backend."""

    batch: int
    short: int
    long: int
    dtype: str
    winner: str  # a key of AUTO_PROVIDERS, or BASELINE
    kernel_version: str
    winner_ms: float
    torch_ms: float


# table_from_csv("bench/results/h100-899c9f9/kernels.csv"); regenerate with `python -m muon.backends.dispatch`
BACKEND_TABLE: tuple[Entry, ...] = (
    Entry(1, 1024, 1024, "bfloat16", "muon[torch]", "torch", 0.86, 0.86),
    Entry(1, 2048, 2048, "bfloat16", "muon[torch]", "torch", 0.63, 0.63),
    Entry(1, 4096, 4096, "bfloat16", "muon[triton]", "triton-v1", 3.4, 3.52),
    Entry(1, 8192, 8192, "bfloat16", "muon[triton]", "triton-v1", 25.08, 26.56),
    Entry(1, 2048, 8192, "bfloat16", "muon[triton]", "triton-v1", 1.6, 1.62),
    Entry(1, 4096, 16384, "bfloat16", "muon[triton]", "triton-v1", 9.16, 11.13),
    Entry(12, 768, 768, "bfloat16", "muon[torch]", "torch", 0.63, 0.63),
    Entry(24, 768, 3072, "bfloat16", "muon[triton]", "triton-v1", 2.92, 3.18),
    Entry(4, 1024, 4096, "bfloat16", "muon[torch]", "torch", 1.11, 1.11),
    Entry(16, 2048, 2048, "bfloat16", "muon[torch]", "torch", 8.15, 8.15),
    Entry(64, 128, 128, "bfloat16", "muon[triton]", "triton-v1", 0.042, 0.47),
    Entry(32, 64, 1024, "bfloat16", "muon[triton]", "triton-v1", 0.13, 0.43),
)


@dataclass(frozen=True)
class Choice:
    backend: str  # "torch" or "triton"
    kwargs: dict = field(default_factory=dict)  # extra arguments of the backend's run (e.g. path)
    reason: str = ""


def _parse_shape(text: str) -> tuple[int, int, int]:
    dims = [int(v) for v in text.split("x")]
    b, m, n = dims if len(dims) == 3 else [1, *dims]
    return b, min(m, n), max(m, n)


def table_from_rows(rows) -> tuple[Entry, ...]:
    """Entries from `python -m bench kernels` rows (dicts with op, provider, shape, dtype, ms, status,
    kernel_version): per (shape, dtype), the fastest of the torch backend and the AUTO_PROVIDERS rows.
    Shapes without a torch-backend row are left out (nothing to compare against)."""
    import json

    groups: dict[tuple, dict[str, tuple[float, str]]] = {}
    for r in rows:
        # bench/schema.py rows (metric "time", value in "median", kernel_version in "extra") or the
        # older kernels.csv layout (an "ms" column) of bench/results/h100-899c9f9
        ms = r.get("ms") if "ms" in r else (r.get("median") if r.get("metric") == "time" else None)
        if r.get("op") != "newton_schulz" or r.get("status") != "ok" or not ms:
            continue
        provider = r["provider"]
        if provider != BASELINE and provider not in AUTO_PROVIDERS:
            continue
        extra = r.get("extra") or {}
        extra = json.loads(extra) if isinstance(extra, str) else extra
        version = r.get("kernel_version") or extra.get("kernel_version") or ""
        if version.endswith("-ws"):
            continue  # warp-specialized variant: not what the backend runs by default
        key = (*_parse_shape(r["shape"]), r["dtype"])
        best = groups.setdefault(key, {})
        ms = float(ms)
        if provider not in best or ms < best[provider][0]:
            best[provider] = (ms, version)
    table = []
    for (b, s, l, dtype), by in groups.items():
        if BASELINE not in by:
            continue
        torch_ms = by[BASELINE][0]
        winner = min(by, key=lambda p: (by[p][0], p != BASELINE))  # a tie goes to torch
        table.append(Entry(b, s, l, dtype, winner, by[winner][1] or "torch", by[winner][0], torch_ms))
    return tuple(table)


def table_from_csv(*paths) -> tuple[Entry, ...]:
    return table_from_rows(read_rows(*paths))


def _distance(e: Entry, batch: int, short: int, long: int) -> float:
    return max(abs(math.log2(batch / e.batch)), abs(math.log2(short / e.short)), abs(math.log2(long / e.long)))


def choose_for_shape(batch: int, m: int, n: int, dtype: torch.dtype, device_type: str = "cuda",
                     table: tuple[Entry, ...] | None = None) -> Choice:
    """The auto choice for a (batch, m, n) stack computed in `dtype` on `device_type` (see module doc)."""
    if device_type != "cuda":
        return Choice("torch", {}, f"{device_type}: the kernels run only in an interpreter there")
    table = BACKEND_TABLE if table is None else table
    short, long = min(m, n), max(m, n)
    name = str(dtype).removeprefix("torch.")
    if batch < 1 or short < 1:
        return Choice("torch", {}, "empty")
    same = [e for e in table if e.dtype == name]
    if not same:
        return Choice("torch", {}, f"no measurement in {name}")
    dist = {e: _distance(e, batch, short, long) for e in same}
    best = min(dist.values())
    if best > REACH:
        return Choice("torch", {}, f"unmeasured shape class (nearest measurement {best:.2f} octaves away)")
    winners = {e.winner for e in same if dist[e] == best}
    if len(winners) != 1:
        return Choice("torch", {}, "equidistant measurements disagree")
    (winner,) = winners
    if winner == BASELINE:
        return Choice("torch", {}, "torch measured fastest nearby")
    backend, kwargs = AUTO_PROVIDERS[winner]
    e = next(e for e in same if dist[e] == best)
    return Choice(backend, dict(kwargs), f"{winner} ({e.kernel_version}) {e.winner_ms} ms vs torch {e.torch_ms} ms at "
                  f"{e.batch}x{e.short}x{e.long}")


def choose_backend(X: Tensor, dtype: torch.dtype = torch.bfloat16) -> Choice:
    """The table's choice for a (B, m, n) stack X computed in `dtype` (`choose_for_shape`)."""
    B, m, n = X.shape if X.ndim == 3 else (1, *X.shape[-2:])
    return choose_for_shape(B, m, n, dtype, X.device.type)


# ----------------------------------------------------------------------------- the kernel
# backends with Gram NS (`run_gram`); "auto" runs torch's (muon's Triton Gram kernels are unmeasured)
GRAM_BACKENDS = ("torch", "triton")


def choose_kernel(backend: str, algorithm: str, batch: int, s: int, l: int, dtype: torch.dtype,
                  device_type: str, *, steps: int, restarts=(2,), reasons, table: tuple[Entry, ...] | None = None
                  ) -> KernelChoice:
    """The Newton–Schulz kernel for a (batch, s, l) stack (s <= l) computed in `dtype` on a `device_type`
    device, for a group's `backend` ("auto", "torch", "triton", "cuda") and `algorithm` ("standard",
    "gram", "auto") with `steps` NS steps (and Gram's `restarts`). A pure function of its arguments:

    - `reasons[name]`: why backend `name` cannot run on this device, None when it can (what the
      registry knows of this process: packages, extension, interpreter); read only for the backends
      the answer needs;
    - `table`: the measured backend table (default BACKEND_TABLE).

    algorithm="auto": `choose_algorithm`, then standard where the backend has no Gram NS. A named
    backend runs if it can, else BackendUnavailable with its reason (or, for Gram NS on a backend
    without it, the backends that have it). backend="auto": Gram NS on torch; standard NS on the
    provider `choose_for_shape` names for this shape when it can run here, else torch.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if algorithm == "auto":
        algorithm = choose_algorithm(s, l, device_type, dtype, steps=steps, restarts=restarts)
        if algorithm == "gram" and backend not in ("auto", *GRAM_BACKENDS):
            algorithm = "standard"
    restarts = tuple(restarts) if algorithm == "gram" else ()
    if backend != "auto":
        reason = reasons[backend]
        if reason is not None:
            raise BackendUnavailable(reason)
        if algorithm == "gram" and backend not in GRAM_BACKENDS:
            raise BackendUnavailable(
                f"backend={backend!r} has no Gram Newton–Schulz: use algorithm='standard', or backend='torch' "
                "or 'triton' for algorithm='gram'"
            )
        return KernelChoice(backend, algorithm, restarts=restarts, reason="named by the group")
    if algorithm == "gram":
        return KernelChoice("torch", "gram", restarts=restarts, reason="auto: muon's Gram kernels are unmeasured")
    choice = choose_for_shape(batch, s, l, dtype, device_type, table)
    if choice.backend != "torch":
        reason = reasons[choice.backend]
        if reason is None:
            return KernelChoice(choice.backend, "standard", path=choice.kwargs.get("path", ""), reason=choice.reason)
        return KernelChoice("torch", "standard", reason=f"{choice.reason}, but it cannot run here: {reason}")
    return KernelChoice("torch", "standard", reason=choice.reason)


def batch_matters(backend: str, algorithm: str, device_type: str) -> bool:
    """Whether `choose_kernel`'s answer can change with the batch (only the table's, on CUDA)."""
    return backend == "auto" and algorithm == "standard" and device_type == "cuda"


def main(argv=None) -> None:
    """Print BACKEND_TABLE entries for the given kernels.csv files (to paste above after a GPU run)."""
    paths = (argv if argv is not None else sys.argv[1:]) or [SOURCE]
    for e in table_from_csv(*paths):
        print(f"    {e!r},".replace("Entry(batch=", "Entry(").replace("short=", "").replace("long=", "")
              .replace("dtype=", "").replace("winner=", "").replace("kernel_version=", "")
              .replace("winner_ms=", "").replace("torch_ms=", ""))


if __name__ == "__main__":
    main()
