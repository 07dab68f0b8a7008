"""muon.flops: the NS FLOP formulas against hand counts and torch's own FLOP counter, Keller's bound,
the routing of preset models and the exact whole-model counts against hand sums. The presets
themselves (published parameter counts, specs) are tested with bench/models.py in test_bench_models.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.models import PRESETS, TransformerConfig, build
from muon import flops
from muon.coefficients import resolve_schedule
from muon.newton_schulz import orthogonalize


def test_newton_schulz_flops_hand_counts():
    # 2x3, one step: X·Xᵀ 2·2·2·3 = 24, A·A 2·2·2·2 = 16, B·X 2·2·2·3 = 24 -> 64.
    assert flops.newton_schulz_flops(2, 3, steps=1) == 64
    assert flops.newton_schulz_flops(3, 2, steps=1) == 64  # tall: transposed, same work
    # 5x5, two steps: per step 4·125 + 2·125 = 750.
    assert flops.newton_schulz_flops(5, 5, steps=2) == 1500
    # symmetric 2x3: one triangle of X·Xᵀ (12 + ...) -> 3·4·3 + 8 = 44.
    assert flops.newton_schulz_flops(2, 3, steps=1, symmetric=True) == 44
    assert flops.newton_schulz_flops(7, 9, steps=0) == 0
    # Default 5 steps, and exact Python ints far beyond float precision (Llama 405B MLP).
    big = flops.newton_schulz_flops(16384, 53248)
    assert isinstance(big, int) and big == 5 * (4 * 16384**2 * 53248 + 2 * 16384**3)


@pytest.mark.parametrize("precondition", ["frobenius", "aol"])
@pytest.mark.parametrize("shape", [(3, 7, 19), (1, 33, 8), (2, 16, 16)])
def test_newton_schulz_flops_match_torch_flop_counter(shape, precondition):
    """The formula counts exactly the matmul FLOPs the torch backend executes; AOL adds none (its
    scales come from the first step's Gram product)."""
    b, m, n = shape
    schedule = resolve_schedule("keller", 3, 1e-7, precondition=precondition)
    G = torch.randn(shape)
    with FlopCounterMode(display=False) as counter:
        orthogonalize(G, schedule, dtype=torch.float32, backend="torch")
    expected = b * flops.newton_schulz_flops(m, n, steps=3, precondition=precondition)
    assert counter.get_total_flops() == expected == b * flops.newton_schulz_flops(m, n, steps=3)


def test_aol_flops():
    # the same matmul count; fewer FLOPs only from fewer steps: 4 AOL steps are 0.8x of 5
    assert flops.newton_schulz_flops(64, 256, 4, precondition="aol") == flops.newton_schulz_flops(64, 256, 4)
    assert flops.newton_schulz_flops(512, 512, 4, precondition="aol") / flops.newton_schulz_flops(512, 512) == 0.8
    # elementwise: |A|, row sums, d_i·d_j and the product on the s×s Gram matrix (4 per element), 4 per
    # row, one multiply per element of X — once, in the first step
    base = flops.newton_schulz_elementwise_flops(6, 10, 3)
    assert flops.newton_schulz_elementwise_flops(6, 10, 3, precondition="aol") == base + 4 * 36 + 4 * 6 + 60
    assert flops.newton_schulz_elementwise_flops(10, 6, 3, precondition="aol") == base + 4 * 36 + 4 * 6 + 60
    assert flops.newton_schulz_elementwise_flops(6, 10, 0, precondition="aol") == 6 * 60  # no step: no AOL
    for fn in (flops.newton_schulz_flops, flops.newton_schulz_elementwise_flops):
        with pytest.raises(ValueError, match="precondition must be one of"):
            fn(8, 32, 5, precondition="spectral")


def test_symmetric_saving_ratio():
    assert flops.newton_schulz_flops(512, 512) / flops.newton_schulz_flops(512, 512, symmetric=True) == 1.5
    for e in (2, 4, 8):  # (4e + 2) / (3e + 1) for n = e·m
        ratio = flops.newton_schulz_flops(64, 64 * e) / flops.newton_schulz_flops(64, 64 * e, symmetric=True)
        assert ratio == pytest.approx((4 * e + 2) / (3 * e + 1), rel=1e-12)


def test_keller_examples():
    assert flops.overhead_bound(768, 524_288) == pytest.approx(0.00732, abs=5e-6)
    assert flops.overhead_bound(16_384, 16_000_000) == pytest.approx(0.00512, abs=5e-6)
    assert flops.overhead_bound(768, 524_288, steps=10) == 2 * flops.overhead_bound(768, 524_288)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="m must be >= 0"):
        flops.newton_schulz_flops(-1, 3)
    with pytest.raises(TypeError, match="n must be an int"):
        flops.newton_schulz_flops(2, 3.0)
    with pytest.raises(ValueError, match="batch_tokens"):
        flops.overhead_bound(768, 0)
    with pytest.raises(ValueError, match="steps"):
        flops.overhead(build(PRESETS["tiny"]), 1024, steps=-1)
    with pytest.raises(ValueError, match="attention_flops_per_token"):
        flops.overhead(_TwoLayer(), 1024, attention_flops_per_token=-1)


@pytest.mark.parametrize("function", [flops.overhead, flops.total_params, flops.nonembedding_params])
def test_a_model_name_or_config_is_refused_pointing_to_bench_models(function):
    """The presets and their specs live in bench/models.py: muon.flops counts nn.Modules only."""
    args = (1024,) if function is flops.overhead else ()
    with pytest.raises(TypeError, match=r"not a model name \('gpt2-124m'\).*bench\.models\.as_module"):
        function("gpt2-124m", *args)
    with pytest.raises(TypeError, match=r"got TransformerConfig.*bench\.models\.build\(cfg\)"):
        function(PRESETS["tiny"], *args)


def test_routing_follows_param_groups():
    model = build(PRESETS["gpt2-124m"])
    shapes, muon_params, adamw_params = flops.muon_matrices(model)
    # 12 blocks x (c_attn 2304x768, c_proj 768x768, fc 3072x768, proj 768x3072); nothing else.
    assert sorted(set(shapes)) == [(1, 768, 768), (1, 768, 3072), (1, 2304, 768), (1, 3072, 768)]
    assert len(shapes) == 48
    names = {id(p): n for n, p in model.named_parameters()}
    adamw_names = {names[id(p)] for p in adamw_params}
    assert {"tok_embed.weight", "pos_embed.weight", "norm_f.weight", "norm_f.bias"} <= adamw_names
    assert all(p.ndim == 2 for p in muon_params)
    llama_shapes, _, _ = flops.muon_matrices(build(PRESETS["llama3-8b"]))
    assert len(llama_shapes) == 32 * 7


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.up = nn.Linear(8, 4)  # weight 4x8 -> Muon, bias 4 -> AdamW
        self.down = nn.Linear(4, 8, bias=False)  # weight 8x4 -> Muon

    def forward(self, idx):
        return self.down(self.up(self.embed(idx)))


def test_whole_model_counts_by_hand():
    r = flops.overhead(_TwoLayer(), batch_tokens=1000, steps=5)
    # NS: two groups (4x8 and 8x4 are separate calls), each 5·(4·16·8 + 2·64) = 3200.
    assert r.ns_flops == 6400
    # NS elementwise: per matrix 6·32 + 5·(3·16 + 2·32) = 752; Muon update 9/element on 64;
    # AdamW 14/element on the bias (4) and the embedding (80).
    assert r.muon_flops == 6400 + 2 * 752 + 9 * 64 + 14 * 84
    assert r.adamw_flops == 14 * 148
    assert r.matmul_params == 68  # the embedding lookup does no matmul
    assert r.training_flops == 6 * 68 * 1000
    assert r.overhead == (r.muon_flops - r.adamw_flops) / r.training_flops
    assert r.model_dim == 4 and r.overhead_bound == 5 * 4 / 1000
    assert r.attention_flops == 0 and r.model == "_TwoLayer"
    # what a caller that knows the architecture passes: attention per token, Keller's width, a name
    named = flops.overhead(_TwoLayer(), 1000, 5, attention_flops_per_token=48, model_dim=8, name="two")
    assert named.attention_flops == 48_000 and named.model == "two" and named.overhead_bound == 5 * 8 / 1000
    assert named.overhead_with_attention == (r.muon_flops - r.adamw_flops) / (r.training_flops + 48_000)
    assert named.at(2000).attention_flops == 96_000


def test_nonembedding_params_leave_out_embeddings_and_a_head_named_as_param_groups_names_it():
    model = _TwoLayer()
    assert flops.total_params(model) == 80 + 36 + 32
    assert flops.nonembedding_params(model) == 36 + 32
    model.lm_head = nn.Linear(8, 10, bias=False)
    assert flops.nonembedding_params(model) == 36 + 32
    tied = build(TransformerConfig("t", 1, 16, 2, vocab=40, seq_len=8, tied=True))
    untied = build(TransformerConfig("u", 1, 16, 2, vocab=40, seq_len=8))
    assert flops.total_params(untied) - flops.total_params(tied) == 40 * 16
    assert flops.nonembedding_params(untied) == flops.nonembedding_params(tied) == flops.total_params(tied) - 40 * 16


# ------------------------------------------------------------------------------ Gram Newton–Schulz
def test_gram_flops_hand_counts():
    # 2x3, one step, one segment: X·Xᵀ 24, R·R 16, final Q·X 24 (no Q·Z on a first step, no R update
    # on a last step) -> 64.
    assert flops.newton_schulz_flops(2, 3, steps=1, algorithm="gram") == 64
    # 5 steps, restart at 2, k = 2 segments: 4·2·s²·l + (40 - 12)·s³
    assert flops.newton_schulz_flops(8, 32, algorithm="gram") == 8 * 64 * 32 + 28 * 512
    assert flops.newton_schulz_flops(8, 32, algorithm="gram", restarts=()) == 4 * 64 * 32 + 34 * 512
    assert flops.newton_schulz_flops(8, 32, algorithm="gram", symmetric=True) == 6 * 64 * 32 + 14 * 512
    assert flops.newton_schulz_flops(32, 8, algorithm="gram") == flops.newton_schulz_flops(8, 32, algorithm="gram")
    assert flops.newton_schulz_flops(8, 32, steps=0, algorithm="gram") == 0
    # restarts at or past the last step do nothing
    assert flops.newton_schulz_flops(8, 32, steps=2, algorithm="gram", restarts=(2, 5)) == flops.newton_schulz_flops(
        8, 32, steps=2, algorithm="gram", restarts=())
    with pytest.raises(ValueError, match="algorithm"):
        flops.newton_schulz_flops(8, 32, algorithm="fast")


@pytest.mark.parametrize("precondition", ["frobenius", "aol"])
@pytest.mark.parametrize("steps", [0, 1, 2, 5])
@pytest.mark.parametrize("restarts", [(2,), (), (1, 3), (2, 9)])
@pytest.mark.parametrize("shape", [(3, 12, 40), (1, 50, 9)])
def test_gram_flops_match_counted_execution(shape, restarts, steps, precondition):
    """The model counts exactly the matmul FLOPs the torch backend's Gram NS dispatches (a
    TorchDispatchMode summing 2·m·n·k over mm/bmm/addmm/baddbmm), and torch's own FLOP counter agrees."""
    from muon.profiling import count_matmul_flops

    b, m, n = shape
    schedule = resolve_schedule("polar_express", steps, 1e-7, precondition=precondition)
    G = torch.randn(shape)
    with count_matmul_flops() as counted, FlopCounterMode(display=False) as torch_counter:
        orthogonalize(G, schedule, dtype=torch.float32, backend="torch", algorithm="gram", restarts=restarts)
    expected = b * flops.newton_schulz_flops(m, n, steps, algorithm="gram", restarts=restarts,
                                             precondition=precondition)
    assert counted.total == expected
    assert torch_counter.get_total_flops() == expected


@pytest.mark.parametrize("precondition", ["frobenius", "aol"])
def test_standard_flops_match_counted_execution(precondition):
    from muon.profiling import count_matmul_flops

    schedule = resolve_schedule("keller", 4, 1e-7, precondition=precondition)
    with count_matmul_flops() as counted:
        orthogonalize(torch.randn(2, 10, 30), schedule, dtype=torch.float32, backend="torch")
    assert counted.total == 2 * flops.newton_schulz_flops(10, 30, steps=4, precondition=precondition)


def test_gram_flop_ratio():
    """Gram NS (5 steps, one restart) against standard NS: (8e + 28) / (20e + 10) at n = e·m."""
    ratio = {e: flops.newton_schulz_flops(256, 256 * e, algorithm="gram") / flops.newton_schulz_flops(256, 256 * e)
             for e in (1, 2, 4, 8, 16)}
    assert ratio[4] <= 0.7  # the 1:4 MLP shape: at most 0.7x the FLOPs
    assert ratio == pytest.approx({1: 1.2, 2: 0.88, 4: 60 / 90, 8: 92 / 170, 16: 156 / 330}, rel=1e-12)
    sym = flops.newton_schulz_flops(256, 1024, symmetric=True, algorithm="gram") / flops.newton_schulz_flops(
        256, 1024, symmetric=True)
    assert sym == pytest.approx(38 / 65, rel=1e-12)
