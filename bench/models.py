"""The benchmark's model zoo: a decoder-only transformer whose shapes reproduce GPT-2, Llama 3, Essential
AI's and Moonlight's models (`PRESETS`), built as an `nn.Module` (on the `meta` device by default, so
nothing is allocated even for Llama 3 405B), and the command-line model specs of `python -m bench`.

    from bench.models import PRESETS, build, parse_model
    model = build(PRESETS["gpt2-124m"])               # meta device
    cfg = parse_model("custom:layers=2,d=64,heads=2")  # a TransformerConfig

`muon.flops` counts FLOPs of any nn.Module; `overhead(spec, batch_tokens)` here gives it a preset's
width (Keller's bound) and attention FLOPs. bench/gpt.py is the training experiments' model (muP,
its own initialization and loss), not one of these.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from muon import flops
from muon.ns_flops import _check_int  # the FLOP formulas' argument check, for the config's sizes

__all__ = ["PRESETS", "Transformer", "TransformerConfig", "as_module", "build", "overhead", "parse_model"]


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

    def attention_flops_per_token(self, seq_len: int | None = None) -> int:
        """QKᵀ and AV of a training step per token, which 6·N·B leaves out: Kaplan et al. (2020)'s
        6·L·ctx·d_attn, no causal halving; ctx = seq_len (default: the config's)."""
        return 6 * self.n_layers * (seq_len or self.seq_len) * self.d_attn


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


def as_module(model: str | TransformerConfig | nn.Module) -> nn.Module:
    """A model spec (see parse_model) or config built on the meta device; a module as it is."""
    if isinstance(model, str):
        model = parse_model(model)
    if isinstance(model, TransformerConfig):
        return build(model)
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"model must be a preset name, TransformerConfig or nn.Module, got {type(model).__name__}")


def overhead(
    model: str | TransformerConfig | nn.Module, batch_tokens: int, steps: int = 5, *, seq_len: int | None = None,
    **options,
) -> flops.Overhead:
    """`muon.flops.overhead` of a model spec, config or module. A config (a preset, "custom:...") also
    gives the report its name, its d_model as Keller's model_dim (unless given) and its attention FLOPs
    at seq_len (default: the config's context); `options` go to muon.flops.overhead."""
    cfg = parse_model(model) if isinstance(model, str) else model
    if not isinstance(cfg, TransformerConfig):
        return flops.overhead(as_module(cfg), batch_tokens, steps, **options)
    options.setdefault("model_dim", cfg.d_model)
    return flops.overhead(build(cfg), batch_tokens, steps, name=cfg.name,
                          attention_flops_per_token=cfg.attention_flops_per_token(seq_len), **options)
