"""bench/models.py: the presets against published parameter counts, the model specs of `python -m
bench`, and `bench.models.overhead`, which gives muon.flops a preset's width and attention FLOPs."""

from __future__ import annotations

import pytest
import torch

from bench.models import PRESETS, as_module, build, overhead, parse_model
from muon import flops

# Published totals (the released checkpoints; GPT-2 counted with its tied head once).
EXACT = ["gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b", "llama3-8b", "llama3-70b"]


@pytest.mark.parametrize("name", EXACT)
def test_presets_match_published_counts_exactly(name):
    cfg = PRESETS[name]
    assert flops.total_params(build(cfg)) == cfg.published_params


def test_llama3_405b_count_and_no_allocation():
    model = build(PRESETS["llama3-405b"])
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 405_853_388_800


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("essential")])
def test_essential_ai_sizes(name):
    cfg = PRESETS[name]  # stated to two decimals in billions; 0.07B is 67.0M
    assert flops.total_params(build(cfg)) == pytest.approx(cfg.published_params, rel=0.05)


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("moonlight")])
def test_moonlight_sizes_as_non_embedding(name):
    cfg = PRESETS[name]  # MLP width and vocabulary are not published: a loose match
    assert flops.nonembedding_params(build(cfg)) == pytest.approx(cfg.published_params, rel=0.15)


@pytest.mark.parametrize("name", ["gpt2-124m", "essential-0.20b", "moonlight-399m", "llama3-8b"])
def test_overhead_within_keller_bound_and_rescales(name):
    r = overhead(name, 524_288)
    assert r.ns_flops == sum(g["ns_flops"] for g in r.groups)
    assert r.muon_params + r.adamw_params == r.params
    for batch in (2**14, 2**19, 2**24):
        at = r.at(batch)
        assert 0 < at.ns_overhead <= at.overhead_bound
        assert at.overhead == pytest.approx(r.overhead * 524_288 / batch, rel=1e-12)
    cfg = PRESETS[name]
    assert r.attention_flops == 6 * cfg.n_layers * cfg.seq_len * cfg.d_attn * 524_288


def test_gpt2_124m_reference_numbers():
    r = overhead("gpt2-124m", 524_288)
    assert r.overhead_bound == pytest.approx(0.00732, abs=5e-6)
    # Tied head: N counts every weight but the position table, i.e. the head's matmul once.
    assert r.matmul_params == 124_439_808 - 1024 * 768
    assert r.muon_params == 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)
    assert 0.0039 < r.overhead < 0.0040


def test_overhead_of_a_spec_is_muon_flops_on_the_built_module():
    """What bench.models.overhead adds to muon.flops.overhead: the config's name, d_model and attention."""
    cfg = PRESETS["llama3-8b"]
    spec, config = overhead("llama3-8b", 2**20, seq_len=4096), overhead(cfg, 2**20, seq_len=4096)
    direct = flops.overhead(build(cfg), 2**20, model_dim=4096, name="llama3-8b",
                            attention_flops_per_token=6 * 32 * 4096 * 4096)
    assert spec == config == direct
    assert overhead(cfg, 2**20, model_dim=1024).overhead_bound == flops.overhead_bound(1024, 2**20)
    module = build(PRESETS["tiny"])
    assert overhead(module, 1024) == flops.overhead(module, 1024)
    assert overhead(module, 1024).model == "Transformer" and overhead(module, 1024).attention_flops == 0


def test_preset_module_runs_forward():
    model = build(PRESETS["tiny"], device="cpu")
    logits = model(torch.randint(0, 512, (2, 16)))
    assert logits.shape == (2, 16, 512) and torch.isfinite(logits).all()


def test_custom_model_spec():
    cfg = parse_model("custom:layers=3,d=96,heads=4,kv_heads=2,mlp=swiglu,tied=1,vocab=100")
    assert (cfg.n_layers, cfg.d_model, cfg.kv_heads, cfg.mlp, cfg.tied) == (3, 96, 2, "swiglu", True)
    per_layer = 96 * 96 * 2 + 2 * 96 * 48 + 3 * 96 * 384 + 2 * 96  # q, o, k, v, MLP, two RMSNorms
    assert flops.total_params(build(cfg)) == 100 * 96 + 3 * per_layer + 96


def test_as_module_builds_specs_and_configs_on_meta():
    assert all(p.is_meta for p in as_module("gpt2-124m").parameters())
    assert all(p.is_meta for p in as_module(PRESETS["tiny"]).parameters())
    module = torch.nn.Linear(2, 3)
    assert as_module(module) is module
    model = as_module("module:torch.nn:Identity")  # a factory called on the meta device
    assert isinstance(model, torch.nn.Identity)
    with pytest.raises(TypeError, match="model must be a preset name, TransformerConfig or nn.Module"):
        as_module(3)


def test_bad_specs_name_the_problem():
    with pytest.raises(ValueError, match="steps"):
        overhead("tiny", 1024, steps=-1)
    with pytest.raises(ValueError, match="not a preset"):
        parse_model("gpt5")
    with pytest.raises(ValueError, match="n_heads"):
        parse_model("custom:layers=2,d=64")
    with pytest.raises(ValueError, match="cannot read 'colour=red'"):
        parse_model("custom:layers=2,d=64,heads=2,colour=red")
    with pytest.raises(TypeError, match=r"int\(\) returned int, not an nn.Module"):
        parse_model("module:builtins:int")
