"""Validation of `muon.Muon`'s options and groups: every check runs when a group is added (or a
state dict is loaded), so a bad option is a ValueError naming the group and key before anything
changes, and a step never fails half-applied on a bad setting."""

from __future__ import annotations

import difflib
import math
import numbers

import torch
from torch import Tensor

from . import distributed
from ._shapes import ADJUST_LR_FNS, block_layout, matrix_shape, row_blocks, stored_matrix_shape, update_scale
from .backends import BACKENDS, BackendUnavailable, plan_kernel
from .backends.dispatch import ALGORITHMS
from .coefficients import resolve_schedule
from .newton_schulz import COMPUTE_DTYPES, resolve_dtype

NONFINITE_POLICIES = ("skip", "raise")
VARIANTS = ("muon", "normuon")
# Keys a group may carry beyond its kind's options: names for logging, torch's param_names, and
# what learning-rate schedulers write into groups (initial_lr, OneCycleLR's and CyclicLR's bounds,
# SWALR's swa_lr), and the muP role and scale `muon.mup.param_groups` records.
METADATA_KEYS = frozenset({
    "params", "use_muon", "name", "param_names", "initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum",
    "max_momentum", "swa_lr", "mup_role", "mup_lr_scale",
})  # fmt: skip
# AdamW groups read `momentum` as beta1 when a scheduler that cycles momentum wrote it
# (OneCycleLR / CyclicLR with cycle_momentum=True set `momentum` on every group of an optimizer
# whose defaults have no `betas`): their beta1 then cycles as it would on torch.optim.AdamW.
SCHEDULED_BETA1 = "momentum"


class BackendError(ValueError, BackendUnavailable):
    """A group's backend is unknown or cannot run on its parameters: a ValueError of the group's
    options, raised when the group is added (still a BackendUnavailable for code that catches that)."""


def check_options(nonfinite, foreach, atomic=True, chunk_bytes=None) -> None:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(
            f"foreach must be None (the planned step), True (the same) or False (the planned step in its "
            f"smallest chunks), got {foreach!r}"
        )
    if not isinstance(atomic, bool):
        raise ValueError(f"atomic must be True (a step that raises changes nothing) or False, got {atomic!r}")
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                    or chunk_bytes < 1):
        raise ValueError(
            f"chunk_bytes must be None (the device's default) or a positive int (bytes of stacked gradient per "
            f"chunk), got {chunk_bytes!r}"
        )


def check_process_group(process_group) -> None:
    """process_group is None (the default group once torch.distributed is initialized) or a
    torch.distributed.ProcessGroup: anything else is refused here, not at the first step."""
    if process_group is None:
        return
    dist = getattr(torch, "distributed", None)
    available = dist is not None and dist.is_available()
    group_type = getattr(dist, "ProcessGroup", None) if available else None
    if group_type is not None and isinstance(process_group, group_type):
        return
    accepted = (
        "None (the default group, once torch.distributed is initialized) or a torch.distributed.ProcessGroup "
        "(e.g. from torch.distributed.new_group)"
        if available else "None: this build of torch has no torch.distributed"
    )
    hint = ""
    if available and process_group == getattr(dist.GroupMember, "NON_GROUP_MEMBER", object()):
        hint = "; GroupMember.NON_GROUP_MEMBER: this rank is not a member of the group new_group made"
    elif type(process_group).__name__ == "DeviceMesh":
        hint = "; for a DeviceMesh pass the group of its data-parallel dim, mesh.get_group(dim)"
    raise ValueError(
        f"process_group must be {accepted}; got {process_group!r} ({type(process_group).__name__}){hint}"
    )


def check_keys(group: dict, index: int, muon_keys, adamw_keys) -> None:
    """Every key of the group is an option of its kind or metadata: a misspelt key, or one of the
    other kind of group, is an error naming the key and the closest valid one."""
    mine, other = (muon_keys, adamw_keys) if group.get("use_muon", True) else (adamw_keys, muon_keys)
    kind = "a Muon group (use_muon=True)" if group.get("use_muon", True) else "an AdamW group (use_muon=False)"
    valid = set(mine) | METADATA_KEYS
    for key in group:
        if key in valid:
            continue
        where = f"param_groups[{index}]: unknown key {key!r} in {kind}"
        if not isinstance(key, str):
            raise ValueError(f"{where}; group keys are option names")
        if key in other:
            theirs = "AdamW groups (use_muon=False)" if group.get("use_muon", True) else "Muon groups"
            raise ValueError(
                f"{where}: {key!r} is an option of {theirs}, which this group would ignore; put those "
                "parameters in a group of that kind, or drop the key"
            )
        close = difflib.get_close_matches(key, sorted(valid - METADATA_KEYS), n=1, cutoff=0.6)
        suggestion = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(mine)}"
        raise ValueError(f"{where}{suggestion}")


def check_unique(param_groups: list[dict], params) -> None:
    """A tensor twice in the optimizer would be stepped twice (torch only warns within a group)."""
    if isinstance(params, (Tensor, set)):
        return  # torch's add_param_group wraps a Tensor and refuses a set
    index = len(param_groups)
    seen = {id(p): f"param_groups[{i}]['params'][{j}]" for i, g in enumerate(param_groups)
            for j, p in enumerate(g["params"])}
    for j, p in enumerate(params):
        p = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # (name, tensor) pairs
        where = f"param_groups[{index}]['params'][{j}]"
        if id(p) in seen:
            raise ValueError(f"{where} is the same tensor as {seen[id(p)]}; each parameter may appear once")
        seen[id(p)] = where


def check_group(group: dict, index: int) -> None:
    if group["use_muon"]:
        check_muon_group(group, index)
    else:
        check_adamw_group(group, index)


def resolve_kernels(group: dict, index: int) -> None:
    """Resolve the group's NS kernel for each matrix shape and device now, so that an unknown or
    unusable backend is an error at construction, and the step imports nothing."""
    name = group["backend"]
    if name != "auto" and name not in BACKENDS:
        raise BackendError(
            f"param_groups[{index}] has backend={name!r}: unknown backend; choose one of {('auto',) + BACKENDS}"
        )
    # "auto" resolves per bucket at plan time and falls back to standard NS where Gram cannot run
    algorithms = ("standard", "gram") if group["ns_algorithm"] == "gram" else ("standard",)
    steps = resolve_schedule(group["ns_coefficients"], group["ns_steps"], group["eps"]).steps
    seen = set()
    for p in group["params"]:
        X = p.to_local() if distributed.is_dtensor(p) else p
        _, m, n = matrix_shape(p.shape, group["flatten"], group["transposed"])
        for r in set(row_blocks(m, group["split"], group["heads"])):
            # sharded (DTensor) groups resolve "auto" without a shape: one dtype per collective
            shape = None if X is not p else (min(r, n), max(r, n))
            key = (min(r, n), max(r, n), X.dtype, X.device, shape is None)
            if key in seen:
                continue
            seen.add(key)
            # a (1, s, l) stand-in with the parameter's device and dtype: backends look at those
            probe = torch.empty((1, min(r, n), max(r, n)), dtype=X.dtype, device=X.device)
            for algorithm in algorithms:
                kernel_for(group, index, probe, resolve_dtype(group["ns_dtype"], X.device, shape), steps, algorithm)


def kernel_for(group: dict, index: int, X: Tensor, ns_dtype: torch.dtype, steps: int, algorithm: str | None = None):
    """(algorithm, kernel) of the group's backend for stack X (`muon.backends.plan_kernel`), a
    BackendError naming the group when it cannot run."""
    try:
        kernel = plan_kernel(group["backend"], algorithm or group["ns_algorithm"], X, ns_dtype, steps)
    except BackendUnavailable as exc:
        raise BackendError(f"param_groups[{index}]: {exc}") from None
    return kernel.algorithm, kernel


def check_real(group: dict, key: str, index: int, low: float, high: float = math.inf, *, open_high=False,
                value=None) -> None:
    value = group[key] if value is None else value
    where = f"param_groups[{index}]: {key}"
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{where} must be a number, got {value!r}")
    inside = low <= value < high if open_high else low <= value <= high
    if not (math.isfinite(value) and inside):
        span = f"[{low}, {high})" if open_high else f">= {low}" if high == math.inf else f"[{low}, {high}]"
        raise ValueError(f"{where} must be finite and {span}, got {value!r}")

def check_lr(group: dict, index: int | None = None) -> None:
    index = "?" if index is None else index
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(
                f"param_groups[{index}]: a Tensor lr must have one element and be floating, got shape "
                f"{tuple(lr.shape)} {lr.dtype}"
            )
        lr = lr.item()
    check_real(group, "lr", index, 0.0, value=lr)
    check_real(group, "weight_decay", index, 0.0)

def check_not_inference(p: Tensor, where: str) -> None:
    """An inference tensor (made under torch.inference_mode(), or a view of one) cannot be updated in
    place outside inference mode: refused when its group is added, not half-way through a commit."""
    if p.is_inference():
        raise ValueError(
            f"{where} (shape {tuple(p.shape)}) is an inference tensor (created under torch.inference_mode(), or a "
            "view of one): the step updates parameters in place, which torch does not allow on inference tensors "
            "outside inference mode. Create the parameter outside inference_mode, or pass a clone made outside "
            "it (p.clone())"
        )


def params_with_grad(group: dict, index: int) -> tuple[list[Tensor], list[Tensor]]:
    params, grads = [], []
    for i, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        # a parameter whose data was replaced by an inference tensor after its group was added (dynamo
        # cannot trace is_inference: a compiled step's tensors are what it was traced with)
        if not torch.compiler.is_compiling():
            check_not_inference(p, f"param_groups[{index}]['params'][{i}]")
        if p.grad.is_sparse:
            raise RuntimeError(
                f"param_groups[{index}]['params'][{i}] has a sparse gradient; Muon and its AdamW "
                "groups need dense gradients (use a dense nn.Embedding, or SparseAdam for that parameter)"
            )
        params.append(p)
        grads.append(p.grad)
    return params, grads


def raise_nonfinite(param_groups: list[dict], index: int, i: int):
    p = param_groups[index]["params"][i]
    raise RuntimeError(
        f"non-finite gradient in param_groups[{index}]['params'][{i}] (shape "
        f"{tuple(p.shape)}); nothing was updated this step"
    )


def check_tensors(group: dict, index: int, kind: str) -> None:
    for i, p in enumerate(group["params"]):
        where = f"param_groups[{index}]['params'][{i}]"
        check_not_inference(p, where)
        if p.layout != torch.strided:
            raise ValueError(f"{where} is a {p.layout} tensor; {kind} groups take dense (strided) parameters")
        if p.is_complex():
            raise ValueError(f"{where} is complex ({p.dtype}); {kind} groups take real floating parameters")
        if not p.is_floating_point():
            raise ValueError(f"{where} must be floating point, got {p.dtype}")

def check_muon_group(group: dict, index: int) -> None:
    check_lr(group, index)
    check_real(group, "momentum", index, 0.0, 1.0, open_high=True)
    steps = group["ns_steps"]
    if isinstance(steps, int) and not isinstance(steps, bool) and steps < 1:
        raise ValueError(
            f"param_groups[{index}]: ns_steps must be >= 1, got {steps}; without Newton–Schulz Muon's update is "
            "its (Nesterov) momentum, i.e. momentum SGD: for that ablation use torch.optim.SGD(momentum=..., "
            "nesterov=...) on these parameters"
        )
    if group["variant"] not in VARIANTS:
        raise ValueError(f"param_groups[{index}]: variant must be one of {VARIANTS}, got {group['variant']!r}")
    if group["variant"] == "normuon" and (group.get("split") is not None or group.get("heads") is not None):
        raise ValueError(
            f"param_groups[{index}]: variant='normuon' does not combine with split/heads yet (its row "
            "moments are per parameter, the blocks' per block); use one or the other in a group"
        )
    if group["variant"] == "normuon":
        # FSDP2 parameters step on their row shards, where NorMuon's row moments and norms
        # would need the owner's full rows: refused until the step handles them.
        for i, p in enumerate(group["params"]):
            if distributed.is_dtensor(p):
                raise ValueError(
                    f"param_groups[{index}]['params'][{i}] is a DTensor (FSDP2); variant='normuon' "
                    "does not support sharded parameters yet (replicated/DDP parameters work)"
                )
    resolve_flatten(group, index)
    check_state_dtype(group, index, (torch.bfloat16, torch.int8))
    if group["state_dtype"] is not None and (group.get("split") is not None or group.get("heads") is not None):
        raise ValueError(
            f"param_groups[{index}]: state_dtype={group['state_dtype']} does not combine with split/heads yet (the "
            "blocks of one parameter step in different buckets, its low-precision momentum is one tensor); use "
            "state_dtype=None in this group"
        )
    check_real(group, "normuon_beta2", index, 0.0, 1.0, open_high=True)
    check_real(group, "normuon_eps", index, 0.0)
    if not group["normuon_eps"] > 0:  # it also floors the norm NorMuon divides by
        raise ValueError(f"param_groups[{index}]: normuon_eps must be > 0, got {group['normuon_eps']!r}")
    for key in ("nesterov", "flatten", "batched", "cautious_weight_decay", "transposed"):
        if not isinstance(group[key], bool):
            raise ValueError(f"param_groups[{index}]: {key} must be True or False, got {group[key]!r}")
    adjust = group["adjust_lr_fn"]
    if not (adjust is None or callable(adjust) or (isinstance(adjust, str) and adjust in ADJUST_LR_FNS)):
        raise ValueError(
            f"param_groups[{index}]: adjust_lr_fn must be one of {ADJUST_LR_FNS}, None or a callable, "
            f"got {adjust!r}"
        )
    if not (group["ns_dtype"] == "auto" or group["ns_dtype"] in COMPUTE_DTYPES):
        raise ValueError(
            f"param_groups[{index}]: ns_dtype must be 'auto' or one of {COMPUTE_DTYPES}, got {group['ns_dtype']}"
        )
    if not isinstance(group["backend"], str):
        raise ValueError(f"param_groups[{index}]: backend must be a name, got {group['backend']!r}")
    if not (isinstance(group["ns_algorithm"], str) and group["ns_algorithm"] in ALGORITHMS):
        raise ValueError(
            f"param_groups[{index}]: ns_algorithm must be one of {ALGORITHMS}, got {group['ns_algorithm']!r}"
        )
    check_transposed(group, index)
    check_split(group, index)
    try:
        resolve_schedule(group["ns_coefficients"], group["ns_steps"], group["eps"])
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"param_groups[{index}]: invalid Newton–Schulz settings (ns_coefficients={group['ns_coefficients']!r},"
            f" ns_steps={group['ns_steps']!r}, eps={group['eps']!r}): {error}"
        ) from None
    for i, p in enumerate(group["params"]):
        if getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter":
            raise ValueError(
                f"param_groups[{index}]['params'][{i}] is an FSDP1 FlatParameter (FullyShardedDataParallel with "
                f"use_orig_params=False, shape {tuple(p.shape)}): the matrix shapes of the parameters it holds cannot "
                "be recovered. Muon needs each matrix with its shape: use FSDP2 (torch.distributed.fsdp.fully_shard) "
                "or DDP, and build the groups with muon.param_groups(model)"
            )
        if p.ndim < 2:
            raise ValueError(
                f"Muon orthogonalizes matrices, but param_groups[{index}]['params'][{i}] has shape "
                f"{tuple(p.shape)} ({p.ndim}-D). Biases, norms and other 0-/1-D parameters belong in an "
                "AdamW group (use_muon=False): muon.param_groups(model) builds the groups for you. A matrix "
                "flattened to 1-D (a hand-made view, or FSDP1's use_orig_params=True shards) has lost the shape "
                "Muon needs: give it as a matrix (FSDP2's fully_shard keeps shapes)."
            )
    check_tensors(group, index, "Muon")
    # The lr factor of every matrix (every block) is checked now, so that a step never fails half-applied.
    for i, p in enumerate(group["params"]):
        _, m, n = matrix_shape(p.shape, group["flatten"], group["transposed"])
        if m * n == 0:
            continue  # an empty parameter is never updated
        for r in row_blocks(m, group["split"], group["heads"]):
            try:
                update_scale(adjust, r, n)
            except Exception as error:
                raise ValueError(
                    f"param_groups[{index}]['params'][{i}] (shape {tuple(p.shape)}, an {r}×{n} matrix): {error}"
                ) from error
    resolve_kernels(group, index)

def resolve_flatten(group: dict, index: int) -> None:
    """flatten=None (the default: not chosen) becomes False, unless the group holds a parameter with 4 or
    more dims: a conv weight (out, in, kh, kw) is one (out, in·kh·kw) matrix to Keller Jordan's Muon and a
    batch of kh×kw matrices to flatten=False, two different optimizers, so the choice is asked for, never
    guessed. 3-D parameters stay batches of matrices (MoE expert stacks (E, out, in))."""
    if group["flatten"] is not None:
        return
    for i, p in enumerate(group["params"]):
        if isinstance(p, Tensor) and p.ndim >= 4:
            raise ValueError(
                f"param_groups[{index}]['params'][{i}] has shape {tuple(p.shape)} ({p.ndim}-D) and its group does "
                "not say how Muon sees it: flatten=True orthogonalizes it as one (shape[0], prod(rest)) matrix, "
                "(out, in·kh·kw) for a conv weight, as Keller Jordan's Muon does; flatten=False as a batch of "
                f"{tuple(p.shape[-2:])} matrices over its last two dims (a stack such as (layers, experts, out, "
                "in)). Pass flatten= to muon.Muon or in the group; muon.param_groups(model) sets flatten=True on "
                "conv weights"
            )
    group["flatten"] = False


def check_transposed(group: dict, index: int) -> None:
    """transposed=True (matrices stored (in, out), transformers' Conv1D): each matrix of a parameter
    is read as its transpose. A flattened conv weight is not an (in, out) matrix, and FSDP2's row
    shards of an (in, out) weight would be input features: both are refused."""
    if not group["transposed"]:
        return
    for i, p in enumerate(group["params"]):
        where = f"param_groups[{index}]['params'][{i}]"
        if group["flatten"] and p.ndim > 2:
            raise ValueError(
                f"{where} has shape {tuple(p.shape)}: transposed=True reads each (in, out) matrix (the last two "
                "dims) as its transpose, and does not combine with flatten=True on more than 2 dims"
            )
        if distributed.is_dtensor(p):
            raise ValueError(
                f"{where} is a DTensor (FSDP2); transposed=True does not support sharded parameters yet "
                "(replicated/DDP parameters work)"
            )


def check_split(group: dict, index: int) -> None:
    """split (row counts) and heads (equal row blocks): their form, then every parameter's rows."""
    split, heads = group["split"], group["heads"]
    where = f"param_groups[{index}]"
    if split is not None and heads is not None:
        raise ValueError(f"{where}: split and heads are exclusive; give one (got split={split!r}, heads={heads!r})")
    if split is not None:
        if not (
            isinstance(split, (list, tuple))
            and split
            and all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in split)
        ):
            raise ValueError(f"{where}: split must be a non-empty list of positive ints (rows), got {split!r}")
    if heads is not None and not (isinstance(heads, int) and not isinstance(heads, bool) and heads > 0):
        raise ValueError(f"{where}: heads must be a positive int, got {heads!r}")
    if split is None and heads is None:
        return
    for i, p in enumerate(group["params"]):
        if p.ndim < 2:
            continue  # refused with its own message
        count, m, n = matrix_shape(p.shape, group["flatten"], group["transposed"])
        if m * n == 0:
            continue  # an empty parameter is never updated
        what = (
            f"{where}['params'][{i}] has shape {tuple(p.shape)}, seen as {m}×{n} matrices"
            f"{' (flatten=True)' if group['flatten'] else ''}{' (transposed=True)' if group['transposed'] else ''}"
        )
        if split is not None and sum(split) != m:
            raise ValueError(f"{what}; split={list(split)} sums to {sum(split)}, not to its {m} rows")
        if heads is not None and m % heads:
            raise ValueError(f"{what}; heads={heads} does not divide its {m} rows")
        layout = block_layout(count, m, n, row_blocks(m, split, heads))
        if layout[0][0] is not None and not distributed.is_dtensor(p):
            try:  # unequal or tall blocks are updated through row views of the parameter
                p.view(stored_matrix_shape(p.shape, group["flatten"], group["transposed"]))
            except RuntimeError:
                raise ValueError(
                    f"{what}, strides {p.stride()}: its row blocks cannot be viewed in place; split/heads "
                    "with unequal or tall blocks need a parameter viewable as (matrices, rows, columns), "
                    "e.g. contiguous"
                ) from None

def check_state_dtype(group: dict, index: int, allowed: tuple) -> None:
    """state_dtype: None (the gradient's / parameter's dtype), torch.bfloat16, or for Muon groups
    torch.int8 (blockwise-quantized momentum, `muon.functional.quantize_blockwise`)."""
    low = group.setdefault("state_dtype", None)
    if low is None:
        return
    kind = "a Muon" if group["use_muon"] else "an AdamW"
    if low not in allowed:
        why = "" if group["use_muon"] else (
            "; int8 AdamW moments would need a dynamic (non-linear) 8-bit scheme for the second moment, which "
            "this optimizer does not implement: use torch.bfloat16 here, int8 in the Muon groups")
        raise ValueError(
            f"param_groups[{index}]: state_dtype must be None or one of {allowed} in {kind} group, got {low!r}{why}"
        )
    for i, p in enumerate(group["params"]):
        # int8 blocks lie within rows (dim 0): a DTensor sharded on another dim would cut them
        if distributed.is_dtensor(p) and any(pl.is_shard() and pl.dim != 0 for pl in p.placements):
            raise ValueError(
                f"param_groups[{index}]['params'][{i}] is a DTensor sharded on a dim other than 0 "
                f"({p.placements}); state_dtype={low} keeps blocks within rows, so it takes row-sharded "
                "(FSDP2's default Shard(0)) or replicated parameters"
            )
        if p.dtype == torch.float64:
            raise ValueError(
                f"param_groups[{index}]['params'][{i}] is float64; state_dtype={low} keeps its state in lower "
                "precision than the parameter's arithmetic (fp64): use state_dtype=None for fp64 parameters"
            )


def check_adamw_group(group: dict, index: int) -> None:
    check_lr(group, index)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"param_groups[{index}]: AdamW betas must be a pair (beta1, beta2), got {betas!r}")
    for beta in betas:
        check_real(group, "betas", index, 0.0, 1.0, open_high=True, value=beta)
    check_real(group, "eps", index, 0.0)
    if SCHEDULED_BETA1 in group:
        check_real(group, SCHEDULED_BETA1, index, 0.0, 1.0, open_high=True)
    cautious = group.setdefault("cautious_weight_decay", False)
    if not isinstance(cautious, bool):
        raise ValueError(f"param_groups[{index}]: cautious_weight_decay must be True or False, got {cautious!r}")
    check_state_dtype(group, index, (torch.bfloat16,))
    check_tensors(group, index, "AdamW")

