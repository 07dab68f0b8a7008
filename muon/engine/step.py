"""One step of a plan: computed first, committed after, with opt.state the only storage.

`execute(plan, param_groups, state, ok_all, fused_adamw, ns_phase, atomic)` runs, per group,

1. Muon buckets, one chunk at a time in one process (the whole bucket where a distributed NS phase
   takes it): the chunk's gradients and momentum stacked into temporaries, the NS input
   (`muon.functional.muon_momentum`; a low-precision state_dtype: `muon::low_precision_momentum` per
   member, which also returns the next momentum in its stored form), the NS, and the scaled update
   -lr·s·O (NorMuon's normalized O for variant="normuon") into the bucket's update stack; the
   chunk's temporaries are freed before the next. Then the decay factors per matrix (cautious: per
   element, from the chunk's parameters stacked in opmath);
2. AdamW buckets: the per-parameter scalars once for the bucket (`muon.functional.adamw_scalars`),
   then chunk by chunk the update m̂ / (sqrt(v̂) + eps) over every run of same-shape parameters at
   once (`adamw_direction`), the next moments only as the chunk's temporaries;

and only then commits: missing state entries are installed into `opt.state`, and every write runs
in place — momentum `lerp_` and moments from the gradients (sanitized again into a workspace
allocated before the commit), low-precision states copied from their stored forms, counters, and
parameters (each chunk's stacked in opmath into the workspace, W·decay + update, written back;
whole distributed buckets member by member). Everything that can fail (a backend, an out-of-memory,
a collective, an interrupt raised by code the step calls) happens before the first write, so **a
step that raises changes nothing**: parameters and state keep their bits. What this costs, held
until the commit: per Muon bucket its scaled update in opmath (4 B per parameter for fp32 and bf16
parameters), per AdamW bucket its update, the next momentum / moments of a state_dtype group in
their stored form, per-element decay factors with cautious weight decay, and a workspace of the
largest chunk's gradients and parameters; during the compute phase, one chunk's stacks and NS
workspace at a time (docs/guarantees.md gives the bytes per parameter). With `atomic=False` each
bucket is committed as soon as it is computed: a failure can leave earlier buckets stepped, for the
smallest footprint.

Skipped parameters (non-finite gradients) are handled with per-parameter masked scalars (0-dim
tensors, or one per row of a stack), never with host syncs or per-element masks, so the step has no
data-dependent Python and can be captured (CUDA graphs, torch.compile). The arithmetic per element
is that of the reference loop (tests/reference_loop.py, the tests' oracle), which calls the same
functions on one parameter at a time.
"""

from __future__ import annotations

import functools
import operator
import weakref
from dataclasses import dataclass
from itertools import repeat

import torch
from torch import Tensor

from .. import functional as F
from ..backends.momentum_op import low_precision_momentum
from .plan import COUNTERS, AdamWBucket, GroupPlan, MuonBucket, MuonChunk, Plan, chunk_bounds, local, stack_rows


class StepState:
    """`opt.state` as one step sees it: every entry read from the state (its local tensor for
    DTensor state), a missing one created (`muon.functional.zero_state`, what the loop creates) and
    installed at the commit, so a refused or failed first step creates no state."""

    def __init__(self, state, seen: dict | None = None, scalars: dict | None = None) -> None:
        self.state = state
        self.installs: list[tuple[Tensor, str, Tensor]] = []
        self.made: dict[tuple[int, str], Tensor] = {}
        # (id(p), key) -> (id of its state dict, weak references to the tensor and its checked local
        # tensor) as read at an earlier step of the plan: the same tensor object needs no new check
        self.seen = {} if seen is None else seen
        # 0-dim tensors of Python numbers (the plan's: made once, read-only)
        self.scalars: dict[tuple, Tensor] = {} if scalars is None else scalars

    def get(self, p: Tensor, key: str, where: str, shape: tuple | None = None, flatten: bool = False,
            transposed: bool = False, device=None, create: bool = True,
            low: torch.dtype | None = None) -> Tensor | None:
        """The local tensor of state[p][key] (created when missing), checked to have `shape`
        (default: the parameter's local shape; counters: one element), the dtype of the group's
        state_dtype `low` (`muon.functional.state_dtype`) and to lie on `device`."""
        d = self.state.get(p)
        value = None if d is None else d.get(key)
        hit = self.seen.get((id(p), key))
        if hit is not None and value is not None and hit[0] == id(d) and hit[1]() is value:
            return hit[2]()
        if value is None:
            made = self.made.get((id(p), key))
            if made is not None:
                return local(made)
            F.check_state(key, p, None, place(where), low)
            if not create:
                return None
            value = F.zero_state(key, p, flatten, transposed, low)
            self.made[id(p), key] = value
            self.installs.append((p, key, value))
            return local(value)
        t = local(value)
        F.check_state(key, p, t, place(where), low)  # a state the step would have to cast: refused, naming it
        if key in COUNTERS:
            fits = t.numel() == 1
            expected = ()
        else:
            expected = tuple(local(p).shape) if shape is None else tuple(shape)
            fits = tuple(t.shape) == expected
        if not fits:
            raise ValueError(
                f"{place(where)}: state[{key!r}] has shape {tuple(t.shape)}, but the parameter (shape "
                f"{tuple(p.shape)}) needs {expected}; a parameter whose shape changed needs its state reset "
                "(del opt.state[p]) or a state of the new shape"
            )
        if key in COUNTERS and t.dim() != 0 or device is not None and t.device != device:
            # a torch.optim.AdamW state keeps `step` on the CPU; a loaded counter may be (1,)
            moved = t.to(device or t.device).reshape(())
            self.made[id(p), key] = moved
            self.installs.append((p, key, moved))
            return moved
        # weakly: the state is what keeps its tensors (opt.state.clear() frees them)
        self.seen[id(p), key] = (id(d), weakref.ref(value), weakref.ref(t))
        return t

    def const(self, value: float, dtype: torch.dtype, device) -> Tensor:
        """A 0-dim tensor of a Python number (`muon.functional.scalar`), made once per plan (never
        written: every use reads it)."""
        key = (value, dtype, device)
        t = self.scalars.get(key)
        if t is None:
            if len(self.scalars) >= 64:  # lr-dependent values (1 - lr·wd) under a scheduler: bounded
                self.scalars.clear()
            t = self.scalars[key] = F.scalar(value, dtype, device)
        return t

    def entries(self, params: list[Tensor]) -> list:
        """state[p] of each parameter as it is (None where it has none; no check, nothing created):
        to see whether a packing still holds, one lookup per parameter."""
        get = self.state.get
        return [get(p) for p in params]

    def install(self) -> None:
        for p, key, value in self.installs:
            self.state[p][key] = value
        self.installs.clear()


class Workspace:
    """The commit's scratch, allocated before the first write: per (dtype, device, slot) one buffer as
    large as the largest chunk that needs it (slot 0: the gradients sanitized again at the commit;
    slot 1: the parameters stacked in opmath to be updated and written back)."""

    def __init__(self) -> None:
        self.sizes: dict[tuple, int] = {}
        self.buffers: dict[tuple, Tensor] = {}

    def need(self, dtype: torch.dtype, device, numel: int, slot: int = 0) -> None:
        key = (dtype, device, slot)
        self.sizes[key] = max(self.sizes.get(key, 0), numel)

    def allocate(self) -> None:
        for key, numel in self.sizes.items():
            if self.buffers.get(key) is None or self.buffers[key].numel() < numel:
                self.buffers[key] = torch.empty(numel, dtype=key[0], device=key[1])

    def release(self) -> None:
        self.sizes.clear()
        self.buffers.clear()

    def take(self, dtype: torch.dtype, device, shape: tuple, offset: int = 0, slot: int = 0) -> Tensor:
        """A contiguous tensor of `shape` at element `offset` of the buffer: one op (as_strided), where a
        slice and a view would be two (torch.compile: those two)."""
        buffer = self.buffers[dtype, device, slot]
        if torch.compiler.is_compiling():
            return buffer[offset : offset + _numel(shape)].view(shape)
        return buffer.as_strided(shape, _contiguous_strides(shape), offset)

    def stack(self, tensors: list[Tensor], dtype: torch.dtype, device, offset: int = 0, slot: int = 0) -> Tensor:
        """Same-shape `tensors` stacked into the buffer at `offset`, cast to `dtype`: (k, *shape)."""
        rows = self.take(dtype, device, (len(tensors), *tensors[0].shape), offset, slot)
        _stack_into(tensors, rows)
        return rows


@functools.lru_cache(maxsize=256)
def _contiguous_strides(shape: tuple) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def finite_flags(plan: Plan) -> Tensor | None:
    """(N,) bool on the device: gradient j of plan.flag_params is finite. One multi-tensor norm."""
    if not plan.flag_params:
        return None
    # DTensor gradients: the local shard's flag; the ranks agree them (plain: a parameter's gradient
    # has its shape, none is empty)
    grads = [p.grad for p in plan.flag_params] if plan.plain else [local(p.grad) for p in plan.flag_params]
    if not plan.plain and any(g.numel() == 0 for g in grads):  # a rank without rows of a parameter: finite
        nonempty = [g for g in grads if g.numel() > 0]
        norms = iter(torch._foreach_norm(nonempty, float("inf")) if nonempty else ())
        zero = torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)
        return torch.stack([next(norms).to(zero.device) if g.numel() > 0 else zero for g in grads]).isfinite()
    norms = torch._foreach_norm(grads, float("inf"))
    home = grads[0].device  # parameters on several devices: one vector on the first one's
    return torch.stack([n if n.device == home else n.to(home) for n in norms]).isfinite()


def first_nonfinite(plan: Plan, ok_all: Tensor) -> tuple[int, int] | None:
    """(group, position) of the first parameter with a non-finite gradient (one host sync)."""
    if bool(ok_all.all()):
        return None
    return plan.where[int((~ok_all).nonzero()[0, 0])]


def _where(gplan: GroupPlan, i: int) -> tuple[int, int]:
    """Where a parameter is, (group, position): `place` makes the text of an error only when one is raised."""
    return (gplan.index, i)


def place(where) -> str:
    return where if isinstance(where, str) else f"param_groups[{where[0]}]['params'][{where[1]}]"


# ---------------------------------------------------------------------------------------- Muon
@dataclass
class MomentumPhase:
    """A chunk of a Muon bucket after its momentum: the NS input and its finite flags."""

    chunk: MuonChunk
    U: Tensor  # (B, s, l) NS input
    ok_mat: Tensor | None  # (B, 1, 1) finite flags per matrix (None: all finite)
    bad_mat: Tensor | None  # (B, 1, 1) its negation (the commit sanitizes the gradients again with it)
    weight: Tensor | None = None  # (B, 1, 1) or 0-dim: the momentum's lerp weight (0 where skipped)


def _scratch(ws: Workspace, b: MuonBucket, chunk: MuonChunk, dtype: torch.dtype, slot: int,
             transposed: bool) -> Tensor:
    """The commit's (B, s, l) scratch of a chunk in the workspace; transposed (every run of the chunk
    stacks its members' transposes): laid out as (B, l, s), as the members are. Stacking them into
    it, writing them back and elementwise ops with (B, s, l) stacks then copy contiguously and read
    one operand strided, where the stack's layout took strided writes (on a CPU about twice as slow);
    the same ops per element, the same bits."""
    n, s, l = chunk.hi - chunk.lo, *b.shape[1:]
    if transposed:
        return ws.take(dtype, b.device, (n, l, s), slot=slot).mT
    return ws.take(dtype, b.device, (n, s, l), slot=slot)


def _stack_grads(b: MuonBucket, chunk: MuonChunk, bad_mat: Tensor | None, G: Tensor) -> None:
    """The chunk's gradients into G (B, s, l), zero where not finite (bad_mat: (B, 1, 1), None: all finite)."""
    chunk.to_stack(b.members[chunk.first : chunk.last], b.grads(chunk.first, chunk.last), G)
    if bad_mat is not None:
        # a placeholder where not finite: the lerp weight is 0 there, and 0 * NaN is NaN
        G.masked_fill_(bad_mat, 0)


@dataclass
class Packed:
    """State entries of a chunk (or an AdamW run) held as rows of one stack: `opt.state` holds the
    `views`, installed by the step that packed them; `ptrs` their data pointers then (None while
    compiling), so `.data =` or `set_()` on one of them (same object, new storage) is seen. Once
    recorded, the plan holds them weakly: the state is what keeps them, and `opt.state.clear()` frees
    them."""

    stack: Tensor | None
    views: list[Tensor] | None
    ptrs: list[int] | None = None
    refs: tuple | None = None  # (weakref to the stack, weakrefs to the views) once recorded

    def tensors(self) -> tuple[Tensor | None, list | None]:
        if self.refs is None:
            return self.stack, self.views
        return self.refs[0](), [ref() for ref in self.refs[1]]

    def holds(self, entries: list, key: str) -> Tensor | None:
        """The stack, where state entry `key` of `entries` (the parameters' state dicts now) are still
        exactly its views, on their storage; else None."""
        stack, views = self.tensors()
        if stack is None or len(entries) != len(views) or None in entries:
            return None
        # a view gone (a deleted entry: nothing else keeps it) or replaced; then `.data =` or `set_()`
        # on one (C-level loops)
        if any(map(operator.is_, views, repeat(None))) or \
                not all(map(operator.is_, [d.get(key) for d in entries], views)):
            return None
        if self.ptrs is not None and not torch.compiler.is_compiling() and \
                list(map(Tensor.data_ptr, views)) != self.ptrs:
            return None
        return stack

    def record(self) -> None:
        if self.refs is not None:  # recorded already (a commit that runs again)
            return
        self.ptrs = None if torch.compiler.is_compiling() else [v.data_ptr() for v in self.views]
        self.refs = (weakref.ref(self.stack), [weakref.ref(v) for v in self.views])
        self.stack = self.views = None


@dataclass
class ChunkMomentum:
    """Where a chunk's momentum lives this step: a packed stack (the state's own storage, `packed`
    the new packing to install at the commit where it was repacked), or per-member tensors (`each`)
    gathered into the scratch stack M."""

    M: Tensor
    scratch: bool
    packed: Packed | None = None  # repacked this step: installed at the commit
    each: list[Tensor] | None = None  # the members' own momentum tensors (not packed)
    # state_dtype bf16/int8: (the members' stored momentum tensors, their int8 scales or None), and
    # per member the next momentum in that form (`_stored`), copied in at the commit
    low: tuple | None = None
    stored: list | None = None


def chunk_momentum(plan: Plan, gplan: GroupPlan, b: MuonBucket, ci: int, st: StepState,
                   entries: list | None = None) -> ChunkMomentum:
    """The chunk's momentum as a (B, s, l) stack. Where the state holds the views of a stack this
    plan packed (and nothing replaced them or their storage), that stack itself, read in place; else
    the state's values are copied into a new stack whose views the commit installs (repacked: the
    first step, after a load, a clear or an assigned state tensor). Row blocks of split parameters
    and DTensor shards keep their own tensors, gathered into a scratch stack every step. entries: the
    bucket's members' state dicts (`StepState.entries`), read here where not given."""
    chunk = b.chunks[ci]
    members = b.members[chunk.first : chunk.last]
    shape = (chunk.hi - chunk.lo, *b.shape[1:])
    if b.low is not None:  # bf16 / int8 state: the fused momentum pass per member (`muon_momentum`)
        each = [st.get(mb.param, "momentum_buffer", _where(gplan, mb.index), low=b.low) for mb in members]
        scales = None
        if b.low == torch.int8:
            scales = [st.get(mb.param, "momentum_scale", _where(gplan, mb.index),
                             F.scale_shape(local(mb.param).shape), low=b.low) for mb in members]  # fmt: skip
        return ChunkMomentum(None, True, low=(each, scales))
    if b.sharded or any(run.mode == "each" for run in chunk.runs):
        each = [st.get(mb.param, "momentum_buffer", _where(gplan, mb.index), local(mb.param.grad).shape)
                for mb in members]  # fmt: skip
        M = torch.empty(shape, dtype=b.mdtype, device=b.device)
        chunk.to_stack(members, each, M)
        return ChunkMomentum(M, True, each=each)
    packed = plan.packed.get((id(b), ci))
    if packed is not None:
        entries = st.entries(b.whole_params[chunk.first : chunk.last]) if entries is None else \
            entries[chunk.first : chunk.last]
    stack = None if packed is None else packed.holds(entries, "momentum_buffer")
    if stack is not None:
        return ChunkMomentum(stack, False)  # checked when it was packed; the same tensors since
    current = [st.get(mb.param, "momentum_buffer", _where(gplan, mb.index), mb.param.grad.shape, create=False)
               for mb in members]  # fmt: skip
    missing = any(t is None for t in current)
    M = (torch.zeros if missing else torch.empty)(shape, dtype=b.mdtype, device=b.device)
    views = chunk.from_stack(members, M)
    pairs = [(v, t) for v, t in zip(views, current, strict=True) if t is not None]
    if pairs:
        torch._foreach_copy_([v for v, _ in pairs], [t for _, t in pairs])
    for mb, v in zip(members, views, strict=True):
        st.installs.append((mb.param, "momentum_buffer", v))
    return ChunkMomentum(M, False, packed=Packed(M, views))


def muon_momentum(b: MuonBucket, chunk: MuonChunk, group: dict, ok_all: Tensor | None,
                  cm: ChunkMomentum, const=F.scalar) -> MomentumPhase:
    """The chunk's gradients stacked (a temporary) and the NS input U from the momentum stack;
    writes no state (a packed stack is read, a scratch stack may be overwritten)."""
    momentum, device = group["momentum"], b.device
    G = torch.empty((chunk.hi - chunk.lo, *b.shape[1:]), dtype=b.gdtype, device=device)
    ok_mat = bad_mat = None
    if ok_all is not None:
        ok_mat = ok_all[chunk.matrix_flag_index].view(-1, 1, 1)
        bad_mat = ~ok_mat
    _stack_grads(b, chunk, bad_mat, G)
    if cm.low is not None:
        # bf16 / int8 state (state_dtype): `muon::low_precision_momentum` per member reads its stored
        # momentum and gradient once, writes its rows of the NS input U (opmath) and returns the next
        # momentum in its stored form, copied into the state at the commit (a skipped member's: its bits)
        weight = F.masked(ok_mat, 1.0 - momentum, 0.0, b.opmath, device, const)
        members = b.members[chunk.first : chunk.last]
        U = torch.empty(G.shape, dtype=b.opmath, device=device)
        grads, outs = chunk.from_stack(members, G), chunk.from_stack(members, U)
        weights = [weight] * len(members) if weight.ndim == 0 else \
            list(weight.view(-1)[[mb.offset - chunk.lo for mb in members]].unbind())
        each, scales = cm.low
        cm.stored = [low_precision_momentum(q, None if scales is None else scales[k], grads[k], weights[k], momentum,
                                            group["nesterov"], outs[k]) for k, q in enumerate(each)]  # fmt: skip
        return MomentumPhase(chunk, U, ok_mat, bad_mat, weight)
    weight = F.masked(ok_mat, 1.0 - momentum, 0.0, cm.M.dtype, device, const)
    _, U = F.muon_momentum(cm.M, G, weight, momentum, group["nesterov"], scratch=cm.scratch)
    if cm.scratch:
        cm.M = None  # the scratch stack is U's now (or freed)
    return MomentumPhase(chunk, U, ok_mat, bad_mat, weight)


def bucket_ns(b: MuonBucket, U: Tensor) -> Tensor:
    """Newton–Schulz of rows of the bucket's stack (a chunk, all of it, or one rank's share)."""
    return b.run(U, b.schedule, b.ns_dtype)


def chunked_ns(b: MuonBucket, X: Tensor, chunk_bytes: int | None, out: Tensor | None = None) -> Tensor:
    """Newton–Schulz of a (k, s, l) stack in chunks of at most `chunk_bytes` (at least two matrices
    each, as a one-process plan chunks its buckets: the same bits), so the workspace is one chunk's
    (a distributed NS phase, whose stacks are whole buckets). One chunk: the result, `out` unused;
    several: written into `out` (a new stack where None), which is returned."""
    k = X.shape[0]
    bounds = chunk_bounds([X[0].numel() * X.element_size()] * k, chunk_bytes, [1] * k) if k else [(0, 0)]
    if len(bounds) == 1:
        return bucket_ns(b, X)
    out = torch.empty(X.shape, dtype=b.ns_dtype, device=X.device) if out is None else out
    for lo, hi in bounds:
        out[lo:hi] = bucket_ns(b, X[lo:hi])
    return out


def local_ns(plan: Plan, gplan: GroupPlan, phases: list[MomentumPhase]) -> list[Tensor]:
    """The NS phase of one process: one batched call per stack."""
    return [bucket_ns(b, ph.U) for b, ph in zip(gplan.buckets, phases, strict=True)]


def muon_scale(b: MuonBucket, group: dict, O: Tensor, ph: MomentumPhase, out: Tensor,
               moments: list[Tensor] | None, const=F.scalar) -> list | None:
    """After NS: the scaled update -lr·s·O' of the chunk into its rows of `out` (O' = O, or NorMuon's
    normalized O); NorMuon returns the members' next moments (views of new stacks), else None.

    Per-chunk math only: it does not matter where O was computed (one process, or each rank's rows
    gathered)."""
    chunk = ph.chunk
    lr = group["lr"]
    device, dtype = b.device, b.opmath
    if isinstance(lr, Tensor):
        # the reference's -lr * scale in lr's dtype (a Python factor is cast to it)
        neg_lr_scale = (-lr.to(device)) * chunk.scales.to(lr.dtype)
    else:
        neg_lr_scale = chunk.scales * -float(lr)  # in double, as Python computes -lr * scale
    scale = F.masked(ph.ok_mat, neg_lr_scale.to(dtype), 0.0, dtype, device, const)
    X = stack_rows(out, chunk.lo, chunk.hi)
    if not b.normuon:
        torch.mul(O, scale, out=X)  # -lr·s·O per matrix, rounded once to opmath (X may be O itself)
        return None
    if X is not O:
        X.copy_(O)
    n, s, l = X.shape
    # the members' moments stacked (unused entries of the other kind stay zero)
    rows = torch.zeros((n, s), dtype=dtype, device=device) if chunk.has_rows else None
    cols = torch.zeros((n, l), dtype=dtype, device=device) if chunk.has_cols else None
    members = b.members[chunk.first : chunk.last]
    shape_of = _neuron_shape(group)
    torch._foreach_copy_(chunk.neurons(members, rows, cols, shape_of), moments[chunk.first : chunk.last])
    rows, cols = F.normuon_update(X, scale, group["normuon_beta2"], group["normuon_eps"], rows, cols,
                                  chunk.row_matrices, ph.ok_mat)  # fmt: skip
    return chunk.neurons(members, rows, cols, shape_of)


def _neuron_shape(group: dict):
    flatten, transposed = group["flatten"], group.get("transposed", False)
    return lambda mb: F.neuron_shape(mb.param.shape, flatten, transposed)


def muon_bucket_step(plan: Plan, gplan: GroupPlan, b: MuonBucket, group: dict, ok_all: Tensor | None,
                     st: StepState, ws: Workspace, results: list[Tensor] | None = None,
                     phases: list[MomentumPhase] | None = None, cms: list[ChunkMomentum] | None = None,
                     atomic: bool = True):
    """One Muon bucket: momentum and NS chunk by chunk (or the given distributed `results` of its
    single chunk's `phases`), the scaled update, decay factors; returns the bucket's commit.
    atomic=False (each chunk a bucket, committed at once): parameters updated member by member in
    place, without a stacked chunk of them (the smallest footprint)."""
    flatten, transposed = group["flatten"], group.get("transposed", False)
    # the skip counters of the members that keep them (not a split parameter's later blocks): one (k,) stack
    owners = b.members if b.all_owners else [mb for mb in b.members if mb.owner]
    # the members' state dicts, read once for the checks that the state still holds the packed stacks
    entries = None if b.sharded else st.entries(b.whole_params)
    skips = None
    if owners:
        params = b.whole_params if b.all_owners else [mb.param for mb in owners]
        skips = packed_state(plan, (id(b), "nonfinite_skips"), params, gplan.index, [mb.index for mb in owners],
                             "nonfinite_skips", st, entries if b.all_owners or b.sharded else st.entries(params),
                             b.device)  # fmt: skip
    moments = [] if b.normuon else None
    for mb in b.members:
        if b.normuon:
            moments.append(st.get(mb.param, "normuon_v", _where(gplan, mb.index),
                                  F.neuron_shape(mb.param.shape, flatten, transposed), flatten, transposed))
    # the bucket's scaled update; a bucket of one chunk scales its NS result in place when that is
    # already in opmath, so the update is not a stack alive beside the Newton–Schulz workspace
    out = None if results is None and len(b.chunks) == 1 else torch.empty(b.shape, dtype=b.opmath, device=b.device)
    next_moments, held, ok_mats = [], [], []
    if results is None:  # one process: chunk by chunk, each chunk's stacks freed before the next
        for ci, chunk in enumerate(b.chunks):
            cm = chunk_momentum(plan, gplan, b, ci, st, entries)
            ph = muon_momentum(b, chunk, group, ok_all, cm, st.const)
            O = bucket_ns(b, ph.U)
            if out is None:
                # O becomes the update only where it is a stack of its own, never the NS input, which
                # may be the state's momentum stack (traced, NS is the registered op: a new tensor)
                owned = O.dtype == b.opmath and O.shape == b.shape and O.is_contiguous() and (
                    torch.compiler.is_compiling()
                    or O.untyped_storage().data_ptr() != ph.U.untyped_storage().data_ptr()
                )
                out = O if owned else torch.empty(b.shape, dtype=b.opmath, device=b.device)
            del ph.U
            next_moments.append(muon_scale(b, group, O, ph, out, moments, st.const))
            del O
            held.append(cm)
            ok_mats.append((ph.ok_mat, ph.bad_mat, ph.weight))
    else:
        for ph, O, cm in zip(phases, results, cms, strict=True):
            next_moments.append(muon_scale(b, group, O, ph, out, moments, st.const))
            held.append(cm)
            ok_mats.append((ph.ok_mat, ph.bad_mat, ph.weight))
    lr, wd = group["lr"], group["weight_decay"]
    cautious = group.get("cautious_weight_decay", False) and wd != 0
    # the members' finite flags and their negation: the matrices' where they are the members' (one chunk,
    # one matrix per member), else gathered
    ok = bad = None
    if ok_all is not None:
        chunk = b.chunks[0]
        if len(b.chunks) == 1 and chunk.matrix_flag_index is chunk.flag_index:
            ok, bad = ok_mats[0][0].view(-1), ok_mats[0][1].view(-1)
        else:
            ok = ok_all[b.flag_index]
    members_of = [b.members[c.first : c.last] for c in b.chunks]
    params_of = [b.whole_local_params(c.first, c.last) for c in b.chunks]
    decays = []
    # a distributed NS phase takes whole buckets, and atomic=False wants the smallest footprint: their
    # parameters are updated in place, member by member (`muon.functional.commit_update`, the same
    # bits), not stacked at the commit
    member_commit = results is not None or not atomic
    for chunk, members, params, (ok_mat, _, _) in zip(b.chunks, members_of, params_of, ok_mats, strict=True):
        numel = (chunk.hi - chunk.lo) * b.shape[1] * b.shape[2]
        ws.need(b.gdtype, b.device, numel)
        if member_commit:
            break
        ws.need(b.opmath, b.device, numel, slot=1)
        if wd == 0:
            decays.append(None)
            continue
        # W·(1 - lr·wd) per matrix, 1 where skipped; cautious: only where the update u (W -= lr·s·u,
        # so out = -lr·s·u) agrees in sign with W, per element (held until the commit)
        decay = F.masked(ok_mat, 1 - lr * wd, 1.0, b.opmath, b.device, st.const)
        if cautious:
            W = torch.empty((chunk.hi - chunk.lo, *b.shape[1:]), dtype=b.opmath, device=b.device)
            chunk.to_stack(members, params, W)
            (decay,) = F.cautious_decay([W], [stack_rows(out, chunk.lo, chunk.hi)], decay, 1, stacked=True)
            del W
        decays.append(decay)
    work = member_decay = out_views = None
    if member_commit:
        out_views = b.chunks[0].from_stack(b.members, out)
        if b.pdtype not in (torch.float32, torch.float64):  # fp32 copies of bf16/fp16 parameters
            work = b.chunks[0].from_stack(b.members, torch.empty(b.shape, dtype=b.opmath, device=b.device))
        target = F.opmath_view(b.params, work)
        member_decay = F.decay_factors(ok, lr, wd, cautious, target, out_views, 1, b.opmath, b.device, st.const)
    weights = None
    if any(cm.each is not None for cm in held):  # members' own momentum tensors: per-member weights
        weights = F.masked(ok, 1.0 - group["momentum"], 0.0, b.mdtype, b.device, st.const)
        weights = list(weights.unbind()) if weights.ndim else [weights] * len(b.members)
    skipped = None
    if ok is not None and skips is not None:
        if not b.all_owners:
            skipped = ~ok[[k for k, mb in enumerate(b.members) if mb.owner]]
        else:
            skipped = ~ok if bad is None else bad

    def commit() -> None:
        for ci, (chunk, cm, (_, bad_mat, weight)) in enumerate(zip(b.chunks, held, ok_mats, strict=True)):
            if cm.low is not None:  # bf16 / int8 state: the stored form computed before the commit
                torch._foreach_copy_(cm.low[0], [q for q, _ in cm.stored])
                if cm.low[1] is not None:
                    torch._foreach_copy_(cm.low[1], [scale for _, scale in cm.stored])
                continue
            # the momentum in place, from the sanitized gradients (with phase one's lerp weight)
            G = _scratch(ws, b, chunk, b.gdtype, slot=0, transposed=chunk.transposes == "all")
            _stack_grads(b, chunk, bad_mat, G)
            if cm.each is None:  # a packed stack: one op (its views are the state, installed already)
                cm.M.lerp_(G, weight)
                if cm.packed is not None:
                    cm.packed.record()
                    plan.packed[id(b), ci] = cm.packed
                continue
            members = b.members[chunk.first : chunk.last]
            torch._foreach_lerp_(chunk.targets(members, cm.each), chunk.from_stack(members, G),
                                 weights[chunk.first : chunk.last])  # fmt: skip
        if skips is not None:  # (a bucket of split parameters' later blocks keeps no counters)
            if skipped is not None:
                skips[0].add_(skipped)
            record_packed(plan, (id(b), "nonfinite_skips"), skips)
        if moments is not None:
            for chunk, nxt in zip(b.chunks, next_moments, strict=True):
                torch._foreach_copy_(moments[chunk.first : chunk.last], nxt)
        if member_commit:
            F.commit_update(b.params, work, member_decay, out_views)
            return
        # the parameters, chunk by chunk: stacked in opmath, W·decay + update, written back
        s, l = b.shape[1:]
        for chunk, members, params, decay in zip(b.chunks, members_of, params_of, decays, strict=True):
            update = stack_rows(out, chunk.lo, chunk.hi)
            if chunk.transposes != "some":
                W = _scratch(ws, b, chunk, b.opmath, slot=1, transposed=chunk.transposes == "all")
                chunk.to_stack(members, params, W)
                F.commit_stack(W, decay, update)
                chunk.write_back(members, W, params)
                continue
            # run by run, a transposed run's W laid out as its parameters are (`_scratch`)
            for run in chunk.runs:
                lo, hi = run.lo - chunk.lo, run.hi - chunk.lo
                if run.transpose and run.mode != "each":  # (hi - lo, s, l), laid out as (hi - lo, l, s)
                    W = ws.take(b.opmath, b.device, (hi - lo, l, s), lo * s * l, slot=1).mT
                else:
                    W = ws.take(b.opmath, b.device, (hi - lo, s, l), lo * s * l, slot=1)
                part_members, part_params = chunk.part(run, members), chunk.part(run, params)
                run.to_stack(part_members, part_params, W, run.lo)
                rows = None if decay is None else decay if decay.ndim == 0 else stack_rows(decay, lo, hi)
                F.commit_stack(W, rows, stack_rows(update, lo, hi))
                run.write_back(part_members, W, run.lo, part_params)

    return commit


# --------------------------------------------------------------------------------------- AdamW
ADAMW_KEYS = ("exp_avg", "exp_avg_sq", "step", "nonfinite_skips")


def run_state(plan: Plan, gplan: GroupPlan, b: AdamWBucket, first: int, last: int, key: str, st: StepState,
              entries: list):
    """State entry `key` of the AdamW bucket's parameters [first, last) as one stack (`packed_state`):
    (k, numel) for the moments of a run of same-shape parameters, (k,) for the counters (the whole
    bucket). entries: the bucket's parameters' state dicts (`StepState.entries`)."""
    return packed_state(plan, (id(b), first, key), b.params[first:last], gplan.index, b.indices[first:last], key,
                        st, None if b.sharded else entries[first:last], b.device, b.low)


def packed_state(plan: Plan, pkey: tuple, params: list[Tensor], group: int, indices: list[int], key: str,
                 st: StepState, entries: list | None, device, low: torch.dtype | None = None):
    """State entry `key` of `params` as one stack: (k, numel) for moments (same-shape parameters),
    (k,) for counters. The packed stack the state holds views of (read and written in place), else
    the state's values copied into a new stack whose views the commit installs (repacked); entries
    None (DTensor shards): gathered into a scratch stack and written back at the commit. Returns
    (stack, Packed to record under `pkey` or None, tensors to write back or None). group, indices:
    where the parameters are (param_groups[group]['params'][i]), for errors; low: the group's state_dtype."""
    counter = key in COUNTERS
    sharded = entries is None
    if not sharded:
        packed = plan.packed.get(pkey)
        stack = None if packed is None else packed.holds(entries, key)
        if stack is not None:
            return stack, None, None  # checked when it was packed; the same tensors since
    current = [st.get(p, key, (group, i), device=device if key == "step" else None, create=sharded, low=low)
               for p, i in zip(params, indices, strict=True)]  # fmt: skip
    k = len(params)
    if sharded:
        S = torch.stack([t.reshape(()) if t.dim() else t for t in current]) if counter else \
            torch.stack(current).view(k, -1)
        return S, None, current
    shape = tuple(local(params[0]).shape)
    missing = any(t is None for t in current)
    S = (torch.zeros if missing else torch.empty)((k,) if counter else (k, max(1, _numel(shape))),
                                                  dtype=F.state_dtype(key, params[0], low), device=device)
    views = list((S if counter else S.view(k, *shape)).unbind(0))
    pairs = [(v, t.reshape(v.shape)) for v, t in zip(views, current, strict=True) if t is not None]
    if pairs:
        torch._foreach_copy_([v for v, _ in pairs], [t for _, t in pairs])
    for p, v in zip(params, views, strict=True):
        st.installs.append((p, key, v))
    return S, Packed(S, views), None


def record_packed(plan: Plan, pkey: tuple, stacked: tuple) -> None:
    """At the commit: a repacked stack becomes the plan's packing (`Packed.record`); a scratch stack of
    DTensor shards is written back into them."""
    S, packed, back = stacked
    if packed is not None:
        packed.record()
        plan.packed[pkey] = packed
    if back is not None:
        rows = list(S.unbind(0))
        torch._foreach_copy_(back, [v if v.shape == t.shape else v.view(t.shape)
                                    for v, t in zip(rows, back, strict=True)])  # fmt: skip


def _numel(shape: tuple) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def adamw_update(plan: Plan, gplan: GroupPlan, b: AdamWBucket, group: dict, ok_all: Tensor | None, fused: bool,
                 st: StepState, ws: Workspace):
    """torch.optim.AdamW's update of one bucket. Its counters are one (P,) stack per bucket, its
    moments one (k, numel) stack per run of same-shape parameters (`run_state`); the per-parameter
    scalars are computed once for the bucket, and the arithmetic runs chunk by chunk over every run
    of the chunk at once (`muon.functional.adamw_direction`): the update m̂ / (sqrt(v̂) + eps) held,
    the next moments only as the chunk's temporaries. Returns its commit, which advances the moments
    in place on the stacks (`muon.functional.adamw_advance`)."""
    lr = group["lr"]
    beta1, beta2 = group["betas"]
    wd, eps = group["weight_decay"], group["eps"]
    device = b.device
    params = b.local_params()
    grads = [p.grad for p in b.params] if plan.plain else [local(p.grad) for p in b.params]
    cautious = group.get("cautious_weight_decay", False) and wd != 0
    if fused and ok_all is None and b.fusable and not cautious:
        # every gradient is known finite (nonfinite="raise" checked it): one fused kernel in place,
        # at the commit
        state = {key: [] for key in ADAMW_KEYS}
        for i, p in zip(b.indices, b.params, strict=True):
            for key in state:
                state[key].append(st.get(p, key, _where(gplan, i), device=device if key == "step" else None))
        ea_all, eas_all, steps_all, _ = (state[k] for k in ADAMW_KEYS)

        def commit_fused() -> None:
            torch._foreach_add_(steps_all, 1)
            torch._fused_adamw_(
                params, grads, ea_all, eas_all, [], steps_all,
                lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
            )  # fmt: skip

        return commit_fused
    dtype, n = b.opmath, len(params)
    runs = b.runs
    sizes = [last - first for first, last in runs]
    # the per-parameter scalars, once for the bucket: (P,) vectors, (P, 1) against the (k, numel) runs
    entries = None if b.sharded else st.entries(b.params)
    counters = [run_state(plan, gplan, b, 0, n, key, st, entries) for key in COUNTERS]
    ok = None if ok_all is None else ok_all[b.flag_index]
    steps, step_size, bc2_sqrt = F.adamw_scalars(counters[0][0], ok, beta1, beta2, lr, dtype, st.const)
    rows = None if ok is None else ok.view(-1, 1)
    # the moments' lerp weights in their dtype (bf16 moments of state_dtype: read in opmath)
    mdtype = dtype if b.low is not None else F.state_dtype("exp_avg", b.params[0])
    w1 = _per_run(F.masked(rows, 1 - beta1, 0.0, mdtype, device, st.const), sizes)
    w2 = _per_run(F.masked(rows, beta2, 1.0, mdtype, device, st.const), sizes)
    bc2_sqrt = _per_run(bc2_sqrt.view(-1, 1), sizes)
    bad = None if ok is None else list((~rows).split_with_sizes(sizes))
    step_size = _per_run(step_size.view(-1, 1), sizes)
    # W·(1 - lr·wd) per parameter, 1 where skipped; cautious: per element, only where the update u
    # (W -= lr·u, u = m̂/(sqrt(v̂)+eps) up to the positive lr/bias_correction1) agrees in sign with W
    decay = None if wd == 0 else _per_run(F.masked(rows, 1 - lr * wd, 1.0, dtype, device, st.const), sizes)
    moments, updates, stored = [], [], []
    r = 0
    for chunk in b.chunks:
        numel = chunk.numel
        if b.low is None:  # (bf16 moments are copied in from their next values: no gradients again)
            ws.need(b.gdtype, device, numel)
        ws.need(dtype, device, numel, slot=1)
        part = slice(r, r + len(chunk.runs))
        G, M, out = [], [], []
        for first, last in chunk.runs:  # same-shape parameters: their state is (k, numel) stacks
            EA, EAS = (run_state(plan, gplan, b, first, last, key, st, entries) for key in ("exp_avg", "exp_avg_sq"))
            g = _as_rows(torch.stack(grads[first:last]), EA[0].shape)
            if bad is not None:
                g.masked_fill_(bad[r], 0)  # a skipped parameter's lerp weight is 0, and 0 * NaN is NaN
            G.append(g)
            M.append((EA, EAS))
            out.append(torch.empty_like(EA[0], dtype=dtype if b.low is not None else None))
            r += 1
        nxt = F.adamw_direction([m[0][0] for m in M], [m[1][0] for m in M], G, w1[part], w2[part],
                                bc2_sqrt[part], beta2, eps, out, low=b.low is not None)  # fmt: skip
        if nxt is not None:  # bf16 moments (state_dtype): their next values, copied in at the commit
            stored.extend(zip(*nxt, strict=True))
        del G
        if cautious:  # the parameters in opmath, a temporary of the chunk
            for k, ((first, last), u) in enumerate(zip(chunk.runs, out, strict=True)):
                W = torch.stack(params[first:last]).view(u.shape).to(dtype)
                (decay[part.start + k],) = F.cautious_decay([W], [u], decay[part.start + k], -1, stacked=True)
                del W
        moments.extend(M)
        updates.extend(out)

    def commit() -> None:
        if stored:  # bf16 moments (state_dtype): their next values, computed before the commit
            torch._foreach_copy_([m[k][0] for m in moments for k in (0, 1)], [t for pair in stored for t in pair])
        r = 0
        for chunk in b.chunks if not stored else ():
            G, offset = [], 0
            for first, last in chunk.runs:
                g = _as_rows(ws.stack(grads[first:last], b.gdtype, device, offset), moments[r][0][0].shape)
                offset += g.numel()
                if bad is not None:
                    g.masked_fill_(bad[r], 0)
                G.append(g)
                r += 1
            part = slice(r - len(chunk.runs), r)
            F.adamw_advance([m[0][0] for m in moments[part]], [m[1][0] for m in moments[part]], G, w1[part],
                            w2[part], beta2)  # fmt: skip
        STEP, SKIP = counters[0][0], counters[1][0]
        STEP.copy_(steps)
        if ok is not None:
            SKIP.add_(~ok)
        for key, c in zip(COUNTERS, counters, strict=True):
            record_packed(plan, (id(b), 0, key), c)
        for (first, _), pair in zip(runs, moments, strict=True):
            for key, m in zip(("exp_avg", "exp_avg_sq"), pair, strict=True):
                record_packed(plan, (id(b), first, key), m)
        # the parameters, run by run: stacked in opmath, W·decay + step_size·update, written back
        r = 0
        for chunk in b.chunks:
            offset = 0
            for first, last in chunk.runs:
                rows = ws.stack(params[first:last], dtype, device, offset, slot=1)
                W = _as_rows(rows, updates[r].shape)
                offset += W.numel()
                F.commit_stack(W, None if decay is None else decay[r], updates[r], step_size[r])
                _unstack_into(rows, params[first:last])
                r += 1

    return commit


def _stack_into(tensors: list[Tensor], rows: Tensor) -> None:
    """Same-shape `tensors` into `rows` ((k, *shape)), cast to its dtype: one op (torch.compile does not
    trace stack(out=a view); there, a multi-tensor copy into its rows, the same values)."""
    if torch.compiler.is_compiling():
        torch._foreach_copy_(list(rows.unbind(0)), tensors)
    else:
        torch.stack(tensors, out=rows)


def _unstack_into(rows: Tensor, tensors: list[Tensor]) -> None:
    """The inverse of `_stack_into`: the rows of `rows` ((k, *shape)) copied into `tensors`, cast to
    their dtype; one op (unbind_copy, which takes no cast), else a multi-tensor copy (also where
    torch.compile traces)."""
    if tensors[0].dtype != rows.dtype or torch.compiler.is_compiling():
        torch._foreach_copy_(tensors, list(rows.unbind(0)))
    else:
        torch.unbind_copy(rows, 0, out=tensors)


def _as_rows(stacked: Tensor, shape: torch.Size) -> Tensor:
    """A stack of parameters (k, *shape) as the (k, numel) rows of a run (itself for 1-D parameters: a
    view would dispatch an op for nothing)."""
    return stacked if stacked.shape == shape else stacked.view(shape)


def _per_run(values: Tensor, sizes: list[int]) -> list[Tensor]:
    """(P, 1) per-parameter values as one (k, 1) tensor per run (a 0-dim value: the same for every run)."""
    return list(values.split_with_sizes(sizes)) if values.ndim else [values] * len(sizes)


# ---------------------------------------------------------------------------------------- step
def _empty_state(gplan: GroupPlan, group: dict, st: StepState) -> None:
    """0-element parameters: nothing to compute; their state is created as the loop creates it."""
    if group["use_muon"]:
        keys = ("momentum_buffer", "nonfinite_skips") + (("normuon_v",) if group["variant"] == "normuon" else ())
    else:
        keys = ("step", "exp_avg", "exp_avg_sq", "nonfinite_skips")
    flatten, transposed = group.get("flatten", False), group.get("transposed", False)
    for i, p in gplan.empty:
        for key in keys:
            if key not in (st.state.get(p) or {}):
                st.get(p, key, _where(gplan, i), flatten=flatten, transposed=transposed)


def execute(plan: Plan, param_groups: list[dict], state, ok_all: Tensor | None, fused_adamw: bool, ns_phase=None,
            atomic: bool = True) -> None:
    """One step (module docstring). ok_all: the finite flags (agreed across ranks), None when all
    are known finite; ns_phase(plan, gplan, phases) -> per bucket its NS result (None: one process,
    chunk by chunk); atomic=False commits every bucket as soon as it is computed."""
    st, ws = StepState(state, plan.seen, plan.scalars), Workspace()
    flags = _FlagsOn(ok_all)
    commits = []
    for gplan in plan.groups:
        group = param_groups[gplan.index]
        _empty_state(gplan, group, st)
        if not gplan.use_muon:
            for b in gplan.buckets:
                commits.append(adamw_update(plan, gplan, b, group, flags.on(b.device), fused_adamw, st, ws))
                if not atomic:
                    _commit(st, ws, commits)
        elif ns_phase is None:
            for b in gplan.buckets:
                commits.append(muon_bucket_step(plan, gplan, b, group, flags.on(b.device), st, ws, atomic=atomic))
                if not atomic:
                    _commit(st, ws, commits)
        elif gplan.buckets:  # distributed: every bucket is one chunk, its NS phase runs on all of them
            cms = [chunk_momentum(plan, gplan, b, 0, st) for b in gplan.buckets]
            phases = [muon_momentum(b, b.chunks[0], group, ok_all, cm, st.const)
                      for b, cm in zip(gplan.buckets, cms, strict=True)]  # fmt: skip
            results = ns_phase(plan, gplan, phases)
            for b, ph, O, cm in zip(gplan.buckets, phases, results, cms, strict=True):
                commits.append(muon_bucket_step(plan, gplan, b, group, ok_all, st, ws, [O], [ph], [cm]))
            del phases, results, ph, O, cm  # the NS results are scaled into the buckets' updates
            if not atomic:
                _commit(st, ws, commits)
    _commit(st, ws, commits)


class _FlagsOn:
    """The step's finite flags on a bucket's device: the vector itself, or one copy per other device
    (a group's parameters may lie on several devices; every bucket is on one)."""

    def __init__(self, ok_all: Tensor | None) -> None:
        self.ok_all, self.copies = ok_all, {}

    def on(self, device: torch.device) -> Tensor | None:
        ok = self.ok_all
        if ok is None or ok.device == device:
            return ok
        if device not in self.copies:
            self.copies[device] = ok.to(device)
        return self.copies[device]


def _commit(st: StepState, ws: Workspace, commits: list) -> None:
    """Install the new state entries, allocate the workspace, then every pending write (nothing
    below allocates more than the workspace or calls code that can fail on valid inputs). The
    workspace is freed after: atomic=False commits bucket by bucket, and its scratch must not stay
    alive through the next bucket's Newton–Schulz."""
    ws.allocate()
    st.install()
    for commit in commits:
        commit()
    commits.clear()
    ws.release()


__all__ = ["MomentumPhase", "StepState", "Workspace", "bucket_ns", "execute", "finite_flags", "first_nonfinite",
           "local_ns"]  # fmt: skip
