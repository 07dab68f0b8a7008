"""NorMuon (variant="normuon") and cautious weight decay against float64 hand-written references."""

from __future__ import annotations

import copy
import io

import docblocks
import pytest
import torch
from helpers import STEP_PATHS, adamw_reference, make_muon, normuon_reference, run_history, run_steps
from nsref import rel_err

import muon

# Shapes: wide, tall (stored transposed in the step's stacks: its neurons are stack columns), square,
# a 3-D batch of matrices and a 1×n matrix (one neuron).
SHAPES = [(12, 20), (20, 12), (9, 9), (2, 6, 10), (1, 9)]


def _data(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    return params, grads


def run(params, grads_seq, dtype, **options):
    """muon.Muon on copies of params in dtype (NS in float64 for float64, else float32): see run_history."""
    ns_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return run_history(make_muon, params, grads_seq, dtype=dtype, ns_dtype=ns_dtype, **options)


OPTIONS = [
    {"lr": 0.02, "weight_decay": 0.1},
    {"lr": 0.05, "weight_decay": 0.0, "nesterov": False, "adjust_lr_fn": "match_rms_adamw", "normuon_beta2": 0.9},
    {"lr": 0.02, "weight_decay": 0.5, "cautious_weight_decay": True, "normuon_eps": 1e-3},
]


def _ref_kwargs(o, normuon=True):
    return dict(lr=o["lr"], weight_decay=o["weight_decay"], nesterov=o.get("nesterov", True), normuon=normuon,
                beta2=o.get("normuon_beta2", 0.95), eps=o.get("normuon_eps", 1e-8),
                cautious=o.get("cautious_weight_decay", False), adjust_lr_fn=o.get("adjust_lr_fn"))


@STEP_PATHS
@pytest.mark.parametrize("options", OPTIONS, ids=["defaults", "no-nesterov,rms,beta2", "cautious,eps"])
def test_normuon_matches_float64_reference_over_steps(options, foreach):
    """float64: the step equals the hand-written algorithm to rounding (1e-12 of the distance moved),
    parameters and second moments alike; float32: within 2x the error plain Muon's float32 step has
    on the same data, so NorMuon's normalization adds no error of its own."""
    params, grads = _data(SHAPES, 5)
    ref_hist, ref_v = normuon_reference(params, grads, **_ref_kwargs(options))
    opt, ps, hist = run(params, grads, torch.float64, variant="normuon", foreach=foreach, **options)
    for step, (mine, ref) in enumerate(zip(hist, ref_hist)):
        for p0, a, r in zip(params, mine, ref):
            assert rel_err(a - p0, r - p0) < 1e-12, (step, p0.shape)
    for p, v in zip(ps, ref_v):
        state_v = opt.state[p]["normuon_v"]
        assert state_v.shape == (p.shape[:-1]) and state_v.dtype == torch.float64
        torch.testing.assert_close(state_v, v, rtol=1e-12, atol=0)

    # float32 against the same reference, bounded by plain Muon's own float32 error
    _, _, hist32 = run(params, grads, torch.float32, variant="normuon", foreach=foreach, **options)
    muon_ref, _ = normuon_reference(params, grads, **_ref_kwargs(options, normuon=False))
    _, _, muon32 = run(params, grads, torch.float32, variant="muon", foreach=foreach, **options)
    for step in range(len(grads)):
        for j, p0 in enumerate(params):
            ours = rel_err(hist32[step][j].double() - p0, ref_hist[step][j] - p0)
            plain = rel_err(muon32[step][j].double() - p0, muon_ref[step][j] - p0)
            assert ours <= 2 * plain + 4 * torch.finfo(torch.float32).eps, (step, p0.shape, ours, plain)


def test_normuon_balances_output_neurons_and_keeps_the_update_norm():
    """First step, no weight decay: every row (output neuron) of the update has the same norm, columns
    do not, and the update's Frobenius norm is plain Muon's (tall and wide matrices alike)."""
    params, grads = _data([(24, 16), (16, 24)], 1, seed=3)
    _, _, normuon_hist = run(params, grads, torch.float64, variant="normuon", lr=0.1, weight_decay=0.0)
    _, _, muon_hist = run(params, grads, torch.float64, variant="muon", lr=0.1, weight_decay=0.0)
    for p0, a, b in zip(params, normuon_hist[0], muon_hist[0]):
        delta, plain = a - p0, b - p0
        rows, cols = delta.norm(dim=1), delta.norm(dim=0)
        assert (rows.max() - rows.min()) / rows.mean() < 1e-6  # equal up to eps / sqrt(v)
        assert (cols.max() - cols.min()) / cols.mean() > 1e-2
        plain_rows = plain.norm(dim=1)
        assert (plain_rows.max() - plain_rows.min()) / plain_rows.mean() > 1e-2  # Muon's are not balanced
        torch.testing.assert_close(delta.norm(), plain.norm(), rtol=1e-12, atol=0)


def test_flatten_conv_weights_keep_one_moment_per_output_channel():
    params, grads = _data([(6, 2, 3, 3), (30, 2, 2, 2)], 3, seed=1)  # 6×18 wide, 30×8 tall
    opt, ps, hist = run(params, grads, torch.float64, variant="normuon", flatten=True, lr=0.02, weight_decay=0.1)
    flat_params = [p.reshape(p.shape[0], -1) for p in params]
    flat_grads = [[g.reshape(g.shape[0], -1) for g in gs] for gs in grads]
    ref_hist, ref_v = normuon_reference(flat_params, flat_grads, lr=0.02, weight_decay=0.1)
    for p, p0, a, r, v in zip(ps, params, hist[-1], ref_hist[-1], ref_v):
        assert rel_err(a.reshape(r.shape) - p0.reshape(r.shape), r - p0.reshape(r.shape)) < 1e-12
        assert opt.state[p]["normuon_v"].shape == (p.shape[0],)
        torch.testing.assert_close(opt.state[p]["normuon_v"], v, rtol=1e-12, atol=0)


def test_skipped_step_leaves_second_moments_and_parameters_alone():
    params, grads = _data([(8, 12), (12, 8)], 3)
    for foreach in (True, False, "reference"):
        ps = [p.float().requires_grad_(True) for p in params]
        opt = make_muon(ps, variant="normuon", cautious_weight_decay=True, lr=0.02, foreach=foreach)
        for step, gs in enumerate(grads):
            before = [p.detach().clone() for p in ps]
            v_before = [opt.state[p]["normuon_v"].clone() for p in ps] if step else None
            for p, g in zip(ps, gs):
                p.grad = g.float()
            if step == 2:
                ps[1].grad[3, 2] = float("nan")
            opt.step()
            if step == 2:
                assert torch.equal(ps[1], before[1])
                assert torch.equal(opt.state[ps[1]]["normuon_v"], v_before[1])
                assert not torch.equal(opt.state[ps[0]]["normuon_v"], v_before[0])
                assert opt.state[ps[1]]["nonfinite_skips"].item() == 1


# ----------------------------------------------------------------------------- cautious weight decay
def test_cautious_muon_matches_float64_reference_and_spares_disagreeing_coordinates():
    params, grads = _data(SHAPES, 3, seed=5)
    options = {"lr": 0.05, "weight_decay": 0.5, "cautious_weight_decay": True}
    ref_hist, _ = normuon_reference(params, grads, **_ref_kwargs(options, normuon=False))
    for foreach in (True, False, "reference"):
        _, _, hist = run(params, grads, torch.float64, foreach=foreach, **options)
        for step, (mine, ref) in enumerate(zip(hist, ref_hist)):
            for p0, a, r in zip(params, mine, ref):
                assert rel_err(a - p0, r - p0) < 1e-12, (step, p0.shape)
    # the mask itself, one step: W_new = W·(1 - lr·wd) + step where u·W >= 0, W + step elsewhere
    W0, G = params[0], grads[0][0]
    _, _, decayed = run([W0], [[G]], torch.float64, lr=0.05, weight_decay=0.5)
    _, _, plain = run([W0], [[G]], torch.float64, lr=0.05, weight_decay=0.0)
    _, _, cautious = run([W0], [[G]], torch.float64, **options)
    step = plain[0][0] - W0  # -lr·s·u
    agree = step * W0 <= 0
    assert 0.2 < agree.double().mean() < 0.8
    torch.testing.assert_close(cautious[0][0][agree], decayed[0][0][agree], rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(cautious[0][0][~agree], plain[0][0][~agree], rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])  # "raise" would take the fused kernel without caution
def test_cautious_adamw_matches_float64_reference(nonfinite):
    shapes = [(7,), (5, 3), ()]
    params, grads = _data(shapes, 6, seed=2)
    hyper = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": 0.5}
    ref = adamw_reference(params, grads, cautious=True, **hyper)
    plain = adamw_reference(params, grads, cautious=False, **hyper)
    for foreach in (True, False, "reference"):
        ps = [p.clone().requires_grad_(True) for p in params]
        opt = make_muon([{"params": ps, "use_muon": False, "cautious_weight_decay": True, **hyper}],
                        nonfinite=nonfinite, foreach=foreach)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        for p, r, q, p0 in zip(ps, ref, plain, params):
            assert rel_err(p - p0, r - p0) < 1e-12
            if p.numel() > 1:
                assert rel_err(p - p0, q - p0) > 1e-3  # the mask changed something


# --------------------------------------------------------------------------------- checkpoints
def _build(dtype, foreach):
    gen = torch.Generator().manual_seed(11)
    mats = [torch.randn(s, generator=gen).to(dtype).requires_grad_(True) for s in [(8, 12), (12, 8), (2, 4, 6)]]
    rest = [torch.randn(5, generator=gen).to(dtype).requires_grad_(True)]
    opt = make_muon([{"params": mats}, {"params": rest, "use_muon": False}], lr=0.02, weight_decay=0.1,
                    variant="normuon", normuon_beta2=0.9, cautious_weight_decay=True, foreach=foreach)
    return opt, mats + rest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@STEP_PATHS
def test_state_dict_round_trip_is_bit_exact(dtype, foreach):
    """Save at step 3 (through torch.save / torch.load(weights_only=True)), load into a fresh optimizer,
    continue: bit-equal to the uninterrupted run. bf16 parameters keep fp32 second moments."""
    straight, ps = _build(dtype, foreach)
    run_steps(straight, range(6))

    first, qs = _build(dtype, foreach)
    run_steps(first, range(3))
    buffer = io.BytesIO()
    torch.save({"opt": first.state_dict(), "params": [q.detach() for q in qs]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, rs = _build(dtype, foreach)
    with torch.no_grad():
        for r, q in zip(rs, saved["params"]):
            r.copy_(q)
    resumed.load_state_dict(saved["opt"])
    assert resumed.state[rs[0]]["normuon_v"].dtype == torch.float32
    run_steps(resumed, range(3, 6))
    for p, r in zip(ps, rs):
        assert torch.equal(p, r)
        for key, value in straight.state[p].items():
            assert torch.equal(value, resumed.state[r][key]), key


def test_options_are_validated_and_a_bad_checkpoint_is_refused():
    W = torch.randn(4, 6, requires_grad=True)
    for bad, match in [({"variant": "adamuon"}, "variant must be one of"), ({"normuon_beta2": 1.0}, "normuon_beta2"),
                       ({"normuon_eps": 0.0}, "normuon_eps must be > 0"),
                       ({"cautious_weight_decay": 1}, "cautious_weight_decay must be True or False")]:
        with pytest.raises(ValueError, match=match):
            muon.Muon([W], **bad)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: cautious_weight_decay"):
        muon.Muon([{"params": [W]}, {"params": [torch.randn(3, requires_grad=True)], "use_muon": False,
                                     "cautious_weight_decay": "yes"}])
    opt = muon.Muon([W], variant="normuon")
    W.grad = torch.randn(4, 6)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["normuon_v"] = torch.zeros(6)
    fresh = muon.Muon([W], variant="normuon")
    with pytest.raises(ValueError, match=r"normuon_v is \(6,\).*\(4,\)"):
        fresh.load_state_dict(state)
    assert fresh.state == {} or "normuon_v" not in fresh.state[W]


def test_loading_plain_muon_state_starts_normuon_moments_at_zero():
    """A torch.optim.Muon (or variant="muon") checkpoint loads into a NorMuon group: momentum carries
    over, the second moments start at zero as on a first step."""
    W = torch.randn(6, 10, requires_grad=True)
    plain = torch.optim.Muon([W], lr=0.02)
    W.grad = torch.randn(6, 10)
    plain.step()
    opt = muon.Muon([W], lr=0.02, variant="normuon")
    opt.load_state_dict(copy.deepcopy(plain.state_dict()))
    W.grad = torch.randn(6, 10)
    opt.step()
    assert opt.state[W]["normuon_v"].shape == (6,) and bool((opt.state[W]["normuon_v"] > 0).all())


@pytest.mark.parametrize("heading", ["NorMuon", "Cautious weight decay"])
def test_readme_examples_run(heading):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scope = docblocks.run(docblocks.block("docs/optimizer.md", heading))
    opt, model = scope["opt"], scope["model"]
    group = next(g for g in opt.param_groups if g["use_muon"])
    assert model[0].weight in group["params"]
    if "NorMuon" in heading:
        assert group["variant"] == "normuon" and opt.state[model[0].weight]["normuon_v"].shape == (64,)
    else:
        assert all(g["cautious_weight_decay"] for g in opt.param_groups)


def test_an_optimizer_pickled_before_these_options_steps_as_plain_muon():
    W = torch.randn(4, 6, requires_grad=True)
    state = muon.Muon([W], lr=0.02).__getstate__()
    for where in state["param_groups"] + [state["defaults"]]:
        for key in ("variant", "normuon_beta2", "normuon_eps", "cautious_weight_decay"):
            del where[key]
    old = muon.Muon.__new__(muon.Muon)
    old.__setstate__(state)
    twin = muon.Muon([V := W.detach().clone().requires_grad_(True)], lr=0.02)
    W.grad = torch.randn(4, 6)
    V.grad = W.grad.clone()
    old.step()
    twin.step()
    assert old.param_groups[0]["variant"] == "muon" and torch.equal(W, V)
