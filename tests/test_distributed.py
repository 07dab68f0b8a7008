"""Distributed Muon on CPU with gloo and two processes: DDP and FSDP2 against one process.

All scenarios share one spawned two-rank job (process start-up dominates on two cores); each test
reads its scenario's verdict from both ranks. See tests/dist_scenarios.py for the scenarios and
tests/dist_harness.py for the harness.
"""

from __future__ import annotations

import dist_harness
import dist_scenarios
import pytest
import torch
import torch.distributed as dist
from dist_harness import launch, read_ranks

from muon import distributed as mdist

pytestmark = dist_harness.marks()
WORLD = 2


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    return dist_harness.run_job(dist_scenarios, WORLD, str(tmp_path_factory.mktemp("dist")), deadline_s=240)


@pytest.mark.parametrize("name", list(dist_scenarios.SCENARIOS))
def test_scenario(verdicts, name):
    dist_harness.assert_scenario_ok(*verdicts, name)


def test_failing_rank_ends_with_clear_error(tmp_path):
    codes = launch(dist_scenarios.failing_rank, WORLD, str(tmp_path), deadline_s=60, finalize=True)
    assert None not in codes, "a rank hung past the deadline"
    rank0, rank1 = read_ranks(tmp_path, WORLD)
    assert "injected failure" in rank1["message"]
    assert rank0["message"].startswith("muon.distributed.DistributedStepError"), rank0["message"]
    # the step's first collective: the plan digest all-reduce, before any size-dependent one
    assert "all_reduce of the plan digest failed on rank 0 of 2" in rank0["message"]
    assert rank0["seconds"] < 30  # the 3 s collective timeout, not a hang


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_gradient_missing_on_one_rank_is_a_clear_error_on_every_rank(tmp_path, kind):
    codes = launch(dist_scenarios.gradient_missing_on_one_rank, WORLD, str(tmp_path), args=(kind,), deadline_s=60,
                   finalize=True)
    assert None not in codes, "a rank hung past the deadline"
    assert codes == [0] * WORLD, f"a rank did not exit cleanly (exit codes {codes})"
    for r, result in enumerate(read_ranks(tmp_path, WORLD)):
        message = result["message"]
        assert message.startswith("muon.distributed.DistributedStepError"), message
        # the cause, named: which parameter has a gradient on one rank and not on the other
        assert "param_groups[0]['params'][" in message and "no gradient" in message, message
        # "no gradient" comes from the plan-digest agreement, never from a collective's timeout (which
        # names the collective instead); no wall-clock bound here: a loaded CI machine must not flake
        assert result["unchanged"], f"rank {r} changed parameters in the step that raised"


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_step_that_raises_leaves_no_collective_to_the_backend(tmp_path, kind):
    """When the step raises (here: a gradient missing on one rank), gloo's worker threads hold no
    tensor of the step's collectives any more: one that still did would release it during the
    process's exit and abort it (see muon.distributed.collectives)."""
    codes = launch(dist_scenarios.collectives_finished_when_step_raises, WORLD, str(tmp_path), args=(kind,),
                   deadline_s=90, finalize=True)
    assert None not in codes, "a rank hung past the deadline"
    for r, result in enumerate(read_ranks(tmp_path, WORLD)):
        assert result["messages"] == ["muon.distributed.DistributedStepError"], result["messages"]
        assert result["tracked"] > 0, "no collective was recorded"
        assert not result["held"], f"rank {r}:\n" + "\n".join(result["held"][:5])
    assert codes == [0] * WORLD, f"a rank did not exit cleanly (exit codes {codes})"


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
    with pytest.raises(ValueError, match="process_group must be None"):  # not a group: refused at construction
        Muon([W], process_group=object())
    opt = Muon([W], process_group=dist.ProcessGroup(dist.HashStore(), 0, 1))
    with pytest.raises(ValueError, match="process_group"):
        opt.step()


def test_share_buckets_contiguous_rows_balanced_like_lpt():
    buckets = [(12, 64, 64), (4, 64, 256), (1, 16, 16), (3, 8, 24), (0, 4, 4)]
    costs = [mdist.ns_flops(s, l, 5) for _, s, l in buckets]
    for world in (1, 2, 3, 8):
        load = [0] * world
        share = mdist.share_buckets(buckets, world, 5, load)
        for (count, _, _), spans in zip(buckets, share.rows, strict=True):
            # each bucket's rows tiled in rank order: NS runs on a contiguous slice of the stack
            assert spans[0][0] == 0 and spans[-1][1] == count
            assert all(spans[r][1] == spans[r + 1][0] for r in range(world - 1))
        per_rank = [sum((spans[r][1] - spans[r][0]) * c for spans, c in zip(share.rows, costs)) for r in range(world)]
        assert per_rank == load
        # the same loads as greedy LPT over every matrix (equal-cost matrices are interchangeable)
        flat = [c for (count, _, _), c in zip(buckets, costs) for _ in range(count)]
        lpt = [sum(c for c, o in zip(flat, mdist._assign(flat, world)) if o == r) for r in range(world)]
        assert sorted(per_rank) == sorted(lpt)
        # each rank's chunk: its rows of every bucket back to back; every chunk as wide as the busiest
        used = [sum((spans[r][1] - spans[r][0]) * s * l for spans, (_, s, l) in zip(share.rows, buckets))
                for r in range(world)]  # fmt: skip
        assert share.width == max(used)
        for r in range(world):
            offset = 0
            for spans, (_, s, l), offsets in zip(share.rows, buckets, share.offsets):
                assert offsets[r] == offset
                offset += (spans[r][1] - spans[r][0]) * s * l


def test_failing_collective_finishes_every_pending_one_first(monkeypatch):
    """A collective that fails raises only after every other collective still in flight has been
    finished: none is left to a backend thread while the error ends the process."""
    from muon.distributed import collectives

    waited = []

    class Work:
        def __init__(self, name, fails=False):
            self.name, self.fails = name, fails

        def wait(self):
            waited.append(self.name)
            if self.fails:
                raise RuntimeError(f"{self.name} timed out")

    monkeypatch.setattr(collectives.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(collectives.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(collectives, "_PENDING", [])
    first = collectives._Pending(Work("first"), "all_to_all one", None, [], None)
    second = collectives._Pending(Work("second", fails=True), "all_to_all two", None, [], None)
    collectives._Pending(Work("third", fails=True), "all_to_all three", None, [], None)  # abandoned
    with pytest.raises(mdist.DistributedStepError, match="all_to_all two failed on rank 0 of 2"):
        second.wait()
    assert sorted(waited) == ["first", "second", "third"] and not collectives._PENDING
    first.wait()  # already finished: a no-op
    assert len(waited) == 3


def test_plan_difference_is_named():
    from muon.distributed.ownership import describe_difference, digest

    a = ((True, (False, True, "'keller'", 5, "auto"), (((4, 6), "torch.float32", "torch.float32", "cpu"), None)),)
    b = ((True, (False, True, "'keller'", 5, "auto"), (((4, 6), "torch.float32", "torch.float32", "cpu"),
                                                     ((4, 6), "torch.float32", "torch.float32", "cpu"))),)  # fmt: skip
    assert digest(a) != digest(b) and digest(a) == digest(a) and 0 <= digest(a) < 2**62
    message = describe_difference([a, b])
    assert message.startswith("param_groups[0]['params'][1]: rank 0 has no gradient, rank 1 has a gradient"), message


@pytest.fixture
def fake_world():
    """A 2-rank process group faked inside this process (collectives move nothing)."""
    FakeStore = pytest.importorskip("torch.testing._internal.distributed.fake_pg").FakeStore

    def start(rank):
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", rank=rank, world_size=2, store=FakeStore())

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def _replicated_ops(layers: int) -> tuple[int, dict]:
    from helpers import gpt_like as _gpt_like  # GPT-2's parameter structure at width 64

    from muon import Muon
    from muon.profiling import count_dispatched_ops

    torch.manual_seed(0)
    mats, rest = _gpt_like(layers)
    opt = Muon([{"params": mats}, {"params": rest, "use_muon": False}], backend="torch")
    for p in mats + rest:
        p.grad = torch.randn_like(p)
    opt.step()  # builds the plan
    with count_dispatched_ops() as ops, mdist.count_comm_bytes() as comm:
        opt.step()
    return ops.total, {"collectives": comm.collectives, "plan": opt._plan}


def test_replicated_step_runs_on_the_plan_with_constant_host_cost(fake_world):
    """A rank of a 2-rank group: the step is the engine's plan with an exchange; per step two small
    all-reduce (the agreement) and one all-gather per Muon group, host cost independent of the parameter count."""
    fake_world(1)
    counts = {}
    for layers in (8, 32):
        counts[layers], info = _replicated_ops(layers)
        plan = info["plan"]
        assert plan is not None and plan.dist is not None
        # the agreement word (plan digest and finite verdict), one all-gather (one Muon group)
        assert info["collectives"] == 2
        gx = plan.dist.groups[0]
        # rank 1 orthogonalizes about half of the rows of every bucket ((3d, d), (d, d), (4d, d) with (d, 4d))
        for (start, stop), b in zip(gx.rows, plan.groups[0].buckets, strict=True):
            assert abs((stop - start) - len(b.params) / 2) <= 1
    assert counts[32] < 1.15 * counts[8], counts


def test_comm_bytes_model_on_meshes():
    from torch.distributed.tensor import Replicate, Shard

    shapes = [(64, 64)] * 8
    col = mdist.comm_bytes_per_step(shapes, world_size=4, sharding="mesh", mesh_shape=(4,),
                                    placements=[(Shard(0),)] * 8)  # fmt: skip
    fsdp = mdist.comm_bytes_per_step(shapes, world_size=4, sharding="fsdp")
    # 1-D Shard(0) on the mesh model is FSDP2's layout: the same Muon bytes
    assert col.muon_optimizer_per_rank == fsdp.muon_optimizer_per_rank
    hsdp = mdist.comm_bytes_per_step(shapes, world_size=4, sharding="mesh", mesh_shape=(2, 2),
                                     placements=[(Replicate(), Shard(0))] * 8)  # fmt: skip
    # HSDP: owners gather within their replica group (half the matrix), return all three others a block
    per_matrix = 64 * 64 * 4  # fp32 gradients in; the blocks go back in bf16 (half the bytes)
    agreement = 4 * int(2 * 3 / 4 * 32)  # the int64 word on each rank
    assert sum(hsdp.muon_optimizer_per_rank) - agreement == 8 * (per_matrix // 2 + 3 * (per_matrix // 2) // 2)
    with pytest.raises(ValueError, match="mesh_shape and one placements entry"):
        mdist.comm_bytes_per_step(shapes, world_size=4, sharding="mesh")


def test_parameters_on_several_devices_with_a_process_group_are_refused(fake_world):
    """A replicated step keeps one device per process: parameters on two devices with a group of two
    ranks are a clear error at the first step, before anything is written."""
    from muon import Muon

    fake_world(0)
    a = torch.nn.Parameter(torch.randn(8, 8))
    b = torch.nn.Parameter(torch.randn(8, 8, device="meta"))  # a second device, never computed on
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    before = a.detach().clone()
    opt = Muon([a, b], lr=0.02)
    with pytest.raises(NotImplementedError, match=r"several devices \(cpu, meta\) with a process group of 2 ranks"):
        opt.step()
    assert torch.equal(a, before) and not opt.state
