"""Distributed Muon on torch.distributed: replicated (DDP) and FSDP2-sharded parameters.

`muon.Muon` calls into this module from two places of its step; users never call it directly:

* `finite_flags`: the non-finite test of sharded (DTensor) gradients, run on each rank's local
  shard and agreed over the mesh with one all-reduce per group, so every rank skips the same
  parameters (and with nonfinite="raise" every rank raises the same error).
* `orthogonalize_all`: the Newton–Schulz step of a Muon group, split between ranks.

Replicated parameters (DDP, or plain tensors with the same gradient on every rank once
torch.distributed is initialized): every rank keeps the full momentum (as DDP does), but the NS
work is split. Every matrix (each expert of a 3-D stack counts as one) is assigned to a rank by
greedy longest-processing-time over its NS FLOPs (`muon.flops.newton_schulz_flops`); each rank orthogonalizes its share
with same-shape matrices stacked into one batched call, and one all-gather per group hands every
rank every result, so all ranks apply the same update and keep identical parameters.

FSDP2 parameters (`torch.distributed.fsdp.fully_shard`: DTensors sharded on dim 0 of a 1-D mesh):
momentum is a DTensor, so each rank stores only its shard (ZeRO-1 memory, one buffer). Each
row-sharded matrix gets an owner rank (same greedy balance); per same-shape bucket one all_to_all
gathers the owners' full momentum-corrected matrices, the owner orthogonalizes them batched, and a
second all_to_all scatters each result's rows back to the rank holding them. The gathers of all
buckets are issued before the first NS so that communication overlaps the NS of earlier buckets.
Expert stacks sharded on their expert dim hold whole matrices locally and need no communication.
Other placements (Shard(1), 2-D meshes) fall back to a full gather on every rank (correct, but the
NS work is not split).

Every collective runs on the process group's own timeout (`init_process_group(timeout=...)`); a
rank that raised, exited or fell out of step turns into a `DistributedStepError` naming the
collective and the rank, not a hang.

`comm_bytes_per_step` gives the bytes each rank sends per step for a list of shapes, Muon against
distributed AdamW, from the same plan the optimizer executes; `count_comm_bytes` measures them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._shapes import matrix_shape
from .coefficients import Schedule

try:  # torch.distributed is optional in some builds (and absent on some platforms)
    import torch.distributed as dist
except ImportError:  # pragma: no cover - exercised only on builds without distributed
    dist = None

__all__ = [
    "CommBytes",
    "DistributedStepError",
    "comm_bytes_per_step",
    "count_comm_bytes",
]


class DistributedStepError(RuntimeError):
    """A collective of the distributed Muon step failed (another rank raised, exited or timed out)."""


def ns_flops(m: int, n: int, steps: int) -> int:
    """The balance weight: NS FLOPs steps·(4·s²·l + 2·s³), from muon.flops (imported late: muon.flops
    imports muon.optim, which imports this module)."""
    from .flops import newton_schulz_flops

    return newton_schulz_flops(m, n, steps)


# ------------------------------------------------------------------------------ byte accounting
# Bytes a rank sends, per collective, modelled as the bandwidth-optimal (ring / pairwise)
# algorithms NCCL uses: all-gather (W-1)·chunk, all-reduce 2·(W-1)/W·size, reduce-scatter
# (W-1)/W·size, all-to-all the bytes addressed to other ranks. `comm_bytes_per_step` uses the
# same formulas, so counted and predicted bytes agree exactly.
_COUNTERS: list[CommCounter] = []


@dataclass
class CommCounter:
    bytes: int = 0
    collectives: int = 0


@contextlib.contextmanager
def count_comm_bytes() -> Iterator[CommCounter]:
    """Count the bytes this rank sends in Muon's collectives inside the block (per the model above)."""
    counter = CommCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _record(nbytes: float) -> None:
    for counter in _COUNTERS:
        counter.bytes += int(nbytes)
        counter.collectives += 1


def _failed(what: str, group, exc: BaseException) -> DistributedStepError:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return DistributedStepError(
        f"muon distributed step: {what} failed on rank {rank} of {world}. Another rank raised, exited "
        "or is not running the same step (all ranks must step the optimizer with the same parameters "
        "having gradients); collectives time out after init_process_group(timeout=...). "
        f"Cause: {type(exc).__name__}: {exc}"
    )


class _Pending:
    """An async collective whose failure surfaces as a DistributedStepError on wait()."""

    def __init__(self, work, what: str, group) -> None:
        self.work, self.what, self.group = work, what, group

    def wait(self) -> None:
        try:
            self.work.wait()
        except RuntimeError as exc:
            raise _failed(self.what, self.group, exc) from exc


def _all_gather_single(output: Tensor, input: Tensor, group) -> None:
    # all_gather_single is torch >= 2.13's name for all_gather_into_tensor (now deprecated)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def _collective(what: str, group, nbytes: float, fn):
    _record(nbytes)
    try:
        work = fn()
    except RuntimeError as exc:
        raise _failed(what, group, exc) from exc
    return _Pending(work, what, group) if work is not None else None


# ------------------------------------------------------------------------------- group helpers

def _all_to_all_async(what: str, pg, rank: int, send, send_splits: list[int], recv_splits: list[int]):
    """Start all_to_all_single(send -> a new receive buffer); returns (buffer, work). The bytes
    counted are those this rank sends to others."""
    recv = send.new_empty(sum(recv_splits))
    nbytes = (sum(send_splits) - send_splits[rank]) * send.element_size()
    work = _collective(
        what,
        pg,
        nbytes,
        lambda: dist.all_to_all_single(recv, send, recv_splits, send_splits, group=pg, async_op=True),
    )
    return recv, work

def replicated_group(process_group):
    """The process group replicated parameters split their NS over, or None for a local step.

    process_group=None takes the default group once torch.distributed is initialized; a group of
    one rank (or no initialized torch.distributed) means every rank orthogonalizes everything.
    """
    if dist is None or not dist.is_available() or not dist.is_initialized():
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialized")
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def is_dtensor(t) -> bool:
    # No DTensor exists before torch.distributed.tensor is imported: `import muon` stays light
    # (importing it costs ~0.5 s) and only FSDP2/DTensor users pay for it.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _row_sharded(t) -> bool:
    """A DTensor on a 1-D mesh sharded on dim 0: the layout FSDP2's fully_shard gives by default."""
    from torch.distributed.tensor import Shard

    return t.device_mesh.ndim == 1 and tuple(t.placements) == (Shard(0),)


def _chunk_rows(rows: int, world: int) -> list[tuple[int, int]]:
    """(offset, size) of each rank's rows under torch.chunk semantics (what Shard(0) and FSDP2 use)."""
    size = -(-rows // world) if rows else 0
    spans = []
    for r in range(world):
        start = min(r * size, rows)
        spans.append((start, min(rows, start + size) - start))
    return spans


def _mesh_group(t):
    return t.device_mesh.get_group()


# ---------------------------------------------------------------------------------- finite flags
def finite_flags(grads: Sequence[Tensor]) -> list[Tensor | None]:
    """Per gradient: a 0-dim bool tensor, True when it is finite on every rank (None: 0 elements).

    DTensor gradients are tested on their local shards (an empty shard is finite) and the flags are
    agreed with one MIN all-reduce per mesh, so all ranks take the same decision without a host sync.
    """
    flags: list[Tensor | None] = [None] * len(grads)
    locals_ = [(i, g.to_local() if is_dtensor(g) else g) for i, g in enumerate(grads) if g.numel() > 0]
    nonempty = [(i, t) for i, t in locals_ if t.numel() > 0]
    norms = torch._foreach_norm([t for _, t in nonempty], float("inf")) if nonempty else []
    for (i, _), norm in zip(nonempty, norms, strict=True):
        flags[i] = norm.isfinite()
    by_mesh: dict = {}  # DeviceMesh -> members; fully_shard builds equal meshes per module
    for i, t in locals_:
        if flags[i] is None:  # an empty local shard of a non-empty parameter
            flags[i] = torch.ones((), dtype=torch.bool, device=t.device)
        if is_dtensor(grads[i]):
            by_mesh.setdefault(grads[i].device_mesh, []).append(i)
    for mesh, members in by_mesh.items():
        agreed = torch.stack([flags[i] for i in members]).to(torch.int32)
        for group in [mesh.get_group(d) for d in range(mesh.ndim)]:
            world = dist.get_world_size(group)
            nbytes = 2 * (world - 1) / world * agreed.numel() * agreed.element_size()
            _collective(
                "all_reduce of the non-finite gradient flags",
                group,
                nbytes,
                lambda agreed=agreed, group=group: dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group),
            )
        for i, flag in zip(members, agreed.bool().unbind(), strict=True):
            flags[i] = flag
    return flags


# ------------------------------------------------------------------------------------- planning
def _assign(costs: Sequence[int], world: int, preload: Sequence[int] | None = None) -> list[int]:
    """Greedy longest-processing-time: each job, largest first, to the least loaded rank.

    Deterministic (ties: lower job index, lower rank), so every rank computes the same plan. For
    equal costs (a same-shape bucket) it deals the matrices round robin.
    """
    load = list(preload) if preload is not None else [0] * world
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += costs[j]
    return owner


def _buckets(keys: Sequence) -> dict:
    """key -> member positions, keys in first-appearance order."""
    out: dict = {}
    for j, key in enumerate(keys):
        out.setdefault(key, []).append(j)
    return out


@dataclass(frozen=True)
class _ReplicatedPlan:
    # per rank: list of (bucket key, [(entry, batch index), ...]) in bucket order
    work: tuple[tuple[tuple, tuple[tuple[int, int], ...]], ...]
    lengths: tuple[int, ...]  # elements each rank contributes to the all-gather


def _plan_replicated(entries: Sequence[tuple[tuple, int, int, int] | None], world: int, steps: int) -> _ReplicatedPlan:
    """entries[i] = (bucket key, batch, m, n) or None; every matrix of every entry gets a rank."""
    units, keys, costs = [], [], []
    for i, entry in enumerate(entries):
        if entry is None:
            continue
        key, batch, m, n = entry
        for b in range(batch):
            units.append((i, b))
            keys.append(key)
            costs.append(ns_flops(m, n, steps))
    owner = _assign(costs, world)
    work, lengths = [], []
    for r in range(world):
        mine = []
        length = 0
        for key, members in _buckets(keys).items():
            share = tuple(units[j] for j in members if owner[j] == r)
            if share:
                mine.append((key, share))
                _, _, m, n = entries[share[0][0]]
                length += len(share) * m * n
        work.append(tuple(mine))
        lengths.append(length)
    return _ReplicatedPlan(tuple(work), tuple(lengths))


@dataclass(frozen=True)
class _ShardedPlan:
    owner: tuple[int, ...]  # per row-sharded entry
    buckets: tuple[tuple[tuple, tuple[int, ...]], ...]  # (key, entry positions) in order


def _plan_sharded(
    entries: Sequence[tuple[tuple, int, int]], local_costs: Sequence[int], world: int, steps: int
) -> _ShardedPlan:
    """entries[j] = (bucket key, m, n) of a row-sharded matrix; local_costs: NS FLOPs each rank
    already does on whole matrices it holds (expert stacks sharded on the expert dim)."""
    owner = _assign([ns_flops(m, n, steps) for _, m, n in entries], world, local_costs)
    buckets = tuple((key, tuple(members)) for key, members in _buckets([e[0] for e in entries]).items())
    return _ShardedPlan(tuple(owner), buckets)


# ------------------------------------------------------------------------------ the NS hook
def splits_work(updates: list, process_group) -> bool:
    """True when the NS of these updates is split across ranks: some are DTensors, or replicated
    parameters have a process group of more than one rank."""
    if any(U is not None and is_dtensor(U) for U in updates):
        return True
    return any(U is not None for U in updates) and replicated_group(process_group) is not None


def orthogonalize_all(
    updates: list, params: list, schedule: Schedule, group: dict, flatten: bool, process_group
) -> list:
    """Muon._orthogonalize_all for distributed parameters (`splits_work`); group["ns_dtype"] is a
    resolved torch dtype.

    Returns, per update, its orthogonalized (B, m, n) stack in the group's ns_dtype (a plain tensor),
    or for DTensor updates a DTensor laid out like the parameter. None updates stay None.
    """
    sharded = [i for i, U in enumerate(updates) if U is not None and is_dtensor(U)]
    replicated = [i for i, U in enumerate(updates) if U is not None and not is_dtensor(U)]
    pg = replicated_group(process_group) if replicated else None
    from .newton_schulz import orthogonalize

    def ns(stack: Tensor) -> Tensor:
        return orthogonalize(stack, schedule, dtype=group["ns_dtype"], backend=group["backend"])

    out: list = [None] * len(updates)
    if sharded:
        _sharded_step(updates, params, sharded, out, ns, group["ns_dtype"], schedule.steps, flatten)
    if replicated:
        if pg is None:
            for i in replicated:
                out[i] = ns(updates[i].reshape(matrix_shape(params[i].shape, flatten)))
        else:
            _replicated_step(updates, params, replicated, out, ns, schedule.steps, flatten, pg, group)
    return out


_CHECKED: set = set()


def _check_same_plan(signature: tuple, pg) -> None:
    """Once per parameter signature: all ranks must split the same matrices, or the step would hang
    or mix updates; say so clearly (e.g. pipeline stages need process_group= their data-parallel group)."""
    digest = hashlib.sha1(repr(signature).encode()).hexdigest()
    key = (digest, id(pg))
    if key in _CHECKED:
        return
    world = dist.get_world_size(pg)
    seen: list = [None] * world
    try:
        dist.all_gather_object(seen, digest, group=pg)
    except RuntimeError as exc:
        raise _failed("all_gather of the parameter signature", pg, exc) from exc
    if len(set(seen)) != 1:
        raise DistributedStepError(
            f"muon distributed step: ranks of the process group hold different Muon matrices with "
            f"gradients (signatures {seen}); replicated parameters need the same parameters and "
            "gradients on every rank of `process_group` (for pipeline or tensor parallelism pass the "
            "data-parallel group as Muon(..., process_group=...))"
        )
    _CHECKED.add(key)


def _replicated_step(updates, params, indices, out, ns, steps, flatten, pg, group) -> None:
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    entries: list = [None] * len(updates)
    for i in indices:
        U = updates[i]
        batch, m, n = matrix_shape(params[i].shape, flatten)
        # device type, not index: every rank of a DDP job has its own cuda:<rank>
        entries[i] = ((m, n, U.dtype, U.device.type), batch, m, n)
    _check_same_plan(tuple(e[:3] if e else None for e in entries), pg)
    plan = _plan_replicated(entries, world, steps)
    stacks = {i: updates[i].reshape(entries[i][1:]) for i in indices}
    dtype = group["ns_dtype"]
    device = updates[indices[0]].device
    width = max(plan.lengths)  # all-gather chunks must have equal sizes: pad to the busiest rank
    send = torch.zeros(width, dtype=dtype, device=device)
    offset = 0
    for _, share in plan.work[rank]:
        result = ns(torch.stack([stacks[i][b] for i, b in share]))
        send[offset : offset + result.numel()].copy_(result.reshape(-1))
        offset += result.numel()
    gathered = torch.empty(world * width, dtype=dtype, device=device)
    nbytes = (world - 1) * width * send.element_size()
    _collective(
        "all_gather of the orthogonalized updates",
        pg,
        nbytes,
        lambda: _all_gather_single(gathered, send, group=pg),
    )
    pieces: dict[int, list] = {i: [None] * entries[i][1] for i in indices}
    for r in range(world):
        offset = r * width
        for (m, n, _, _), share in plan.work[r]:
            block = gathered[offset : offset + len(share) * m * n].view(len(share), m, n)
            offset += len(share) * m * n
            for (i, b), piece in zip(share, block.unbind(), strict=True):
                pieces[i][b] = piece
    for i in indices:
        out[i] = torch.stack(pieces[i])


def _sharded_step(updates, params, indices, out, ns, ns_dtype, steps, flatten) -> None:
    from torch.distributed.tensor import DTensor, Replicate

    rows_sharded, local, generic = [], [], []
    for i in indices:
        U = updates[i]
        batch, m, n = matrix_shape(params[i].shape, flatten)
        if not _row_sharded(U):
            generic.append(i)
        elif params[i].ndim > 2 and not flatten:
            local.append(i)  # Shard(0) splits the stack of matrices: whole matrices on each rank
        else:
            rows_sharded.append(i)
    meshes: dict = {}  # DeviceMesh -> members: one plan for all modules fully_shard put on equal meshes
    for i in sorted(rows_sharded + local):
        meshes.setdefault(updates[i].device_mesh, []).append(i)
    for members in meshes.values():
        _row_sharded_step(updates, params, members, out, ns, ns_dtype, steps, flatten)
    for i in generic:
        U = updates[i]
        full = ns(U.full_tensor().reshape(matrix_shape(params[i].shape, flatten)))
        mesh = U.device_mesh
        replicated = DTensor.from_local(full.reshape(U.shape), mesh, [Replicate()] * mesh.ndim, run_check=False)
        out[i] = replicated.redistribute(mesh, U.placements)


def _as_dtensor(local: Tensor, like) -> Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def _row_sharded_step(updates, params, members, out, ns, ns_dtype, steps, flatten) -> None:
    """Owner-based NS for Shard(0) DTensors of one 1-D mesh (see the module docstring)."""
    pg = _mesh_group(updates[members[0]])
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    entries, positions, local_costs = [], [], [0] * world
    for i in members:
        batch, m, n = matrix_shape(params[i].shape, flatten)
        if params[i].ndim > 2 and not flatten:
            for r, (_, count) in enumerate(_chunk_rows(params[i].shape[0], world)):
                local_costs[r] += count * (batch // params[i].shape[0]) * ns_flops(m, n, steps)
        else:
            entries.append(((m, n, updates[i].dtype), m, n))
            positions.append(i)
    signature = tuple(e[0] for e in entries) + tuple(tuple(params[i].shape) for i in members)
    _check_same_plan(signature, pg)
    plan = _plan_sharded(entries, local_costs, world, steps)

    # 1. issue every bucket's gather before the first NS: communication overlaps earlier NS work
    gathers = []
    for (m, n, _), bucket in plan.buckets:
        spans = _chunk_rows(m, world)
        rows_me = spans[rank][1]
        owned = [j for j in bucket if plan.owner[j] == rank]
        to = [[j for j in bucket if plan.owner[j] == r] for r in range(world)]
        pieces = []
        for r in range(world):
            for j in to[r]:
                local = updates[positions[j]].to_local()
                if local.shape[0] != rows_me:
                    raise NotImplementedError(
                        f"a Shard(0) DTensor of shape {tuple(params[positions[j]].shape)} holds {local.shape[0]} "
                        f"rows on rank {rank}, not torch.chunk's {rows_me}: unsupported uneven sharding"
                    )
                pieces.append(local.reshape(rows_me, n))
        send = torch.cat(pieces) if pieces else updates[positions[bucket[0]]].to_local().new_empty(0)
        send = send.reshape(-1).contiguous()
        send_splits = [len(to[r]) * rows_me * n for r in range(world)]
        recv_splits = [len(owned) * spans[s][1] * n for s in range(world)]
        recv, work = _all_to_all_async(
            "all_to_all gathering full matrices on their owner ranks", pg, rank, send, send_splits, recv_splits
        )
        gathers.append((work, recv, recv_splits, owned, to, spans, n))

    # 2. per bucket: wait for its gather, orthogonalize the owned matrices, scatter the rows back
    scatters = []
    for work, recv, recv_splits, owned, to, spans, n in gathers:
        work.wait()
        blocks, offset = [], 0
        for s in range(world):
            blocks.append(recv[offset : offset + recv_splits[s]].view(len(owned), spans[s][1], n))
            offset += recv_splits[s]
        if owned:
            result = ns(torch.cat(blocks, dim=1))  # (owned, m, n) in ns_dtype
            send = torch.cat([result[:, start : start + size].reshape(-1) for start, size in spans])
        else:
            send = torch.empty(0, dtype=ns_dtype, device=recv.device)
        rows_me = spans[rank][1]
        send_splits = [len(owned) * spans[r][1] * n for r in range(world)]
        back_splits = [len(to[s]) * rows_me * n for s in range(world)]
        back, work = _all_to_all_async(
            "all_to_all scattering orthogonalized rows back to their shards", pg, rank, send, send_splits, back_splits
        )
        scatters.append((work, back, back_splits, to, rows_me, n))

    # expert stacks sharded on the stack dim: whole matrices locally, no communication
    for i in members:
        if params[i].ndim > 2 and not flatten:
            U = updates[i]
            batch, m, n = matrix_shape(params[i].shape, flatten)
            local = U.to_local()
            result = ns(local.reshape(-1, m, n))
            out[i] = _as_dtensor(result.reshape(local.shape), U)

    # 3. unpack the scattered rows into DTensors laid out like the parameters
    for work, back, back_splits, to, rows_me, n in scatters:
        work.wait()
        offset = 0
        for s in range(world):
            block = back[offset : offset + back_splits[s]].view(len(to[s]), rows_me, n)
            offset += back_splits[s]
            for j, rows in zip(to[s], block.unbind(), strict=True):
                i = positions[j]
                U = updates[i]
                out[i] = _as_dtensor(rows.view(U.to_local().shape), U)


# ----------------------------------------------------------------------------- communication model
@dataclass(frozen=True)
class CommBytes:
    """Bytes sent per step by the busiest rank, Muon against distributed AdamW on the same parameters.

    gradient_sync: the data-parallel traffic both share (DDP: gradient all-reduce; FSDP2: parameter
    all-gathers in forward and backward plus the gradient reduce-scatter). muon_optimizer: what
    Muon's step adds (NS gather/scatter, non-finite flag all-reduces); AdamW's step adds nothing.
    """

    world_size: int
    sharding: str
    gradient_sync: int
    muon_optimizer_per_rank: tuple[int, ...]
    adamw_optimizer: int = 0

    @property
    def muon_optimizer(self) -> int:
        return max(self.muon_optimizer_per_rank)

    @property
    def muon_total(self) -> int:
        return self.gradient_sync + self.muon_optimizer

    @property
    def adamw_total(self) -> int:
        return self.gradient_sync + self.adamw_optimizer

    @property
    def ratio(self) -> float:
        """Muon's bytes per step over distributed AdamW's (Moonlight reports 1–1.25)."""
        return self.muon_total / self.adamw_total if self.adamw_total else math.inf


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def comm_bytes_per_step(
    muon_shapes: Iterable[Sequence[int]],
    adamw_shapes: Iterable[Sequence[int]] = (),
    *,
    world_size: int,
    sharding: str = "replicated",
    param_dtype: torch.dtype = torch.float32,
    grad_dtype: torch.dtype | None = None,
    ns_dtype: torch.dtype = torch.bfloat16,
    ns_steps: int = 5,
    flatten: bool = False,
    reshard_after_forward: bool = True,
) -> CommBytes:
    """Bytes per step of distributed Muon vs distributed AdamW, for the busiest rank.

    muon_shapes: shapes of the parameters in one Muon group (as in `Muon` with its defaults);
    adamw_shapes: those of one AdamW group. sharding: "replicated" (DDP) or "fsdp" (FSDP2
    fully_shard, Shard(0) on a 1-D mesh). Computed from the plan the optimizer executes, with the
    collective cost model of `count_comm_bytes` (ring all-gather/all-reduce/reduce-scatter).
    """

    if sharding not in ("replicated", "fsdp"):
        raise ValueError(f"sharding must be 'replicated' or 'fsdp', got {sharding!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    W = world_size
    muon_shapes = [tuple(s) for s in muon_shapes]
    adamw_shapes = [tuple(s) for s in adamw_shapes]
    grad_dtype = param_dtype if grad_dtype is None else grad_dtype
    pb, gb, nb = _dtype_bytes(param_dtype), _dtype_bytes(grad_dtype), _dtype_bytes(ns_dtype)
    total = sum(math.prod(s) for s in muon_shapes + adamw_shapes)
    if W == 1:
        return CommBytes(W, sharding, 0, (0,))

    if sharding == "replicated":
        grad_sync = 2 * (W - 1) / W * total * gb
        entries = []
        for shape in muon_shapes:
            batch, m, n = matrix_shape(torch.Size(shape), flatten)
            entries.append(((m, n), batch, m, n))
        plan = _plan_replicated(entries, W, ns_steps)
        muon = (W - 1) * max(plan.lengths) * nb if entries else 0
        return CommBytes(W, sharding, int(grad_sync), (int(muon),) * W)

    gathers = 2 if reshard_after_forward else 1
    grad_sync = (W - 1) / W * total * (gathers * pb + gb)
    sent = [0.0] * W
    entries, local_costs = [], [0] * W
    for shape in muon_shapes:
        batch, m, n = matrix_shape(torch.Size(shape), flatten)
        if len(shape) > 2 and not flatten:
            for r, (_, count) in enumerate(_chunk_rows(shape[0], W)):
                local_costs[r] += count * (batch // shape[0]) * ns_flops(m, n, ns_steps)
        else:
            entries.append(((m, n), m, n))
    plan = _plan_sharded(entries, local_costs, W, ns_steps)
    for _, bucket in plan.buckets:
        _, m, n = entries[bucket[0]]
        spans = _chunk_rows(m, W)
        for j in bucket:
            owner = plan.owner[j]
            for r in range(W):
                if r != owner:
                    sent[r] += spans[r][1] * n * gb  # gather: my rows of j to its owner
                    sent[owner] += spans[r][1] * n * nb  # scatter: the owner returns r's rows
    # one all-reduce of int32 non-finite flags per group (as counted: rounded per collective)
    flags = sum(int(2 * (W - 1) / W * len(shapes) * 4) for shapes in (muon_shapes, adamw_shapes) if shapes)
    return CommBytes(W, sharding, int(grad_sync), tuple(int(b) + flags for b in sent))


# --------------------------------------------------------------------------------- checkpointing
def encode_state_dict_dtypes(optimizer, state_dict: dict) -> dict:
    """Optimizer.state_dict post-hook: torch.dtype group values (ns_dtype) as strings.

    torch.distributed.checkpoint's full-state-dict gather (get_optimizer_state_dict with
    full_state_dict=True) accepts only tensors, numbers, strings, lists and dicts.
    """
    for group in state_dict["param_groups"]:
        for key, value in group.items():
            if isinstance(value, torch.dtype):
                group[key] = str(value)
    return state_dict


def decode_state_dict_dtypes(optimizer, state_dict: dict) -> dict:
    """Optimizer.load_state_dict pre-hook: the inverse of `encode_state_dict_dtypes`."""
    groups = []
    for group in state_dict["param_groups"]:
        group = dict(group)
        value = group.get("ns_dtype")
        if isinstance(value, str) and value.startswith("torch."):
            dtype = getattr(torch, value[len("torch.") :], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"state_dict param_groups has ns_dtype={value!r}, not a torch dtype")
            group["ns_dtype"] = dtype
        groups.append(group)
    return {**state_dict, "param_groups": groups}
