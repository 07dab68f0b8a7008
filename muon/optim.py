"""The Muon optimizer: a drop-in for torch.optim.Muon, with AdamW groups, batching and fast backends."""

from __future__ import annotations

import copy
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _engine, backends, distributed
from ._engine import neuron_shape
from ._shapes import ADJUST_LR_FNS, block_layout, matrix_shape, row_blocks, update_scale
from .backends.dispatch import ALGORITHMS
from .coefficients import KELLER, Schedule, resolve_schedule
from .newton_schulz import COMPUTE_DTYPES, orthogonalize, resolve_dtype

__all__ = ["Muon", "matrix_shape", "update_scale"]

NONFINITE_POLICIES = ("skip", "raise")
VARIANTS = ("muon", "normuon")


def _lr_value(lr) -> float | Tensor:
    return lr if isinstance(lr, Tensor) else float(lr)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-step scalars are applied in: fp64 for fp64 tensors, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked(ok: Tensor, value, otherwise: float, dtype: torch.dtype) -> Tensor:
    """A 0-dim device tensor: `value` where ok, else `otherwise`; never a host sync.

    Python floats go through torch.full (a fill kernel, rounded once from double like a scalar argument).
    """
    if isinstance(value, Tensor):
        value = value.to(device=ok.device, dtype=dtype)
    else:
        value = torch.full((), value, dtype=dtype, device=ok.device)
    return torch.where(ok, value, otherwise)


def _decay_and_add(p: Tensor, decay: Tensor | None, update: Tensor, scale: Tensor | None) -> None:
    """p = p * decay + scale * update, with the scalars in fp32 (fp64 for fp64 p), never in bf16/fp16.

    fp32/fp64 parameters are updated in place; bf16/fp16 ones go through one fp32 copy so that
    lr and 1 - lr*wd are not rounded to 8 or 11 bits (0.99998 is 1.0 in bf16). scale=None: the
    update comes scaled already.
    """
    target = p if p.dtype in (torch.float32, torch.float64) else p.float()
    if decay is not None:
        target.mul_(decay)
    if scale is None:
        target.add_(update)
    else:
        target.addcmul_(update, scale)
    if target is not p:
        p.copy_(target)


def _cautious(decay: Tensor | None, update: Tensor, p: Tensor, against: int, cautious: bool) -> Tensor | None:
    """Cautious weight decay: `decay` where the update u (W -= c·u, c > 0) and W agree in sign
    (u·W >= 0), 1 elsewhere. `update` is u times a factor of sign -against (see _engine.cautious_decay).

    keep·(1 - decay) + decay with keep in {0, 1} is where(u·W >= 0, decay, 1) (exactly so for
    decay in [0.5, 1]), written as the step engine computes it with multi-tensor ops.
    """
    if decay is None or not cautious:
        return decay
    dtype = _opmath(p.dtype)
    product = update.to(dtype) * p.to(dtype)  # in opmath, as the engine multiplies by its fp32 copy of W
    keep = product > 0 if against == 1 else product < 0
    return keep * (1 - decay) + decay


def _normuon(O: Tensor, v: Tensor, ok: Tensor, neg_lr_scale: Tensor, beta2: float, eps: float,
             dtype: torch.dtype) -> Tensor:
    """NorMuon's scaled update -lr·s·O' of one parameter's (count, m, n) matrices O (neurons: rows),
    updating v (count, m) in place; the formula is in `muon._engine.normuon_apply` (same bits)."""
    X = O.to(dtype)
    sq = X.square()
    X = X * neg_lr_scale
    q = sq.mean(-1)
    v.lerp_(q, _masked(ok, 1 - beta2, 0.0, dtype))
    d = v.sqrt().add_(eps)
    n = O.shape[-1]
    norm = q.sum(-1, keepdim=True).mul_(n).sqrt_()
    norm_normalized = (q / d.square()).sum(-1, keepdim=True).mul_(n).sqrt_()
    f = (norm / norm_normalized.clamp_min_(eps)) / d
    return X.mul_(f.unsqueeze(-1))


class Muon(Optimizer):
    """Muon for hidden-layer matrices, AdamW for everything else, in one optimizer.

    With the same arguments and 2-D parameters it computes what torch.optim.Muon computes:

        B = lerp(B, G, 1 - momentum)                 (momentum buffer, an EMA)
        U = lerp(G, B, momentum) if nesterov else B
        O = NS(U)                                    (bf16 Newton–Schulz, `muon.newton_schulz`)
        W = W·(1 - lr·weight_decay) - lr·s(m, n)·O   (s from adjust_lr_fn, see `update_scale`)

    Beyond torch.optim.Muon:
      * groups with ``use_muon=False`` are updated with AdamW (keys lr, betas, eps, weight_decay),
        torch.optim.AdamW's update up to rounding; `muon.param_groups(model)` builds both kinds of group;
      * parameters with more than 2 dims are a batch of matrices, or with ``flatten=True`` (conv
        weights) one (shape[0], -1) matrix;
      * same-shape matrices of a group are stacked into one batched NS call (``batched=True``);
      * ``ns_coefficients`` also takes a preset name ("keller", "you", "polar_express", "cans") or a
        list of per-step tuples; ``adjust_lr_fn`` also takes "spectral" or a callable (m, n) -> factor;
      * ``backend`` picks the NS implementation ("auto", "torch", "triton", "cuda"; resolved when the
        group is added, an unusable one is a ValueError naming the group) and ``ns_dtype`` its compute
        dtype ("auto": bf16 on CUDA, fp32 on the CPU);
      * ``variant="normuon"`` (per group): NorMuon (arXiv 2510.05491, as microsoft/dion's
        dion/normuon.py): each row (output neuron) of O is divided by sqrt(v) + ``normuon_eps``, v an
        EMA (``normuon_beta2``, no bias correction) of the row's mean of O², kept in
        `state[p]["normuon_v"]` (the parameter's shape without its last dim, fp32 or fp64); then the
        Frobenius norm of O is restored and Muon's lr·s applies. Formula: `muon._engine.normuon_apply`;
      * ``cautious_weight_decay=True`` (per group, Muon and AdamW): weight decay only where the update
        u (W -= lr·u) and W agree in sign, u·W >= 0 (arXiv 2510.12402);
      * ``ns_algorithm`` picks standard ("standard", the default) or Gram ("gram") Newton–Schulz, or
        "auto": per bucket of same-shape matrices, `muon.backends.dispatch.choose_algorithm` for the
        bucket's shape, device and resolved ns_dtype (Gram needs a backend that has it: torch, triton);
      * ``split`` (row counts summing to the matrix's rows, e.g. [d, d, d] for a fused QKV weight) or
        ``heads`` (N equal row blocks) orthogonalize row blocks of each matrix separately. A block is
        updated exactly as a separate parameter of the block's shape would be: NS of the block, and
        the update scale s(rows, n) of the block's shape. Rows are those of the matrices
        `matrix_shape` sees: dim 0 of a 2-D weight, of a flatten=True conv weight (split after
        flattening: blocks of output channels), dim -2 of each matrix of a 3-D expert stack. Blocks
        of the same shape (across layers too) share one batched NS call. State stays per
        parameter (momentum_buffer has the parameter's shape), and a non-finite gradient anywhere in
        the parameter skips the whole parameter (split/heads do not combine with NorMuon yet);

    The step (``foreach=None`` or True) runs a plan made once (`muon._engine`): per group, buckets of
    same-shape matrices ((m, n) and (n, m) together) with one stacked momentum buffer each, a fixed
    handful of batched launches per bucket, AdamW through torch's multi-tensor/fused kernels, no
    host sync (with nonfinite="skip"); it can be captured by torch.compile or CUDA graphs.
    ``foreach=False`` runs the per-parameter loop below, the readable reference (same bits).

    Non-finite gradients (``nonfinite``): with "skip" (the default) a parameter whose gradient has a
    NaN or inf is left untouched that step, parameter and optimizer state alike, and
    `state[p]["nonfinite_skips"]` counts such steps; the test runs on the device, without a host sync.
    With "raise" the step raises a RuntimeError naming the parameter before any group is modified
    (one host sync per step).

    Under torch.distributed the NS work is split across ranks (see `muon.distributed`): replicated
    parameters over ``process_group`` (default: the world once initialized) on the same plan as one
    process (each rank orthogonalizes its rows of every bucket, one all-gather per group), FSDP2
    DTensor parameters (Shard(0), 1-D mesh) over their own mesh on a plan of their local shards, with
    momentum left sharded (owner all-to-alls per bucket; other layouts run the loop). Every
    multi-rank step first checks that all ranks hold the same plan and agrees the finite flags
    (two small all-reduces and one host sync per step), so a NaN on one rank skips the parameter on
    every rank and a gradient missing on one rank is a DistributedStepError on every rank.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients=KELLER,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | Callable | None = None,
        *,
        betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        flatten: bool = False,
        batched: bool = True,
        backend: str = "auto",
        ns_dtype: torch.dtype | str = "auto",
        ns_algorithm: str = "standard",
        split: list[int] | None = None,
        heads: int | None = None,
        nonfinite: str = "skip",
        process_group=None,
        foreach: bool | None = None,
        variant: str = "muon",
        normuon_beta2: float = 0.95,
        normuon_eps: float = 1e-8,
        cautious_weight_decay: bool = False,
    ) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        # None or True: the planned, batched step (muon._engine); False: the per-parameter loop
        # below, kept as the readable reference (and used for distributed parameters).
        self.foreach = foreach
        self._plan: _engine.Plan | None = None
        self._plan_version = 0  # bumped when state or groups change behind the plan's back
        self._runs: dict = {}  # (backend, device, s, l) -> NS run function, resolved at construction
        # Replicated parameters split their NS over this group (None: the default group once
        # torch.distributed is initialized); FSDP2 (DTensor) parameters use their own mesh.
        self.process_group = process_group
        # AdamW groups take these where the group does not set them.
        self._adamw_defaults = {"lr": lr, "betas": betas, "eps": adamw_eps, "weight_decay": weight_decay,
                                "cautious_weight_decay": cautious_weight_decay}
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            use_muon=True,
            flatten=flatten,
            batched=batched,
            backend=backend,
            ns_dtype=ns_dtype,
            variant=variant,
            normuon_beta2=normuon_beta2,
            normuon_eps=normuon_eps,
            cautious_weight_decay=cautious_weight_decay,
            ns_algorithm=ns_algorithm,
            split=list(split) if isinstance(split, tuple) else split,
            heads=heads,
        )
        super().__init__(params, defaults)
        # ns_dtype travels as a string, so distributed full-state-dict checkpoints can carry it
        self.register_state_dict_post_hook(distributed.encode_state_dict_dtypes)
        self.register_load_state_dict_pre_hook(distributed.decode_state_dict_dtypes)

    # ----------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        """Add a group, validated like the constructor's: a group that fails leaves the optimizer unchanged."""
        self._plan_version = getattr(self, "_plan_version", 0) + 1
        group = dict(param_group)
        use_muon = group.get("use_muon", True)
        if not isinstance(use_muon, bool):
            index = len(self.param_groups)
            raise ValueError(f"param_groups[{index}]: use_muon must be True or False, got {use_muon!r}")
        if not use_muon:
            for key, value in self._adamw_defaults.items():
                group.setdefault(key, value)
        group["use_muon"] = use_muon
        if "params" in group and not isinstance(group["params"], (Tensor, set)):
            group["params"] = list(group["params"])  # a generator is read once, here
        self._check_unique(group.get("params", ()))
        super().add_param_group(group)
        try:
            self._check_group(self.param_groups[-1], len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()
            raise

    def _check_unique(self, params) -> None:
        """A tensor twice in the optimizer would be stepped twice (torch only warns within a group)."""
        if isinstance(params, (Tensor, set)):
            return  # torch's add_param_group wraps a Tensor and refuses a set
        index = len(self.param_groups)
        seen = {id(p): f"param_groups[{i}]['params'][{j}]" for i, g in enumerate(self.param_groups)
                for j, p in enumerate(g["params"])}
        for j, p in enumerate(params):
            p = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # (name, tensor) pairs
            where = f"param_groups[{index}]['params'][{j}]"
            if id(p) in seen:
                raise ValueError(f"{where} is the same tensor as {seen[id(p)]}; each parameter may appear once")
            seen[id(p)] = where

    def _check_group(self, group: dict, index: int) -> None:
        if group["use_muon"]:
            self._check_muon_group(group, index)
        else:
            self._check_adamw_group(group, index)

    @staticmethod
    def _check_real(group: dict, key: str, index: int, low: float, high: float = math.inf, *, open_high=False,
                    value=None) -> None:
        value = group[key] if value is None else value
        where = f"param_groups[{index}]: {key}"
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r}")
        inside = low <= value < high if open_high else low <= value <= high
        if not (math.isfinite(value) and inside):
            span = f"[{low}, {high})" if open_high else f">= {low}" if high == math.inf else f"[{low}, {high}]"
            raise ValueError(f"{where} must be finite and {span}, got {value!r}")

    @staticmethod
    def _check_lr(group: dict, index: int | None = None) -> None:
        index = "?" if index is None else index
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(
                    f"param_groups[{index}]: a Tensor lr must have one element and be floating, got shape "
                    f"{tuple(lr.shape)} {lr.dtype}"
                )
            lr = lr.item()
        Muon._check_real(group, "lr", index, 0.0, value=lr)
        Muon._check_real(group, "weight_decay", index, 0.0)

    @staticmethod
    def _check_tensors(group: dict, index: int, kind: str) -> None:
        for i, p in enumerate(group["params"]):
            where = f"param_groups[{index}]['params'][{i}]"
            if p.layout != torch.strided:
                raise ValueError(f"{where} is a {p.layout} tensor; {kind} groups take dense (strided) parameters")
            if p.is_complex():
                raise ValueError(f"{where} is complex ({p.dtype}); {kind} groups take real floating parameters")
            if not p.is_floating_point():
                raise ValueError(f"{where} must be floating point, got {p.dtype}")

    def _resolve_backends(self, group: dict, index: int) -> None:
        """Resolve the group's NS backend for each matrix shape and device now, so that an unknown or
        unusable backend is an error at construction, and the step imports nothing."""
        name = group["backend"]
        if name != "auto" and name not in backends.BACKENDS:
            raise _engine.BackendError(
                f"param_groups[{index}] has backend={name!r}: unknown backend; choose one of "
                f"{('auto',) + backends.BACKENDS}"
            )
        # "auto" resolves per bucket at plan time and falls back to standard NS where Gram cannot run
        algorithms = ("standard", "gram") if group["ns_algorithm"] == "gram" else ("standard",)
        for p in group["params"]:
            X = p.to_local() if distributed.is_dtensor(p) else p
            _, m, n = matrix_shape(p.shape, group["flatten"])
            for r in set(row_blocks(m, group["split"], group["heads"])):
                for algorithm in algorithms:
                    key = (name, X.device, min(r, n), max(r, n), algorithm)
                    if key in self._runs:
                        continue
                    # a (1, s, l) stand-in with the parameter's device and dtype: backends look at those
                    probe = torch.empty((1, min(r, n), max(r, n)), dtype=X.dtype, device=X.device)
                    self._runs[key] = _engine.backend_for(group, probe, f"param_groups[{index}]", algorithm)

    def _run_for(self, group: dict, X: Tensor, algorithm: str = "standard"):
        key = (group["backend"], X.device, X.shape[-2], X.shape[-1], algorithm)
        run = self._runs.get(key)
        if run is None:  # moved to another device, or options changed after construction
            index = next(i for i, g in enumerate(self.param_groups) if g is group)
            run = self._runs[key] = _engine.backend_for(group, X, f"param_groups[{index}]", algorithm)
        return run

    def _check_muon_group(self, group: dict, index: int | None = None) -> None:
        index = len(self.param_groups) - 1 if index is None else index
        self._check_lr(group, index)
        self._check_real(group, "momentum", index, 0.0, 1.0, open_high=True)
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
        self._check_real(group, "normuon_beta2", index, 0.0, 1.0, open_high=True)
        self._check_real(group, "normuon_eps", index, 0.0)
        if not group["normuon_eps"] > 0:  # it also floors the norm NorMuon divides by
            raise ValueError(f"param_groups[{index}]: normuon_eps must be > 0, got {group['normuon_eps']!r}")
        for key in ("nesterov", "flatten", "batched", "cautious_weight_decay"):
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
        self._check_split(group, index)
        try:
            resolve_schedule(group["ns_coefficients"], group["ns_steps"], group["eps"])
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"param_groups[{index}]: invalid Newton–Schulz settings (ns_coefficients={group['ns_coefficients']!r},"
                f" ns_steps={group['ns_steps']!r}, eps={group['eps']!r}): {error}"
            ) from None
        for i, p in enumerate(group["params"]):
            if p.ndim < 2:
                raise ValueError(
                    f"Muon orthogonalizes matrices, but param_groups[{index}]['params'][{i}] has shape "
                    f"{tuple(p.shape)} ({p.ndim}-D). Biases, norms and other 0-/1-D parameters belong in an "
                    "AdamW group (use_muon=False): muon.param_groups(model) builds the groups for you."
                )
        self._check_tensors(group, index, "Muon")
        # The lr factor of every matrix (every block) is checked now, so that a step never fails half-applied.
        for i, p in enumerate(group["params"]):
            _, m, n = matrix_shape(p.shape, group["flatten"])
            if m * n == 0:
                continue  # an empty parameter is never updated
            for r in row_blocks(m, group["split"], group["heads"]):
                try:
                    update_scale(adjust, r, n)
                except Exception as error:
                    raise ValueError(
                        f"param_groups[{index}]['params'][{i}] (shape {tuple(p.shape)}, an {r}×{n} matrix): {error}"
                    ) from error
        self._resolve_backends(group, index)

    @staticmethod
    def _check_split(group: dict, index: int) -> None:
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
            count, m, n = matrix_shape(p.shape, group["flatten"])
            if m * n == 0:
                continue  # an empty parameter is never updated
            what = (
                f"{where}['params'][{i}] has shape {tuple(p.shape)}, seen as {m}×{n} matrices"
                f"{' (flatten=True)' if group['flatten'] else ''}"
            )
            if split is not None and sum(split) != m:
                raise ValueError(f"{what}; split={list(split)} sums to {sum(split)}, not to its {m} rows")
            if heads is not None and m % heads:
                raise ValueError(f"{what}; heads={heads} does not divide its {m} rows")
            layout = block_layout(count, m, n, row_blocks(m, split, heads))
            if layout[0][0] is not None and not distributed.is_dtensor(p):
                try:  # unequal or tall blocks are updated through row views of the parameter
                    p.view(count, m, n)
                except RuntimeError:
                    raise ValueError(
                        f"{what}, strides {p.stride()}: its row blocks cannot be viewed in place; split/heads "
                        "with unequal or tall blocks need a parameter viewable as (matrices, rows, columns), "
                        "e.g. contiguous"
                    ) from None

    def _check_adamw_group(self, group: dict, index: int | None = None) -> None:
        index = len(self.param_groups) - 1 if index is None else index
        self._check_lr(group, index)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"param_groups[{index}]: AdamW betas must be a pair (beta1, beta2), got {betas!r}")
        for beta in betas:
            self._check_real(group, "betas", index, 0.0, 1.0, open_high=True, value=beta)
        self._check_real(group, "eps", index, 0.0)
        cautious = group.setdefault("cautious_weight_decay", False)
        if not isinstance(cautious, bool):
            raise ValueError(f"param_groups[{index}]: cautious_weight_decay must be True or False, got {cautious!r}")
        self._check_tensors(group, index, "AdamW")

    # ----------------------------------------------------------------------------- checkpoints
    # Keys of state[p] per group kind (torch.optim.Muon and torch.optim.AdamW keep subsets of these).
    _STATE_KEYS = {True: frozenset({"momentum_buffer", "nonfinite_skips", "normuon_v"}),
                   False: frozenset({"step", "exp_avg", "exp_avg_sq", "nonfinite_skips"})}
    _CALLABLE = "callable:"  # prefix of the string that stands for a callable adjust_lr_fn in a state dict

    def state_dict(self) -> dict:
        """torch's state dict, holding only types torch.load(weights_only=True) accepts.

        A callable adjust_lr_fn is saved as the string "callable:<module>.<qualname>" (a function is
        not data); loading it keeps the callable of the optimizer being loaded into, which must have one.
        """
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            fn = group.get("adjust_lr_fn")
            if callable(fn):
                name = getattr(fn, "__qualname__", type(fn).__qualname__)
                group["adjust_lr_fn"] = f"{self._CALLABLE}{getattr(fn, '__module__', None)}.{name}"
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from muon.Muon, torch.optim.Muon or torch.optim.AdamW, validated first.

        A group without ``use_muon`` (torch's) keeps the kind of this optimizer's group at its position:
        torch.optim.Muon state loads into Muon groups, torch.optim.AdamW state into AdamW groups. A group
        of the other kind, state keys the group does not keep (exp_avg in a Muon group,
        momentum_buffer in an AdamW group), wrong shapes and invalid hyperparameters are a ValueError,
        and a load that fails leaves the optimizer unchanged.
        """
        super().load_state_dict(self._checked_state_dict(state_dict))
        self._restore_normuon_dtype(state_dict)
        self._plan_version += 1  # the loaded state tensors are new: the next plan adopts them
        for group in self.param_groups:
            defaults = self.defaults if group["use_muon"] else self._adamw_defaults
            for key, value in defaults.items():
                if key != "differentiable":  # torch's __setstate__ adds it to defaults; no group of ours has it
                    group.setdefault(key, value)
        for state in self.state.values():  # torch casts every loaded tensor but "step" to the parameter's dtype
            skips = state.get("nonfinite_skips")
            if skips is not None and skips.dtype != torch.int64:
                state["nonfinite_skips"] = skips.to(torch.int64)

    def _restore_normuon_dtype(self, state_dict: dict) -> None:
        """torch casts loaded state to the parameter's dtype; NorMuon's second moments live in opmath
        (fp32 for bf16/fp16 parameters): take them from the state dict as saved, bit for bit."""
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                value = state_dict["state"].get(pid, {}).get("normuon_v")
                if value is not None and self.state[p]["normuon_v"].dtype != _opmath(p.dtype):
                    self.state[p]["normuon_v"] = value.to(device=p.device, dtype=_opmath(p.dtype), copy=True)

    def _checked_state_dict(self, state_dict: dict) -> dict:
        """A copy of state_dict with each group's kind (and callable adjust_lr_fn) resolved; raises on misfits."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (Optimizer.state_dict())")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            return state_dict  # torch's own check names the mismatch
        decoded = distributed.decode_state_dict_dtypes(self, state_dict)["param_groups"]
        groups = []
        for index, (saved, current, group) in enumerate(zip(saved_groups, self.param_groups, decoded)):
            where = f"state_dict['param_groups'][{index}]"
            kind = current["use_muon"]
            name = {True: "a Muon", False: "an AdamW"}
            if "use_muon" in saved:
                saved_kind = saved["use_muon"]
            elif ("ns_coefficients" in saved) != ("betas" in saved):  # torch.optim.Muon / torch.optim.AdamW
                saved_kind = "ns_coefficients" in saved
            else:
                saved_kind = kind
            if saved_kind != kind:
                raise ValueError(
                    f"{where} is {name[not kind]} group, but param_groups[{index}] of this optimizer is "
                    f"{name[kind]} group; build the optimizer with the groups of the saved one"
                )
            if saved.get("amsgrad") or saved.get("maximize"):
                raise ValueError(f"{where} has amsgrad or maximize set; muon's AdamW groups support neither")
            if saved.get("decoupled_weight_decay") is False and saved.get("weight_decay"):
                raise ValueError(f"{where} is torch.optim.Adam's (L2 weight decay); AdamW groups decouple it")
            group = {**group, "use_muon": kind}
            fn = group.get("adjust_lr_fn")
            if isinstance(fn, str) and fn.startswith(self._CALLABLE):
                if not callable(current.get("adjust_lr_fn")):
                    raise ValueError(
                        f"{where} was saved with a callable adjust_lr_fn ({fn[len(self._CALLABLE):]}); build the "
                        "optimizer with that callable before loading (functions are not saved in checkpoints)"
                    )
                group["adjust_lr_fn"] = current["adjust_lr_fn"]
            merged = {**(self.defaults if kind else {**self.defaults, **self._adamw_defaults}), **group}
            try:
                self._check_group({**merged, "params": current["params"]}, index)
            except ValueError as error:
                raise ValueError(f"cannot load {where}: {error}") from None
            self._check_saved_state(state_dict["state"], saved["params"], current["params"], kind, where,
                                    flatten=merged.get("flatten", False))
            groups.append(group)
        return {**state_dict, "param_groups": groups}

    def _check_saved_state(self, state: dict, ids: list, params: list, kind: bool, where: str,
                           flatten: bool = False) -> None:
        allowed = self._STATE_KEYS[kind]
        for j, (pid, p) in enumerate(zip(ids, params)):
            saved = state.get(pid)
            if saved is None:
                continue
            at = f"{where}['params'][{j}] (state[{pid!r}])"
            extra = set(saved) - allowed
            if extra:
                raise ValueError(
                    f"{at} holds {sorted(extra)}, which {'a Muon' if kind else 'an AdamW'} group does not keep "
                    f"(it keeps {sorted(allowed)}): the state was saved for another kind of group"
                )
            moments = {"step", "exp_avg", "exp_avg_sq"} & set(saved)
            if not kind and moments and len(moments) != 3:  # the step would start all three afresh
                raise ValueError(f"{at} must hold all of step, exp_avg and exp_avg_sq, or none")
            for key, value in saved.items():
                if not isinstance(value, Tensor):
                    raise ValueError(f"{at}: {key} must be a Tensor, got {type(value).__name__}")
                if key in ("momentum_buffer", "exp_avg", "exp_avg_sq") and (
                    tuple(value.shape) != tuple(p.shape) or not value.is_floating_point()
                ):
                    raise ValueError(
                        f"{at}: {key} is {tuple(value.shape)} {value.dtype}, the parameter is {tuple(p.shape)}"
                    )
                if key == "normuon_v" and (
                    tuple(value.shape) != neuron_shape(p.shape, flatten) or not value.is_floating_point()
                ):
                    raise ValueError(
                        f"{at}: normuon_v is {tuple(value.shape)} {value.dtype}, NorMuon keeps one entry per "
                        f"matrix row of the parameter: {neuron_shape(p.shape, flatten)}"
                    )
                if key in ("step", "nonfinite_skips") and value.numel() != 1:
                    raise ValueError(f"{at}: {key} must have one element, got shape {tuple(value.shape)}")

    # ------------------------------------------------------------------------ copy and pickle
    # Attributes beyond torch's (defaults, state, param_groups) that the step needs; torch's
    # __getstate__ drops them, so deepcopy and pickle would give an optimizer that cannot step.
    # The plan and the resolved backends do not travel: they are rebuilt (the state adopted).
    _PICKLED_ATTRS = ("nonfinite", "foreach", "process_group", "_adamw_defaults")  # new group options live in groups

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in self._PICKLED_ATTRS if key in self.__dict__})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # also called by load_state_dict with state and param_groups only
        self.__dict__.setdefault("nonfinite", "skip")
        self.__dict__.setdefault("process_group", None)
        self.__dict__.setdefault("foreach", None)
        # options added later than the pickle or state dict (their defaults: the behaviour of before)
        new_options = {"variant": "muon", "normuon_beta2": 0.95, "normuon_eps": 1e-8, "cautious_weight_decay": False,
                       "ns_algorithm": "standard", "split": None, "heads": None}
        for key, value in new_options.items():
            self.defaults.setdefault(key, value)
        for group in self.param_groups:  # a loaded group without them takes this optimizer's defaults
            for key in new_options if group.get("use_muon", True) else ("cautious_weight_decay",):
                group.setdefault(key, self.defaults[key])
        self._plan, self._runs = None, {}
        self._plan_version = self.__dict__.get("_plan_version", 0) + 1
        self.__dict__.setdefault("_adamw_defaults", {"lr": self.defaults["lr"], "betas": (0.9, 0.95), "eps": 1e-8,
                                                     "weight_decay": self.defaults["weight_decay"]})
        # The dtype hooks live in torch's hook dicts, which torch does not pickle: register them again.
        if distributed.encode_state_dict_dtypes not in self._optimizer_state_dict_post_hooks.values():
            self.register_state_dict_post_hook(distributed.encode_state_dict_dtypes)
        if distributed.decode_state_dict_dtypes not in self._optimizer_load_state_dict_pre_hooks.values():
            self.register_load_state_dict_pre_hook(distributed.decode_state_dict_dtypes)

    def __deepcopy__(self, memo: dict) -> Muon:
        # A process group is a live communicator: the copy shares it (deep-copying one fails).
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone

    # ------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # chosen once per step, like torch.optim's foreach
        if self.foreach is False or not self._planned_step():
            self._loop_step()
        return loss

    def _planned_step(self) -> bool:
        """The batched step through the plan; False when it does not apply (distributed parameters,
        parameters on several devices), and the loop runs instead."""
        # the replicated process group is part of the key: a plan for one process is not a plan
        # for many (torch.distributed initialized after a first step, process_group reassigned)
        pg = distributed.replicated_group(self.process_group)
        key = (_engine.plan_key(self.param_groups, self._plan_version), pg)
        plan = self._plan
        if plan is None or plan.key != key:
            plan = self._plan = self._build_plan(key, pg)
        if plan is None:
            return False
        ok = _engine.finite_flags(plan)
        if plan.dist is not None:  # all ranks hold the same plan; the flags agreed (one host sync)
            ok = distributed.agree_plan(plan, ok)
        if ok is not None and self.nonfinite == "raise":
            bad = _engine.first_nonfinite(plan, ok)  # a host sync
            if bad is not None:
                self._raise_nonfinite(*bad)
            ok = None  # every gradient is finite: no masking
        execute = _engine.execute if plan.dist is None else distributed.execute_plan
        execute(plan, self.param_groups, ok, fused_adamw=self.nonfinite == "raise")
        return True

    def _build_plan(self, key: tuple, pg) -> _engine.Plan | None:
        """The plan, with its distributed part when a process group of several ranks replicates the
        parameters (`muon.distributed.prepare`) or for row-sharded FSDP2 DTensors (over their local
        shards, `muon.distributed.sharded`); None for other DTensor layouts (`plan_mesh`) and for
        parameters on several devices, which run the loop."""
        devices, sharded = set(), False
        for index, group in enumerate(self.param_groups):
            params, grads = self._params_with_grad(group, index)  # raises on sparse gradients
            sharded = sharded or any(distributed.is_dtensor(t) for t in params + grads)
            devices.update(p.device for p in params)
        if sharded:  # FSDP2: row-sharded DTensors on one 1-D mesh run the plan over their local shards
            mesh = distributed.plan_mesh(self.param_groups)
            if mesh is None:
                return None
            plan = _engine.build_plan(self, key, self._run_for, plan_muon=distributed.plan_muon_group)
            distributed.prepare_sharded(plan, self.param_groups, mesh)
            return plan
        if len(devices) > 1:
            return None
        plan = _engine.build_plan(self, key, self._run_for)
        if pg is not None:
            distributed.prepare(plan, self.param_groups, pg)
        return plan

    def _raise_nonfinite(self, index: int, i: int):
        p = self.param_groups[index]["params"][i]
        raise RuntimeError(
            f"non-finite gradient in param_groups[{index}]['params'][{i}] (shape "
            f"{tuple(p.shape)}); nothing was updated this step"
        )

    def _loop_step(self) -> None:
        """The per-parameter reference step: every group's finite flags first, then the updates."""
        work = []
        for index, group in enumerate(self.param_groups):
            params, grads = self._params_with_grad(group, index)
            if params and group["use_muon"]:
                self._check_distributed_options(group, index, grads)
            if params:
                work.append((group, index, params, grads))
        # every mesh's ranks hold the same parameters with gradients, before any collective on them
        # (decided on all parameters: a rank without gradients must still take part)
        sharded = [p for g in self.param_groups for p in g["params"] if distributed.is_dtensor(p)]
        if sharded:
            distributed.check_sharded_plan(sharded, self.param_groups)
        flags = [self._finite_flags(params, grads) for _, _, params, grads in work]
        pg = distributed.replicated_group(self.process_group)
        if pg is not None and not sharded:
            # replicated parameters: the same plan check and flag agreement as the planned step
            flags = distributed.loop_agree(flags, self.param_groups, pg)
        work = [(*w, f) for w, f in zip(work, flags, strict=True)]
        if self.nonfinite == "raise":
            for group, index, params, _, finite in work:
                for p, flag in zip(params, finite, strict=True):
                    if flag is not None and not bool(flag):
                        self._raise_nonfinite(index, next(j for j, q in enumerate(group["params"]) if q is p))
        for group, _, params, grads, finite in work:
            if group["use_muon"]:
                self._muon_group_step(group, params, grads, finite)
            else:
                self._adamw_group_step(group, params, grads, finite)

    def _check_distributed_options(self, group: dict, index: int, grads: list[Tensor]) -> None:
        """Options the FSDP2 (DTensor) NS of `muon.distributed` does not implement: refused before any
        group is modified (replicated parameters run them on the plan)."""
        if (
            group["split"] is not None or group["heads"] is not None or group["ns_algorithm"] != "standard"
        ) and distributed.splits_work(grads, self.process_group):
            raise NotImplementedError(
                f"param_groups[{index}]: split, heads and ns_algorithm other than 'standard' are not supported "
                "yet for FSDP2 (DTensor) parameters; they work in one process and on replicated (DDP) parameters"
            )

    def _params_with_grad(self, group: dict, index: int) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"param_groups[{index}]['params'][{i}] has a sparse gradient; Muon and its AdamW "
                    "groups need dense gradients (use a dense nn.Embedding, or SparseAdam for that parameter)"
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _finite_flags(self, params, grads) -> list[Tensor | None]:
        """Per parameter: a 0-dim bool device tensor, True when its gradient is finite (None: empty)."""
        if any(distributed.is_dtensor(g) for g in grads):  # sharded: local test, agreed across ranks
            return distributed.finite_flags(grads)
        nonempty = [g for g in grads if g.numel() > 0]
        norms = iter(torch._foreach_norm(nonempty, float("inf")) if nonempty else ())
        return [next(norms).isfinite() if g.numel() > 0 else None for g in grads]

    def _muon_group_step(self, group, params, grads, finite) -> None:
        lr = _lr_value(group["lr"])
        momentum, wd, flatten = group["momentum"], group["weight_decay"], group["flatten"]
        normuon, cautious = group["variant"] == "normuon", group.get("cautious_weight_decay", False)
        schedule = resolve_schedule(group["ns_coefficients"], group["ns_steps"], group["eps"])

        updates = []
        for p, g, ok in zip(params, grads, finite):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
            if "nonfinite_skips" not in state:  # absent from a torch.optim.Muon state dict
                state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=p.device)
            if normuon and "normuon_v" not in state:  # per neuron (matrix row), in opmath
                state["normuon_v"] = torch.zeros(neuron_shape(p.shape, flatten), dtype=_opmath(p.dtype),
                                                 device=p.device)
            buf = state["momentum_buffer"]
            if ok is None:  # 0-size parameter: nothing to do
                updates.append(None)
                continue
            g = torch.where(ok, g, 0)  # a placeholder where not finite; its lerp weight is 0 below
            buf.lerp_(g, _masked(ok, 1.0 - momentum, 0.0, buf.dtype))
            state["nonfinite_skips"].add_(~ok)
            updates.append(g.lerp(buf, momentum) if group["nesterov"] else buf)

        ortho = self._orthogonalize_all(updates, params, schedule, group, flatten)

        for p, blocks, ok in zip(params, ortho, finite):
            if blocks is None:
                continue
            count, m, n = matrix_shape(p.shape, flatten)
            dtype = _opmath(p.dtype)
            decay = _masked(ok, 1 - lr * wd, 1.0, dtype) if wd != 0 else None
            # -lr·s·O rounded once to opmath, then added (not a fused addcmul): what the step engine
            # computes on a bucket's stack before one multi-tensor add into the parameters. A row
            # block (split/heads) is scaled by s(rows, n) of its own shape.
            if normuon:  # one block: split/heads groups refuse NorMuon at construction
                neg_lr_scale = _masked(ok, -lr * update_scale(group["adjust_lr_fn"], m, n), 0.0, dtype)
                v = self.state[p]["normuon_v"].view(count, m)
                update = _normuon(blocks[0][0], v, ok, neg_lr_scale, group["normuon_beta2"], group["normuon_eps"],
                                  dtype).view(p.shape)
            else:
                if len(blocks) == 1:  # the whole parameter, or its equal blocks stacked: the parameter's shape
                    blocks = [(blocks[0][0].view(p.shape), blocks[0][1])]
                scaled = [
                    torch.mul(O.to(dtype), _masked(ok, -lr * update_scale(group["adjust_lr_fn"], rows, n), 0.0, dtype))
                    for O, rows in blocks
                ]
                # several blocks: one (count, rows, n) piece each, back into the parameter's rows
                update = scaled[0] if len(scaled) == 1 else torch.cat(scaled, dim=-2).view(p.shape)
            # update = -lr·s·u: no decay where update·W > 0
            decay = _cautious(decay, update, p, against=1, cautious=cautious)
            _decay_and_add(p, decay, update, None)

    def _orthogonalize_all(self, updates, params, schedule: Schedule, group, flatten) -> list:
        """NS of every update, per parameter a list of (O, rows): one (matrices, rows, n) result per
        block of `muon._shapes.block_layout` (the whole parameter without split/heads), in the
        parameter's row order. Same-shape blocks are stacked into one batched call when batched."""
        backend = group["backend"]
        device = next((U.device for U in updates if U is not None), None)
        if device is None:
            return [None] * len(updates)
        dtype = resolve_dtype(group["ns_dtype"], device)
        if distributed.splits_work(updates, self.process_group):  # DTensors: NS split across ranks
            out = distributed.orthogonalize_all(updates, params, schedule, {**group, "ns_dtype": dtype}, flatten)
            return [None if O is None else [(O, O.shape[-2])] for O in out]
        # NS runs on the small side: tall (m > n) matrices are orthogonalized as their (contiguous)
        # transposes, so (m, n) and (n, m) matrices share one batched call; the step engine stores
        # them the same way, and both paths round alike. Blocks are laid out as the engine's stacks.
        buckets: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        pieces: dict[tuple[int, int], Tensor] = {}
        block_rows: dict[tuple[int, int], int] = {}
        tall: set[tuple[int, int]] = set()
        for i, (U, p) in enumerate(zip(updates, params)):
            if U is None:
                continue
            count, m, n = matrix_shape(p.shape, flatten)
            for j, (row, rows, matrices) in enumerate(
                block_layout(count, m, n, row_blocks(m, group["split"], group["heads"]))
            ):
                piece = U.reshape(matrices, rows, n) if row is None else U.reshape(count, m, n)[:, row : row + rows]
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
            result = orthogonalize(stack, schedule, dtype=dtype, backend=backend, algorithm=group["ns_algorithm"])
            for ij, piece in zip(members, result.split([len(pieces[ij]) for ij in members])):
                results[ij] = piece.mT if ij in tall else piece
        out: list = [None] * len(updates)
        for (i, j), O in sorted(results.items()):
            out[i] = (out[i] or []) + [(O, block_rows[i, j])]
        return out

    def _adamw_group_step(self, group, params, grads, finite) -> None:
        """torch.optim.AdamW's update (its capturable formulation: bias corrections on the device)."""
        lr = _lr_value(group["lr"])
        beta1, beta2 = group["betas"]
        wd, eps = group["weight_decay"], group["eps"]
        for p, g, ok in zip(params, grads, finite):
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if "nonfinite_skips" not in state:  # absent from a torch.optim.AdamW state dict
                state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=p.device)
            if ok is None:
                continue
            step = state["step"]
            if step.device != p.device:  # a state loaded from torch.optim.AdamW keeps step on the CPU
                step = state["step"] = step.to(p.device)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            g = torch.where(ok, g, 0)
            step.add_(ok)
            state["nonfinite_skips"].add_(~ok)
            exp_avg.lerp_(g, _masked(ok, 1 - beta1, 0.0, exp_avg.dtype))
            exp_avg_sq.mul_(_masked(ok, beta2, 1.0, exp_avg_sq.dtype)).addcmul_(g, g, value=1 - beta2)
            dtype = _opmath(p.dtype)
            # Bias corrections in fp64 for fp64 parameters (torch computes them as Python floats);
            # clamp: a parameter whose every step was skipped has t = 0 and must not divide 0 by 0.
            t = step.to(dtype).clamp_min(1)
            bias_correction1 = 1 - beta1**t
            bias_correction2_sqrt = (1 - beta2**t).sqrt()
            step_size = _masked(ok, -lr / bias_correction1, 0.0, dtype)
            # One temporary for sqrt(v̂) + eps, reused for m / (sqrt(v̂) + eps): two passes fewer than
            # out-of-place ops, same arithmetic as torch's (sqrt(v) / sqrt(bc2)) + eps.
            denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
            decay = _masked(ok, 1 - lr * wd, 1.0, dtype) if wd != 0 else None
            update = torch.div(exp_avg, denom, out=denom)  # u up to the positive lr / bias_correction1
            decay = _cautious(decay, update, p, against=-1, cautious=group.get("cautious_weight_decay", False))
            _decay_and_add(p, decay, update, step_size)
