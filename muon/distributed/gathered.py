"""DTensor parameters of any layout under `foreach=False`: the engine's plan over the local shards,
with an NS phase that gathers every full matrix on every rank.

`Muon(..., foreach=False)` asks for it where the owner plan (`muon.distributed.sharded`) refuses a
layout: parameters on several device meshes, shards that are not one rectangular block of the
matrix (conv weights sharded inside their flattened columns, expert stacks sharded on a matrix dim).
It is correct for every layout DTensor can gather, at the price the loop it replaces paid: every
full matrix of a Muon group is held on every rank during its NS, and the NS work is not split.

* The plan (`plan_muon_group`): one bucket per parameter over its local shard, seen as the
  shard's own (count, s, l) matrices (`matrix_shape` of the local shape). Momentum, scaling, weight
  decay and the commit are elementwise, so they run on the shard where it lies; the update scale
  is the full matrix's. AdamW groups are the engine's, over local shards.
* The NS phase (`gathered_ns`), per Muon group, in parameter order (the same on every rank): each
  parameter's NS input gathered in full (`DTensor.full_tensor`; a plain tensor is already whole),
  every same-shape matrix of the group orthogonalized in one batched call (one call per parameter
  where the group is not batched), tall matrices as their contiguous transposes as one process
  stacks them, and every rank keeps its shard of each result (`redistribute` from Replicate: a
  local slice, no communication).
* The agreement (`agree_gathered`): the plan digest and every gradient's finite flag MIN-reduced
  over every mesh dim's group in turn (one small all-reduce each, one host sync), judged only then;
  a rank whose shards are not what their placements say refuses in it, so every rank raises and
  nothing is written. Plain tensors' flags are agreed too: a NaN on one rank skips the parameter
  on every rank. The verdict is global where the meshes cover the same ranks (one job's meshes over
  its ranks); ranks of a mesh that shares none with the others see only their own meshes.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._shapes import matrix_shape, update_scale
from ..coefficients import resolve_schedule
from ..engine import Plan
from ..engine.plan import Member, Planner, chunk_bounds, link_empty_muon, local, muon_bucket
from ..newton_schulz import resolve_dtype
from .agreement import agree
from .collectives import is_dtensor
from .exchange import Exchange
from .layout import _indices, check_gradient_layout
from .ownership import digest, plan_signature
from .sharded import _Orthogonalize, check_options


def plan_muon_group(planner: Planner, gplan, group: dict, with_grad, flag_pos) -> None:
    """`muon.engine.plan.plan_muon_group` under foreach=False with DTensors (module docstring): one
    bucket per parameter, over its local shard."""
    flatten = group["flatten"]
    schedule = resolve_schedule(group["ns_coefficients"], group["ns_steps"], group["eps"])
    run = _Orthogonalize(group["backend"])
    for i, p in with_grad:
        if p.numel() == 0:  # nothing to orthogonalize; state as one process keeps it
            link_empty_muon(planner, gplan, i, p)
            continue
        check_gradient_layout(p, f"param_groups[{gplan.index}]['params'][{i}]")
        shard = local(p)
        count, s, l = matrix_shape(shard.shape, flatten)
        _, m, n = matrix_shape(p.shape, flatten)
        member = Member(i, p, 0, count, False)
        bucket = muon_bucket(planner, gplan.index, group, [(member, update_scale(group["adjust_lr_fn"], m, n))],
                             (s, l), p.dtype, p.grad.dtype, shard.device, flag_pos, schedule, run,
                             resolve_dtype(group["ns_dtype"], shard.device), sharded=True)  # fmt: skip
        gplan.buckets.append(bucket)


def _refusal(param_groups: list[dict]) -> str | None:
    """Why this rank cannot gather (a shard of another size than its placements give: DTensor's
    gathers assume torch.chunk's sizes), or None. Known on this rank only: the agreement carries it."""
    for gi, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            if p.grad is None or not is_dtensor(p) or p.numel() == 0:
                continue
            mesh = p.device_mesh
            coord = mesh.get_coordinate()
            where = f"param_groups[{gi}]['params'][{i}]"
            expected = tuple(len(ix) for ix in _indices(tuple(p.shape), tuple(mesh.mesh.shape), coord,
                                                        p.placements, where))  # fmt: skip
            for t, what in ((p, "parameter"), (p.grad, "gradient")):
                if tuple(t.to_local().shape) != expected:
                    return (
                        f"{where}: this rank's {what} shard has shape {tuple(t.to_local().shape)}, but placements "
                        f"{tuple(p.placements)} of shape {tuple(p.shape)} give {expected} (torch.chunk's sizes): "
                        "shards of other sizes cannot be gathered"
                    )
    return None


def prepare(plan: Plan, param_groups: list[dict]) -> None:
    """Attach the gathered NS phase and its agreement to a plan of DTensor groups under foreach=False."""
    signature = plan_signature(param_groups)
    device = local(plan.flag_params[0]).device if plan.flag_params else None
    # every mesh dim's group of the groups' DTensor parameters, with or without a gradient (a rank
    # without one must still take part in the agreement), in parameter order: the same on every rank
    meshes: dict = {}
    for group in param_groups:
        for p in group["params"]:
            if is_dtensor(p):
                meshes.setdefault(p.device_mesh, None)
    groups = [mesh.get_group(d) for mesh in meshes for d in range(mesh.ndim)]
    ex = Exchange(None, 1, 0, signature, digest(signature), device, sharded=True, ns_phase=gathered_ns,
                  agree=functools.partial(agree_gathered, groups, _refusal(param_groups)))  # fmt: skip
    for gplan in plan.groups:
        if gplan.use_muon:
            group = param_groups[gplan.index]
            ex.groups[gplan.index] = (group["flatten"], group["batched"])
    plan.dist = ex


def agree_gathered(groups: list, refusal: str | None, plan: Plan, ok: Tensor | None) -> Tensor | None:
    """The plan digest and every gradient's flag (plain tensors' too: a NaN on one rank skips the
    parameter on all, and nonfinite="raise" raises on all) MIN-reduced over every mesh dim's group
    before any verdict (`agreement.agree`), so every rank that takes part raises alike."""
    ex: Exchange = plan.dist
    return agree(groups, ex.digest, ex.signature, ok, ex.device, refusal=refusal)


def _gather(U: Tensor, p: Tensor) -> Tensor:
    """The full tensor of p's shape whose local shard (this rank's) is U."""
    if not is_dtensor(p):
        return U
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(U, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride()).full_tensor()  # fmt: skip


def _shard(O: Tensor, p: Tensor) -> Tensor:
    """This rank's shard of a full tensor of p's shape, laid out as p is (a local slice)."""
    if not is_dtensor(p):
        return O
    from torch.distributed.tensor import DTensor, Replicate

    mesh = p.device_mesh
    full = DTensor.from_local(O, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return full.redistribute(mesh, p.placements).to_local()


def _own(t: Tensor) -> Tensor:
    """t, or a copy where t is a view into a larger tensor (a shard of a chunk's full results: the
    rest is freed)."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def gathered_ns(plan: Plan, gplan, phases: list) -> list[Tensor]:
    """The NS phase of a gathered plan (`muon.engine.step`, module docstring): per bucket, its
    result (the local shard's matrices, (count, s, l) in the NS dtype). Same-shape matrices are
    gathered and orthogonalized a chunk at a time (at least two matrices per NS call, as one process
    chunks them: the same bits), each NS input freed once gathered, so the phase holds one chunk's
    full matrices and workspace besides the local results."""
    flatten, batched = plan.dist.groups[gplan.index]
    shapes, batches = [], {}  # per bucket its parameter's (count, m, n); shape key -> bucket positions
    for k, (b, ph) in enumerate(zip(gplan.buckets, phases, strict=True)):
        count, m, n = matrix_shape(b.members[0].param.shape, flatten)
        shapes.append((count, m, n))
        key = (min(m, n), max(m, n), ph.U.dtype, b.ns_dtype)
        batches.setdefault(key if batched else (k,), []).append(k)
    results: list = [None] * len(phases)
    for positions in batches.values():
        sizes = [shapes[k][0] * shapes[k][1] * shapes[k][2] for k in positions]
        for first, last in chunk_bounds(sizes, 1, [shapes[k][0] for k in positions]):
            part = positions[first:last]
            fulls = []
            for k in part:
                p, (count, m, n) = gplan.buckets[k].members[0].param, shapes[k]
                X = _gather(phases[k].U.view(local(p).shape), p).reshape(count, m, n)
                phases[k].U = None  # the commit does not read it
                fulls.append(X.mT.contiguous() if m > n else X)  # tall: transposes, as one process stacks them
            stack = torch.cat(fulls) if len(fulls) > 1 else fulls[0]
            del fulls, X
            b = gplan.buckets[part[0]]
            out = b.run(stack, b.schedule, b.ns_dtype)
            del stack
            for k, O in zip(part, out.split([shapes[k][0] for k in part]), strict=True):
                p, (_, m, n) = gplan.buckets[k].members[0].param, shapes[k]
                O = O.mT if m > n else O
                results[k] = _own(_shard(O.reshape(p.shape), p).reshape(gplan.buckets[k].shape))
            del out, O
    return results


__all__ = ["agree_gathered", "check_options", "gathered_ns", "plan_muon_group", "prepare"]
