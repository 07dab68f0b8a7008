"""The plan of the step engine: buckets of stacked tensors, made from the groups and `opt.state`.

`build_plan(param_groups, state, key, resolve_run)` reads the groups and the optimizer state and
never the optimizer. Per group it makes buckets:

* a Muon bucket: every matrix of the group with the same (small side, large side), gradient and
  parameter dtype and device. A parameter maps to `count` consecutive matrices of the bucket's
  stack; tall (m > n) matrices are stored transposed, so (m, n) and (n, m) matrices share one NS
  call that runs on the small side. The bucket owns one (B, s, l) momentum stack, and
  `state[p]["momentum_buffer"]` is the parameter-shaped view of its rows; one (B, s, l) gradient
  stack is reused every step. With `split`/`heads` a parameter's matrices are cut into row blocks
  first (`muon._shapes.block_layout`), and blocks of one shape share a bucket, each with the update
  scale of its own shape. Equal blocks that are not tall are stacked as the parameter itself (one
  member, momentum a view); unequal or tall blocks are block members, whose parameter keeps its
  momentum_buffer as its own tensor, copied into the stack before the bucket's step and back
  after it (`mirrors`). A parameter of a `transposed` group stores (in, out) matrices: the stacks
  hold their (out, in) transposes, bucketed, scaled and normalized as those, and the parameter's
  state and update are `.mT` views of them (no copies), so it steps as the nn.Linear weight would.
* an AdamW bucket: the group's parameters of one device and dtype, updated with torch's
  multi-tensor (`torch._foreach_*`) or fused (`torch._fused_adamw_`) kernels.

Per-parameter counters (`nonfinite_skips`, AdamW `step`) are views of one vector per bucket.

**`opt.state` is the truth.** Building a plan writes nothing: every state tensor the plan keeps is
a `StateLink` (the plan's tensor, and the state's tensor it takes its value from). Until the plan's
first committed step the links' values are copied in from the state at the start of every step;
the commit then installs the plan's tensors into `opt.state` (`install`), so a refused or failed
first step creates no state. `current(plan, state)` checks, every step and without device work,
that the state still holds exactly what the plan installed (or, before that, what it read): the
same mapping, the same per-parameter dicts, the same tensor objects. Anything else — `state.clear()`,
a new `opt.state`, a state tensor assigned by hand, `load_state_dict` — rebuilds the plan from the
state as it is; a state tensor whose shape does not fit its parameter is a ValueError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._shapes import block_layout, matrix_shape, row_blocks, update_scale
from ..coefficients import Schedule, resolve_schedule
from ..functional import check_state, neuron_shape, opmath, state_dtype, zero_state
from ..newton_schulz import resolve_dtype

# Group options that change the plan (what is stacked together, how NS runs); others (lr,
# weight_decay, momentum, nesterov, betas, eps of AdamW) are read every step.
MUON_PLAN_KEYS = (
    "flatten", "batched", "backend", "ns_dtype", "ns_coefficients", "ns_steps", "eps", "adjust_lr_fn", "variant",
    "split", "heads", "ns_algorithm", "transposed",
)  # fmt: skip
COUNTERS = ("step", "nonfinite_skips")  # one-element state: a loaded (1,) tensor fits a 0-dim slot


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (its `_local_tensor`, an attribute read: no dispatch, and it
    follows FSDP2 re-pointing a parameter at new storage), or t itself."""
    return getattr(t, "_local_tensor", t) if type(t).__name__ == "DTensor" else t


@dataclass
class StateLink:
    """A state tensor the plan keeps: `state[param][key]` is `value` once the plan is installed.

    `tensor` is what the step computes with (a stack view, or for DTensor state its local
    tensor); `value` is what the state holds (`tensor`, or a DTensor wrapping it); `source` the
    state's tensor (local) the plan read at build time, None for fresh (zero) state."""

    param: Tensor
    key: str
    value: Tensor
    tensor: Tensor
    source: Tensor | None


@dataclass
class Member:
    """A parameter's place in a Muon bucket: matrices [offset, offset + count) of the stack.

    A whole member is a parameter (or one split into equal, not tall row blocks, which is then the
    contiguous stack of its blocks): `view` gives the parameter's shape. A block member is rows
    [row, row + rows) of each of the parameter's matrices (`split`/`heads` with unequal or tall
    blocks): `view` gives (count, rows, n) and `source` cuts the same block out of the parameter or
    its gradient. A member of a transposed parameter (stored (in, out)) sees everything through .mT:
    a block member's `view` and `source` are (count, n, rows), columns of the stored matrices.
    `view` and `source` are the only places that know how stack rows become parameter elements.
    """

    index: int  # position in group["params"]
    param: Tensor
    offset: int
    count: int
    tall: bool  # its matrices (blocks) have more rows than columns: the stack holds their transposes
    row: int | None = None  # first row of the block; None: a whole member
    rows: int = 0
    matrix: tuple[int, int, int] = (0, 0, 0)  # (count, m, n) of the parameter
    # the parameter stores its matrices (in, out), as transformers' Conv1D (group option transposed):
    # the stack holds the m×n matrices, the parameter their transposes
    stored_transposed: bool = False

    @property
    def owner(self) -> bool:
        """Whether this member keeps the parameter's counters (the first block of a split parameter)."""
        return self.row is None or self.row == 0

    def view(self, stack: Tensor) -> Tensor:
        rows = stack[self.offset : self.offset + self.count]
        if self.tall:
            rows = rows.mT  # the m×n matrices (blocks)
        if self.stored_transposed:  # as the parameter lies: (count, n, m), or (count, n, rows) for a block
            rows = (rows if self.row is not None else rows.view(self.matrix)).mT
        return rows.view(local(self.param).shape) if self.row is None else rows  # DTensors: the local shard

    def source(self, t: Tensor, *, write: bool = False) -> Tensor:
        """The member's part of a parameter-shaped tensor t (a view; with write=True t must be viewable)."""
        if self.row is None:
            return t
        count, m, n = self.matrix
        if self.stored_transposed:  # the block's rows are columns of the stored (count, n, m) matrices
            t = t.view(count, n, m) if write else t.reshape(count, n, m)
            return t[:, :, self.row : self.row + self.rows]
        t = t.view(self.matrix) if write else t.reshape(self.matrix)
        return t[:, self.row : self.row + self.rows]


@dataclass
class NorMuonStacks:
    """NorMuon's per-neuron second moments of a bucket (`muon.functional.normuon_update`).

    A neuron is a row of the parameter's m×n matrix. In the (B, s, l) stack that is a stack row for
    matrices stored as they are (m <= n) and a stack column for tall matrices stored transposed.
    `rows` (B, s) holds the moments of the first kind, `cols` (B, l) of the second (None when the
    bucket has no matrix of that kind); `state[p]["normuon_v"]` is the parameter's view of one of
    them. The entries of the other kind's matrices are unused (kept at zero).
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
    run: object  # the backend's run(X, schedule, dtype) (`muon.backends.runner.BackendRun`)
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

    def grads(self) -> list[Tensor]:
        if self.sharded:
            return [local(p.grad) for p in self.whole_params]
        if self.mirrors is None:
            return [p.grad for p in self.whole_params]
        return [mb.source(mb.param.grad) for mb in self.members]


@dataclass
class AdamWBucket:
    """The AdamW parameters of a group with one device and dtypes: their moments are one flat
    stack each (`state[p]["exp_avg"]` a view of it), updated with a handful of whole-stack ops."""

    params: list[Tensor]
    exp_avg: Tensor  # (N,) every parameter's first moment, flat and concatenated
    exp_avg_sq: Tensor
    exp_avg_views: list[Tensor]  # per parameter, its (local) shape
    exp_avg_sq_views: list[Tensor]
    steps: Tensor  # (P,) fp32, torch's per-parameter `step`
    step_views: list[Tensor]
    skips: Tensor
    flag_index: Tensor
    grad_flat: Tensor  # all gradients, flattened and concatenated (sanitized where not finite)
    grad_views: list[Tensor]
    update: Tensor  # (N,) m̂ / (sqrt(v̂) + eps) of every parameter, in the moments' dtype
    update_views: list[Tensor]
    sizes: Tensor  # (P,) numel per parameter, to expand per-parameter values to elements
    work: Tensor | None  # fp32 copy of bf16/fp16 parameters
    work_views: list[Tensor]
    opmath: torch.dtype
    fusable: bool  # torch._fused_adamw_ applies (same parameter and gradient dtype, CPU or CUDA)
    # DTensor (FSDP2) parameters: params holds the DTensors, everything else their local shards
    sharded: bool = False

    def local_params(self) -> list[Tensor]:
        return [local(p) for p in self.params] if self.sharded else self.params


@dataclass
class GroupPlan:
    index: int
    use_muon: bool
    buckets: list = field(default_factory=list)


@dataclass
class Plan:
    key: tuple
    state: object  # the optimizer's state mapping the plan was built from
    groups: list[GroupPlan]
    flag_params: list[Tensor]  # every non-empty parameter with a gradient, in flag order
    where: list[tuple[int, int]]  # (group, position) of each, for error messages
    links: list[StateLink] = field(default_factory=list)
    installed: bool = False
    # what `current` compares: the state's (param, dict) items, and (dict, key, tensor or None)
    items: list = field(default_factory=list)
    expected: list = field(default_factory=list)
    # the distributed part (muon.distributed: who orthogonalizes which rows, the collectives'
    # buffers, the digest ranks agree on, the NS phase); None in a single process
    dist: object | None = None


class Planner:
    """What a group planner gets: the state (read only), where to record links, the NS resolver."""

    def __init__(self, state, resolve_run, wrap=None) -> None:
        self.state, self.resolve_run, self.links, self.wrap = state, resolve_run, [], wrap
        self.owned: dict[int, Tensor] = {}  # split parameters' own momentum buffers, by id

    def read(self, p: Tensor) -> dict:
        """p's state dict, or an empty one (never created in the optimizer's state here)."""
        return self.state.get(p) or {}

    def link(self, p: Tensor, key: str, tensor: Tensor, where: str, value: Tensor | None = None,
             fill: bool = True) -> Tensor | None:
        """Record that state[p][key] is `tensor` (held as `value`) once installed; returns the
        state's current tensor (local), checked to fit. fill=False: the caller copies it (mirrors)."""
        source = self.read(p).get(key)
        if source is not None:
            source = local(source)
            fits = tuple(source.shape) == tuple(tensor.shape) or (
                key in COUNTERS and source.numel() == 1 == tensor.numel()
            )
            if not fits:
                raise ValueError(
                    f"{where}: state[{key!r}] has shape {tuple(source.shape)}, but the parameter (shape "
                    f"{tuple(p.shape)}) needs {tuple(tensor.shape)}; a parameter whose shape changed needs "
                    "its state reset (del opt.state[p]) or a state of the new shape"
                )
        check_state(key, p, source, where)  # (muon.functional) a state the step would have to cast: refused
        self.links.append(StateLink(p, key, tensor if value is None else value, tensor, source if fill else None))
        return source


def plan_key(param_groups: list[dict], version: int) -> tuple:
    """Everything about the groups the plan depends on; cheap (no device work), computed every step."""
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


def _option_key(value):
    if isinstance(value, (list, tuple)):
        return tuple(_option_key(v) for v in value)
    if isinstance(value, (str, int, float, bool, type(None), torch.dtype)):
        return value
    return id(value)  # callables, tensors: identity


def current(plan: Plan, state) -> bool:
    """Whether `state` still holds what the plan installed (before that: what it read); no device work.

    Walks the state's items in order (no tensor hashing: Tensor.__hash__ is Python code) against the
    snapshot, then the plan's entries of each per-parameter dict; any difference, even in a
    parameter outside the plan, rebuilds the plan."""
    if state is not plan.state or len(state) != len(plan.items):
        return False
    for (p, d), (q, e) in zip(state.items(), plan.items):
        if p is not q or d is not e:
            return False
    for d, key, t in plan.expected:
        if d.get(key) is not t:
            return False
    return True


def _expect(plan: Plan) -> None:
    """Snapshot what `current` compares: the state's (parameter, dict) items, and per link the
    tensor the state holds under its key (None where it holds none)."""
    plan.items = list(plan.state.items())
    plan.expected = []
    for link in plan.links:
        d = plan.state.get(link.param)
        if d is not None:
            plan.expected.append((d, link.key, d.get(link.key)))


def fill(plan: Plan) -> None:
    """Before the plan's first commit: the state's current values into the plan's tensors."""
    pairs = [(link.tensor, link.source) for link in plan.links if link.source is not None]
    if pairs:
        torch._foreach_copy_([t for t, _ in pairs], [s.reshape(t.shape) for t, s in pairs])


def install(plan: Plan) -> None:
    """At the first commit: the plan's tensors become the optimizer's state."""
    for link in plan.links:
        plan.state[link.param][link.key] = link.value
    plan.installed = True
    _expect(plan)


def build_plan(param_groups: list[dict], state, key: tuple, resolve_run, plan_muon=None, wrap=None) -> Plan:
    """Buckets and stacked state for every group (module docstring); writes nothing.

    `resolve_run(index, group, X, ns_dtype, schedule)` returns (algorithm, the NS run function) of
    group `index` for stack X (a ValueError naming the group when it cannot run). plan_muon: the
    planner of Muon groups, `plan_muon_group`'s signature (FSDP2 DTensor parameters use
    `muon.distributed.sharded.plan_muon_group`). wrap(local view, param): how a state view of a
    DTensor parameter is held in the state (a DTensor laid out like it); None: plain tensors.
    """
    plan_muon = plan_muon or plan_muon_group
    planner = Planner(state, resolve_run, wrap)
    groups, flag_params, where = [], [], []
    for gi, group in enumerate(param_groups):
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
            plan_muon(planner, gplan, group, with_grad, flag_pos)
        else:
            plan_adamw_group(planner, gplan, group, with_grad, flag_pos)
    plan = Plan(key, state, groups, flag_params, where, planner.links)
    _expect(plan)
    return plan


def link_empty_muon(planner: Planner, p: Tensor, group: dict, where: str) -> None:
    """A 0-element Muon parameter: nothing to orthogonalize; its state as the reference keeps it."""
    keys = ("momentum_buffer", "nonfinite_skips") + (("normuon_v",) if group["variant"] == "normuon" else ())
    for key in keys:
        if key not in planner.read(p):
            planner.link(p, key, zero_state(key, p, group["flatten"], group.get("transposed", False)), where)


def plan_muon_group(planner: Planner, gplan: GroupPlan, group: dict, with_grad, flag_pos) -> None:
    flatten, transposed = group["flatten"], group.get("transposed", False)
    split, heads = group.get("split"), group.get("heads")
    schedule = resolve_schedule(group["ns_coefficients"], group["ns_steps"], group["eps"])
    layout: dict[tuple, list] = {}
    for i, p in with_grad:
        if p.numel() == 0:
            link_empty_muon(planner, p, group, f"param_groups[{gplan.index}]['params'][{i}]")
            continue
        # a transposed parameter's matrices are its (in, out) matrices read as (out, in): bucketed,
        # scaled and normalized as those, the stacks hold them and the parameter sees them through .mT
        count, m, n = matrix_shape(p.shape, flatten, transposed)
        for row, r, matrices in block_layout(count, m, n, row_blocks(m, split, heads)):
            s, l = min(r, n), max(r, n)
            bucket = (s, l, p.dtype, p.grad.dtype, p.device)
            if not group["batched"]:
                bucket = bucket + (i,)
            # the update scale of a block is the block's own s(rows, n): what a separate parameter
            # of the block's shape would get
            member = Member(i, p, 0, matrices, r > n, row, r, (count, m, n), transposed)
            layout.setdefault(bucket, []).append((member, update_scale(group["adjust_lr_fn"], r, n)))
    for (s, l, pdtype, gdtype, device, *_), entries in layout.items():
        ns_dtype = resolve_dtype(group["ns_dtype"], device, (s, l))
        probe = torch.empty((1, s, l), dtype=gdtype, device=device)  # backends look at device and dtype
        algorithm, run = planner.resolve_run(gplan.index, group, probe, ns_dtype, schedule)
        gplan.buckets.append(muon_bucket(planner, gplan.index, group, entries, (s, l), pdtype, gdtype, device,
                                         flag_pos, schedule, run, ns_dtype, algorithm))  # fmt: skip


def muon_bucket(planner: Planner, index: int, group: dict, entries: list, matrix: tuple[int, int], pdtype, gdtype,
                device, flag_pos: dict, schedule: Schedule, run, ns_dtype: torch.dtype, algorithm: str = "standard",
                state_value=None, sharded: bool = False) -> MuonBucket:
    """One Muon bucket: the stacks of its members ((Member, update scale) entries, in stack order),
    the state links, the backend's run. state_value(view, param): how a momentum view is held in
    the state (DTensor parameters: a DTensor over the local view); sharded: members are local shards."""
    members, offset = [], 0
    for member, _ in entries:
        member.offset = offset
        members.append(member)
        offset += member.count
    shape = (offset, *matrix)
    grad_stack = torch.empty(shape, dtype=gdtype, device=device)
    momentum = torch.zeros(shape, dtype=state_dtype("momentum_buffer", members[0].param), device=device)
    skips = torch.zeros(len(members), dtype=state_dtype("nonfinite_skips", members[0].param), device=device)
    momentum_views = [mb.view(momentum) for mb in members]
    mirrors = None
    if any(mb.row is not None for mb in members):
        mirrors = (momentum_views, [])
        for mb in members:
            buf = planner.owned.get(id(mb.param))  # one momentum_buffer per parameter, across buckets
            if buf is None:
                where = f"param_groups[{index}]['params'][{mb.index}]"
                buf = planner.owned[id(mb.param)] = _own_momentum(planner, mb.param, where)
            mirrors[1].append(mb.source(buf, write=True))
    for mb, view, skip in zip(members, momentum_views, skips.unbind(), strict=True):
        where = f"param_groups[{index}]['params'][{mb.index}]"
        if mirrors is None:
            value = None if state_value is None else state_value(view, mb.param)
            planner.link(mb.param, "momentum_buffer", view, where, value=value)
        if mb.owner:  # a split parameter counts its skipped steps once, at its first block
            planner.link(mb.param, "nonfinite_skips", skip, where)
    work = None
    if pdtype not in (torch.float32, torch.float64):
        work = torch.empty(shape, dtype=torch.float32, device=device)
    # the scaled update -lr·s·O, in the parameters' opmath dtype (the gradient stack when it is that)
    out_dtype = opmath(pdtype)
    out = grad_stack if out_dtype == gdtype else torch.empty(shape, dtype=out_dtype, device=device)
    normuon = None
    if group["variant"] == "normuon":  # split/heads groups refuse NorMuon at construction
        normuon = _plan_normuon(planner, index, members, *shape, out_dtype, device, group["flatten"],
                                group.get("transposed", False))
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
            [flag_pos[mb.index] for mb in members for _ in range(mb.count)], dtype=torch.int64, device=device
        ),
        scales=torch.tensor(
            [scale for mb, scale in entries for _ in range(mb.count)], dtype=torch.float64, device=device
        ),
        work=work,
        work_stack_views=[mb.view(work) for mb in members] if work is not None else [],
        run=run,
        schedule=schedule,
        ns_dtype=ns_dtype,
        opmath=out_dtype,
        algorithm=algorithm,
        mirrors=mirrors,
        sharded=sharded,
    )
    if mirrors is not None:
        _check_writable(bucket, index)
    return bucket


def _own_momentum(planner: Planner, p: Tensor, where: str) -> Tensor:
    """The parameter-shaped momentum buffer a split parameter keeps as its own tensor: the state's
    when it is a contiguous tensor of the gradient's dtype, else a new one holding its value."""
    buf = planner.read(p).get("momentum_buffer")
    if buf is not None and buf._base is None and buf.is_contiguous() and buf.dtype == p.grad.dtype:
        planner.link(p, "momentum_buffer", buf, where, fill=False)  # the state's tensor itself
        return buf
    fresh = zero_state("momentum_buffer", p).contiguous()
    planner.link(p, "momentum_buffer", fresh, where)  # a view of an earlier plan's stack, or loaded
    return fresh


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


def _plan_normuon(planner: Planner, index: int, members: list[Member], B: int, s: int, l: int, dtype, device,
                  flatten: bool, transposed: bool = False) -> NorMuonStacks:
    """The bucket's second-moment stacks (in opmath: fp32, fp64 for fp64 parameters)."""
    tall = [mb.tall for mb in members for _ in range(mb.count)]
    rows = torch.zeros((B, s), dtype=dtype, device=device) if not all(tall) else None
    cols = torch.zeros((B, l), dtype=dtype, device=device) if any(tall) else None
    row_matrices = None
    if rows is not None and cols is not None:
        row_matrices = torch.tensor([not t for t in tall], device=device).view(B, 1)
    for mb in members:
        stack = cols if mb.tall else rows
        view = stack[mb.offset : mb.offset + mb.count].view(neuron_shape(mb.param.shape, flatten, transposed))
        planner.link(mb.param, "normuon_v", view, f"param_groups[{index}]['params'][{mb.index}]")
    return NorMuonStacks(rows, cols, row_matrices)


def plan_adamw_group(planner: Planner, gplan: GroupPlan, group: dict, with_grad, flag_pos) -> None:
    """AdamW buckets of one group: its parameters by device and dtypes (DTensors: their local shards)."""
    layout: dict[tuple, list] = {}
    for i, p in with_grad:
        where = f"param_groups[{gplan.index}]['params'][{i}]"
        if p.numel() == 0:
            for key in ("step", "exp_avg", "exp_avg_sq", "nonfinite_skips"):
                if key not in planner.read(p):
                    planner.link(p, key, zero_state(key, p), where)
            continue
        layout.setdefault((local(p).device, p.dtype, p.grad.dtype), []).append((i, p))
    for (device, pdtype, gdtype), entries in layout.items():
        params = [p for _, p in entries]
        shards = [local(p) for p in params]  # DTensors: the local shards
        sizes = [p.numel() for p in shards]
        N, first = sum(sizes), params[0]

        def flat(dtype, shards=shards, sizes=sizes, N=N, device=device):
            stack = torch.zeros(N, dtype=dtype, device=device)
            return stack, [v.view(p.shape) for v, p in zip(stack.split(sizes), shards, strict=True)]

        exp_avg, exp_avg_views = flat(state_dtype("exp_avg", first))
        exp_avg_sq, exp_avg_sq_views = flat(state_dtype("exp_avg_sq", first))
        update, update_views = flat(state_dtype("exp_avg", first))
        grad_flat, grad_views = flat(gdtype)
        steps = torch.zeros(len(params), dtype=state_dtype("step", first), device=device)
        skips = torch.zeros(len(params), dtype=state_dtype("nonfinite_skips", first), device=device)
        step_views, skip_views = list(steps.unbind()), list(skips.unbind())
        for (i, p), *views in zip(entries, exp_avg_views, exp_avg_sq_views, step_views, skip_views, strict=True):
            where = f"param_groups[{gplan.index}]['params'][{i}]"
            for key, view in zip(("exp_avg", "exp_avg_sq", "step", "nonfinite_skips"), views, strict=True):
                # (a torch.optim.AdamW state keeps step on the CPU: its value is copied in)
                value = planner.wrap(view, p) if planner.wrap is not None and key.startswith("exp") else None
                planner.link(p, key, view, where, value=value)
        work, work_views = flat(torch.float32) if pdtype not in (torch.float32, torch.float64) else (None, [])
        gplan.buckets.append(
            AdamWBucket(
                params=params,
                exp_avg=exp_avg,
                exp_avg_sq=exp_avg_sq,
                exp_avg_views=exp_avg_views,
                exp_avg_sq_views=exp_avg_sq_views,
                steps=steps,
                step_views=step_views,
                skips=skips,
                flag_index=torch.tensor([flag_pos[i] for i, _ in entries], device=device),
                grad_flat=grad_flat,
                grad_views=grad_views,
                update=update,
                update_views=update_views,
                sizes=torch.tensor(sizes, device=device),
                work=work,
                work_views=work_views,
                opmath=opmath(pdtype),
                fusable=pdtype == gdtype and device.type in ("cpu", "cuda"),
                sharded=shards[0] is not params[0],
            )
        )


__all__ = [
    "AdamWBucket", "GroupPlan", "Member", "MuonBucket", "NorMuonStacks", "Plan", "StateLink", "build_plan",
    "current", "fill", "install", "local", "plan_key",
]  # fmt: skip
