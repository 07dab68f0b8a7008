"""`opt.state` is the truth: whatever a user or framework does to the optimizer state takes effect at
the next step exactly as it does on the per-parameter reference loop (`helpers.ReferenceMuon`), or is refused
with an error naming the parameter. The planned step keeps no state of its own (it reads `opt.state`
every step); these tests change the state behind its back."""

from __future__ import annotations

import copy
import re
from collections import defaultdict

import pytest
import torch
from helpers import (
    STEP_PATHS,
    assert_same,
    assert_snapshot,
    bit_equal,
    make_muon,
    params_of,
    run_steps,
    set_grads,
    snapshot,
)


def _make(foreach, seed=0, **options):
    gen = torch.Generator().manual_seed(seed)
    mats = [torch.randn(s, generator=gen).requires_grad_(True) for s in [(8, 12), (12, 8), (8, 12), (2, 6, 4)]]
    rest = [torch.randn(s, generator=gen).requires_grad_(True) for s in [(12,), (5, 3)]]
    opt = make_muon([{"params": mats}, {"params": rest, "use_muon": False}], lr=0.02, backend="torch",
                    foreach=foreach, **options)  # fmt: skip
    return opt


def _twins(**options):
    """The planned step and the reference loop on the same parameters, after three steps."""
    fast, ref = _make(None, **options), _make("reference", **options)
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
    fresh = _make("reference")
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


@pytest.mark.parametrize("key", ["momentum_buffer", "exp_avg", "exp_avg_sq", "step", "nonfinite_skips"])
def test_a_deleted_state_entry_is_created_again_as_on_the_loop(key):
    """`del opt.state[p][key]` frees the entry (a view of a packed stack, nothing else keeps it): the
    next step makes it afresh, as the loop does, and steps the rest of the state as it was."""
    fast, ref = _twins()
    index = 0 if key == "momentum_buffer" else 4  # a Muon matrix, or an AdamW vector
    for opt in (fast, ref):
        del opt.state[params_of(opt)[index]][key]
    run_steps(fast, (4, 5))
    run_steps(ref, (4, 5))
    assert_same(fast, ref)


def _zero_data(t):
    t.data = torch.zeros_like(t)


def _set_zeros(t):
    t.set_(torch.zeros_like(t))


def _move_data(t):
    t.data = t.data.clone()  # what the common "move the optimizer to a device" helper does: new storage


@pytest.mark.parametrize("edit", [_zero_data, _set_zeros, _move_data], ids=["data", "set_", "move_helper"])
@pytest.mark.parametrize("key", ["momentum_buffer", "exp_avg", "exp_avg_sq", "step"])
def test_data_and_set_on_a_state_tensor_take_effect_as_on_the_loop(edit, key):
    """opt.state is the only storage: `.data =` and `set_()` on a state tensor (the same tensor object
    with new storage) are what the next step reads, on the planned step as on the loop; in-place edits
    after them too."""
    fast, ref = _twins()
    index = 0 if key == "momentum_buffer" else 4
    for opt in (fast, ref):
        edit(opt.state[params_of(opt)[index]][key])
    run_steps(fast, (4,))
    run_steps(ref, (4,))
    assert_same(fast, ref)
    for opt in (fast, ref):
        opt.state[params_of(opt)[index]][key].mul_(0.5)
    run_steps(fast, (5,))
    run_steps(ref, (5,))
    assert_same(fast, ref)


def test_the_state_holds_no_second_copy():
    """opt.state is the only storage: the storages behind the state tensors hold those tensors and
    nothing else (the momentum of a bucket may be rows of one stack, whose views are the state)."""
    fast, _ = _twins()
    tensors = [v for p in params_of(fast) for v in fast.state[p].values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert sum(storages.values()) == sum(t.numel() * t.element_size() for t in tensors)


def test_clearing_the_state_frees_its_memory():
    """The plan holds the packed stacks weakly: once opt.state lets go of them, they are freed (a
    reset optimizer does not keep its old state alive), and the next step packs anew."""
    import gc
    import weakref

    fast, _ = _twins()
    tensors = [weakref.ref(v) for p in params_of(fast) for v in fast.state[p].values()]
    bases = [weakref.ref(v._base) for p in params_of(fast) for v in fast.state[p].values() if v._base is not None]
    assert bases, "the engine packs state into stacks"
    fast.state.clear()
    gc.collect()
    assert all(ref() is None for ref in tensors + bases)
    run_steps(fast, (4,))
    assert len(fast.state) == len(params_of(fast))


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


@STEP_PATHS
def test_a_refused_first_step_creates_no_state(foreach):
    """Defect G: nonfinite="raise" refusing the first step created zero state for every parameter."""
    opt = _make(foreach, nonfinite="raise")
    set_grads(params_of(opt), 1, bad=(2,))
    with pytest.raises(RuntimeError, match="nothing was updated"):
        opt.step()
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    set_grads(params_of(opt), 2)
    opt.step()
    ref = _make("reference", nonfinite="raise")
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


# ------------------------------------------------------------------------ state of another dtype
def _bits(opt):
    """Every parameter and state tensor, copied (compared with bit_equal: dtype and bits)."""
    return [p.detach().clone() for p in params_of(opt)], {
        (i, k): v.detach().clone() for i, p in enumerate(params_of(opt)) for k, v in opt.state.get(p, {}).items()
    }


def _assert_bits(opt, bits):
    params, state = bits
    assert all(bit_equal(p.detach(), q) for p, q in zip(params_of(opt), params, strict=True))
    now = {(i, k): v for i, p in enumerate(params_of(opt)) for k, v in opt.state.get(p, {}).items()}
    assert now.keys() == state.keys() and all(bit_equal(now[k], state[k]) for k in state)


@STEP_PATHS
@pytest.mark.parametrize("index, key", [(0, "momentum_buffer"), (4, "exp_avg")])  # a Muon matrix, an AdamW vector
@pytest.mark.parametrize("old, new", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_a_parameter_whose_dtype_changed_is_refused_naming_it_on_every_path(foreach, index, key, old, new):
    """A parameter converted after some steps (p.data = p.data.bfloat16()) with a gradient of its new
    dtype: its state is of the old dtype, which torch.optim.Muon and AdamW (single-tensor, foreach,
    fused) refuse; the planned step cast it silently. Refused on every path, changing nothing."""
    opt = _make(foreach)
    p = params_of(opt)[index]
    with torch.no_grad():
        p.data = p.data.to(old)
    run_steps(opt, (1, 2))
    p.data = p.data.to(new)
    set_grads(params_of(opt), 3)
    bits = _bits(opt)
    shape = re.escape(str(tuple(p.shape)))
    where = rf"param_groups\[{0 if index < 4 else 1}\]\['params'\]\[{index % 4}\] \(shape {shape}\)"
    match = rf"{where}: state\['{key}'\] is {old}, but the parameter is {new}.*del opt.state\[p\]"
    with pytest.raises(ValueError, match=match):
        opt.step()
    _assert_bits(opt, bits)
    # converting the state (what the message says) makes it step as a parameter of the new dtype would
    state = opt.state[p]
    for k in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        if k in state:
            state[k] = state[k].to(new)
    opt.step()
    assert opt.state[p][key].dtype == new and p.dtype == new


def test_after_a_dtype_change_both_paths_agree_once_the_state_is_reset():
    fast, ref = _twins()
    for opt in (fast, ref):
        for p in params_of(opt)[:1] + params_of(opt)[4:5]:
            p.data = p.data.bfloat16()
        set_grads(params_of(opt), 4)
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*momentum_buffer"):
            opt.step()
        for p in params_of(opt)[:1] + params_of(opt)[4:5]:
            del opt.state[p]
    run_steps(fast, (5, 6))
    run_steps(ref, (5, 6))
    assert_same(fast, ref)


def test_muon_momentum_in_the_gradients_dtype_is_accepted_as_torch_optim_muon_does():
    """torch.optim.Muon keeps momentum in the gradient's dtype (zeros_like(grad)), whatever the
    parameter's: a bf16 parameter with fp32 gradients steps on with its fp32 momentum, on both paths."""
    fast, ref = _twins()
    for opt in (fast, ref):
        p = params_of(opt)[0]
        set_grads(params_of(opt), 4)
        p.data = p.data.bfloat16()  # its gradient, assigned before, stays fp32
        opt.step()
        assert opt.state[p]["momentum_buffer"].dtype == torch.float32 and p.dtype == torch.bfloat16
    assert_same(fast, ref)


@STEP_PATHS
@pytest.mark.parametrize("fresh", [True, False])
def test_an_adamw_gradient_of_another_dtype_than_its_parameter_is_refused(foreach, fresh):
    """AdamW keeps its moments in the parameter's dtype and lerps the gradient in: a gradient of
    another dtype failed inside torch's lerp (on any state), now a ValueError naming the parameter."""
    opt = _make(foreach)
    if not fresh:
        run_steps(opt, (1,))
    p = params_of(opt)[5]
    set_grads(params_of(opt), 2)
    p.data = p.data.bfloat16()
    p.grad = torch.randn(p.shape).bfloat16()
    p.data = p.data.float()
    bits = _bits(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] \(shape \(5, 3\)\) is torch.float32 "
                                         r"but its gradient is torch.bfloat16"):
        opt.step()
    _assert_bits(opt, bits)


@STEP_PATHS
def test_a_state_loaded_into_parameters_of_another_dtype_is_cast_and_steps(foreach):
    """torch's load_state_dict casts floating state to each parameter's dtype: a checkpoint of fp32
    parameters loads into bf16 ones and steps (NorMuon's moments stay in fp32, their opmath)."""
    src = _make(foreach, variant="normuon")
    run_steps(src, (1, 2))
    saved = copy.deepcopy(src.state_dict())
    dst = _make(foreach, variant="normuon")
    with torch.no_grad():
        for p, q in zip(params_of(dst), params_of(src), strict=True):
            p.data = q.detach().bfloat16()
    dst.load_state_dict(saved)
    run_steps(dst, (3,))
    p = params_of(dst)[0]
    assert dst.state[p]["momentum_buffer"].dtype == torch.bfloat16 and dst.state[p]["normuon_v"].dtype == torch.float32
