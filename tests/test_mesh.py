"""DTensor layouts on 2×2 meshes with gloo and four processes: FSDP2 × TP, HSDP, 1-D FSDP2 with
uneven shards, on the engine's plan (tests/mesh_scenarios.py)."""

from __future__ import annotations

import json
import os

import dist_scenarios
import mesh_scenarios
import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)
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
    return codes, results


@pytest.mark.parametrize("name", list(mesh_scenarios.SCENARIOS))
def test_mesh_scenario(verdicts, name):
    codes, results = verdicts
    for r, result in enumerate(results):
        assert name in result, f"rank {r} never finished {name!r} (exit codes {codes})"
        assert result[name] == "ok", f"rank {r}, {name}:\n{result[name]}"
