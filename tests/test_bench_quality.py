"""`python -m bench quality` (bench/experiments/quality.py): the CSV's fixed columns, the metrics against hand
computations, the half-precision GEMM emulation against torch's own, and the done-when check."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from bench.cli import main
from bench.experiments import quality
from muon.coefficients import resolve_schedule
from muon.newton_schulz import orthogonalize


def test_quick_run_writes_the_fixed_columns_and_a_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("MUON_BENCH_QUIET", "1")
    args = ["quality", "--quick", "--spectra", "gaussian:16x16,gaussian:16x64,low_rank:24x40",
            "--out", str(tmp_path)]
    assert main(args) == 0
    with (tmp_path / "quality.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == quality.COLUMNS
    spectra = {r["spectrum"] for r in rows}
    assert spectra == {"gaussian:16x16", "gaussian:16x64", "low_rank:24x40"}
    # every spectrum has the reference row; Gram NS only on the rectangular ones
    for s in spectra:
        key = ("standard", "keller", "5", "frobenius", "bf16")
        ref = [r for r in rows if r["spectrum"] == s
               and (r["algorithm"], r["preset"], r["steps"], r["precondition"], r["dtype"]) == key]
        assert len(ref) == 1 and float(ref[0]["flops_vs_keller5"]) == 1.0
    assert not any(r["algorithm"] == "gram" for r in rows if r["spectrum"] == "gaussian:16x16")
    assert any(r["algorithm"] == "gram" and r["precondition"] == "aol" for r in rows if r["shape"] == "16x64")
    for r in rows:
        assert 0 < float(r["rel_err"]) < 1 and 0 < float(r["sigma_min"]) <= float(r["sigma_max"]) < 1.5
    meta = json.loads((tmp_path / "quality.json").read_text())
    assert {"commit", "torch_version", "device", "half_gemms"} <= set(meta["provenance"])
    assert (tmp_path / "quality.png").stat().st_size > 10_000


def test_metrics_against_a_hand_computation():
    """rel_err against U·Vᵀ, sigma over the kept directions, FLOPs from the model."""
    from muon import flops

    G = quality.synthetic("low_rank", 24, 40, seed=1)
    sp = quality._spectrum("low_rank:24x40", G)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    k = int((S >= 1e-3 * S[0]).sum())
    assert sp.U_k.shape == (24, k)
    row = quality.measure(sp, quality.Config("gram", "you", 4, "aol", "fp32"), native=False)
    O = orthogonalize(G.float(), resolve_schedule("you", 4, 1e-7, precondition="aol"), dtype=torch.float32,
                      backend="torch", algorithm="gram").double()
    assert row["rel_err"] == pytest.approx(((O - U @ Vh).norm() / (U @ Vh).norm()).item(), rel=1e-9)
    s = torch.linalg.svdvals(U[:, :k].mT @ O @ Vh[:k].mT)
    assert row["sigma_min"] == pytest.approx(s.min().item(), rel=1e-4)
    assert row["sigma_max"] == pytest.approx(s.max().item(), rel=1e-4)
    assert row["flops"] == flops.newton_schulz_flops(24, 40, 4, algorithm="gram", precondition="aol")
    assert row["flops_vs_keller5"] == row["flops"] / flops.newton_schulz_flops(24, 40, 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_half_gemms_match_torchs_own(dtype):
    """The emulation (fp32 accumulation, one rounding) and torch's CPU half GEMMs differ only in
    summation order: the same error against the polar factor to a few parts in a thousand."""
    sp = quality._spectrum("g", quality.synthetic("gaussian", 48, 160, seed=2))
    schedule = resolve_schedule("polar_express", 4, 1e-7, precondition="aol")
    native = orthogonalize(sp.G.float(), schedule, dtype=dtype, backend="torch").double()
    with quality.emulated_half_matmuls():
        emulated = orthogonalize(sp.G.float(), schedule, dtype=dtype, backend="torch")
    assert emulated.dtype == dtype
    err = lambda O: ((O.double() - sp.polar).norm() / sp.polar.norm()).item()  # noqa: E731
    assert err(emulated) == pytest.approx(err(native), rel=0.02)
    assert ((emulated.double() - native).norm() / native.norm()).item() < 8 * torch.finfo(dtype).eps
    # fp32 GEMMs are untouched
    with quality.emulated_half_matmuls():
        fp32 = orthogonalize(sp.G.float(), schedule, dtype=torch.float32, backend="torch")
    assert torch.equal(fp32, orthogonalize(sp.G.float(), schedule, dtype=torch.float32, backend="torch"))


def test_aol_target_shift():
    """Equal row weights (a scaled orthogonal matrix): AOL's D is a multiple of I, no shift; rows of
    very different norms: polar(D·G) is another matrix."""
    Q = torch.linalg.qr(torch.randn(40, 12, dtype=torch.float64))[0].mT * 3.0  # 12×40, orthonormal rows
    assert quality._spectrum("q", Q).aol_shift < 1e-12
    G = torch.randn(12, 40, dtype=torch.float64) * torch.logspace(0, 1, 12, dtype=torch.float64)[:, None]
    G += 0.5 * torch.randn(12, 1, dtype=torch.float64) * torch.randn(1, 40, dtype=torch.float64)
    assert quality._spectrum("g", G).aol_shift > 0.01
    assert quality._spectrum("gt", G.mT.contiguous()).aol_shift == pytest.approx(quality._spectrum("g", G).aol_shift)


def test_frontier_check_picks_the_cheapest_no_worse_bf16_config():
    def row(algorithm, preset, steps, precondition, dtype, err, lo, hi, ratio):
        return dict(algorithm=algorithm, preset=preset, steps=steps, precondition=precondition, dtype=dtype,
                    spectrum="gaussian:1024x1024", rel_err=err, sigma_min=lo, sigma_max=hi, flops=ratio * 100,
                    flops_vs_keller5=ratio)

    rows = [row("standard", "keller", 5, "frobenius", "bf16", 0.2, 0.03, 1.2, 1.0),
            row("standard", "you", 4, "aol", "bf16", 0.1, 0.05, 1.15, 0.8),   # passes
            row("standard", "you", 3, "aol", "bf16", 0.15, 0.02, 1.1, 0.6),   # sigma_min worse
            row("standard", "you", 3, "aol", "fp16", 0.1, 0.05, 1.1, 0.6)]    # not bf16
    check = quality.frontier_check(rows)["gaussian:1024x1024"]
    assert check["passes"] and [c["steps"] for c in check["configurations"]] == [4]
    assert quality.frontier_check(rows[:1])["gaussian:1024x1024"]["passes"] is False


def test_bad_arguments_name_the_choices():
    for flag, value in (("--presets", "nope"), ("--preconditions", "spectral"), ("--dtypes", "int8")):
        with pytest.raises(SystemExit, match=flag):
            main(["quality", "--quick", flag, value, "--out", "/nonexistent"])
