"""pytest-benchmark microbenchmarks of the CPU paths (not part of the default test run).

    python -m pytest bench/test_bench_cpu.py -o addopts="" --benchmark-only

The default `pytest` run never collects this file (testpaths = tests) and pyproject's addopts
has --benchmark-skip, so these never run as timing tests. Ratios come from one run's table.
"""

from __future__ import annotations

import pytest
import torch

import muon
from bench import models
from muon import flops
from muon.coefficients import resolve_schedule
from muon.newton_schulz import orthogonalize

SCHEDULE = resolve_schedule("keller", 5, 1e-7)


@pytest.mark.parametrize("shape", [(1, 128, 128), (1, 128, 512), (8, 64, 256)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_newton_schulz_torch(benchmark, shape, dtype):
    G = torch.randn(shape)
    benchmark.group = f"ns {'x'.join(map(str, shape))}"
    benchmark.extra_info["ns_flops"] = shape[0] * flops.newton_schulz_flops(shape[1], shape[2])
    out = benchmark(orthogonalize, G, SCHEDULE, dtype=dtype, backend="torch")
    assert out.shape == G.shape


def _model_with_grads():
    torch.manual_seed(0)
    model = models.build(models.PRESETS["tiny"], device="cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


@pytest.mark.parametrize("name", ["muon-batched", "muon-unbatched", "adamw-foreach", "adamw-fused"])
def test_optimizer_step(benchmark, name):
    model = _model_with_grads()
    benchmark.group = "optimizer step (tiny preset)"
    if name.startswith("muon"):
        opt = muon.Muon(muon.param_groups(model), lr=0.02, backend="torch", batched=name == "muon-batched")
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **{name.split("-")[1]: True})
    opt.step()  # state initialization outside the timing
    benchmark(opt.step)
