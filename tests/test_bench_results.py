"""The bench's one result schema (bench/schema.py) and its timing (bench/timing.py): interleaved rounds,
medians and spreads, and parts that can never be reported longer than their whole."""

from __future__ import annotations

import csv
import time

import pytest
import torch

from bench import common, schema, timing
from bench.cli import main

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MUON_BENCH_QUIET", "1")


def test_stats_median_quartiles_spread_and_flag():
    s = timing.Stats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.low, s.high, s.rounds) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert s.spread == pytest.approx(2 / 3) and s.flag == "noisy"
    steady = timing.Stats.of([10.0, 10.1, 9.9, 10.0, 10.05])
    assert steady.spread < timing.NOISY and steady.flag == ""
    assert timing.Stats.of([7.0]).flag == "" and timing.Stats.of([7.0]).spread == 0
    with pytest.raises(ValueError):
        timing.Stats.of([])
    r = timing.ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])  # per round: 2, 2, 3
    assert (r.median, r.low, r.high) == (2.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="same rounds"):
        timing.ratio([1.0], [1.0, 2.0])


def test_rounds_interleave_every_provider_in_a_rotated_order():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    samples = timing.interleaved(calls, CPU, rounds=4, budget_ms=0.0, warmup=1)
    assert all(len(s.whole) == 4 and s.number == 1 for s in samples.values())
    timed = order[6:]  # one warm-up and one calibration call each come first
    assert timed == list("abc" "bca" "cab" "abc")  # each once per round, the start rotating


def _spin(ms: float) -> None:
    """Busy for `ms` of this process's CPU time (the wall time is at least that)."""
    t0 = time.process_time()
    while (time.process_time() - t0) * 1e3 < ms:
        pass


@pytest.fixture(params=[1, 2], ids=["1 thread: process CPU time", "2 threads: wall clock"])
def threads(request):
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def test_a_part_timed_inside_its_whole_never_exceeds_it(threads):
    clock = timing.PartClock(CPU)
    inner = clock.wrap(lambda: _spin(2.0))
    outer = clock.wrap(inner)  # nested wrapped calls count once

    def whole():
        _spin(1.0)
        outer()

    samples = timing.interleaved({"w": whole, "other": lambda: _spin(1.0)}, CPU, rounds=5, budget_ms=5,
                                 parts={"w": clock})
    w = samples["w"]
    assert len(w.part) == 5 and not samples["other"].part
    for part, total in zip(w.part, w.whole, strict=True):
        assert 2.0 <= part <= total  # the 2 ms spin, inside its sample, counted once
    stats, part_stats = w.stats, w.part_stats
    assert part_stats.median <= stats.median and part_stats.high <= stats.high
    assert stats.clock == part_stats.clock == ("process CPU time" if threads == 1 else "wall clock")
    if threads == 1:  # the same samples' wall time beside the CPU time: never less
        assert stats.wall is not None and stats.wall[1] >= stats.low * 0.999
    else:
        assert stats.wall is None


def _rows_with(part_ms: float, whole_ms: float) -> schema.Results:
    res = schema.Results(CPU, "step")
    res.add("optimizer_step", "opt", "model", "float32", stats=timing.Stats.of([whole_ms, whole_ms * 1.1]))
    res.add("newton_schulz_in_step", "opt", "model", "float32", stats=timing.Stats.of([part_ms, part_ms]),
            part_of="optimizer_step")
    return res


def test_a_part_longer_than_its_whole_is_refused(tmp_path):
    _rows_with(3.0, 5.0).write(tmp_path, "ok")  # part <= whole: written
    with pytest.raises(schema.PartExceedsWhole, match="median"):
        _rows_with(6.0, 5.0).write(tmp_path, "bad")
    assert not (tmp_path / "bad.csv").exists()
    orphan = schema.Results(CPU, "step")
    orphan.add("newton_schulz_in_step", "opt", "model", "float32", value=1.0, part_of="optimizer_step")
    with pytest.raises(schema.PartExceedsWhole, match="no row"):
        schema.check_parts(orphan.rows)


def test_one_schema_round_trips_through_csv_and_json(tmp_path):
    res = schema.Results(CPU, "kernels")
    res.add("newton_schulz", "muon[torch]", "1x8x16", "float32", stats=timing.Stats.of([1.0, 2.0, 3.0]),
            kind="given", kernel_version="torch", vs_torch_optim_muon=[2.0, 1.5, 2.5])
    res.add("newton_schulz", "muon[cuda]", "1x8x16", "float32", status="skipped: no GPU")
    res.add("flops", "muon.flops", "tiny", "n/a", metric="overhead", unit="fraction", value=0.25)
    res.write(tmp_path, "k")
    with (tmp_path / "k.csv").open() as f:
        assert tuple(csv.DictReader(f).fieldnames) == schema.COLUMNS
    for path in (tmp_path / "k.csv", tmp_path / "k.json"):
        rows = schema.read(path)
        assert [list(r) for r in rows] == [list(schema.COLUMNS)] * 3
        timed, skipped, value = rows
        assert (timed["median"], timed["q1"], timed["high"], timed["rounds"]) == (2.0, 1.5, 3.0, 3)
        assert timed["extra"] == {"kind": "given", "kernel_version": "torch", "vs_torch_optim_muon": [2.0, 1.5, 2.5]}
        assert skipped["median"] is None and skipped["status"] == "skipped: no GPU"
        assert value["median"] == 0.25 and value["rounds"] is None and value["flag"] == ""
        assert {r["device"] for r in rows} == {common.device_name(CPU)} and timed["threads"] == torch.get_num_threads()
    assert schema.read(tmp_path / "missing.json") == []


@pytest.mark.parametrize("argv", [
    ["flops", "--model", "tiny", "--sweep", "1024"],
    ["kernels", "--device", "cpu", "--shapes", "8x16", "--preset", "none", "--peers", "", "--rep-ms", "1",
     "--gemm-size", "16", "--no-plot"],
    ["step", "--device", "cpu", "--model", "custom:layers=1,d=16,heads=2,vocab=32", "--rep-ms", "1", "--rounds", "3",
     "--no-plot"],
    ["ns-dtype", "--shapes", "8x16", "--rounds", "3", "--rep-ms", "1"],
], ids=lambda a: a[0])
def test_every_command_writes_the_one_schema(argv, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.csv")
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == schema.COLUMNS
        rows = list(reader)
    assert rows and {r["command"] for r in rows} == {argv[0]}
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines() if not line.startswith("wrote")) <= common.CONSOLE_WIDTH


def test_skip_line_is_one_line_within_the_console_width():
    rows = [{"provider": f"muon[triton:variant{i}]", "status": "skipped: needs a GPU " * 5} for i in range(12)]
    rows.append({"provider": "muon[torch]", "status": "ok"})
    line = common.skip_line(rows, "kernels.csv")
    assert "\n" not in line and len(line) <= common.CONSOLE_WIDTH
    assert line.startswith("skipped 12 provider(s): muon[triton:variant0]") and "more" in line
    assert common.skip_line([{"provider": "a", "status": "ok"}], "x.csv") == ""
