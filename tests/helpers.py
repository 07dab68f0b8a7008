"""Helpers the tests share: parameters of an optimizer, gradients, step runners, bit-equality of
parameters and state, the float64 references of the NorMuon/Muon and AdamW updates, GPT-2-shaped
parameter sets, the reference loop as an optimizer (`ReferenceMuon`), and the option matrix the
step tests run over (`STEP_PATHS`, `OPTION_SETS`, `option_sets`: in the spirit of torch's
OptimizerInfo, one list every file parametrizes with). Import as `from helpers import ...` (tests/ is
on sys.path)."""

from __future__ import annotations

import pytest
import torch
from nsref import ns_float64
from reference_loop import reference_step

import muon
from muon._shapes import update_scale


class ReferenceMuon(muon.Muon):
    """The per-parameter reference loop (tests/reference_loop.py) as an optimizer: the oracle the
    step engine is compared with, bit for bit, in one process. Validation, state dicts and
    checkpoints are muon.Muon's; only the step's arithmetic is the loop's."""

    def _planned_step(self) -> None:
        reference_step(self.param_groups, self.state, self.nonfinite, self.process_group)


# ------------------------------------------------------------------------------ the option matrix
# The three ways a step runs, as make_muon's `foreach`: the planned step (None, which True equals),
# the same plan in its smallest chunks (False) and the per-parameter reference loop ("reference").
STEP_PATHS = pytest.mark.parametrize("foreach", [None, False, "reference"], ids=["planned", "smallest-chunks", "loop"])

# Named option sets that change what a step computes beyond the defaults: NorMuon (per-neuron second
# moments), cautious weight decay, and NS in bf16 (as on CUDA: the update is still formed in fp32).
OPTION_SETS = {
    "muon": {},
    "normuon": {"variant": "normuon"},
    "cautious": {"cautious_weight_decay": True},
    "normuon+cautious": {"variant": "normuon", "cautious_weight_decay": True, "normuon_beta2": 0.9,
                         "weight_decay": 0.3},
    "bf16-ns": {"ns_dtype": torch.bfloat16},
    "bf16-ns+normuon": {"ns_dtype": torch.bfloat16, "variant": "normuon"},
}  # fmt: skip


def option_sets(*names: str):
    """@option_sets("muon", "normuon", ...): parametrize `options` over those OPTION_SETS (all: none
    named), each a fresh dict named by its key."""
    names = names or tuple(OPTION_SETS)
    return pytest.mark.parametrize("options", [dict(OPTION_SETS[n]) for n in names], ids=list(names))


def make_muon(params, foreach=None, **options) -> muon.Muon:
    """muon.Muon(params, foreach=foreach, **options); foreach="reference": the reference loop."""
    if foreach == "reference":
        return ReferenceMuon(params, **options)
    return muon.Muon(params, foreach=foreach, **options)


def params_of(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


# ------------------------------------------------------------------------------ gradients and steps
def set_grads(params, seed: int | torch.Generator, bad=(), missing=(), *, draw_in_dtype: bool = False) -> None:
    """Seeded random gradients in each parameter's dtype; `bad` indices get one NaN or inf, `missing` none.

    seed: an int (a fresh generator) or a torch.Generator to draw from (a sequence of steps from one
    generator). The values are drawn in float32 and cast to the parameter's dtype; draw_in_dtype=True
    draws them in that dtype (float64 gradients with float64's own random bits).
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    for j, p in enumerate(params):
        if j in missing:
            p.grad = None
            continue
        if draw_in_dtype:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        else:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if j in bad:
            p.grad.view(-1)[j % p.numel()] = float("nan") if j % 2 else float("inf")


def run_steps(opt, seeds, params=None, **grads) -> None:
    """One opt.step() per seed, after set_grads(params, seed, **grads); params: default every
    parameter of the optimizer, in group order."""
    for seed in seeds:
        set_grads(params_of(opt) if params is None else params, seed, **grads)
        opt.step()


def run_history(make, params, grads_seq, *, dtype=None, **options):
    """(optimizer, its parameters, parameters after each step): make(copies of params, **options)
    steps once per entry of grads_seq with those gradients (copied, in the parameters' dtype).

    dtype: the copies' dtype (default: each parameter's own)."""
    params = [p.detach().to(dtype or p.dtype, copy=True).requires_grad_(True) for p in params]
    opt = make(params, **options)
    history = []
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype, copy=True)
        opt.step()
        history.append([p.detach().clone() for p in params])
    return opt, params, history


# -------------------------------------------------------------------------------- bit equality
def bit_equal(a, b) -> bool:
    """Bit-equal (NaN == NaN, -0.0 != 0.0), same dtype and shape; other values by ==."""
    if not isinstance(a, torch.Tensor):
        return a == b
    if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))


def assert_state_dicts_equal(a, b) -> None:
    """Two optimizer state dicts: the same param_groups, and every state entry bit-equal (`bit_equal`)."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert a["state"][key].keys() == b["state"][key].keys()
        for name, value in a["state"][key].items():
            assert bit_equal(value, b["state"][key][name]), (key, name)


def snapshot(opt) -> tuple[list[torch.Tensor], dict]:
    """Copies of every parameter and state tensor (bits), to compare after a step."""
    params = [p.detach().clone() for p in params_of(opt)]
    state = {i: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for i, p in enumerate(params_of(opt)) if p in opt.state}
    return params, state


def assert_snapshot(opt, snap) -> None:
    params, state = snap
    for p, q in zip(params_of(opt), params, strict=True):
        assert torch.equal(p, q), f"a parameter of shape {tuple(p.shape)} changed"
    now = {i: opt.state[p] for i, p in enumerate(params_of(opt)) if p in opt.state}
    assert now.keys() == state.keys(), "state was created or dropped"
    for i, entries in state.items():
        assert now[i].keys() == entries.keys(), (i, now[i].keys(), entries.keys())
        for k, v in entries.items():
            assert torch.equal(now[i][k], v), (i, k)


def assert_same(a, b) -> None:
    """Two optimizers hold bit-identical parameters and state (through their state dicts)."""
    for p, q in zip(params_of(a), params_of(b), strict=True):
        assert torch.equal(p, q), p.shape
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for key in sa[k]:
            assert torch.equal(sa[k][key], sb[k][key]), (k, key)


# ------------------------------------------------------------------------------ float64 references
def _matrices(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *t.shape[-2:])


def normuon_reference(params, grads_seq, *, lr, weight_decay, momentum=0.95, nesterov=True, normuon=True,
                      beta2=0.95, eps=1e-8, cautious=False, adjust_lr_fn=None):
    """The algorithm as written in the papers, in float64, one matrix at a time, no shortcuts;
    normuon=False is plain Muon. Returns (parameters after each step, final second moments).

    NorMuon (arXiv 2510.05491, Algorithm 1; microsoft/dion dion/normuon.py): per matrix O (m×n),
    v ← β2·v + (1-β2)·mean_cols(O⊙O), Ô = O / (sqrt(v) + eps), Ô ← Ô·‖O‖_F / max(‖Ô‖_F, eps).
    Cautious weight decay (arXiv 2510.12402): W ← W - lr·wd·W⊙[u⊙W >= 0] - lr·u.
    """
    W = [_matrices(p.clone()) for p in params]
    M = [torch.zeros_like(w) for w in W]
    V = [torch.zeros(w.shape[:-1], dtype=torch.float64) for w in W]
    history = []
    for grads in grads_seq:
        for w, m_buf, v, g in zip(W, M, V, grads):
            g = _matrices(g)
            m_buf.mul_(momentum).add_((1 - momentum) * g)
            U = g + momentum * (m_buf - g) if nesterov else m_buf
            for k in range(w.shape[0]):
                O = ns_float64(U[k])
                if normuon:
                    v[k] = beta2 * v[k] + (1 - beta2) * (O * O).mean(dim=1)
                    normalized = O / (v[k].sqrt()[:, None] + eps)
                    O = normalized * torch.linalg.norm(O) / max(torch.linalg.norm(normalized), eps)
                u = update_scale(adjust_lr_fn, *O.shape) * O
                decayed = (u * w[k] >= 0) if cautious else torch.ones_like(u, dtype=torch.bool)
                w[k] = w[k] - lr * weight_decay * w[k] * decayed - lr * u
        history.append([w.reshape(p.shape).clone() for w, p in zip(W, params)])
    return history, [v.reshape(v.shape if p.ndim > 2 else v.shape[1:]) for v, p in zip(V, params)]


def adamw_reference(params, grads_seq, lr, betas, eps, weight_decay, cautious):
    """AdamW (decoupled weight decay, bias-corrected moments) in the parameters' dtype, with cautious
    weight decay (only where the update and the weight agree in sign) when cautious=True."""
    beta1, beta2 = betas
    W = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_seq, start=1):
        for w, m_, v_, g in zip(W, m, v, grads):
            m_.mul_(beta1).add_((1 - beta1) * g)
            v_.mul_(beta2).add_((1 - beta2) * g * g)
            u = (m_ / (1 - beta1**t)) / ((v_ / (1 - beta2**t)).sqrt() + eps)
            decayed = (u * w >= 0) if cautious else torch.ones_like(u, dtype=torch.bool)
            w.sub_(lr * weight_decay * w * decayed + lr * u)
    return W


# ---------------------------------------------------------------------------------- parameter sets
def gpt_like(layers: int, d: int = 64, vocab: int = 128, ctx: int = 32):
    """GPT-2's parameter structure at width d: per layer c_attn (3d×d), attn c_proj (d×d), c_fc (4d×d),
    mlp c_proj (d×4d), two LayerNorms (weight, bias); embeddings and a final LayerNorm."""
    mats, rest = [], []
    for _ in range(layers):
        mats += [torch.randn(3 * d, d), torch.randn(d, d), torch.randn(4 * d, d), torch.randn(d, 4 * d)]
        rest += [torch.ones(d), torch.zeros(d), torch.ones(d), torch.zeros(d)]
    rest += [torch.randn(vocab, d), torch.randn(ctx, d), torch.ones(d), torch.zeros(d)]
    return [p.requires_grad_(True) for p in mats], [p.requires_grad_(True) for p in rest]
