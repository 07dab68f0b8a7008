"""`python -m bench` end to end on the CPU at tiny sizes: every command runs and writes what it says."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from bench import profile as bench_profile
from bench.cli import COMMANDS, main
from muon.backends import torch_ref
from muon.coefficients import resolve_schedule

QUICK_MODEL = "custom:layers=1,d=32,heads=2,mlp_dim=64,vocab=64,seq=16"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MUON_BENCH_QUIET", "1")


def _rows(path):
    return json.loads(path.read_text())


def test_registry_keeps_every_command():
    assert {"flops", "kernels", "step", "profile", "telescope", "efficiency", "all"} <= set(COMMANDS)


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
    assert "overhead_bound" in text and "tiny" in text and "custom" in text
    rows = _rows(tmp_path / "flops.json")
    assert len(rows) == 2 * 3  # two models x the sweep
    assert (tmp_path / "flops_overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_bad_model_names_it():
    with pytest.raises(SystemExit, match="--model nope"):
        main(["flops", "--model", "nope"])


def test_kernels(tmp_path, capsys):
    assert main(["kernels", "--device", "cpu", "--shapes", "16x32,2x40x8", "--preset", "none", "--peers",
                 "torch.optim.Muon,dion", "--rep-ms", "1", "--gemm-size", "32", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "kernels.json")
    for row in rows:
        assert {"op", "provider", "shape", "dtype", "device", "torch_version", "commit"} <= set(row)
    ours = [r for r in rows if r["provider"] == "muon[torch]"]
    assert [r["shape"] for r in ours] == ["1x16x32", "2x40x8"]
    for r in ours + [r for r in rows if r["provider"] == "torch.optim.Muon"]:
        assert r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0
        assert r["rel_err_fp64"] < 0.05  # bf16 NS against the float64 reference (measured ~0.01)
    assert all(r["status"].startswith("skipped") for r in rows if r["provider"] == "dion")
    assert {r["shape"] for r in rows if r["op"] == "gemm"} == {"32x32x32", "1x16x32", "2x40x8"}
    assert (tmp_path / "kernels.png").exists() and (tmp_path / "kernels.csv").exists()


def test_kernels_bad_shape():
    with pytest.raises(SystemExit, match="shape '3x'"):
        main(["kernels", "--device", "cpu", "--shapes", "3x", "--preset", "none", "--out", "/nonexistent"])


def test_step(tmp_path, capsys):
    assert main(["step", "--device", "cpu", "--model", QUICK_MODEL, "--batch", "1", "--rep-ms", "1",
                 "--out", str(tmp_path)]) == 0
    all_rows = _rows(tmp_path / "step.json")
    (fwd_bwd,) = [r for r in all_rows if r["op"] == "forward_backward"]
    assert fwd_bwd["ms"] > 0 and fwd_bwd["batch_tokens"] == 15
    rows = {r["provider"]: r for r in all_rows if r["op"] == "optimizer_step"}
    for provider in ("muon.Muon[torch,batched]", "muon.Muon[torch]", "torch.optim.AdamW[foreach]",
                     "torch.optim.Muon+AdamW[foreach]"):
        row = rows[provider]
        assert row["status"] == "ok" and row["ms"] > 0 and "overhead_vs_adamw" in row
    # Muon keeps one buffer per matrix, AdamW two per parameter.
    assert rows["muon.Muon[torch,batched]"]["state_bytes"] < rows["torch.optim.AdamW[foreach]"]["state_bytes"]


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
                       torch_ref.newton_schulz_torch(X, schedule, dtype))


def test_all_quick(tmp_path, capsys):
    assert main(["all", "--quick", "--only", "flops,profile", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| flops |" in summary and "| profile |" in summary and "failed" not in summary
    assert (tmp_path / "flops.csv").exists() and list(tmp_path.glob("profile_*.json.gz"))
