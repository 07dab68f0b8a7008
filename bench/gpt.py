"""A small GPT (byte-level, pre-LayerNorm) and the training loop the experiments share.

Width, depth and heads are parameters. Standard parametrization (GPT-2's init: N(0, 0.02), residual
projections 0.02/sqrt(2·depth)) by default; `mup_base_width` turns it into a muP model through
`muon.mup.apply` (input modules tok_emb and pos_emb, output module lm_head), the way a user would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import muon
import muon.mup

from .data import VOCAB, ByteData, sample_batch, val_batches

MUP_INPUT = ("tok_emb", "pos_emb")
MUP_OUTPUT = ("lm_head",)


@dataclass(frozen=True)
class GPTConfig:
    width: int = 64
    depth: int = 2
    heads: int = 4
    seq_len: int = 64
    vocab: int = VOCAB
    mlp_ratio: int = 4

    def __post_init__(self):
        for key in ("width", "depth", "heads", "seq_len", "vocab", "mlp_ratio"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")

    def matmul_params(self) -> int:
        """Parameters in matrix multiplies per token: blocks' weights and the head (not embeddings)."""
        d = self.width
        return self.depth * (4 * d * d + 2 * self.mlp_ratio * d * d) + d * self.vocab

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6·(matmul params) + attention's 6·depth·seq·width (causal half of 12)."""
        return 6 * self.matmul_params() + 6 * self.depth * self.seq_len * self.width


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, attn_scale: float | None):
        super().__init__()
        d = cfg.width
        self.heads, self.attn_scale = cfg.heads, attn_scale
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, cfg.mlp_ratio * d, bias=False)
        self.fc_out = nn.Linear(cfg.mlp_ratio * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attn_scale)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, attn_scale: float | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.width)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg, attn_scale) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        self._init_standard()

    @torch.no_grad()
    def _init_standard(self) -> None:
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                std = 0.02 / math.sqrt(2 * self.cfg.depth) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                p.normal_(0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build(cfg: GPTConfig, *, seed: int = 0, mup_base_width: int | None = None) -> GPT:
    """A GPT with a seeded init; with mup_base_width, a muP model (muon.mup.apply)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    if mup_base_width is not None:
        muon.mup.apply(model, input=MUP_INPUT, output=MUP_OUTPUT)
    return model


def make_optimizer(
    model: GPT,
    optimizer: str,
    lr: float,
    weight_decay: float,
    *,
    adamw_lr: float | None = None,
    mup_base_width: int | None = None,
    ns_dtype: torch.dtype | str = "auto",
    ns_options: dict | None = None,
) -> torch.optim.Optimizer:
    """"muon": muon.Muon over muon.param_groups(model) (muP groups with mup_base_width); "adamw": torch AdamW.

    Without muP, Muon uses adjust_lr_fn="match_rms_adamw" so that one lr serves its Muon and AdamW
    groups alike (Moonlight's recipe); with muP it uses "spectral" (see muon.mup) and adamw_lr.
    ns_dtype "auto" (the optimizer's default): bf16 NS on CUDA, fp32 on a CPU. ns_options: further
    muon.Muon keyword arguments of the Newton–Schulz step (ns_coefficients, ns_steps, ns_algorithm).
    """
    ns_options = dict(ns_options or {})
    betas = (0.9, 0.95)
    if optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    if optimizer != "muon":
        raise ValueError(f"optimizer must be 'muon' or 'adamw', got {optimizer!r}")
    if mup_base_width is not None:
        groups = muon.mup.param_groups(model, mup_base_width, model.cfg.width, lr=lr, adamw_lr=adamw_lr,
                                       input=MUP_INPUT, output=MUP_OUTPUT)
        return muon.Muon(groups, lr=lr, weight_decay=weight_decay, betas=betas, ns_dtype=ns_dtype, **ns_options)
    return muon.Muon(muon.param_groups(model), lr=lr, weight_decay=weight_decay, betas=betas,
                     adjust_lr_fn="match_rms_adamw", ns_dtype=ns_dtype, **ns_options)


@torch.no_grad()
def evaluate(model: GPT, batches) -> float:
    model.eval()
    losses = [model(x, y)[1].item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def train(
    model: GPT,
    opt: torch.optim.Optimizer,
    data: ByteData,
    *,
    batch: int,
    steps: int,
    seed: int = 0,
    warmup: int = 0,
    eval_every: int = 0,
    val_count: int = 4,
    val_batch: int = 16,
    progress=None,
) -> dict:
    """Train for `steps` steps of `batch` sequences; linear warmup then constant lr.

    Returns {"tokens": [...], "val_loss": [...]} at every eval (step 0 excluded, the last step
    included; eval_every=0 evaluates only at the end) and "final_val_loss". A non-finite training
    loss stops the run and reports val loss inf (a diverged point of a sweep).
    """
    seq = model.cfg.seq_len
    gen = torch.Generator().manual_seed(seed)
    val = val_batches(data.val, val_batch, seq, val_count)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    tokens, losses = [], []
    for step in range(1, steps + 1):
        x, y = sample_batch(data.train, batch, seq, gen)
        _, loss = model(x, y)
        if not math.isfinite(loss.item()):
            tokens.append(step * batch * seq)
            losses.append(math.inf)
            break
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if (eval_every and step % eval_every == 0) or step == steps:
            tokens.append(step * batch * seq)
            losses.append(evaluate(model, val))
        if progress is not None:
            progress.update(1)
    return {"tokens": tokens, "val_loss": losses, "final_val_loss": losses[-1]}


def config_dict(cfg: GPTConfig) -> dict:
    return asdict(cfg)
