"""State-dict hooks: torch.dtype group options (ns_dtype) travel as strings, so that
torch.distributed.checkpoint's full-state-dict gather, which accepts only tensors, numbers,
strings, lists and dicts, can carry them."""

from __future__ import annotations

import torch


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
        for key in ("ns_dtype", "state_dtype"):
            value = group.get(key)
            if isinstance(value, str) and value.startswith("torch."):
                dtype = getattr(torch, value[len("torch.") :], None)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"state_dict param_groups has {key}={value!r}, not a torch dtype")
                group[key] = dtype
        groups.append(group)
    return {**state_dict, "param_groups": groups}
