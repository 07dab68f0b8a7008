"""Checkpoints of `muon.Muon`: state dicts that load into muon.Muon, torch.optim.Muon and
torch.optim.AdamW (and from them), validated before anything changes; pickling and deep copies."""

from __future__ import annotations

import torch
from torch import Tensor

from . import distributed, options
from .functional import dequantize_blockwise, neuron_shape, opmath, quantize_blockwise, scale_shape

# Keys of state[p] per group kind (torch.optim.Muon and torch.optim.AdamW keep subsets of these).
STATE_KEYS = {True: frozenset({"momentum_buffer", "momentum_scale", "nonfinite_skips", "normuon_v"}),
              False: frozenset({"step", "exp_avg", "exp_avg_sq", "nonfinite_skips"})}
CALLABLE = "callable:"  # prefix of the string that stands for a callable adjust_lr_fn in a state dict
# Attributes beyond torch's (defaults, state, param_groups) that the step needs; torch's
# __getstate__ drops them, so deepcopy and pickle would give an optimizer that cannot step.
# The plan and the resolved backends do not travel: they are rebuilt from the state.
PICKLED_ATTRS = ("nonfinite", "foreach", "process_group", "_adamw_defaults")
# Options added later than a pickle or state dict may be: their defaults give the behaviour of before.
NEW_OPTIONS = {"variant": "muon", "normuon_beta2": 0.95, "normuon_eps": 1e-8, "cautious_weight_decay": False,
               "ns_algorithm": "standard", "split": None, "heads": None, "transposed": False, "state_dtype": None}
# Options that describe the parameters rather than the training: a saved group without one (an older
# version's, torch.optim.Muon's) takes the value of the group it is loaded into, not the default.
LAYOUT_OPTIONS = ("transposed",)


def encode_callables(state_dict: dict) -> dict:
    """A callable adjust_lr_fn is saved as the string "callable:<module>.<qualname>" (a function is
    not data); loading it keeps the callable of the optimizer being loaded into, which must have one."""
    for group in state_dict["param_groups"]:
        fn = group.get("adjust_lr_fn")
        if callable(fn):
            name = getattr(fn, "__qualname__", type(fn).__qualname__)
            group["adjust_lr_fn"] = f"{CALLABLE}{getattr(fn, '__module__', None)}.{name}"
    return state_dict


def after_load(opt, state_dict: dict) -> None:
    """What torch's load_state_dict leaves to us: NorMuon moments in opmath, momentum and moments in
    each group's state_dtype, every group's defaults, int64 counters."""
    restore_normuon_dtype(opt, state_dict)
    restore_state_dtypes(opt, state_dict)
    # ("momentum" stays: in an AdamW group it is a scheduler's beta1, muon.options.SCHEDULED_BETA1)
    muon_only = opt.defaults.keys() - opt._adamw_defaults.keys() - {"use_muon", options.SCHEDULED_BETA1}
    for group in opt.param_groups:
        defaults = opt.defaults if group["use_muon"] else opt._adamw_defaults
        for key, value in defaults.items():
            if key != "differentiable":  # torch's __setstate__ adds it to defaults; no group of ours has it
                group.setdefault(key, value)
        if not group["use_muon"]:  # checkpoints of older versions carried Muon keys in AdamW groups
            for key in muon_only:
                group.pop(key, None)
    for state in opt.state.values():  # torch casts every loaded tensor but "step" to the parameter's dtype
        skips = state.get("nonfinite_skips")
        if skips is not None and skips.dtype != torch.int64:
            state["nonfinite_skips"] = skips.to(torch.int64)


def upgrade(opt) -> None:
    """After unpickling or torch's __setstate__: attributes and group options of older versions."""
    opt.__dict__.setdefault("nonfinite", "skip")
    opt.__dict__.setdefault("process_group", None)
    opt.__dict__.setdefault("foreach", None)
    for key, value in NEW_OPTIONS.items():
        opt.defaults.setdefault(key, value)
    for group in opt.param_groups:  # a loaded group without them takes this optimizer's defaults
        for key in NEW_OPTIONS if group.get("use_muon", True) else ("cautious_weight_decay", "state_dtype"):
            group.setdefault(key, opt.defaults[key])
    opt.__dict__.setdefault("_adamw_defaults", {"lr": opt.defaults["lr"], "betas": (0.9, 0.95), "eps": 1e-8,
                                                "weight_decay": opt.defaults["weight_decay"]})
    # The dtype hooks live in torch's hook dicts, which torch does not pickle: register them again.
    if distributed.encode_state_dict_dtypes not in opt._optimizer_state_dict_post_hooks.values():
        opt.register_state_dict_post_hook(distributed.encode_state_dict_dtypes)
    if distributed.decode_state_dict_dtypes not in opt._optimizer_load_state_dict_pre_hooks.values():
        opt.register_load_state_dict_pre_hook(distributed.decode_state_dict_dtypes)


def restore_normuon_dtype(opt, state_dict: dict) -> None:
    """torch casts loaded state to the parameter's dtype; NorMuon's second moments live in opmath
    (fp32 for bf16/fp16 parameters): take them from the state dict as saved, bit for bit."""
    for saved, group in zip(state_dict["param_groups"], opt.param_groups):
        for pid, p in zip(saved["params"], group["params"]):
            value = state_dict["state"].get(pid, {}).get("normuon_v")
            if value is not None and opt.state[p]["normuon_v"].dtype != opmath(p.dtype):
                opt.state[p]["normuon_v"] = value.to(device=p.device, dtype=opmath(p.dtype), copy=True)

def restore_state_dtypes(opt, state_dict: dict) -> None:
    """torch casts every loaded state tensor to the parameter's dtype: take the momentum (and its
    int8 scales) and AdamW's moments from the state dict as saved and convert them to the group's
    state_dtype — int8 from a float momentum is quantized (`muon.functional.quantize_blockwise`), a
    float momentum from an int8 one dequantized, bf16 rounded to nearest (a bf16 state saved and
    loaded comes back bit for bit)."""
    for saved_group, group in zip(state_dict["param_groups"], opt.param_groups):
        low = group.get("state_dtype")
        keys = ("momentum_buffer",) if group["use_muon"] else ("exp_avg", "exp_avg_sq")
        for pid, p in zip(saved_group["params"], group["params"]):
            saved = state_dict["state"].get(pid)
            state = opt.state.get(p)
            if not saved or state is None:
                continue
            for key in keys:
                value = saved.get(key)
                if value is None:
                    continue
                scale = saved.get("momentum_scale") if key == "momentum_buffer" else None
                quantized = scale is not None and value.dtype == torch.int8
                if not quantized and low is None:
                    continue  # torch's cast to the parameter's dtype is the state as saved
                if key == "momentum_buffer":
                    state.pop("momentum_scale", None)
                if quantized and low == torch.int8:  # the saved int8 state as it was
                    state[key] = value.to(device=p.device, copy=True)
                    state["momentum_scale"] = scale.to(device=p.device, dtype=torch.float32, copy=True)
                    continue
                if quantized:
                    value = _rowwise(dequantize_blockwise, value.to(p.device), scale.to(p.device, torch.float32))
                if low == torch.int8:
                    q, new_scale = _rowwise(quantize_blockwise, value.to(p.device, torch.float32))
                    state[key], state["momentum_scale"] = q, _like_rows(new_scale, q)
                else:
                    like = p.grad if key == "momentum_buffer" and p.grad is not None else p
                    state[key] = value.to(device=p.device, dtype=low or like.dtype, copy=True)


def _rowwise(fn, *tensors):
    """fn on the local rows of row-sharded DTensors (FSDP2: quantization blocks lie within rows), its
    results laid out as the first input again; plain tensors as they are."""
    if not distributed.is_dtensor(tensors[0]):
        return fn(*tensors)
    out = fn(*(t.to_local() for t in tensors))
    if isinstance(out, tuple):
        return (distributed.as_dtensor(out[0], tensors[0]), *out[1:])
    return distributed.as_dtensor(out, tensors[0])


def _like_rows(scale: Tensor, q: Tensor) -> Tensor:
    """Local int8 scales of a row-sharded DTensor momentum q as a DTensor laid out like it (rows)."""
    if not distributed.is_dtensor(q):
        return scale
    from torch.distributed.tensor import DTensor

    shape = (q.shape[0], scale.shape[-1])
    return DTensor.from_local(scale, q.device_mesh, q.placements, run_check=False, shape=shape, stride=(shape[1], 1))


def full_precision(opt, state_dict: dict) -> dict:
    """`Muon.state_dict(full_precision=True)`: the state with the momentum and moments in the dtype
    torch.optim.Muon / torch.optim.AdamW keep (the gradient's / parameter's): int8 momentum
    dequantized (its scales dropped), bf16 state upcast. What torch's optimizers load."""
    params = [p for group in opt.param_groups for p in group["params"]]
    ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
    for pid, p in zip(ids, params):
        saved = state_dict["state"].get(pid)
        if not saved:
            continue
        # torch's state dict holds the optimizer's own per-parameter dicts: a copy, never them
        saved = state_dict["state"][pid] = dict(saved)
        scale = saved.pop("momentum_scale", None)
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            value = saved.get(key)
            if value is None:
                continue
            if scale is not None and key == "momentum_buffer":
                value = dequantize_blockwise(value, scale)
            like = p.grad if key == "momentum_buffer" and p.grad is not None else p
            saved[key] = value.to(like.dtype)
    return state_dict


def checked_state_dict(opt, state_dict: dict) -> dict:
    """A copy of state_dict with each group's kind (and callable adjust_lr_fn) resolved; raises on misfits."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (Optimizer.state_dict())")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, opt.param_groups)
    ):
        return state_dict  # torch's own check names the mismatch
    decoded = distributed.decode_state_dict_dtypes(opt, state_dict)["param_groups"]
    groups = []
    for index, (saved, current, group) in enumerate(zip(saved_groups, opt.param_groups, decoded)):
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
        # how the state is stored is this optimizer's choice: a saved state of another state_dtype is
        # converted to it (`restore_state_dtypes`)
        group = {**group, "use_muon": kind, "state_dtype": current.get("state_dtype")}
        if kind:
            for key in LAYOUT_OPTIONS:
                if key not in group and key in current:
                    group[key] = current[key]
        fn = group.get("adjust_lr_fn")
        if isinstance(fn, str) and fn.startswith(CALLABLE):
            if not callable(current.get("adjust_lr_fn")):
                raise ValueError(
                    f"{where} was saved with a callable adjust_lr_fn ({fn[len(CALLABLE):]}); build the "
                    "optimizer with that callable before loading (functions are not saved in checkpoints)"
                )
            group["adjust_lr_fn"] = current["adjust_lr_fn"]
        merged = {**(opt.defaults if kind else {**opt.defaults, **opt._adamw_defaults}), **group}
        try:
            options.check_group({**merged, "params": current["params"]}, index)
        except ValueError as error:
            raise ValueError(f"cannot load {where}: {error}") from None
        check_saved_state(state_dict["state"], saved["params"], current["params"], kind, where,
                          flatten=merged.get("flatten", False), transposed=merged.get("transposed", False))
        groups.append(group)
    return {**state_dict, "param_groups": groups}

def check_saved_state(state: dict, ids: list, params: list, kind: bool, where: str, flatten: bool = False,
                      transposed: bool = False) -> None:
    allowed = STATE_KEYS[kind]
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
            quantized = key == "momentum_buffer" and value.dtype == torch.int8 and "momentum_scale" in saved
            if key in ("momentum_buffer", "exp_avg", "exp_avg_sq") and (
                tuple(value.shape) != tuple(p.shape) or not (value.is_floating_point() or quantized)
            ):
                raise ValueError(
                    f"{at}: {key} is {tuple(value.shape)} {value.dtype}, the parameter is {tuple(p.shape)}"
                )
            if key == "normuon_v" and (
                tuple(value.shape) != neuron_shape(p.shape, flatten, transposed) or not value.is_floating_point()
            ):
                raise ValueError(
                    f"{at}: normuon_v is {tuple(value.shape)} {value.dtype}, NorMuon keeps one entry per "
                    f"matrix row of the parameter: {neuron_shape(p.shape, flatten, transposed)}"
                )
            if key == "momentum_scale" and (
                tuple(value.shape) != scale_shape(p.shape) or saved.get("momentum_buffer") is None
                or saved["momentum_buffer"].dtype != torch.int8
            ):
                raise ValueError(
                    f"{at}: momentum_scale {tuple(value.shape)} goes with an int8 momentum_buffer of the parameter's "
                    f"shape and has one scale per block of {scale_shape(p.shape)}"
                )
            if key in ("step", "nonfinite_skips") and value.numel() != 1:
                raise ValueError(f"{at}: {key} must have one element, got shape {tuple(value.shape)}")

