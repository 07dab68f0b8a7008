"""`opt.state` is the truth: whatever a user or framework does to the optimizer state takes effect at
the next step exactly as it does on the per-parameter reference loop (foreach=False), or is refused
with an error naming the parameter. The planned step keeps stacked copies (views) of the state; these
tests change the state behind its back."""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
from helpers import assert_same, assert_snapshot, params_of, run_steps, set_grads, snapshot

import muon


def _make(foreach, seed=0, **options):
    gen = torch.Generator().manual_seed(seed)
    mats = [torch.randn(s, generator=gen).requires_grad_(True) for s in [(8, 12), (12, 8), (8, 12), (2, 6, 4)]]
    rest = [torch.randn(s, generator=gen).requires_grad_(True) for s in [(12,), (5, 3)]]
    opt = muon.Muon([{"params": mats}, {"params": rest, "use_muon": False}], lr=0.02, backend="torch",
                    foreach=foreach, **options)  # fmt: skip
    return opt


def _twins(**options):
    """The planned step and the reference loop on the same parameters, after three steps."""
    fast, ref = _make(None, **options), _make(False, **options)
    run_steps(fast, (1, 2, 3))
    run_steps(ref, (1, 2, 3))
    assert_same(fast, ref)
    return fast, ref


@pytest.mark.parametrize("reset", ["clear", "new_mapping", "del_entry"])
def test_resetting_the_state_restarts_the_optimizer_on_the_plan_as_on_the_loop(reset):
    """Defect A: `opt.state.clear()` / `opt.state = defaultdict(dict)` left the plan stepping with the
    old momentum while opt.state stayed empty (a checkpoint then held no state)."""
    fast, ref = _twins()
    for opt in (fast, ref):
        if reset == "clear":
            opt.state.clear()
        elif reset == "new_mapping":
            opt.state = defaultdict(dict)
        else:
            del opt.state[params_of(opt)[0]]
    run_steps(fast, (4, 5))
    run_steps(ref, (4, 5))
    assert_same(fast, ref)
    state = fast.state_dict()["state"]
    assert len(state) == len(params_of(fast)), "a checkpoint after the reset must hold the new state"
    # and the reset really restarted: a fresh optimizer from the same parameters steps the same
    fresh = _make(False)
    with torch.no_grad():
        for p, q in zip(params_of(fresh), params_of(fast), strict=True):
            p.copy_(q)
    if reset != "del_entry":
        fast2 = _make(None)
        with torch.no_grad():
            for p, q in zip(params_of(fast2), params_of(fast), strict=True):
                p.copy_(q)
        for opt in (fast, fast2):
            opt.state.clear()
        run_steps(fast, (6,))
        run_steps(fast2, (6,))
        assert_same(fast, fast2)


@pytest.mark.parametrize("key", ["momentum_buffer", "exp_avg", "exp_avg_sq", "step", "nonfinite_skips"])
def test_an_assigned_state_tensor_is_used_by_the_next_step(key):
    """Defect B: assigning a new tensor to a state entry had no effect on the planned step."""
    fast, ref = _twins()
    index = 0 if key == "momentum_buffer" else 4  # a Muon matrix, or an AdamW vector
    for opt in (fast, ref):
        p = params_of(opt)[index]
        old = opt.state[p][key]
        seeded = torch.randn(old.shape, generator=torch.Generator().manual_seed(7)).abs().to(old.dtype) * 0.1
        new = torch.full_like(old, 3) if key in ("step", "nonfinite_skips") else seeded
        opt.state[p][key] = new.clone()
    run_steps(fast, (4,))
    run_steps(ref, (4,))
    assert_same(fast, ref)
    # the plan now holds the assigned values: in-place edits of the installed state keep working
    for opt in (fast, ref):
        opt.state[params_of(opt)[index]][key].zero_()
    run_steps(fast, (5,))
    run_steps(ref, (5,))
    assert_same(fast, ref)


def test_a_state_tensor_of_the_wrong_shape_is_refused_naming_the_parameter():
    fast, _ = _twins()
    p = params_of(fast)[1]
    fast.state[p]["momentum_buffer"] = torch.zeros(3, 3)
    snap = snapshot(fast)
    set_grads(params_of(fast), 4)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*momentum_buffer"):
        fast.step()
    assert_snapshot(fast, snap)


def test_a_parameter_reshaped_to_the_same_numel_is_refused_not_reinterpreted():
    """Defect C: p.data replaced by a 6×4 tensor (was 4×6... here 8×12 -> 12×8): the plan silently
    reshaped the old momentum into it; the reference loop fails on the size mismatch."""
    fast, ref = _twins()
    for opt in (fast, ref):
        p = params_of(opt)[0]
        p.data = p.data.reshape(12, 8).clone()
        set_grads(params_of(opt), 4)
    snap = snapshot(fast)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*shape \(8, 12\)"):
        fast.step()
    assert_snapshot(fast, snap)
    with pytest.raises(RuntimeError):
        ref.step()
    # resetting that parameter's state makes it a fresh parameter of the new shape, on both paths
    for opt in (fast, ref):
        del opt.state[params_of(opt)[0]]
    run_steps(fast, (5,))
    run_steps(ref, (5,))
    assert_same(fast, ref)


@pytest.mark.parametrize("foreach", [None, False])
def test_a_refused_first_step_creates_no_state(foreach):
    """Defect G: nonfinite="raise" refusing the first step created zero state for every parameter."""
    opt = _make(foreach, nonfinite="raise")
    set_grads(params_of(opt), 1, bad=(2,))
    with pytest.raises(RuntimeError, match="nothing was updated"):
        opt.step()
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    set_grads(params_of(opt), 2)
    opt.step()
    ref = _make(False, nonfinite="raise")
    set_grads(params_of(ref), 2)
    ref.step()
    assert_same(opt, ref)


def test_load_state_dict_replaces_the_planned_state():
    fast, ref = _twins()
    saved = copy.deepcopy(ref.state_dict())  # a live state dict shares its tensors with ref
    run_steps(fast, (9,))  # fast moves on; loading takes it back to ref's state
    with torch.no_grad():
        for p, q in zip(params_of(fast), params_of(ref), strict=True):
            p.copy_(q)
    fast.load_state_dict(saved)
    run_steps(fast, (4,))
    run_steps(ref, (4,))
    assert_same(fast, ref)


def test_the_plan_is_kept_while_the_state_is_untouched():
    fast, _ = _twins()
    plan = fast._plan
    run_steps(fast, (4, 5))
    assert fast._plan is plan
    fast.state[params_of(fast)[0]]["momentum_buffer"].mul_(0.5)  # in place: the plan's own view
    run_steps(fast, (6,))
    assert fast._plan is plan
