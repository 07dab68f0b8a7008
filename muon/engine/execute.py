"""One step of a plan: every group and bucket computed first, then committed.

`execute(plan, param_groups, ok_all, fused_adamw)` runs, per group,

1. Muon buckets: gather the gradients into the stack, the next momentum and the NS input
   (`muon.functional.muon_momentum`), the NS phase (`local_ns` in one process; the distributed
   package passes its own: rows split and all-gathered for replicated parameters, owner
   all-to-alls for FSDP2), then the scaled update (NorMuon's normalization for variant="normuon"),
   the decay factors (cautious: per element) and the fp32 work copies of bf16/fp16 parameters;
2. AdamW buckets: the next moments, steps, updates and decay factors (`muon.functional.adamw_moments`);

and only then commits: the plan's tensors become the optimizer's state on the plan's first step
(`plan.install`), and every pending write runs — momentum, moments, counters and parameters, with
in-place copies, multiplies and adds into tensors that exist already. Everything that can fail (a
backend, an out-of-memory, a collective, an interrupt raised by code the step calls) happens
before the first write, so **a step that raises changes nothing**: parameters and state keep their
bits. The price is memory held until the commit: per Muon bucket the next momentum (the size of
the momentum stack) and per AdamW bucket the next moments and the update (three times the
parameters' size, where the in-place update needed two temporaries), plus per-element decay
factors with cautious weight decay.

Skipped parameters (non-finite gradients) are handled with per-parameter masked scalars (0-dim
tensors), never with host syncs, so the step has no data-dependent Python and can be captured
(CUDA graphs, torch.compile). The arithmetic per element is that of the reference loop
(`muon.reference`), which calls the same functions on one parameter at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import functional as F
from .plan import AdamWBucket, GroupPlan, MuonBucket, Plan, fill, install, local


def finite_flags(plan: Plan) -> Tensor | None:
    """(N,) bool on the device: gradient j of plan.flag_params is finite. One multi-tensor norm."""
    if not plan.flag_params:
        return None
    # DTensor gradients: the local shard's flag; the ranks agree them
    grads = [local(p.grad) for p in plan.flag_params]
    if any(g.numel() == 0 for g in grads):  # a rank holding no rows of a sharded parameter: finite
        nonempty = [g for g in grads if g.numel() > 0]
        norms = iter(torch._foreach_norm(nonempty, float("inf")) if nonempty else ())
        zero = torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
        return torch.stack([next(norms) if g.numel() > 0 else zero for g in grads]).isfinite()
    norms = torch._foreach_norm(grads, float("inf"))
    return torch.stack(norms).isfinite()


def first_nonfinite(plan: Plan, ok_all: Tensor) -> tuple[int, int] | None:
    """(group, position) of the first parameter with a non-finite gradient (one host sync)."""
    if bool(ok_all.all()):
        return None
    return plan.where[int((~ok_all).nonzero()[0, 0])]


@dataclass
class MomentumPhase:
    """A Muon bucket after its momentum: the NS input and what the commit needs."""

    U: Tensor  # (B, s, l) NS input
    next_momentum: Tensor
    ok: Tensor | None  # (P,) finite flags of the members (None: all finite)
    ok_mat: Tensor | None  # (B, 1, 1) the same per matrix


def muon_momentum(b: MuonBucket, group: dict, ok_all: Tensor | None) -> MomentumPhase:
    """Gather the gradients into the stack (sanitized where not finite), the next momentum and
    the NS input U (B, s, l); writes only the plan's scratch."""
    momentum = group["momentum"]
    device = b.grad_stack.device
    if b.mirrors is not None:  # block members: their parameters' momentum buffers into the stack
        torch._foreach_copy_(b.mirrors[0], b.mirrors[1])
    torch._foreach_copy_(b.grad_views, b.grads())
    G, buf = b.grad_stack, b.momentum
    ok = ok_mat = None
    if ok_all is not None:
        ok = ok_all[b.flag_index]
        ok_mat = ok_all[b.matrix_flag_index].view(-1, 1, 1)
        # a placeholder where not finite: the lerp weight below is 0 there, and 0 * NaN is NaN
        G.masked_fill_(~ok_mat, 0)
    weight = F.masked(ok_mat, 1.0 - momentum, 0.0, buf.dtype, device)
    nxt, U = F.muon_momentum(buf, G, weight, momentum, group["nesterov"])
    return MomentumPhase(U, nxt, ok, ok_mat)


def bucket_ns(b: MuonBucket, U: Tensor) -> Tensor:
    """Newton–Schulz of rows of the bucket's stack (all of them, or one rank's share)."""
    return b.run(U, b.schedule, b.ns_dtype)


def local_ns(plan: Plan, gplan: GroupPlan, phases: list[MomentumPhase]) -> list[Tensor]:
    """The NS phase of one process: every bucket's stack, one batched call each."""
    return [bucket_ns(b, ph.U) for b, ph in zip(gplan.buckets, phases, strict=True)]


def muon_update(b: MuonBucket, group: dict, O: Tensor, ph: MomentumPhase):
    """After NS: the scaled update -lr·s·O' (O' = O, or NorMuon's normalized O) into b.out, the
    decay factors; returns the bucket's commit (W = W·decay + update, momentum, counters, moments).

    Per-bucket math only: it does not matter where O (B, s, l) was computed (one process, or each
    rank's rows gathered)."""
    lr, wd = group["lr"], group["weight_decay"]
    device, dtype = b.out.device, b.opmath
    if isinstance(lr, Tensor):
        # the reference's -lr * scale in lr's dtype (a Python factor is cast to it)
        neg_lr_scale = (-lr.to(device)) * b.scales.to(lr.dtype)
    else:
        neg_lr_scale = b.scales * -float(lr)  # in double, as Python computes -lr * scale
    scale = F.masked(ph.ok_mat, neg_lr_scale.to(dtype).view(-1, 1, 1), 0.0, dtype, device)
    moments = None
    if b.normuon is not None:
        nm = b.normuon
        b.out.copy_(O)  # O in opmath (the gradient stack when that is its dtype: U is not needed any more)
        moments = F.normuon_update(b.out, scale, group["normuon_beta2"], group["normuon_eps"], nm.rows, nm.cols,
                                   nm.row_matrices, ph.ok_mat)  # fmt: skip
    else:
        torch.mul(O, scale, out=b.out)  # -lr·s·O per matrix, rounded once to opmath
    params = b.params
    work = b.work_stack_views if b.work is not None else None
    target = F.opmath_view(params, work)
    # W·decay only where the update u (W -= lr·s·u, so out = -lr·s·u) agrees in sign with W
    decay = F.decay_factors(ph.ok, lr, wd, group.get("cautious_weight_decay", False), target, b.out_views,
                            1, dtype, device)  # fmt: skip
    skipped = None if ph.ok is None else ~ph.ok

    def commit() -> None:
        b.momentum.copy_(ph.next_momentum)
        if skipped is not None:
            b.skips.add_(skipped)
        if moments is not None:
            for stack, value in zip((b.normuon.rows, b.normuon.cols), moments, strict=True):
                if stack is not None:
                    stack.copy_(value)
        F.commit_update(params, work, decay, b.out_views)
        if b.mirrors is not None:
            torch._foreach_copy_(b.mirrors[1], b.mirrors[0])

    return commit


def adamw_update(b: AdamWBucket, group: dict, ok_all: Tensor | None, fused: bool):
    """torch.optim.AdamW's update of one bucket on its flat stacks; returns its commit."""
    lr = group["lr"]
    beta1, beta2 = group["betas"]
    wd, eps = group["weight_decay"], group["eps"]
    params = b.local_params()
    grads = [local(p.grad) for p in b.params]
    cautious = group.get("cautious_weight_decay", False) and wd != 0
    if fused and ok_all is None and b.fusable and not cautious:
        # every gradient is known finite (nonfinite="raise" checked it): one fused kernel in place,
        # at the commit
        def commit_fused() -> None:
            torch._foreach_add_(b.step_views, 1)
            torch._fused_adamw_(
                params, grads, b.exp_avg_views, b.exp_avg_sq_views, [], b.step_views,
                lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
            )  # fmt: skip

        return commit_fused
    torch._foreach_copy_(b.grad_views, grads)
    ok = ok_elem = None
    if ok_all is not None:
        ok = ok_all[b.flag_index]
        # zero the gradients of skipped parameters (their lerp/mul weights are 0/1, and 0 * NaN is NaN)
        ok_elem = ok.repeat_interleave(b.sizes, output_size=b.grad_flat.numel())
        b.grad_flat.masked_fill_(~ok_elem, 0)
    dtype = b.opmath
    exp_avg, exp_avg_sq, steps, step_size = F.adamw_moments(
        b.exp_avg, b.exp_avg_sq, b.grad_flat, b.steps, ok, ok_elem, b.sizes, beta1, beta2, eps, lr, dtype, b.update
    )
    work = b.work_views if b.work is not None else None
    target = F.opmath_view(params, work)
    # cautious: update = m̂/(sqrt(v̂)+eps) is u up to the positive lr/bias_correction1
    decay = F.decay_factors(ok, lr, wd, cautious, target, b.update_views, -1, dtype, b.steps.device)
    skipped = None if ok is None else ~ok

    def commit() -> None:
        b.exp_avg.copy_(exp_avg)
        b.exp_avg_sq.copy_(exp_avg_sq)
        b.steps.copy_(steps)
        if skipped is not None:
            b.skips.add_(skipped)
        F.commit_update(params, work, decay, b.update_views, step_size)

    return commit


def execute(plan: Plan, param_groups: list[dict], ok_all: Tensor | None, fused_adamw: bool, ns_phase=None) -> None:
    """One step (module docstring). ok_all: the finite flags (agreed across ranks), None when all
    are known finite; ns_phase(plan, gplan, phases) -> per bucket its NS result (default `local_ns`)."""
    ns_phase = ns_phase or local_ns
    if not plan.installed:
        fill(plan)
    commits = []
    for gplan in plan.groups:
        group = param_groups[gplan.index]
        if not gplan.use_muon:
            commits.extend(adamw_update(b, group, ok_all, fused_adamw) for b in gplan.buckets)
        elif gplan.buckets:
            phases = [muon_momentum(b, group, ok_all) for b in gplan.buckets]
            results = ns_phase(plan, gplan, phases)
            for b, ph, O in zip(gplan.buckets, phases, results, strict=True):
                commits.append(muon_update(b, group, O, ph))
    # the commit: nothing below allocates a large tensor or calls code that can fail
    if not plan.installed:
        install(plan)
    for commit in commits:
        commit()


__all__ = ["MomentumPhase", "bucket_ns", "execute", "finite_flags", "first_nonfinite", "local_ns"]
