"""Atomic steps: an exception anywhere inside step() leaves every parameter and state tensor
bit-identical to before the call (the planned step and the reference loop alike), and retrying the
step then gives what an uninterrupted step gives."""

from __future__ import annotations

import pytest
import torch
from helpers import STEP_PATHS, assert_same, assert_snapshot, make_muon, params_of, set_grads, snapshot

import muon.backends.torch_backend as torch_backend


def _make(foreach, **options):
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 12), (12, 8), (4, 6), (2, 6, 4), (6, 6)]
    mats = [torch.randn(s, generator=gen).requires_grad_(True) for s in shapes]
    bf16 = [torch.randn(5, 7, generator=gen).to(torch.bfloat16).requires_grad_(True)]
    rest = [torch.randn(s, generator=gen).requires_grad_(True) for s in [(12,), (5, 3)]]
    return make_muon([{"params": mats}, {"params": bf16, "variant": "normuon"},
                      {"params": rest, "use_muon": False}],
                     lr=0.02, backend="torch", foreach=foreach, **options)  # fmt: skip


class _FailOnCall:
    """Replaces the torch backend's run: the n-th NS call raises `error`."""

    def __init__(self, monkeypatch, n: int, error: BaseException) -> None:
        self.calls, self.n, self.error, self.run = 0, n, error, torch_backend.run
        monkeypatch.setattr(torch_backend, "run", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise self.error
        return self.run(*args, **kwargs)


@STEP_PATHS
@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("CUDA out of memory (simulated)")],
                         ids=["interrupt", "oom"])
@pytest.mark.parametrize("options", [{}, {"cautious_weight_decay": True, "nonfinite": "raise"}], ids=["plain", "raise"])
def test_an_exception_in_the_second_ns_call_changes_nothing(monkeypatch, foreach, error, options):
    """Defect D: earlier buckets were updated and later momentum advanced; a retry counted the
    gradient twice."""
    opt, clean = _make(foreach, **options), _make(foreach, **options)
    for o in (opt, clean):
        set_grads(params_of(o), 1)
        o.step()
        set_grads(params_of(o), 2)
    snap = snapshot(opt)
    failing = _FailOnCall(monkeypatch, 2, error)
    with pytest.raises(type(error)):
        opt.step()
    assert failing.calls == 2
    assert_snapshot(opt, snap)
    monkeypatch.setattr(torch_backend, "run", failing.run)
    opt.step()  # the retry: the same gradients, counted once
    clean.step()
    assert_same(opt, clean)


@STEP_PATHS
def test_a_failing_first_step_creates_no_state(monkeypatch, foreach):
    opt = _make(foreach)
    set_grads(params_of(opt), 1)
    _FailOnCall(monkeypatch, 1, RuntimeError("backend failure"))
    with pytest.raises(RuntimeError, match="backend failure"):
        opt.step()
    assert len(opt.state) == 0


def test_a_failure_while_building_the_plan_changes_nothing():
    opt = _make(None)
    set_grads(params_of(opt), 1)
    opt.step()
    p = params_of(opt)[2]
    opt.state[p]["momentum_buffer"] = torch.zeros(2, 2)  # refused when the next plan is built
    snap = snapshot(opt)
    set_grads(params_of(opt), 2)
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.step()
    assert_snapshot(opt, snap)
