"""muon.mup: the coordinate check, the table's multipliers / init / learning-rate scales, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import muon
import muon.mup as mup
from bench import data as D
from bench import gpt as G

WIDTHS = (32, 64, 128, 256)
BASE = 32


@pytest.fixture(scope="module")
def byte_data():
    return D.load(max_bytes=2**19)


def _rms(t: torch.Tensor) -> float:
    return t.float().pow(2).mean().sqrt().item()


def _activations_after_training(width: int, use_mup: bool, data, steps: int = 10, lr: float = 0.02) -> dict:
    """RMS of every layer's output (embedding sum, each block, logits) after `steps` Muon steps."""
    cfg = G.GPTConfig(width=width, depth=2, heads=width // 16, seq_len=32)  # head size fixed at 16
    model = G.build(cfg, seed=0, mup_base_width=BASE if use_mup else None)
    # muP: Muon lr and AdamW lr at the base width; without muP one lr for every group
    # (Muon "match_rms_adamw", AdamW's standard parametrization)
    # fp32 NS: the check is about parametrization, and bf16 GEMMs are ~100x slower on a CPU
    opt = G.make_optimizer(model, "muon", lr, 0.0, adamw_lr=lr, mup_base_width=BASE if use_mup else None,
                           ns_dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = D.sample_batch(data.train, 8, cfg.seq_len, gen)
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    acts: dict[str, float] = {}
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, a: acts.__setitem__("embed", _rms(a[0])))]
    for i, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(lambda m, a, out, i=i: acts.__setitem__(f"block{i}", _rms(out))))
    hooks.append(model.lm_head.register_forward_hook(lambda m, a, out: acts.__setitem__("logits", _rms(out))))
    x, _ = D.sample_batch(data.val, 8, cfg.seq_len, torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return acts


def test_coordinate_check_mup_stays_flat_and_standard_drifts(byte_data):
    with_mup = {w: _activations_after_training(w, True, byte_data) for w in WIDTHS}
    without = {w: _activations_after_training(w, False, byte_data) for w in WIDTHS}
    layers = list(with_mup[BASE])
    assert layers == ["embed", "block0", "block1", "logits"]
    for layer in layers:
        values = [with_mup[w][layer] for w in WIDTHS]
        assert all(math.isfinite(v) and v > 0 for v in values), (layer, values)
        # O(1) across an 8x width range: no layer moves by more than 1.5x (measured: <= 1.1x)
        assert max(values) / min(values) < 1.5, (layer, values)
        # and the activations are Theta(1) in absolute terms, not vanishing
        assert 0.1 < min(values) and max(values) < 20, (layer, values)
    # without muP the hidden layers' activations grow with width (measured ~3-5x from 32 to 256)
    growth = {layer: without[WIDTHS[-1]][layer] / without[BASE][layer] for layer in layers}
    assert max(growth["block0"], growth["block1"]) > 2.5, growth
    assert max(growth.values()) > 2 * max(with_mup[WIDTHS[-1]][k] / with_mup[BASE][k] for k in layers), growth


class TinyNet(nn.Module):
    """An MLP on fixed-size input, with a biased input layer and a biased head, and a norm."""

    def __init__(self, width: int, d_in: int = 5, d_out: int = 3):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.hidden = nn.Linear(width, 2 * width, bias=True)
        self.hidden2 = nn.Linear(2 * width, width, bias=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, d_out)

    def forward(self, x):
        return self.head(self.norm(self.hidden2(torch.relu(self.hidden(torch.relu(self.inp(x)))))))


def test_roles_default_and_patterns():
    model = G.GPT(G.GPTConfig(width=32, depth=1, heads=2, seq_len=8))
    r = mup.roles(model)
    assert r["tok_emb.weight"] == r["pos_emb.weight"] == "input"
    assert r["lm_head.weight"] == "output"
    assert r["blocks.0.qkv.weight"] == r["blocks.0.fc_out.weight"] == "hidden"
    assert r["blocks.0.ln1.weight"] == r["ln_f.bias"] == "vector"
    net = TinyNet(16)
    r = mup.roles(net, input=["inp"], output=["head"])
    assert r == {"inp.weight": "input", "inp.bias": "input", "hidden.weight": "hidden", "hidden.bias": "vector",
                 "hidden2.weight": "hidden", "norm.weight": "vector", "norm.bias": "vector",
                 "head.weight": "output", "head.bias": "vector"}


def test_apply_multipliers_and_init_follow_the_table():
    width, d_in = 256, 5
    torch.manual_seed(0)
    net = TinyNet(width, d_in)
    mup.apply(net, input=["inp"], output=["head"])
    # init standard deviations: input 1/sqrt(fan_out), hidden and output 1/sqrt(fan_in) (large samples: 5 %)
    for p, std in ((net.inp.weight, 1 / math.sqrt(width)), (net.hidden.weight, 1 / math.sqrt(width)),
                   (net.hidden2.weight, 1 / math.sqrt(2 * width)), (net.head.weight, 1 / math.sqrt(width))):
        assert abs(p.std().item() / std - 1) < 0.05
        assert abs(p.mean().item()) < 4 * std / math.sqrt(p.numel())
    assert torch.count_nonzero(net.inp.bias) == 0  # input bias zeroed (the input column covers biases)
    # multipliers: the input layer's output (weight and bias) x sqrt(fan_out) ...
    with torch.no_grad():
        net.inp.bias.normal_()
        net.head.bias.normal_()
    x = torch.randn(4, d_in, dtype=torch.float32)
    torch.testing.assert_close(net.inp(x), (x @ net.inp.weight.T + net.inp.bias) * math.sqrt(width))
    # ... the head's W x by 1/sqrt(fan_in), its bias unscaled
    h = torch.randn(4, width)
    torch.testing.assert_close(net.head(h), h @ net.head.weight.T / math.sqrt(width) + net.head.bias)
    # embeddings: fan_out is the embedding dim (weight is (num, dim))
    model = G.build(G.GPTConfig(width=64, depth=1, heads=4, seq_len=8), mup_base_width=32)
    assert abs(model.tok_emb.weight.std().item() * math.sqrt(64) - 1) < 0.05
    idx = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model.tok_emb(idx), model.tok_emb.weight[idx] * 8.0)
    with pytest.raises(RuntimeError, match="already"):
        mup.apply(model, input=G.MUP_INPUT, output=G.MUP_OUTPUT)


def _by_role(groups):
    out = {}
    for g in groups:
        out.setdefault((g["mup_role"], g["use_muon"]), []).append(g)
    return out


@pytest.mark.parametrize("ratio", [1, 4])
def test_param_groups_learning_rate_scales(ratio):
    base, lr, alr = 16, 0.02, 0.003
    net = TinyNet(base * ratio)
    groups = mup.param_groups(net, base, base * ratio, lr=lr, adamw_lr=alr, input=["inp"], output=["head"],
                              weight_decay=0.1)
    g = _by_role(groups)
    # every parameter exactly once
    assert sorted(id(p) for grp in groups for p in grp["params"]) == sorted(id(p) for p in net.parameters())
    assert set(g) == {("input", False), ("output", False), ("hidden", True), ("vector", False)}
    # input layer is a Linear, but muP keeps it (and the head) on AdamW
    assert {id(p) for p in g[("input", False)][0]["params"]} == {id(net.inp.weight), id(net.inp.bias)}
    assert g[("input", False)][0]["lr"] == pytest.approx(alr / math.sqrt(ratio))
    assert g[("output", False)][0]["lr"] == pytest.approx(alr / math.sqrt(ratio))
    assert g[("vector", False)][0]["lr"] == pytest.approx(alr)
    for grp in g[("hidden", True)]:  # Muon, spectral mode: width-independent lr
        assert grp["lr"] == pytest.approx(lr) and grp["adjust_lr_fn"] == "spectral"
    assert all(grp["weight_decay"] == 0.1 for grp in groups)
    # a hidden matrix routed to AdamW gets the table's 1/fan_in rule
    g2 = _by_role(mup.param_groups(net, base, base * ratio, lr=lr, adamw_lr=alr, input=["inp"], output=["head"],
                                   adamw=["hidden2.weight"]))
    assert g2[("hidden", False)][0]["lr"] == pytest.approx(alr / ratio)
    # the optimizer takes the groups as they are, and keeps each group's lr
    opt = muon.Muon(groups)
    assert sorted(grp["lr"] for grp in opt.param_groups) == sorted(grp["lr"] for grp in groups)
    net(torch.randn(3, 5)).square().mean().backward()
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))


@pytest.mark.parametrize("mode", ["spectral", "original", "match_rms_adamw", None, lambda m, n: 3.0])
def test_muon_lr_scale_keeps_the_spectral_condition(mode):
    """lr·s(m, n) / sqrt(m/n) (update spectral norm over the muP target) is the same at every width."""
    for m0, n0 in ((16, 16), (16, 64), (64, 16), (48, 16)):
        reference = muon.update_scale(mode, m0, n0) / math.sqrt(m0 / n0)
        for ratio in (1, 2, 8, 32):
            m, n = m0 * ratio, n0 * ratio
            scaled = mup.muon_lr_scale(mode, m, n, ratio) * muon.update_scale(mode, m, n) / math.sqrt(m / n)
            assert scaled == pytest.approx(reference, rel=1e-12)
    assert mup.muon_lr_scale("spectral", 512, 2048, 8) == pytest.approx(1.0)
    assert mup.muon_lr_scale("match_rms_adamw", 512, 512, 4) == pytest.approx(0.5)


def test_attention_scale_and_table_helpers():
    assert mup.attention_scale(64, 64) == pytest.approx(1 / 8)
    assert mup.attention_scale(256, 64) == pytest.approx(1 / 8 / 4)  # 1/head_dim beyond the base
    assert mup.multiplier("input", 7, 100) == 10 and mup.multiplier("output", 100, 7) == 0.1
    assert mup.init_std("input", 7, 100) == 0.1 and mup.init_std("hidden", 100, 7) == 0.1


def test_bad_input_names_the_parameter():
    net = TinyNet(8)
    with pytest.raises(ValueError, match="base_width"):
        mup.param_groups(net, 0, 8, lr=0.1)
    with pytest.raises(ValueError, match="width"):
        mup.param_groups(net, 8, -1, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        mup.param_groups(net, 8, 8, lr=float("nan"))
    with pytest.raises(ValueError, match="adamw_lr"):
        mup.param_groups(net, 8, 8, lr=0.1, adamw_lr=-1.0)
    with pytest.raises(ValueError, match="input patterns"):
        mup.apply(net, input=["nope"], output=["head"])
    with pytest.raises(ValueError, match="role"):
        mup.multiplier("bias", 1, 1)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.embed.weight

    with pytest.raises(ValueError, match="untie"):
        mup.roles(Tied())
