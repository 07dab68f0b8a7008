"""Learning-rate schedulers on a hybrid optimizer behave as on torch.optim.Muon + torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch

import muon


@pytest.mark.parametrize("scheduler", ["onecycle", "cyclic"])
def test_momentum_cycling_cycles_adamw_beta1_as_on_torch_adamw(scheduler):
    """Defect F: OneCycleLR(cycle_momentum=True) never cycled the AdamW groups' beta1 (it wrote an
    unused `momentum` key into them)."""
    torch.manual_seed(0)
    w, b = torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)
    b_ref = b.detach().clone().requires_grad_(True)
    opt = muon.Muon([{"params": [w]}, {"params": [b], "use_muon": False, "lr": 1e-2}], lr=0.02, backend="torch")
    ref = torch.optim.AdamW([b_ref], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)

    def make(o):
        if scheduler == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.02, 1e-2] if o is opt else 1e-2, total_steps=12,
                                                       cycle_momentum=True)  # fmt: skip
        return torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3, cycle_momentum=True,
                                                 base_momentum=0.8, max_momentum=0.9)  # fmt: skip

    sched, sched_ref = make(opt), make(ref)
    seen = set()
    for step in range(10):
        gen = torch.Generator().manual_seed(step)
        w.grad = torch.randn(w.shape, generator=gen)
        b.grad = torch.randn(b.shape, generator=gen)
        b_ref.grad = b.grad.clone()
        opt.step()
        ref.step()
        assert opt.param_groups[1]["betas"][0] == ref.param_groups[0]["betas"][0]
        seen.add(opt.param_groups[1]["betas"][0])
        torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-7)
        sched.step()
        sched_ref.step()
    assert len(seen) > 3, "beta1 did not cycle"
    # the Muon group's momentum cycles too, as on torch.optim.Muon
    assert opt.param_groups[0]["momentum"] == ref.param_groups[0]["betas"][0]
