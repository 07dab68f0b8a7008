"""FLOP model of a Muon step against AdamW and against training, with model presets from real shapes.

`newton_schulz_flops` and `overhead_bound` are the closed forms; `overhead(model, batch_tokens)` counts
a whole model exactly: every parameter is routed by `muon.param_groups` (hidden matrices to Muon, the
rest to AdamW), same-shape matrices form the batched NS groups the optimizer runs, and the preset
models are real `nn.Module`s built on the `meta` device, so nothing is allocated even for Llama 3 405B.

FLOPs count a multiply and an add as 2 (a fused multiply-add is 2). Training FLOPs per step are
6·N·B (forward 2·N·B, backward 4·N·B) with N the weights multiplied per token: every parameter
except embedding lookups (a tied output head is counted once, as the head's matmul); attention's
QKᵀ and AV are reported separately (Kaplan et al. 2020's 6·L·ctx·d_attn·B, no causal halving).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._shapes import block_layout, matrix_shape, row_blocks
from .param_groups import param_groups

__all__ = [
    "ADAMW_FLOPS_PER_ELEMENT",
    "MUON_FLOPS_PER_ELEMENT",
    "PRESETS",
    "Overhead",
    "Transformer",
    "TransformerConfig",
    "build",
    "matmul_params",
    "nonembedding_params",
    "muon_matrices",
    "newton_schulz_elementwise_flops",
    "newton_schulz_flops",
    "overhead",
    "overhead_bound",
    "parse_model",
    "total_params",
]


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# ------------------------------------------------------------------------------- closed forms
def newton_schulz_flops(
    m: int, n: int, steps: int = 5, symmetric: bool = False, algorithm: str = "standard", restarts=(2,),
    precondition: str = "frobenius",
) -> int:
    """Matmul FLOPs of `steps` NS iterations on one m×n matrix (exact int).

    precondition ("frobenius" or "aol") does not change the count: AOL's row scales come from the
    first step's Gram product, which that step forms anyway (elementwise work only:
    `newton_schulz_elementwise_flops`). Fewer FLOPs with AOL come from running fewer steps.

    With s = min(m, n), l = max(m, n) (tall inputs are transposed first):

    algorithm="standard": one step is A = X·Xᵀ (2·s²·l), A·A (2·s³) and B·X (2·s²·l):
    steps·(4·s²·l + 2·s³). symmetric=True counts kernels that compute one triangle of the two
    symmetric products (X·Xᵀ and A·A): steps·(3·s²·l + s³).

    algorithm="gram" (muon.backends.torch_backend.run_gram), with k = 1 + the restarts in [1, steps)
    segments: each segment computes R = X·Xᵀ (2·s²·l) and ends with X = Q·X (2·s²·l); each of its L
    steps computes Z = b·R + c·R·R (2·s³), Q·Z (2·s³, not on the segment's first step: Q = Z + a·I
    there) and R·Z, Z·(R·Z) (4·s³, not on its last step: no later step of the segment reads R):
    4·k·s²·l + (8·steps - 6·k)·s³. symmetric=True halves X·Xᵀ and every s×s product (each is symmetric:
    polynomials in R commute), not the general Q·X: 3·k·s²·l + (4·steps - 3·k)·s³. steps=0: 0.
    The elementwise terms (b·A, a·X, Z + a·I) are not matmul work: `newton_schulz_elementwise_flops`.
    """
    _check_int(m, "m", 0)
    _check_int(n, "n", 0)
    _check_int(steps, "steps", 0)
    _check_precondition(precondition)
    short, long = min(m, n), max(m, n)
    if algorithm == "gram":
        from .coefficients import check_restarts

        if steps == 0:
            return 0
        k = 1 + sum(1 for r in check_restarts(restarts) if r < steps)
        if symmetric:
            return 3 * k * short * short * long + (4 * steps - 3 * k) * short**3
        return 4 * k * short * short * long + (8 * steps - 6 * k) * short**3
    if algorithm != "standard":
        raise ValueError(f"algorithm must be 'standard' or 'gram', got {algorithm!r}")
    if symmetric:
        return steps * (3 * short * short * long + short**3)
    return steps * (4 * short * short * long + 2 * short**3)


def newton_schulz_elementwise_flops(m: int, n: int, steps: int = 5, precondition: str = "frobenius") -> int:
    """Non-matmul FLOPs of NS on one m×n matrix: the normalization and the per-step scalings.

    Normalization (scale-safe, see muon.backends.torch_ref.normalize): |x|, max, divide, square,
    accumulate, divide = 6 per element. Per step: B = b·A + c·(A·A) is 3 per element of the s×s
    Gram matrix and X = a·X + B·X is 2 per element of X. precondition="aol" (with steps >= 1, see
    muon.backends.torch_ref.aol_rescale) adds, on the s×s Gram matrix A, |A| and the row sums (2 per
    element), d_i·d_j and the product (2 per element), per row max, sqrt, times fro_scale and the
    reciprocal (4), and one multiply per element of X.
    """
    _check_precondition(precondition)
    short = min(m, n)
    aol = 4 * short * short + 4 * short + m * n if precondition == "aol" and steps > 0 else 0
    return 6 * m * n + steps * (3 * short * short + 2 * m * n) + aol


def _check_precondition(precondition) -> None:
    from .coefficients import PRECONDITIONS

    if precondition not in PRECONDITIONS:
        raise ValueError(f"precondition must be one of {PRECONDITIONS}, got {precondition!r}")


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


# ------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class TransformerConfig:
    """A decoder-only transformer, enough to reproduce the parameter shapes of the presets.

    mlp="gelu": two matrices d->d_mlp->d (GPT-2); "swiglu": three (gate, up, down; Llama).
    fused_qkv: one d x 3·d_attn matrix (GPT-2's c_attn) instead of q, k, v (as in nanoGPT/HF GPT-2).
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int | None = None  # None: n_heads (no grouped-query attention)
    head_dim: int | None = None  # None: d_model // n_heads
    d_mlp: int | None = None  # None: 4·d_model
    mlp: str = "gelu"
    vocab: int = 50257
    seq_len: int = 1024
    tied: bool = False
    bias: bool = False
    fused_qkv: bool = False
    learned_pos: bool = False  # a learned position table (GPT-2); otherwise rotary (no parameters)
    norm: str = "rms"  # "layer" (LayerNorm, with bias when bias=True) or "rms"
    published_params: int | None = None  # the published total, where a source gives it
    source: str = ""

    def __post_init__(self) -> None:
        for field in ("n_layers", "d_model", "n_heads", "vocab", "seq_len"):
            _check_int(getattr(self, field), field, 1)
        for field in ("n_kv_heads", "head_dim", "d_mlp"):
            if getattr(self, field) is not None:
                _check_int(getattr(self, field), field, 1)
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {self.norm!r}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); give head_dim")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def mlp_dim(self) -> int:
        return self.d_mlp or 4 * self.d_model

    @property
    def d_attn(self) -> int:
        return self.n_heads * self.hd


class _Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, q, kv = cfg.d_model, cfg.d_attn, cfg.kv_heads * cfg.hd
        if cfg.fused_qkv:
            self.qkv = nn.Linear(d, q + 2 * kv, bias=cfg.bias)
        else:
            self.q = nn.Linear(d, q, bias=cfg.bias)
            self.k = nn.Linear(d, kv, bias=cfg.bias)
            self.v = nn.Linear(d, kv, bias=cfg.bias)
        self.o = nn.Linear(q, d, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        q_dim, kv_dim = cfg.d_attn, cfg.kv_heads * cfg.hd
        if cfg.fused_qkv:
            q, k, v = self.qkv(x).split((q_dim, kv_dim, kv_dim), dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(b, t, cfg.n_heads, cfg.hd).transpose(1, 2)
        k = k.view(b, t, cfg.kv_heads, cfg.hd).transpose(1, 2)
        v = v.view(b, t, cfg.kv_heads, cfg.hd).transpose(1, 2)
        if cfg.kv_heads != cfg.n_heads:
            k = k.repeat_interleave(cfg.n_heads // cfg.kv_heads, dim=1)
            v = v.repeat_interleave(cfg.n_heads // cfg.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, q_dim))


class _MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.up = nn.Linear(cfg.d_model, cfg.mlp_dim, bias=cfg.bias)
        if self.swiglu:
            self.gate = nn.Linear(cfg.d_model, cfg.mlp_dim, bias=cfg.bias)
        self.down = nn.Linear(cfg.mlp_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.gelu(self.up(x), approximate="tanh")
        return self.down(h)


def _norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "layer":
        return nn.LayerNorm(cfg.d_model, bias=cfg.bias)
    return nn.RMSNorm(cfg.d_model)


class _Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm1, self.attn = _norm(cfg), _Attention(cfg)
        self.norm2, self.mlp = _norm(cfg), _MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A pre-norm decoder-only transformer with the parameter shapes of a `TransformerConfig`.

    Its forward runs (causal attention, no rotary embedding: the benchmark times shapes, not model
    quality), so the same module gives FLOP counts on `meta` and measured step times on a device.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.learned_pos else None
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        if cfg.tied:
            self.lm_head.weight = self.tok_embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_embed(idx)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))


def build(cfg: TransformerConfig, device: torch.device | str = "meta", dtype: torch.dtype | None = None) -> Transformer:
    """The preset as an nn.Module; on "meta" (the default) no memory is allocated."""
    with torch.device(device):
        model = Transformer(cfg)
    return model if dtype is None else model.to(dtype)


def _gpt2(name: str, layers: int, d: int, heads: int, published: int) -> TransformerConfig:
    return TransformerConfig(
        name, layers, d, heads, vocab=50257, seq_len=1024, tied=True, bias=True, fused_qkv=True,
        learned_pos=True, norm="layer", mlp="gelu", published_params=published,
        source="GPT-2 (Radford et al. 2019); totals as counted by nanoGPT / HF transformers",
    )


def _llama3(name: str, layers: int, d: int, mlp: int, heads: int, published: int) -> TransformerConfig:
    return TransformerConfig(
        name, layers, d, heads, n_kv_heads=8, d_mlp=mlp, mlp="swiglu", vocab=128256, seq_len=8192,
        published_params=published, source="Llama 3 (Grattafiori et al. 2024); totals from the released weights",
    )


def _essential(name: str, d: int, mlp: int, heads: int, kv: int, published: int) -> TransformerConfig:
    # The paper gives depth, width, MLP width, heads and head dim; a 65,536-token untied vocabulary
    # with a SwiGLU MLP reproduces the stated sizes: within 0.5 % for 0.20B-3.67B, 4.3 % for the
    # rounded "0.07B" (67.0M).
    return TransformerConfig(
        name, 34, d, heads, n_kv_heads=kv, head_dim=128, d_mlp=mlp, mlp="swiglu", vocab=65536,
        seq_len=8192, published_params=published,
        source="Essential AI, Practical Efficiency of Muon for Pretraining (arXiv 2505.02222); vocab 65,536 inferred",
    )


def _moonlight(name: str, layers: int, d: int, published: int) -> TransformerConfig:
    # The paper's table gives layers, hidden size and heads (= layers) only; a 4·d MLP block
    # (12·L·d² weights, which an 8/3·d SwiGLU also gives) and Moonlight's 163,840-token vocabulary
    # are assumptions. The stated sizes match the non-embedding weights to within 15 % (they do not
    # match any total with embeddings), so the sizes are read as non-embedding counts.
    return TransformerConfig(
        name, layers, d, layers, d_mlp=4 * d, mlp="gelu", vocab=163840, seq_len=8192,
        published_params=published,
        source="Moonlight scaling-law models (arXiv 2502.16982); MLP width and vocab assumed",
    )


PRESETS: dict[str, TransformerConfig] = {
    cfg.name: cfg
    for cfg in (
        _gpt2("gpt2-124m", 12, 768, 12, 124_439_808),
        _gpt2("gpt2-350m", 24, 1024, 16, 354_823_168),
        _gpt2("gpt2-774m", 36, 1280, 20, 774_030_080),
        _gpt2("gpt2-1.5b", 48, 1600, 25, 1_557_611_200),
        _essential("essential-0.07b", 256, 1024, 2, 1, 70_000_000),
        _essential("essential-0.20b", 512, 2048, 4, 2, 200_000_000),
        _essential("essential-0.67b", 1024, 4096, 8, 4, 670_000_000),
        _essential("essential-2.40b", 2048, 8192, 16, 8, 2_400_000_000),
        _essential("essential-3.67b", 2560, 10240, 20, 10, 3_670_000_000),
        _moonlight("moonlight-399m", 12, 1536, 399_000_000),
        _moonlight("moonlight-545m", 14, 1792, 545_000_000),
        _moonlight("moonlight-822m", 16, 2048, 822_000_000),
        _moonlight("moonlight-1.1b", 18, 2304, 1_100_000_000),
        _moonlight("moonlight-1.5b", 20, 2560, 1_500_000_000),
        _llama3("llama3-8b", 32, 4096, 14336, 32, 8_030_261_248),
        _llama3("llama3-70b", 80, 8192, 28672, 64, 70_553_706_496),
        _llama3("llama3-405b", 126, 16384, 53248, 128, 405_853_388_800),
        # Small models that really run on a CPU (benchmarks, tests); no published counterpart.
        TransformerConfig("tiny", 2, 128, 4, d_mlp=512, vocab=512, seq_len=64, source="CPU test size"),
        TransformerConfig("small", 4, 256, 4, n_kv_heads=2, d_mlp=768, mlp="swiglu", vocab=2048, seq_len=128,
                          source="CPU benchmark size"),
    )
}


def parse_model(spec: str) -> TransformerConfig | nn.Module:
    """A model from a command-line string.

    - a preset name (see PRESETS);
    - "custom:n_layers=12,d_model=768,n_heads=12[,n_kv_heads=..,d_mlp=..,mlp=swiglu,vocab=..,
      seq_len=..,tied=1,bias=1,fused_qkv=1,learned_pos=1,norm=layer,head_dim=..]"
      (keys are TransformerConfig fields; short forms layers, d, heads, kv_heads, mlp_dim, seq also work);
    - "module:package.module:factory": factory() is called on the meta device and must return an nn.Module.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model must be a preset name, 'custom:...' or 'module:pkg.mod:factory', got {spec!r}")
    if spec in PRESETS:
        return PRESETS[spec]
    kind, _, rest = spec.partition(":")
    if kind == "custom":
        return _parse_custom(rest)
    if kind == "module":
        mod_name, _, attr = rest.partition(":")
        if not mod_name or not attr:
            raise ValueError(f"model={spec!r}: expected 'module:package.module:factory'")
        factory: Callable[[], nn.Module] = getattr(importlib.import_module(mod_name), attr)
        with torch.device("meta"):
            model = factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={spec!r}: {attr}() returned {type(model).__name__}, not an nn.Module")
        return model
    raise ValueError(
        f"model={spec!r} is not a preset ({', '.join(PRESETS)}), nor 'custom:key=value,...' "
        "nor 'module:package.module:factory'"
    )


_ALIASES = {"layers": "n_layers", "d": "d_model", "dim": "d_model", "heads": "n_heads", "kv_heads": "n_kv_heads",
            "mlp_dim": "d_mlp", "seq": "seq_len"}


def _parse_custom(text: str) -> TransformerConfig:
    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    values: dict = {"name": "custom"}
    for item in filter(None, text.split(",")):
        key, sep, raw = item.partition("=")
        key = _ALIASES.get(key.strip(), key.strip())
        if not sep or key not in fields or key in ("published_params", "source"):
            keys = sorted(set(fields) - {"source", "published_params"})
            raise ValueError(f"model: cannot read {item!r}; use key=value with keys from {keys}")
        kind = fields[key].type
        raw = raw.strip()
        if "bool" in str(kind):
            values[key] = raw.lower() in ("1", "true", "yes")
        elif "int" in str(kind):
            try:
                values[key] = int(raw)
            except ValueError:
                raise ValueError(f"model: {key} must be an int, got {raw!r}") from None
        else:
            values[key] = raw
    missing = [k for k in ("n_layers", "d_model", "n_heads") if k not in values]
    if missing:
        raise ValueError(f"model: custom models need {missing} (e.g. custom:layers=12,d=768,heads=12)")
    return TransformerConfig(**values)


# ---------------------------------------------------------------------------------- counting
def _as_module(model: TransformerConfig | nn.Module | str) -> nn.Module:
    if isinstance(model, str):
        model = parse_model(model)
    if isinstance(model, TransformerConfig):
        return build(model)
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"model must be a preset name, TransformerConfig or nn.Module, got {type(model).__name__}")


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
    attention_flops: int  # 6·L·ctx·d_attn·B (0 for models other than TransformerConfig presets)
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
    model: TransformerConfig | nn.Module | str,
    batch_tokens: int,
    steps: int = 5,
    *,
    symmetric: bool = False,
    model_dim: int | None = None,
    seq_len: int | None = None,
    **routing,
) -> Overhead:
    """Exact FLOPs of a muon.Muon step (NS of each same-shape group + elementwise work + AdamW groups)
    against a torch.optim.AdamW step on every parameter and against a training step of batch_tokens.

    model_dim: the width in Keller's bound (default: the config's d_model; for a plain nn.Module the
    largest short side of its Muon matrices, which keeps ns_overhead <= overhead_bound).
    seq_len: the attention context (default: the config's).
    """
    _check_int(batch_tokens, "batch_tokens", 1)
    _check_int(steps, "steps", 0)
    cfg = model if isinstance(model, TransformerConfig) else PRESETS.get(model) if isinstance(model, str) else None
    module = _as_module(model)
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
    attention = 0
    if cfg is not None:
        ctx = seq_len or cfg.seq_len
        attention = 6 * cfg.n_layers * ctx * cfg.d_attn * batch_tokens
    if model_dim is None:
        model_dim = cfg.d_model if cfg is not None else max((min(m, n) for _, m, n in shapes), default=1)
    extra = muon_flops - adamw_flops
    return Overhead(
        model=cfg.name if cfg is not None else type(module).__name__,
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


def total_params(model: TransformerConfig | nn.Module | str) -> int:
    """Unique parameter count (a tied head counts once), as published totals count."""
    return sum(p.numel() for p in _as_module(model).parameters())


def nonembedding_params(model: TransformerConfig | nn.Module | str) -> int:
    """Parameters outside embedding tables and the output head (Kaplan et al.'s N)."""
    module = _as_module(model)
    skip = {id(p) for mod in module.modules() if isinstance(mod, nn.Embedding) for p in mod.parameters(recurse=False)}
    if isinstance(module, Transformer):
        skip.add(id(module.lm_head.weight))
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)

