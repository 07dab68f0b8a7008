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


def matrix_shape(shape: torch.Size, flatten: bool, transposed: bool = False) -> tuple[int, int, int]:
    """(batch, m, n): how a parameter of `shape` is seen as a stack of m×n (fan_out × fan_in) matrices.

    2-D: one matrix. More dims: the leading dims are a batch of independent matrices (MoE experts
    stacked as (E, out, in)), or with flatten=True one (shape[0], prod(rest)) matrix (conv weights).
    transposed=True: each matrix is stored (in, out), the transpose of nn.Linear's (out, in)
    (transformers' Conv1D, GPT-2's c_attn/c_proj/c_fc): the matrix is read as that transpose, so
    m is the last dim. It does not combine with flatten=True on more than 2 dims (`muon.options`).
    """
    if len(shape) == 2 or flatten:
        rest = math.prod(shape[1:])
        return (1, rest, shape[0]) if transposed else (1, shape[0], rest)
    count = math.prod(shape[:-2])
    return (count, shape[-1], shape[-2]) if transposed else (count, shape[-2], shape[-1])


def stored_matrix_shape(shape: torch.Size, flatten: bool, transposed: bool = False) -> tuple[int, int, int]:
    """(batch, rows, cols) of the matrices as they lie in memory: `matrix_shape` with m and n swapped
    back for a transposed parameter (what a contiguous parameter can be viewed as)."""
    count, m, n = matrix_shape(shape, flatten, transposed)
    return (count, n, m) if transposed else (count, m, n)


def row_blocks(m: int, split=None, heads: int | None = None) -> tuple[int, ...]:
    """Row counts of the blocks an m-row matrix is orthogonalized as: `split` (sizes summing to m),
    `heads` (m // heads rows each) or the whole matrix. Checked by the optimizer when a group is added."""
    if split is not None:
        return tuple(int(r) for r in split)
    if heads is not None:
        return (m // heads,) * heads
    return (m,)


def block_layout(count: int, m: int, n: int, sizes: tuple[int, ...]) -> list[tuple[int | None, int, int]]:
    """How `count` m×n matrices cut into row blocks of `sizes` are stacked for NS: a list of
    (first row, rows, matrices). first row None: the parameter itself is the contiguous
    (matrices, rows, n) stack of its blocks (one block, or equal blocks that are not tall), so the
    step engine keeps its momentum as a view of the bucket's stack. Otherwise one entry per block,
    each (count, rows, n), block j of every matrix in order."""
    if len(sizes) == 1 or (len(set(sizes)) == 1 and sizes[0] <= n):
        return [(None, sizes[0], count * len(sizes))]
    layout, row = [], 0
    for r in sizes:
        layout.append((row, r, count))
        row += r
    return layout
