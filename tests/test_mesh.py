"""DTensor layouts on 2×2 meshes with gloo and four processes: FSDP2 × TP, HSDP, 1-D FSDP2 with
uneven shards, on the engine's plan (tests/mesh_scenarios.py, on the harness of tests/dist_harness.py)."""

from __future__ import annotations

import dist_harness
import mesh_scenarios
import pytest
import torch.distributed as dist
from dist_harness import launch, read_ranks

pytestmark = dist_harness.marks()  # with the other multi-process tests (tests/test_distributed.py)
WORLD = 4


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("mesh"))
    return (*dist_harness.run_job(mesh_scenarios, WORLD, outdir, deadline_s=420), outdir)


@pytest.mark.parametrize("name", list(mesh_scenarios.SCENARIOS))
def test_mesh_scenario(verdicts, name):
    codes, results, _ = verdicts
    dist_harness.assert_scenario_ok(codes, results, name)


def test_checkpoint_2x2_loads_on_1x2(verdicts):
    """The DCP checkpoint saved on the 2×2 mesh (scenario checkpoint_2x2_loads_on_4x1), loaded by a
    2-process job with tensor parallelism only: every value bit for bit, then a step on the plan."""
    codes, results, outdir = verdicts
    assert results[0].get("checkpoint_2x2_loads_on_4x1") == "ok", "the 2×2 save failed"
    codes = launch(mesh_scenarios.load_on_tp2, 2, outdir, deadline_s=120)
    for r, result in enumerate(read_ranks(outdir, 2, prefix="tp2_")):
        assert result, f"rank {r} of the 1×2 job never finished (exit codes {codes})"
        assert result["message"] == "ok", result["message"]


# DCP says so when it loads without torch.distributed: here that is the point
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
def test_checkpoint_2x2_loads_in_one_process(verdicts):
    codes, results, outdir = verdicts
    assert results[0].get("checkpoint_2x2_loads_on_4x1") == "ok", "the 2×2 save failed"
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialized in this process")
    mesh_scenarios.load_in_one_process(outdir)
