"""Helpers the tests share: parameters of an optimizer, gradients, bit-equality of parameters and
state, GPT-2-shaped parameter sets. Import as `from helpers import ...` (tests/ is on sys.path)."""

from __future__ import annotations

import torch


def params_of(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def set_grads(params, seed: int, bad=(), missing=()) -> None:
    """Seeded random gradients in each parameter's dtype; `bad` indices get one NaN or inf, `missing` none."""
    gen = torch.Generator().manual_seed(seed)
    for j, p in enumerate(params):
        if j in missing:
            p.grad = None
            continue
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if j in bad:
            p.grad.view(-1)[j % p.numel()] = float("nan") if j % 2 else float("inf")


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


def gpt_like(layers: int, d: int = 64, vocab: int = 128, ctx: int = 32):
    """GPT-2's parameter structure at width d: per layer c_attn (3d×d), attn c_proj (d×d), c_fc (4d×d),
    mlp c_proj (d×4d), two LayerNorms (weight, bias); embeddings and a final LayerNorm."""
    mats, rest = [], []
    for _ in range(layers):
        mats += [torch.randn(3 * d, d), torch.randn(d, d), torch.randn(4 * d, d), torch.randn(d, 4 * d)]
        rest += [torch.ones(d), torch.zeros(d), torch.ones(d), torch.zeros(d)]
    rest += [torch.randn(vocab, d), torch.randn(ctx, d), torch.ones(d), torch.zeros(d)]
    return [p.requires_grad_(True) for p in mats], [p.requires_grad_(True) for p in rest]
