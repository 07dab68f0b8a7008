"""How a parameter is seen as matrices, and the lr factor of an m×n update (no muon imports: optim,
distributed and flops all use these)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

ADJUST_LR_FNS = ("original", "match_rms_adamw", "spectral")


def update_scale(adjust_lr_fn: str | Callable | None, m: int, n: int) -> float:
    """The factor s(m, n) multiplying lr for an m×n (fan_out × fan_in) orthogonalized update.

    "original" (Keller, the default): sqrt(max(1, m/n)); "match_rms_adamw" (Moonlight):
    0.2·sqrt(max(m, n)), so AdamW's lr and weight decay carry over; "spectral" (muP-style):
    sqrt(m/n). A callable gets (m, n) and returns the factor: a finite real number >= 0 (a Python or
    NumPy number, or a one-element real tensor), else a ValueError. The optimizer calls it for every
    matrix of a group when the group is added, so a bad factor never surfaces mid-step.
    """
    if callable(adjust_lr_fn):
        value = adjust_lr_fn(m, n)
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
            value, real = value.item(), True
        # 0 is allowed, like lr = 0 (the matrix then only decays); negative would ascend the loss.
        if not (real and math.isfinite(value) and value >= 0):
            raise ValueError(f"adjust_lr_fn({m}, {n}) returned {value!r}; it must return a finite number >= 0")
        return float(value)
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, m / n))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if adjust_lr_fn == "spectral":
        return math.sqrt(m / n)
    raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, None or a callable, got {adjust_lr_fn!r}")


def matrix_shape(shape: torch.Size, flatten: bool) -> tuple[int, int, int]:
    """(batch, m, n): how a parameter of `shape` is seen as a stack of matrices.

    2-D: one matrix. More dims: the leading dims are a batch of independent matrices (MoE experts
    stacked as (E, out, in)), or with flatten=True one (shape[0], prod(rest)) matrix (conv weights).
    """
    if len(shape) == 2 or flatten:
        rest = math.prod(shape[1:])
        return 1, shape[0], rest
    return math.prod(shape[:-2]), shape[-2], shape[-1]
