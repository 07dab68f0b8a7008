"""Fault injection: bad input, foreign and broken checkpoints, non-finite gradients, copies.

Every failing call must name what is wrong and leave the optimizer and its parameters exactly as they
were (`Snapshot` compares them bit for bit: helpers.bit_equal).
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import random

import pytest
import torch
from helpers import STEP_PATHS, assert_state_dicts_equal, bit_equal, make_muon, run_steps, set_grads

import muon

FAST = {"ns_dtype": torch.float32, "backend": "torch"}  # bf16 matmul is slow on CPU; NS is not under test here


def scale_fn(m, n):
    """A module-level callable adjust_lr_fn (picklable), not one of the named rules."""
    return 0.5 * math.sqrt(m / n)


class Snapshot:
    """Parameters, gradients and the full optimizer state, to compare bit for bit after a failed call."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt
        self.groups = self._groups(opt)
        self.params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
        self.state = copy.deepcopy(opt.state_dict())
        self.live_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}

    @staticmethod
    def _groups(opt):
        return [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]]) for g in opt.param_groups]

    def assert_unchanged(self):
        opt = self.opt
        assert self._groups(opt) == self.groups
        now = [p.detach() for g in opt.param_groups for p in g["params"]]
        assert len(now) == len(self.params) and all(bit_equal(a, b) for a, b in zip(now, self.params))
        assert {id(p) for p in opt.state} == set(self.live_state)
        for p, s in opt.state.items():
            assert s.keys() == self.live_state[id(p)].keys()
            assert all(bit_equal(v, self.live_state[id(p)][k]) for k, v in s.items())
        assert_state_dicts_equal(opt.state_dict(), self.state)


def _hybrid(seed=0, **kwargs):
    """A Muon group (two same-shape matrices, a tall one, a batched 3-D one) and an AdamW group."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 10), (6, 10), (10, 6), (3, 4, 5), (7,), (4, 3)]
    params = [torch.randn(s, generator=gen).requires_grad_(True) for s in shapes]
    groups = [{"params": params[:4]}, {"params": params[4:], "use_muon": False}]
    return muon.Muon(groups, **{"lr": 0.02, **FAST, **kwargs}), params


def _train(opt, params, steps, seed=100):
    """`steps` steps on gradients drawn in each parameter's dtype, seeds seed, seed + 1, ..."""
    run_steps(opt, range(seed, seed + steps), params, draw_in_dtype=True)


def _assert_steps_alike(opt_a, params_a, opt_b, params_b, steps=2, seed=500):
    """Both optimizers take the same steps and end bit-identical."""
    _train(opt_a, params_a, steps, seed)
    _train(opt_b, params_b, steps, seed)
    for a, b in zip(params_a, params_b):
        assert bit_equal(a.detach(), b.detach())
    assert_state_dicts_equal(opt_a.state_dict(), opt_b.state_dict())


# --------------------------------------------------------------------------------- bad input
def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype).requires_grad_(dtype.is_floating_point or dtype.is_complex)


def _inference(*shape):
    """A tensor made under torch.inference_mode(): it cannot be updated in place outside it."""
    with torch.inference_mode():
        return torch.zeros(shape)


W = r"param_groups\[1\]"  # the bad group is always the second one
P = r"param_groups\[1\]\['params'\]\[1\]"  # and the bad tensor its second parameter
NS = W + ": invalid Newton–Schulz settings"

BAD_GROUPS = [
    # (group builder, error, what the message must name)
    ("lr negative", lambda: {"params": [_t(3, 3)], "lr": -1.0}, ValueError, W + ": lr"),
    ("lr nan", lambda: {"params": [_t(3, 3)], "lr": float("nan")}, ValueError, W + ": lr"),
    ("lr inf", lambda: {"params": [_t(3, 3)], "lr": float("inf")}, ValueError, W + ": lr"),
    ("lr string", lambda: {"params": [_t(3, 3)], "lr": "0.1"}, ValueError, W + ": lr must be a number"),
    ("lr tensor 2 elems", lambda: {"params": [_t(3, 3)], "lr": torch.tensor([0.1, 0.2])}, ValueError, W + ".*lr"),
    ("lr int tensor", lambda: {"params": [_t(3, 3)], "lr": torch.tensor(1)}, ValueError, W + ".*lr.*floating"),
    ("weight_decay negative", lambda: {"params": [_t(3, 3)], "weight_decay": -0.1}, ValueError, W + ": weight_decay"),
    ("weight_decay inf", lambda: {"params": [_t(3, 3)], "weight_decay": math.inf}, ValueError, W + ": weight_decay"),
    ("momentum 1", lambda: {"params": [_t(3, 3)], "momentum": 1.0}, ValueError, W + r": momentum .*\[0.0, 1.0\)"),
    ("momentum negative", lambda: {"params": [_t(3, 3)], "momentum": -0.1}, ValueError, W + ": momentum"),
    ("momentum None", lambda: {"params": [_t(3, 3)], "momentum": None}, ValueError, W + ": momentum"),
    ("nesterov string", lambda: {"params": [_t(3, 3)], "nesterov": "yes"}, ValueError, W + ": nesterov"),
    ("flatten int", lambda: {"params": [_t(3, 3)], "flatten": 1}, ValueError, W + ": flatten"),
    ("use_muon string", lambda: {"params": [_t(3, 3)], "use_muon": "no"}, ValueError, W + ": use_muon"),
    ("ns_steps 100", lambda: {"params": [_t(3, 3)], "ns_steps": 100}, ValueError,
     NS + r".*ns_steps=100.*steps must be in \[0, 100\)"),
    ("ns_steps negative", lambda: {"params": [_t(3, 3)], "ns_steps": -1}, ValueError,
     W + ": ns_steps must be >= 1, got -1"),
    ("ns_steps float", lambda: {"params": [_t(3, 3)], "ns_steps": 2.5}, ValueError, NS + ".*steps must be an int"),
    ("ns_steps bool", lambda: {"params": [_t(3, 3)], "ns_steps": True}, ValueError, NS + ".*steps must be an int"),
    ("eps negative", lambda: {"params": [_t(3, 3)], "eps": -1e-7}, ValueError, NS + ".*eps=-1e-07"),
    ("eps nan", lambda: {"params": [_t(3, 3)], "eps": math.nan}, ValueError, NS + ".*eps=nan"),
    ("coefficients preset", lambda: {"params": [_t(3, 3)], "ns_coefficients": "fast"}, ValueError,
     NS + ".*not a preset"),
    ("coefficients pair", lambda: {"params": [_t(3, 3)], "ns_coefficients": (1.0, 2.0)}, ValueError,
     NS + r".*ns_coefficients=\(1.0, 2.0\)"),
    ("coefficients bad step", lambda: {"params": [_t(3, 3)], "ns_coefficients": [(3.0, -3.2, 1.2), "x"]},
     ValueError, NS + r" \(ns_coefficients=\[\(3.0, -3.2, 1.2\), 'x'\]"),
    ("coefficients empty", lambda: {"params": [_t(3, 3)], "ns_coefficients": []}, ValueError,
     NS + r".*ns_coefficients=\[\]"),
    ("adjust_lr_fn name", lambda: {"params": [_t(3, 3)], "adjust_lr_fn": "sqrt"}, ValueError, W + ": adjust_lr_fn"),
    ("adjust_lr_fn nan", lambda: {"params": [_t(3, 3), _t(4, 2)], "adjust_lr_fn": lambda m, n: math.nan},
     ValueError, r"param_groups\[1\]\['params'\]\[0\] \(shape \(3, 3\).*returned nan"),
    ("adjust_lr_fn inf on one shape", lambda: {"params": [_t(3, 3), _t(4, 2)],
                                               "adjust_lr_fn": lambda m, n: math.inf if m == 4 else 1.0},
     ValueError, P + r" \(shape \(4, 2\), an 4×2 matrix\).*returned inf"),
    ("adjust_lr_fn negative", lambda: {"params": [_t(3, 3)], "adjust_lr_fn": lambda m, n: -1.0}, ValueError,
     r"param_groups\[1\]\['params'\]\[0\].*>= 0"),
    ("adjust_lr_fn string", lambda: {"params": [_t(3, 3)], "adjust_lr_fn": lambda m, n: "2"}, ValueError,
     r"param_groups\[1\]\['params'\]\[0\].*returned '2'"),
    ("adjust_lr_fn None", lambda: {"params": [_t(3, 3)], "adjust_lr_fn": lambda m, n: None}, ValueError,
     r"param_groups\[1\]\['params'\]\[0\].*returned None"),
    ("adjust_lr_fn raises", lambda: {"params": [_t(3, 3)], "adjust_lr_fn": lambda m: 1.0}, ValueError,
     r"param_groups\[1\]\['params'\]\[0\].*positional"),
    ("ns_dtype int8", lambda: {"params": [_t(3, 3)], "ns_dtype": torch.int8}, ValueError, W + ": ns_dtype"),
    ("ns_dtype string", lambda: {"params": [_t(3, 3)], "ns_dtype": "bfloat16"}, ValueError, W + ": ns_dtype"),
    ("backend not a name", lambda: {"params": [_t(3, 3)], "backend": 3}, ValueError, W + ": backend"),
    ("1-D in Muon group", lambda: {"params": [_t(3, 3), _t(5)]}, ValueError, P + r" has shape \(5,\) \(1-D\)"),
    ("0-D in Muon group", lambda: {"params": [_t(3, 3), _t()]}, ValueError, P + r" has shape \(\) \(0-D\)"),
    ("int64 in Muon group", lambda: {"params": [_t(3, 3), _t(3, 3, dtype=torch.int64)]}, ValueError,
     P + " must be floating point, got torch.int64"),
    ("complex in Muon group", lambda: {"params": [_t(3, 3), _t(3, 3, dtype=torch.complex64)]}, ValueError,
     P + " is complex"),
    ("sparse in Muon group", lambda: {"params": [_t(3, 3), torch.zeros(3, 3).to_sparse().requires_grad_()]},
     ValueError, P + " is a torch.sparse_coo tensor"),
    ("duplicate in group", lambda: (lambda t: {"params": [t, t]})(_t(3, 3)), ValueError,
     P + r" is the same tensor as param_groups\[1\]\['params'\]\[0\]"),
    ("adamw betas 1", lambda: {"params": [_t(3)], "use_muon": False, "betas": (1.0, 0.9)}, ValueError,
     W + ": betas"),
    ("adamw betas nan", lambda: {"params": [_t(3)], "use_muon": False, "betas": (0.9, math.nan)}, ValueError,
     W + ": betas"),
    ("adamw betas single", lambda: {"params": [_t(3)], "use_muon": False, "betas": (0.9,)}, ValueError,
     W + ": AdamW betas must be a pair"),
    ("adamw betas string", lambda: {"params": [_t(3)], "use_muon": False, "betas": "ab"}, ValueError,
     W + ": AdamW betas must be a pair"),
    ("adamw eps negative", lambda: {"params": [_t(3)], "use_muon": False, "eps": -1e-8}, ValueError, W + ": eps"),
    ("adamw eps inf", lambda: {"params": [_t(3)], "use_muon": False, "eps": math.inf}, ValueError, W + ": eps"),
    ("adamw lr nan", lambda: {"params": [_t(3)], "use_muon": False, "lr": math.nan}, ValueError, W + ": lr"),
    ("int64 in AdamW group", lambda: {"params": [_t(3), _t(3, dtype=torch.int64)], "use_muon": False}, ValueError,
     P + " must be floating point, got torch.int64"),
    ("complex in AdamW group", lambda: {"params": [_t(3), _t(3, dtype=torch.complex64)], "use_muon": False},
     ValueError, P + " is complex"),
    ("sparse in AdamW group", lambda: {"params": [_t(3), torch.zeros(4, 3).to_sparse().requires_grad_()],
                                       "use_muon": False}, ValueError, P + " is a torch.sparse_coo tensor"),
    ("non-leaf", lambda: {"params": [_t(3, 3), _t(3, 3) * 2]}, ValueError, "non-leaf"),
    ("inference tensor in Muon group", lambda: {"params": [_t(3, 3), _inference(3, 3)]}, ValueError,
     P + r" \(shape \(3, 3\)\) is an inference tensor .*outside inference mode.*clone"),
    ("view of an inference tensor", lambda: {"params": [_t(3, 3), _inference(4, 3)[1:]]}, ValueError,
     P + r" \(shape \(3, 3\)\) is an inference tensor \(created under torch.inference_mode\(\), or a view of one"),
    ("inference tensor in AdamW group", lambda: {"params": [_t(3), _inference(3)], "use_muon": False}, ValueError,
     P + r" \(shape \(3,\)\) is an inference tensor"),
    ("set of params", lambda: {"params": {_t(3, 3)}}, TypeError, "ordered collections"),
]


@pytest.mark.parametrize("build, error, match", [c[1:] for c in BAD_GROUPS], ids=[c[0] for c in BAD_GROUPS])
def test_bad_group_is_refused_at_construction_naming_it(build, error, match):
    with pytest.raises(error, match=match):
        muon.Muon([{"params": [_t(2, 2)]}, build()], **FAST)


@pytest.mark.parametrize("build, error, match", [c[1:] for c in BAD_GROUPS], ids=[c[0] for c in BAD_GROUPS])
def test_failed_add_param_group_changes_nothing(build, error, match):
    opt, params = _hybrid()
    twin, twin_params = _hybrid()
    _train(opt, params, 1)
    _train(twin, twin_params, 1)
    # The bad group goes in at index 2 here: the message names that index.
    match = match.replace(r"param_groups\[1\]", r"param_groups\[2\]")
    snap = Snapshot(opt)
    with pytest.raises(error, match=match):
        opt.add_param_group(build())
    snap.assert_unchanged()
    _assert_steps_alike(opt, params, twin, twin_params)


def test_parameters_without_requires_grad_are_accepted_as_torch_accepts_them():
    """torch.optim takes requires_grad=False tensors (frozen, or given gradients by hand); so does Muon,
    and a clone of an inference tensor made outside inference mode is an ordinary parameter."""
    frozen, rest = torch.randn(4, 6), torch.randn(5)
    cloned = _inference(3, 3).clone()
    opt = muon.Muon([{"params": [frozen, cloned]}, {"params": [rest], "use_muon": False}], **FAST)
    for p in (frozen, cloned, rest):
        p.grad = torch.randn(p.shape)
    before = [p.clone() for p in (frozen, cloned, rest)]
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip((frozen, cloned, rest), before))


@pytest.mark.parametrize(
    "process_group, match",
    [
        ("world", r"process_group must be None \(the default group.*ProcessGroup.*got 'world' \(str\)"),
        (0, r"got 0 \(int\)"),
        (object(), r"got <object object at .*> \(object\)"),
        (-100, r"NON_GROUP_MEMBER: this rank is not a member"),
    ],
)
def test_a_process_group_that_is_not_one_is_refused_at_construction(process_group, match):
    with pytest.raises(ValueError, match=match):
        muon.Muon([_t(3, 3)], process_group=process_group)


def test_a_process_group_is_accepted_at_construction():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)
    assert muon.Muon([_t(3, 3)], process_group=group).process_group is group
    assert muon.Muon([_t(3, 3)], process_group=None).process_group is None


def test_without_torch_distributed_only_none_is_a_process_group(monkeypatch):
    dist = pytest.importorskip("torch.distributed")
    group = dist.ProcessGroup(dist.HashStore(), 0, 1) if dist.is_available() else object()
    monkeypatch.setattr(dist, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"process_group must be None: this build of torch has no torch.distributed"):
        muon.Muon([_t(3, 3)], process_group=group)
    muon.Muon([_t(3, 3)], process_group=None)


def test_duplicates_across_groups_name_both_places():
    shared = _t(3, 3)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] is the same tensor as "
                                         r"param_groups\[0\]\['params'\]\[0\]"):
        muon.Muon([{"params": [shared]}, {"params": [shared]}])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"nonfinite": "zero"}, "nonfinite"),
        ({"adamw_eps": -1.0}, r"param_groups\[0\]: eps"),
        ({"betas": (0.9, 1.5)}, r"param_groups\[0\]: betas"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        muon.Muon([{"params": [_t(3)], "use_muon": False}], **kwargs)


def test_empty_parameter_list_is_refused_and_an_empty_group_is_harmless():
    with pytest.raises(ValueError, match="empty parameter list"):
        muon.Muon([])
    # A group with no parameters is legal in torch (a placeholder for later add_param_group); it steps as a no-op.
    opt, params = _hybrid()
    twin, twin_params = _hybrid()
    opt.add_param_group({"params": []})
    opt.add_param_group({"params": [], "use_muon": False})
    _train(opt, params, 2)
    _train(twin, twin_params, 2)
    assert all(bit_equal(a.detach(), b.detach()) for a, b in zip(params, twin_params))
    mine, theirs = opt.state_dict(), twin.state_dict()
    assert mine["param_groups"][:2] == theirs["param_groups"] and mine["param_groups"][2]["params"] == []
    assert_state_dicts_equal({**mine, "param_groups": []}, {**theirs, "param_groups": []})


def test_update_scale_checks_the_callable_result():
    assert muon.update_scale(lambda m, n: 0, 3, 4) == 0.0  # 0 is allowed, like lr = 0
    assert muon.update_scale(lambda m, n: torch.tensor(2.0), 3, 4) == 2.0
    assert muon.update_scale(scale_fn, 8, 2) == 1.0
    for bad in (math.nan, math.inf, -math.inf, -0.5, "1", None, True, torch.tensor([1.0, 2.0]), 1j):
        with pytest.raises(ValueError, match=r"adjust_lr_fn\(3, 4\) returned .*finite number >= 0"):
            muon.update_scale(lambda m, n, bad=bad: bad, 3, 4)


def test_adjust_lr_fn_is_checked_for_every_matrix_shape_including_flattened():
    calls = []

    def record(m, n):
        calls.append((m, n))
        return 1.0

    conv = _t(8, 3, 2, 2)
    muon.Muon([{"params": [_t(6, 10), conv, _t(0, 4)], "adjust_lr_fn": record, "flatten": True}])
    assert calls == [(6, 10), (8, 12)]  # the empty matrix is never updated, so never asked


# ---------------------------------------------------------------------------------- checkpoints
def _torch_adamw(params, steps=2):
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    _train(opt, params, steps)
    return opt


def _clones(params):
    return [p.detach().clone().requires_grad_(True) for p in params]


def test_torch_adamw_state_loads_into_adamw_groups_exactly():
    """The reported defect: 2-D params of an AdamW group turned into Muon params on load."""
    params = [torch.randn(7, dtype=torch.float64).requires_grad_(), torch.randn(4, 3, dtype=torch.float64)
              .requires_grad_()]
    theirs = _torch_adamw(params)
    mine_params = _clones(params)
    mine = muon.Muon([{"params": mine_params, "use_muon": False}], lr=1.0)
    mine.load_state_dict(copy.deepcopy(theirs.state_dict()))
    group = mine.param_groups[0]
    assert group["use_muon"] is False
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-3, (0.8, 0.95), 1e-6, 0.05)
    for p, q in zip(params, mine_params):
        assert theirs.state[p].keys() == mine.state[q].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(bit_equal(theirs.state[p][k], mine.state[q][k]) for k in theirs.state[p])
    _train(theirs, params, 3, seed=7)
    _train(mine, mine_params, 3, seed=7)
    assert "momentum_buffer" not in mine.state[mine_params[1]]
    for p, q in zip(params, mine_params):  # fp64: the AdamW groups agree with torch to rounding
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


def test_muon_state_loads_into_torch_muon_and_momentum_continues_bit_exact():
    params = [torch.randn(6, 10).requires_grad_(), torch.randn(10, 6).requires_grad_()]
    mine = muon.Muon(params, lr=0.02)
    _train(mine, params, 2)
    their_params = _clones(params)
    theirs = torch.optim.Muon(their_params, lr=0.02)
    theirs.load_state_dict(copy.deepcopy(mine.state_dict()))
    _train(mine, params, 2, seed=9)
    _train(theirs, their_params, 2, seed=9)
    for p, q in zip(params, their_params):
        assert torch.equal(mine.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"])


def test_muon_adamw_group_state_loads_into_torch_adamw():
    params = [torch.randn(7, dtype=torch.float64).requires_grad_()]
    mine = muon.Muon([{"params": params, "use_muon": False, "lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6,
                       "weight_decay": 0.05}])
    _train(mine, params, 2)
    their_params = _clones(params)
    theirs = torch.optim.AdamW(their_params)
    theirs.load_state_dict(copy.deepcopy(mine.state_dict()))
    _train(mine, params, 2, seed=9)
    _train(theirs, their_params, 2, seed=9)
    torch.testing.assert_close(params[0], their_params[0], rtol=1e-13, atol=1e-15)


def test_muon_resume_through_weights_only_load_is_bit_exact():
    opt, params = _hybrid(ns_coefficients="polar_express", lr=torch.tensor(0.02))
    _train(opt, params, 2)
    blob = io.BytesIO()
    torch.save(opt.state_dict(), blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)  # torch's default
    resumed, resumed_params = _hybrid(ns_coefficients="polar_express", lr=torch.tensor(0.02))
    with torch.no_grad():
        for p, q in zip(resumed_params, params):
            p.copy_(q)
    resumed.load_state_dict(saved)
    _assert_steps_alike(opt, params, resumed, resumed_params, steps=3)


def test_callable_adjust_lr_fn_is_saved_as_its_name_and_kept_on_load():
    opt, params = _hybrid(adjust_lr_fn=lambda m, n: 0.3 * math.sqrt(max(m, n)))
    _train(opt, params, 2)
    blob = io.BytesIO()
    torch.save(opt.state_dict(), blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    name = saved["param_groups"][0]["adjust_lr_fn"]
    assert name.startswith("callable:") and name.endswith(
        "test_callable_adjust_lr_fn_is_saved_as_its_name_and_kept_on_load.<locals>.<lambda>")
    assert callable(opt.param_groups[0]["adjust_lr_fn"])  # saving does not touch the live group

    # Loaded into an optimizer without a callable: refused, nothing changes.
    plain, plain_params = _hybrid()
    snap = Snapshot(plain)
    with pytest.raises(ValueError, match=r"state_dict\['param_groups'\]\[0\] was saved with a callable adjust_lr_fn "
                                         r"\(test_faults\..*<lambda>\)"):
        plain.load_state_dict(saved)
    snap.assert_unchanged()

    # Loaded into one built with the callable: kept, and the run resumes bit for bit.
    fn = opt.param_groups[0]["adjust_lr_fn"]
    resumed, resumed_params = _hybrid(adjust_lr_fn=fn)
    with torch.no_grad():
        for p, q in zip(resumed_params, params):
            p.copy_(q)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["adjust_lr_fn"] is fn
    _assert_steps_alike(opt, params, resumed, resumed_params, steps=2)


def _torch_muon_state(shapes):
    params = [torch.randn(s).requires_grad_() for s in shapes]
    opt = torch.optim.Muon(params, lr=0.02)
    _train(opt, params, 1)
    return copy.deepcopy(opt.state_dict())


def _torch_adamw_state(shapes, **kwargs):
    params = [torch.randn(s).requires_grad_() for s in shapes]
    opt = torch.optim.AdamW(params, **kwargs)
    _train(opt, params, 1)
    return copy.deepcopy(opt.state_dict())


def _tamper(key, value):
    def edit(sd):
        sd["state"][0][key] = value
        return sd

    return edit


def _hybrid_state(edit):
    opt, params = _hybrid()
    _train(opt, params, 1)
    return edit(copy.deepcopy(opt.state_dict()))


def _without_use_muon(sd):
    for g in sd["param_groups"]:
        del g["use_muon"]
    return sd


# (what is loaded, into which optimizer, what the error names)
REFUSED_LOADS = [
    ("torch AdamW state into Muon group",
     lambda: _torch_adamw_state([(6, 10)]), lambda: muon.Muon([_t(6, 10)]),
     r"state_dict\['param_groups'\]\[0\] is an AdamW group, but param_groups\[0\] .* a Muon group"),
    ("torch AdamW state without hint into Muon group",
     lambda: (lambda sd: (sd["param_groups"][0].pop("betas"), sd)[1])(_torch_adamw_state([(6, 10)])),
     lambda: muon.Muon([_t(6, 10)]),
     r"state_dict\['param_groups'\]\[0\]\['params'\]\[0\] \(state\[0\]\) holds \['exp_avg', 'exp_avg_sq', 'step'\]"
     r", which a Muon group does not keep"),
    ("torch Muon state into AdamW group",
     lambda: _torch_muon_state([(6, 10)]), lambda: muon.Muon([{"params": [_t(6, 10)], "use_muon": False}]),
     r"state_dict\['param_groups'\]\[0\] is a Muon group, but param_groups\[0\] .* an AdamW group"),
    ("torch Muon state without hint into AdamW group",
     lambda: (lambda sd: (sd["param_groups"][0].pop("ns_coefficients"), sd)[1])(_torch_muon_state([(6, 10)])),
     lambda: muon.Muon([{"params": [_t(6, 10)], "use_muon": False}]),
     r"\['params'\]\[0\] \(state\[0\]\) holds \['momentum_buffer'\], which an AdamW group does not keep"),
    ("muon groups swapped",
     lambda: _hybrid_state(lambda sd: sd),
     lambda: muon.Muon([{"params": [_t(6, 10), _t(6, 10), _t(10, 6), _t(3, 4, 5)], "use_muon": False},
                        {"params": [_t(7, 1), _t(4, 3)]}], **FAST),
     r"state_dict\['param_groups'\]\[0\] is a Muon group, but param_groups\[0\]"),
    ("muon state without use_muon into wrong kinds",
     lambda: _hybrid_state(_without_use_muon),
     lambda: muon.Muon([{"params": [_t(6, 10), _t(6, 10), _t(10, 6), _t(3, 4, 5)], "use_muon": False},
                        {"params": [_t(7, 1), _t(4, 3)]}], **FAST),
     r"state_dict\['param_groups'\]\[0\] is a Muon group, but param_groups\[0\]"),
    ("amsgrad", lambda: _torch_adamw_state([(7,)], amsgrad=True),
     lambda: muon.Muon([{"params": [_t(7)], "use_muon": False}]), "amsgrad"),
    ("torch Adam with L2 decay", lambda: (lambda sd: (sd["param_groups"][0].update(decoupled_weight_decay=False),
                                                      sd)[1])(_torch_adamw_state([(7,)])),
     lambda: muon.Muon([{"params": [_t(7)], "use_muon": False}]), "torch.optim.Adam"),
    ("momentum of the wrong shape", lambda: _hybrid_state(_tamper("momentum_buffer", torch.zeros(10, 6))),
     lambda: _hybrid()[0], r"\['params'\]\[0\] \(state\[0\]\): momentum_buffer is \(10, 6\)"),
    ("integer momentum", lambda: _hybrid_state(_tamper("momentum_buffer", torch.zeros(6, 10, dtype=torch.int64))),
     lambda: _hybrid()[0], "momentum_buffer is .*int64"),
    ("momentum not a tensor", lambda: _hybrid_state(_tamper("momentum_buffer", [0.0] * 60)),
     lambda: _hybrid()[0], "momentum_buffer must be a Tensor"),
    ("partial AdamW state", lambda: _hybrid_state(lambda sd: (sd["state"][4].pop("exp_avg"), sd)[1]),
     lambda: _hybrid()[0], r"\['params'\]\[0\] \(state\[4\]\) must hold all of step, exp_avg and exp_avg_sq"),
    ("bad loaded lr", lambda: _hybrid_state(lambda sd: (sd["param_groups"][1].update(lr=math.nan), sd)[1]),
     lambda: _hybrid()[0], r"cannot load state_dict\['param_groups'\]\[1\]: param_groups\[1\]: lr"),
    ("bad loaded ns_dtype", lambda: _hybrid_state(lambda sd: (sd["param_groups"][0].update(ns_dtype="torch.int8"),
                                                              sd)[1]),
     lambda: _hybrid()[0], r"cannot load state_dict\['param_groups'\]\[0\]: .*ns_dtype"),
    ("not a state dict", lambda: {"param_groups": []}, lambda: _hybrid()[0], "'state' and 'param_groups'"),
    ("group count", lambda: _hybrid_state(lambda sd: (sd["param_groups"].pop(), sd)[1]), lambda: _hybrid()[0],
     "different number of parameter groups"),
]


@pytest.mark.parametrize("saved, target, match", [c[1:] for c in REFUSED_LOADS], ids=[c[0] for c in REFUSED_LOADS])
def test_refused_load_names_the_group_and_changes_nothing(saved, target, match):
    torch.manual_seed(0)
    state_dict = saved()
    opt = target()
    params = [p for g in opt.param_groups for p in g["params"]]
    _train(opt, params, 1, seed=3)  # some state to keep
    snap = Snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    snap.assert_unchanged()


# ------------------------------------------------------------------------------ deepcopy and pickle
def test_deepcopy_steps_bit_for_bit_like_the_original():
    opt, params = _hybrid(nonfinite="raise", adjust_lr_fn=lambda m, n: 0.3 * math.sqrt(max(m, n)))
    _train(opt, params, 2)
    clone = copy.deepcopy(opt)
    assert clone.nonfinite == "raise" and clone._adamw_defaults == opt._adamw_defaults
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    assert all(p is not q and torch.equal(p, q) for p, q in zip(params, clone_params))
    _assert_steps_alike(opt, params, clone, clone_params, steps=3)
    # The copy keeps the policy (not the default "skip") and its state dict stays weights_only-safe.
    clone_params[0].grad = torch.full(clone_params[0].shape, math.nan)
    with pytest.raises(RuntimeError, match="non-finite"):
        clone.step()
    assert clone.state_dict()["param_groups"][0]["ns_dtype"] == "torch.float32"


def test_pickle_round_trip_steps_like_the_original():
    opt, params = _hybrid(adjust_lr_fn=scale_fn)
    _train(opt, params, 2)
    clone = pickle.loads(pickle.dumps(opt))
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    assert clone.process_group is None and clone.nonfinite == "skip"
    _assert_steps_alike(opt, params, clone, clone_params, steps=2)


def test_deepcopy_shares_the_process_group():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)  # deepcopy refuses it ("cannot pickle ProcessGroup")
    with pytest.raises(TypeError):
        copy.deepcopy(group)
    opt = muon.Muon([_t(3, 3)], process_group=group)
    assert copy.deepcopy(opt).process_group is opt.process_group


# ---------------------------------------------------------------------------- non-finite gradients
INJECTION_SEEDS = range(6)


@pytest.mark.parametrize("seed", INJECTION_SEEDS)
def test_nonfinite_injection_at_random_steps(seed):
    """Seeded: one parameter gets NaN/±inf gradient entries at random steps. That parameter and its state
    stay bit-identical across those steps; every other parameter and state equals a reference run in
    which the bad parameter simply had no gradient at those steps."""
    rng = random.Random(seed)
    steps = 6
    bad = seed % 6  # each parameter once: both Muon shapes of a batched bucket, tall, 3-D, AdamW 1-D and 2-D
    bad_steps = sorted(rng.sample(range(steps), rng.randint(1, 3)))
    opt, params = _hybrid(seed)
    ref, ref_params = _hybrid(seed)
    for step in range(steps):
        set_grads(params, 1000 * seed + step, draw_in_dtype=True)
        set_grads(ref_params, 1000 * seed + step, draw_in_dtype=True)
        if step in bad_steps:
            grad = params[bad].grad.view(-1)
            for _ in range(rng.randint(1, 3)):
                grad[rng.randrange(grad.numel())] = rng.choice([math.nan, math.inf, -math.inf])
            ref_params[bad].grad = None
            before = params[bad].detach().clone()
            state_before = {k: v.clone() for k, v in opt.state[params[bad]].items()}
        opt.step()
        ref.step()
        if step in bad_steps:
            assert bit_equal(params[bad].detach(), before)
            for key, value in state_before.items():
                if key != "nonfinite_skips":
                    assert bit_equal(opt.state[params[bad]][key], value), key
        for i, (p, q) in enumerate(zip(params, ref_params)):
            assert bit_equal(p.detach(), q.detach()), (step, i)
            for key, value in ref.state[q].items():
                if not (i == bad and key == "nonfinite_skips"):
                    assert bit_equal(opt.state[p][key], value), (step, i, key)
    assert opt.state[params[bad]]["nonfinite_skips"].item() == len(bad_steps)
    assert all(opt.state[p]["nonfinite_skips"].item() == 0 for i, p in enumerate(params) if i != bad)
    assert all(torch.isfinite(p).all() for p in params)


@STEP_PATHS
def test_a_parameter_made_an_inference_tensor_after_construction_is_refused_at_the_step(foreach):
    """`p.data = <inference tensor>` after the group was added: the next step refuses it, naming the
    parameter, before anything is written (the step would fail half-way on the in-place update)."""
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(8, 12, generator=gen).requires_grad_(True) for _ in range(2)]
    rest = [torch.randn(5, generator=gen).requires_grad_(True)]
    opt = make_muon([{"params": mats}, {"params": rest, "use_muon": False}], lr=0.02, foreach=foreach)
    for p in mats + rest:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    with torch.inference_mode():
        replaced = mats[1].detach() * 1.0
    mats[1].data = replaced
    before = [p.detach().clone() for p in mats + rest]
    state = {k: v.clone() for p in mats + rest for k, v in opt.state[p].items()}
    name = r"param_groups\[0\]\['params'\]\[1\] \(shape \(8, 12\)\) is an inference tensor"
    with pytest.raises(ValueError, match=name):
        opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(mats + rest, before, strict=True))
    assert {k: v for p in mats + rest for k, v in opt.state[p].items()}.keys() == state.keys()


def test_qk_clip_process_group_is_checked_at_construction():
    with pytest.raises(ValueError, match="process_group"):
        muon.QKClip(5.0, process_group="world")
