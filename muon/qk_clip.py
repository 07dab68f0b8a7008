"""QK-clip (MuonClip, Kimi K2): cap each attention head's pre-softmax logits by rescaling W_q and W_k.

After an optimizer step, a head h whose largest logit S_h = max q·k/√d over the last steps exceeded the
threshold τ gets γ_h = τ / S_h < 1; its query rows (and bias) are scaled by γ_h^α and its key rows by
γ_h^(1-α) (α = 0.5: √γ_h each), so every logit of that head, S_h included, scales by exactly γ_h.
Heads with S_h ≤ τ get the factor 1 and keep their bits.

Grouped-query attention (a key head shared by several query heads):
  gqa="per_head" (default; Kimi K2's rule for shared keys): the shared key is left alone and each
      offending query head takes its whole γ_h, so only offending heads change.
  gqa="group" (Megatron-LM's clip_qk): one factor per group, η_g = τ / max_{h∈g} S_h, query rows of
      every head of the group scaled by η_g^α and the shared key by η_g^(1-α).
Biases, when given, are scaled with their rows, so the logit still scales by exactly γ (Megatron-LM
leaves the qkv bias unscaled).

Everything runs on the device: factors come from torch.where on the recorded maxima, no `.item()`,
no branch on a tensor. DTensor weights (FSDP2's Shard(0), or any placement) scale the rows each rank
holds, mapping the shard's global row offset to heads.

Weights stored (in, out) (transformers' Conv1D, GPT-2's c_attn; `transposed=True`, found by class
when QKClip is given the modules) have their heads on the columns: those are scaled instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .options import check_process_group
from .param_groups import stores_transposed

__all__ = ["QKClip", "qk_clip_"]

GQA_MODES = ("per_head", "group")


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _check_layout(q_weight, k_weight, num_heads, num_kv_heads, q_bias, k_bias, transposed=False) -> tuple[int, int]:
    """Validate shapes; return (head_dim, num_kv_heads). transposed: the weights are (in, out)."""
    if not isinstance(transposed, bool):
        raise ValueError(f"transposed must be True or False, got {transposed!r}")
    rows, layout = ("columns", "in_features × heads·head_dim columns") if transposed else (
        "rows", "heads·head_dim rows × in_features")
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if not isinstance(w, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
        if not w.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {w.dtype}")
        if w.ndim != 2:
            raise ValueError(f"{name} must be 2-D ({layout}), got shape {tuple(w.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    q_rows, k_rows = q_weight.shape[out_dim], k_weight.shape[out_dim]
    if q_rows % num_heads:
        raise ValueError(f"q_weight has {q_rows} {rows}, not a multiple of num_heads={num_heads}")
    head_dim = q_rows // num_heads
    if q_weight.shape[in_dim] != k_weight.shape[in_dim]:
        raise ValueError(
            f"k_weight has {k_weight.shape[in_dim]} input features but q_weight has {q_weight.shape[in_dim]}"
        )
    if k_rows % head_dim:
        raise ValueError(f"k_weight has {k_rows} {rows}, not a multiple of the head size {head_dim} (from q_weight)")
    inferred = k_rows // head_dim
    if num_kv_heads is None:
        num_kv_heads = inferred
    elif isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, numbers.Integral) or num_kv_heads < 1:
        raise ValueError(f"num_kv_heads must be a positive int or None, got {num_kv_heads!r}")
    elif num_kv_heads != inferred:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} but k_weight has {k_rows} {rows} = {inferred} heads of size {head_dim}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    for name, b, rows in (("q_bias", q_bias, q_rows), ("k_bias", k_bias, k_rows)):
        if b is None:
            continue
        if not isinstance(b, Tensor) or not b.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor or None, got {type(b).__name__}")
        if tuple(b.shape) != (rows,):
            raise ValueError(f"{name} must have shape ({rows},), got {tuple(b.shape)}")
    return head_dim, int(num_kv_heads)


def _check_clip_args(threshold, alpha, gqa) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa must be one of {GQA_MODES}, got {gqa!r}")


def _local(t: Tensor, dim: int = 0) -> tuple[Tensor, int]:
    """The tensor this rank holds and the global index of its first entry along `dim`."""
    if not _is_dtensor(t):
        return t, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t._local_tensor, int(offset[dim]) if len(offset) > dim else 0


def _scale_rows_(t: Tensor | None, per_head: Tensor, head_dim: int, dim: int = 0) -> None:
    """t[r] *= per_head[r // head_dim] for the global rows r (along `dim`: 1 for the columns of an
    (in, out) weight) this rank holds (in place)."""
    if t is not None:
        _scale_local_rows_(*_local(t, dim), per_head, head_dim, dim)


def _scale_local_rows_(local: Tensor, offset: int, per_head: Tensor, head_dim: int, dim: int = 0) -> None:
    """Scale a shard whose first row (along `dim`) is global row `offset`; a head may straddle shards."""
    rows = local.shape[dim]
    if local.numel() == 0:
        return
    per_row = per_head.to(local.device).unsqueeze(1).expand(-1, head_dim).reshape(-1)[offset : offset + rows]
    shape = [1] * local.ndim
    shape[dim] = rows
    local.mul_(per_row.view(shape))


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


@torch.no_grad()
def qk_clip_(
    q_weight: Tensor,
    k_weight: Tensor,
    max_logits: Tensor,
    threshold: float,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    q_bias: Tensor | None = None,
    k_bias: Tensor | None = None,
    alpha: float = 0.5,
    gqa: str = "per_head",
    transposed: bool = False,
) -> Tensor:
    """Rescale the query and key rows of every head whose max logit exceeded `threshold`, in place.

    Args:
        q_weight: (num_heads·head_dim, in) query projection weight, head h in rows [h·d, (h+1)·d);
            a plain tensor, a Parameter, a view into a fused qkv weight, or a DTensor.
        k_weight: (num_kv_heads·head_dim, in) key projection weight, same layout.
        max_logits: (num_heads,) largest pre-softmax logit of each query head (q·k/√d after any
            scaling the model applies), on any device.
        threshold: τ > 0.
        num_heads: query heads; num_kv_heads (default: k_weight's rows / head_dim) key heads.
        q_bias, k_bias: optional biases, scaled like their rows.
        alpha: the query's share of the factor (γ^α on queries, γ^(1-α) on keys); 0.5 = Kimi K2.
        gqa: "per_head" or "group" (see the module docstring); the same thing when num_kv_heads == num_heads.
        transposed: the weights are stored (in, heads·head_dim), as transformers' Conv1D keeps them
            (GPT-2's c_attn: q = c_attn.weight[:, :d], k = c_attn.weight[:, d:2d]); head h is then
            columns [h·d, (h+1)·d), and those are scaled.

    Returns the (num_heads,) factor γ_h = min(1, τ / S_h) each head's logits were scaled by (1 where
    S_h ≤ τ or S_h is NaN or inf), on max_logits' device. Nothing is read back to the host.
    """
    head_dim, n_kv = _check_layout(q_weight, k_weight, num_heads, num_kv_heads, q_bias, k_bias, transposed)
    _check_clip_args(threshold, alpha, gqa)
    if not isinstance(max_logits, Tensor) or not max_logits.is_floating_point():
        raise TypeError(f"max_logits must be a floating torch.Tensor, got {type(max_logits).__name__}")
    if tuple(max_logits.shape) != (num_heads,):
        raise ValueError(f"max_logits must have shape (num_heads,) = ({num_heads},), got {tuple(max_logits.shape)}")

    wide = torch.float64 in (max_logits.dtype, q_weight.dtype, k_weight.dtype)
    S = _full(max_logits).detach().to(torch.float64 if wide else torch.float32)
    # A head with no usable record (NaN, or an overflowed +inf that would zero its rows) keeps factor 1.
    gamma = torch.where((S > threshold) & S.isfinite(), threshold / S, torch.ones_like(S))
    group = num_heads // n_kv
    if group == 1 or gqa == "group":
        eta = gamma.view(n_kv, group).amin(dim=1)  # = τ / max over the group, or 1
        q_factor = eta.pow(alpha).repeat_interleave(group)  # 1 ** α is exactly 1
        k_factor = eta.pow(1 - alpha)
    else:
        q_factor, k_factor = gamma, None  # Kimi K2: shared keys untouched, queries take all of γ
    heads_dim = 1 if transposed else 0  # the weights' output axis; biases are (heads·head_dim,)
    _scale_rows_(q_weight, q_factor, head_dim, heads_dim)
    _scale_rows_(q_bias, q_factor, head_dim)
    if k_factor is not None:
        _scale_rows_(k_weight, k_factor, head_dim, heads_dim)
        _scale_rows_(k_bias, k_factor, head_dim)
    if group == 1 or gqa == "group":
        return eta.repeat_interleave(group)
    return gamma


def _as_weight_bias(x, what: str) -> tuple[Tensor, Tensor | None]:
    if isinstance(x, nn.Module):
        weight = getattr(x, "weight", None)
        if not isinstance(weight, Tensor):
            raise TypeError(f"{what} is a {type(x).__name__} without a `weight` tensor")
        bias = getattr(x, "bias", None)
        return weight, bias if isinstance(bias, Tensor) else None
    if isinstance(x, Tensor):
        return x, None
    raise TypeError(f"{what} must be an nn.Module with a weight (nn.Linear) or a weight tensor, got {type(x).__name__}")


class QKClip:
    """Track each attention's per-head max logit between steps and clip after the optimizer step.

        clip = muon.QKClip(threshold=100.0)
        clip.add("layer0", attn.q_proj, attn.k_proj, num_heads=8)   # nn.Linear (or Conv1D) or weights
        clip.record("layer0", scores)        # from your attention code: (..., heads, L, L) logits
        # or clip.attach("layer0", module)   # forward hook: the module's output is the logits
        clip.attach_optimizer(opt)           # clip after every opt.step(); or call clip.step()

    The running maxima live on the device (float32) and are reset by each step(). With
    torch.distributed initialized, step() MAX-reduces them over `process_group` (default: the
    default group) in one collective, so data-parallel replicas clip identically; pass sync=False to
    skip it, or the data-parallel group when heads are split across tensor-parallel ranks.
    """

    def __init__(
        self,
        threshold: float,
        *,
        alpha: float = 0.5,
        gqa: str = "per_head",
        process_group=None,
        sync: bool = True,
    ) -> None:
        _check_clip_args(threshold, alpha, gqa)
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.gqa = gqa
        check_process_group(process_group)
        self.process_group = process_group
        self.sync = bool(sync)
        self._attn: dict[str, dict] = {}
        self._max: dict[str, Tensor] = {}

    def add(
        self,
        name: str,
        q,
        k,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        q_bias: Tensor | None = None,
        k_bias: Tensor | None = None,
        transposed: bool | None = None,
    ) -> None:
        """Register an attention: `q`, `k` are its projections (nn.Linear, bias included) or weights.

        Given modules, the weights are looked up again at every step(), so registering before
        FSDP2's fully_shard (which swaps in new DTensor parameters) or `.to(device)` is fine.
        transposed: the weights are stored (in, out) (see `qk_clip_`); None: True for transformers'
        Conv1D modules, False for anything else (weight tensors included: say so for a view into a
        fused Conv1D c_attn).
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if name in self._attn:
            raise ValueError(f"an attention named {name!r} is already registered")
        if transposed is None:
            found = {stores_transposed(x) for x in (q, k) if isinstance(x, nn.Module)}
            if len(found) > 1:
                raise ValueError("q and k store their weights in different orientations (one is a Conv1D); "
                                 "pass transposed= and weight tensors of one layout")
            transposed = found.pop() if found else False
        entry = dict(q=q, k=k, num_heads=num_heads, num_kv_heads=num_kv_heads, q_bias=q_bias, k_bias=k_bias,
                     transposed=transposed)
        self._tensors(entry)  # validates; raises before anything is registered
        self._attn[name] = entry

    @staticmethod
    def _tensors(entry: dict) -> dict:
        q_weight, qb = _as_weight_bias(entry["q"], "q")
        k_weight, kb = _as_weight_bias(entry["k"], "k")
        q_bias = qb if entry["q_bias"] is None else entry["q_bias"]
        k_bias = kb if entry["k_bias"] is None else entry["k_bias"]
        _check_layout(q_weight, k_weight, entry["num_heads"], entry["num_kv_heads"], q_bias, k_bias,
                      entry["transposed"])
        return dict(
            q_weight=q_weight,
            k_weight=k_weight,
            num_heads=entry["num_heads"],
            num_kv_heads=entry["num_kv_heads"],
            q_bias=q_bias,
            k_bias=k_bias,
            transposed=entry["transposed"],
        )

    @torch.no_grad()
    def record(self, name: str, logits: Tensor, *, head_dim: int = -3) -> None:
        """Fold a batch of pre-softmax logits into `name`'s running per-head max.

        logits: (..., num_heads, L_q, L_k) with the head axis at `head_dim` (masked entries as -inf are
        ignored by the max), or an already reduced (num_heads,) tensor of per-head maxima.
        """
        if name not in self._attn:
            raise KeyError(f"no attention named {name!r}; register it with add() first (have {sorted(self._attn)})")
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            raise TypeError(f"logits must be a floating torch.Tensor, got {type(logits).__name__}")
        num_heads = self._attn[name]["num_heads"]
        if logits.ndim == 1:
            per_head = logits
        else:
            if not -logits.ndim <= head_dim < logits.ndim:
                raise ValueError(f"head_dim={head_dim} is out of range for logits of shape {tuple(logits.shape)}")
            per_head = logits.detach().movedim(head_dim, 0).reshape(logits.shape[head_dim], -1).amax(dim=1)
        if tuple(per_head.shape) != (num_heads,):
            raise ValueError(
                f"logits for {name!r} have {per_head.shape[0]} heads on head_dim={head_dim} "
                f"(shape {tuple(logits.shape)}), expected num_heads={num_heads}"
            )
        per_head = per_head.detach().float()
        prev = self._max.get(name)
        self._max[name] = per_head.clone() if prev is None else torch.maximum(prev, per_head)

    def attach(
        self, name: str, module: nn.Module, *, logits_fn: Callable | None = None, training_only: bool = True
    ) -> torch.utils.hooks.RemovableHandle:
        """Record `name` from a forward hook on `module`: its output is the logits, or
        logits_fn(module, args, output) returns them. With training_only (default), forwards in eval
        mode (module.training False) are not recorded. Returns the hook's handle."""
        if name not in self._attn:
            raise KeyError(f"no attention named {name!r}; register it with add() first")

        def hook(mod, args, output):
            if training_only and not mod.training:
                return
            self.record(name, output if logits_fn is None else logits_fn(mod, args, output))

        return module.register_forward_hook(hook)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.utils.hooks.RemovableHandle:
        """Run step() after every optimizer.step(); returns the hook's handle."""
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())

    @property
    def max_logits(self) -> dict[str, Tensor]:
        """The running per-head maxima recorded since the last step (device tensors; for logging)."""
        return dict(self._max)

    def reset(self) -> None:
        self._max.clear()

    def _reduce(self) -> None:
        import torch.distributed as dist

        if not (self.sync and self._attn and dist.is_available() and dist.is_initialized()):
            return
        # Every registered attention takes part, -inf where this rank recorded nothing, so ranks that
        # recorded different attentions still issue the same collective.
        names = sorted(self._attn)
        parts = []
        for n in names:
            if n in self._max:
                parts.append(self._max[n])
            else:
                w = _as_weight_bias(self._attn[n]["q"], "q")[0]
                device = _local(w)[0].device
                parts.append(torch.full((self._attn[n]["num_heads"],), -math.inf, device=device))
        flat = torch.cat([p.to(parts[0].device) for p in parts])
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.process_group)
        self._max = dict(zip(names, flat.split([p.numel() for p in parts])))

    @torch.no_grad()
    def step(self) -> dict[str, Tensor]:
        """Clip every attention recorded since the last step, reset, and return name -> γ per head."""
        self._reduce()
        factors = {}
        for name, S in self._max.items():
            a = self._tensors(self._attn[name])
            factors[name] = qk_clip_(
                a["q_weight"],
                a["k_weight"],
                S,
                self.threshold,
                a["num_heads"],
                num_kv_heads=a["num_kv_heads"],
                q_bias=a["q_bias"],
                k_bias=a["k_bias"],
                alpha=self.alpha,
                gqa=self.gqa,
                transposed=a["transposed"],
            )
        self.reset()
        return factors
