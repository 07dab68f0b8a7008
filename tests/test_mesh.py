"""DTensor layouts on 2×2 meshes with gloo and four processes: FSDP2 × TP, HSDP, 1-D FSDP2 with
uneven shards, on the engine's plan (tests/mesh_scenarios.py)."""

from __future__ import annotations

import json
import os

import dist_scenarios
import mesh_scenarios
import pytest
import torch.distributed as dist

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
    ),
    pytest.mark.xdist_group("processes"),  # with the other multi-process tests (tests/test_distributed.py)
]
WORLD = 4


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("mesh"))
    codes = dist_scenarios.launch(
        mesh_scenarios.run_scenarios, WORLD, outdir, args=(list(mesh_scenarios.SCENARIOS),), deadline_s=420
    )
    results = []
    for r in range(WORLD):
        path = os.path.join(outdir, f"rank{r}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else {})
    return codes, results, outdir


@pytest.mark.parametrize("name", list(mesh_scenarios.SCENARIOS))
def test_mesh_scenario(verdicts, name):
    codes, results, _ = verdicts
    for r, result in enumerate(results):
        assert name in result, f"rank {r} never finished {name!r} (exit codes {codes})"
        assert result[name] == "ok", f"rank {r}, {name}:\n{result[name]}"


def test_checkpoint_2x2_loads_on_1x2(verdicts):
    """The DCP checkpoint saved on the 2×2 mesh (scenario checkpoint_2x2_loads_on_4x1), loaded by a
    2-process job with tensor parallelism only: every value bit for bit, then a step on the plan."""
    codes, results, outdir = verdicts
    assert results[0].get("checkpoint_2x2_loads_on_4x1") == "ok", "the 2×2 save failed"
    codes = dist_scenarios.launch(mesh_scenarios.load_on_tp2, 2, outdir, deadline_s=120)
    for r in range(2):
        path = os.path.join(outdir, f"tp2_rank{r}.json")
        assert os.path.exists(path), f"rank {r} of the 1×2 job never finished (exit codes {codes})"
        assert json.load(open(path))["message"] == "ok", json.load(open(path))["message"]


# DCP says so when it loads without torch.distributed: here that is the point
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
def test_checkpoint_2x2_loads_in_one_process(verdicts):
    codes, results, outdir = verdicts
    assert results[0].get("checkpoint_2x2_loads_on_4x1") == "ok", "the 2×2 save failed"
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialized in this process")
    mesh_scenarios.load_in_one_process(outdir)
