"""Low-precision optimizer state (`state_dtype`): bf16 Muon momentum and AdamW moments, int8 blockwise
quantized Muon momentum. The planned step equals the reference loop bit for bit, the quantization
error is bounded against float64, skipped parameters keep their state bit for bit, checkpoints resume
bit for bit and convert between state dtypes, and the state takes the bytes it should."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import assert_same, make_muon, params_of, set_grads

import muon
from muon import functional as F

FAST = {"ns_dtype": torch.float32, "backend": "torch"}
LOW = [torch.bfloat16, torch.int8]


def _groups(low, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mats = [torch.randn(s, generator=gen).requires_grad_(True) for s in [(24, 40), (40, 24), (24, 40), (3, 16, 300)]]
    rest = [torch.randn(s, generator=gen).requires_grad_(True) for s in [(40,), (7, 24), (40,)]]
    adamw_low = None if low == torch.int8 else low
    return [{"params": mats, "state_dtype": low},
            {"params": rest, "use_muon": False, "state_dtype": adamw_low}]  # fmt: skip


@pytest.mark.parametrize("low", LOW, ids=["bf16", "int8"])
@pytest.mark.parametrize("foreach", [None, False])
def test_planned_step_equals_the_reference_loop_bit_for_bit(low, foreach):
    fast = make_muon(_groups(low), lr=0.02, foreach=foreach, cautious_weight_decay=True, **FAST)
    ref = make_muon(_groups(low), lr=0.02, foreach="reference", cautious_weight_decay=True, **FAST)
    for step in range(6):
        for opt in (fast, ref):
            set_grads(params_of(opt), step, bad=(1, 5) if step == 3 else ())
            opt.step()
        assert_same(fast, ref)
    p = params_of(fast)[0]
    assert fast.state[p]["momentum_buffer"].dtype == low
    assert (fast.state[p].get("momentum_scale") is not None) == (low == torch.int8)
    if low == torch.int8:
        assert fast.state[p]["momentum_scale"].shape == (24, 1)  # one block of 256 for 40 columns... per row
        expert = params_of(fast)[3]
        assert fast.state[expert]["momentum_scale"].shape == (3, 19)  # a row is an expert: 4800 = 18·256 + 192
    adamw = params_of(fast)[5]
    assert fast.state[adamw]["exp_avg"].dtype == (torch.float32 if low == torch.int8 else low)


def test_quantization_error_is_bounded_against_float64():
    gen = torch.Generator().manual_seed(1)
    for shape in [(5, 600), (3, 256), (2, 7), (4, 3, 300)]:
        rows = torch.logspace(-6, 2, shape[0], dtype=torch.float64).view(-1, *[1] * (len(shape) - 1))
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * rows
        q, scale = F.quantize_blockwise(x)
        assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == F.scale_shape(shape)
        back = F.dequantize_blockwise(q, scale).double()
        # per block: |x - q·s| <= s/2, plus fp32's rounding of x (x is fp64 here) and of x / s
        bound = F.dequantize_blockwise(torch.ones_like(q), scale).double() * (0.5 + 2**-22) + x.abs() * 2**-23
        assert ((back - x).abs() <= bound).all()
        assert q.abs().max() == 127  # every row's largest block uses the full range
    zeros = torch.zeros(3, 10)
    q, scale = F.quantize_blockwise(zeros)
    assert not q.any() and not scale.any() and not F.dequantize_blockwise(q, scale).any()


@pytest.mark.parametrize("low", LOW, ids=["bf16", "int8"])
def test_a_skipped_parameter_keeps_its_low_precision_state_bit_for_bit(low):
    opt = muon.Muon(_groups(low), lr=0.02, **FAST)
    params = params_of(opt)
    set_grads(params, 0)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    set_grads(params, 1, bad=(0,))
    opt.step()
    for key, value in before.items():
        assert torch.equal(opt.state[params[0]][key], value if key != "nonfinite_skips" else value + 1), key


@pytest.mark.parametrize("low", LOW, ids=["bf16", "int8"])
def test_state_dict_resumes_bit_for_bit_and_loads_weights_only(low):
    straight = muon.Muon(_groups(low), lr=0.02, **FAST)
    first = muon.Muon(_groups(low), lr=0.02, **FAST)
    for step in range(3):
        for opt in (straight, first):
            set_grads(params_of(opt), step)
            opt.step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = muon.Muon(_groups(low), lr=0.02, **FAST)
    with torch.no_grad():
        for p, q in zip(params_of(resumed), params_of(first)):
            p.copy_(q)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same(resumed, first)
    for step in range(3, 6):
        for opt in (straight, resumed):
            set_grads(params_of(opt), step)
            opt.step()
    assert_same(straight, resumed)


@pytest.mark.parametrize(("saved", "loaded"), [(None, torch.int8), (torch.int8, None), (torch.int8, torch.bfloat16),
                                               (torch.bfloat16, torch.int8), (None, torch.bfloat16)])
def test_loading_into_another_state_dtype_converts(saved, loaded):
    src = muon.Muon(_groups(saved), lr=0.02, **FAST)
    set_grads(params_of(src), 0)
    src.step()
    dst = muon.Muon(_groups(loaded), lr=0.02, **FAST)
    dst.load_state_dict(src.state_dict())
    p, q = params_of(src)[0], params_of(dst)[0]
    source = F.read_momentum(src.state[p]["momentum_buffer"], src.state[p].get("momentum_scale"), torch.float32)
    value = dst.state[q]["momentum_buffer"]
    assert value.dtype == (loaded or torch.float32) and ("momentum_scale" in dst.state[q]) == (loaded == torch.int8)
    got = F.read_momentum(value, dst.state[q].get("momentum_scale"), torch.float32)
    if loaded is None:
        assert torch.equal(got, source)  # upcasting or dequantizing is exact
    else:
        expected = F.read_momentum(*F.store_momentum(source, loaded), torch.float32)
        assert torch.equal(got, expected)  # the group's rounding or quantization of the saved value
    set_grads(params_of(dst), 1)
    dst.step()


def test_full_precision_state_dict_loads_into_torch_optim_muon():
    opt = muon.Muon([{"params": _groups(torch.int8)[0]["params"][:3], "state_dtype": torch.int8}], lr=0.02, **FAST)
    params = params_of(opt)
    set_grads(params, 0)
    opt.step()
    back = torch.optim.Muon(params, lr=0.02)
    back.load_state_dict(opt.state_dict(full_precision=True))
    for p in params:
        expected = F.dequantize_blockwise(opt.state[p]["momentum_buffer"], opt.state[p]["momentum_scale"])
        assert torch.equal(back.state[p]["momentum_buffer"], expected)
        assert opt.state[p]["momentum_buffer"].dtype == torch.int8  # the optimizer's own state is untouched
    back.step()


def test_state_dtype_is_validated_naming_the_group():
    w = torch.randn(8, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: state_dtype .* AdamW group.*dynamic"):
        muon.Muon([{"params": [w]}, {"params": [torch.randn(3, requires_grad=True)], "use_muon": False,
                                     "state_dtype": torch.int8}])  # fmt: skip
    with pytest.raises(ValueError, match=r"param_groups\[0\]: state_dtype must be"):
        muon.Muon([w], state_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: state_dtype=torch.int8 does not combine with split"):
        muon.Muon([torch.randn(24, 8, requires_grad=True)], split=[8, 8, 8], state_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is float64"):
        muon.Muon([w.detach().double().requires_grad_(True)], state_dtype=torch.bfloat16)
    # Muon(state_dtype=torch.int8) leaves AdamW groups in full precision rather than refusing them
    opt = muon.Muon([{"params": [w]}, {"params": [torch.randn(3, requires_grad=True)], "use_muon": False}],
                    state_dtype=torch.int8)
    assert opt.param_groups[1]["state_dtype"] is None


@pytest.mark.parametrize("low", LOW, ids=["bf16", "int8"])
def test_low_precision_momentum_trains_like_full_precision(low):
    """A least-squares problem: 30 steps with bf16 / int8 momentum end within a few percent of fp32 state."""
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(256, 64, generator=gen), torch.randn(256, 32, generator=gen)
    losses = {}
    for state_dtype in (None, low):
        W = torch.zeros(64, 32, requires_grad=True)
        opt = muon.Muon([W], lr=0.02, weight_decay=0.0, state_dtype=state_dtype, **FAST)
        for _ in range(30):
            loss = (A @ W - B).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[state_dtype] = (A @ W - B).square().mean().item()
    assert abs(losses[low] - losses[None]) <= 0.03 * losses[None], losses
