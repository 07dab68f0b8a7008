"""`python -m bench` end to end on the CPU at tiny sizes: every command runs and writes what it says."""

from __future__ import annotations

import gzip
import importlib
import json
import sys

import pytest
import torch

from bench import common as bench_common
from bench import schema
from bench.cli import COMMANDS, main
from bench.optimizer import profile as bench_profile
from muon.backends import torch_backend
from muon.coefficients import resolve_schedule

QUICK_MODEL = "custom:layers=1,d=32,heads=2,mlp_dim=64,vocab=64,seq=16"


def _widest(text: str) -> int:
    """The widest console line, but for "wrote ... in <folder>" lines (as long as the folder's path)."""
    return max(len(line) for line in text.splitlines() if not line.startswith("wrote"))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MUON_BENCH_QUIET", "1")


def _rows(path):
    return schema.read(path)


def test_registry_keeps_every_command():
    assert {"flops", "kernels", "step", "memory", "profile", "telescope", "efficiency", "ns-dtype",
            "all"} <= set(COMMANDS)


def test_flops_json(capsys):
    assert main(["flops", "--model", "gpt2-124m", "--batch-tokens", "524288", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("muon_flops", "adamw_flops", "training_flops", "overhead", "overhead_bound", "training_flop_model"):
        assert key in report
    assert report["overhead_bound"] == pytest.approx(0.00732, abs=5e-6)
    assert report["overhead"] == (report["muon_flops"] - report["adamw_flops"]) / report["training_flops"]
    assert report["training_flops"] == 6 * report["matmul_params"] * 524288


def test_flops_table_and_plot(capsys, tmp_path):
    assert main(["flops", "--model", "tiny", "--model", "custom:layers=2,d=64,heads=2", "--out", str(tmp_path),
                 "--sweep", "1024,4096,16384"]) == 0
    text = capsys.readouterr().out
    assert "bound" in text and "tiny" in text and "custom" in text
    assert _widest(text) <= bench_common.CONSOLE_WIDTH
    rows = _rows(tmp_path / "flops.json")
    assert len(rows) == 2 * 3  # two models x the sweep
    assert all(r["metric"] == "overhead" and r["median"] == r["extra"]["overhead"] for r in rows)
    assert (tmp_path / "flops_overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_bad_model_names_it():
    with pytest.raises(SystemExit, match="--model nope"):
        main(["flops", "--model", "nope"])


def test_kernels(tmp_path, capsys):
    assert main(["kernels", "--device", "cpu", "--shapes", "16x32,2x40x8", "--preset", "none", "--peers",
                 "torch.optim.Muon,dion", "--rep-ms", "1", "--gemm-size", "32", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "kernels.json")
    for row in rows:
        assert list(row) == list(schema.COLUMNS) and row["command"] == "kernels"
    ours = [r for r in rows if r["provider"] == "muon[torch]"]
    assert [r["shape"] for r in ours] == ["1x16x32", "2x40x8"]
    for r in ours:
        assert r["dtype"] == "float32"  # --dtype auto on a CPU: what ns_dtype="auto" picks (docs/benchmarks.md)
        assert r["extra"]["rel_err_fp64"] < 1e-3
    for r in ours + [r for r in rows if r["provider"] == "torch.optim.Muon"]:
        assert r["status"] == "ok" and r["median"] > 0 and r["extra"]["tflops"] > 0 and r["rounds"] == 10
        assert r["low"] <= r["q1"] <= r["median"] <= r["q3"] <= r["high"]
        assert r["extra"]["rel_err_fp64"] < 0.05  # bf16 NS (torch.optim.Muon's) against float64 (measured ~0.01)
    assert {r["dtype"] for r in rows if r["provider"] == "torch.optim.Muon"} == {"bfloat16"}  # its only dtype
    assert all(len(r["extra"]["vs_torch_optim_muon"]) == 3 for r in ours)  # per-round ratio: median, min, max
    assert all(r["status"].startswith("skipped") for r in rows if r["provider"] == "dion")
    assert {r["shape"] for r in rows if r["op"] == "gemm"} == {"32x32x32", "1x16x32", "2x40x8"}
    assert (tmp_path / "kernels.png").exists() and (tmp_path / "kernels.csv").exists()
    out = capsys.readouterr().out
    assert _widest(out) <= bench_common.CONSOLE_WIDTH
    assert sum(line.startswith("skipped") for line in out.splitlines()) == 1  # one line for every skip


def test_kernels_bad_shape():
    with pytest.raises(SystemExit, match="shape '3x'"):
        main(["kernels", "--device", "cpu", "--shapes", "3x", "--preset", "none", "--out", "/nonexistent"])


def test_step(tmp_path, capsys):
    assert main(["step", "--device", "cpu", "--model", QUICK_MODEL, "--model", "custom:layers=1,d=16,heads=2,vocab=32",
                 "--rep-ms", "1", "--rounds", "5", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "step.json")
    for row in rows:
        assert list(row) == list(schema.COLUMNS)  # the one schema, in order
        assert row["device"].startswith("cpu") and row["torch"] == torch.__version__ and row["commit"]
        assert row["threads"] == 1  # a CPU timing command runs on one thread unless told otherwise
    assert (tmp_path / "step.csv").read_text().splitlines()[0] == ",".join(schema.COLUMNS)
    for model in (QUICK_MODEL, "custom:layers=1,d=16,heads=2,vocab=32"):
        steps = {r["extra"]["optimizer"]: r for r in rows if r["shape"] == model and r["op"] == "optimizer_step"
                 and r["status"] == "ok"}
        parts = {r["provider"]: r for r in rows if r["shape"] == model and r["op"] == "newton_schulz_in_step"}
        assert {"muon.Muon", "torch.optim.Muon+AdamW(fused)", "torch.optim.AdamW(fused)"} <= set(steps)
        for r in steps.values():
            assert r["median"] > 0 and r["rounds"] == 5 and r["extra"]["host_ms"] > 0
            assert r["extra"]["ops_per_step"] > 0
            assert r["extra"]["peak_bytes"] is None  # no allocator statistics on a CPU: unmeasured, not zero
        assert steps["muon.Muon"]["extra"]["backend"] == "torch" and steps["muon.Muon"]["dtype"] == "float32"
        assert steps["torch.optim.Muon+AdamW(fused)"]["dtype"] == "bfloat16"
        # the NS part of every optimizer that has one, never longer than its step
        assert set(parts) == {r["provider"] for r in steps.values()} - {"torch.optim.AdamW(fused)"}
        for provider, part in parts.items():
            whole = next(r for r in steps.values() if r["provider"] == provider)
            assert part["part_of"] == "optimizer_step" and 0 < part["median"] <= whole["median"]
            assert part["low"] <= whole["low"] and part["high"] <= whole["high"]
        up = steps["muon.Muon"]["extra"]["speedup_vs_torch_optim_muon"]
        assert up[1] <= up[0] <= up[2]
        # Muon keeps one buffer per matrix, AdamW two per parameter.
        assert steps["muon.Muon"]["extra"]["state_bytes"] < steps["torch.optim.AdamW(fused)"]["extra"]["state_bytes"]
        # fused AdamW is one multi-tensor op (a few dispatches); a Muon step is many
        assert steps["torch.optim.AdamW(fused)"]["extra"]["ops_per_step"] < steps["muon.Muon"]["extra"]["ops_per_step"]
    assert (tmp_path / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    skips = [line for line in out.splitlines() if line.startswith("skipped")]
    assert len(skips) == 1 and "triton" in skips[0]  # the triton/cuda backends, in one line
    assert _widest(out) <= bench_common.CONSOLE_WIDTH


def _hide(monkeypatch, *names):
    """Make `import name` fail as if the package were not installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_bench_without_tqdm_or_matplotlib(tmp_path, capsys, monkeypatch):
    # what `pip install .` leaves out: the bench and triton extras
    _hide(monkeypatch, "tqdm", "tqdm.auto", "matplotlib", "matplotlib.pyplot", "triton")
    monkeypatch.delenv("MUON_BENCH_QUIET")
    monkeypatch.setitem(bench_common._PLOT_NOTE, "said", False)
    assert main(["flops", "--model", "tiny", "--out", str(tmp_path), "--sweep", "1024,4096"]) == 0
    assert main(["flops", "--model", "gpt2-124m", "--batch-tokens", "524288", "--json"]) == 0
    assert main(["kernels", "--device", "cpu", "--shapes", "8x16", "--preset", "none", "--peers", "", "--rep-ms", "1",
                 "--gemm-size", "16", "--out", str(tmp_path)]) == 0
    assert main(["step", "--device", "cpu", "--model", QUICK_MODEL, "--rep-ms", "1", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("plots skipped: matplotlib is not installed (pip install 'fused-muon[bench]')") == 1
    assert "Traceback" not in captured.out + captured.err
    assert not list(tmp_path.glob("*.png"))
    assert (tmp_path / "flops.csv").exists() and (tmp_path / "kernels.json").exists() and _rows(tmp_path / "step.json")
    assert "flops: 1/1 model" in captured.err  # progress as plain lines instead of a bar


def test_progress_lines_are_few(capsys, monkeypatch):
    monkeypatch.delenv("MUON_BENCH_QUIET")
    assert list(bench_common.progress(range(1000), desc="work", unit="item")) == list(range(1000))
    with bench_common.progress(total=7, desc="runs", unit="run") as bar:
        for i in range(7):
            bar.set_postfix(lr=i)
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()  # capsys's stderr is not a terminal: plain lines
    work = [line for line in lines if line.startswith("work:")]
    assert work[0].startswith("work: 0/1000 item") and work[-1].startswith("work: 1000/1000 item")
    assert len(work) == 5  # start, each quarter, end
    runs = [line for line in lines if line.startswith("runs:")]
    assert runs[-1].startswith("runs: 7/7 run") and runs[-1].endswith("(lr=6)") and len(runs) <= 5


def test_progress_is_silent_when_quiet(capsys):
    for _ in bench_common.progress(range(3), desc="quiet"):
        pass
    assert capsys.readouterr().err == ""


def test_kernels_without_triton_says_how_to_install(monkeypatch):
    _hide(monkeypatch, "triton")
    monkeypatch.delitem(sys.modules, "muon.kernels", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fused-muon\[triton\]'") as info:
        importlib.import_module("muon.kernels")
    assert info.value.name == "triton"  # handlers that test exc.name keep working


def test_profile_trace_has_stage_ranges(tmp_path, capsys):
    assert main(["profile", "--device", "cpu", "--model", QUICK_MODEL, "--steps", "1", "--out", str(tmp_path)]) == 0
    (trace,) = tmp_path.glob("profile_*.json.gz")
    names = {e.get("name") for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]}
    assert {"muon.step0", "ns.normalize", "ns.step0.gram", "ns.step4.update"} <= names
    assert any(n and n.startswith("ns[torch] ") for n in names)


def test_profile_kernel_mode(capsys):
    assert main(["profile", "--device", "cpu", "--kernel", "--shape", "2x8x24", "--iters", "2"]) == 0
    assert "2 time(s)" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_staged_ns_is_the_torch_backend(dtype):
    schedule = resolve_schedule("polar_express", None, 1e-7)
    X = torch.randn(2, 8, 24)
    assert torch.equal(bench_profile.staged_newton_schulz(X, schedule, dtype),
                       torch_backend.newton_schulz_torch(X, schedule, dtype))


def test_all_quick(tmp_path, capsys):
    assert main(["all", "--quick", "--only", "flops,kernels,step,profile", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# muon benchmarks on cpu")
    # the headline comes first, read from this run's kernels.json and step.json
    assert summary.index("## Headline") < summary.index("## Stages")
    assert "| given | 1x32x64, 2x48x16 |" in summary  # NS speed-up row of the --shapes class
    step_row = next(line for line in summary.splitlines() if line.startswith(f"| {QUICK_MODEL} |"))
    assert "(torch)" in step_row and step_row.count("×") == 2 and " %" in step_row
    assert "Spread" in summary  # the spread line: which timed rows are noisy, or that none is
    for stage in ("flops", "kernels", "step", "profile"):
        assert f"| {stage} |" in summary
    assert "failed" not in summary
    assert (tmp_path / "flops.csv").exists() and list(tmp_path.glob("profile_*.json.gz"))
    assert (tmp_path / "step.png").exists()


def test_summary_ignores_files_of_stages_not_run(tmp_path, capsys):
    (tmp_path / "step.json").write_text('[{"model": "stale", "optimizer": "muon.Muon", "median_ms": 1.0}]')
    assert main(["all", "--quick", "--only", "flops", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "stale" not in summary and "No step rows" in summary


def test_kernels_times_the_aol_and_fp16_variants(tmp_path):
    """Issue 21's NS variants are providers of their own: AOL at one step fewer, fp16 compute."""
    assert main(["kernels", "--device", "cpu", "--shapes", "16x48", "--preset", "none", "--peers", "",
                 "--backends", "torch,torch:aol,torch:fp16", "--rep-ms", "1", "--gemm-size", "32", "--no-plot",
                 "--out", str(tmp_path)]) == 0
    rows = {r["provider"]: r for r in _rows(tmp_path / "kernels.json") if r["op"] == "newton_schulz"}
    base, aol, fp16 = rows["muon[torch]"], rows["muon[torch:aol]"], rows["muon[torch:fp16]"]
    assert all(r["status"] == "ok" and r["median"] > 0 for r in (base, aol, fp16))
    aol_x, fp16_x = aol["extra"], fp16["extra"]
    assert (aol_x["ns_steps"], aol_x["precondition"], aol["dtype"]) == (4, "aol", "float32")  # --dtype auto, CPU
    assert (fp16_x["ns_steps"], fp16_x["precondition"], fp16["dtype"]) == (5, "frobenius", "float16")
    assert aol_x["actual_tflops"] == pytest.approx(aol_x["tflops"] * 0.8)  # 4 of 5 steps' FLOPs done
    assert aol_x["rel_err_fp64"] < 0.05 and fp16_x["rel_err_fp64"] < 0.01  # fp16: 3 more mantissa bits than bf16
    # the dispatch table reads only the providers auto may pick
    from muon.backends.dispatch import table_from_csv

    assert {e.winner for e in table_from_csv(tmp_path / "kernels.csv")} <= {"muon[torch]"}


def test_efficiency_ns_options():
    from bench.experiments.efficiency import ns_options
    from muon.coefficients import resolve_schedule

    kwargs, given = ns_options("coefficients=you,steps=4,precondition=aol,dtype=bf16,algorithm=gram")
    assert given == {"coefficients": "you", "steps": "4", "precondition": "aol", "dtype": "bf16", "algorithm": "gram"}
    assert kwargs["ns_steps"] == 4 and kwargs["ns_dtype"] is torch.bfloat16 and kwargs["ns_algorithm"] == "gram"
    schedule = resolve_schedule(kwargs["ns_coefficients"], 4, 1e-7)
    assert schedule.precondition == "aol" and schedule.coefficients == resolve_schedule("you", 5, 1e-7).coefficients[1:]
    assert ns_options("") == ({}, {})
    assert ns_options("precondition=aol")[0]["ns_coefficients"].steps == ((3.4445, -4.775, 2.0315),)
    for bad in ("colour=red", "steps", "precondition=spectral"):
        with pytest.raises(SystemExit, match="--ns"):
            ns_options(bad)
