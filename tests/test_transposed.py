"""Orientation-aware routing (`transposed=True`): a parameter stored (in, out) — transformers' Conv1D,
GPT-2's c_attn / c_proj / c_fc, or one the user marks — is updated exactly as the transposed nn.Linear
weight: update scale, NorMuon's output neurons, split/heads rows, QK-clip's heads, cautious decay and
the Newton–Schulz itself (the stacks hold the (out, in) matrices, so the NS runs on the same numbers
in the same layout: the updates are the transposes bit for bit, not within a tolerance).

The GPT-2 tests build the model from a small GPT2Config (no download) and the same network written
with nn.Linear, copy the weights across (transposed), and step both on the same gradients (the
Conv1D model's, transposed) for 10 steps on each path (the planned step, foreach=False and the reference loop),
comparing every parameter after every step. They skip naming what to install when transformers is
missing (fail in CI, tests/docblocks.py `require`).
"""

from __future__ import annotations

import math

import pytest
import torch
from docblocks import one_thread, require  # noqa: F401 (one_thread: autouse)
from helpers import STEP_PATHS, make_muon, option_sets
from torch import nn

import muon

TRANSFORMERS = "'fused-muon[test]' (or pip install transformers)"
D, HEADS, LAYERS, VOCAB, CTX = 64, 4, 2, 128, 32
STEPS = 10


# ------------------------------------------------------------------------------------- models
def gpt2_conv1d():
    """transformers' GPT-2 from a config (Conv1D weights, lm_head tied to wte), dropout off."""
    transformers = require("transformers", TRANSFORMERS)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(D)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(D, 3 * D)
        self.attn.c_proj = nn.Linear(D, D)
        self.ln_2 = nn.LayerNorm(D)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(D, 4 * D)
        self.mlp.c_proj = nn.Linear(4 * D, D)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, L, _ = h.shape
        q, k, v = self.attn.c_attn(self.ln_1(h)).split(D, dim=-1)
        q, k, v = (t.view(B, L, HEADS, D // HEADS).transpose(1, 2) for t in (q, k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.attn.c_proj(a.transpose(1, 2).reshape(B, L, D))
        return h + self.mlp.c_proj(nn.functional.gelu(self.mlp.c_fc(self.ln_2(h)), approximate="tanh"))


class LinearGPT2(nn.Module):
    """GPT-2 written with nn.Linear, with GPT2LMHeadModel's parameter names (so the same patterns
    route both) and its parameter order."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(VOCAB, D)
        self.transformer.wpe = nn.Embedding(CTX, D)
        self.transformer.h = nn.ModuleList(Block() for _ in range(LAYERS))
        self.transformer.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2's

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        h = t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))
        for block in t.h:
            h = block(h)
        return self.lm_head(t.ln_f(h))


def is_conv1d_weight(name: str) -> bool:
    return name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


def as_linear(name: str, t: torch.Tensor) -> torch.Tensor:
    """A GPT2LMHeadModel tensor as the nn.Linear network holds it."""
    return t.T if is_conv1d_weight(name) else t


def twin_models():
    hf = gpt2_conv1d()
    lin = LinearGPT2()
    theirs = dict(lin.named_parameters())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            theirs[name].copy_(as_linear(name, p))
    assert list(theirs) == [name for name, _ in hf.named_parameters()]
    return hf, lin


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_the_two_networks_are_the_same_network():
    """Weights copied across (transposed), the nn.Linear network computes GPT-2's logits and, up to
    fp32 rounding, its gradients: what the update tests below rely on."""
    hf, lin = twin_models()
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    logits_hf, logits_lin = hf(ids).logits, lin(ids)
    torch.testing.assert_close(logits_lin, logits_hf, rtol=1e-5, atol=1e-5)
    loss_of(logits_hf, ids).backward()
    loss_of(logits_lin, ids).backward()
    theirs = dict(lin.named_parameters())
    for name, p in hf.named_parameters():
        torch.testing.assert_close(theirs[name].grad, as_linear(name, p.grad), rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------- GPT-2
# (muon.Muon options, muon.param_groups options): each a case the orientation decides
CASES = {
    "default": ({}, {}),
    "spectral": ({"adjust_lr_fn": "spectral"}, {}),  # sqrt(m/n): c_fc 2, mlp.c_proj 0.5
    "normuon": ({"variant": "normuon"}, {}),
    "cautious": ({"cautious_weight_decay": True, "weight_decay": 0.5}, {}),
    "split_c_attn": ({}, {"split": {"*.c_attn.weight": [D, D, D]}}),
    "unequal_split": ({}, {"split": {"*.c_attn.weight": [2 * D, D]}}),  # q+k and v: mirrored blocks
    "heads_c_proj": ({}, {"heads": {"*.attn.c_proj.weight": HEADS}}),
    "qk_clip": ({}, {}),
}


def step_both(case: str, foreach: bool, steps: int = STEPS, hf_groups=None):
    """Step the Conv1D and the nn.Linear GPT-2 on the same gradients; yields (step, hf, lin) after each."""
    options, routing = CASES[case]
    hf, lin = twin_models()
    groups = muon.param_groups(hf, **routing) if hf_groups is None else hf_groups(hf)
    opts = [make_muon(groups, lr=0.02, foreach=foreach, backend="torch", **options),
            make_muon(muon.param_groups(lin, **routing), lr=0.02, foreach=foreach, backend="torch", **options)]
    if case == "qk_clip":
        for model, opt, transposed in ((hf, opts[0], True), (lin, opts[1], False)):
            clip = muon.QKClip(threshold=1.0)
            for i, block in enumerate(model.transformer.h):
                W, b = block.attn.c_attn.weight, block.attn.c_attn.bias
                q, k = (W[:, :D], W[:, D : 2 * D]) if transposed else (W[:D], W[D : 2 * D])
                clip.add(f"h{i}", q, k, num_heads=HEADS, q_bias=b[:D], k_bias=b[D : 2 * D], transposed=transposed)
            clip.attach_optimizer(opt)
            model._clip = clip
    gen = torch.Generator().manual_seed(1)
    theirs = dict(lin.named_parameters())
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (4, 16), generator=gen)
        loss_of(hf(ids).logits, ids).backward()
        for name, p in hf.named_parameters():
            theirs[name].grad = as_linear(name, p.grad).contiguous()
        if case == "qk_clip":  # the same per-head maxima for both: heads 0 and 2 above τ, every layer
            for model in (hf, lin):
                for i in range(LAYERS):
                    model._clip.record(f"h{i}", torch.tensor([3.0, 0.5, 1.0 + step, 0.9]))
        for opt in opts:
            opt.step()
            opt.zero_grad()
        yield step, hf, lin, opts


def max_difference(hf, lin) -> float:
    theirs = dict(lin.named_parameters())
    return max((as_linear(n, p) - theirs[n]).abs().max().item() for n, p in hf.named_parameters())


@STEP_PATHS
@pytest.mark.parametrize("case", list(CASES))
def test_conv1d_gpt2_updates_are_the_transposed_linear_updates(case, foreach):
    """10 steps; every parameter compared after every step: equal bit for bit (the fp32 noise
    between the two networks' own gradients, test_the_two_networks_are_the_same_network, is kept out
    by giving both the same gradients, so any difference is the optimizer's)."""
    for step, hf, lin, opts in step_both(case, foreach):
        theirs = dict(lin.named_parameters())
        for name, p in hf.named_parameters():
            assert torch.equal(as_linear(name, p), theirs[name]), (step, name, max_difference(hf, lin))
        if case == "normuon":  # one moment per output neuron, as nn.Linear's
            for name, p in hf.named_parameters():
                if is_conv1d_weight(name):
                    v = opts[0].state[p]["normuon_v"]
                    assert v.shape == (p.shape[1],) and torch.equal(v, opts[1].state[theirs[name]]["normuon_v"])
    groups = opts[0].param_groups
    assert [g.get("transposed", False) for g in groups if g["use_muon"]] == [True] * sum(g["use_muon"] for g in groups)


def test_without_orientation_the_conv1d_update_scale_is_reversed():
    """What the routing fixes: the same Conv1D weights in a group without transposed=True get
    sqrt(max(1, in/out)) — mlp.c_proj 2 instead of 1, c_fc 1 instead of 2 — and drift apart."""

    def unoriented(hf):
        return [{k: v for k, v in g.items() if k != "transposed"} for g in muon.param_groups(hf)]

    for _, hf, lin, _ in step_both("default", True, steps=1, hf_groups=unoriented):
        c_fc, c_fc_lin = hf.transformer.h[0].mlp.c_fc.weight, lin.transformer.h[0].mlp.c_fc.weight
        assert not torch.allclose(c_fc.T, c_fc_lin, rtol=0, atol=1e-4)


def test_param_groups_find_conv1d_weights_by_class():
    hf = gpt2_conv1d()
    groups = muon.param_groups(hf)
    muon_groups = [g for g in groups if g["use_muon"]]
    assert len(muon_groups) == 1 and muon_groups[0]["transposed"] is True
    names = {id(p): n for n, p in hf.named_parameters()}
    assert sorted(names[id(p)] for p in muon_groups[0]["params"]) == sorted(
        n for n, p in hf.named_parameters() if is_conv1d_weight(n)
    )
    # split counts out features (GPT-2's c_attn: 3·d outputs, stored (d, 3d))
    with pytest.raises(ValueError, match=r"sums to 128, but 'transformer.h.0.attn.c_attn.weight' has 192 rows"):
        muon.param_groups(hf, split={"*.c_attn.weight": [D, D]})
    with pytest.raises(ValueError, match="muon_options cannot set 'transposed'"):
        muon.param_groups(hf, muon_options={"transposed": True})
    c_fc = hf.transformer.h[0].mlp.c_fc  # muP's fans read Conv1D as (in, out) too
    assert muon.mup.fans(c_fc, c_fc.weight) == (D, 4 * D)


def test_orientation_survives_state_dict_and_resume():
    """transposed is a group key: saved in state_dict(), restored by load_state_dict(); a state dict
    without it (an older version's, torch.optim.Muon's) keeps the orientation of the group it loads
    into. Resuming continues bit for bit (NorMuon's per-neuron moments included)."""
    through = list(step_both("normuon", True, steps=6))[-1][1]
    for step, model, _, opts in step_both("normuon", True, steps=6):
        if step == 2:
            hf, saved = model, opts[0].state_dict()
            break
    assert [g.get("transposed") for g in saved["param_groups"]] == [True, None]
    old = {**saved, "param_groups": [{k: v for k, v in g.items() if k != "transposed"} for g in saved["param_groups"]]}
    for state_dict in (saved, old):
        fresh = muon.Muon(muon.param_groups(hf), lr=0.02, backend="torch", variant="normuon")
        fresh.load_state_dict(state_dict)
        assert fresh.param_groups[0]["transposed"] is True
    # resume: a new optimizer on a copy of the model at step 3, loaded, continued for steps 4..6
    resumed = gpt2_conv1d()
    resumed.load_state_dict(hf.state_dict())
    opt = muon.Muon(muon.param_groups(resumed), lr=0.02, backend="torch", variant="normuon")
    opt.load_state_dict(saved)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        ids = torch.randint(0, VOCAB, (4, 16), generator=gen)
        if step < 3:
            continue
        loss_of(resumed(ids).logits, ids).backward()
        opt.step()
        opt.zero_grad()
    for (name, p), q in zip(resumed.named_parameters(), through.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_qk_clip_finds_conv1d_modules_and_scales_their_columns():
    hf = gpt2_conv1d()
    attn = hf.transformer.h[0].attn
    clip = muon.QKClip(threshold=1.0)
    with pytest.raises(ValueError, match="q_weight has 64 columns, not a multiple of num_heads=3"):
        clip.add("bad", attn.c_attn.weight[:, :D], attn.c_attn.weight[:, D : 2 * D], num_heads=3, transposed=True)
    proj = attn.c_proj  # a Conv1D module as both q and k: its weight's heads are its columns
    before = proj.weight.detach().clone()
    clip.add("proj", proj, proj, num_heads=HEADS)
    clip.record("proj", torch.tensor([4.0, 0.5, 0.5, 0.5]))
    clip.step()
    hd = D // HEADS
    # query and key both scaled by sqrt(1/4): head 0's columns by 1/4 in all, the rest untouched
    torch.testing.assert_close(proj.weight[:, :hd], before[:, :hd] / 4, rtol=1e-6, atol=0)
    assert torch.equal(proj.weight[:, hd:], before[:, hd:])


# ------------------------------------------------------------------------ user-marked parameters
class InOut(nn.Module):
    """A layer of the user's that stores its weight (in, out): y = x @ w (for 3-D, one per expert)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(*shape) / math.sqrt(shape[-2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


class Marked(nn.Module):
    """A wide, a tall and a square (in, out) matrix, and a stack of 3 (in, out) experts."""

    def __init__(self) -> None:
        super().__init__()
        self.up = InOut(24, 40)
        self.down = InOut(40, 24)
        self.mix = InOut(24, 24)
        self.experts = InOut(3, 24, 16)


class Plain(nn.Module):
    """The same layers written (out, in), as nn.Linear stores them."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(24, 40, bias=False)
        self.down = nn.Linear(40, 24, bias=False)
        self.mix = nn.Linear(24, 24, bias=False)
        self.experts = nn.Module()
        self.experts.w = nn.Parameter(torch.zeros(3, 16, 24))


MARKED_CASES = {
    "default": ({}, {}),
    "spectral": ({"adjust_lr_fn": "spectral"}, {}),
    "normuon": ({"variant": "normuon"}, {}),
    "heads": ({}, {"heads": {"experts.w": 4, "up.*": 5}}),
    "split": ({"cautious_weight_decay": True}, {"split": {"down.*": [16, 8], "mix.*": [20, 4]}}),
}


@STEP_PATHS
@pytest.mark.parametrize("case", list(MARKED_CASES))
def test_user_marked_parameters_update_as_their_transposes(case, foreach):
    options, routing = MARKED_CASES[case]
    torch.manual_seed(0)
    marked, plain = Marked(), Plain()
    names = ["up.w", "down.w", "mix.w", "experts.w"]
    mine = dict(marked.named_parameters())
    theirs = {"up.w": plain.up.weight, "down.w": plain.down.weight, "mix.w": plain.mix.weight,
              "experts.w": plain.experts.w}
    with torch.no_grad():
        for n in names:
            theirs[n].copy_(mine[n].mT)
    plain_routing = {k: {pat.replace("*", "weight") if pat.endswith("*") else pat: v for pat, v in rules.items()}
                     for k, rules in routing.items()}
    groups = muon.param_groups(marked, transposed=["*.w"], muon=["*"], **routing)
    assert all(g["transposed"] for g in groups if g["use_muon"])
    opts = [make_muon(groups, lr=0.05, foreach=foreach, backend="torch", **options),
            make_muon(muon.param_groups(plain, muon=["*"], **plain_routing), lr=0.05, foreach=foreach,
                      backend="torch", **options)]
    gen = torch.Generator().manual_seed(2)
    for step in range(5):
        for n in names:
            mine[n].grad = torch.randn(mine[n].shape, generator=gen)
            theirs[n].grad = mine[n].grad.mT.contiguous()
        for opt in opts:
            opt.step()
        for n in names:
            assert torch.equal(mine[n].mT, theirs[n]), (case, step, n)
    if case == "normuon":
        assert opts[0].state[mine["experts.w"]]["normuon_v"].shape == (3, 16)  # (experts, out)


def test_hand_built_transposed_group_and_its_checks():
    """transposed=True as a group key (or muon.Muon's default) without muon.param_groups."""
    torch.manual_seed(0)
    w = torch.randn(8, 32, requires_grad=True)  # (in=8, out=32)
    ref = w.detach().T.clone().requires_grad_(True)  # (out, in)
    opts = [muon.Muon([{"params": [w], "transposed": True}], lr=0.02), muon.Muon([ref], lr=0.02)]
    for _ in range(3):
        w.grad = torch.randn(8, 32)
        ref.grad = w.grad.T.contiguous()
        for opt in opts:
            opt.step()
    assert torch.equal(w.T, ref)
    assert muon.Muon([w], transposed=True).param_groups[0]["transposed"] is True
    conv = torch.randn(4, 3, 3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="does not combine with flatten=True"):
        muon.Muon([{"params": [conv], "flatten": True, "transposed": True}])
    with pytest.raises(ValueError, match="transposed must be True or False"):
        muon.Muon([{"params": [w], "transposed": 1}])
    with pytest.raises(ValueError, match="transposed pattern 'nothing' matches no parameter routed to Muon"):
        muon.param_groups(Marked(), transposed=["nothing"])
    with pytest.raises(ValueError, match="routed with flatten=True"):
        # the second conv: the first reads the input and goes to AdamW (muon.param_groups' input layer)
        muon.param_groups(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)), transposed=["1.weight"])


@STEP_PATHS
@option_sets("muon", "normuon", "cautious")
def test_bf16_and_stacked_transposed_parameters(options, foreach):
    """bf16 parameters (updated through fp32 work copies of the stacks) and 3-D/4-D stacks of (in,
    out) matrices, wide, tall and square, in one group: the transposes of the (out, in) updates."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(24, 40), (40, 24), (24, 24), (3, 24, 16), (2, 2, 8, 12)]
    mine = [torch.randn(s, generator=gen).to(torch.bfloat16).requires_grad_(True) for s in shapes]
    theirs = [p.detach().mT.contiguous().requires_grad_(True) for p in mine]
    # flatten=False: the 4-D stack is a batch of matrices (a >= 4-D parameter must say so)
    opts = [make_muon([{"params": mine, "transposed": True}], lr=0.05, foreach=foreach, flatten=False, **options),
            make_muon(theirs, lr=0.05, foreach=foreach, flatten=False, **options)]
    for step in range(4):
        for p, q in zip(mine, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
            q.grad = p.grad.mT.contiguous()
        for opt in opts:
            opt.step()
        for p, q in zip(mine, theirs, strict=True):
            assert torch.equal(p.mT, q), (step, tuple(p.shape))
