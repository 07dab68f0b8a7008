"""Timing that holds up on a shared machine: interleaved rounds, medians, spreads, parts inside wholes.

`interleaved(calls, device, rounds=R)` runs R rounds; in each, every provider runs once (`number`
calls, calibrated so one sample lasts about budget_ms / R), in an order rotated by one each round, so
load from other jobs lands on every provider alike instead of on whichever ran during it. Each
provider gets R samples (ms per call); `Stats` reports their median, quartiles, min and max, and
flags a sample set whose IQR is more than NOISY of its median.

Parts: a `PartClock` wraps the functions a call spends part of its time in (the NS of an optimizer
step); during each sample it adds up the time spent inside them, so every part sample lies within
its own whole sample and the part's median, min and max can never exceed the whole's.

Clocks (each row names its own, `Stats.clock`). CPU with one torch thread: the process's CPU time
(time.process_time): the time the sample ran on its core, without the time other jobs held the core,
which on a shared machine moves a wall-clock median by 2x between runs (a `tiny` muon step: IQR 109 %
of the median in wall time, 15 % in CPU time, same samples); the same samples' wall time is kept
(`Stats.wall`). CPU with more threads: wall time (time.perf_counter; CPU time would add the threads
up). gc is off during a sample, as timeit does. CUDA: events on the current stream around the sample
and around each part call, read after one synchronize; with `kernel=True`, triton.testing.do_bench
per round instead (warm-up, L2 flush, median of its own reps; `graph=True`: CUDA-graph replay, for
kernels so short that launches dominate).

Why not torch.utils.benchmark or do_bench alone: both time one statement at a time, in one block,
so a burst of load from another job lands on one provider only; Timer.timeit also runs at least two
untimed warm-up calls per measurement, which triples the cost of a 100 ms step.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

NOISY = 0.10  # IQR / median above this: the row is flagged "noisy"
MAX_NUMBER = 1000  # calls per sample at most (tiny functions)


@dataclass(frozen=True)
class Stats:
    """Summary of one provider's per-round samples (ms, or any unit); `clock` names what timed them,
    `wall` is (median, min, max) of the same samples' wall time where the clock was another."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    rounds: int
    clock: str = ""
    wall: tuple[float, float, float] | None = None

    @property
    def spread(self) -> float:
        """IQR / median: the relative spread of the middle half of the rounds."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else math.inf

    @property
    def flag(self) -> str:
        return "noisy" if self.rounds > 1 and self.spread > NOISY else ""

    @classmethod
    def of(cls, samples: list[float], clock: str = "", wall: list[float] | None = None) -> Stats:
        if not samples:
            raise ValueError("no samples")
        xs = sorted(samples)
        if len(xs) == 1:
            q1 = q3 = xs[0]
        else:
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        walls = (statistics.median(wall), min(wall), max(wall)) if wall else None
        return cls(statistics.median(xs), q1, q3, xs[0], xs[-1], len(xs), clock, walls)

    def text(self, digits: int = 3) -> str:
        """'12.3 ms (11.9–13.0, 15 rounds)': median, then min–max."""
        return f"{self.median:.{digits}g} ({self.low:.{digits}g}–{self.high:.{digits}g}, {self.rounds} rounds)"


def ratio(num: list[float], den: list[float]) -> Stats:
    """Per-round ratios num[i] / den[i] of two providers timed in the same interleaved rounds."""
    if len(num) != len(den):
        raise ValueError(f"{len(num)} and {len(den)} samples: not the same rounds")
    return Stats.of([a / b for a, b in zip(num, den, strict=True) if b > 0])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROCESS_CPU, WALL = "process CPU time", "wall clock"


def cpu_timer() -> tuple[str, Callable[[], float]]:
    """(name, seconds function) of the CPU clock: process CPU time with one torch thread, else wall."""
    if torch.get_num_threads() == 1:
        return PROCESS_CPU, time.process_time
    return WALL, time.perf_counter


class PartClock:
    """Adds up the time spent inside the wrapped functions, per sample of `interleaved` (with the
    clock of the samples it is part of; `interleaved` sets it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timer = cpu_timer()[1]
        self.ms = 0.0
        self._events: list = []
        self._depth = 0  # only the outermost wrapped call counts (one wrapped function calling another)

    def reset(self) -> None:
        self.ms, self._events = 0.0, []

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            try:
                return self._timed(fn, args, kwargs)
            finally:
                self._depth -= 1

        return timed

    def _timed(self, fn: Callable, args, kwargs):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self._events.append((start, end))
            return out
        t0 = self.timer()
        out = fn(*args, **kwargs)
        self.ms += (self.timer() - t0) * 1e3
        return out

    def total_ms(self) -> float:
        """The sample's part time (after the device is synchronized)."""
        return self.ms + sum(s.elapsed_time(e) for s, e in self._events)


@dataclass
class Samples:
    """One provider's samples, ms per call, one per round; `part` when it has a PartClock; `wall`
    the same samples in wall time where `clock` is another."""

    whole: list[float] = field(default_factory=list)
    part: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    number: int = 1
    clock: str = ""

    @property
    def stats(self) -> Stats:
        return Stats.of(self.whole, self.clock, self.wall if self.clock != WALL else None)

    @property
    def part_stats(self) -> Stats | None:
        return Stats.of(self.part, self.clock) if self.part else None


def _sample_cpu(fn: Callable, number: int, timer: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """(ms per call on `timer`, ms per call of wall time) of `number` calls."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        w0, t0 = time.perf_counter(), timer()
        for _ in range(number):
            fn()
        t1, w1 = timer(), time.perf_counter()
        return (t1 - t0) * 1e3 / number, (w1 - w0) * 1e3 / number
    finally:
        if enabled:
            gc.enable()


def _sample_cuda_events(fn: Callable, number: int, device: torch.device) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(number):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / number


def _sample_do_bench(fn: Callable, rep_ms: float, graph: bool) -> float:
    import triton.testing

    if graph:
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
        except Exception:  # not graph-capturable: time eager launches instead
            pass
    return float(triton.testing.do_bench(fn, warmup=max(1, int(rep_ms // 4)), rep=rep_ms, return_mode="median"))


def interleaved(calls: dict[str, Callable[[], object]], device: torch.device, *, rounds: int = 15,
                budget_ms: float = 300.0, parts: dict[str, PartClock] | None = None, kernel: bool = False,
                graph: bool = False, warmup: int = 1) -> dict[str, Samples]:
    """Time every call in `rounds` interleaved rounds (see the module doc); budget_ms is each
    provider's time over all rounds, about. Returns name -> Samples (ms per call)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    parts = parts or {}
    names = list(calls)
    if device.type == "cuda":
        clock = ("do_bench_cudagraph" if graph else "do_bench") if kernel else "cuda events"
    else:
        clock, timer = cpu_timer()
        for part in parts.values():
            part.timer = timer
    out = {name: Samples(clock=clock) for name in names}
    per_sample = budget_ms / rounds
    for name in names:  # warm-up (first-call allocation, compilation), then one timed call to calibrate
        for _ in range(warmup):
            calls[name]()
        synchronize(device)
        if device.type == "cuda" and kernel:
            continue
        if device.type == "cuda":
            first = _sample_cuda_events(calls[name], 1, device)
        else:
            first = _sample_cpu(calls[name], 1, timer)[1]  # wall: what a sample costs in the budget
        clock = parts.get(name)
        if clock is not None:
            clock.reset()
        out[name].number = int(min(MAX_NUMBER, max(1, round(per_sample / max(first, 1e-4)))))
    gc.collect()
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, number, clock = calls[name], out[name].number, parts.get(name)
            if clock is not None:
                clock.reset()
            if device.type != "cuda":
                ms, wall = _sample_cpu(fn, number, timer)
                out[name].whole.append(ms)
                out[name].wall.append(wall)
            elif kernel:
                out[name].whole.append(_sample_do_bench(fn, per_sample, graph))
            else:
                out[name].whole.append(_sample_cuda_events(fn, number, device))
            if clock is not None:
                # ms per call, like the whole: intervals inside the sample's own interval (not clipped:
                # schema.check_parts refuses a part above its whole, which would be a bug here)
                out[name].part.append(clock.total_ms() / number)
    return out
