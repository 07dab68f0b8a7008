"""The Muon optimizer: a drop-in for torch.optim.Muon, with AdamW groups, batching and fast backends.

The class validates (`muon.options`) and packs; the math lives in `muon.functional`, the planned
multi-tensor step in `muon.engine` (the one step implementation; its oracle, the per-parameter loop,
is tests/reference_loop.py), the distributed NS phases in `muon.distributed`, checkpoints in
`muon.serialization`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed, engine, options, serialization
from ._shapes import matrix_shape, update_scale
from .coefficients import KELLER

__all__ = ["Muon", "matrix_shape", "update_scale"]


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
        weights) one (shape[0], -1) matrix; ``flatten=None`` (the default) is False for 3-D parameters
        (MoE expert stacks) and an error for a parameter with 4 or more dims, whose group must choose
        (a conv weight is one (out, in·kh·kw) matrix to Keller Jordan's Muon, not a batch of kh×kw ones);
      * same-shape matrices of a group are stacked into one batched NS call (``batched=True``);
      * ``ns_coefficients`` also takes a preset name ("keller", "you", "polar_express", "cans") or a
        list of per-step tuples; ``adjust_lr_fn`` also takes "spectral" or a callable (m, n) -> factor;
      * ``backend`` ("auto", "torch", "triton", "cuda"; an unusable one is a ValueError naming the
        group when it is added) and ``ns_dtype`` ("auto": bf16 on CUDA, fp32 on the CPU) pick the NS;
      * ``variant="normuon"`` (per group): NorMuon (arXiv 2510.05491, as microsoft/dion's
        dion/normuon.py): each row (output neuron) of O is divided by sqrt(v) + ``normuon_eps``, v an
        EMA (``normuon_beta2``, no bias correction) of the row's mean of O², kept in
        `state[p]["normuon_v"]` (the parameter's shape without its last dim, fp32 or fp64); then the
        Frobenius norm of O is restored and Muon's lr·s applies. Formula: `muon.functional.normuon_update`;
      * ``cautious_weight_decay=True`` (per group, Muon and AdamW): weight decay only where the update
        u (W -= lr·u) and W agree in sign, u·W >= 0 (arXiv 2510.12402);
      * ``ns_algorithm`` picks standard ("standard", the default) or Gram ("gram") Newton–Schulz, or
        "auto": per bucket of same-shape matrices, `muon.backends.dispatch.choose_algorithm` for the
        bucket's shape, device and resolved ns_dtype (Gram needs a backend that has it: torch, triton);
      * ``split`` (row counts summing to the rows, e.g. [d, d, d] for a fused QKV weight) or ``heads``
        (N equal row blocks): each row block is orthogonalized and scaled (s(rows, n)) exactly as a
        separate parameter of its shape; state stays per parameter (see docs, "split");
      * ``transposed=True`` (per group): the parameters store their matrices (in, out), the transpose
        of nn.Linear's (out, in), as transformers' Conv1D does (GPT-2's c_attn, c_proj, c_fc;
        `muon.param_groups` finds those): every matrix is read as its transpose, so the update scale,
        NorMuon's neurons, split/heads rows and the NS are those of the same layer written with
        nn.Linear, and the update comes out the transpose of that layer's, bit for bit.

    The step (``foreach=None`` or True) runs a plan made once (`muon.engine`): per group, buckets of
    same-shape matrices ((m, n) and (n, m) together) with one stacked momentum buffer each, a fixed
    handful of batched launches per bucket, AdamW through torch's multi-tensor/fused kernels, no
    host sync (with nonfinite="skip"); it can be captured by torch.compile or CUDA graphs. The plan
    never disagrees with ``opt.state``: clearing or replacing the state, assigning a state tensor or
    loading a state dict takes effect at the next step, as with torch.optim.

    A step is atomic: it computes everything first and writes parameters and state only after every
    NS, collective and check succeeded, so a step that raises (a backend error, an out-of-memory, a
    non-finite gradient with nonfinite="raise", a KeyboardInterrupt in the NS) leaves every
    parameter and state tensor bit-identical, and a refused first step creates no state.
    ``foreach=False`` runs the same plan in its smallest chunks (two matrices of a Muon bucket, one
    AdamW parameter at a time): the same bits, the smallest workspace, more launches.

    Non-finite gradients (``nonfinite``): with "skip" (the default) a parameter whose gradient has a
    NaN or inf is left untouched that step, parameter and optimizer state alike, and
    `state[p]["nonfinite_skips"]` counts such steps; the test runs on the device, without a host sync.
    With "raise" the step raises a RuntimeError naming the parameter before any group is modified
    (one host sync per step).

    Under torch.distributed the NS work is split across ranks (`muon.distributed`): replicated
    (DDP) parameters over ``process_group`` (default: the world once initialized) and DTensors
    (FSDP2, FSDP2 × TP, HSDP, uneven shards) over their mesh run on the plan; a layout the plan does
    not take is an error naming the parameter (``foreach=False`` runs DTensors of any layout on the
    plan with every full matrix gathered on every rank, `muon.distributed.gathered`).
    Every multi-rank step agrees the plan and the finite flags first (one host sync), so a NaN on
    one rank skips the parameter everywhere and a gradient missing on one rank is a
    DistributedStepError on every rank.
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
        flatten: bool | None = None,
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
        transposed: bool = False,
        atomic: bool = True,
        chunk_bytes: int | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        options.check_options(nonfinite, foreach, atomic, chunk_bytes)
        options.check_process_group(process_group)
        self.nonfinite = nonfinite
        # None or True: the planned, batched step (muon.engine); False: the same in its smallest chunks
        # (DTensors: one bucket per parameter, every full matrix gathered on every rank)
        self.foreach = foreach
        # True: a step that raises changes nothing (its updates are held until every bucket is computed);
        # False: each bucket is committed as soon as it is computed (the smallest footprint)
        self.atomic = atomic
        # the bound of a chunk of stacked gradients the step computes at once (None: the device's default,
        # muon.engine.default_chunk_bytes)
        self.chunk_bytes = chunk_bytes
        # Replicated parameters split their NS over this group (None: the default group once
        # torch.distributed is initialized); FSDP2 (DTensor) parameters use their own mesh.
        self.process_group = process_group
        self._plan: engine.Plan | None = None
        self._plan_version = 0  # bumped when groups change
        # AdamW groups take these where the group does not set them.
        self._adamw_defaults = {"lr": lr, "betas": betas, "eps": adamw_eps, "weight_decay": weight_decay,
                                "cautious_weight_decay": cautious_weight_decay,
                                "state_dtype": None if state_dtype == torch.int8 else state_dtype}
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_coefficients=ns_coefficients,
            eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, use_muon=True, flatten=flatten, batched=batched,
            backend=backend, ns_dtype=ns_dtype, variant=variant, normuon_beta2=normuon_beta2,
            normuon_eps=normuon_eps, cautious_weight_decay=cautious_weight_decay, ns_algorithm=ns_algorithm,
            split=list(split) if isinstance(split, tuple) else split, heads=heads, transposed=transposed,
            state_dtype=state_dtype,
        )  # fmt: skip
        super().__init__(params, defaults)
        # ns_dtype travels as a string, so distributed full-state-dict checkpoints can carry it
        self.register_state_dict_post_hook(distributed.encode_state_dict_dtypes)
        self.register_load_state_dict_pre_hook(distributed.decode_state_dict_dtypes)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group, validated (`muon.options`): a group that fails leaves the optimizer unchanged.
        AdamW groups (use_muon=False) take the AdamW defaults and carry only AdamW keys."""
        self._plan_version = getattr(self, "_plan_version", 0) + 1
        group, index = dict(param_group), len(self.param_groups)
        use_muon = group.get("use_muon", True)
        if not isinstance(use_muon, bool):
            raise ValueError(f"param_groups[{index}]: use_muon must be True or False, got {use_muon!r}")
        muon_keys = set(self.defaults) - {"differentiable"}
        options.check_keys(group, index, muon_keys, set(self._adamw_defaults))
        if not use_muon:
            for key, value in self._adamw_defaults.items():
                group.setdefault(key, value)
        group["use_muon"] = use_muon
        if "params" in group and not isinstance(group["params"], (Tensor, set)):
            group["params"] = list(group["params"])  # a generator is read once, here
        options.check_unique(self.param_groups, group.get("params", ()))
        given = set(group)
        super().add_param_group(group)
        added = self.param_groups[-1]
        if not use_muon:  # torch filled in every default; the Muon-only ones do not belong here
            for key in muon_keys - set(self._adamw_defaults) - given - {"use_muon"}:
                added.pop(key, None)
        try:
            options.check_group(added, index)
        except Exception:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            if not group["use_muon"] and options.SCHEDULED_BETA1 in group:
                # a momentum-cycling scheduler's value is this AdamW group's beta1 (muon.options)
                options.check_real(group, options.SCHEDULED_BETA1, index, 0.0, 1.0, open_high=True)
                group["betas"] = (group[options.SCHEDULED_BETA1], group["betas"][1])
        self._planned_step()
        return loss

    def _planned_step(self) -> None:
        """Every group's update through the plan (`muon.engine`), built when the groups or the options
        that shape it changed."""
        # the replicated process group is part of the key: a plan for one process is not a plan
        # for many (torch.distributed initialized after a first step, process_group reassigned)
        pg = distributed.replicated_group(self.process_group)
        # so are the options that shape it (foreach=False's chunks, atomic=False's buckets, chunk_bytes)
        key = (engine.plan_key(self.param_groups, self._plan_version), pg, self.foreach is False,
               getattr(self, "atomic", True), getattr(self, "chunk_bytes", None))
        plan = self._plan
        if plan is None or plan.key != key:
            self._plan = None  # a build that raises leaves no stale plan behind
            plan = self._plan = self._build_plan(key, pg)
        ok = engine.finite_flags(plan)
        if plan.dist is not None:  # all ranks hold the same plan; the flags agreed (one host sync)
            ok = distributed.agree_plan(plan, ok)
        if ok is not None and self.nonfinite == "raise":
            bad = engine.first_nonfinite(plan, ok)  # a host sync
            if bad is not None:
                options.raise_nonfinite(self.param_groups, *bad)
            ok = None  # every gradient is finite: no masking
        ns_phase = None if plan.dist is None else plan.dist.ns_phase
        engine.execute(plan, self.param_groups, self.state, ok, self.nonfinite == "raise", ns_phase,
                       getattr(self, "atomic", True))

    def _build_plan(self, key: tuple, pg) -> engine.Plan:
        """The plan, with its distributed NS phase when a process group of several ranks replicates
        the parameters, or for DTensors (`muon.distributed`: the owner plan over their shards, or under
        foreach=False every full matrix gathered). Parameters on several devices get a bucket per
        device (in one process only)."""
        devices, sharded = set(), False
        for index, group in enumerate(self.param_groups):
            params, grads = options.params_with_grad(group, index)  # raises on sparse gradients
            sharded = sharded or any(distributed.is_dtensor(t) for t in params + grads)
            devices.update(p.device for p in params)
        # the bound of a chunk, one process's and the distributed NS phases' (None: no gradient; dynamo
        # traces min() only without its default argument)
        chunk = getattr(self, "chunk_bytes", None)
        if chunk is None and devices:
            chunk = min(map(engine.default_chunk_bytes, devices))
        if sharded and self.foreach is False:  # every layout: each full matrix gathered on every rank
            distributed.check_options(self.param_groups)
            plan = engine.build_plan(self.param_groups, key, self._resolve_run, chunk_bytes=1,
                                     chunk_buckets=not getattr(self, "atomic", True),
                                     plan_muon=distributed.plan_gathered)  # fmt: skip
            distributed.prepare_gathered(plan, self.param_groups)
            return plan
        if sharded:  # DTensors (FSDP2, TP, HSDP): the plan over their local shards, or a clear error
            view = distributed.plan_mesh(self.param_groups)
            try:
                plan = engine.build_plan(self.param_groups, key, self._resolve_run,
                                         plan_muon=distributed.planner_for(view))
            except distributed.LocalShardMismatch as exc:  # known on this rank only: every rank raises
                distributed.refuse(view, self.param_groups, str(exc))
            distributed.prepare_sharded(plan, self.param_groups, view, chunk)  # owners' NS in chunks
            return plan
        if len(devices) > 1 and pg is not None:
            raise NotImplementedError(
                f"parameters on several devices ({', '.join(sorted(map(str, devices)))}) with a process group of "
                f"{torch.distributed.get_world_size(pg)} ranks: a replicated step keeps one device per process "
                "(as DistributedDataParallel does)"
            )
        # a distributed NS phase takes whole buckets; one process stacks them chunk by chunk
        # (foreach=False: the smallest chunks, two matrices of a Muon bucket or one AdamW parameter)
        chunk_bytes = None
        if pg is None and devices:
            chunk_bytes = 1 if self.foreach is False else chunk
        plan = engine.build_plan(self.param_groups, key, self._resolve_run, chunk_bytes=chunk_bytes,
                                 chunk_buckets=not getattr(self, "atomic", True))
        if pg is not None:  # each rank's NS rows in chunks, as one process chunks its buckets
            distributed.prepare(plan, self.param_groups, pg, chunk)
        return plan

    def _resolve_run(self, index: int, group: dict, X: Tensor, ns_dtype: torch.dtype, schedule):
        """(algorithm, kernel) of a bucket whose stacks look like X, chosen once when the plan is built
        (`muon.backends.plan_kernel`); the plan keeps the kernel and calls it every step."""
        return options.kernel_for(group, index, X, ns_dtype, schedule.steps)

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self, full_precision: bool = False) -> dict:
        """torch's state dict, holding only types torch.load(weights_only=True) accepts
        (`muon.serialization.encode_callables`). The state is as kept (a group's state_dtype: bf16, or
        int8 momentum with its `momentum_scale`); full_precision=True gives it in the dtypes
        torch.optim.Muon and torch.optim.AdamW keep, to load into them (`muon.serialization.full_precision`)."""
        state_dict = serialization.encode_callables(super().state_dict())
        return serialization.full_precision(self, state_dict) if full_precision else state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from muon.Muon, torch.optim.Muon or torch.optim.AdamW, validated first.

        A group without ``use_muon`` (torch's) keeps the kind of this optimizer's group at its position:
        torch.optim.Muon state loads into Muon groups, torch.optim.AdamW state into AdamW groups. A group
        of the other kind, state keys the group does not keep (exp_avg in a Muon group,
        momentum_buffer in an AdamW group), wrong shapes and invalid hyperparameters are a ValueError,
        and a load that fails leaves the optimizer unchanged.
        """
        super().load_state_dict(serialization.checked_state_dict(self, state_dict))
        serialization.after_load(self, state_dict)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in serialization.PICKLED_ATTRS if key in self.__dict__})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # also called by load_state_dict with state and param_groups only
        serialization.upgrade(self)
        self._plan = None
        self._plan_version = self.__dict__.get("_plan_version", 0) + 1

    def __deepcopy__(self, memo: dict) -> Muon:
        # A process group is a live communicator: the copy shares it (deep-copying one fails).
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone
