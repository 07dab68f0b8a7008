"""Every formula of a Muon step, once: the step engine (`muon.engine`), the distributed phases
(`muon.distributed`) and the tests' per-parameter reference loop (tests/reference_loop.py) all
import these.

Each function computes new values without writing optimizer state or parameters: a step first
computes everything (momentum, NS, NorMuon moments, AdamW moments, decay factors) into new or
scratch tensors, and only then commits it with in-place copies and adds (`commit_*`), so a step
that raises on the way changes nothing (see `muon.engine.step`).

Scalars that differ per parameter (lr·s, decay, lerp weights of skipped parameters) are 0-dim or
(P,) device tensors built with `masked`, never host values read back, so a step has no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-step scalars are applied in: fp64 for fp64 tensors, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scalar(value: float, dtype: torch.dtype, device) -> Tensor:
    """A 0-dim device tensor of a Python number, rounded once from double (as torch.full does)."""
    return torch.full((), value, dtype=dtype, device=device)


def masked(ok: Tensor | None, value, otherwise: float, dtype: torch.dtype, device, const=scalar) -> Tensor:
    """A device tensor: `value` where ok, else `otherwise` (ok None: every parameter is finite).

    ok is 0-dim or (P,) bool; value a Python number (rounded once from double, as a scalar argument
    is, through torch.full), a 0-dim tensor or a tensor broadcastable against ok. Never a host sync.
    const(value, dtype, device): makes the 0-dim tensors of Python numbers (a step may reuse them).
    """
    if not isinstance(value, Tensor):
        value = const(value, dtype, device)
    else:
        value = value.to(device=device, dtype=dtype)
    if ok is None:
        return value
    return torch.where(ok, value, otherwise if const is scalar else const(otherwise, dtype, device))


def as_list(values: Tensor) -> list[Tensor] | Tensor:
    """Per-parameter 0-dim scalars for a multi-tensor op: one tensor for all, or a list of views."""
    return list(values.unbind()) if values.ndim else values


# ------------------------------------------------------------------------------------- state
def state_dtype(key: str, p: Tensor, low: torch.dtype | None = None) -> torch.dtype:
    """The dtype of state entry `key` of parameter p: momentum and moments in the gradient's /
    parameter's dtype (as torch.optim.Muon and AdamW keep them) or the group's `state_dtype` (low:
    bf16, or int8 for the momentum, with its fp32 `momentum_scale`), NorMuon's moments in opmath,
    torch's fp32 `step`, an int64 skip counter."""
    if key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        if low is not None:
            return low
        return (p.grad if key == "momentum_buffer" and p.grad is not None else p).dtype
    return {"normuon_v": opmath(p.dtype), "step": torch.float32, "nonfinite_skips": torch.int64,
            "momentum_scale": torch.float32}[key]


def check_state(key: str, p: Tensor, value: Tensor | None, where: str, low: torch.dtype | None = None) -> None:
    """Refuse state entry `key` of parameter p (`where`: "param_groups[i]['params'][j]") that the
    step could only use by casting it: every path (the engine's plan, the reference loop) calls this
    for every entry it reads or creates, before anything is written.

    The rule: a state tensor has the dtype a fresh one would get (`state_dtype`), as torch.optim
    requires (torch.optim.Muon's momentum lerp and AdamW's moment lerp raise on a state of another
    dtype than the gradient; fused AdamW on any mismatch). The counters are exempt (torch keeps
    `step` as loaded; the step engine copies their values). An AdamW group also needs the gradient
    in the parameter's dtype (its moments are kept in the parameter's dtype and take the gradient
    in, as torch's fused AdamW requires). 0-element parameters are never updated: never refused.
    value: the state's tensor (its local shard for a DTensor), None where a fresh one is made;
    low: the group's state_dtype.
    """
    if key in ("step", "nonfinite_skips") or p.numel() == 0:
        return
    grad = p.grad
    if key in ("exp_avg", "exp_avg_sq") and grad is not None and grad.dtype != p.dtype:
        raise ValueError(
            f"{where} (shape {tuple(p.shape)}) is {p.dtype} but its gradient is {grad.dtype}: an AdamW group "
            "(use_muon=False) keeps its moments in the parameter's dtype and needs the gradient in it too (as "
            "torch.optim.AdamW does); nothing was updated this step"
        )
    if value is None:
        return
    expected = state_dtype(key, p, low)
    if value.dtype != expected:
        what = f"{p.dtype}" if grad is None or grad.dtype == p.dtype else f"{p.dtype} with a {grad.dtype} gradient"
        raise ValueError(
            f"{where} (shape {tuple(p.shape)}): state[{key!r}] is {value.dtype}, but the parameter is {what}, "
            f"for which {key} is kept in {expected} (did its dtype change after the state was made, e.g. "
            f"p.data = p.data.to(...)?). The step would have to cast the state, as torch.optim refuses to: "
            f"reset its state with `del opt.state[p]`, or convert it: opt.state[p][{key!r}] = "
            f"opt.state[p][{key!r}].to({expected}); nothing was updated this step"
        )


def zero_state(key: str, p: Tensor, flatten: bool = False, transposed: bool = False,
               low: torch.dtype | None = None) -> Tensor:
    """A fresh state entry of parameter p, the value every path starts from (stacks in the engine
    are zeros of the same dtype); flatten/transposed: the group's, for the shape of `normuon_v`;
    low: its state_dtype (int8 momentum: zeros and zero scales, one per block of the stored last dim)."""
    if low is not None and key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        return torch.zeros_like(p, dtype=low, memory_format=torch.contiguous_format)  # a DTensor stays one
    if key == "momentum_scale":
        if type(p).__name__ == "DTensor":  # row-sharded (or replicated) like the parameter: its rows' scales
            from torch.distributed.tensor import DTensor

            local = p.to_local()
            shape = scale_shape(p.shape)
            return DTensor.from_local(torch.zeros(scale_shape(local.shape) if local.dim() else (0, shape[1]),
                                                  dtype=torch.float32, device=local.device),
                                      p.device_mesh, p.placements, shape=shape, stride=(shape[1], 1))
        return torch.zeros(scale_shape(p.shape), dtype=torch.float32, device=p.device)
    if key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        like = p.grad if key == "momentum_buffer" and p.grad is not None else p
        return torch.zeros_like(like, memory_format=torch.preserve_format)
    shape = neuron_shape(p.shape, flatten, transposed) if key == "normuon_v" else ()
    return torch.zeros(shape, dtype=state_dtype(key, p), device=p.device)


# ------------------------------------------------------------------------------ Muon momentum
def muon_momentum(buf: Tensor, G: Tensor, weight: Tensor, momentum: float, nesterov: bool,
                  scratch: bool = False) -> tuple[Tensor, Tensor]:
    """torch.optim.Muon's momentum, without writing the buffer: (next buffer, NS input U).

        B' = lerp(B, G, 1 - momentum)          (weight: 1 - momentum, 0 for a skipped parameter)
        U  = lerp(G, B', momentum) if nesterov else B'

    G is scratch (the gathered, sanitized gradient): with nesterov it is overwritten by U.
    `torch.lerp(B, G, w)` is bit for bit `B.lerp_(G, w)`; the caller commits B' with a copy.
    scratch: buf is a stacked copy too, and B' is computed in its place (one temporary fewer).
    A gradient of another dtype than buf (bf16 gradients, a state_dtype momentum read in fp32) is
    upcast first.
    """
    if G.dtype != buf.dtype:
        G = G.to(buf.dtype)
    nxt = buf.lerp_(G, weight) if scratch else torch.lerp(buf, G, weight)
    return nxt, (G.lerp_(nxt, momentum) if nesterov else nxt)


# ------------------------------------------------------------------------- low-precision state
# `state_dtype` of a group: None (the gradient's / parameter's dtype, as torch keeps it), torch.bfloat16
# (Muon momentum and AdamW moments in bf16, rounded to nearest), torch.int8 (Muon momentum blockwise
# absmax-linear quantized: `state[p]["momentum_buffer"]` int8 of the parameter's shape and
# `state[p]["momentum_scale"]` fp32, one scale per block). Arithmetic always runs in fp32 (fp64 for
# fp64 parameters): the state is dequantized, advanced, and requantized at the commit.
LOW_PRECISION = (torch.bfloat16, torch.int8)
QUANT_BLOCK = 256  # elements of a quantization block, along the last dim of the stored parameter
QUANT_MAX = 127.0


def quant_blocks(n: int, block: int = QUANT_BLOCK) -> int:
    """Blocks of a row of n elements (the last one may be shorter)."""
    return -(-n // block)


def scale_shape(shape: torch.Size | tuple) -> tuple[int, int]:
    """The shape of `momentum_scale` of a parameter of `shape` (as stored): its rows (dim 0: an output
    row, an expert) each cut into blocks of `QUANT_BLOCK` elements, one scale per block."""
    shape = tuple(shape)
    row = 1
    for size in shape[1:]:
        row *= size
    return (shape[0], quant_blocks(row))


def quantize_blockwise(x: Tensor, block: int = QUANT_BLOCK) -> tuple[Tensor, Tensor]:
    """x (rows, ...) -> (q int8 of x's shape, scale fp32 (rows, ceil(row / block))): each row (dim 0,
    the rest flattened) cut into blocks of `block` consecutive elements (the last one may be
    shorter); per block scale = absmax / 127 and q = round(x / scale) (round half to even; a block of
    zeros has scale 0 and q 0). Blocks never cross a row, so row-sharded parameters (FSDP2's dim 0)
    hold whole blocks. |x - dequantize(q, scale)| <= scale / 2 elementwise, up to the fp32 rounding
    of x / scale."""
    rows = x.shape[0]
    xf = x.float().reshape(rows, -1)
    n = xf.shape[1]
    nb = quant_blocks(n, block)
    if nb * block != n:
        xf = torch.nn.functional.pad(xf, (0, nb * block - n))
    xb = xf.view(rows, nb, block)
    scale = xb.abs().amax(-1) / QUANT_MAX
    q = torch.where(scale.unsqueeze(-1) > 0, xb / scale.unsqueeze(-1), 0.0).round_().clamp_(-QUANT_MAX, QUANT_MAX)
    q = q.to(torch.int8).view(rows, nb * block)[:, :n]
    return q.reshape(x.shape), scale


def dequantize_blockwise(q: Tensor, scale: Tensor, block: int = QUANT_BLOCK) -> Tensor:
    """The fp32 values of `quantize_blockwise`'s (q, scale): q · the scale of its block, q's shape."""
    rows, nb = scale.shape
    qf = q.float().reshape(rows, -1)
    n = qf.shape[1]
    if nb * block != n:
        qf = torch.nn.functional.pad(qf, (0, nb * block - n))
    x = (qf.view(rows, nb, block) * scale.unsqueeze(-1)).view(rows, nb * block)[:, :n]
    return x.reshape(q.shape)


def read_momentum(buf: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The momentum in `dtype` (opmath) from its stored form: bf16 upcast, int8 dequantized."""
    if scale is not None:
        return dequantize_blockwise(buf, scale).to(dtype)
    return buf.to(dtype)


def store_momentum(nxt: Tensor, state_dtype: torch.dtype, ok: Tensor | None = None,
                   old: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
    """The next momentum (opmath) in its stored form, to be copied into the state at the commit:
    (bf16 rounded to nearest, None) or (int8, its scales). A skipped parameter (ok False; old: its
    stored (q, scale)) keeps them bit for bit: requantizing the dequantized value could move a scale
    by an ulp (bf16 needs nothing: its upcast value rounds back to itself)."""
    if state_dtype != torch.int8:
        return nxt.to(state_dtype), None
    q, scale = quantize_blockwise(nxt)
    if ok is not None:
        q, scale = torch.where(ok, q, old[0]), torch.where(ok, scale, old[1])
    return q, scale


# ------------------------------------------------------------------------------------ NorMuon
def normuon_update(
    X: Tensor, scale: Tensor, beta2: float, eps: float, rows: Tensor | None, cols: Tensor | None = None,
    row_matrices: Tensor | None = None, ok_mat: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """NorMuon (Li et al. 2025, arXiv 2510.05491, Algorithm 1; as microsoft/dion's dion/normuon.py):
    X (B, s, l), O in opmath, becomes (-lr·s)·O' in place; returns the next moments (rows', cols').

        q = mean over each neuron of O²                (a neuron: a row of the m×n matrix)
        v = β2·v + (1 - β2)·q                          (normuon_v; no bias correction)
        d = sqrt(v) + eps
        O' = (O / d) · ‖O‖_F / max(‖O / d‖_F, eps)     (neurons normalized, Frobenius norm of O kept)

    The norms come from q: ‖O‖²_F = n·Σq and ‖O/d‖²_F = n·Σ q/d², so after the squares and their
    means everything per matrix is arithmetic on (B, m) vectors. rows (B, s): moments of matrices
    whose neurons are stack rows; cols (B, l): of matrices stored transposed (neurons are stack
    columns); row_matrices (B, 1) bool says which is which when both are present. Skipped matrices
    (ok_mat False) keep v; their scale is 0. The moments are returned, not written.
    """
    sq = X.square()
    B, s, l = X.shape
    dtype = X.dtype

    def factors(q: Tensor, v: Tensor, k: int, select: Tensor | None) -> tuple[Tensor, Tensor]:
        weight = torch.full((B, 1), 1 - beta2, dtype=dtype, device=X.device)
        if ok_mat is not None:
            weight = torch.where(ok_mat.reshape(-1, 1), weight, 0.0)
        if select is not None:
            weight = torch.where(select, weight, 0.0)
        v = torch.lerp(v, q, weight)
        d = v.sqrt().add_(eps)
        norm = q.sum(-1, keepdim=True).mul_(k).sqrt_()
        norm_normalized = (q / d.square()).sum(-1, keepdim=True).mul_(k).sqrt_()
        return v, (norm / norm_normalized.clamp_min_(eps)) / d

    X.mul_(scale)
    if rows is not None:
        select = row_matrices
        rows, f = factors(sq.mean(-1), rows, l, select)
        X.mul_((f if select is None else torch.where(select, f, 1.0)).unsqueeze(-1))
    if cols is not None:
        select = None if row_matrices is None else ~row_matrices
        cols, f = factors(sq.mean(-2), cols, s, select)
        X.mul_((f if select is None else torch.where(select, f, 1.0)).unsqueeze(-2))
    return rows, cols


def neuron_shape(shape: torch.Size, flatten: bool, transposed: bool = False) -> tuple[int, ...]:
    """Shape of NorMuon's `normuon_v` for a parameter: one entry per row (output neuron) of each of
    its m×n matrices. A transposed parameter (matrices stored (in, out)) has its neurons on the last
    dim: (…, out), the shape the same layer written with nn.Linear has."""
    if transposed:
        return tuple(shape[:-2]) + tuple(shape[-1:])
    return tuple(shape[:1]) if flatten else tuple(shape[:-1])


# ------------------------------------------------------------------------------ weight decay
def cautious_decay(target: list[Tensor], direction: list[Tensor], decay: Tensor, against: int,
                   stacked: bool = False) -> list[Tensor]:
    """Per-element decay factors of cautious weight decay (Chen et al. 2025, arXiv 2510.12402):
    `decay` where u·W >= 0, 1 where u·W < 0, u the update subtracted from W.

    `direction` is u times a positive (against=-1) or a negative (against=1) per-parameter factor,
    so the factor is 1 where sign(direction·W) == against. Computed as keep·(1 - decay) + decay with
    keep in {0, 1}: the multi-tensor form of where(agree, decay, 1), bit-identical to it for
    decay in [0.5, 1] (1 - decay is then exact). decay: (P,) or 0-dim, one per tensor; stacked: one
    tensor broadcastable against every tensor (the step engine's stacks: (B, 1, 1) per matrix); 1
    for skipped parameters.
    """
    per = (lambda x: [x] * len(target)) if stacked else as_list
    keep = torch._foreach_mul(direction, target)
    torch._foreach_sign_(keep)  # -1, 0, 1 (0 where u or W is 0: decay there, as u·W >= 0)
    if against == 1:
        torch._foreach_clamp_min_(keep, 0)  # 1 where u·W < 0
        torch._foreach_mul_(keep, per(1 - decay))
    else:
        torch._foreach_clamp_max_(keep, 0)  # -1 where u·W < 0
        torch._foreach_mul_(keep, per(decay - 1))  # -(decay - 1) == 1 - decay, bit for bit
    torch._foreach_add_(keep, per(decay))
    return keep


def decay_factors(ok: Tensor | None, lr, weight_decay: float, cautious: bool, target: list[Tensor],
                  direction: list[Tensor], against: int, dtype: torch.dtype, device,
                  const=scalar) -> list[Tensor] | Tensor | None:
    """W's multiplier: 1 - lr·wd per parameter (1 where skipped), per element when cautious; None
    without weight decay."""
    if weight_decay == 0:
        return None
    decay = masked(ok, 1 - lr * weight_decay, 1.0, dtype, device, const)
    return cautious_decay(target, direction, decay, against) if cautious else as_list(decay)


# ------------------------------------------------------------------------------------- AdamW
def adamw_scalars(steps: Tensor, ok: Tensor | None, beta1: float, beta2: float, lr, dtype: torch.dtype,
                  const=scalar) -> tuple[Tensor, Tensor, Tensor]:
    """The per-parameter scalars of torch.optim.AdamW's step (its capturable formulation: bias
    corrections on the device), without writing state: (next steps, step sizes, sqrt(bias_correction2)).

    steps and ok are one parameter's (0-dim) or P parameters' ((P,)); ok None: every parameter is
    finite, else a skipped parameter keeps its step and gets step size 0. Bias corrections in fp64
    for fp64 parameters; clamp: a parameter whose every step was skipped has t = 0 and must not
    divide 0 by 0."""
    steps = steps + (1 if ok is None else ok)
    t = steps.to(dtype).clamp_min(1)
    bias_correction1 = 1 - beta1**t
    bias_correction2_sqrt = (1 - beta2**t).sqrt()
    step_size = masked(ok, -lr / bias_correction1, 0.0, dtype, steps.device, const)
    return steps, step_size, bias_correction2_sqrt


def adamw_direction(exp_avg: list[Tensor], exp_avg_sq: list[Tensor], grad: list[Tensor], w1, w2,
                    bias_correction2_sqrt: list[Tensor], beta2: float, eps: float, out: list[Tensor],
                    low: bool = False) -> tuple[list[Tensor], list[Tensor]] | None:
    """torch.optim.AdamW's update up to the step size, m̂ / (sqrt(v̂) + eps), into `out`, without
    writing state: the next moments are computed in out's place and one temporary.

        m' = lerp(m, g, w1)      v' = v·w2 + (1 - beta2)·g²      out = m' / (sqrt(v') / sqrt(bc2) + eps)

    Every argument is a list of same-shaped tensors, one per stack (the step engine: (k, numel) runs
    of k same-shape parameters, with (k, 1) scalars) or per parameter (the reference loop: 0-dim
    scalars). w1 is 1 - beta1 and w2 beta2, or 0 and 1 for a skipped parameter, whose gradient must
    already be sanitized (0 * NaN is NaN). `adamw_advance` then writes the same m' and v' in place.

    low (bf16 moments, state_dtype=torch.bfloat16): the moments are read upcast to out's dtype, m'
    and v' are computed out of place and returned rounded to the moments' dtype (to be copied into
    the state at the commit; a skipped parameter's moments come back bit for bit).
    """
    if low:
        m = torch._foreach_lerp([t.to(out[0].dtype) for t in exp_avg], grad, w1)
        v = torch._foreach_mul([t.to(out[0].dtype) for t in exp_avg_sq], w2)
    else:
        torch._foreach_copy_(out, exp_avg)
        torch._foreach_lerp_(out, grad, w1)  # torch.lerp's bits
        m = out
        v = torch._foreach_mul(exp_avg_sq, w2)
    torch._foreach_addcmul_(v, grad, grad, value=1 - beta2)
    stored = None
    if low:
        stored = ([t.to(exp_avg[0].dtype) for t in m], [t.to(exp_avg_sq[0].dtype) for t in v])
        torch._foreach_copy_(out, m)
        del m
    # sqrt(v) / sqrt(bc2) + eps, as torch computes it; then m / that
    torch._foreach_sqrt_(v)
    torch._foreach_div_(v, bias_correction2_sqrt)
    torch._foreach_add_(v, eps)
    torch._foreach_div_(out, v)
    return stored


def adamw_advance(exp_avg: list[Tensor], exp_avg_sq: list[Tensor], grad: list[Tensor], w1, w2, beta2: float) -> None:
    """The moments of `adamw_direction` written in place (the commit): the same ops, the same bits."""
    torch._foreach_lerp_(exp_avg, grad, w1)
    torch._foreach_mul_(exp_avg_sq, w2)
    torch._foreach_addcmul_(exp_avg_sq, grad, grad, value=1 - beta2)


# ------------------------------------------------------------------------------------ commit
def commit_update(params: list[Tensor], work: list[Tensor] | None, decay, updates: list[Tensor],
                  step_size: Tensor | None = None) -> None:
    """W = W·decay + step_size·update (step_size None: the update comes scaled), in place.

    fp32/fp64 parameters are updated in place; bf16/fp16 ones through `work`, fp32 copies of
    them filled before the commit by `opmath_view` (so the commit allocates nothing): lr and
    1 - lr·wd are not rounded to 8 or 11 bits (0.99998 is 1.0 in bf16).
    """
    target = params if work is None else work
    if decay is not None:
        torch._foreach_mul_(target, decay)
    if step_size is None:
        torch._foreach_add_(target, updates)
    else:
        torch._foreach_addcmul_(target, updates, as_list(step_size) if step_size.ndim else [step_size] * len(target))
    if work is not None:
        torch._foreach_copy_(params, work)


def commit_stack(W: Tensor, decay: Tensor | None, update: Tensor, step_size: Tensor | None = None) -> None:
    """`commit_update` on a stack of parameters (rows: parameters or matrices, in opmath; the step
    engine writes them back): W = W·decay + step_size·update in place, with decay and step_size
    broadcastable per row (or per element: cautious decay). The same ops per element, the same bits."""
    if decay is not None:
        W.mul_(decay)
    if step_size is None:
        W.add_(update)
    else:
        W.addcmul_(update, step_size)


def opmath_view(params: list[Tensor], work: list[Tensor] | None) -> list[Tensor]:
    """The parameters as the update sees them before the commit: in opmath (work holds fp32
    copies of bf16/fp16 parameters, filled here)."""
    if work is None:
        return params
    torch._foreach_copy_(work, params)
    return work


__all__ = [
    "adamw_advance", "adamw_direction", "adamw_scalars", "as_list", "cautious_decay", "check_state", "commit_stack",
    "commit_update", "decay_factors", "masked", "muon_momentum", "neuron_shape", "normuon_update", "opmath", "scalar",
    "state_dtype", "zero_state", "LOW_PRECISION", "QUANT_BLOCK", "quant_blocks", "scale_shape", "quantize_blockwise",
    "dequantize_blockwise", "read_momentum", "store_momentum",
]  # fmt: skip
