"""muon.param_groups: which parameters go to Muon and which to AdamW."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import muon


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d)
        self.experts = nn.Parameter(torch.randn(4, 2 * d, d))  # MoE stack: a batch of matrices


class TinyLM(nn.Module):
    def __init__(self, d=16, vocab=50, tied=True):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, d, kernel_size=3)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.shared = nn.Linear(d, d)
        self.also_shared = self.shared  # the same module twice: its parameters appear once
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight
        self.scale = nn.Parameter(torch.ones(()))


def _names(model, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_routing_of_a_transformer():
    model = TinyLM(tied=False)
    groups = muon.param_groups(model)
    by_kind = {(g["use_muon"], g.get("flatten", False)): _names(model, g["params"]) for g in groups}
    assert by_kind[(True, False)] == sorted(
        [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.weight", "proj.weight", "experts")] + ["shared.weight"]
    )
    assert by_kind[(True, True)] == ["conv.weight"]
    adamw = by_kind[(False, False)]
    assert "wte.weight" in adamw and "lm_head.weight" in adamw and "scale" in adamw
    assert "blocks.0.ln_1.weight" in adamw and "blocks.1.mlp_norm.weight" in adamw and "blocks.0.attn.bias" in adamw
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(model.parameters()))  # every parameter exactly once


def test_tied_head_appears_once_on_adamw():
    model = TinyLM(tied=True)
    groups = muon.param_groups(model)
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))
    adamw = next(g for g in groups if not g["use_muon"])
    assert any(p is model.wte.weight for p in adamw["params"])


@pytest.mark.parametrize("head", ["head", "output", "classifier", "logits"])
def test_head_names(head):
    model = nn.Sequential()
    model.add_module("hidden", nn.Linear(8, 8))
    model.add_module(head, nn.Linear(8, 3))
    muon_group = next(g for g in muon.param_groups(model) if g["use_muon"])
    assert muon_group["params"] == [model.hidden.weight]


def test_overrides_by_name_and_options():
    model = TinyLM(tied=False)
    groups = muon.param_groups(
        model, muon=["lm_head.weight"], adamw=["blocks.1.*"], muon_options={"lr": 0.02}, adamw_options={"lr": 3e-4}
    )
    muon_names = _names(model, [p for g in groups if g["use_muon"] for p in g["params"]])
    assert "lm_head.weight" in muon_names
    assert not any(n.startswith("blocks.1.") for n in muon_names)
    assert all(g["lr"] == (0.02 if g["use_muon"] else 3e-4) for g in groups)
    with pytest.raises(ValueError, match="both"):
        muon.param_groups(model, muon=["shared.*"], adamw=["shared.weight"])
    with pytest.raises(ValueError, match="shape"):
        muon.param_groups(model, muon=["scale"])


def test_groups_train_with_muon():
    model = TinyLM(tied=True)
    opt = muon.Muon(muon.param_groups(model), lr=0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 50, (2, 9))
    h = model.wte(x)
    h = model.conv(h.transpose(1, 2)).transpose(1, 2)
    for block in model.blocks:
        h = h + block.proj(block.attn(block.ln_1(h))[..., :16])
        h = block.mlp_norm(h + torch.einsum("btd,eod->bto", h, block.experts)[..., :16])
    loss = model.lm_head(model.shared(h)).logsumexp(-1).mean() + model.scale
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all()
        assert not torch.equal(p, before[n]), n


def test_unnamed_last_linear_warns_with_its_name():
    classifier = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.warns(UserWarning, match=r"'4\.weight'.*adamw=\['4\.weight'\]"):
        groups = muon.param_groups(classifier)
    # the warning changes nothing: the routing is still by the rules
    muon_params = next(g for g in groups if g["use_muon"])["params"]
    assert any(p is classifier[4].weight for p in muon_params)


def test_routing_the_head_as_the_warning_says_silences_it(recwarn):
    classifier = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    groups = muon.param_groups(classifier, adamw=["2.weight"])
    adamw = next(g for g in groups if not g["use_muon"])["params"]
    assert any(p is classifier[2].weight for p in adamw)
    muon.param_groups(classifier, muon=["2.weight"])  # kept on Muon on purpose
    assert not [w for w in recwarn if "param_groups" in str(w.message)]


def test_no_warning_when_a_head_is_named(recwarn):
    muon.param_groups(TinyLM(tied=False))
    muon.param_groups(TinyLM(tied=True))
    model = nn.Sequential()
    model.add_module("hidden", nn.Linear(8, 8))
    model.add_module("classifier", nn.Linear(8, 3))
    muon.param_groups(model)
    assert not [w for w in recwarn if "param_groups" in str(w.message)]


class Attention(nn.Module):
    """The docs' QK-clip model: q, k, v, o projections and nothing else (o feeds the residual stream)."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        d = dim // heads
        self.q, self.k = nn.Linear(dim, heads * d), nn.Linear(dim, kv_heads * d)
        self.v, self.o = nn.Linear(dim, kv_heads * d), nn.Linear(heads * d, dim)


class UntiedLM(nn.Module):
    """An LM whose untied head has no head name and is registered before the blocks."""

    def __init__(self, vocab=96, d=16, head_name="decoder", ffn=64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(8, d)
        self.add_module(head_name, nn.Linear(d, vocab, bias=False))
        self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.ln = nn.LayerNorm(d)


def _head_warnings(recwarn):
    return [str(w.message) for w in recwarn if "looks like the output head" in str(w.message)]


def test_attention_output_projection_is_not_a_head(recwarn):
    """The QK-clip example's last nn.Linear is `o`, the attention output: no warning, o stays on Muon."""
    model = Attention()
    groups = muon.param_groups(model)
    assert not _head_warnings(recwarn)
    assert any(p is model.o.weight for g in groups if g["use_muon"] for p in g["params"])


def test_projections_into_the_residual_stream_are_not_heads(recwarn):
    # an embedding, an up projection and a last down projection back to the embedding width (test_flops' model)
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(10, 8))
    model.add_module("up", nn.Linear(8, 4))
    model.add_module("down", nn.Linear(4, 8, bias=False))
    muon.param_groups(model)
    # an MLP whose hidden width equals the vocabulary: its up projection's outputs are read by `down`
    encoder = nn.ModuleDict({"tok": nn.Embedding(64, 16), "up": nn.Linear(16, 64), "down": nn.Linear(64, 16)})
    muon.param_groups(encoder)
    # a model without any output layer: blocks of Linear(d, d)
    muon.param_groups(nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)))
    assert not _head_warnings(recwarn)


def test_vocabulary_sized_head_warns_wherever_it_is_registered():
    model = UntiedLM()
    with pytest.warns(UserWarning, match=r"'decoder\.weight' looks like the output head \(its 96 outputs match "
                                         r"the 96 rows of the embedding 'tok'\).*adamw=\['decoder\.weight'\]"):
        groups = muon.param_groups(model)
    assert any(p is model.decoder.weight for g in groups if g["use_muon"] for p in g["params"])  # routing unchanged


def test_an_unnamed_classifier_after_an_embedding_warns():
    """A sequence classifier (Hugging Face calls it `score`): few outputs that no layer reads, registered last."""
    model = UntiedLM(head_name="lm_head")
    model.lm_head = nn.Identity()  # no head-named module with weights left
    model.score = nn.Linear(16, 2)
    with pytest.warns(UserWarning, match=r"'score\.weight'.*last nn\.Linear and no layer reads its 2 outputs"):
        muon.param_groups(model)


def test_routing_a_detected_head_either_way_silences_it(recwarn):
    muon.param_groups(UntiedLM(), adamw=["decoder.weight"])
    muon.param_groups(UntiedLM(), muon=["decoder.weight"])
    tied = UntiedLM()
    tied.decoder.weight = tied.tok.weight  # tied to the embedding: AdamW by the rules
    groups = muon.param_groups(tied)
    assert any(p is tied.tok.weight for g in groups if not g["use_muon"] for p in g["params"])
    assert not _head_warnings(recwarn)


def test_adamw_groups_hold_only_adamw_keys():
    options = {"muon_options": {"lr": 0.02}, "adamw_options": {"lr": 3e-3, "betas": (0.9, 0.99)}}
    groups = muon.param_groups(TinyLM(tied=False), **options)
    adamw = [g for g in groups if not g["use_muon"]]
    assert adamw and all(set(g) == {"params", "use_muon", "lr", "betas"} for g in adamw)
    with pytest.raises(ValueError, match=r"Muon-only keys \['momentum', 'nesterov'\]"):
        muon.param_groups(TinyLM(), adamw_options={"momentum": 0.9, "nesterov": False})


def test_muon_only_options_are_muons_group_options():
    """MUON_ONLY_OPTIONS is every option muon.Muon gives a Muon group beyond the ones both kinds of group share."""
    from muon.param_groups import MUON_ONLY_OPTIONS

    opt = muon.Muon([torch.zeros(2, 2, requires_grad=True)])
    shared = {"lr", "weight_decay", "eps", "cautious_weight_decay", "use_muon"}
    assert set(opt.defaults) - shared == MUON_ONLY_OPTIONS


def test_optimizer_adamw_groups_hold_only_adamw_keys():
    opt = muon.Muon(muon.param_groups(TinyLM(tied=False), adamw_options={"lr": 3e-3}), lr=0.02)
    adamw_keys = {"params", "use_muon", "lr", "betas", "eps", "weight_decay", "cautious_weight_decay"}
    for group in opt.param_groups:
        if not group["use_muon"]:
            assert set(group) <= adamw_keys, sorted(set(group) - adamw_keys)


# ------------------------------------------------------------- matrices whose shape is gone (fail closed)
def _flat_parameter(numel: int) -> nn.Parameter:
    """An FSDP1 FlatParameter (use_orig_params=False) as FullyShardedDataParallel registers it; FSDP1
    itself needs an accelerator, so the parameter is made directly (its type is what matters)."""
    flat = pytest.importorskip("torch.distributed.fsdp._flat_param")
    return flat.FlatParameter(torch.zeros(numel), requires_grad=True)


def test_an_fsdp1_flat_parameter_is_never_routed_to_adamw_silently():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    wrapper = nn.Module()
    wrapper.register_parameter("_flat_param", _flat_parameter(sum(p.numel() for p in model.parameters())))
    with pytest.raises(ValueError, match=r"'_flat_param' cannot be routed: it is an FSDP1 FlatParameter.*fully_shard"):
        muon.param_groups(wrapper)
    # routing it to AdamW is allowed when asked for by name
    groups = muon.param_groups(wrapper, adamw=["_flat_param"])
    assert [g["use_muon"] for g in groups] == [False]


def test_a_one_dimensional_view_of_a_linear_weight_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    # what FSDP1 with use_orig_params=True leaves on a module between steps: a 1-D view of the shard
    model[0].weight = nn.Parameter(model[0].weight.detach().reshape(-1))
    with pytest.raises(ValueError, match=r"'0.weight' cannot be routed: it is the weight of Linear '0' but has shape "
                                         r"\(24,\): a 1-D view of a matrix"):
        muon.param_groups(model)


def test_muon_refuses_a_flat_parameter_naming_it():
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] is an FSDP1 FlatParameter"):
        muon.Muon([nn.Parameter(torch.randn(4, 4)), _flat_parameter(12)])
    with pytest.raises(ValueError, match=r"has shape \(12,\) \(1-D\).*flattened to 1-D"):
        muon.Muon([nn.Parameter(torch.randn(3, 4).reshape(-1))])
