"""Multi-process scenarios for tests/test_distributed.py (CPU, gloo), on the harness of
tests/dist_harness.py.

`dist_harness.launch` starts `world` spawned processes that each run every scenario named, one after
the other on one process group (process start-up is most of the cost on a 2-core machine). Each scenario checks
its own assertions on every rank; each rank writes {scenario: "ok" | traceback} to
<outdir>/rank<r>.json, which the tests read. A scenario that fails mid-step leaves the ranks out of
step; the short collective timeout then fails the following ones instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta

import dist_harness
import torch
import torch.distributed as dist
from dist_harness import init_gloo, write_rank
from torch import nn

STEPS = 3
LR = 0.02


def _step(opt, count_flops: bool, previous):
    """opt.step() then zero_grad(); with count_flops, the step's FLOPs (else `previous`)."""
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            opt.step()
        previous = counter.get_total_flops()
    else:
        opt.step()
    opt.zero_grad()
    return previous


class Net(nn.Module):
    """Same-shape matrices (fc2, fc3), rows not divisible by 2 (fc4: 7×24, head bias 5), a 3-D expert
    stack with an odd number of experts, and a head and biases that param_groups routes to AdamW."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 24, bias=False)
        self.fc3 = nn.Linear(24, 24, bias=False)
        self.fc4 = nn.Linear(24, 7)
        self.experts = nn.Parameter(torch.randn(3, 8, 24) / 24**0.5)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.fc2(h)) + h
        h = torch.tanh(self.fc3(h)) + h
        e = torch.einsum("bi,eoi->beo", h, self.experts).tanh().sum(1)
        return torch.cat([self.head(h), self.fc4(h), e], dim=1)


class Tiny(nn.Module):
    """One Muon matrix for two ranks; its single row leaves rank 1 an empty FSDP shard."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def batch(step: int, rank: int, width: int, out: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(rows, width, generator=g), torch.randn(rows, out, generator=g)


def loss_fn(model, x, y) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def make_optimizer(model, groups_kw=None, **kw):
    from muon import Muon, param_groups

    return Muon(param_groups(model, **(groups_kw or {})), lr=LR, weight_decay=0.1, **kw)


def reference_run(make, width, out, world, steps=STEPS, flops=False, **kw):
    """One process stepping on the averaged gradient: the ranks' batches concatenated (equal sizes,
    mean loss, so the gradient is the mean of the ranks' gradients). Returns (params, step FLOPs)."""

    torch.manual_seed(0)
    model = make()
    solo = [dist.new_group([r]) for r in range(world)]  # a one-rank group: the local, unsplit step
    opt = make_optimizer(model, process_group=solo[dist.get_rank()], **kw)
    step_flops = None
    for step in range(steps):
        xs, ys = zip(*(batch(step, r, width, out) for r in range(world)), strict=True)
        loss_fn(model, torch.cat(xs), torch.cat(ys)).backward()
        step_flops = _step(opt, count_flops=flops and step == 0, previous=step_flops)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, step_flops


def full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


def gather_scalar(value: float) -> list[float]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# Distributed and single-process runs differ by the gradient's fp32 summation order (all-reduce,
# reduce-scatter). With NS in float64 that stays at fp32 rounding: measured ~1e-6 of the total
# update; 1e-4 fails on any wrong shard, owner or lost step. With NS in bf16 a flipped bf16 rounding
# of the NS input changes the rounding of every later GEMM, so two bf16 runs differ by about bf16
# NS's own error (measured 0.5-3 % of the update on these 24-wide matrices): the bf16 tolerance is
# 2x the single-process bf16 run's own distance from the float64 one, as for every NS backend.
FP64_RTOL = 1e-4
BF16_FACTOR = 2.0


def update_err(model, ref, init) -> dict[str, float]:
    errs = {}
    for name, p in model.named_parameters():
        name = name.replace("module.", "")
        errs[name] = ((full(p) - ref[name]).norm() / (ref[name] - init[name]).norm()).item()
    return errs


def assert_matches(model, ref, init, what, bound=None):
    """bound: name -> allowed relative error (FP64_RTOL for every name when None)."""
    for name, err in update_err(model, ref, init).items():
        limit = FP64_RTOL if bound is None else bound[name]
        assert err <= limit, f"{what}: {name} differs from the single-process run by {err:.2e} > {limit:.2e}"


def bf16_bounds(ref_bf16, ref_fp64, init) -> dict[str, float]:
    return {
        name: BF16_FACTOR * ((ref_bf16[name] - ref_fp64[name]).norm() / (ref_fp64[name] - init[name]).norm()).item()
        + FP64_RTOL
        for name in ref_bf16
    }


def assert_ranks_identical(model, what):
    for name, p in model.named_parameters():
        mine = full(p).contiguous()
        others = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(others, mine)
        for r, other in enumerate(others):
            assert torch.equal(other, mine), f"{what}: {name} differs between rank {dist.get_rank()} and {r}"


def train(model, opt, width, out, steps, start=0, flops=False):

    rank = dist.get_rank()
    step_flops = None
    for step in range(start, start + steps):
        x, y = batch(step, rank, width, out)
        loss_fn(model, x, y).backward()
        step_flops = _step(opt, count_flops=flops and step == start, previous=step_flops)
    return step_flops


def shard(model, placement=None):
    from torch.distributed.fsdp import fully_shard

    for module in model.children():
        if any(True for _ in module.parameters()):
            fully_shard(module, shard_placement_fn=placement)
    fully_shard(model, shard_placement_fn=placement)  # the root holds the expert stack
    return model


def shard_columns(p):
    """FSDP2 sharding of 2-D weights on dim 1: not the Shard(0) layout the owner plan needs."""
    from torch.distributed.tensor import Shard

    return Shard(1) if p.ndim == 2 else None


def build(make, kind):
    """The model as every rank builds it (seed 0), wrapped for `kind`, with its initial values."""
    torch.manual_seed(0)
    model = make()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        model = shard(model, shard_columns if kind == "fsdp_dim1" else None)
    return model, init


# ------------------------------------------------------------------------------------- scenarios
def scenario_matches_single(kind):
    """DDP/FSDP2 equal one process on the averaged gradient; NS FLOPs split; ranks agree."""

    def run():
        world = dist.get_world_size()
        ref64, _ = reference_run(Net, 16, 20, world, ns_dtype=torch.float64)
        model, init = build(Net, kind)
        train(model, make_optimizer(model, ns_dtype=torch.float64), 16, 20, STEPS)
        assert_matches(model, ref64, init, f"{kind}, float64 NS")

        ref, ref_flops = reference_run(Net, 16, 20, world, flops=True)
        model, init = build(Net, kind)
        opt = make_optimizer(model)
        flops = train(model, opt, 16, 20, STEPS, flops=True)
        assert_matches(model, ref, init, f"{kind}, bf16 NS", bf16_bounds(ref, ref64, init))
        # both on the engine's plan (FSDP2: over the local shards, expert stack and uneven rows included)
        assert opt._plan is not None and opt._plan.dist is not None
        assert opt._plan.dist.sharded == (kind == "fsdp")
        if kind == "ddp":
            assert_ranks_identical(model, kind)
        per_rank = gather_scalar(flops)
        assert ref_flops > 0
        assert max(per_rank) <= 0.6 * ref_flops, f"{kind}: busiest rank {per_rank} of {ref_flops} FLOPs"
        assert sum(per_rank) >= ref_flops * 0.99, f"{kind}: NS work lost: {per_rank} vs {ref_flops}"

    return run


def scenario_more_ranks_than_matrices(kind):
    """One Muon matrix for two ranks (Tiny); with kind "fsdp_dim1", Net sharded on dim 1 (column
    blocks on the plan)."""
    make, width, out = (Net, 16, 20) if kind == "fsdp_dim1" else (Tiny, 6, 1)

    def run():
        world = dist.get_world_size()
        ref, _ = reference_run(make, width, out, world, ns_dtype=torch.float64)
        model, init = build(make, kind)
        opt = make_optimizer(model, ns_dtype=torch.float64)
        train(model, opt, width, out, STEPS)
        assert_matches(model, ref, init, kind)
        if kind == "fsdp_dim1":  # Shard(1): column blocks, on the plan like Shard(0)
            assert opt._plan is not None and opt._plan.dist.sharded
        if kind == "ddp":
            assert_ranks_identical(model, kind)

    return run


def scenario_comm_bytes(kind):
    """Bytes counted in the step equal comm_bytes_per_step's prediction for every rank."""

    def run():
        from muon.distributed import comm_bytes_per_step, count_comm_bytes
        from muon.param_groups import param_groups

        world, rank = dist.get_world_size(), dist.get_rank()
        torch.manual_seed(0)
        groups = param_groups(Net())
        muon_shapes = [tuple(p.shape) for g in groups if g["use_muon"] for p in g["params"]]
        adamw_shapes = [tuple(p.shape) for g in groups if not g["use_muon"] for p in g["params"]]
        model, _ = build(Net, kind)
        opt = make_optimizer(model, ns_dtype=torch.bfloat16)  # the prediction's default NS dtype
        train(model, opt, 16, 20, 1)  # the first step also checks the plan once (not counted)
        x, y = batch(7, rank, 16, 20)
        loss_fn(model, x, y).backward()
        with count_comm_bytes() as counter:
            opt.step()
        sharding = "replicated" if kind == "ddp" else "fsdp"
        predicted = comm_bytes_per_step(muon_shapes, adamw_shapes, world_size=world, sharding=sharding)
        assert counter.bytes == predicted.muon_optimizer_per_rank[rank], (counter.bytes, predicted)
        assert predicted.muon_optimizer == max(predicted.muon_optimizer_per_rank)
        assert predicted.ratio > 1.0

    return run


def scenario_nonfinite_fsdp():
    """An inf in one rank's gradient shard skips the parameter on every rank."""
    model, _ = build(Net, "fsdp")
    opt = make_optimizer(model)
    train(model, opt, 16, 20, 1)
    before = {n: full(p).clone() for n, p in model.named_parameters()}
    x, y = batch(5, dist.get_rank(), 16, 20)
    loss_fn(model, x, y).backward()
    if dist.get_rank() == 1:
        model.fc2.weight.grad.to_local()[0, 0] = float("inf")
        model.head.bias.grad.to_local()[0] = float("nan")  # head.bias: 5 rows, rank 1 holds 2
    opt.step()
    for name in ("fc2.weight", "head.bias"):
        p = dict(model.named_parameters())[name]
        assert torch.equal(full(p), before[name]), f"{name} changed despite a non-finite shard"
        assert int(opt.state[p]["nonfinite_skips"]) == 1
    assert not torch.equal(full(model.fc3.weight), before["fc3.weight"])


def scenario_checkpoint_dcp(state_dtype=None):
    """FSDP2 + torch.distributed.checkpoint (sharded state): resuming continues bit for bit (also with
    an int8 momentum and its scales, sharded by rows as the parameters)."""
    return lambda: _checkpoint_dcp(state_dtype)


def _checkpoint_dcp(state_dtype):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = os.path.join(_OUTDIR, f"dcp-{state_dtype}")
    model, _ = build(Net, "fsdp")
    opt = make_optimizer(model, state_dtype=state_dtype)
    train(model, opt, 16, 20, 2)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    train(model, opt, 16, 20, 2, start=2)
    expected = {n: full(p) for n, p in model.named_parameters()}

    torch.manual_seed(1)  # different initial values: everything must come from the checkpoint
    resumed = shard(Net())
    opt2 = make_optimizer(resumed, state_dtype=state_dtype)
    state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, opt2)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, opt2, state["optim"])
    train(resumed, opt2, 16, 20, 2, start=2)
    for n, p in resumed.named_parameters():
        assert torch.equal(full(p), expected[n]), f"{n} after resuming from DCP differs"
    if state_dtype is not None:  # a full-precision state loaded into this state_dtype: each rank converts its rows
        from muon import functional as F

        src = make_optimizer(resumed)
        train(resumed, src, 16, 20, 1, start=4)
        dst = make_optimizer(resumed, state_dtype=state_dtype)
        dst.load_state_dict(src.state_dict())
        w = resumed.fc3.weight
        q, scale = dst.state[w]["momentum_buffer"], dst.state[w]["momentum_scale"]
        expected_q, expected_scale = F.quantize_blockwise(src.state[w]["momentum_buffer"].to_local())
        assert torch.equal(q.to_local(), expected_q) and torch.equal(scale.to_local(), expected_scale)
        assert tuple(scale.shape) == F.scale_shape(w.shape)
        train(resumed, dst, 16, 20, 1, start=5)


def scenario_checkpoint_full_fsdp():
    """FSDP2, a full (unsharded) state dict saved by rank 0 alone: resuming continues bit for bit."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = os.path.join(_OUTDIR, "full.pt")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, _ = build(Net, "fsdp")
    opt = make_optimizer(model)
    train(model, opt, 16, 20, 2)
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, opt, options=options)
    if dist.get_rank() == 0:
        torch.save({"model": model_sd, "optim": optim_sd}, path)
    dist.barrier()
    train(model, opt, 16, 20, 2, start=2)
    expected = {n: full(p) for n, p in model.named_parameters()}

    torch.manual_seed(1)
    resumed = shard(Net())
    opt2 = make_optimizer(resumed)
    loaded = torch.load(path, weights_only=False) if dist.get_rank() == 0 else {"model": {}, "optim": {}}
    load_options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(resumed, loaded["model"], options=load_options)
    set_optimizer_state_dict(resumed, opt2, loaded["optim"], options=load_options)
    train(resumed, opt2, 16, 20, 2, start=2)
    for n, p in resumed.named_parameters():
        assert torch.equal(full(p), expected[n]), f"{n} after resuming from a full state dict differs"


def scenario_checkpoint_plain_ddp():
    """DDP: optimizer.state_dict() saved by rank 0 and loaded on every rank continues bit for bit."""
    path = os.path.join(_OUTDIR, "ddp.pt")
    model, _ = build(Net, "ddp")
    opt = make_optimizer(model)
    train(model, opt, 16, 20, 2)
    if dist.get_rank() == 0:
        torch.save({"model": model.module.state_dict(), "optim": opt.state_dict()}, path)
    dist.barrier()
    train(model, opt, 16, 20, 2, start=2)
    expected = {n: full(p).clone() for n, p in model.named_parameters()}

    torch.manual_seed(1)
    net = Net()
    saved = torch.load(path, weights_only=False)
    net.load_state_dict(saved["model"])
    resumed = nn.parallel.DistributedDataParallel(net)
    opt2 = make_optimizer(resumed)
    opt2.load_state_dict(saved["optim"])
    train(resumed, opt2, 16, 20, 2, start=2)
    for n, p in resumed.named_parameters():
        assert torch.equal(full(p), expected[n]), f"{n} after resuming from a plain state dict differs"
    assert_ranks_identical(resumed, "ddp resume")


def scenario_nonfinite_ddp(foreach):
    """A NaN in rank 1's gradient only (after DDP's all-reduce): every rank skips that parameter, the
    ranks stay identical and equal a single-process run that skipped it; with nonfinite="raise"
    every rank raises and nothing changes. foreach=False: the same through the reference loop."""
    return lambda: _nonfinite_ddp(foreach)


def _nonfinite_ddp(foreach):
    bad_step = 1

    def poison(model, rank):
        if rank == 1:
            model.fc2.weight.grad[0, 0] = float("nan")  # a Muon matrix
            model.head.bias.grad[1] = float("nan")  # an AdamW parameter

    world, rank = dist.get_world_size(), dist.get_rank()
    # the single-process run: averaged gradients, both parameters skipped at bad_step
    torch.manual_seed(0)
    solo_model = Net()
    solo = [dist.new_group([r]) for r in range(world)]
    opt = make_optimizer(solo_model, process_group=solo[rank], ns_dtype=torch.float64)
    for step in range(STEPS):
        xs, ys = zip(*(batch(step, r, 16, 20) for r in range(world)), strict=True)
        loss_fn(solo_model, torch.cat(xs), torch.cat(ys)).backward()
        if step == bad_step:
            poison(solo_model, 1)
        _step(opt, False, None)
    ref = {n: p.detach().clone() for n, p in solo_model.named_parameters()}

    model, init = build(Net, "ddp")
    opt = make_optimizer(model, ns_dtype=torch.float64, foreach=foreach)
    for step in range(STEPS):
        x, y = batch(step, rank, 16, 20)
        loss_fn(model, x, y).backward()
        if step == bad_step:
            poison(model.module, rank)
        _step(opt, False, None)
    assert_ranks_identical(model, "ddp, NaN on rank 1 only")
    assert_matches(model, ref, init, "ddp, NaN on rank 1 only")
    for p in (model.module.fc2.weight, model.module.head.bias):
        assert int(opt.state[p]["nonfinite_skips"]) == 1, "the parameter was not skipped on this rank"

    opt = make_optimizer(model, nonfinite="raise", foreach=foreach)
    before = {n: full(p).clone() for n, p in model.named_parameters()}
    x, y = batch(9, rank, 16, 20)
    loss_fn(model, x, y).backward()
    poison(model.module, rank)
    try:
        opt.step()
    except RuntimeError as exc:
        assert "non-finite gradient" in str(exc), str(exc)
    else:
        raise AssertionError(f"rank {rank} stepped although rank 1 holds a NaN gradient")
    for n, p in model.named_parameters():
        assert torch.equal(full(p), before[n]), f"{n} changed although the step raised"


def _ddp_equals_one_process(kw: dict, what: str, check=None) -> None:
    """DDP with options `kw` equals one process on the averaged gradient (`reference_run`), the ranks
    identical; check(opt), when given, runs after the steps."""
    ref, _ = reference_run(Net, 16, 20, dist.get_world_size(), **kw)
    model, init = build(Net, "ddp")
    opt = make_optimizer(model, **kw)
    train(model, opt, 16, 20, STEPS)
    if check is not None:
        check(opt)
    assert_matches(model, ref, init, what)
    assert_ranks_identical(model, what)


def scenario_ddp_row_blocks():
    """split/heads row blocks (unequal blocks mirrored, equal ones stacked) and Gram NS on replicated
    parameters: each rank orthogonalizes its rows of the plan's block buckets; equal to one process."""

    def run():
        # DDP names its parameters module.*: the patterns match both
        kw = dict(groups_kw={"split": {"*fc2.weight": [16, 8]}, "heads": {"*fc3.weight": 4}},
                  ns_algorithm="gram", ns_dtype=torch.float64)
        _ddp_equals_one_process(kw, "ddp, split/heads, Gram NS")

    return run


def scenario_ddp_normuon_cautious():
    """NorMuon and cautious weight decay on replicated parameters (the apply phase runs on every rank
    after the all-gather): equal to one process, ranks identical."""

    def run():
        kw = dict(variant="normuon", cautious_weight_decay=True, ns_dtype=torch.float64)
        _ddp_equals_one_process(kw, "ddp, NorMuon + cautious weight decay")

    return run


def scenario_ddp_state_dtype():
    """state_dtype bf16 and int8 (low-precision momentum and moments) on replicated parameters: the state
    is each rank's whole copy, read in fp32 and stored back at the commit; equal to one process, ranks
    identical."""

    def run():
        world = dist.get_world_size()
        for low in (torch.bfloat16, torch.int8):
            kw = dict(state_dtype=low, ns_dtype=torch.float64)
            ref, _ = reference_run(Net, 16, 20, world, **kw)
            model, init = build(Net, "ddp")
            opt = make_optimizer(model, **kw)
            train(model, opt, 16, 20, STEPS)
            assert opt._plan is not None and opt._plan.dist is not None
            p = opt.param_groups[0]["params"][0]
            assert opt.state[p]["momentum_buffer"].dtype == low
            assert_matches(model, ref, init, f"ddp, state_dtype={low}")
            assert_ranks_identical(model, f"ddp, state_dtype={low}")

    return run


def _fsdp_plan_equals_loop(what: str, **kw):
    """FSDP2 on the plan and on the per-parameter loop (foreach=False) with optimizer options kw, a NaN
    in rank 1's shard of fc3's gradient at step 1: parameters and every state entry bit for bit alike,
    fc3 skipped once. Returns the plan's (model, optimizer)."""
    runs = []
    for foreach in (None, False):
        model, _ = build(Net, "fsdp")
        opt = make_optimizer(model, foreach=foreach, **kw)
        for step in range(STEPS):
            x, y = batch(step, dist.get_rank(), 16, 20)
            loss_fn(model, x, y).backward()
            if step == 1 and dist.get_rank() == 1:
                model.fc3.weight.grad.to_local()[0, 1] = float("nan")
            _step(opt, False, None)
        # both on the engine: the owner plan's all_to_alls, or foreach=False's every matrix gathered
        assert opt._plan is not None and opt._plan.dist.sharded
        assert (opt._plan.dist.agree is None) == (foreach is None)
        runs.append((model, opt))
    (plan_model, plan_opt), (loop_model, loop_opt) = runs
    for (name, p), q in zip(plan_model.named_parameters(), loop_model.parameters(), strict=True):
        assert torch.equal(full(p), full(q)), f"{name}: the plan and the loop differ{what}"
        for key in ("momentum_buffer", "momentum_scale", "exp_avg", "exp_avg_sq", "nonfinite_skips"):
            if key in loop_opt.state[q]:
                a, b = plan_opt.state[p][key], loop_opt.state[q][key]
                assert torch.equal(full(a), full(b)), f"{name}: state {key} differs between the plan and the loop{what}"
    assert int(plan_opt.state[plan_model.fc3.weight]["nonfinite_skips"]) == 1
    return plan_model, plan_opt


def scenario_fsdp_state_dtype():
    """state_dtype bf16 and int8 on FSDP2 (row-sharded DTensors): each rank stores and quantizes its own
    rows (blocks lie within rows); the plan equals one process and the per-parameter loop
    (foreach=False) bit for bit, a non-finite gradient shard skipped on the way."""

    def run():
        world = dist.get_world_size()
        for low in (torch.bfloat16, torch.int8):
            kw = dict(state_dtype=low, ns_dtype=torch.float64)
            ref, _ = reference_run(Net, 16, 20, world, **kw)
            model, init = build(Net, "fsdp")
            train(model, make_optimizer(model, **kw), 16, 20, STEPS)
            assert_matches(model, ref, init, f"fsdp, state_dtype={low}")
            # NS in the default dtype, as fsdp_plan_equals_loop runs it
            plan_model, plan_opt = _fsdp_plan_equals_loop(f" (state_dtype={low})", state_dtype=low)
            w = plan_model.fc3.weight
            assert plan_opt.state[w]["momentum_buffer"].to_local().dtype == low

    return run


def scenario_ddp_transposed():
    """transposed=True (weights read as (in, out), transformers' Conv1D) on replicated parameters: a
    wide, a square (split into unequal, mirrored blocks) and an expert stack (heads: tall blocks)
    read transposed, and NorMuon's column moments; equal to one process, ranks identical."""

    def check(opt):
        assert any(g.get("transposed") for g in opt.param_groups)
        assert opt._plan is not None and opt._plan.dist is not None

    def run():
        marked = ["*fc2.weight", "*fc4.weight", "*experts"]
        for kw in (dict(groups_kw={"transposed": marked, "split": {"*fc2.weight": [16, 8]},
                                   "heads": {"*experts": 2}}, ns_dtype=torch.float64),
                   dict(groups_kw={"transposed": marked}, variant="normuon", ns_dtype=torch.float64)):
            _ddp_equals_one_process(kw, f"ddp, transposed {sorted(kw)}", check)

    return run


def scenario_fsdp_transposed_refused():
    """FSDP2 (DTensor) parameters in a transposed=True group: a ValueError when the group is added."""
    model, _ = build(Net, "fsdp")
    try:
        make_optimizer(model, groups_kw={"transposed": ["*fc2.weight"]})
    except ValueError as exc:
        assert "transposed=True does not support sharded parameters" in str(exc), str(exc)
    else:
        raise AssertionError("a transposed FSDP2 parameter was accepted")


class Deep(nn.Module):
    """`layers` blocks of two 16×16 Muon matrices with biases (AdamW), each block its own FSDP unit."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)) for _ in range(layers)
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def scenario_fsdp_on_plan():
    """FSDP2 parameters step through the engine's plan: momentum a DTensor over the local rows of
    a bucket stack (ZeRO-1), a fixed number of collectives (the agreement, one gather and one
    scatter all_to_all per Muon group) and dispatched ops that do not grow with the layers."""
    from torch.distributed.fsdp import fully_shard

    from muon.distributed import count_comm_bytes
    from muon.profiling import count_dispatched_ops

    ops = {}
    for layers in (2, 8):
        torch.manual_seed(0)
        model = Deep(layers)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        opt = make_optimizer(model, ns_dtype=torch.float32)
        train(model, opt, 16, 4, 1)
        plan = opt._plan
        assert plan is not None and plan.dist is not None and plan.dist.sharded, "FSDP2 step ran the loop"
        weight = model.blocks[0][0].weight
        buf = opt.state[weight]["momentum_buffer"]
        assert type(buf).__name__ == "DTensor" and buf.placements == weight.placements and buf.shape == weight.shape
        bucket = next(b for g in plan.groups if g.use_muon for b in g.buckets if b.whole_params[0] is weight)
        # the local rows only, its own tensor (opt.state is the only storage); the bucket stacks every layer's
        assert buf.to_local().shape == weight.to_local().shape == (8, 16)
        assert buf.to_local().untyped_storage().nbytes() == buf.to_local().nbytes  # not a view of a bucket stack
        assert bucket.shape == (2 * layers, 8, 16)
        x, y = batch(9, dist.get_rank(), 16, 4)
        loss_fn(model, x, y).backward()
        with count_dispatched_ops() as counted, count_comm_bytes() as comm:
            opt.step()
        opt.zero_grad()
        assert opt._plan is plan, "the plan was rebuilt"
        # the agreement word (digest and finite verdict), the gather and the scatter of the Muon group
        assert comm.collectives == 3, comm.collectives
        ops[layers] = counted.total
    assert ops[8] < 1.15 * ops[2], ops


def scenario_fsdp_plan_equals_loop():
    """FSDP2 on the plan computes the bits of the per-parameter loop (foreach=False), parameters and
    momentum, with cautious weight decay and a non-finite gradient shard skipped on the way;
    nonfinite="raise" raises on every rank and changes nothing."""
    plan_model, _ = _fsdp_plan_equals_loop("", cautious_weight_decay=True)

    opt = make_optimizer(plan_model, nonfinite="raise")
    before = {n: full(p).clone() for n, p in plan_model.named_parameters()}
    x, y = batch(9, dist.get_rank(), 16, 20)
    loss_fn(plan_model, x, y).backward()
    if dist.get_rank() == 1:
        plan_model.head.bias.grad.to_local()[0] = float("inf")
    try:
        opt.step()
    except RuntimeError as exc:
        assert "non-finite gradient" in str(exc) and "params" in str(exc), str(exc)
    else:
        raise AssertionError(f"rank {dist.get_rank()} stepped although rank 1 holds an inf gradient shard")
    assert opt._plan is not None
    for n, p in plan_model.named_parameters():
        assert torch.equal(full(p), before[n]), f"{n} changed although the step raised"
    opt.zero_grad()


# Counted step memory on 2 ranks (16 matrices 128×128; FSDP2: row-sharded), bytes per local
# parameter: (kept, step peak) ceilings, each the counted figure plus a margin. Every distributed NS
# phase frees each buffer once read and orthogonalizes in `chunk_bytes` chunks (the default chunk
# holds all 16 matrices here; "chunks of two" sets chunk_bytes to two matrices). DDP: the whole
# bucket's NS input, a rank's rows and their NS workspace, then the all-gathered results (16 before).
# The FSDP2 owner plan: an owner's full matrices, their NS result and workspace (28 before).
# foreach=False's gathered phase: one chunk of full matrices besides the local results and updates
# (36.5 before). Lower a ceiling when a change lowers the figure; a change that raises one must say why.
DIST_MEMORY = {
    "ddp": ("ddp", {}, (4.1, 12.5)),  # counted: 4.0, 12.0
    "ddp, chunks of two": ("ddp", {"chunk_bytes": 2 * 128 * 128 * 4}, (4.1, 10.5)),  # 4.0, 10.0
    "fsdp owner": ("fsdp", {}, (4.1, 16.5)),  # 4.0, 16.0
    "fsdp owner, chunks of two": ("fsdp", {"chunk_bytes": 2 * 128 * 128 * 4}, (4.1, 11.5)),  # 4.0, 11.0
    "fsdp gathered": ("fsdp", {"foreach": False}, (4.1, 8.5)),  # 4.0, 8.0
}


def scenario_dist_memory():
    """The distributed step's memory (the counting mode of bench/optimizer/memory.py, per local
    parameter): the state alone between steps (FSDP2: each rank its shard), and the step peaks of
    DIST_MEMORY; every way computes the same bits."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from bench.optimizer.memory import count_step_memory
    from muon import Muon

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    stepped = {}
    for name, (kind, kw, (kept_max, peak_max)) in DIST_MEMORY.items():
        gen = torch.Generator().manual_seed(0)
        params = []
        for _ in range(16):
            w, g = torch.randn(128, 128, generator=gen), torch.randn(128, 128, generator=gen)
            if kind == "fsdp":
                w, g = distribute_tensor(w, mesh, [Shard(0)]), distribute_tensor(g, mesh, [Shard(0)])
            p = nn.Parameter(w)
            p.grad = g
            params.append(p)
        n = sum((p.to_local() if kind == "fsdp" else p).numel() for p in params)
        got = count_step_memory(lambda params=params, kw=kw: Muon(params, lr=0.02, **kw))
        kept, peak = got["resident"] / n, got["step_peak"] / n
        # the momentum (FSDP2: its shard) and an int64 skip counter per parameter
        assert got["state"] == 4 * n + 8 * len(params), f"{name}: state {got['state'] / n} B per local parameter"
        assert kept <= kept_max and peak <= peak_max, f"{name}: kept {kept:.3f}, step peak {peak:.3f} B/param"
        stepped[name] = [full(p) for p in params]
    first, *others = stepped.values()
    for name, values in zip(list(stepped)[1:], others, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(first, values, strict=True)), f"{name} differs from DDP"


def scenario_empty_expert_shard():
    """Two expert stacks of one matrix shape sharded on the expert dim: A (1 expert) leaves rank 1 an
    empty shard, B (4) gives each rank 2, so rank 1's bucket has as many matrices as members. A NaN
    in B's gradient on rank 1's shard skips B on every rank, on the owner plan and under foreach=False,
    bit for bit what one process computes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from muon import Muon

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    solo = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    shapes = {"A": (1, 4, 8), "B": (4, 4, 8)}
    for foreach in (None, False):
        gen = torch.Generator().manual_seed(0)
        values = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        sharded = {k: nn.Parameter(distribute_tensor(v.clone(), mesh, [Shard(0)])) for k, v in values.items()}
        plain = {k: nn.Parameter(v.clone()) for k, v in values.items()}
        opt = Muon(list(sharded.values()), lr=0.02, foreach=foreach)
        ref = Muon(list(plain.values()), lr=0.02, process_group=solo)
        for step in range(3):
            g = torch.Generator().manual_seed(100 + step)
            grads = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
            if step == 1:
                grads["B"][2, 0, 0] = float("nan")  # expert 2 of B: rank 1's shard
            for k, G in grads.items():
                sharded[k].grad = distribute_tensor(G.clone(), mesh, [Shard(0)])
                plain[k].grad = G.clone()
            opt.step()
            ref.step()
            for k in shapes:
                assert torch.equal(full(sharded[k]), plain[k].detach()), f"foreach={foreach}, step {step}: {k} differs"
        assert [int(opt.state[sharded[k]]["nonfinite_skips"]) for k in shapes] == [0, 1]


SCENARIOS = {
    "ddp_matches_single": scenario_matches_single("ddp"),
    "fsdp_matches_single": scenario_matches_single("fsdp"),
    "ddp_more_ranks_than_matrices": scenario_more_ranks_than_matrices("ddp"),
    "fsdp_more_ranks_than_matrices": scenario_more_ranks_than_matrices("fsdp"),
    "fsdp_dim1_matches_single": scenario_more_ranks_than_matrices("fsdp_dim1"),
    "ddp_comm_bytes": scenario_comm_bytes("ddp"),
    "fsdp_comm_bytes": scenario_comm_bytes("fsdp"),
    "fsdp_nonfinite_agreed": scenario_nonfinite_fsdp,
    "fsdp_checkpoint_dcp": scenario_checkpoint_dcp(),
    "fsdp_checkpoint_dcp_int8": scenario_checkpoint_dcp(torch.int8),
    "fsdp_checkpoint_full_rank0": scenario_checkpoint_full_fsdp,
    "ddp_checkpoint_plain": scenario_checkpoint_plain_ddp,
    "ddp_nonfinite_agreed": scenario_nonfinite_ddp(None),
    "ddp_loop_nonfinite_agreed": scenario_nonfinite_ddp(False),
    "ddp_row_blocks_gram_matches_single": scenario_ddp_row_blocks(),
    "ddp_normuon_cautious_matches_single": scenario_ddp_normuon_cautious(),
    "fsdp_step_on_the_plan": scenario_fsdp_on_plan,
    "fsdp_plan_equals_loop": scenario_fsdp_plan_equals_loop,
    "ddp_transposed_matches_single": scenario_ddp_transposed(),
    "ddp_state_dtype_matches_single": scenario_ddp_state_dtype(),
    "fsdp_state_dtype_plan_loop_single": scenario_fsdp_state_dtype(),
    "fsdp_transposed_refused": scenario_fsdp_transposed_refused,
    "memory_per_local_parameter": scenario_dist_memory,
    "fsdp_empty_expert_shard_nan_skipped": scenario_empty_expert_shard,
}
_OUTDIR = ""


def run_scenarios(rank: int, world: int, port: int, outdir: str, names: list[str]) -> None:
    global _OUTDIR
    _OUTDIR = outdir
    dist_harness.run_scenarios(SCENARIOS, rank, world, port, outdir, names, timeout_s=30)


def failing_rank(rank: int, world: int, port: int, outdir: str) -> None:
    """Rank 1 raises before its step and lingers (as a rank unwinding an exception does); rank 0,
    inside the optimizer's collectives, must end with a clear error at the collective timeout.
    Set-up and the good step run under a generous timeout (a loaded machine's skew between ranks
    must not fail them); the short one is set only once both ranks are past them."""
    init_gloo(rank, world, port, timeout_s=30)
    model, _ = build(Net, "ddp")
    opt = make_optimizer(model)
    train(model, opt, 16, 20, 1)  # one good step: the failure hits the step's own collectives
    dist.barrier()
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=3))
    x, y = batch(1, rank, 16, 20)
    start = time.monotonic()
    try:
        loss_fn(model, x, y).backward()
        if rank == 1:
            raise ValueError("injected failure on rank 1")
        opt.step()
        message = "stepped"
    except Exception as exc:
        message = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    write_rank(outdir, rank, {"message": message, "seconds": time.monotonic() - start})
    if rank == 1:  # stay alive until rank 0 gave up: only the collective timeout can end its wait
        end = time.monotonic() + 20
        while not os.path.exists(os.path.join(outdir, "rank0.json")) and time.monotonic() < end:
            time.sleep(0.1)
    os._exit(1)  # a failed rank: no orderly shutdown of the process group


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's values of a parameter (its shard for a DTensor): read without a collective."""
    from torch.distributed.tensor import DTensor

    return (p.to_local() if isinstance(p, DTensor) else p).detach()


def _gradient_missing_on_rank_1(rank: int, world: int, port: int, kind: str):
    """(model, optimizer) of a `kind` job after two good steps and a backward in which rank 1 dropped
    fc3's gradient: the next step must raise on every rank."""
    init_gloo(rank, world, port, timeout_s=30)
    model, _ = build(Net, kind)
    opt = make_optimizer(model)
    train(model, opt, 16, 20, 2)
    x, y = batch(2, rank, 16, 20)
    loss_fn(model, x, y).backward()
    if rank == 1:
        (model.module if kind == "ddp" else model).fc3.weight.grad = None
    return model, opt


def gradient_missing_on_one_rank(rank: int, world: int, port: int, outdir: str, kind: str) -> None:
    """Rank 1 drops one gradient at step 2 (after two good steps): every rank must end the step with a
    DistributedStepError naming the cause, change nothing, and exit cleanly (no abort, no hang).
    The collective timeout only bounds a hang (the test's 60 s deadline catches one): generous, so
    that a loaded machine's start-up skew between ranks never times out the good steps. After the
    error the rank runs no collective of its own (the check reads local shards): it exits right
    after Muon's collectives, as a training script that crashes on the error does."""
    model, opt = _gradient_missing_on_rank_1(rank, world, port, kind)
    before = {n: _local(p).clone() for n, p in model.named_parameters()}
    start = time.monotonic()
    try:
        opt.step()
        message = "stepped"
    except Exception as exc:
        message = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    seconds = time.monotonic() - start
    unchanged = all(torch.equal(_local(p), before[n]) for n, p in model.named_parameters())
    write_rank(outdir, rank, {"message": message, "seconds": seconds, "unchanged": unchanged})
    dist.destroy_process_group()


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "all_to_all_single")


@contextlib.contextmanager
def backend_references(log: list):
    """Within the block, every torch.distributed collective appends (tensor, use count before the
    collective) to `log` for each tensor it is given."""
    import torch.distributed.distributed_c10d as c10d

    def tensors(args) -> list:
        out = []
        for a in args:
            if isinstance(a, torch.Tensor):
                out.append(a)
            elif isinstance(a, (list, tuple)):
                out.extend(tensors(a))
        return out

    def wrap(fn):
        def recorded(*args, **kwargs):
            log.extend((t, t._use_count()) for t in tensors([*args, *kwargs.values()]))
            return fn(*args, **kwargs)

        return recorded

    saved = []
    for module in (dist, c10d):  # torch.distributed re-exports distributed_c10d's functions
        for name in _COLLECTIVES:
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, wrap(getattr(module, name)))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def collectives_finished_when_step_raises(rank: int, world: int, port: int, outdir: str, kind: str,
                                          repeats: int = 40) -> None:  # fmt: skip
    """The missing-gradient error of `gradient_missing_on_one_rank`, `repeats` times: each time the
    step raises, the backend (gloo's worker threads) must hold no reference left to a tensor of
    the step's collectives. A worker that still holds one releases it later, taking the GIL: if the
    process is exiting by then (as it does after such an error), the worker thread is ended inside
    a C++ destructor and the process aborts ("terminate called without an active exception"). The
    check runs right after the step raised, before this rank blocks or sleeps: the moment a
    crashing script would start its exit. A worker holds on after its caller in a fraction of
    collectives only, hence the repeats (each step with the error takes milliseconds)."""
    model, opt = _gradient_missing_on_rank_1(rank, world, port, kind)
    messages, held, tracked = set(), [], 0
    for i in range(repeats):
        log: list = []
        with backend_references(log):
            try:
                opt.step()
                message = "stepped"
            except Exception as exc:
                message = f"{type(exc).__module__}.{type(exc).__name__}"
            still = [(tuple(t.shape), t.dtype, t._use_count(), count) for t, count in log if t._use_count() > count]
        tracked += len(log)
        messages.add(message)
        if still:
            held.append(f"step {i}: {len(still)} of {len(log)} tensors still held by the backend "
                        f"(shape, dtype, use count, before): {still}")  # fmt: skip
        del log
        time.sleep(0.01)  # lets a held reference go before the next step
    write_rank(outdir, rank, {"messages": sorted(messages), "held": held, "tracked": tracked})
    dist.destroy_process_group()
