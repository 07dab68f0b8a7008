"""Distributed Muon on CPU with gloo and two processes: DDP and FSDP2 against one process.

All scenarios share one spawned two-rank job (process start-up dominates on two cores); each test
reads its scenario's verdict from both ranks. See tests/dist_scenarios.py for the scenarios.
"""

from __future__ import annotations

import json
import os

import dist_scenarios
import pytest
import torch
import torch.distributed as dist

from muon import distributed as mdist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)
WORLD = 2


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("dist"))
    codes = dist_scenarios.launch(
        dist_scenarios.run_scenarios, WORLD, outdir, args=(list(dist_scenarios.SCENARIOS),), deadline_s=240
    )
    results = []
    for r in range(WORLD):
        path = os.path.join(outdir, f"rank{r}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else {})
    return codes, results


@pytest.mark.parametrize("name", list(dist_scenarios.SCENARIOS))
def test_scenario(verdicts, name):
    codes, results = verdicts
    for r, result in enumerate(results):
        assert name in result, f"rank {r} never finished {name!r} (exit codes {codes})"
        assert result[name] == "ok", f"rank {r}, {name}:\n{result[name]}"


def test_failing_rank_ends_with_clear_error(tmp_path):
    codes = dist_scenarios.launch(dist_scenarios.failing_rank, WORLD, str(tmp_path), deadline_s=60)
    assert None not in codes, "a rank hung past the deadline"
    rank0 = json.load(open(tmp_path / "rank0.json"))
    rank1 = json.load(open(tmp_path / "rank1.json"))
    assert "injected failure" in rank1["message"]
    assert rank0["message"].startswith("muon.distributed.DistributedStepError"), rank0["message"]
    # the step's first collective: the plan digest all-reduce, before any size-dependent one
    assert "all_reduce of the plan digest failed on rank 0 of 2" in rank0["message"]
    assert rank0["seconds"] < 30  # the 3 s collective timeout, not a hang


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_gradient_missing_on_one_rank_is_a_clear_error_on_every_rank(tmp_path, kind):
    codes = dist_scenarios.launch(
        dist_scenarios.gradient_missing_on_one_rank, WORLD, str(tmp_path), args=(kind,), deadline_s=60
    )
    assert None not in codes, "a rank hung past the deadline"
    assert codes == [0] * WORLD, f"a rank did not exit cleanly (exit codes {codes})"
    for r in range(WORLD):
        result = json.load(open(tmp_path / f"rank{r}.json"))
        message = result["message"]
        assert message.startswith("muon.distributed.DistributedStepError"), message
        # the cause, named: which parameter has a gradient on one rank and not on the other
        assert "param_groups[0]['params'][" in message and "no gradient" in message, message
        assert result["unchanged"], f"rank {r} changed parameters in the step that raised"
        assert result["seconds"] < 4  # decided by the agreement, not by the 5 s collective timeout


# ------------------------------------------------------------------- single-process pieces
def test_assignment_balances_flops():
    costs = [mdist.ns_flops(m, n, 5) for m, n in [(64, 64), (64, 64), (32, 64), (16, 16), (64, 256), (8, 8)]]
    for world in (1, 2, 3, 8):
        owner = mdist._assign(costs, world)
        load = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in range(world)]
        # greedy LPT: the busiest rank exceeds the ideal share by at most the largest job
        assert max(load) <= sum(costs) / world + max(costs)
        assert sum(load) == sum(costs)


def test_chunk_rows_matches_torch_chunk():
    for rows in (0, 1, 5, 7, 24):
        for world in (1, 2, 3, 4):
            spans = mdist._chunk_rows(rows, world)
            chunks = torch.arange(rows).chunk(world) if rows else ()
            sizes = [len(c) for c in chunks] + [0] * (world - len(chunks))
            assert [s for _, s in spans] == sizes
            assert sum(sizes) == rows


def test_comm_bytes_model():
    shapes = [(1024, 1024)] * 8 + [(4096, 1024)] * 4
    one = mdist.comm_bytes_per_step(shapes, world_size=1)
    assert one.muon_total == one.adamw_total == 0
    ddp = mdist.comm_bytes_per_step(shapes, world_size=8, sharding="replicated")
    total = sum(m * n for m, n in shapes)
    assert ddp.gradient_sync == int(2 * 7 / 8 * total * 4)
    # the all-gather of bf16 results: at least (W-1)/W of every result, padded to the busiest rank
    assert ddp.muon_optimizer >= 7 / 8 * total * 2
    fsdp = mdist.comm_bytes_per_step(shapes, world_size=8, sharding="fsdp")
    assert 1.0 < fsdp.ratio < 1.5 and 1.0 < ddp.ratio < 1.5
    with pytest.raises(ValueError, match="sharding"):
        mdist.comm_bytes_per_step(shapes, world_size=2, sharding="zero3")


def test_process_group_without_init_is_an_error():
    from muon import Muon

    if dist.is_initialized():
        pytest.skip("torch.distributed is initialized in this process")
    W = torch.nn.Parameter(torch.randn(4, 6))
    W.grad = torch.randn(4, 6)
    opt = Muon([W], process_group=object())
    with pytest.raises(ValueError, match="process_group"):
        opt.step()
