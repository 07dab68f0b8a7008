"""Group keys and optimizer options: a misspelt or foreign key, ns_steps < 1 and a non-boolean
foreach are errors at construction that name what is wrong (torch.optim ignores them silently)."""

from __future__ import annotations

import pytest
import torch

import muon


def _w(*shape):
    return torch.randn(shape, requires_grad=True)


@pytest.mark.parametrize("group, message", [
    ({"params": [_w(4, 4)], "wieght_decay": 0.1}, r"'wieght_decay'.*did you mean 'weight_decay'"),
    ({"params": [_w(4, 4)], "nesterv": False}, r"'nesterv'.*did you mean 'nesterov'"),
    ({"params": [_w(4)], "use_muon": False, "beta": (0.9, 0.99)}, r"'beta'.*did you mean 'betas'"),
    ({"params": [_w(4, 4)], "betas": (0.9, 0.99)}, r"'betas' is an option of AdamW groups"),
    ({"params": [_w(4)], "use_muon": False, "nesterov": True}, r"'nesterov' is an option of Muon groups"),
    ({"params": [_w(4)], "use_muon": False, "momentum": 0.9}, r"'momentum' is an option of Muon groups"),
    ({"params": [_w(4, 4)], "zzz": 1}, r"'zzz'.*valid keys"),
])  # fmt: skip
def test_misspelt_and_foreign_group_keys_are_refused(group, message):
    with pytest.raises(ValueError, match=r"param_groups\[0\]: unknown key .*" + message):
        muon.Muon([group])


def test_metadata_keys_are_accepted():
    muon.Muon([{"params": [_w(4, 4)], "name": "hidden", "initial_lr": 0.02},
               {"params": [_w(4)], "use_muon": False, "name": "rest"}])  # fmt: skip


def test_adamw_groups_carry_only_adamw_keys():
    opt = muon.Muon([{"params": [_w(4, 4)]}, {"params": [_w(4)], "use_muon": False}])
    assert set(opt.param_groups[1]) == {"params", "use_muon", "lr", "betas", "eps", "weight_decay",
                                        "cautious_weight_decay", "state_dtype"}  # fmt: skip


@pytest.mark.parametrize("steps", [0, -1])
def test_ns_steps_below_one_is_refused_pointing_to_sgd(steps):
    with pytest.raises(ValueError, match=r"ns_steps must be >= 1.*momentum SGD"):
        muon.Muon([_w(4, 4)], ns_steps=steps)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: ns_steps must be >= 1"):
        muon.Muon([{"params": [_w(4, 4)], "ns_steps": steps}])


@pytest.mark.parametrize("foreach", ["yes", 1, 0.0])
def test_foreach_takes_none_true_or_false(foreach):
    with pytest.raises(ValueError, match="foreach must be None"):
        muon.Muon([_w(4, 4)], foreach=foreach)
