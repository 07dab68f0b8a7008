"""The planned, batched step (muon.engine) against the per-parameter reference loop
(`helpers.ReferenceMuon`; foreach=False is the plan in its smallest chunks)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import STEP_PATHS, ReferenceMuon, assert_same, gpt_like, make_muon, option_sets, set_grads
from helpers import params_of as _params

import muon
from muon.profiling import count_dispatched_ops


def _groups(seed=0):
    """Several groups covering what the plan must handle: same-shape and transposed-shape sharing,
    3-D expert stacks, flatten=True conv weights (unbatched), bf16 parameters with a tensor lr,
    AdamW in fp32 and bf16; row blocks (split/heads: equal blocks stacked as the parameter, unequal
    and tall blocks with a mirrored momentum buffer, on 3-D, flattened and bf16 parameters) and
    Gram NS ("gram", and "auto" resolving to it). Row-block groups stay plain Muon (NorMuon does not
    combine with split/heads), whatever variant the optimizer's default is."""
    gen = torch.Generator().manual_seed(seed)

    def t(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype).requires_grad_(True)

    return [
        {"params": [t(16, 24), t(24, 16), t(16, 24), t(3, 12, 20), t(20, 12), t(9, 9)]},
        {"params": [t(8, 3, 3, 3), t(30, 2, 2, 2)], "flatten": True, "nesterov": False,
         "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0, "batched": False},
        {"params": [t(16, 24, dtype=torch.bfloat16), t(24, 16, dtype=torch.bfloat16)], "lr": torch.tensor(0.05)},
        {"params": [t(7), t(5, 3), t(4)], "use_muon": False},
        {"params": [t(9, dtype=torch.bfloat16), t(2, 3, dtype=torch.bfloat16)], "use_muon": False, "lr": 3e-3},
        {"params": [t(12, 8), t(12, 8)], "split": [4, 4, 4], "variant": "muon"},
        {"params": [t(20, 6), t(2, 20, 6)], "split": [12, 4, 4], "adjust_lr_fn": "match_rms_adamw", "variant": "muon"},
        # the 64×2 weight's tall 16×2 blocks share a bucket with the 8×16 weight's stacked 2×16 blocks
        {"params": [t(8, 16), t(16, 16), t(64, 2)], "heads": 4, "ns_algorithm": "gram", "variant": "muon"},
        {"params": [t(8, 2, 2, 2)], "flatten": True, "heads": 2, "batched": False, "ns_algorithm": "auto",
         "ns_dtype": torch.bfloat16, "variant": "muon"},
        {"params": [t(10, 8, dtype=torch.bfloat16), t(10, 8, dtype=torch.bfloat16)], "split": [6, 4],
         "variant": "muon"},
    ]  # fmt: skip


def _set_grads(opt, step, bad=(), missing=()):
    set_grads(_params(opt), 100 + step, bad, missing)


# step -> (indices of parameters with a NaN/inf gradient, indices without a gradient)
SCHEDULE = {0: ((), ()), 1: ((1, 6, 9, 17, 21), ()), 2: ((), (3, 10, 19)), 3: ((0, 8, 12, 23), ()), 4: ((), ())}


# Options that change the apply phase: helpers.OPTION_SETS (NorMuon on mixed (m, n)/(n, m) buckets
# too, cautious weight decay on Muon and AdamW groups, NS in bf16).
@option_sets()
def test_planned_step_equals_reference_loop_bit_for_bit(options):
    fast = muon.Muon(_groups(), lr=0.02, foreach=True, **options)
    small = muon.Muon(_groups(), lr=0.02, foreach=False, **options)  # the same plan in its smallest chunks
    # every smallest chunk a bucket committed at once, its parameters updated member by member
    eager = muon.Muon(_groups(), lr=0.02, foreach=False, atomic=False, **options)
    loop = ReferenceMuon(_groups(), lr=0.02, **options)
    for step, (bad, missing) in SCHEDULE.items():
        for opt in (fast, small, eager, loop):
            _set_grads(opt, step, bad, missing)
            opt.step()
        assert_same(fast, loop)
        assert_same(small, loop)
        assert_same(eager, loop)
    assert small._plan is not None and any(len(b.chunks) > 1 for g in small._plan.groups for b in g.buckets)
    skips = [fast.state[p]["nonfinite_skips"].item() for p in _params(fast)]
    assert skips == [1 if j in (0, 1, 6, 8, 9, 12, 17, 21, 23) else 0 for j in range(len(skips))]
    algorithms = {g.index: sorted(b.algorithm for b in g.buckets) for g in fast._plan.groups if g.use_muon}
    assert algorithms[7] == ["gram", "gram"] and algorithms[8] == ["gram"]  # bf16 4×8 blocks: auto picks Gram
    (mixed,) = [b for b in fast._plan.groups[7].buckets if b.shape[-2:] == (2, 16)]
    assert mixed.split and {mb.row for mb in mixed.members} == {None, 0, 16, 32, 48}


@option_sets()
def test_switching_paths_and_resuming_keeps_the_same_bits(options):
    """State made by one path is picked up by the other (and adopted into a new plan's stacks)."""
    ref = ReferenceMuon(_groups(), lr=0.02, **options)
    mixed = muon.Muon(_groups(), lr=0.02, **options)
    for step, (bad, missing) in SCHEDULE.items():
        mixed.foreach = step % 2 == 0
        for opt in (ref, mixed):
            _set_grads(opt, step, bad, missing)
            opt.step()
        if step == 2:  # a fresh optimizer from the state dict: state tensors are new, plan adopts them
            fresh = muon.Muon([{**g, "params": g["params"]} for g in _groups()], lr=0.02, **options)
            with torch.no_grad():
                for p, q in zip(_params(fresh), _params(mixed)):
                    p.copy_(q)
            fresh.load_state_dict(copy.deepcopy(mixed.state_dict()))
            mixed = fresh
    assert_same(ref, mixed)


@STEP_PATHS
def test_raise_in_a_later_group_changes_no_group(foreach):
    """nonfinite="raise": a NaN in group 1 raises before group 0 (or any state) changed; a retry with
    fixed gradients gives exactly the step of an optimizer that never saw the NaN."""
    opt = make_muon(_groups(), lr=0.02, nonfinite="raise", foreach=foreach)
    twin = make_muon(_groups(), lr=0.02, nonfinite="raise", foreach=foreach)
    for o in (opt, twin):
        _set_grads(o, 0)
        o.step()
    before = copy.deepcopy(opt.state_dict())
    params_before = [p.detach().clone() for p in _params(opt)]
    _set_grads(opt, 1, bad=(6,))  # group 1's first parameter
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    for p, q in zip(_params(opt), params_before):
        assert torch.equal(p, q)
    after = opt.state_dict()
    for k, s in before["state"].items():
        for key, value in s.items():
            assert torch.equal(after["state"][k][key], value), (k, key)
    for o in (opt, twin):
        _set_grads(o, 1)
        o.step()
    assert_same(opt, twin)


def test_raise_mode_adamw_uses_fused_kernel_and_matches_torch():
    """With every gradient checked up front, AdamW groups go through torch._fused_adamw_."""
    shapes = [(7,), (5, 3), ()]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in shapes]
    ours = [p.clone().requires_grad_(True) for p in params]
    theirs = [p.clone().requires_grad_(True) for p in params]
    hyper = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05}
    opt = muon.Muon([{"params": ours, "use_muon": False, **hyper}], nonfinite="raise")
    ref = torch.optim.AdamW(theirs, **hyper, fused=True)
    for _ in range(4):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        with count_dispatched_ops() as ops:
            opt.step()
        ref.step()
        assert ops["aten._fused_adamw_.default"] + ops["aten._fused_adamw_.tensor_lr"] == 1
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


def _ops_per_step(layers: int, foreach, **options) -> int:
    torch.manual_seed(0)
    mats, rest = gpt_like(layers)
    opt = make_muon([{"params": mats}, {"params": rest, "use_muon": False}], backend="torch", foreach=foreach,
                    **options)
    for p in mats + rest:
        p.grad = torch.randn_like(p)
    opt.step()  # builds the plan
    with count_dispatched_ops() as ops:
        opt.step()
    return ops.total


def test_host_cost_grows_with_buckets_not_parameters():
    """Dispatched aten ops per steady-state step (each is at least one launch on a GPU)."""
    counts = {layers: _ops_per_step(layers, foreach=True) for layers in (8, 12, 32)}
    # 284 (312 at a001975, 223 when the plan kept private stacks, 387 at the lean step's first version: the step checks
    # that the state still holds its packed stacks, stacks its own temporaries, and advances the
    # momentum and moments in place at the commit)
    assert counts[12] <= 330, counts
    assert counts[32] < 1.15 * counts[8], counts
    assert _ops_per_step(8, foreach="reference") > 5 * counts[8]  # the per-parameter loop, for scale
    options = {"variant": "normuon", "cautious_weight_decay": True}
    extra = {layers: _ops_per_step(layers, foreach=True, **options) for layers in (8, 32)}
    assert extra[32] < 1.15 * extra[8], extra


def test_plan_is_built_once_and_rebuilt_when_the_parameter_set_changes():
    opt = muon.Muon(_groups(), lr=0.02)
    _set_grads(opt, 0)
    opt.step()
    plan = opt._plan
    _set_grads(opt, 1)
    opt.step()
    assert opt._plan is plan
    _set_grads(opt, 2, missing=(2,))
    opt.step()
    assert opt._plan is not plan
    # the momentum of a bucket's parameters is packed: the state holds views of one stack (its only
    # storage; tests/test_state.py holds that nothing else is kept)
    p = _params(opt)[0]
    assert opt.state[p]["momentum_buffer"]._base is not None


def test_state_dict_loads_into_torch_muon_and_back():
    gen = torch.Generator().manual_seed(3)
    shapes = [(16, 24), (24, 16), (8, 8)]
    ours = [torch.randn(s, generator=gen).requires_grad_(True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    opt = muon.Muon(ours, lr=0.02)
    for p in ours:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    ref = torch.optim.Muon(theirs, lr=0.02)
    with torch.no_grad():
        for p, q in zip(theirs, ours):
            p.copy_(q)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(ours, theirs):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])


def test_ns_dtype_auto_follows_the_device_and_explicit_is_honoured():
    W = torch.randn(8, 16, requires_grad=True)
    opt = muon.Muon([W])
    assert opt.param_groups[0]["ns_dtype"] == "auto"
    W.grad = torch.randn(8, 16)
    opt.step()
    assert opt._plan.groups[0].buckets[0].ns_dtype == torch.float32  # CPU
    assert opt.state_dict()["param_groups"][0]["ns_dtype"] == "auto"
    V = torch.randn(8, 16, requires_grad=True)
    explicit = muon.Muon([V], ns_dtype=torch.bfloat16)
    V.grad = W.grad.clone()
    explicit.step()
    assert explicit._plan.groups[0].buckets[0].ns_dtype == torch.bfloat16
    assert explicit.state_dict()["param_groups"][0]["ns_dtype"] == "torch.bfloat16"
    G = torch.randn(8, 16)
    assert muon.newton_schulz(G).dtype == torch.float32
    torch.testing.assert_close(
        muon.newton_schulz(G), muon.newton_schulz(G, dtype=torch.float32), rtol=0, atol=0
    )


@pytest.mark.parametrize("options", [{}, {"variant": "normuon", "cautious_weight_decay": True}],
                         ids=["muon", "normuon+cautious"])
def test_compiled_step_has_no_graph_breaks(options):
    """torch.compile(opt.step, fullgraph=True): no host sync, no data-dependent Python in the step."""
    torch._dynamo.reset()
    groups = [
        {"params": [torch.randn(8, 12, requires_grad=True), torch.randn(12, 8, requires_grad=True)]},
        {"params": [torch.randn(5, requires_grad=True)], "use_muon": False},
    ]
    twin_groups = [{**g, "params": [p.detach().clone().requires_grad_(True) for p in g["params"]]} for g in groups]
    opt = muon.Muon(groups, lr=0.02, **options)
    twin = muon.Muon(twin_groups, lr=0.02, **options)
    compiled = torch.compile(opt.step, fullgraph=True, backend="eager")
    for step in (0, 1, 2):  # the first compiled step builds the plan too
        _set_grads(opt, step, bad=(1,) if step == 2 else ())
        _set_grads(twin, step, bad=(1,) if step == 2 else ())
        compiled()
        twin.step()
        assert_same(opt, twin)
    assert opt.state[groups[0]["params"][1]]["nonfinite_skips"].item() == 1
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_captures_the_whole_step():
    """The README's recipe: static gradient buffers, warm-up steps on a side stream, capture, replay."""
    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in [(64, 96), (96, 64), (64, 64)]]
    bias = torch.randn(64, device="cuda", requires_grad=True)
    twin = [p.detach().clone().requires_grad_(True) for p in params + [bias]]
    groups = [{"params": params}, {"params": [bias], "use_muon": False}]
    opt = muon.Muon(groups, lr=torch.tensor(0.02, device="cuda"))
    ref = muon.Muon([{"params": twin[:3]}, {"params": twin[3:], "use_muon": False}],
                    lr=torch.tensor(0.02, device="cuda"))  # fmt: skip
    for p, q in zip(params + [bias], twin):
        p.grad = torch.randn_like(p)  # static gradient buffers: backward writes into them
        q.grad = p.grad.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()  # warm-up (real steps): builds the plan, loads the kernels
            ref.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        for p, q in zip(params + [bias], twin):
            g = torch.randn_like(p)
            p.grad.copy_(g)
            q.grad = g.clone()
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params + [bias], twin):
        assert torch.equal(p, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("atomic", [True, False])
def test_parameters_on_several_devices_step_on_the_plan(atomic):
    """A group with parameters on the CPU and on the GPU runs the plan (a bucket per device, the finite
    flags copied to each bucket's device): bit for bit what one optimizer per device computes, a
    non-finite gradient skipped on either device."""

    def make(devices):
        gen = torch.Generator().manual_seed(0)
        mats = [torch.randn(s, generator=gen).to(d).requires_grad_(True)
                for s, d in zip([(16, 24), (24, 16), (16, 24), (12, 12)], devices, strict=True)]  # fmt: skip
        bias = [torch.randn(7, generator=gen).to(d).requires_grad_(True) for d in devices[:2]]
        return mats, bias

    devices = ["cpu", "cuda", "cuda", "cpu"]
    mats, bias = make(devices)
    mixed = muon.Muon([{"params": mats}, {"params": bias, "use_muon": False}], lr=0.02, atomic=atomic)
    twins, twin_bias = make(devices)
    per_device = [
        muon.Muon([{"params": [p for p, d in zip(twins, devices) if d == dev]},
                   {"params": [q for q, d in zip(twin_bias, devices[:2]) if d == dev], "use_muon": False}],
                  lr=0.02, atomic=atomic)
        for dev in ("cpu", "cuda")
    ]  # fmt: skip
    for step in range(3):
        gen = torch.Generator().manual_seed(100 + step)
        for p, q in zip(mats + bias, twins + twin_bias, strict=True):
            g = torch.randn(p.shape, generator=gen)
            if step == 1 and p is mats[1]:
                g[0, 0] = float("nan")  # the GPU parameter is skipped, the CPU ones step
            p.grad, q.grad = g.to(p.device), g.to(q.device)
        mixed.step()
        for opt in per_device:
            opt.step()
        for p, q in zip(mats + bias, twins + twin_bias, strict=True):
            assert torch.equal(p, q), p.shape
    assert mixed._plan is not None
    assert {b.device.type for g in mixed._plan.groups for b in g.buckets} == {"cpu", "cuda"}
    assert mixed.state[mats[1]]["nonfinite_skips"].item() == 1


@STEP_PATHS
def test_a_step_failing_in_a_later_group_changes_no_group(foreach):
    """A sparse gradient in group 1 is found before group 0 is touched (parameters and momentum)."""
    W = torch.randn(6, 8, requires_grad=True)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = make_muon([{"params": [W]}, {"params": list(emb.parameters()), "use_muon": False}], foreach=foreach)
    W.grad = torch.randn(6, 8)
    opt.step()
    before, momentum = W.detach().clone(), opt.state[W]["momentum_buffer"].clone()
    W.grad = torch.randn(6, 8)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[0\].*sparse"):
        opt.step()
    assert torch.equal(W, before) and torch.equal(opt.state[W]["momentum_buffer"], momentum)


def test_deepcopy_of_the_optimizer_steps_the_same():
    """A deep copy keeps the options (nonfinite, foreach) and rebuilds its own plan."""
    opt = muon.Muon(_groups(), lr=0.02, nonfinite="raise")
    _set_grads(opt, 0)
    opt.step()
    twin = copy.deepcopy(opt)
    assert twin.nonfinite == "raise" and twin._plan is None
    for o in (opt, twin):
        _set_grads(o, 1)
        o.step()
    assert_same(opt, twin)
    p = _params(twin)[0]
    assert twin.state[p]["momentum_buffer"].data_ptr() != opt.state[_params(opt)[0]]["momentum_buffer"].data_ptr()


def test_raise_policy_runs_the_same_adamw_kernel_on_both_paths():
    """Defect E: with nonfinite="raise" the planned step's AdamW groups took torch's fused kernel and
    the loop did not (1-2 ulp apart, 5e-7 after 50 steps); both now share `muon.functional`."""

    def make(foreach):
        gen = torch.Generator().manual_seed(3)
        w = [torch.randn(8, 12, generator=gen).requires_grad_(True)]
        rest = [torch.randn(s, generator=gen).requires_grad_(True) for s in [(12,), (5, 3), (40, 8)]]
        half = [torch.randn(6, generator=gen).to(torch.bfloat16).requires_grad_(True)]
        return make_muon([{"params": w}, {"params": rest, "use_muon": False},
                          {"params": half, "use_muon": False, "cautious_weight_decay": True}],
                         lr=0.01, backend="torch", nonfinite="raise", foreach=foreach)  # fmt: skip

    fast, ref = make(None), make("reference")
    for step in range(50):
        for opt in (fast, ref):
            set_grads(_params(opt), 500 + step)
            opt.step()
    assert_same(fast, ref)
