"""The fused low-precision momentum pass (issue 30): `muon::low_precision_momentum`
(muon/backends/momentum_op.py) and its Triton kernel (kernels/lowp_momentum.py).

- The op's torch kernel (the oracle, `muon.functional` in torch ops) against float64: the momentum
  within fp32 rounding, the requantized state within half a quantization step (|x - q·s| <= s/2 + fp32
  ulps, rows = dim 0 as `quantize_blockwise` cuts them), bf16 within half a bf16 ulp; the op never
  writes its inputs (the state is the caller's to commit).
- The Triton kernel (interpreter on a CPU, compiled on a GPU) equals the torch kernel bit for bit: int8
  and bf16 states, fp32/bf16/fp16 NS outputs, rows below, above and not a multiple of 256, one row,
  1-D, 3-D and 4-D parameters, stacks of parameters with one weight each, transposed and strided U
  views (a stacked NS buffer), bf16 gradients, a skipped parameter (weight 0), with and without Nesterov.
- With weight 0 the next state is the stored one, bit for bit. Requantizing a dequantized block would
  give it back too for every scale a block can have (fl(fl(127·s)/127) = s, checked over every fp32
  absmax of three binades), but not for an arbitrary scale (one in 128 moves by an ulp): the op keeps
  the stored bits where weight is 0, as `F.store_momentum` does for a skipped parameter.
- torch.library.opcheck: schema (mutated outputs only), fake kernel, AOT dispatch.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest
import torch

from muon import functional as F
from muon.backends import momentum_op
from muon.backends.momentum_op import OPERATOR, low_precision_momentum, torch_momentum

HAS_TRITON = importlib.util.find_spec("triton") is not None
MOMENTUM = 0.95
SHAPES = [(5, 300), (3, 100), (1, 513), (4, 256), (2, 3, 260), (6, 1)]


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_state(shape, state_dtype, device, gen, spread=1.0, stacked=False):
    """A stored momentum: one parameter of `shape`, or (stacked) shape[0] parameters of shape[1:],
    each quantized on its own (scales (B, rows, blocks))."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * spread
    x = x.float().to(device)
    if state_dtype != torch.int8:
        return x.to(torch.bfloat16), None
    if not stacked:
        return F.quantize_blockwise(x)
    q, s = F.quantize_blockwise(x.reshape(shape[0] * shape[1], *shape[2:]))
    return q.view(shape), s.view(shape[0], shape[1], -1)


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, -128)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    diff = bits(a.contiguous()) != bits(b.contiguous())
    assert not diff.any(), f"{what}: {int(diff.sum())} of {diff.numel()} elements differ"


def call(state, scale, grad, weight, nesterov, u_dtype=torch.float32, momentum=MOMENTUM):
    u = torch.full(grad.shape, float("nan"), dtype=u_dtype, device=grad.device)
    new_state, new_scale = low_precision_momentum(state, scale, grad, weight, momentum, nesterov, u)
    return u, new_state, new_scale


# --------------------------------------------------------------------------- the oracle vs float64
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("state_dtype", [torch.int8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_kernel_matches_float64(shape, state_dtype, nesterov, grad_dtype):
    gen = torch.Generator().manual_seed(0)
    state, scale = make_state(shape, state_dtype, "cpu", gen)
    grad = torch.randn(shape, generator=gen).to(grad_dtype)
    state0, scale0, grad0 = state.clone(), None if scale is None else scale.clone(), grad.clone()
    w = torch.tensor(1.0 - MOMENTUM)
    U, new_state, new_scale = call(state, scale, grad, w, nesterov)
    # the op writes only its outputs: the state is committed by the caller
    assert_bitwise(state, state0, "state")
    assert_bitwise(grad, grad0, "grad")
    if scale is not None:
        assert_bitwise(scale, scale0, "scale")

    buf = F.dequantize_blockwise(state, scale).double() if scale is not None else state.double()
    rows = shape[0]
    buf, G, U = buf.reshape(rows, -1), grad.double().reshape(rows, -1), U.reshape(rows, -1)
    w64 = float(w)
    nxt = buf + w64 * (G - buf)
    ref_u = G + MOMENTUM * (nxt - G) if nesterov else nxt
    eps32 = torch.finfo(torch.float32).eps
    # one fused lerp per term (fp32 inputs exact in float64): a few fp32 ulps of the operands
    big = torch.maximum(buf.abs(), G.abs())
    assert ((U.double() - ref_u).abs() <= 4 * eps32 * big + 1e-30).all()
    if scale is None:
        ulp_bf16 = torch.finfo(torch.bfloat16).eps
        err = (new_state.double().reshape(rows, -1) - nxt).abs()
        assert (err <= 0.5 * ulp_bf16 * nxt.abs() * 2 + 4 * eps32 * big + 1e-30).all()
        assert new_scale is None
        return
    assert new_state.dtype == torch.int8 and new_scale.dtype == torch.float32
    assert new_state.shape == shape and new_scale.shape == F.scale_shape(shape)
    assert new_state.abs().max() <= 127
    deq = F.dequantize_blockwise(new_state, new_scale).double().reshape(rows, -1)
    n = nxt.shape[1]
    s = torch.repeat_interleave(new_scale.double(), F.QUANT_BLOCK, dim=-1)[:, :n]
    # the quantization bound of functional.quantize_blockwise, plus the fp32 rounding of nxt
    assert ((deq - nxt).abs() <= s / 2 + 4 * eps32 * big + 1e-30).all()
    # the scale is the block's absmax / 127 of the fp32 momentum
    pad = F.quant_blocks(n) * F.QUANT_BLOCK - n
    amax = torch.nn.functional.pad(nxt.abs(), (0, pad)).unflatten(-1, (-1, F.QUANT_BLOCK)).amax(-1)
    assert ((new_scale.double() - amax / 127).abs() <= 4 * eps32 * amax / 127 + 1e-30).all()


def test_float64_gradients_run_in_float64():
    gen = torch.Generator().manual_seed(1)
    state, scale = make_state((3, 40), torch.int8, "cpu", gen)
    grad = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    U, new_state, new_scale = call(state, scale, grad, torch.tensor(0.1, dtype=torch.float64), True, torch.float64)
    buf = F.dequantize_blockwise(state, scale).double()
    nxt = torch.lerp(buf, grad, 0.1)
    torch.testing.assert_close(U, torch.lerp(grad, nxt, MOMENTUM), rtol=0, atol=0)
    q, s = F.quantize_blockwise(nxt)
    assert_bitwise(new_state, q, "state")
    assert_bitwise(new_scale, s, "scale")


# ------------------------------------------------------------------------- weight 0: state unchanged
def test_requantization_roundtrip_every_absmax_of_three_binades():
    """A block's absmax a gives s = fl(a / 127); its dequantized maximum is fl(127·s) and requantized
    fl(fl(127·s) / 127) = s: checked for every fp32 a in [1, 2), [2^-20, 2^-19) and [2^-126, 2^-125)
    (an arbitrary s, one no block produces, would change in 0.8 % of cases: it never arises)."""
    mant = (np.arange(2**23, dtype=np.uint32) | np.uint32(0x3F800000)).view(np.float32)
    for e in (1.0, 2.0**-20, 2.0**-126):
        a = (mant * np.float32(e)).astype(np.float32)
        s = a / np.float32(127)
        assert s.dtype == np.float32
        again = (s * np.float32(127)) / np.float32(127)
        assert np.array_equal(again, s), f"binade {e}: {(again != s).sum()} scales change"


@pytest.mark.parametrize("state_dtype", [torch.int8, torch.bfloat16], ids=str)
def test_weight_zero_leaves_the_state_unchanged(state_dtype):
    """A skipped parameter (weight 0): B' = B exactly (lerp with weight 0), and quantize(dequantize(q, s))
    reproduces q and s bit for bit, so the committed state is the stored one."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 700, generator=gen, dtype=torch.float64)
    x *= torch.logspace(-30, 30, 16, dtype=torch.float64).view(-1, 1)  # scales over 60 decades
    x = x.float()
    x[3, 256:512] = 0  # a zero block: scale 0
    state, scale = F.quantize_blockwise(x) if state_dtype == torch.int8 else (x.to(torch.bfloat16), None)
    grad = torch.randn(16, 700, generator=gen)
    for nesterov in (False, True):
        _, new_state, new_scale = call(state, scale, grad, torch.tensor(0.0), nesterov)
        assert_bitwise(new_state, state, "state")
        if scale is not None:
            assert_bitwise(new_scale, scale, "scale")


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_weight_zero_keeps_a_scale_requantization_would_move(kernel, device):
    """A scale no block produces (loaded, or set by hand): fl(fl(127·s)/127) != s, so requantizing its
    dequantized block moves the scale by an ulp; weight 0 keeps the stored bits anyway (`F.store_momentum`'s
    ok/old, the kernel's `w == 0`)."""
    if kernel == "triton" and not HAS_TRITON:
        pytest.skip("needs Triton")
    s = torch.tensor([[1.0078812, 2.0**-20 * 1.0078812]], dtype=torch.float32)
    q = torch.randint(-127, 128, (1, 512), dtype=torch.int8, generator=torch.Generator().manual_seed(9))
    q[0, 0], q[0, 300] = 127, -127
    moved = F.quantize_blockwise(F.dequantize_blockwise(q, s))[1]
    assert not torch.equal(moved, s)  # requantization alone would change the state
    q, s = q.to(device), s.to(device)
    grad = torch.randn(1, 512).to(device)
    w = torch.tensor(0.0, device=device)
    if kernel == "torch":
        _, new_state, new_scale = call(q, s, grad, w, True)
    else:
        new_state, new_scale = kernel_call(q, s, grad, w, True, torch.empty(1, 512, device=device))
    assert_bitwise(new_state, q, "state")
    assert_bitwise(new_scale, s, "scale")
    if kernel == "torch":  # and a nonzero weight requantizes
        _, _, advanced = call(q, s, torch.zeros_like(grad), torch.tensor(1e-30, device=device), True)
        assert torch.equal(advanced.cpu(), moved)


# ----------------------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("state_dtype", [torch.int8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 300), (2, 3, 10)], ids=str)
def test_opcheck(shape, state_dtype):
    gen = torch.Generator().manual_seed(3)
    state, scale = make_state(shape, state_dtype, "cpu", gen, stacked=len(shape) == 3)
    grad = torch.randn(shape, generator=gen)
    u = torch.empty(shape[::-1], dtype=torch.bfloat16).mT if len(shape) == 2 else torch.empty(shape)
    state_out = torch.empty_like(state)
    scale_out = None if scale is None else torch.empty_like(scale)
    for nesterov in (False, True):
        torch.library.opcheck(OPERATOR, (state, scale, grad, torch.tensor(0.05), MOMENTUM, nesterov, u, state_out,
                                         scale_out))


def test_compiled_call_has_eager_bits():
    """torch.compile(fullgraph=True) traces the op (mutated outputs, functionalized) without a graph break,
    and a step that commits the outputs gives eager's bits (aot_eager here: inductor takes ~45 s on a CPU)."""
    gen = torch.Generator().manual_seed(10)
    state, scale = F.quantize_blockwise(torch.randn(16, 300, generator=gen))
    grad, w = torch.randn(16, 300, generator=gen), torch.tensor(0.05)

    def step(q, s, g, w, u):
        new_state, new_scale = low_precision_momentum(q, s, g, w, MOMENTUM, True, u)
        q.copy_(new_state)
        s.copy_(new_scale)
        return u * 2

    runs = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        q, s, u = state.clone(), scale.clone(), torch.empty(16, 300)
        runs.append((fn(q, s, grad, w, u), q, s, u))
    for a, b in zip(*runs):
        assert_bitwise(a, b, "compiled")


def test_schema_is_registered():
    assert str(OPERATOR._schema) == "muon::" + momentum_op.SCHEMA
    assert torch._C._dispatch_has_kernel_for_dispatch_key("muon::low_precision_momentum", "CompositeExplicitAutograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("muon::low_precision_momentum", "CUDA")


def test_bad_arguments_are_named():
    state, scale = F.quantize_blockwise(torch.randn(4, 300))
    grad, u = torch.randn(4, 300), torch.empty(4, 300)
    with pytest.raises(ValueError, match="scale"):
        low_precision_momentum(state, None, grad, 0.05, MOMENTUM, True, u)
    with pytest.raises(ValueError, match="scale must be fp32 of shape"):
        low_precision_momentum(state, scale[:, :1].contiguous(), grad, 0.05, MOMENTUM, True, u)
    with pytest.raises(ValueError, match="u_out"):
        low_precision_momentum(state, scale, grad, 0.05, MOMENTUM, True, torch.empty(300, 4))
    with pytest.raises(ValueError, match="int8 or bf16"):
        low_precision_momentum(state.float(), None, grad, 0.05, MOMENTUM, True, u)


# --------------------------------------------------------------------- the Triton kernel, bit for bit
interpret = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")


def kernel_call(state, scale, grad, weight, nesterov, u, momentum=MOMENTUM):
    """The Triton kernel on the tensors' device (the interpreter on a CPU), outputs poisoned first."""
    state_out = poisoned_like(state)
    scale_out = None if scale is None else poisoned_like(scale)
    momentum_op._triton_kernel(state, scale, grad, weight, momentum, nesterov, u, state_out, scale_out)
    return state_out, scale_out


def assert_kernel_matches(state, scale, grad, weight, nesterov, u, momentum=MOMENTUM):
    U, ref_state, ref_scale = torch_momentum(state, scale, grad, weight, momentum, nesterov)
    state_out, scale_out = kernel_call(state, scale, grad, weight, nesterov, u, momentum)
    assert_bitwise(u, U.reshape(u.shape).to(u.dtype), "U")
    assert_bitwise(state_out, ref_state, "state")
    if scale is not None:
        assert_bitwise(scale_out, ref_scale, "scale")


@interpret
@pytest.mark.interpret
def test_kernel_block_is_functional_block():
    mod = importlib.import_module("muon.kernels.lowp_momentum")
    assert mod.QUANT_BLOCK == F.QUANT_BLOCK and mod.QUANT_MAX.value == F.QUANT_MAX


CASES = [  # (shape, state dtype, U dtype, nesterov, weight)
    ((5, 300), torch.int8, torch.float32, True, 0.05),
    ((5, 300), torch.int8, torch.bfloat16, False, 0.05),
    ((3, 100), torch.int8, torch.float32, False, 0.05),
    ((3, 100), torch.bfloat16, torch.bfloat16, True, 0.05),
    ((1, 513), torch.int8, torch.bfloat16, True, 0.05),
    ((1, 513), torch.bfloat16, torch.float32, False, 0.7),
    ((9, 256), torch.int8, torch.float32, True, 0.7),
    ((2, 3, 260), torch.int8, torch.float16, True, 0.05),
    ((40, 3), torch.int8, torch.float32, True, 0.05),
    ((1, 7), torch.bfloat16, torch.bfloat16, True, 0.05),
    ((4, 600), torch.int8, torch.float32, True, 0.0),
    ((4, 600), torch.bfloat16, torch.bfloat16, False, 0.0),
    ((37,), torch.int8, torch.float32, True, 0.05),  # a 1-D parameter: 37 rows of one element
    ((3, 5, 90), torch.int8, torch.bfloat16, True, 0.05),  # one 3-D parameter: 3 rows of 450
    ((3, 5, 90), torch.bfloat16, torch.float32, True, 0.05),  # bf16: taken as a stack, same bits
]


@interpret
@pytest.mark.interpret
@pytest.mark.parametrize("shape,state_dtype,u_dtype,nesterov,weight", CASES, ids=str)
def test_kernel_equals_torch_kernel(shape, state_dtype, u_dtype, nesterov, weight, device):
    gen = torch.Generator().manual_seed(4)
    state, scale = make_state(shape, state_dtype, device, gen, spread=3.0)
    grad = torch.randn(shape, generator=gen).to(device)
    u = torch.full(shape, float("nan"), dtype=u_dtype, device=device)
    assert_kernel_matches(state, scale, grad, torch.tensor(weight, device=device), nesterov, u)


@interpret
@pytest.mark.interpret
@pytest.mark.parametrize("state_dtype", [torch.int8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("u_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_writes_a_transposed_slot_of_a_stacked_buffer(state_dtype, u_dtype, device):
    """A tall parameter (40×24) whose NS input is slot 1 of a (3, 24, 40) stack, transposed: the kernel
    writes U through the view's strides, and nothing else of the stack. bf16 gradient, transposed."""
    gen = torch.Generator().manual_seed(5)
    state, scale = make_state((40, 24), state_dtype, device, gen)
    grad = torch.randn(24, 40, generator=gen).to(device).to(torch.bfloat16).mT  # strides (1, 40)
    stack = torch.full((3, 24, 40), float("nan"), dtype=u_dtype, device=device)
    u = stack[1].mT
    assert_kernel_matches(state, scale, grad, torch.tensor(0.05, device=device), True, u)
    assert stack[0].isnan().all() and stack[2].isnan().all()


@interpret
@pytest.mark.interpret
@pytest.mark.parametrize("state_dtype", [torch.int8, torch.bfloat16], ids=str)
def test_kernel_one_launch_for_a_stack(state_dtype, device):
    """A stack of 3 same-shape parameters (3, 8, 270), each quantized on its own, in one call: U into a
    transposed (3, 270, 8) buffer, one weight per parameter (the second skipped); equal to the oracle
    and to three single-parameter calls."""
    gen = torch.Generator().manual_seed(6)
    state, scale = make_state((3, 8, 270), state_dtype, device, gen, stacked=True)
    grad = torch.randn(3, 8, 270, generator=gen).to(device)
    weight = torch.tensor([0.05, 0.0, 0.05], device=device)
    buf = torch.full((3, 270, 8), float("nan"), dtype=torch.bfloat16, device=device)
    assert_kernel_matches(state, scale, grad, weight, True, buf.mT)
    new_state, new_scale = kernel_call(state, scale, grad, weight, True, torch.empty(3, 8, 270, device=device))
    for i in range(3):
        U, one_state, one_scale = torch_momentum(state[i], None if scale is None else scale[i], grad[i], weight[i],
                                                 MOMENTUM, True)
        assert_bitwise(buf[i].mT, U.view(8, 270).to(torch.bfloat16), f"U of parameter {i}")
        assert_bitwise(new_state[i], one_state, f"state of parameter {i}")
        if scale is not None:
            assert_bitwise(new_scale[i], one_scale, f"scale of parameter {i}")
    assert_bitwise(new_state[1], state[1], "the skipped parameter's state")


@interpret
@pytest.mark.interpret
def test_kernel_four_dim_state_and_non_viewable_output(device):
    """A conv-like (4, 2, 3, 260) state: leading dims collapsed to a stack; an output view whose leading
    dims do not collapse is written through a temporary."""
    gen = torch.Generator().manual_seed(7)
    shape = (4, 2, 3, 260)
    state, scale = make_state(shape, torch.int8, device, gen)
    grad = torch.randn(shape, generator=gen).to(device)
    u = torch.full((2, 4, 3, 260), float("nan"), device=device).transpose(0, 1)  # (4, 2, ...) not viewable
    assert_kernel_matches(state, scale, grad, torch.tensor(0.05, device=device), False, u)
    # the NS input as the engine stacks it: the (rows, row length) matrix, here a transposed slot
    u = torch.full((2 * 3 * 260, 4), float("nan"), dtype=torch.bfloat16, device=device).mT
    assert_kernel_matches(state, scale, grad, torch.tensor(0.05, device=device), True, u)


@interpret
@pytest.mark.interpret
def test_op_runs_the_kernel_on_cuda(device):
    """On CUDA the op dispatches to the kernel: the same bits as the torch kernel (CPU: the oracle)."""
    if device != "cuda":
        pytest.skip("the op runs the Triton kernel on CUDA tensors only")
    gen = torch.Generator().manual_seed(8)
    state, scale = make_state((64, 1000), torch.int8, device, gen)
    grad = torch.randn(64, 1000, generator=gen).to(device)
    w = torch.tensor(0.05, device=device)
    U, new_state, new_scale = call(state, scale, grad, w, True, torch.bfloat16)
    ref_u, ref_state, ref_scale = torch_momentum(state.cpu(), scale.cpu(), grad.cpu(), w.cpu(), MOMENTUM, True)
    assert_bitwise(U.cpu(), ref_u.to(torch.bfloat16), "U")
    assert_bitwise(new_state.cpu(), ref_state, "state")
    assert_bitwise(new_scale.cpu(), ref_scale, "scale")
