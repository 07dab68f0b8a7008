"""The plan of the step engine: buckets of parameters, made from the groups; structure only.

`build_plan(param_groups, key, resolve_run)` reads the groups and never the optimizer or its
state. Per group it makes buckets:

* a Muon bucket: every matrix of the group with the same (small side, large side), gradient and
  parameter dtype and device. A parameter maps to `count` consecutive matrices of the bucket's
  (B, s, l) stack; tall (m > n) matrices are stacked transposed, so (m, n) and (n, m) matrices share
  one NS call that runs on the small side. With `split`/`heads` a parameter's matrices are cut into
  row blocks first (`muon._shapes.block_layout`), and blocks of one shape share a bucket, each with
  the update scale of its own shape. A parameter of a `transposed` group stores (in, out) matrices:
  the stacks hold their (out, in) transposes, bucketed, scaled and normalized as those, and the
  parameter sees them through `.mT`, so it steps as the nn.Linear weight would. A bucket is cut into
  chunks of whole parameters of at most `chunk_bytes` of stacked gradient (a single larger parameter
  is a chunk of its own): a one-process step stacks, orthogonalizes and frees one chunk at a time.
* an AdamW bucket: the group's parameters of one device and dtypes, in chunks of at most
  `chunk_bytes` of gradient, updated with torch's multi-tensor (`torch._foreach_*`) or fused
  (`torch._fused_adamw_`) kernels.

**`opt.state` is the only storage.** The plan keeps structure — members, offsets, flag indices,
update scales, the chosen NS run — and no optimizer state: every step reads `opt.state[p]` (and
creates a missing entry, installed at the step's commit, `muon.engine.step.StepState`), so
`state.clear()`, a replaced state, `.data =` or `set_()` on a state tensor and `load_state_dict`
take effect at the next step because there is nothing else to read. The stacks a step computes
with are its own temporaries (`muon.engine.step`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._shapes import block_layout, matrix_shape, row_blocks, update_scale
from ..coefficients import Schedule, resolve_schedule
from ..functional import opmath, state_dtype
from ..newton_schulz import resolve_dtype

# Group options that change the plan (what is stacked together, how NS runs); others (lr,
# weight_decay, momentum, nesterov, betas, eps of AdamW) are read every step.
MUON_PLAN_KEYS = (
    "flatten", "batched", "backend", "ns_dtype", "ns_coefficients", "ns_steps", "eps", "adjust_lr_fn", "variant",
    "split", "heads", "ns_algorithm", "transposed", "state_dtype",
)  # fmt: skip
COUNTERS = ("step", "nonfinite_skips")  # one-element state: a loaded (1,) tensor fits a 0-dim slot
# The default bound of a chunk's stacked gradient per device type (`Muon(chunk_bytes=...)`): on a CPU
# a chunk of 16 MiB keeps the step's workspace near one 1536×1536 fp32 matrix (docs/guarantees.md);
# on CUDA 256 MiB keeps batched NS calls large (unmeasured on a GPU).
DEFAULT_CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 256 << 20}


def default_chunk_bytes(device: torch.device) -> int:
    return DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cuda"])


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (its `_local_tensor`, an attribute read: no dispatch, and it
    follows FSDP2 re-pointing a parameter at new storage), or t itself."""
    return getattr(t, "_local_tensor", t) if type(t).__name__ == "DTensor" else t


def stack_rows(t: Tensor, lo: int, hi: int) -> Tensor:
    """t[lo:hi], or t itself where that is all of it (no op dispatched: a step slices often)."""
    return t if lo == 0 and hi == t.shape[0] else t[lo:hi]


@dataclass
class Member:
    """A parameter's place in a Muon bucket: matrices [offset, offset + count) of the stack.

    A whole member is a parameter (or one split into equal, not tall row blocks, which is then the
    contiguous stack of its blocks): `view` gives the parameter's shape. A block member is rows
    [row, row + rows) of each of the parameter's matrices (`split`/`heads` with unequal or tall
    blocks): `view` gives (count, rows, n) and `source` cuts the same block out of the parameter,
    its gradient or its momentum. A member of a transposed parameter (stored (in, out)) sees
    everything through .mT: a block member's `view` and `source` are (count, n, rows), columns of the
    stored matrices. `view` and `source` are the only places that know how stack rows become
    parameter elements.
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

    def view(self, stack: Tensor, base: int = 0) -> Tensor:
        """The member's matrices in `stack`, whose first matrix is matrix `base` of the bucket."""
        rows = stack[self.offset - base : self.offset - base + self.count]
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
class Run:
    """Members [first, last) of a bucket that stack alike: matrices [lo, hi) of the bucket's stack.

    How parameter-shaped tensors (gradients, momentum, parameters) become rows of a (k, s, l) stack
    and back, in a fixed handful of ops whatever the number of members (so a step's dispatched ops
    grow with buckets, not parameters):

    * "stack": 2-D tensors, `torch.stack` into the stack (or its `.mT` when the stack holds their
      transposes), `unbind` back;
    * "cat": 3-D tensors (batches of matrices), `torch.cat` and `split`;
    * "flat": conv weights of a `flatten` group, (o, i, kh, kw) read as (o, i·kh·kw), stacked whole;
    * "each": anything else (row blocks of split/heads, other layouts): one view per member.
    """

    first: int
    last: int
    lo: int
    hi: int
    mode: str
    transpose: bool  # the stack holds the transposes of the members' matrices (tall XOR stored transposed)
    tall: bool  # the members' matrices have more rows than columns (NorMuon's neurons are stack columns)
    shape: tuple = ()  # "stack"/"flat": every member's (local) shape
    counts: tuple = ()  # "cat": matrices per member

    def to_stack(self, members: list[Member], tensors: list[Tensor], out: Tensor, base: int) -> None:
        """Write the members' parameter-shaped `tensors` into their rows of `out` (whose first
        matrix is matrix `base` of the bucket)."""
        if self.mode != "each" and not torch.compiler.is_compiling():
            # one op, no per-member views (torch.compile does not trace stack(out=a view): it takes the
            # multi-tensor copy below, the same values)
            X = stack_rows(out, self.lo - base, self.hi - base)
            Y = X.mT if self.transpose else X
            if self.mode == "cat":
                torch.cat(tensors, out=Y)
            else:
                torch.stack(tensors, out=Y if self.mode == "stack" else Y.view(len(tensors), *self.shape))
            return
        # one multi-tensor copy into the members' views
        if self.mode == "each":
            tensors = [mb.source(t) for mb, t in zip(members, tensors, strict=True)]
        torch._foreach_copy_(self.from_stack(members, out, base), tensors)

    def from_stack(self, members: list[Member], stack: Tensor, base: int) -> list[Tensor]:
        """The members' views of their rows of `stack`: parameter-shaped, or block-shaped for row blocks."""
        if self.mode == "each":
            return [mb.view(stack, base) for mb in members]
        X = stack_rows(stack, self.lo - base, self.hi - base)
        Y = X.mT if self.transpose else X
        if self.mode == "stack":
            return list(Y.unbind(0))
        if self.mode == "cat":
            return list(Y.split(self.counts))
        return list(Y.view(len(members), *self.shape).unbind(0))

    def write_back(self, members: list[Member], stack: Tensor, base: int, tensors: list[Tensor]) -> None:
        """The inverse of `to_stack`: the members' rows of `stack` copied into their parameter-shaped
        `tensors` (cast to their dtype; for "each" runs the tensors must be viewable)."""
        if self.mode != "each" and tensors[0].dtype == stack.dtype and not torch.compiler.is_compiling():
            # unbind_copy / split_with_sizes_copy: the copies without a list of views, one op where an
            # unbind and a multi-tensor copy are two (they take no cast; torch.compile takes the
            # multi-tensor copy below)
            X = stack_rows(stack, self.lo - base, self.hi - base)
            Y = X.mT if self.transpose else X
            if self.mode == "cat":
                torch.split_with_sizes_copy(Y, list(self.counts), 0, out=tensors)
            else:
                torch.unbind_copy(Y if self.mode == "stack" else Y.view(len(tensors), *self.shape), 0, out=tensors)
            return
        if self.mode == "each":
            tensors = [mb.source(t, write=True) for mb, t in zip(members, tensors, strict=True)]
        torch._foreach_copy_(tensors, self.from_stack(members, stack, base))

    def neurons(self, members: list[Member], stack: Tensor, base: int, shape_of) -> list[Tensor]:
        """The members' views of a NorMuon moment stack ((k, s) rows, or (k, l) columns for tall)."""
        X = stack_rows(stack, self.lo - base, self.hi - base)
        if self.mode in ("stack", "flat"):
            return list(X.unbind(0))
        if self.mode == "cat":
            return list(X.split(self.counts))
        return [X[mb.offset - self.lo : mb.offset - self.lo + mb.count].view(shape_of(mb)) for mb in members]


def run_kind(mb: Member, flatten: bool) -> tuple:
    """How a member stacks (`Run`): members of equal kinds form one run."""
    shape = tuple(local(mb.param).shape)
    transpose = mb.tall != mb.stored_transposed
    if mb.row is not None:
        mode = "each"
    elif len(shape) == 2 and mb.count == 1:
        mode = "stack"
    elif flatten and len(shape) > 2 and mb.count == 1 and not transpose and not mb.stored_transposed:
        mode = "flat"
    elif not flatten and len(shape) == 3 and shape[0] == mb.count:
        mode = "cat"
    else:  # a parameter cut into equal heads stacked as itself, or another layout
        mode = "each"
    return (mode, transpose, mb.tall, shape if mode in ("stack", "flat") else shape[-2:])


def make_runs(members: list[Member], flatten: bool) -> list[Run]:
    """Consecutive members of one kind (`run_kind`) form a run; positions relative to `members`."""
    runs, kinds = [], []
    for k, mb in enumerate(members):
        kind = run_kind(mb, flatten)
        if runs and kinds[-1] == kind:
            run = runs[-1]
            run.last, run.hi = k + 1, mb.offset + mb.count
            if run.mode == "cat":
                run.counts = run.counts + (mb.count,)
            continue
        mode, transpose, tall, shape = kind
        runs.append(Run(k, k + 1, mb.offset, mb.offset + mb.count, mode, transpose, tall,
                        shape if mode in ("stack", "flat") else (), (mb.count,) if mode == "cat" else ()))
        kinds.append(kind)
    return runs


@dataclass
class MuonChunk:
    """Members [first, last) of a Muon bucket: its matrices [lo, hi), stacked together in a step."""

    first: int
    last: int
    lo: int
    hi: int
    runs: list[Run]
    flag_index: Tensor  # (P,) positions of the members' gradients in the step's flag vector
    matrix_flag_index: Tensor  # (B,) the same per matrix
    scales: Tensor  # (B, 1, 1) fp64 update_scale of each matrix (shaped to scale the stack's matrices)
    # NorMuon: which matrices keep their per-neuron moments as stack rows (not tall) or columns (tall);
    # (B, 1) bool when the chunk has both kinds, else None
    row_matrices: Tensor | None = None
    has_rows: bool = False
    has_cols: bool = False
    # how many runs stack the transposes of their members' matrices with one op ("stack" or "cat"):
    # "none", "all" or "some". The commit lays such a run's scratch out as its members are
    # (`muon.engine.step.muon_bucket_step`)
    transposes: str = "none"

    def part(self, run: Run, items: list) -> list:
        """A run's part of per-member `items` of this chunk (items[0] is the chunk's first member)."""
        return items[run.first - self.first : run.last - self.first]

    def to_stack(self, members: list[Member], tensors: list[Tensor], out: Tensor) -> None:
        """The chunk's `members`' parameter-shaped tensors into `out` (the chunk's (B, s, l) stack)."""
        for run in self.runs:
            run.to_stack(self.part(run, members), self.part(run, tensors), out, self.lo)

    def from_stack(self, members: list[Member], stack: Tensor) -> list[Tensor]:
        """Per member of the chunk, its view of the chunk's rows of `stack` (the chunk's (B, s, l))."""
        return [v for run in self.runs for v in run.from_stack(self.part(run, members), stack, self.lo)]

    def write_back(self, members: list[Member], stack: Tensor, tensors: list[Tensor]) -> None:
        """The chunk's rows of `stack` copied into the `members`' parameter-shaped `tensors` (`Run.write_back`)."""
        for run in self.runs:
            run.write_back(self.part(run, members), stack, self.lo, self.part(run, tensors))

    def targets(self, members: list[Member], tensors: list[Tensor]) -> list[Tensor]:
        """The members' parts of parameter-shaped `tensors`, shaped as `from_stack` gives them (a row
        block's view for "each" runs: the tensors must be viewable)."""
        out = []
        for run in self.runs:
            part = self.part(run, tensors)
            if run.mode == "each":
                part = [mb.source(t, write=True) for mb, t in zip(self.part(run, members), part, strict=True)]
            out.extend(part)
        return out

    def neurons(self, members: list[Member], rows: Tensor | None, cols: Tensor | None, shape_of) -> list[Tensor]:
        """Per member, its view of NorMuon's moment stacks of the chunk (rows, or cols for tall)."""
        return [v for run in self.runs
                for v in run.neurons(self.part(run, members), cols if run.tall else rows, self.lo, shape_of)]


@dataclass
class MuonBucket:
    members: list[Member]
    whole_params: list[Tensor]  # the members' parameters (`params` cuts block members out of them)
    shape: tuple[int, int, int]  # (B, s, l) of the whole bucket
    gdtype: torch.dtype  # the gradients' (the stacks')
    pdtype: torch.dtype
    mdtype: torch.dtype  # the momentum's (`muon.functional.state_dtype`)
    device: torch.device
    chunks: list[MuonChunk]
    run: object  # the backend's run(X, schedule, dtype) (`muon.backends.runner.BackendRun`)
    schedule: Schedule
    ns_dtype: torch.dtype
    opmath: torch.dtype
    normuon: bool = False  # variant="normuon"
    algorithm: str = "standard"  # the NS algorithm of the bucket ("auto" resolved at plan time)
    split: bool = False  # some members are row blocks of their parameters (split/heads)
    # Row-sharded DTensor (FSDP2) members (`muon.distributed.sharded`): the stacks hold the local
    # rows only; params and gradients are the parameters' local shards, read every step.
    sharded: bool = False
    exchange: object | None = None  # sharded row buckets: muon.distributed.sharded.BlockExchange
    # the group's state_dtype (bf16, int8): the momentum is read into an opmath stack and stored back
    # rounded or quantized (`muon.functional.read_momentum` / `store_momentum`); None: kept as is
    low: torch.dtype | None = None
    # (P,) positions of the members' gradients in the step's flag vector (every chunk's, in order)
    flag_index: Tensor | None = None
    all_owners: bool = True  # every member keeps its parameter's counters (no later row blocks)

    @property
    def params(self) -> list[Tensor]:
        """Per member, the parameter elements it updates (block members: a view of their rows,
        taken every step so that it follows the parameter's storage)."""
        if self.sharded:
            return [local(p) for p in self.whole_params]
        if not self.split:
            return self.whole_params
        return [mb.source(mb.param, write=True) for mb in self.members]

    def grads(self, first: int = 0, last: int | None = None) -> list[Tensor]:
        """The members' whole (local) gradients, parameter-shaped (a run cuts row blocks itself)."""
        if not self.sharded:  # (DTensor parameters are planned into sharded buckets only)
            return [mb.param.grad for mb in self.members[first:last]]
        return [local(mb.param.grad) for mb in self.members[first:last]]

    def whole_local_params(self, first: int = 0, last: int | None = None) -> list[Tensor]:
        """The members' whole (local) parameters (`MuonChunk.to_stack` cuts row blocks itself)."""
        if not self.sharded:
            return self.whole_params[first:last]
        return [local(p) for p in self.whole_params[first:last]]


@dataclass
class AdamWChunk:
    """Parameters [first, last) of an AdamW bucket, in runs [first, last) of one (local) shape that a
    step stacks as (k, numel) with `torch.stack` and takes apart with `unbind`; the arithmetic runs
    over every run of a chunk at once (`torch._foreach_*`), so dispatched ops grow with shapes only
    by the stacking."""

    first: int
    last: int
    runs: list[tuple[int, int]]
    numel: int = 0  # elements of its (local) parameters


@dataclass
class AdamWBucket:
    """The AdamW parameters of a group with one device and dtypes, in chunks of bounded size."""

    params: list[Tensor]
    indices: list[int]  # positions in group["params"]
    chunks: list[AdamWChunk]
    device: torch.device
    gdtype: torch.dtype
    opmath: torch.dtype
    fusable: bool  # torch._fused_adamw_ applies (same parameter and gradient dtype, CPU or CUDA)
    flag_index: Tensor  # (P,) positions of the parameters' gradients in the step's flag vector
    # DTensor (FSDP2) parameters: params holds the DTensors, the step uses their local shards
    sharded: bool = False
    low: torch.dtype | None = None  # the group's state_dtype (bf16 moments)

    @property
    def runs(self) -> list[tuple[int, int]]:
        """Every chunk's runs, in order: [first, last) of same-shape parameters."""
        return [run for c in self.chunks for run in c.runs]

    def local_params(self) -> list[Tensor]:
        return [local(p) for p in self.params] if self.sharded else self.params


@dataclass
class GroupPlan:
    index: int
    use_muon: bool
    buckets: list = field(default_factory=list)
    empty: list = field(default_factory=list)  # (position, parameter) of 0-element parameters with a gradient


@dataclass
class Plan:
    key: tuple
    groups: list[GroupPlan]
    flag_params: list[Tensor]  # every non-empty parameter with a gradient, in flag order
    where: list[tuple[int, int]]  # (group, position) of each, for error messages
    # no parameter or gradient is a DTensor: a step reads them as they are (`local` is the identity)
    plain: bool = True
    # the distributed part (muon.distributed: who orthogonalizes which rows, the collectives'
    # buffers, the digest ranks agree on, the NS phase); None in a single process
    dist: object | None = None
    # the state entries a step read and checked (`muon.engine.step.StepState`): references to
    # opt.state's own dicts and tensors, never copies, so `.data =` and `set_()` reach the step
    seen: dict = field(default_factory=dict)
    # (id(bucket), chunk) -> muon.engine.step.Packed: the stacks whose views the state holds (the
    # state's own storage: no second copy); a step checks they still are, else repacks
    packed: dict = field(default_factory=dict)
    # (value, dtype, device) -> 0-dim tensor of a Python number the step reads (`StepState.const`):
    # lr-independent constants (momentum weights, betas, 0 and 1 of masked scalars), a handful per plan
    scalars: dict = field(default_factory=dict)


class Planner:
    """What a group planner gets: the NS resolver, the chunk bound (None: whole buckets) and whether
    every chunk is a bucket of its own (atomic=False: each is committed as soon as it is computed)."""

    def __init__(self, resolve_run, chunk_bytes: int | None = None, chunk_buckets: bool = False) -> None:
        self.resolve_run, self.chunk_bytes, self.chunk_buckets = resolve_run, chunk_bytes, chunk_buckets


def plan_key(param_groups: list[dict], version: int) -> tuple:
    """Everything about the groups the plan depends on; cheap (no device work), computed every step."""
    key = [version]
    # (dynamo cannot trace is_inference: a compiled step's tensors are what it was traced with)
    compiling = torch.compiler.is_compiling()
    for group in param_groups:
        key.append(tuple(_option_key(group.get(k)) for k in MUON_PLAN_KEYS) if group["use_muon"]
                   else ("adamw", group.get("state_dtype")))
        key.append(
            tuple(
                # is_inference: `p.data = <inference tensor>` rebuilds the plan, which refuses it
                (id(p), p.shape, p.dtype, p.device, g.dtype, g.device, not compiling and p.is_inference())
                if (g := p.grad) is not None else None
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


def build_plan(param_groups: list[dict], key: tuple, resolve_run, plan_muon=None,
               chunk_bytes: int | None = None, chunk_buckets: bool = False) -> Plan:
    """Buckets for every group (module docstring); reads no state, writes nothing.

    `resolve_run(index, group, X, ns_dtype, schedule)` returns (algorithm, the NS run function) of
    group `index` for stack X (a ValueError naming the group when it cannot run). plan_muon: the
    planner of Muon groups, `plan_muon_group`'s signature (FSDP2 DTensor parameters use
    `muon.distributed.sharded.plan_muon_group`; their fresh state is made as the loop makes it,
    `muon.functional.zero_state`, a DTensor laid out like the parameter).
    chunk_bytes: the bound of a chunk (None: every bucket one chunk, as the distributed NS phases need);
    chunk_buckets: every chunk a bucket of its own (`Muon(atomic=False)`: committed chunk by chunk).
    """
    plan_muon = plan_muon or plan_muon_group
    planner = Planner(resolve_run, chunk_bytes, chunk_buckets)
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
    plain = not any(is_dtensor(p) or is_dtensor(p.grad) for group in param_groups for p in group["params"])
    return Plan(key, groups, flag_params, where, plain=plain)


def link_empty_muon(planner: Planner, gplan: GroupPlan, i: int, p: Tensor) -> None:
    """A 0-element Muon parameter: nothing to orthogonalize; its state is created as the loop creates it."""
    gplan.empty.append((i, p))


def plan_muon_group(planner: Planner, gplan: GroupPlan, group: dict, with_grad, flag_pos) -> None:
    flatten, transposed = group["flatten"], group.get("transposed", False)
    split, heads = group.get("split"), group.get("heads")
    schedule = resolve_schedule(group["ns_coefficients"], group["ns_steps"], group["eps"])
    layout: dict[tuple, list] = {}
    for i, p in with_grad:
        if p.numel() == 0:
            link_empty_muon(planner, gplan, i, p)
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
        bucket = muon_bucket(planner, gplan.index, group, entries, (s, l), pdtype, gdtype, device, flag_pos,
                             schedule, run, ns_dtype, algorithm)  # fmt: skip
        gplan.buckets.extend(_by_chunk(bucket) if planner.chunk_buckets else [bucket])


def chunk_bounds(sizes: list[int], limit: int | None, counts: list[int] | None = None) -> list[tuple[int, int]]:
    """Consecutive runs [first, last) of items whose sizes add up to at most `limit` (an item larger
    than the limit is a run of its own); one run of everything when limit is None.

    counts (matrices per item): a run holds at least two matrices where there are two, so no NS call
    is a batch of one unless the whole bucket is — a batch of one takes another matrix-multiply path
    on a CPU (other bits), and the loop batches every same-shape matrix of a group together."""
    if limit is None or not sizes:
        return [(0, len(sizes))] if sizes else []
    counts = counts or [2] * len(sizes)
    runs, first, total, matrices = [], 0, 0, 0
    for k, size in enumerate(sizes):
        if k > first and total + size > limit and matrices >= 2:
            runs.append((first, k))
            first, total, matrices = k, 0, 0
        total += size
        matrices += counts[k]
    if runs and matrices < 2:  # a last run of one matrix joins the one before it
        first = runs.pop()[0]
    runs.append((first, len(sizes)))
    return runs


def muon_bucket(planner: Planner, index: int, group: dict, entries: list, matrix: tuple[int, int], pdtype, gdtype,
                device, flag_pos: dict, schedule: Schedule, run, ns_dtype: torch.dtype, algorithm: str = "standard",
                sharded: bool = False) -> MuonBucket:
    """One Muon bucket of its members ((Member, update scale) entries), in chunks of runs (`Run`).
    Members are ordered by how they stack (one run per kind) unless sharded (the exchange's order);
    sharded: members are local shards (the distributed NS phase takes the whole bucket)."""
    flatten = group["flatten"]
    if not sharded:
        order = {}
        entries = sorted(entries, key=lambda e: order.setdefault(run_kind(e[0], flatten), len(order)))
    members, offset = [], 0
    for member, _ in entries:
        member.offset = offset
        members.append(member)
        offset += member.count
    s, l = matrix
    element = torch.empty((), dtype=gdtype).element_size()
    sizes = [mb.count * s * l * element for mb in members]
    scales = [scale for mb, scale in entries for _ in range(mb.count)]
    tall = [mb.tall for mb in members for _ in range(mb.count)]
    normuon = group["variant"] == "normuon"  # split/heads groups refuse NorMuon at construction
    chunks = []
    for first, last in chunk_bounds(sizes, None if sharded else planner.chunk_bytes, [mb.count for mb in members]):
        lo, hi = members[first].offset, members[last - 1].offset + members[last - 1].count
        runs = [Run(r.first + first, r.last + first, r.lo, r.hi, r.mode, r.transpose, r.tall, r.shape, r.counts)
                for r in make_runs(members[first:last], flatten)]  # fmt: skip
        flag_index = torch.tensor([flag_pos[mb.index] for mb in members[first:last]], device=device)
        chunk = MuonChunk(
            first, last, lo, hi, runs, transposes=_transposes(runs),
            flag_index=flag_index,
            # the same tensor where every member is one matrix (a step then reads the members' flags
            # off the matrices'); not where members hold 0 or several (a rank's empty shard of an
            # expert stack beside another's two matrices has as many matrices as members)
            matrix_flag_index=flag_index if all(mb.count == 1 for mb in members[first:last]) else torch.tensor(
                [flag_pos[mb.index] for mb in members[first:last] for _ in range(mb.count)], dtype=torch.int64,
                device=device,
            ),
            scales=torch.tensor(scales[lo:hi], dtype=torch.float64, device=device).view(-1, 1, 1),
        )  # fmt: skip
        if normuon:
            kinds = tall[lo:hi]
            chunk.has_rows, chunk.has_cols = not all(kinds), any(kinds)
            if chunk.has_rows and chunk.has_cols:
                chunk.row_matrices = torch.tensor([not t for t in kinds], device=device).view(-1, 1)
        chunks.append(chunk)
    bucket = MuonBucket(
        members=members,
        whole_params=[mb.param for mb in members],
        shape=(offset, s, l),
        gdtype=gdtype,
        pdtype=pdtype,
        mdtype=state_dtype("momentum_buffer", members[0].param, group.get("state_dtype")),
        device=device,
        chunks=chunks,
        run=run,
        schedule=schedule,
        ns_dtype=ns_dtype,
        opmath=opmath(pdtype),
        normuon=normuon,
        low=group.get("state_dtype"),
        algorithm=algorithm,
        split=any(mb.row is not None for mb in members),
        sharded=sharded,
    )
    bucket.flag_index = torch.cat([c.flag_index for c in chunks]) if len(chunks) > 1 else chunks[0].flag_index
    bucket.all_owners = all(mb.owner for mb in members)
    if bucket.split:
        _check_writable(bucket, index)
    return bucket


def _transposes(runs: list[Run]) -> str:
    """`MuonChunk.transposes` of a chunk's runs."""
    transposed = [r.transpose and r.mode != "each" for r in runs]
    return "all" if all(transposed) else "some" if any(transposed) else "none"


def _by_chunk(b: MuonBucket) -> list[MuonBucket]:
    """Every chunk of a Muon bucket as a bucket of its own (offsets from the chunk's first matrix)."""
    if len(b.chunks) == 1:
        return [b]
    out = []
    for c in b.chunks:
        members = [dataclasses.replace(mb, offset=mb.offset - c.lo) for mb in b.members[c.first : c.last]]
        runs = [dataclasses.replace(r, first=r.first - c.first, last=r.last - c.first, lo=r.lo - c.lo,
                                    hi=r.hi - c.lo) for r in c.runs]  # fmt: skip
        chunk = dataclasses.replace(c, first=0, last=c.last - c.first, lo=0, hi=c.hi - c.lo, runs=runs)
        out.append(dataclasses.replace(b, members=members, whole_params=[mb.param for mb in members],
                                       shape=(c.hi - c.lo, *b.shape[1:]), chunks=[chunk],
                                       split=any(mb.row is not None for mb in members), flag_index=c.flag_index,
                                       all_owners=all(mb.owner for mb in members)))  # fmt: skip
    return out


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


def plan_adamw_group(planner: Planner, gplan: GroupPlan, group: dict, with_grad, flag_pos) -> None:
    """AdamW buckets of one group: its parameters by device and dtypes (DTensors: their local shards),
    ordered by shape, in chunks of bounded size."""
    layout: dict[tuple, list] = {}
    for i, p in with_grad:
        if p.numel() == 0:
            gplan.empty.append((i, p))
            continue
        layout.setdefault((local(p).device, p.dtype, p.grad.dtype), []).append((i, p))
    for (device, pdtype, gdtype), entries in layout.items():
        order: dict[tuple, int] = {}
        entries = sorted(entries, key=lambda e: order.setdefault(tuple(local(e[1]).shape), len(order)))
        params = [p for _, p in entries]
        shards = [local(p) for p in params]  # DTensors: the local shards
        element = torch.empty((), dtype=gdtype).element_size()
        chunks = []
        # a quarter of the Muon bound: a chunk's AdamW step holds about four stacks of it at once (the
        # gradients, the next moments, the denominator), where a Muon chunk's NS holds its own workspace
        limit = None if planner.chunk_bytes is None else max(1, planner.chunk_bytes // 4)
        for first, last in chunk_bounds([q.numel() * element for q in shards], limit):
            runs = []
            for k in range(first, last):
                if runs and shards[k].shape == shards[runs[-1][0]].shape:
                    runs[-1] = (runs[-1][0], k + 1)
                else:
                    runs.append((k, k + 1))
            chunks.append(AdamWChunk(first, last, runs, sum(q.numel() for q in shards[first:last])))
        bucket = AdamWBucket(
            params=params,
            indices=[i for i, _ in entries],
            chunks=chunks,
            device=device,
            gdtype=gdtype,
            opmath=opmath(pdtype),
            fusable=pdtype == gdtype and device.type in ("cpu", "cuda") and group.get("state_dtype") is None,
            flag_index=torch.tensor([flag_pos[i] for i, _ in entries], device=device),
            sharded=shards[0] is not params[0],
            low=group.get("state_dtype"),
        )
        if planner.chunk_buckets and len(chunks) > 1:  # every chunk a bucket of its own (atomic=False)
            for c in chunks:
                part = slice(c.first, c.last)
                runs = [(first - c.first, last - c.first) for first, last in c.runs]
                gplan.buckets.append(dataclasses.replace(
                    bucket, params=params[part], indices=bucket.indices[part], flag_index=bucket.flag_index[part],
                    chunks=[dataclasses.replace(c, first=0, last=c.last - c.first, runs=runs)]))  # fmt: skip
        else:
            gplan.buckets.append(bucket)


__all__ = [
    "DEFAULT_CHUNK_BYTES", "AdamWBucket", "AdamWChunk", "GroupPlan", "Member", "MuonBucket", "MuonChunk", "Plan", "Run",
    "build_plan", "default_chunk_bytes", "local", "plan_key",
]  # fmt: skip
