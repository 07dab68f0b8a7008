"""muon.Muon against torch.optim.Muon, torch.optim.AdamW and a float64 reference."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import run_history
from nsref import rel_err

import muon

SHAPES = [(32, 64), (64, 32), (17, 17), (1, 9), (9, 1)]
CONFIGS = [
    {},
    {"nesterov": False},
    {"weight_decay": 0.0, "momentum": 0.9},
    {"adjust_lr_fn": "original", "lr": 0.02},
    {"adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.05},
    {"ns_steps": 3, "ns_coefficients": (3.0, -3.2, 1.2), "eps": 1e-5},
]


def _grads(shapes, steps, dtype=torch.float32):
    return [[torch.randn(s, dtype=dtype) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_parity_with_torch_muon(config):
    """Momentum buffers equal torch's bit for bit; parameters are as close to the float64 reference as torch's."""
    params = [torch.randn(s) for s in SHAPES]
    grads = _grads(SHAPES, 5)
    theirs, _, their_hist = run_history(torch.optim.Muon, params, grads, **config)
    ours, _, our_hist = run_history(muon.Muon, params, grads, **config)
    _, _, ref_hist = run_history(
        muon.Muon, [p.double() for p in params], [[g.double() for g in gs] for gs in grads],
        ns_dtype=torch.float64, **config,
    )
    for step, (mine, yours, ref) in enumerate(zip(our_hist, their_hist, ref_hist)):
        for p0, a, b, r in zip(params, mine, yours, ref):
            moved = rel_err(b, p0) + 1e-12  # how far the parameter moved, relative
            # Our error against float64, relative to the update size, within 2x torch's own + 2 bf16 eps:
            # on 1×n vectors NS rounds a handful of numbers, both errors are 0.4–2.5 % over 10 seeds and
            # their ratio is luck (measured up to 3.6x); a wrong scale or momentum is off by 5 % or more.
            ours_err, torch_err = rel_err(a, r) / moved, rel_err(b, r) / moved
            bound = 2 * torch_err + 2 * torch.finfo(torch.bfloat16).eps
            assert ours_err <= bound, (step, p0.shape, ours_err, torch_err)
    for p_ours, p_theirs in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"]):
        assert torch.equal(ours.state[p_ours]["momentum_buffer"], theirs.state[p_theirs]["momentum_buffer"])


def test_tensor_lr_matches_float_lr():
    params = [torch.randn(s) for s in SHAPES]
    grads = _grads(SHAPES, 3)
    _, _, with_float = run_history(muon.Muon, params, grads, lr=0.01)
    _, _, with_tensor = run_history(muon.Muon, params, grads, lr=torch.tensor(0.01))
    for a_list, b_list in zip(with_float, with_tensor):
        for a, b in zip(a_list, b_list):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="one element"):
        muon.Muon([torch.randn(3, 3, requires_grad=True)], lr=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamw_groups_match_torch_adamw(dtype):
    shapes = [(7,), (5, 3), (4, 2, 3), ()]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = _grads(shapes, 8, dtype)
    hyper = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05}

    def ours_cls(ps, **kw):
        return muon.Muon([{"params": ps, "use_muon": False, **kw}])

    _, _, theirs = run_history(torch.optim.AdamW, params, grads, **hyper)
    _, _, mine = run_history(ours_cls, params, grads, **hyper)
    tol = {torch.float32: dict(rtol=2e-6, atol=2e-7), torch.float64: dict(rtol=1e-13, atol=1e-15)}[dtype]
    for a_list, b_list in zip(mine, theirs):
        for a, b in zip(a_list, b_list):
            torch.testing.assert_close(a, b, **tol)


def test_adamw_group_defaults():
    p = torch.randn(4, requires_grad=True)
    opt = muon.Muon([{"params": [p], "use_muon": False}], lr=0.1, weight_decay=0.2, betas=(0.5, 0.6), adamw_eps=1e-5)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.1, (0.5, 0.6), 1e-5, 0.2)


def test_hybrid_optimizer_equals_separate_optimizers():
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.LayerNorm(24), torch.nn.Linear(24, 6))
    twin = copy.deepcopy(model)
    opt = muon.Muon(muon.param_groups(model, muon=["2.weight"], adamw_options={"lr": 1e-3}), lr=0.02)
    matrices = [model[0].weight, model[2].weight]
    assert [g["params"] for g in opt.param_groups if g["use_muon"]] == [matrices]
    twin_matrices = [twin[0].weight, twin[2].weight]
    twin_rest = [p for p in twin.parameters() if p.ndim < 2]
    ref_muon = muon.Muon(twin_matrices, lr=0.02)
    ref_adamw = torch.optim.AdamW(twin_rest, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(4):
        x = torch.randn(8, 12)
        for m in (model, twin):
            m.zero_grad()
            m(x).square().mean().backward()
        opt.step()
        ref_muon.step()
        ref_adamw.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)


def test_batched_equals_per_parameter():
    shapes = [(16, 24)] * 3 + [(24, 16)] * 2 + [(8, 8)]
    params = [torch.randn(s) for s in shapes]
    grads = _grads(shapes, 3)
    _, _, batched = run_history(muon.Muon, params, grads, batched=True)
    _, _, looped = run_history(muon.Muon, params, grads, batched=False)
    for a_list, b_list in zip(batched, looped):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)


def test_3d_parameter_is_a_batch_of_matrices():
    experts = torch.randn(4, 12, 20)
    grads = _grads([(4, 12, 20)], 3)
    _, (stacked,), _ = run_history(muon.Muon, [experts], grads, adjust_lr_fn="match_rms_adamw")
    singles = [e.clone() for e in experts]
    per_expert = [[g[0][i] for i in range(4)] for g in grads]
    _, separate, _ = run_history(muon.Muon, singles, per_expert, adjust_lr_fn="match_rms_adamw")
    for i in range(4):
        assert torch.equal(stacked[i], separate[i])


def test_flatten_treats_conv_weight_as_one_matrix():
    weight = torch.randn(8, 3, 3, 3)
    grads = _grads([(8, 3, 3, 3)], 3)
    _, (conv,), _ = run_history(muon.Muon, [weight], grads, flatten=True)
    _, (flat,), _ = run_history(muon.Muon, [weight.reshape(8, 27)], [[g[0].reshape(8, 27)] for g in grads])
    assert torch.equal(conv.reshape(8, 27), flat)


@pytest.mark.parametrize("adjust, expected", [("original", 2.0), ("match_rms_adamw", 0.2 * 8), ("spectral", 2.0)])
def test_update_scale(adjust, expected):
    """One step from zero momentum and no weight decay moves W by exactly -lr·s(m, n)·NS(G)."""
    W = torch.randn(64, 16)
    G = torch.randn(64, 16)
    _, (after,), _ = run_history(muon.Muon, [W], [[G]], lr=0.1, weight_decay=0.0, nesterov=False, adjust_lr_fn=adjust)
    O = muon.newton_schulz(0.05 * G)  # momentum buffer after one lerp step: (1 - 0.95)·G
    torch.testing.assert_close(after, W - 0.1 * expected * O.float(), rtol=0, atol=1e-6)
    assert muon.update_scale("spectral", 16, 64) == 0.5
    assert muon.update_scale(lambda m, n: m + n, 3, 4) == 7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_parameters(dtype):
    """Parameters of any float dtype: within that dtype's rounding of the float64 run."""
    shapes = [(24, 40), (40, 24)]
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = _grads(shapes, 4)
    opt, mine, _ = run_history(muon.Muon, params, grads, lr=0.02)
    _, ref, _ = run_history(muon.Muon, [p.double() for p in params], [[g.double() for g in gs] for gs in grads],
                     lr=0.02, ns_dtype=torch.float64)
    for a, r, p0 in zip(mine, ref, params):
        assert a.dtype == dtype and torch.isfinite(a).all()
        moved = (r - p0.double()).norm()
        # bf16 NS error (~1.5e-2 of the update) plus one rounding of the parameter to `dtype` per step.
        bound = 0.05 * moved + 4 * torch.finfo(dtype).eps * r.norm()
        assert (a.double() - r).norm() <= bound
    for state in opt.state.values():
        assert state["momentum_buffer"].dtype == dtype


def test_weight_decay_survives_bf16_parameters():
    """lr·wd = 2e-5: applied in fp32, not rounded away as bf16(1 - 2e-5) == 1 would."""
    W = torch.full((8, 8), 256.0, dtype=torch.bfloat16)
    opt, (after,), _ = run_history(muon.Muon, [W], [[torch.zeros(8, 8)]], lr=1e-3, weight_decay=0.02)
    assert torch.equal(after, torch.full((8, 8), 256.0, dtype=torch.bfloat16))  # 256·2e-5 < half a bf16 ulp
    W = torch.full((8, 8), 1.0)
    opt, (after,), _ = run_history(muon.Muon, [W], [[torch.zeros(8, 8)]], lr=1e-3, weight_decay=0.02)
    torch.testing.assert_close(after, torch.full((8, 8), 1 - 2e-5), rtol=0, atol=1e-7)


def test_state_dict_resume_is_bit_exact():
    def build():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Embedding(10, 16), torch.nn.Linear(16, 16), torch.nn.LayerNorm(16),
                                    torch.nn.Linear(16, 10))
        return model, muon.Muon(muon.param_groups(model, adamw=["3.weight"]), lr=0.02)

    def train(model, opt, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = torch.randint(0, 10, (4, 5), generator=gen)
            opt.zero_grad()
            model(x).logsumexp(-1).mean().backward()
            opt.step()

    model, opt = build()
    train(model, opt, 3, seed=0)
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)
    train(model, opt, 3, seed=1)

    blob.seek(0)
    saved = torch.load(blob)
    resumed_model, resumed_opt = build()
    resumed_model.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed_model, resumed_opt, 3, seed=1)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for pa, pb in zip(model.parameters(), resumed_model.parameters()):
        for key, value in opt.state[pa].items():
            assert torch.equal(value, resumed_opt.state[pb][key]), key


def test_loads_a_torch_muon_state_dict():
    params = [torch.randn(s) for s in SHAPES]
    grads = _grads(SHAPES, 4)
    theirs, their_params, _ = run_history(torch.optim.Muon, params, grads[:2])
    mine_params = [p.detach().clone().requires_grad_(True) for p in their_params]
    loaded_at = [p.detach().clone() for p in their_params]
    mine = muon.Muon(mine_params)
    mine.load_state_dict(copy.deepcopy(theirs.state_dict()))  # as through torch.save; no aliasing
    for grads_t in grads[2:]:
        for p, q, g in zip(their_params, mine_params, grads_t):
            p.grad, q.grad = g.clone(), g.clone()
        theirs.step()
        mine.step()
    for p, q, p0 in zip(their_params, mine_params, loaded_at):
        assert torch.equal(theirs.state[p]["momentum_buffer"], mine.state[q]["momentum_buffer"])
        # Both took the same two steps from the loaded state; they differ by bf16 NS rounding only.
        assert (p - q).norm() <= 0.05 * (p - p0).norm()


def test_lr_scheduler_drives_the_step():
    W = torch.randn(16, 16)
    G = torch.randn(16, 16)

    def with_scheduler(opt, params):
        sched.step()

    params = [W.clone().requires_grad_(True)]
    opt = muon.Muon(params, lr=0.1, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    moves = []
    for _ in range(3):
        before = params[0].detach().clone()
        params[0].grad = G.clone()
        opt.step()
        sched.step()
        moves.append((params[0] - before).norm().item())
    # Same gradient every step: the momentum direction is constant, so each move is lr·|NS(G)|.
    assert moves[1] == pytest.approx(moves[0] / 2, rel=1e-2)
    assert moves[2] == pytest.approx(moves[0] / 4, rel=1e-2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_skips_that_parameter(bad):
    shapes = [(8, 12), (12, 8), (5,)]
    params = [torch.randn(s).requires_grad_(True) for s in shapes]
    groups = [{"params": params[:2]}, {"params": params[2:], "use_muon": False}]
    opt = muon.Muon(groups, lr=0.02)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    for p in params:
        p.grad = torch.randn(p.shape)
    params[0].grad[3, 4] = bad
    params[2].grad[1] = bad
    opt.step()
    assert torch.equal(params[0], before[0]) and torch.equal(params[2], before[2])
    assert not torch.equal(params[1], before[1])
    state_after = opt.state_dict()["state"]
    for index in (0, 2):
        for key, value in state_before[index].items():
            if key != "nonfinite_skips":
                assert torch.equal(state_after[index][key], value), key
        assert state_after[index]["nonfinite_skips"].item() == 1
    assert state_after[1]["nonfinite_skips"].item() == 0
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert all(torch.isfinite(v).all() for s in opt.state_dict()["state"].values() for v in s.values())


def test_nonfinite_skip_on_first_step_keeps_adamw_finite():
    p = torch.randn(6, requires_grad=True)
    opt = muon.Muon([{"params": [p], "use_muon": False}])
    before = p.detach().clone()
    p.grad = torch.full((6,), float("nan"))
    opt.step()
    assert torch.equal(p, before) and opt.state[p]["step"].item() == 0
    p.grad = torch.ones(6)
    opt.step()
    assert torch.isfinite(p).all() and opt.state[p]["step"].item() == 1


def test_nonfinite_raise_policy_names_parameter_and_changes_nothing():
    params = [torch.randn(4, 4).requires_grad_(True) for _ in range(2)]
    opt = muon.Muon(params, nonfinite="raise")
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.randn(4, 4)
    params[1].grad = torch.randn(4, 4)
    params[1].grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_zero_size_and_noncontiguous_parameters():
    base = torch.randn(12, 20)
    view_param = torch.nn.Parameter(base.t())  # non-contiguous (20, 12)
    dense_param = torch.nn.Parameter(base.t().contiguous())
    empty = torch.nn.Parameter(torch.randn(0, 5))
    G = torch.randn(20, 12)
    opt = muon.Muon([view_param, empty, dense_param])
    view_param.grad, dense_param.grad = G.t().contiguous().t(), G.clone()
    empty.grad = torch.zeros(0, 5)
    opt.step()
    assert torch.equal(view_param, dense_param)
    assert empty.shape == (0, 5)


def test_closure_is_called_with_grad_enabled():
    W = torch.randn(4, 4, requires_grad=True)
    opt = muon.Muon([W])

    def closure():
        opt.zero_grad()
        loss = (W**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() > 0


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: muon.Muon([torch.randn(5, requires_grad=True)]), ValueError, r"shape \(5,\).*param_groups"),
        (lambda: muon.Muon([torch.randn((), requires_grad=True)]), ValueError, "0-D"),
        (lambda: muon.Muon([torch.randn(3, 3, dtype=torch.complex64, requires_grad=True)]), ValueError, "complex"),
        (lambda: muon.Muon([torch.randn(3, 3)], lr=-1.0), ValueError, "lr"),
        (lambda: muon.Muon([torch.randn(3, 3)], momentum=1.0), ValueError, "momentum"),
        (lambda: muon.Muon([torch.randn(3, 3)], weight_decay=-0.1), ValueError, "weight_decay"),
        (lambda: muon.Muon([torch.randn(3, 3)], adjust_lr_fn="sqrt"), ValueError, "adjust_lr_fn"),
        (lambda: muon.Muon([torch.randn(3, 3)], ns_coefficients="fast"), ValueError, "preset"),
        (lambda: muon.Muon([torch.randn(3, 3)], ns_steps=100), ValueError, "steps"),
        (lambda: muon.Muon([torch.randn(3, 3)], nonfinite="zero"), ValueError, "nonfinite"),
        (lambda: muon.Muon([torch.randn(3, 3)], ns_dtype=torch.int8), ValueError, "ns_dtype"),
        (
            lambda: muon.Muon([{"params": [torch.randn(3)], "use_muon": False, "betas": (1.0, 0.9)}]),
            ValueError,
            "betas",
        ),
    ],
)
def test_bad_construction_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_sparse_gradient_raises_naming_parameter():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    W = torch.randn(4, 4, requires_grad=True)
    opt = muon.Muon([{"params": [W]}, {"params": list(emb.parameters()), "use_muon": False}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[0\].*sparse"):
        opt.step()


def test_torch_backend_is_selectable_and_unknown_backend_is_clear():
    W = torch.randn(6, 6, requires_grad=True)
    W.grad = torch.randn(6, 6)
    muon.Muon([W], backend="torch").step()
    with pytest.raises(ValueError, match=r"param_groups\[0\].*unknown backend"):
        muon.Muon([W], backend="nope")


@pytest.mark.parametrize("backend", ["nope", "cuda"])
def test_unusable_backend_is_an_error_at_construction(backend):
    """Unknown, or unable to run on the parameters' device (CUDA kernels for CPU tensors): a
    ValueError naming the group when the optimizer or the group is made, before any state exists."""
    W, V = torch.randn(6, 6, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"param_groups\[1\]"):
        muon.Muon([{"params": [W]}, {"params": [V], "backend": backend}])
    opt = muon.Muon([W])
    with pytest.raises(ValueError, match=r"param_groups\[1\]"):
        opt.add_param_group({"params": [V], "backend": backend})
    assert len(opt.param_groups) == 1 and not opt.state
