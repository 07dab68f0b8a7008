"""muon.param_groups: which parameters go to Muon and which to AdamW."""

from __future__ import annotations

import pytest
import torch
from helpers import STEP_PATHS, make_muon
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
    shared = {"lr", "weight_decay", "eps", "cautious_weight_decay", "use_muon", "state_dtype"}
    assert set(opt.defaults) - shared == MUON_ONLY_OPTIONS


def test_optimizer_adamw_groups_hold_only_adamw_keys():
    opt = muon.Muon(muon.param_groups(TinyLM(tied=False), adamw_options={"lr": 3e-3}), lr=0.02)
    adamw_keys = {"params", "use_muon", "lr", "betas", "eps", "weight_decay", "cautious_weight_decay", "state_dtype"}
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


# ------------------------------------------------------- torchvision-shaped models, MoE, patterns, the report
def _groups_by_name(model, groups):
    """{parameter name: 'adamw' | 'muon' | 'muon flatten' | 'muon split=[...]'} from the groups."""
    out = {}
    for g in groups:
        kind = "muon" if g["use_muon"] else "adamw"
        if g.get("flatten"):
            kind += " flatten"
        if g.get("split"):
            kind += f" split={g['split']}"
        for name in _names(model, g["params"]):
            out[name] = kind
    return out


def test_mini_resnet_routing():
    from vision_models import MiniResNet

    model = MiniResNet()
    routed = _groups_by_name(model, muon.param_groups(model))
    expected = {n: ("adamw" if p.ndim < 2 else "muon flatten") for n, p in model.named_parameters()}
    expected.update({"conv1.weight": "adamw", "fc.weight": "adamw"})  # the stem conv and torchvision's head `fc`
    assert routed == expected
    assert routed["layer2.0.downsample.0.weight"] == "muon flatten"


def test_mini_vgg_routing():
    from vision_models import MiniVGG

    model = MiniVGG()
    routed = _groups_by_name(model, muon.param_groups(model))
    muon_names = {n for n, kind in routed.items() if kind != "adamw"}
    # the first conv reads the image; classifier.6 is the head, classifier.0 and .3 are hidden layers
    assert muon_names == {"features.3.weight", "classifier.0.weight", "classifier.3.weight"}
    assert routed["features.3.weight"] == "muon flatten"


def test_mini_torchvision_vit_routing():
    from vision_models import MiniViT

    model = MiniViT()
    routed = _groups_by_name(model, muon.param_groups(model))
    hidden = ("self_attention.in_proj_weight", "self_attention.out_proj.weight", "mlp.0.weight", "mlp.3.weight")
    expected = {f"encoder.layers.encoder_layer_{i}.{n}" for i in range(2) for n in hidden}
    assert {n for n, kind in routed.items() if kind != "adamw"} == expected
    # conv_proj (the patch projection), class_token, pos_embedding and heads.head are AdamW's
    for name in ("conv_proj.weight", "class_token", "encoder.pos_embedding", "heads.head.weight"):
        assert routed[name] == "adamw", name


def test_vision_models_train_a_step_with_their_groups():
    from vision_models import MiniResNet, MiniViT

    for model in (MiniResNet(), MiniViT()):
        opt = muon.Muon(muon.param_groups(model), lr=0.02)
        model(torch.randn(2, 3, 16, 16)).logsumexp(-1).mean().backward()
        opt.step()


def test_input_layer_found_by_tracing_an_example_input():
    """An MLP's first nn.Linear stays on Muon by structure; with example_input it is the input layer."""
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    plain = _groups_by_name(model, muon.param_groups(model, adamw=["5.weight"]))
    assert plain["1.weight"] == plain["3.weight"] == "muon"
    traced = _groups_by_name(model, muon.param_groups(model, adamw=["5.weight"], example_input=torch.randn(2, 8)))
    assert traced["1.weight"] == "adamw" and traced["3.weight"] == "muon"
    # the forward stops at the input layer: BatchNorm statistics of later layers are not touched
    bn_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3))
    muon.param_groups(bn_model, example_input=(torch.randn(2, 3, 8, 8),))
    assert int(bn_model[1].num_batches_tracked) == 0
    # a forced pattern wins over the input-layer rule
    assert _groups_by_name(model, muon.param_groups(model, muon=["1.weight"], adamw=["5.weight"],
                                                    example_input=torch.randn(2, 8)))["1.weight"] == "muon"


def test_a_hidden_fc_is_not_a_head(recwarn):
    """`fc` is a head only where torchvision puts it: last, or read by no layer (optimizer.md's fc feeds proj)."""
    model = nn.ModuleDict({"embed": nn.Embedding(100, 32), "fc": nn.Linear(32, 128), "proj": nn.Linear(128, 32),
                           "lm_head": nn.Linear(32, 100)})
    assert _groups_by_name(model, muon.param_groups(model))["fc.weight"] == "muon"
    blocks = nn.Sequential(nn.Linear(8, 8), nn.Sequential())
    blocks[1].add_module("fc", nn.Linear(8, 8))  # inside a numbered block: never a head by name
    assert _groups_by_name(blocks, muon.param_groups(blocks, muon=["1.fc.weight"]))["1.fc.weight"] == "muon"


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_a_pattern_that_matches_nothing_is_an_error(kind):
    model = TinyLM(tied=False)
    with pytest.raises(ValueError, match=rf"{kind} pattern 'lm_haed.weight' matches no parameter; did you mean "
                                         r"'lm_head.weight'\?"):
        muon.param_groups(model, **{kind: ["lm_haed.weight"]})
    with pytest.raises(ValueError, match="takes a list of patterns"):
        muon.param_groups(model, **{kind: "lm_head.weight"})


def test_patterns_match_every_name_of_a_tied_parameter():
    model = TinyLM(tied=True)  # lm_head.weight is wte.weight, listed once as wte.weight
    groups = muon.param_groups(model, muon=["lm_head.weight"])
    assert any(p is model.wte.weight for g in groups if g["use_muon"] for p in g["params"])


def test_routing_report(capsys):
    from vision_models import MiniResNet

    model = MiniResNet()
    routes = muon.param_routing(model)
    assert [r.name for r in routes] == [n for n, _ in model.named_parameters()]
    by_name = {r.name: r for r in routes}
    assert by_name["conv1.weight"].group == "adamw" and "input layer" in by_name["conv1.weight"].reason
    assert by_name["fc.weight"].reason.startswith("output head")
    assert by_name["layer1.0.conv1.weight"] == ("layer1.0.conv1.weight", (8, 8, 3, 3), "muon flatten",
                                                 by_name["layer1.0.conv1.weight"].reason)
    muon.param_groups(model, verbose=True)
    table = capsys.readouterr().out
    assert table == muon.format_routing(routes) + "\n"
    assert table.splitlines()[0].split() == ["parameter", "shape", "group", "reason"]


def test_a_four_dim_parameter_that_is_no_conv_must_say_how_it_is_seen():
    model = nn.Module()
    model.body = nn.Linear(8, 8)
    model.stack = nn.Parameter(torch.randn(2, 3, 8, 8))  # (layers, experts, out, in)
    with pytest.raises(ValueError, match=r"'stack' has shape \(2, 3, 8, 8\) and is no conv weight.*flatten"):
        muon.param_groups(model)
    groups = muon.param_groups(model, muon_options={"flatten": False})
    assert all(g["flatten"] is False for g in groups if g["use_muon"])
    muon.Muon(groups)


# -------------------------------------------------------------------------- >= 4-D weights in muon.Muon
def test_a_raw_conv_weight_must_choose_flatten():
    conv = nn.Conv2d(4, 8, 3)
    with pytest.raises(ValueError, match=r"shape \(8, 4, 3, 3\) \(4-D\).*flatten=True.*Keller"):
        muon.Muon([conv.weight])
    assert muon.Muon([conv.weight], flatten=True).param_groups[0]["flatten"] is True
    assert muon.Muon([conv.weight], flatten=False).param_groups[0]["flatten"] is False
    # 3-D stacks (MoE experts) and matrices need no choice: flatten=None is False for them
    assert muon.Muon([nn.Parameter(torch.randn(4, 8, 8))]).param_groups[0]["flatten"] is False


def _keller_step(p, grad, buf, lr, wd, ns, beta=0.95):
    """Keller Jordan's Muon step for one parameter (KellerJordan/Muon muon.py, muon_update and the step),
    restated: EMA momentum, Nesterov, a 4-D update viewed as (out, in·kh·kw), NS, the scale
    sqrt(max(1, size(-2)/size(-1))) of the 4-D gradient (kh/kw), decoupled decay. `ns` is the NS
    function; the last add is written p + (-lr·u) (torch's add_(alpha=) fuses it on the CPU, 1 ulp apart)."""
    buf.lerp_(grad, 1 - beta)
    u = grad.lerp_(buf, beta)
    scale = max(1, u.size(-2) / u.size(-1)) ** 0.5
    u = ns(u.view(len(u), -1)) * scale
    p.mul_(1 - lr * wd)
    p.add_((u * -lr).reshape(p.shape))


@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (8, 4, 3, 3), (16, 3, 7, 7)])
@STEP_PATHS
def test_flatten_is_kellers_conv_update_bit_for_bit(shape, foreach):
    """muon.Muon(flatten=True) on a conv weight is Keller's update, bit for bit, with the same NS (fp32)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(4)]

    def ns(X):
        return muon.newton_schulz(X, 5, "keller", 1e-7, dtype=torch.float32, backend="torch")

    ref, buf = w.clone(), torch.zeros(shape)
    for g in grads:
        _keller_step(ref, g.clone(), buf, 0.02, 0.1, ns)
    q = w.clone().requires_grad_(True)
    opt = make_muon([q], lr=0.02, weight_decay=0.1, flatten=True, ns_dtype=torch.float32, backend="torch",
                    foreach=foreach)
    for g in grads:
        q.grad = g.clone()
        opt.step()
    assert torch.equal(q.detach(), ref)
    assert torch.equal(opt.state[q]["momentum_buffer"], buf)


# ------------------------------------------------------------------------------ transformers MoE and ViT
def _tiny(name, **config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**config))


MOE = {
    "Mixtral": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "Qwen3Moe": dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                     num_experts_per_tok=2, head_dim=8),
}


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_routing_from_transformers_configs(name):
    model = _tiny(name, **MOE[name])
    routed = _groups_by_name(model, muon.param_groups(model))
    inner = MOE[name].get("moe_intermediate_size", MOE[name]["intermediate_size"])
    for n, p in model.named_parameters():
        if p.ndim < 2 or n in ("model.embed_tokens.weight", "lm_head.weight"):
            assert routed[n] == "adamw", n
        elif n.endswith("experts.gate_up_proj"):  # (E, 2I, H): gate and up orthogonalized apart
            assert p.shape[-2] == 2 * inner and routed[n] == f"muon split={[inner, inner]}", n
        else:  # attention, routers (mlp.gate.weight, (E, d)) and down_proj stacks (E, H, I)
            assert routed[n] == "muon", n
    assert any(n.endswith("mlp.gate.weight") for n in routed)
    reasons = {r.name: r.reason for r in muon.param_routing(model)}
    assert "MoE router" in reasons["model.layers.0.mlp.gate.weight"]
    # a step on the groups, and NorMuon groups keep gate_up whole (NorMuon does not take split)
    opt = muon.Muon(muon.param_groups(model), lr=0.02)
    model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    opt.step()
    normuon = muon.param_groups(model, muon_options={"variant": "normuon"})
    assert not any(g.get("split") for g in normuon)
    assert not any(g.get("split") for g in muon.param_groups(model, split_gate_up=False))


def test_gate_up_split_is_the_unfused_update():
    """split=[I, I] on gate_up_proj gives what separate gate and up stacks get, bit for bit."""
    E, I, H = 3, 8, 12
    gen = torch.Generator().manual_seed(1)
    fused = torch.randn(E, 2 * I, H, generator=gen)
    grads = [torch.randn(E, 2 * I, H, generator=gen) for _ in range(3)]
    a = fused.clone().requires_grad_(True)
    gate, up = (fused[:, :I].clone().requires_grad_(True), fused[:, I:].clone().requires_grad_(True))
    opts = [muon.Muon([{"params": [a], "split": [I, I]}], lr=0.02), muon.Muon([gate, up], lr=0.02)]
    for g in grads:
        a.grad, gate.grad, up.grad = g.clone(), g[:, :I].clone(), g[:, I:].clone()
        for opt in opts:
            opt.step()
    assert torch.equal(a.detach(), torch.cat([gate.detach(), up.detach()], dim=1))


def test_vit_from_a_transformers_config():
    transformers = pytest.importorskip("transformers")
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3))
    routed = _groups_by_name(model, muon.param_groups(model))
    for n, p in model.named_parameters():
        hidden = n.startswith("vit.layers.") and p.ndim == 2
        assert routed[n] == ("muon" if hidden else "adamw"), n
    assert routed["vit.embeddings.patch_embeddings.projection.weight"] == "adamw"  # the patch projection
