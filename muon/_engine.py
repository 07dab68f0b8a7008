"""The fast step of `muon.Muon`: plan once, then a few batched launches per shape bucket.

The plan (`build_plan`) is made when the set of parameters with gradients, their shapes, dtypes or
devices, or a group option that shapes the work changes (`plan_key`, checked every step, costs no
device work). It holds, per group, buckets:

* a Muon bucket: every matrix of the group with the same (small side, large side), gradient and
  parameter dtype and device. A parameter maps to `count` consecutive matrices of the bucket's
  stack; tall (m > n) matrices are stored transposed, so (m, n) and (n, m) matrices share one NS
  call that runs on the small side. The bucket owns one (B, s, l) momentum stack, and
  `state[p]["momentum_buffer"]` is the parameter-shaped view of its rows; one (B, s, l) gradient
  stack is reused every step. `muon_bucket_step` is the whole update of a bucket.
* an AdamW bucket: the group's parameters of one device and dtype, updated with torch's
  multi-tensor (`torch._foreach_*`) or fused (`torch._fused_adamw_`) kernels.

Per-parameter counters (`nonfinite_skips`, AdamW `step`) are views of one vector per bucket.

The step (`execute`) first computes every gradient's finite flag (one `torch._foreach_norm` over
the whole step), then updates the buckets. Skipped parameters are handled with per-parameter masked
scalars (0-dim tensors, built with one `torch.where` per bucket), never with host syncs, so the
step has no data-dependent Python and can be captured (CUDA graphs, torch.compile).

The arithmetic per element is the same as the per-parameter reference loop in `muon.optim`, in
the same order, so both give the same bits (tests/test_step_engine.py checks it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import backends
from ._shapes import matrix_shape, update_scale
from .coefficients import Schedule, resolve_schedule
from .newton_schulz import resolve_dtype

# Group options that change the plan (what is stacked together, how NS runs); others (lr,
# weight_decay, momentum, nesterov, betas, eps of AdamW) are read every step.
MUON_PLAN_KEYS = ("flatten", "batched", "backend", "ns_dtype", "ns_coefficients", "ns_steps", "eps", "adjust_lr_fn")


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-step scalars are applied in: fp64 for fp64 tensors, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Member:
    """A parameter's place in a Muon bucket: matrices [offset, offset + count) of the stack.

    A later option (row blocks of one parameter orthogonalized separately) maps one parameter to
    several members; `view` is the only place that knows how stack rows become parameter elements.
    """

    index: int  # position in group["params"]
    param: Tensor
    offset: int
    count: int
    transposed: bool

    def view(self, stack: Tensor) -> Tensor:
        rows = stack[self.offset : self.offset + self.count]
        if self.transposed:
            rows = rows.mT
        return rows.view(self.param.shape)


@dataclass
class MuonBucket:
    members: list[Member]
    params: list[Tensor]
    grad_stack: Tensor  # (B, s, l), the gathered gradients, then the Nesterov update
    momentum: Tensor  # (B, s, l), momentum buffers of all members
    grad_views: list[Tensor]
    momentum_views: list[Tensor]
    out: Tensor  # (B, s, l) in opmath: -lr·s·NS(U) (the gradient stack when dtypes agree)
    out_views: list[Tensor]
    skips: Tensor  # (P,) int64, nonfinite_skips of each parameter
    flag_index: Tensor  # (P,) positions of the members' gradients in the step's flag vector
    matrix_flag_index: Tensor  # (B,) the same per matrix
    scales: Tensor  # (B,) fp64 update_scale of each matrix
    work: Tensor | None  # (B, s, l) fp32 copy of bf16/fp16 parameters (update in fp32 opmath)
    work_views: list[Tensor]
    run: BackendRun  # the backend's run(X, schedule, dtype)
    schedule: Schedule
    ns_dtype: torch.dtype
    opmath: torch.dtype


@dataclass
class AdamWBucket:
    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: Tensor  # (P,) fp32, torch's per-parameter `step`
    step_views: list[Tensor]
    skips: Tensor
    flag_index: Tensor
    grad_flat: Tensor  # all gradients, flattened and concatenated (the sanitized copy of a skip step)
    grad_views: list[Tensor]
    sizes: Tensor  # (P,) numel per parameter, to expand per-parameter flags to elements
    work: Tensor | None  # fp32 copy of bf16/fp16 parameters
    work_views: list[Tensor]
    opmath: torch.dtype
    fusable: bool  # torch._fused_adamw_ applies (same parameter and gradient dtype, CPU or CUDA)


@dataclass
class GroupPlan:
    index: int
    use_muon: bool
    buckets: list = field(default_factory=list)


@dataclass
class Plan:
    key: tuple
    groups: list[GroupPlan]
    flag_params: list[Tensor]  # every non-empty parameter with a gradient, in flag order
    where: list[tuple[int, int]]  # (group, position) of each, for error messages
    # the distributed part (muon.distributed.execute.Exchange): who orthogonalizes which rows, the
    # all-gather buffers, the digest ranks agree on; None in a single process
    dist: object | None = None


def _option_key(value):
    if isinstance(value, (list, tuple)):
        return tuple(_option_key(v) for v in value)
    if isinstance(value, (str, int, float, bool, type(None), torch.dtype)):
        return value
    return id(value)  # callables, tensors: identity


def plan_key(param_groups: list[dict], version: int) -> tuple:
    """Everything the plan depends on; cheap (no device work), computed every step."""
    key = [version]
    for group in param_groups:
        key.append(tuple(_option_key(group[k]) for k in MUON_PLAN_KEYS) if group["use_muon"] else False)
        key.append(
            tuple(
                (id(p), p.shape, p.dtype, p.device, g.dtype, g.device) if (g := p.grad) is not None else None
                for p in group["params"]
            )
        )
    return tuple(key)


def _zeros(shape, like: Tensor, dtype=None) -> Tensor:
    return torch.zeros(shape, dtype=dtype or like.dtype, device=like.device)


def _adopt(state: dict, key: str, view: Tensor) -> None:
    """Copy an existing state tensor (a previous plan's, a loaded state dict's) into the stack view,
    and make the view the state: `state[p][key]` stays per parameter, its storage is the stack."""
    old = state.get(key)
    if old is not None:
        view.copy_(old.reshape(view.shape) if old.shape != view.shape else old)
    state[key] = view


def build_plan(opt, key: tuple, run_for) -> Plan:
    """Buckets and stacked state for every group; adopts existing state bit for bit.

    `run_for(group, X)` returns the NS run function for the group's backend on stack X (raises a
    ValueError naming the group when it cannot run).
    """
    groups, flag_params, where = [], [], []
    for gi, group in enumerate(opt.param_groups):
        gplan = GroupPlan(gi, group["use_muon"])
        groups.append(gplan)
        with_grad = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
        flag_pos = {}
        for i, p in with_grad:
            if p.numel() > 0:
                flag_pos[i] = len(flag_params)
                flag_params.append(p)
                where.append((gi, i))
        if group["use_muon"]:
            _plan_muon_group(opt, gplan, group, with_grad, flag_pos, run_for)
        else:
            _plan_adamw_group(opt, gplan, group, with_grad, flag_pos)
    return Plan(key, groups, flag_params, where)


def _init_counter(state: dict, device) -> None:
    if "nonfinite_skips" not in state:  # absent from torch.optim.Muon / AdamW state dicts
        state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=device)


def _plan_muon_group(opt, gplan, group, with_grad, flag_pos, run_for) -> None:
    flatten = group["flatten"]
    schedule = resolve_schedule(group["ns_coefficients"], group["ns_steps"], group["eps"])
    layout: dict[tuple, list] = {}
    for i, p in with_grad:
        state = opt.state[p]
        if p.numel() == 0:  # nothing to orthogonalize; state as the reference keeps it
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            _init_counter(state, p.device)
            continue
        count, m, n = matrix_shape(p.shape, flatten)
        s, l = min(m, n), max(m, n)
        bucket = (s, l, p.dtype, p.grad.dtype, p.device)
        if not group["batched"]:
            bucket = bucket + (i,)
        layout.setdefault(bucket, []).append((i, p, count, m > n, update_scale(group["adjust_lr_fn"], m, n)))
    for (s, l, pdtype, gdtype, device, *_), entries in layout.items():
        members, offset = [], 0
        for i, p, count, transposed, _ in entries:
            members.append(Member(i, p, offset, count, transposed))
            offset += count
        B = offset
        params = [mb.param for mb in members]
        grad_stack = torch.empty((B, s, l), dtype=gdtype, device=device)
        momentum = torch.zeros((B, s, l), dtype=gdtype, device=device)
        skips = torch.zeros(len(members), dtype=torch.int64, device=device)
        momentum_views = [mb.view(momentum) for mb in members]
        for mb, view, skip in zip(members, momentum_views, skips.unbind(), strict=True):
            state = opt.state[mb.param]
            _adopt(state, "momentum_buffer", view)
            _adopt(state, "nonfinite_skips", skip)
        work = None
        if pdtype not in (torch.float32, torch.float64):
            work = torch.empty((B, s, l), dtype=torch.float32, device=device)
        ns_dtype = resolve_dtype(group["ns_dtype"], device)
        # NS returns a new tensor; copied into a stack whose per-parameter views are made once here
        # the scaled update -lr·s·O, in the parameters' opmath dtype (the gradient stack when it is that)
        out_dtype = opmath(pdtype)
        out = grad_stack if out_dtype == gdtype else torch.empty((B, s, l), dtype=out_dtype, device=device)
        gplan.buckets.append(
            MuonBucket(
                members=members,
                params=params,
                grad_stack=grad_stack,
                momentum=momentum,
                grad_views=[mb.view(grad_stack) for mb in members],
                momentum_views=momentum_views,
                out=out,
                out_views=[mb.view(out) for mb in members],
                skips=skips,
                flag_index=torch.tensor([flag_pos[mb.index] for mb in members], device=device),
                matrix_flag_index=torch.tensor(
                    [flag_pos[mb.index] for mb in members for _ in range(mb.count)], device=device
                ),
                scales=torch.tensor(
                    [e[4] for e in entries for _ in range(e[2])], dtype=torch.float64, device=device
                ),
                work=work,
                work_views=[mb.view(work) for mb in members] if work is not None else params,
                run=run_for(group, grad_stack),
                schedule=schedule,
                ns_dtype=ns_dtype,
                opmath=opmath(pdtype),
            )
        )


def _plan_adamw_group(opt, gplan, group, with_grad, flag_pos) -> None:
    layout: dict[tuple, list] = {}
    for i, p in with_grad:
        state = opt.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if p.numel() == 0:
            _init_counter(state, p.device)
            continue
        layout.setdefault((p.device, p.dtype, p.grad.dtype), []).append((i, p))
    for (device, pdtype, gdtype), entries in layout.items():
        params = [p for _, p in entries]
        steps = torch.zeros(len(params), dtype=torch.float32, device=device)
        skips = torch.zeros(len(params), dtype=torch.int64, device=device)
        step_views, skip_views = list(steps.unbind()), list(skips.unbind())
        for p, step, skip in zip(params, step_views, skip_views, strict=True):
            state = opt.state[p]
            _adopt(state, "step", step)  # a torch.optim.AdamW state keeps step on the CPU: copied here
            _adopt(state, "nonfinite_skips", skip)
        sizes = [p.numel() for p in params]
        grad_flat = torch.empty(sum(sizes), dtype=gdtype, device=device)
        grad_views = [v.view(p.shape) for v, p in zip(grad_flat.split(sizes), params, strict=True)]
        work, work_views = None, params
        if pdtype not in (torch.float32, torch.float64):
            work = torch.empty(sum(sizes), dtype=torch.float32, device=device)
            work_views = [v.view(p.shape) for v, p in zip(work.split(sizes), params, strict=True)]
        gplan.buckets.append(
            AdamWBucket(
                params=params,
                exp_avgs=[opt.state[p]["exp_avg"] for p in params],
                exp_avg_sqs=[opt.state[p]["exp_avg_sq"] for p in params],
                steps=steps,
                step_views=step_views,
                skips=skips,
                flag_index=torch.tensor([flag_pos[i] for i, _ in entries], device=device),
                grad_flat=grad_flat,
                grad_views=grad_views,
                sizes=torch.tensor(sizes, device=device),
                work=work,
                work_views=work_views,
                opmath=opmath(pdtype),
                fusable=pdtype == gdtype and device.type in ("cpu", "cuda"),
            )
        )


# ------------------------------------------------------------------------------------ execution
def finite_flags(plan: Plan) -> Tensor | None:
    """(N,) bool on the device: gradient j of plan.flag_params is finite. One multi-tensor norm."""
    if not plan.flag_params:
        return None
    norms = torch._foreach_norm([p.grad for p in plan.flag_params], float("inf"))
    return torch.stack(norms).isfinite()


def _full(value, dtype: torch.dtype, device) -> Tensor:
    """A 0-dim tensor: a Python float rounded once from double (torch.full), or a tensor cast."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.full((), value, dtype=dtype, device=device)


def _per_param(ok: Tensor | None, value, otherwise: float, dtype, device) -> Tensor:
    """(P,) or 0-dim: `value` where ok else `otherwise` (ok None: every parameter is finite)."""
    value = _full(value, dtype, device) if not isinstance(value, Tensor) or value.ndim == 0 else value.to(dtype)
    return value if ok is None else torch.where(ok, value, otherwise)


def _as_list(values: Tensor) -> list[Tensor] | Tensor:
    """Per-parameter 0-dim scalars for a multi-tensor op: one tensor for all, or a list of views."""
    return list(values.unbind()) if values.ndim else values


def muon_bucket_step(b: MuonBucket, group: dict, ok_all: Tensor | None) -> None:
    """The Muon update of one bucket: gather, momentum, NS, weight decay and update.

    ok_all None means every gradient is known finite (nonfinite="raise" checked it): no masking.
    The three phases are separate functions: the distributed step (`muon.distributed.execute`)
    runs the NS of each rank's rows of every bucket between them and gathers the results.
    """
    U, masks = muon_bucket_momentum(b, group, ok_all)
    O = bucket_ns(b, U)
    muon_bucket_apply(b, group, O, masks)


def muon_bucket_momentum(b: MuonBucket, group: dict, ok_all: Tensor | None) -> tuple[Tensor, tuple]:
    """Gather the gradients into the stack, update the momentum; returns the NS input U (B, s, l)
    and the masks (per parameter, per matrix; None when ok_all is None) the apply phase needs."""
    momentum = group["momentum"]
    device = b.grad_stack.device
    grads = [p.grad for p in b.params]
    torch._foreach_copy_(b.grad_views, grads)
    G, buf = b.grad_stack, b.momentum
    ok = ok_mat = None
    if ok_all is not None:
        ok = ok_all[b.flag_index]
        ok_mat = ok_all[b.matrix_flag_index].view(-1, 1, 1)
        # a placeholder where not finite: the lerp weight below is 0 there, and 0 * NaN is NaN
        G.masked_fill_(~ok_mat, 0)
        b.skips.add_(~ok)
    buf.lerp_(G, _per_param(ok_mat, 1.0 - momentum, 0.0, buf.dtype, device))
    U = G.lerp_(buf, momentum) if group["nesterov"] else buf
    return U, (ok, ok_mat)


def bucket_ns(b: MuonBucket, U: Tensor) -> Tensor:
    """Newton–Schulz of rows of the bucket's stack (all of them, or one rank's share)."""
    return b.run(U, b.schedule, b.ns_dtype)


def muon_bucket_apply(b: MuonBucket, group: dict, O: Tensor, masks: tuple) -> None:
    """Weight decay and the scaled update -lr·s·O of every matrix of the bucket (O: (B, s, l))."""
    lr = group["lr"]
    wd = group["weight_decay"]
    device = b.grad_stack.device
    ok, ok_mat = masks
    dtype = b.opmath
    if isinstance(lr, Tensor):
        # the reference's -lr * scale in lr's dtype (a Python factor is cast to it)
        neg_lr_scale = (-lr.to(device)) * b.scales.to(lr.dtype)
    else:
        neg_lr_scale = b.scales * -float(lr)  # in double, as Python computes -lr * scale
    scale = _per_param(ok_mat, neg_lr_scale.to(dtype).view(-1, 1, 1), 0.0, dtype, device)
    # -lr·s·O per matrix, rounded once to opmath (as the reference loop does), then one multi-tensor add
    torch.mul(O, scale, out=b.out)
    target = b.work_views
    if b.work is not None:
        torch._foreach_copy_(target, b.params)
    if wd != 0:
        decay = _per_param(ok, 1 - lr * wd, 1.0, dtype, device)
        torch._foreach_mul_(target, _as_list(decay))
    torch._foreach_add_(target, b.out_views)
    if b.work is not None:
        torch._foreach_copy_(b.params, target)


def adamw_bucket_step(b: AdamWBucket, group: dict, ok_all: Tensor | None, fused: bool) -> None:
    """torch.optim.AdamW's update (capturable formulation) of one bucket, multi-tensor."""
    lr = group["lr"]
    beta1, beta2 = group["betas"]
    wd, eps = group["weight_decay"], group["eps"]
    grads = [p.grad for p in b.params]
    if fused and ok_all is None and b.fusable:
        torch._foreach_add_(b.step_views, 1)
        torch._fused_adamw_(
            b.params, grads, b.exp_avgs, b.exp_avg_sqs, [], b.step_views,
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
        )  # fmt: skip
        return
    device = b.steps.device
    if ok_all is None:  # known finite, not fusable: the masked arithmetic below with every flag true
        ok = torch.ones(len(b.params), dtype=torch.bool, device=device)
    else:
        ok = ok_all[b.flag_index]
        torch._foreach_copy_(b.grad_views, grads)
        # zero the gradients of skipped parameters (their lerp/mul weights are 0/1, and 0 * NaN is NaN)
        ok_elem = ok.repeat_interleave(b.sizes, output_size=b.grad_flat.numel())
        b.grad_flat.masked_fill_(~ok_elem, 0)
        grads = b.grad_views
    b.steps.add_(ok)
    b.skips.add_(~ok)
    ea_dtype = b.exp_avgs[0].dtype
    torch._foreach_lerp_(b.exp_avgs, grads, _as_list(_per_param(ok, 1 - beta1, 0.0, ea_dtype, device)))
    torch._foreach_mul_(b.exp_avg_sqs, _as_list(_per_param(ok, beta2, 1.0, ea_dtype, device)))
    torch._foreach_addcmul_(b.exp_avg_sqs, grads, grads, value=1 - beta2)
    dtype = b.opmath
    # Bias corrections in fp64 for fp64 parameters; clamp: a parameter whose every step was skipped
    # has t = 0 and must not divide 0 by 0.
    t = b.steps.to(dtype).clamp_min(1)
    bias_correction1 = 1 - beta1**t
    bias_correction2_sqrt = (1 - beta2**t).sqrt()
    step_size = _per_param(ok, -lr / bias_correction1, 0.0, dtype, device)
    denom = torch._foreach_sqrt(b.exp_avg_sqs)
    torch._foreach_div_(denom, list(bias_correction2_sqrt.unbind()))
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(b.exp_avgs, denom)
    target = b.work_views
    if b.work is not None:
        torch._foreach_copy_(target, b.params)
    if wd != 0:
        decay = _per_param(ok, 1 - lr * wd, 1.0, dtype, device)
        torch._foreach_mul_(target, _as_list(decay))
    torch._foreach_addcmul_(target, updates, _as_list(step_size))
    if b.work is not None:
        torch._foreach_copy_(b.params, target)


def first_nonfinite(plan: Plan, ok_all: Tensor) -> tuple[int, int] | None:
    """(group, position) of the first parameter with a non-finite gradient (one host sync)."""
    if bool(ok_all.all()):
        return None
    return plan.where[int((~ok_all).nonzero()[0, 0])]


def execute(plan: Plan, param_groups: list[dict], ok_all: Tensor | None, fused_adamw: bool) -> None:
    for gplan in plan.groups:
        group = param_groups[gplan.index]
        for bucket in gplan.buckets:
            if gplan.use_muon:
                muon_bucket_step(bucket, group, ok_all)
            else:
                adamw_bucket_step(bucket, group, ok_all, fused_adamw)


class BackendError(ValueError, backends.BackendUnavailable):
    """A group's backend is unknown or cannot run on its parameters: a ValueError of the group's
    options, raised when the group is added (still a BackendUnavailable for code that catches that)."""


class BackendRun:
    """The backend `muon.backends.select` chose, called through its module's `run` attribute at each
    step, as the dispatcher does (instrumentation that replaces `run`, e.g. bench profile, sees it)."""

    def __init__(self, fn) -> None:
        self.fn, self.module = fn, None
        for name in backends.BACKENDS:
            module = sys.modules.get(backends._MODULES[name])
            if module is not None and getattr(module, "run", None) is fn:
                self.module = module

    def __call__(self, X: Tensor, schedule: Schedule, dtype: torch.dtype) -> Tensor:
        run = self.fn if self.module is None else self.module.run
        return run(X, schedule, dtype)


def backend_for(group: dict, X: Tensor, where: str) -> BackendRun:
    """The NS backend of the group for stack X (resolved once); a ValueError naming the group."""
    try:
        return BackendRun(backends.select(group["backend"], X))
    except backends.BackendUnavailable as exc:
        raise BackendError(f"{where}: {exc}") from None


__all__ = ["Plan", "build_plan", "execute", "finite_flags", "first_nonfinite", "plan_key"]
