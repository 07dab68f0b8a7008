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


def wsd_multiplier(step: int, length: int, warmup: int, decay_frac: float) -> float:
    """The lr multiplier of step `step` (1-based) of a run of `length` steps: linear warmup over `warmup`
    steps, constant, then a linear decay over the last round(decay_frac·length) steps that ends one
    decay step above 0 (warmup–stable–decay; Hägele et al. 2024 find it matches a cosine to the end)."""
    decay = max(1, round(decay_frac * length))
    start = length - decay
    warm = min(1.0, step / warmup) if warmup else 1.0
    return warm * (1.0 if step <= start else (length - step + 1) / (decay + 1))


def decay_starts(lengths: list[int], decay_frac: float) -> dict[int, int]:
    """{step after which a run of each length leaves the stable phase: that length}."""
    return {length - max(1, round(decay_frac * length)): length for length in lengths}


def train_wsd(
    model: GPT,
    opt: torch.optim.Optimizer,
    data: ByteData,
    *,
    batch: int,
    lengths: list[int],
    warmup: int,
    decay_frac: float = 0.2,
    seed: int = 0,
    val: list | None = None,
    val_count: int = 4,
    val_batch: int = 16,
    clip: float | None = 1.0,
    device: torch.device | str = "cpu",
    progress=None,
) -> dict:
    """Warmup–stable–decay runs of several `lengths` (steps) from one trajectory.

    The longest length is the run itself; for every shorter one the run's state (model, optimizer,
    data order) is saved where that length's decay starts, the decay is run to its end and evaluated,
    and the state is restored, so each end-of-decay loss is the one a separate run of that length
    (same warmup, same data order) would end with. Returns {"lengths": [steps...], "decayed": [val
    loss at each length's end of decay], "stable": [val loss where each decay starts]} (inf after a
    non-finite training loss: a diverged run).
    """
    import copy

    lengths = sorted(set(lengths))
    steps = lengths[-1]
    seq = model.cfg.seq_len
    gen = torch.Generator().manual_seed(seed)
    if val is None:
        val = val_batches(data.val, val_batch, seq, val_count)
    val = [(x.to(device), y.to(device)) for x, y in val]
    base = [g["lr"] for g in opt.param_groups]
    branch_at = {s: n for s, n in decay_starts(lengths, decay_frac).items() if n != steps}
    decayed: dict[int, float] = {}
    stable: dict[int, float] = {}

    def step_once(step: int, length: int) -> bool:
        m = wsd_multiplier(step, length, warmup, decay_frac)
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr * m
        x, y = sample_batch(data.train, batch, seq, gen)
        _, loss = model(x.to(device), y.to(device))
        if not math.isfinite(loss.item()):
            return False
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return True

    ok = True
    for step in range(0, steps + 1):
        if step:
            ok = step_once(step, steps)
            if progress is not None:
                progress.update(1)
            if not ok:
                break
        if step == steps - max(1, round(decay_frac * steps)):
            stable[steps] = evaluate(model, val)
        if step in branch_at:
            length = branch_at[step]
            stable[length] = evaluate(model, val)
            saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), gen.get_state())
            branch_ok = all(step_once(s, length) for s in range(step + 1, length + 1))
            decayed[length] = evaluate(model, val) if branch_ok else math.inf
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
            gen.set_state(saved[2])
    if ok:
        decayed[steps] = evaluate(model, val)
    for length in lengths:
        decayed.setdefault(length, math.inf)
        stable.setdefault(length, math.inf)
    return {"lengths": lengths, "decayed": [decayed[n] for n in lengths], "stable": [stable[n] for n in lengths]}
