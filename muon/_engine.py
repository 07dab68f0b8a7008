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
  With `split`/`heads` a parameter's matrices are cut into row blocks first (`muon._shapes.
  block_layout`), and blocks of one shape (across parameters and layers) share a bucket, each with
  the update scale of its own shape. Equal blocks that are not tall are stacked as the parameter
  itself (one member, momentum a view, as above); unequal or tall blocks are block members, and
  their bucket keeps each parameter's momentum_buffer as the parameter's own tensor, copied into
  the stack before the bucket's step and back after it (`mirror_in`/`mirror_out`).
* an AdamW bucket: the group's parameters of one device and dtype, updated with torch's
  multi-tensor (`torch._foreach_*`) or fused (`torch._fused_adamw_`) kernels.

Per-parameter counters (`nonfinite_skips`, AdamW `step`) are views of one vector per bucket.

After NS, `muon_bucket_apply` scales the stack (NorMuon's per-neuron normalization for
variant="normuon", `normuon_apply`), applies weight decay (cautious: a per-element factor from the
signs of update and parameter, `cautious_decay`) and adds the update: per-bucket math that does not
depend on where the NS ran.

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
from ._shapes import block_layout, matrix_shape, row_blocks, update_scale
from .backends.dispatch import choose_algorithm
from .coefficients import Schedule, resolve_schedule
from .newton_schulz import DEFAULT_RESTARTS, resolve_dtype

# Group options that change the plan (what is stacked together, how NS runs); others (lr,
# weight_decay, momentum, nesterov, betas, eps of AdamW) are read every step.
MUON_PLAN_KEYS = (
    "flatten", "batched", "backend", "ns_dtype", "ns_coefficients", "ns_steps", "eps", "adjust_lr_fn", "variant",
    "split", "heads", "ns_algorithm",
)  # fmt: skip


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (its `_local_tensor`, an attribute read: no dispatch, and it
    follows FSDP2 re-pointing a parameter at new storage), or t itself."""
    return getattr(t, "_local_tensor", t) if type(t).__name__ == "DTensor" else t


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-step scalars are applied in: fp64 for fp64 tensors, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Member:
    """A parameter's place in a Muon bucket: matrices [offset, offset + count) of the stack.

    A whole member is a parameter (or one split into equal, not tall row blocks, which is then the
    contiguous stack of its blocks): `view` gives the parameter's shape. A block member is rows
    [row, row + rows) of each of the parameter's matrices (`split`/`heads` with unequal or tall
    blocks): `view` gives (count, rows, n) and `source` cuts the same block out of the parameter or
    its gradient. `view` and `source` are the only places that know how stack rows become
    parameter elements.
    """

    index: int  # position in group["params"]
    param: Tensor
    offset: int
    count: int
    transposed: bool
    row: int | None = None  # first row of the block; None: a whole member
    rows: int = 0
    matrix: tuple[int, int, int] = (0, 0, 0)  # (count, m, n) of the parameter, for block members

    @property
    def owner(self) -> bool:
        """Whether this member keeps the parameter's counters (the first block of a split parameter)."""
        return self.row is None or self.row == 0

    def view(self, stack: Tensor) -> Tensor:
        rows = stack[self.offset : self.offset + self.count]
        if self.transposed:
            rows = rows.mT
        return rows.view(self.param.shape) if self.row is None else rows

    def source(self, t: Tensor, *, write: bool = False) -> Tensor:
        """The member's part of a parameter-shaped tensor t (a view; with write=True t must be viewable)."""
        if self.row is None:
            return t
        t = t.view(self.matrix) if write else t.reshape(self.matrix)
        return t[:, self.row : self.row + self.rows]


@dataclass
class NorMuonStacks:
    """NorMuon's per-neuron second moments of a bucket (`normuon_apply`).

    A neuron is a row of the parameter's m×n matrix (an output feature). In the (B, s, l) stack that
    is a stack row for matrices stored as they are (m <= n) and a stack column for tall matrices
    stored transposed. `rows` (B, s) holds the moments of the first kind, `cols` (B, l) of the second
    (None when the bucket has no matrix of that kind); `state[p]["normuon_v"]` is the
    parameter's view of one of them, shaped like the parameter without its last dim (flatten: (m,)).
    The entries of the other kind's matrices are unused (kept at zero).
    """

    rows: Tensor | None
    cols: Tensor | None
    row_matrices: Tensor | None  # (B, 1) bool: the matrix's neurons are stack rows; None: all or none are


@dataclass
class MuonBucket:
    members: list[Member]
    whole_params: list[Tensor]  # the members' parameters (`params` cuts block members out of them)
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
    work_stack_views: list[Tensor]  # per member, its view of `work` (empty without work)
    run: BackendRun  # the backend's run(X, schedule, dtype)
    schedule: Schedule
    ns_dtype: torch.dtype
    opmath: torch.dtype
    normuon: NorMuonStacks | None = None  # variant="normuon"
    algorithm: str = "standard"  # the NS algorithm of the bucket ("auto" resolved at plan time)
    # Block members keep the parameter's momentum_buffer as their own tensor: (stack views, the same
    # blocks of the momentum buffers), copied into the stack before the step and back after it.
    mirrors: tuple[list[Tensor], list[Tensor]] | None = None
    # Row-sharded DTensor (FSDP2) members (`muon.distributed.sharded`): the stacks hold the local
    # rows only; params and gradients are the parameters' local shards, read every step.
    sharded: bool = False
    exchange: object | None = None  # sharded row buckets: muon.distributed.sharded.RowExchange

    @property
    def params(self) -> list[Tensor]:
        """Per member, the parameter elements it updates (block members: a view of their rows,
        taken every step so that it follows the parameter's storage)."""
        if self.sharded:
            return [local(p) for p in self.whole_params]
        if self.mirrors is None:
            return self.whole_params
        return [mb.source(mb.param, write=True) for mb in self.members]

    @property
    def work_views(self) -> list[Tensor]:
        """What the update is computed in: the work stack's views, or the parameters themselves."""
        return self.work_stack_views if self.work is not None else self.params

    def grads(self) -> list[Tensor]:
        if self.sharded:
            return [local(p.grad) for p in self.whole_params]
        if self.mirrors is None:
            return [p.grad for p in self.whole_params]
        return [mb.source(mb.param.grad) for mb in self.members]


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
    # DTensor (FSDP2) parameters: params holds the DTensors, everything else their local shards
    sharded: bool = False

    def local_params(self) -> list[Tensor]:
        return [local(p) for p in self.params] if self.sharded else self.params

    def targets(self, params: list[Tensor]) -> list[Tensor]:
        return self.work_views if self.work is not None else params


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


def _adopt(state: dict, key: str, view: Tensor) -> None:
    """Copy an existing state tensor (a previous plan's, a loaded state dict's) into the stack view,
    and make the view the state: `state[p][key]` stays per parameter, its storage is the stack."""
    old = state.get(key)
    if old is not None:
        view.copy_(old.reshape(view.shape) if old.shape != view.shape else old)
    state[key] = view


def build_plan(opt, key: tuple, run_for, plan_muon=None) -> Plan:
    """Buckets and stacked state for every group; adopts existing state bit for bit.

    `run_for(group, X, algorithm)` returns the NS run function for the group's backend and NS
    algorithm ("standard" or "gram") on stack X (raises a ValueError naming the group when it cannot run).
    plan_muon: the planner of Muon groups, `_plan_muon_group`'s signature (None: that one); FSDP2
    (DTensor) parameters use `muon.distributed.sharded.plan_muon_group`.
    """
    plan_muon = plan_muon or _plan_muon_group
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
            plan_muon(opt, gplan, group, with_grad, flag_pos, run_for)
        else:
            _plan_adamw_group(opt, gplan, group, with_grad, flag_pos)
    return Plan(key, groups, flag_params, where)


def _init_counter(state: dict, device) -> None:
    if "nonfinite_skips" not in state:  # absent from torch.optim.Muon / AdamW state dicts
        state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=device)


def _plan_muon_group(opt, gplan, group, with_grad, flag_pos, run_for) -> None:
    flatten = group["flatten"]
    split, heads = group.get("split"), group.get("heads")
    schedule = resolve_schedule(group["ns_coefficients"], group["ns_steps"], group["eps"])
    layout: dict[tuple, list] = {}
    for i, p in with_grad:
        state = opt.state[p]
        if p.numel() == 0:  # nothing to orthogonalize; state as the reference keeps it
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            if group["variant"] == "normuon" and "normuon_v" not in state:
                state["normuon_v"] = torch.zeros(
                    neuron_shape(p.shape, flatten), dtype=opmath(p.dtype), device=p.device
                )
            _init_counter(state, p.device)
            continue
        count, m, n = matrix_shape(p.shape, flatten)
        for row, r, matrices in block_layout(count, m, n, row_blocks(m, split, heads)):
            s, l = min(r, n), max(r, n)
            bucket = (s, l, p.dtype, p.grad.dtype, p.device)
            if not group["batched"]:
                bucket = bucket + (i,)
            # the update scale of a block is the block's own s(rows, n): what a separate parameter
            # of the block's shape would get
            member = Member(i, p, 0, matrices, r > n, row, r, (count, m, n))
            layout.setdefault(bucket, []).append((member, update_scale(group["adjust_lr_fn"], r, n)))
    for (s, l, pdtype, gdtype, device, *_), entries in layout.items():
        members, offset = [], 0
        for member, _ in entries:
            member.offset = offset
            members.append(member)
            offset += member.count
        B = offset
        grad_stack = torch.empty((B, s, l), dtype=gdtype, device=device)
        momentum = torch.zeros((B, s, l), dtype=gdtype, device=device)
        skips = torch.zeros(len(members), dtype=torch.int64, device=device)
        momentum_views = [mb.view(momentum) for mb in members]
        mirrors = None
        if any(mb.row is not None for mb in members):
            mirrors = ([], [])
            for mb in members:  # every member through the mirror lists: one copy each way per step
                mirrors[0].append(momentum_views[len(mirrors[0])])
                mirrors[1].append(mb.source(_momentum_of(opt.state[mb.param], mb.param), write=True))
            torch._foreach_copy_(mirrors[0], mirrors[1])
        for mb, view, skip in zip(members, momentum_views, skips.unbind(), strict=True):
            state = opt.state[mb.param]
            if mirrors is None:
                _adopt(state, "momentum_buffer", view)
            if mb.owner:  # a split parameter counts its skipped steps once, at its first block
                _adopt(state, "nonfinite_skips", skip)
        work = None
        if pdtype not in (torch.float32, torch.float64):
            work = torch.empty((B, s, l), dtype=torch.float32, device=device)
        ns_dtype = resolve_dtype(group["ns_dtype"], device)
        algorithm = _algorithm(group, grad_stack, schedule, ns_dtype)
        # NS returns a new tensor; copied into a stack whose per-parameter views are made once here
        # the scaled update -lr·s·O, in the parameters' opmath dtype (the gradient stack when it is that)
        out_dtype = opmath(pdtype)
        out = grad_stack if out_dtype == gdtype else torch.empty((B, s, l), dtype=out_dtype, device=device)
        normuon = None
        if group["variant"] == "normuon":  # split/heads groups refuse NorMuon at construction
            normuon = _plan_normuon(opt, members, B, s, l, opmath(pdtype), device, flatten)
        bucket = MuonBucket(
            normuon=normuon,
            members=members,
            whole_params=[mb.param for mb in members],
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
                [scale for mb, scale in entries for _ in range(mb.count)], dtype=torch.float64, device=device
            ),
            work=work,
            work_stack_views=[mb.view(work) for mb in members] if work is not None else [],
            run=run_for(group, grad_stack, algorithm),
            schedule=schedule,
            ns_dtype=ns_dtype,
            opmath=opmath(pdtype),
            algorithm=algorithm,
            mirrors=mirrors,
        )
        if mirrors is not None:
            _check_writable(bucket, gplan.index)
        gplan.buckets.append(bucket)


def _momentum_of(state: dict, p: Tensor) -> Tensor:
    """The parameter-shaped momentum buffer a split parameter keeps as its own tensor."""
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.contiguous_format)
    elif buf._base is not None or not buf.is_contiguous() or buf.dtype != p.grad.dtype:
        # a view of an earlier plan's stack, or a loaded tensor: a contiguous tensor of its own
        buf = state["momentum_buffer"] = buf.to(dtype=p.grad.dtype, memory_format=torch.contiguous_format, copy=True)
    return buf


def _check_writable(bucket: MuonBucket, index: int) -> None:
    for mb in bucket.members:
        try:
            mb.source(mb.param, write=True)
        except RuntimeError:
            raise ValueError(
                f"param_groups[{index}]['params'][{mb.index}] (shape {tuple(mb.param.shape)}, strides "
                f"{mb.param.stride()}) cannot be cut into row blocks in place; split/heads need parameters "
                "viewable as (matrices, rows, columns), e.g. contiguous"
            ) from None


def _algorithm(group: dict, X: Tensor, schedule: Schedule, ns_dtype: torch.dtype) -> str:
    """The group's ns_algorithm for stack X; "auto" resolved as `muon.newton_schulz.orthogonalize` does."""
    algorithm = group.get("ns_algorithm", "standard")
    if algorithm == "auto":
        algorithm = choose_algorithm(
            X.shape[-2], X.shape[-1], X.device, ns_dtype, steps=schedule.steps, restarts=DEFAULT_RESTARTS
        )
        if algorithm == "gram" and not backends.has_gram(group["backend"], X):
            algorithm = "standard"
    return algorithm


def mirror_in(b: MuonBucket) -> None:
    """Block members: the parameters' momentum buffers into the stack (they may have been changed
    outside the plan, e.g. by the reference loop)."""
    if b.mirrors is not None:
        torch._foreach_copy_(b.mirrors[0], b.mirrors[1])


def mirror_out(b: MuonBucket) -> None:
    if b.mirrors is not None:
        torch._foreach_copy_(b.mirrors[1], b.mirrors[0])


def neuron_shape(shape: torch.Size, flatten: bool) -> tuple[int, ...]:
    """Shape of NorMuon's `normuon_v` for a parameter: one entry per row of each of its matrices."""
    return tuple(shape[:1]) if flatten else tuple(shape[:-1])


def _plan_normuon(opt, members: list[Member], B: int, s: int, l: int, dtype, device, flatten: bool) -> NorMuonStacks:
    """The bucket's second-moment stacks (in opmath: fp32, fp64 for fp64 parameters); adopts state."""
    tall = [mb.transposed for mb in members for _ in range(mb.count)]
    rows = torch.zeros((B, s), dtype=dtype, device=device) if not all(tall) else None
    cols = torch.zeros((B, l), dtype=dtype, device=device) if any(tall) else None
    row_matrices = None
    if rows is not None and cols is not None:
        row_matrices = torch.tensor([not t for t in tall], device=device).view(B, 1)
    for mb in members:
        stack = cols if mb.transposed else rows
        view = stack[mb.offset : mb.offset + mb.count].view(neuron_shape(mb.param.shape, flatten))
        _adopt(opt.state[mb.param], "normuon_v", view)
    return NorMuonStacks(rows, cols, row_matrices)


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
        shards = [local(p) for p in params]  # DTensors: the local shards (foreach over those)
        sizes = [p.numel() for p in shards]
        grad_flat = torch.empty(sum(sizes), dtype=gdtype, device=device)
        grad_views = [v.view(p.shape) for v, p in zip(grad_flat.split(sizes), shards, strict=True)]
        work, work_views = None, []
        if pdtype not in (torch.float32, torch.float64):
            work = torch.empty(sum(sizes), dtype=torch.float32, device=device)
            work_views = [v.view(p.shape) for v, p in zip(work.split(sizes), shards, strict=True)]
        gplan.buckets.append(
            AdamWBucket(
                params=params,
                exp_avgs=[local(opt.state[p]["exp_avg"]) for p in params],
                exp_avg_sqs=[local(opt.state[p]["exp_avg_sq"]) for p in params],
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
                sharded=shards[0] is not params[0],
            )
        )


# ------------------------------------------------------------------------------------ execution
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
    grads = b.grads()
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
    """After NS: W = W·decay + (-lr·s·O'), O' = O (Muon) or NorMuon's normalized O, on the stack.

    Per-bucket math only: it does not matter where O (B, s, l) was computed (one process, or each
    rank's rows gathered). masks: the (P,)/(B, 1, 1) finite flags of the members/matrices from
    `muon_bucket_momentum`, None when all are finite.
    """
    lr, wd = group["lr"], group["weight_decay"]
    ok, ok_mat = masks
    device, dtype = b.out.device, b.opmath
    if isinstance(lr, Tensor):
        # the reference's -lr * scale in lr's dtype (a Python factor is cast to it)
        neg_lr_scale = (-lr.to(device)) * b.scales.to(lr.dtype)
    else:
        neg_lr_scale = b.scales * -float(lr)  # in double, as Python computes -lr * scale
    scale = _per_param(ok_mat, neg_lr_scale.to(dtype).view(-1, 1, 1), 0.0, dtype, device)
    if b.normuon is not None:
        normuon_apply(b, group, O, scale, ok_mat)
    else:
        # -lr·s·O per matrix, rounded once to opmath (as the reference loop does)
        torch.mul(O, scale, out=b.out)
    target = b.work_views
    if b.work is not None:
        torch._foreach_copy_(target, b.params)
    if wd != 0:
        decay = _per_param(ok, 1 - lr * wd, 1.0, dtype, device)
        if group.get("cautious_weight_decay", False):
            # W·decay only where the update u (W -= lr·s·u, so out = -lr·s·u) agrees in sign with W
            decay = cautious_decay(target, b.out_views, decay, against=1)
        else:
            decay = _as_list(decay)
        torch._foreach_mul_(target, decay)
    torch._foreach_add_(target, b.out_views)  # one multi-tensor add of the scaled update
    if b.work is not None:
        torch._foreach_copy_(b.params, target)


def cautious_decay(target: list[Tensor], direction: list[Tensor], decay: Tensor, against: int) -> list[Tensor]:
    """Per-element decay factors of cautious weight decay (Chen et al. 2025, arXiv 2510.12402):
    `decay` where u·W >= 0, 1 where u·W < 0, u the update subtracted from W.

    `direction` is u times a positive (against=-1) or a negative (against=1) per-parameter factor,
    so the factor is 1 where sign(direction·W) == against. Computed as keep·(1 - decay) + decay with
    keep in {0, 1}: the multi-tensor form of where(agree, decay, 1), bit-identical to it for
    decay in [0.5, 1] (1 - decay is then exact), and what the reference loop computes too.
    decay: (P,) or 0-dim; 1 for skipped parameters (then every factor is 1).
    """
    keep = torch._foreach_mul(direction, target)
    torch._foreach_sign_(keep)  # -1, 0, 1 (0 where u or W is 0: decay there, as u·W >= 0)
    if against == 1:
        torch._foreach_clamp_min_(keep, 0)  # 1 where u·W < 0
        torch._foreach_mul_(keep, _as_list(1 - decay))
    else:
        torch._foreach_clamp_max_(keep, 0)  # -1 where u·W < 0
        torch._foreach_mul_(keep, _as_list(decay - 1))  # -(decay - 1) == 1 - decay, bit for bit
    torch._foreach_add_(keep, _as_list(decay))
    return keep


def normuon_apply(b: MuonBucket, group: dict, O: Tensor, scale: Tensor, ok_mat: Tensor | None) -> None:
    """NorMuon (Li et al. 2025, arXiv 2510.05491, Algorithm 1; as microsoft/dion's dion/normuon.py):
    b.out = (-lr·s)·O', per matrix O (m×n, neurons its rows), in opmath:

        q = mean over each row of O²                  (m,)
        v = β2·v + (1 - β2)·q                          (normuon_v; no bias correction)
        d = sqrt(v) + eps
        O' = (O / d) · ‖O‖_F / max(‖O / d‖_F, eps)     (rows normalized, Frobenius norm of O kept)

    The norms come from q: ‖O‖²_F = n·Σq and ‖O/d‖²_F = n·Σ q/d², so after the squares and their
    row means everything per matrix is arithmetic on (B, m) vectors; O' is O times (-lr·s), then
    times 1/d·ratio per neuron (two elementwise passes over the stack, three for a bucket holding
    tall and wide matrices). Skipped matrices (ok_mat False) keep v; their scale is 0.
    """
    nm = b.normuon
    beta2, eps = group["normuon_beta2"], group["normuon_eps"]
    dtype = b.opmath
    X = b.out
    X.copy_(O)  # O in opmath (the gradient stack when that is its dtype: U is not needed any more)
    sq = X.square()
    B, s, l = X.shape

    def factors(q: Tensor, v: Tensor, k: int, select: Tensor | None) -> Tensor:
        weight = torch.full((B, 1), 1 - beta2, dtype=dtype, device=X.device)
        if ok_mat is not None:
            weight = torch.where(ok_mat.view(B, 1), weight, 0.0)
        if select is not None:
            weight = torch.where(select, weight, 0.0)
        v.lerp_(q, weight)
        d = v.sqrt().add_(eps)
        norm = q.sum(-1, keepdim=True).mul_(k).sqrt_()
        norm_normalized = (q / d.square()).sum(-1, keepdim=True).mul_(k).sqrt_()
        return (norm / norm_normalized.clamp_min_(eps)) / d

    X.mul_(scale)
    if nm.rows is not None:
        select = nm.row_matrices
        f = factors(sq.mean(-1), nm.rows, l, select)
        X.mul_((f if select is None else torch.where(select, f, 1.0)).unsqueeze(-1))
    if nm.cols is not None:
        select = None if nm.row_matrices is None else ~nm.row_matrices
        f = factors(sq.mean(-2), nm.cols, s, select)
        X.mul_((f if select is None else torch.where(select, f, 1.0)).unsqueeze(-2))


def adamw_bucket_step(b: AdamWBucket, group: dict, ok_all: Tensor | None, fused: bool) -> None:
    """torch.optim.AdamW's update (capturable formulation) of one bucket, multi-tensor."""
    lr = group["lr"]
    beta1, beta2 = group["betas"]
    wd, eps = group["weight_decay"], group["eps"]
    params = b.local_params()
    grads = [local(p.grad) for p in b.params]
    cautious = group.get("cautious_weight_decay", False) and wd != 0
    if fused and ok_all is None and b.fusable and not cautious:
        torch._foreach_add_(b.step_views, 1)
        torch._fused_adamw_(
            params, grads, b.exp_avgs, b.exp_avg_sqs, [], b.step_views,
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
        )  # fmt: skip
        return
    device = b.steps.device
    if ok_all is None:  # known finite, not fusable: the masked arithmetic below with every flag true
        ok = torch.ones(len(params), dtype=torch.bool, device=device)
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
    target = b.targets(params)
    if b.work is not None:
        torch._foreach_copy_(target, params)
    if wd != 0:
        decay = _per_param(ok, 1 - lr * wd, 1.0, dtype, device)
        # cautious: updates = m̂/(sqrt(v̂)+eps) is u up to the positive lr/bias_correction1
        decay = cautious_decay(target, updates, decay, against=-1) if cautious else _as_list(decay)
        torch._foreach_mul_(target, decay)
    torch._foreach_addcmul_(target, updates, _as_list(step_size))
    if b.work is not None:
        torch._foreach_copy_(params, target)


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
                mirror_in(bucket)
                muon_bucket_step(bucket, group, ok_all)
                mirror_out(bucket)
            else:
                adamw_bucket_step(bucket, group, ok_all, fused_adamw)


class BackendError(ValueError, backends.BackendUnavailable):
    """A group's backend is unknown or cannot run on its parameters: a ValueError of the group's
    options, raised when the group is added (still a BackendUnavailable for code that catches that)."""


class BackendRun:
    """The backend `muon.backends.select` (or `select_gram` for Gram NS) chose, called through its
    module's `run` (`run_gram`) attribute at each step, as the dispatcher does (instrumentation that
    replaces `run`, e.g. bench profile, sees it)."""

    def __init__(self, fn, algorithm: str = "standard", restarts=DEFAULT_RESTARTS) -> None:
        self.fn, self.module = fn, None
        self.attr = "run_gram" if algorithm == "gram" else "run"
        self.extra = (tuple(restarts),) if algorithm == "gram" else ()
        for name in backends.BACKENDS:
            module = sys.modules.get(backends._MODULES[name])
            if module is not None and getattr(module, self.attr, None) is fn:
                self.module = module

    def __call__(self, X: Tensor, schedule: Schedule, dtype: torch.dtype) -> Tensor:
        run = self.fn if self.module is None else getattr(self.module, self.attr)
        return run(X, schedule, dtype, *self.extra)


def backend_for(group: dict, X: Tensor, where: str, algorithm: str = "standard") -> BackendRun:
    """The NS backend of the group for stack X (resolved once); a ValueError naming the group.
    algorithm: "standard" or "gram" (resolved already)."""
    try:
        if algorithm == "gram":
            return BackendRun(backends.select_gram(group["backend"], X), algorithm)
        return BackendRun(backends.select(group["backend"], X))
    except backends.BackendUnavailable as exc:
        raise BackendError(f"{where}: {exc}") from None


__all__ = ["Plan", "build_plan", "execute", "finite_flags", "first_nonfinite", "plan_key"]
