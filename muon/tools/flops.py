"""FLOP model of a Muon step against AdamW and against training (a tool: the step never runs it).

Public as `muon.flops`. `newton_schulz_flops` (from `muon.ns_flops`, which the library weighs NS work
with) and `overhead_bound` are the closed forms; `overhead(model, batch_tokens)` counts
a whole `nn.Module` exactly: every parameter is routed by `muon.param_groups` (hidden matrices to Muon,
the rest to AdamW) and same-shape matrices form the batched NS groups the optimizer runs. A model built
on the `meta` device allocates nothing, so counting Llama 3 405B is cheap. The benchmark's model presets
(GPT-2, Llama 3, Essential AI, Moonlight) and their command-line specs ("gpt2-124m",
"custom:layers=..,d=..,heads=..") live in the repository's bench/models.py, which builds them as modules.

FLOPs count a multiply and an add as 2 (a fused multiply-add is 2). Training FLOPs per step are
6·N·B (forward 2·N·B, backward 4·N·B) with N the weights multiplied per token: every parameter
except embedding lookups (a tied output head is counted once, as the head's matmul); attention's
QKᵀ and AV, which depend on the architecture and not on the parameters, are reported separately when
the caller gives them per token (a transformer's 6·L·ctx·d_attn, Kaplan et al. 2020, no causal halving).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from torch import nn

from .._shapes import block_layout, matrix_shape, row_blocks
from ..ns_flops import _check_int, newton_schulz_elementwise_flops, newton_schulz_flops
from ..param_groups import HEAD_NAMES, param_groups

__all__ = [
    "ADAMW_FLOPS_PER_ELEMENT",
    "MUON_FLOPS_PER_ELEMENT",
    "Overhead",
    "matmul_params",
    "nonembedding_params",
    "muon_matrices",
    "newton_schulz_elementwise_flops",
    "newton_schulz_flops",
    "overhead",
    "overhead_bound",
    "total_params",
]


def overhead_bound(model_dim: int, batch_tokens: int, steps: int = 5) -> float:
    """Keller Jordan's upper bound on NS FLOPs over training FLOPs: steps·model_dim / batch_tokens.

    For an m×n layer (m <= n) NS costs at most steps·6·n·m² against 6·m·n·B for its forward and
    backward, hence steps·m/B; summing over layers with m <= model_dim keeps the bound.
    Examples: 768 at 524,288 tokens -> 0.00732; 16,384 at 16,000,000 -> 0.00512.
    """
    _check_int(model_dim, "model_dim", 1)
    _check_int(batch_tokens, "batch_tokens", 1)
    _check_int(steps, "steps", 0)
    return steps * model_dim / batch_tokens


# Elementwise FLOPs per parameter element of one optimizer step, from the update rules as
# torch.optim.AdamW and muon.Muon compute them (sqrt and divide counted as 1 each):
#   AdamW: m.lerp_(g) 3; v·β2 + (1-β2)·g·g 4; sqrt(v)/bc2 + eps 3; m/denom 1; p·(1-lr·wd) 1;
#          p + step·u 2  -> 14
#   Muon (outside NS): buf.lerp_(g) 3; nesterov g.lerp(buf) 3; p·(1-lr·wd) 1; p + s·O 2 -> 9
ADAMW_FLOPS_PER_ELEMENT = 14
MUON_FLOPS_PER_ELEMENT = 9


# ---------------------------------------------------------------------------------- counting
def _check_module(model, function: str) -> nn.Module:
    """model itself if it is an nn.Module; model names and configs are the benchmark's (bench/models.py)."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, str):
        raise TypeError(
            f"muon.flops.{function} takes an nn.Module, not a model name ({model!r}): the presets and model "
            f"specs are the benchmark's; in a checkout of the repository build the module with "
            f"bench.models.as_module({model!r}), or count it with bench.models.overhead({model!r}, batch_tokens) "
            f"or `python -m bench flops --model {model}`"
        )
    raise TypeError(
        f"muon.flops.{function} takes an nn.Module, got {type(model).__name__}; a model config "
        "(bench.models.TransformerConfig) is built with bench.models.build(cfg)"
    )


def muon_matrices(model: nn.Module, **routing) -> tuple[list[tuple[int, int, int]], list[nn.Parameter], list]:
    """([(batch, m, n) per Muon parameter], Muon parameters, AdamW parameters), routed by param_groups.

    `routing` goes to `muon.param_groups` (muon=/adamw= patterns, split=/heads= rules). A parameter
    whose group has split or heads gives the (batch, rows, n) shapes of its row blocks, as NS runs them
    (one entry per distinct block shape, so the shapes no longer pair one to one with the parameters).
    """
    shapes, muon_params, adamw_params = [], [], []
    for group in param_groups(model, **routing):
        if group["use_muon"]:
            for p in group["params"]:
                count, m, n = matrix_shape(p.shape, group.get("flatten", False), group.get("transposed", False))
                sizes = row_blocks(m, group.get("split"), group.get("heads"))
                blocks: dict[int, int] = {}
                for _, rows, matrices in block_layout(count, m, n, sizes):
                    blocks[rows] = blocks.get(rows, 0) + matrices
                shapes.extend((matrices, rows, n) for rows, matrices in blocks.items())
                muon_params.append(p)
        else:
            adamw_params.extend(group["params"])
    return shapes, muon_params, adamw_params


def matmul_params(model: nn.Module) -> int:
    """N of 6·N·B: parameters used per token, i.e. all but those owned only by embedding lookups."""
    owned_by_other: set[int] = set()
    numel: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            numel[id(p)] = p.numel()
            if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                owned_by_other.add(id(p))
    return sum(numel[i] for i in owned_by_other)


@dataclass
class Overhead:
    """FLOPs of one optimizer step and of one training step; see `overhead`."""

    model: str
    params: int
    muon_params: int
    adamw_params: int  # parameters that stay on AdamW inside muon.Muon
    matmul_params: int
    model_dim: int
    batch_tokens: int
    steps: int
    symmetric: bool
    ns_flops: int  # NS matmuls
    muon_flops: int  # one muon.Muon step: NS + its elementwise work + the AdamW groups
    adamw_flops: int  # one torch.optim.AdamW step over every parameter
    training_flops: int  # 6·N·B
    attention_flops: int  # attention_flops_per_token·B, e.g. 6·L·ctx·d_attn·B (0 when not given)
    overhead: float  # (muon_flops - adamw_flops) / training_flops
    ns_overhead: float  # ns_flops / training_flops, what Keller's bound bounds
    overhead_with_attention: float  # (muon_flops - adamw_flops) / (training_flops + attention_flops)
    overhead_bound: float  # steps·model_dim / batch_tokens
    groups: list[dict]  # batched NS groups: {"shape": [B, m, n], "ns_flops": ...}
    training_flop_model: str = (
        "6*N*B, N = parameters used per token (all but embedding lookups; a tied head counts once); "
        "attention QK^T/AV separately as 6*L*ctx*d_attn*B"
    )
    # The same NS matmuls with Gram Newton–Schulz (algorithm="gram", one restart at step 2) on every
    # group; muon_flops and the overheads above are standard NS's.
    ns_flops_gram: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def at(self, batch_tokens: int) -> Overhead:
        """The same model and optimizer at another batch size (the optimizer FLOPs do not change)."""
        _check_int(batch_tokens, "batch_tokens", 1)
        training = self.training_flops // self.batch_tokens * batch_tokens
        attention = self.attention_flops // self.batch_tokens * batch_tokens
        extra = self.muon_flops - self.adamw_flops
        return dataclasses.replace(
            self,
            batch_tokens=batch_tokens,
            training_flops=training,
            attention_flops=attention,
            overhead=extra / training,
            ns_overhead=self.ns_flops / training,
            overhead_with_attention=extra / (training + attention),
            overhead_bound=overhead_bound(self.model_dim, batch_tokens, self.steps),
        )


def overhead(
    model: nn.Module,
    batch_tokens: int,
    steps: int = 5,
    *,
    symmetric: bool = False,
    model_dim: int | None = None,
    attention_flops_per_token: int = 0,
    name: str | None = None,
    **routing,
) -> Overhead:
    """Exact FLOPs of a muon.Muon step (NS of each same-shape group + elementwise work + AdamW groups)
    against a torch.optim.AdamW step on every parameter and against a training step of batch_tokens.

    model: an nn.Module (on the meta device it allocates nothing). A model name such as "gpt2-124m" is
    a TypeError: the presets are the benchmark's, built by bench/models.py (`bench.models.overhead`
    takes the spec and passes its config's width and attention FLOPs here).
    model_dim: the width in Keller's bound (default: the largest short side of the Muon matrices,
    which keeps ns_overhead <= overhead_bound; a transformer's d_model).
    attention_flops_per_token: the attention score and value products of a training step per token,
    which 6·N·B leaves out (Kaplan et al.: 6·L·ctx·d_attn); default 0.
    name: the report's model name (default: the module's class name).
    routing: muon.param_groups's muon=/adamw= patterns and split=/heads= rules.
    """
    _check_int(batch_tokens, "batch_tokens", 1)
    _check_int(steps, "steps", 0)
    _check_int(attention_flops_per_token, "attention_flops_per_token", 0)
    module = _check_module(model, "overhead")
    shapes, muon_params, adamw_params = muon_matrices(module, **routing)

    batch_of: Counter = Counter()  # (m, n) -> matrices of that shape: one batched NS call each
    for b, m, n in shapes:
        batch_of[(m, n)] += b
    ns = sum(b * newton_schulz_flops(m, n, steps, symmetric) for (m, n), b in batch_of.items())
    ns_gram = sum(b * newton_schulz_flops(m, n, steps, symmetric, algorithm="gram") for (m, n), b in batch_of.items())
    ns_elementwise = sum(b * newton_schulz_elementwise_flops(m, n, steps) for (m, n), b in batch_of.items())
    n_muon = sum(p.numel() for p in muon_params)
    n_adamw = sum(p.numel() for p in adamw_params)
    muon_flops = ns + ns_elementwise + MUON_FLOPS_PER_ELEMENT * n_muon + ADAMW_FLOPS_PER_ELEMENT * n_adamw
    adamw_flops = ADAMW_FLOPS_PER_ELEMENT * (n_muon + n_adamw)

    n_matmul = matmul_params(module)
    training = 6 * n_matmul * batch_tokens
    attention = attention_flops_per_token * batch_tokens
    if model_dim is None:
        model_dim = max((min(m, n) for _, m, n in shapes), default=1)
    extra = muon_flops - adamw_flops
    return Overhead(
        model=name if name is not None else type(module).__name__,
        params=n_muon + n_adamw,
        muon_params=n_muon,
        adamw_params=n_adamw,
        matmul_params=n_matmul,
        model_dim=model_dim,
        batch_tokens=batch_tokens,
        steps=steps,
        symmetric=symmetric,
        ns_flops=ns,
        ns_flops_gram=ns_gram,
        muon_flops=muon_flops,
        adamw_flops=adamw_flops,
        training_flops=training,
        attention_flops=attention,
        overhead=extra / training,
        ns_overhead=ns / training,
        overhead_with_attention=extra / (training + attention),
        overhead_bound=overhead_bound(model_dim, batch_tokens, steps),
        groups=[
            {"shape": [b, m, n], "ns_flops": b * newton_schulz_flops(m, n, steps, symmetric),
             "ns_flops_gram": b * newton_schulz_flops(m, n, steps, symmetric, algorithm="gram")}
            for (m, n), b in sorted(batch_of.items(), key=lambda kv: -kv[1] * kv[0][0] * kv[0][1])
        ],
    )


def total_params(model: nn.Module) -> int:
    """Unique parameter count (a tied head counts once), as published totals count."""
    return sum(p.numel() for p in _check_module(model, "total_params").parameters())


def nonembedding_params(model: nn.Module) -> int:
    """Parameters outside embedding tables and the output head (Kaplan et al.'s N). The head is what
    muon.param_groups takes for one by name: the parameters of a module named lm_head, head, output,
    classifier or logits (`muon.param_groups.HEAD_NAMES`)."""
    module = _check_module(model, "nonembedding_params")
    skip = {
        id(p)
        for name, mod in module.named_modules()
        if isinstance(mod, nn.Embedding) or name.rsplit(".", 1)[-1].lower() in HEAD_NAMES
        for p in mod.parameters(recurse=False)
    }
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)

