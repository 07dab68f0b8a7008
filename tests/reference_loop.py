"""The per-parameter reference step of `muon.Muon`, the tests' oracle (`helpers.ReferenceMuon`):
readable, one parameter at a time, and bit for bit what the step engine (`muon.engine`) computes in
one process, on every option. Both take every formula from `muon.functional`; the loop differs only
in how it walks the parameters (no stacking, no plan: it reads and writes `opt.state` directly).
It is not a path of the library: the distributed steps are checked against one process replaying
the same gradients.

Like the engine it computes everything first and commits after, so a step that raises changes
nothing, and a refused first step creates no state.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from muon import distributed
from muon import functional as F
from muon._shapes import block_layout, matrix_shape, row_blocks, update_scale
from muon.coefficients import Schedule, resolve_schedule
from muon.newton_schulz import orthogonalize, resolve_dtype
from muon.options import params_with_grad, raise_nonfinite


class _Pending:
    """What a reference step writes at its commit: new state entries and in-place updates."""

    def __init__(self, state) -> None:
        self.state, self.installs, self.commits = state, [], []

    def get(self, p: Tensor, key: str, where: str, flatten: bool = False, transposed: bool = False,
            low: torch.dtype | None = None):
        """state[p][key], or a fresh entry (`muon.functional.zero_state`) installed at the commit;
        a state the step would have to cast is refused (`muon.functional.check_state`); low: the
        group's state_dtype."""
        value = (self.state.get(p) or {}).get(key)
        F.check_state(key, p, value, where, low)
        if value is None:
            value = F.zero_state(key, p, flatten, transposed, low)
            self.installs.append((p, key, value))
        return value

    def commit(self) -> None:
        for p, key, value in self.installs:
            self.state[p][key] = value
        for commit in self.commits:
            commit()


def reference_step(param_groups: list[dict], state, nonfinite: str, process_group) -> None:
    """One step of every group, the per-parameter way: every group's finite flags first, then the
    updates computed, then committed. One process only."""
    if distributed.replicated_group(process_group) is not None or any(
        distributed.is_dtensor(p) for g in param_groups for p in g["params"]
    ):
        raise NotImplementedError("the reference loop is the one-process oracle: no process group, no DTensors")
    work = []
    for index, group in enumerate(param_groups):
        params, grads = params_with_grad(group, index)
        if params:
            work.append((group, index, params, grads))
    flags = [_finite_flags(grads) for _, _, _, grads in work]
    if nonfinite == "raise":
        for (group, index, params, _), finite in zip(work, flags, strict=True):
            for p, flag in zip(params, finite, strict=True):
                if flag is not None and not bool(flag):
                    raise_nonfinite(param_groups, index, next(j for j, q in enumerate(group["params"]) if q is p))
    pending = _Pending(state)
    for (group, index, params, grads), finite in zip(work, flags, strict=True):
        if group["use_muon"]:
            _muon_group(pending, group, index, params, grads, finite)
        else:
            _adamw_group(pending, group, index, params, grads, finite, fused=nonfinite == "raise")
    pending.commit()


def _finite_flags(grads) -> list[Tensor | None]:
    """Per parameter: a 0-dim bool device tensor, True when its gradient is finite (None: empty)."""
    nonempty = [g for g in grads if g.numel() > 0]
    norms = iter(torch._foreach_norm(nonempty, float("inf")) if nonempty else ())
    return [next(norms).isfinite() if g.numel() > 0 else None for g in grads]


def _work_copy(p: Tensor) -> list[Tensor] | None:
    """An fp32 copy of a bf16/fp16 parameter (the update runs in opmath); None for fp32/fp64."""
    return None if p.dtype in (torch.float32, torch.float64) else [p.float()]


def _places(group: dict, index: int) -> dict[int, str]:
    """"param_groups[index]['params'][j]" of each parameter of the group, by id (for messages)."""
    return {id(p): f"param_groups[{index}]['params'][{j}]" for j, p in enumerate(group["params"])}


def _muon_group(pending: _Pending, group, index, params, grads, finite) -> None:
    lr = group["lr"] if isinstance(group["lr"], Tensor) else float(group["lr"])
    momentum, wd, flatten = group["momentum"], group["weight_decay"], group["flatten"]
    transposed = group.get("transposed", False)
    normuon, cautious = group["variant"] == "normuon", group.get("cautious_weight_decay", False)
    schedule = resolve_schedule(group["ns_coefficients"], group["ns_steps"], group["eps"])

    low = group.get("state_dtype")
    updates, phases, places = [], [], _places(group, index)
    for p, g, ok in zip(params, grads, finite):
        where = places[id(p)]
        buf = pending.get(p, "momentum_buffer", where, low=low)
        scale = pending.get(p, "momentum_scale", where, low=low) if low == torch.int8 else None
        skips = pending.get(p, "nonfinite_skips", where)  # absent from a torch.optim.Muon state dict
        v = pending.get(p, "normuon_v", where, flatten, transposed) if normuon else None  # per neuron (matrix row)
        if ok is None:  # 0-size parameter: nothing to do
            updates.append(None)
            phases.append(None)
            continue
        g = torch.where(ok, g, 0)  # a placeholder where not finite; its lerp weight is 0 below
        # a bf16/int8 state (state_dtype) is read in opmath and stored back at the commit
        value = buf
        if low is not None:
            value = F.read_momentum(buf, scale, F.opmath(p.dtype))
        weight = F.masked(ok, 1.0 - momentum, 0.0, value.dtype, ok.device)
        nxt, U = F.muon_momentum(value, g, weight, momentum, group["nesterov"])
        if low is not None:
            q, new_scale = F.store_momentum(nxt, low, ok, None if scale is None else (buf, scale))
            nxt = (q, scale, new_scale)
        updates.append(U)
        phases.append((buf, nxt, skips, ~ok, v))

    ortho = _orthogonalize_all(updates, params, schedule, group, flatten)

    for p, blocks, ok, phase in zip(params, ortho, finite, phases):
        if blocks is None:
            continue
        # everything below is on the m×n matrices; a transposed parameter gets their transposes
        count, m, n = matrix_shape(p.shape, flatten, transposed)
        dtype = F.opmath(p.dtype)
        # -lr·s·O rounded once to opmath, then added (not a fused addcmul): what the step engine
        # computes on a bucket's stack before one multi-tensor add into the parameters. A row
        # block (split/heads) is scaled by s(rows, n) of its own shape.
        moments = None
        if normuon:  # one block: split/heads groups refuse NorMuon at construction
            neg_lr_scale = F.masked(ok, -lr * update_scale(group["adjust_lr_fn"], m, n), 0.0, dtype, p.device)
            v = phase[4]
            X = blocks[0][0].to(dtype).reshape(count, m, n)
            (moments, _) = F.normuon_update(X, neg_lr_scale, group["normuon_beta2"], group["normuon_eps"],
                                            v.view(count, m), ok_mat=ok)  # fmt: skip
            moments = (v, moments.view(v.shape))
            update = _as_stored(X, p.shape, transposed)
        else:
            if len(blocks) == 1:  # the whole parameter, or its equal blocks stacked
                blocks = [(blocks[0][0].view(count, m, n), blocks[0][1])]
            scaled = [
                torch.mul(O.to(dtype),
                          F.masked(ok, -lr * update_scale(group["adjust_lr_fn"], rows, n), 0.0, dtype, p.device))
                for O, rows in blocks
            ]
            # several blocks: one (count, rows, n) piece each, back into the matrices' rows
            update = _as_stored(scaled[0] if len(scaled) == 1 else torch.cat(scaled, dim=-2), p.shape, transposed)
        work = _work_copy(p)
        target = [p] if work is None else work
        # update = -lr·s·u: no decay where update·W > 0
        decay = F.decay_factors(ok, lr, wd, cautious, target, [update], 1, dtype, p.device)
        buf, nxt, skips, skipped, _ = phase

        def commit(p=p, work=work, decay=decay, update=update, buf=buf, nxt=nxt, skips=skips, skipped=skipped,
                   moments=moments) -> None:
            if isinstance(nxt, tuple):  # stored form (state_dtype): momentum and int8 scales
                buf.copy_(nxt[0])
                if nxt[1] is not None:
                    nxt[1].copy_(nxt[2])
            else:
                buf.copy_(nxt)
            skips.add_(skipped)
            if moments is not None:
                moments[0].copy_(moments[1])
            F.commit_update([p], work, decay, [update])

        pending.commits.append(commit)


def _orthogonalize_all(updates, params, schedule: Schedule, group, flatten) -> list:
    """NS of every update, per parameter a list of (O, rows): one (matrices, rows, n) result per
    block of `muon._shapes.block_layout` (the whole parameter without split/heads), in the
    parameter's row order. Same-shape blocks are stacked into one batched call when batched."""
    backend = group["backend"]
    device = next((U.device for U in updates if U is not None), None)
    if device is None:
        return [None] * len(updates)
    # NS runs on the small side: tall (m > n) matrices are orthogonalized as their (contiguous)
    # transposes, so (m, n) and (n, m) matrices share one batched call; the step engine stores
    # them the same way, and both paths round alike. Blocks are laid out as the engine's stacks.
    buckets: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    pieces: dict[tuple[int, int], Tensor] = {}
    block_rows: dict[tuple[int, int], int] = {}
    tall: set[tuple[int, int]] = set()
    transposed = group.get("transposed", False)
    for i, (U, p) in enumerate(zip(updates, params)):
        if U is None:
            continue
        count, m, n = matrix_shape(p.shape, flatten, transposed)
        # the m×n matrices: a transposed parameter's (in, out) matrices read through .mT
        U = U.reshape(count, n, m).mT if transposed else U.reshape(count, m, n)
        for j, (row, rows, matrices) in enumerate(
            block_layout(count, m, n, row_blocks(m, group["split"], group["heads"]))
        ):
            piece = U.reshape(matrices, rows, n) if row is None else U[:, row : row + rows]
            pieces[i, j] = piece.mT.contiguous() if rows > n else piece.contiguous()
            block_rows[i, j] = rows
            if rows > n:
                tall.add((i, j))
            key = (min(rows, n), max(rows, n), U.device, U.dtype)
            buckets[key if group["batched"] else key + (i,)].append((i, j))
    results: dict[tuple[int, int], Tensor] = {}
    for members in buckets.values():
        stack = [pieces[ij] for ij in members]
        stack = torch.cat(stack) if len(stack) > 1 else stack[0]
        # "auto" per bucket shape, as the step engine's plan resolves it (muon.newton_schulz.resolve_dtype)
        bucket_dtype = resolve_dtype(group["ns_dtype"], device, stack.shape[-2:])
        result = orthogonalize(stack, schedule, dtype=bucket_dtype, backend=backend, algorithm=group["ns_algorithm"])
        for ij, piece in zip(members, result.split([len(pieces[ij]) for ij in members])):
            results[ij] = piece.mT if ij in tall else piece
    out: list = [None] * len(updates)
    for (i, j), O in sorted(results.items()):
        out[i] = (out[i] or []) + [(O, block_rows[i, j])]
    return out


def _as_stored(X: Tensor, shape: torch.Size, transposed: bool) -> Tensor:
    """(count, m, n) matrices as the parameter of `shape` holds them: their transposes when it stores
    (in, out) matrices (a copy only where the layout needs one; values are not changed)."""
    return X.mT.reshape(shape) if transposed else X.view(shape)


def _adamw_group(pending: _Pending, group, index, params, grads, finite, fused: bool) -> None:
    """torch.optim.AdamW's update, per parameter, with the engine's formula (`muon.functional`)."""
    lr = group["lr"] if isinstance(group["lr"], Tensor) else float(group["lr"])
    beta1, beta2 = group["betas"]
    wd, eps = group["weight_decay"], group["eps"]
    cautious = group.get("cautious_weight_decay", False) and wd != 0
    places = _places(group, index)
    low = group.get("state_dtype")
    for p, g, ok in zip(params, grads, finite):
        step, ea, eas, skips = (
            pending.get(p, key, places[id(p)], low=low) for key in ("step", "exp_avg", "exp_avg_sq", "nonfinite_skips")
        )
        if ok is None:
            continue
        if step.device != p.device:  # a state loaded from torch.optim.AdamW keeps step on the CPU
            step = step.to(p.device)
            pending.installs.append((p, "step", step))
        steps = step.view(1)
        if fused and p.dtype == g.dtype == ea.dtype == eas.dtype and p.device.type in ("cpu", "cuda") and not cautious:
            # every gradient is known finite (nonfinite="raise"): the engine's fused kernel
            def commit_fused(p=p, g=g, ea=ea, eas=eas, steps=steps) -> None:
                steps.add_(1)
                torch._fused_adamw_(
                    [p], [g], [ea], [eas], [], [steps.view(())],
                    lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
                )  # fmt: skip

            pending.commits.append(commit_fused)
            continue
        dtype = F.opmath(p.dtype)
        g = torch.where(ok, g, 0)
        new_steps, step_size, bc2_sqrt = F.adamw_scalars(steps.view(()), ok, beta1, beta2, lr, dtype)
        # bf16 moments of state_dtype: read in opmath, their next values stored back at the commit
        mdtype = dtype if low is not None else ea.dtype
        w1 = F.masked(ok, 1 - beta1, 0.0, mdtype, p.device)
        w2 = F.masked(ok, beta2, 1.0, mdtype, p.device)
        update = torch.empty_like(ea, dtype=mdtype)
        nxt = F.adamw_direction([ea], [eas], [g], [w1], [w2], [bc2_sqrt], beta2, eps, [update], low=low is not None)
        work = _work_copy(p)
        target = [p] if work is None else work
        decay = F.decay_factors(ok, lr, wd, cautious, target, [update], -1, dtype, p.device)

        def commit(p=p, ea=ea, eas=eas, g=g, w1=w1, w2=w2, steps=steps, skips=skips, new_steps=new_steps, work=work,
                   decay=decay, update=update, step_size=step_size, skipped=~ok, nxt=nxt) -> None:
            if nxt is not None:
                ea.copy_(nxt[0][0])
                eas.copy_(nxt[1][0])
            else:
                F.adamw_advance([ea], [eas], [g], [w1], [w2], beta2)
            steps.copy_(new_steps)
            skips.add_(skipped)
            F.commit_update([p], work, decay, [update], step_size)

        pending.commits.append(commit)


__all__ = ["reference_step"]
