"""Row-block orthogonalization (split=, heads=) against doing it by hand, and the ns_algorithm option.

"By hand" is an optimizer over separate parameters, one per block, with the same settings: a split
parameter must end up bit for bit as the concatenation of those, state included (the update scale
of a block is s(rows, n) of the block's own shape: what a separate parameter of that shape gets).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import STEP_PATHS, make_muon, set_grads
from torch import nn

import muon

D = 16


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(dtype)


def _pair(blocks_of, shapes, options, block_options=None, seed=0, dtype=torch.float32, **hyper):
    """(split optimizer, its params, by-hand optimizer, its block params per split param).

    blocks_of(p) cuts a parameter-shaped tensor into the by-hand parameters' tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    whole = [_randn(gen, *s, dtype=dtype).requires_grad_(True) for s in shapes]
    parts = [[b.clone().requires_grad_(True) for b in blocks_of(p.detach())] for p in whole]
    opt = make_muon([{"params": whole, **options}], **hyper)
    ref = make_muon([{"params": [b for bs in parts for b in bs], **(block_options or {})}], **hyper)
    return opt, whole, ref, parts


def _step_both(opt, whole, ref, parts, blocks_of, steps=4, seed=1):
    """Both optimizers step on the same gradients: random ones for the whole parameters, cut into blocks."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        set_grads(whole, gen)
        for p, bs in zip(whole, parts):
            for b, g in zip(bs, blocks_of(p.grad), strict=True):
                b.grad = g.clone()
        opt.step()
        ref.step()


def _assert_bit_equal(opt, whole, ref, parts, blocks_of):
    for p, bs in zip(whole, parts):
        for mine, theirs in zip(blocks_of(p.detach()), bs, strict=True):
            assert torch.equal(mine, theirs.detach())
        buf = opt.state[p]["momentum_buffer"]
        assert buf.shape == p.shape  # state stays per parameter
        for mine, b in zip(blocks_of(buf), bs, strict=True):
            assert torch.equal(mine, ref.state[b]["momentum_buffer"])


def _rows(sizes, dim=0):
    return lambda t: list(t.split(list(sizes), dim=dim))


@STEP_PATHS
def test_fused_qkv_split_is_three_separate_matrices(foreach):
    """Fused QKV (3d×d) split [d, d, d] over two layers: one batched bucket of 6 d×d matrices; the
    default update scale is s(d, d) = 1 per block, not sqrt(3) of the whole 3d×d matrix."""
    sizes = [D, D, D]
    cut = _rows(sizes)
    opt, whole, ref, parts = _pair(cut, [(3 * D, D)] * 2, {"split": sizes}, lr=0.02, foreach=foreach,
                                   ns_dtype=torch.float32)  # fmt: skip
    _step_both(opt, whole, ref, parts, cut)
    _assert_bit_equal(opt, whole, ref, parts, cut)
    if foreach is None:  # the planned step
        (bucket,) = opt._plan.groups[0].buckets
        # equal blocks: each parameter is one whole member of 3 matrices, stacked as itself
        assert bucket.shape == (6, D, D) and not bucket.split
        assert opt.state[whole[0]]["momentum_buffer"]._base is None  # its own tensor: opt.state is the storage


def test_split_differs_from_the_whole_matrix():
    """The check above could not pass by accident: without split the same steps give other values."""
    sizes = [D, D, D]
    cut = _rows(sizes)
    opt, whole, ref, parts = _pair(cut, [(3 * D, D)], {}, lr=0.02, ns_dtype=torch.float32)
    _step_both(opt, whole, ref, parts, cut, steps=1)
    assert not torch.equal(cut(whole[0].detach())[0], parts[0][0].detach())


@STEP_PATHS
def test_gqa_split_with_unequal_blocks(foreach):
    """Unequal blocks (q d×d, k and v d/4×d) land in two buckets; the momentum buffer is then the
    parameter's own tensor, kept in step with the stacks."""
    sizes = [D, D // 4, D // 4]
    cut = _rows(sizes)
    opt, whole, ref, parts = _pair(cut, [(sum(sizes), D)] * 3, {"split": sizes}, lr=0.02, weight_decay=0.1,
                                   foreach=foreach, ns_dtype=torch.float32)  # fmt: skip
    _step_both(opt, whole, ref, parts, cut)
    _assert_bit_equal(opt, whole, ref, parts, cut)
    if foreach is None:  # the planned step
        shapes = sorted(tuple(b.shape) for b in opt._plan.groups[0].buckets)
        assert shapes == [(3, D, D), (6, D // 4, D)]


@STEP_PATHS
def test_tall_blocks_take_their_own_update_scale(foreach):
    """Tall blocks (24×8, orthogonalized transposed) with match_rms_adamw: 0.2·sqrt(24) per block."""
    sizes = [24, 24]
    cut = _rows(sizes)
    hyper = dict(lr=0.02, adjust_lr_fn="match_rms_adamw", foreach=foreach, ns_dtype=torch.float32)
    opt, whole, ref, parts = _pair(cut, [(48, 8), (48, 8)], {"heads": 2}, **hyper)
    _step_both(opt, whole, ref, parts, cut)
    _assert_bit_equal(opt, whole, ref, parts, cut)


@STEP_PATHS
def test_per_head_split_of_an_expert_stack(foreach):
    """heads on a 3-D (E, m, n) stack cuts the rows of each expert's matrix: block j of expert e is
    the separate (m/h)×n matrix (e, j)."""
    E, m, n, h = 2, 12, 10, 3

    def cut(t):
        return [t[e, j * (m // h) : (j + 1) * (m // h)] for e in range(E) for j in range(h)]

    opt, whole, ref, parts = _pair(cut, [(E, m, n)] * 2, {"heads": h}, lr=0.02, foreach=foreach,
                                   ns_dtype=torch.float32)  # fmt: skip
    _step_both(opt, whole, ref, parts, cut)
    _assert_bit_equal(opt, whole, ref, parts, cut)


@STEP_PATHS
def test_flattened_conv_weight_splits_output_channels(foreach):
    """flatten=True: split applies after flattening, to the output channels of the (out, in·kh·kw) matrix."""
    sizes = [2, 6]
    cut = _rows(sizes)
    opt, whole, ref, parts = _pair(cut, [(8, 3, 2, 2)], {"split": sizes, "flatten": True},
                                   block_options={"flatten": True}, lr=0.02, foreach=foreach,
                                   ns_dtype=torch.float32)  # fmt: skip
    _step_both(opt, whole, ref, parts, cut)
    _assert_bit_equal(opt, whole, ref, parts, cut)


@STEP_PATHS
def test_bf16_parameters_with_split(foreach):
    sizes = [8, 4, 4]
    cut = _rows(sizes)
    bf16 = torch.bfloat16
    opt, whole, ref, parts = _pair(cut, [(16, 8)] * 2, {"split": sizes}, dtype=bf16, lr=0.02, foreach=foreach,
                                   ns_dtype=bf16)  # fmt: skip
    _step_both(opt, whole, ref, parts, cut, steps=3)  # bf16 gradients, as the parameters
    _assert_bit_equal(opt, whole, ref, parts, cut)


@STEP_PATHS
def test_a_nonfinite_block_skips_the_whole_parameter_once(foreach):
    """The skip unit is the parameter: a NaN in its k rows leaves every block (and the momentum)
    untouched, and nonfinite_skips counts the step once even when the blocks sit in two buckets."""
    W = torch.randn(24, 16, requires_grad=True)
    opt = make_muon([{"params": [W], "split": [16, 4, 4]}], lr=0.02, foreach=foreach)
    W.grad = torch.randn(24, 16)
    opt.step()
    before, buf = W.detach().clone(), opt.state[W]["momentum_buffer"].clone()
    W.grad = torch.randn(24, 16)
    W.grad[20, 3] = float("nan")
    opt.step()
    assert torch.equal(W, before) and torch.equal(opt.state[W]["momentum_buffer"], buf)
    assert opt.state[W]["nonfinite_skips"].item() == 1


def test_switching_paths_and_checkpoints_keep_split_state():
    """The engine's mirrored momentum follows changes made by the reference loop and a loaded state dict."""
    sizes = [D, D // 4, D // 4]
    cut = _rows(sizes)
    opt, whole, ref, parts = _pair(cut, [(sum(sizes), D)] * 2, {"split": sizes}, lr=0.02, ns_dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    for step in range(5):
        opt.foreach = step % 2 == 0
        for p, bs in zip(whole, parts):
            p.grad = torch.randn(p.shape, generator=gen)
            for b, g in zip(bs, cut(p.grad)):
                b.grad = g.clone()
        opt.step()
        ref.step()
        if step == 2:
            saved = copy.deepcopy(opt.state_dict())
            assert saved["param_groups"][0]["split"] == sizes
            fresh = muon.Muon([{"params": whole, "split": sizes}], lr=0.02, ns_dtype=torch.float32)
            fresh.load_state_dict(saved)
            opt = fresh
    _assert_bit_equal(opt, whole, ref, parts, cut)


def test_options_are_validated_naming_the_parameter():
    W, V = torch.randn(24, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*sums to 24, not to its 20 rows"):
        muon.Muon([{"params": [W, V], "split": [8, 8, 8]}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*heads=3 does not divide its 20"):
        muon.Muon([{"params": [W, V], "heads": 3}])
    with pytest.raises(ValueError, match="exclusive"):
        muon.Muon([W], split=[12, 12], heads=2)
    for bad in ([], [12, 0, 12], [12.0, 12], "24"):
        with pytest.raises(ValueError, match="split must be a non-empty list of positive ints"):
            muon.Muon([W], split=bad)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        muon.Muon([W], heads=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: ns_algorithm must be one of"):
        muon.Muon([W], ns_algorithm="fast")
    # a failing group leaves the optimizer unchanged
    opt = muon.Muon([W], split=[12, 12])
    with pytest.raises(ValueError, match=r"param_groups\[1\]"):
        opt.add_param_group({"params": [V], "split": [12, 12]})
    assert len(opt.param_groups) == 1
    # the 3-D rule: split sums to the rows of each matrix (dim -2), not to dim 0
    E = torch.randn(4, 6, 8, requires_grad=True)
    muon.Muon([E], split=[2, 4])
    with pytest.raises(ValueError, match="sums to 4, not to its 6 rows"):
        muon.Muon([E], split=[2, 2])


def test_gram_algorithm_is_used_and_resolved_per_bucket():
    """ns_algorithm="gram" runs Gram NS: one step equals NS of the first update computed by hand with
    muon.newton_schulz(algorithm="gram"), and differs from standard NS; "auto" resolves per bucket."""
    gen = torch.Generator().manual_seed(0)
    W0, G = torch.randn(8, 32, generator=gen), torch.randn(8, 32, generator=gen)
    outs = {}
    for algorithm in ("gram", "standard"):
        W = W0.clone().requires_grad_(True)
        opt = muon.Muon([W], lr=0.1, weight_decay=0.0, ns_algorithm=algorithm, ns_dtype=torch.float32)
        W.grad = G.clone()
        opt.step()
        assert opt._plan.groups[0].buckets[0].algorithm == algorithm
        outs[algorithm] = W.detach()
    buf = torch.zeros_like(G).lerp_(G, torch.tensor(1 - 0.95))  # the step's first momentum update
    U = G.lerp(buf, 0.95)  # Nesterov
    for algorithm, W in outs.items():
        O = muon.newton_schulz(U, algorithm=algorithm, dtype=torch.float32)
        assert torch.equal(W, W0 + O * torch.tensor(-0.1)), algorithm
    # the same polynomial, so close in fp32, but computed differently: other bits
    assert not torch.equal(outs["gram"], outs["standard"])
    # "auto" on the CPU: Gram only in half precision and for wide matrices (n > 1.5 m)
    wide, square = torch.randn(8, 32, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    opt = muon.Muon([wide, square], ns_algorithm="auto", ns_dtype=torch.bfloat16)
    wide.grad, square.grad = torch.randn(8, 32), torch.randn(8, 8)
    opt.step()
    assert sorted(b.algorithm for b in opt._plan.groups[0].buckets) == ["gram", "standard"]
    assert opt.state_dict()["param_groups"][0]["ns_algorithm"] == "auto"


def test_gram_needs_a_backend_that_has_it():
    W = torch.randn(8, 32, requires_grad=True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]"):
        muon.Muon([W], ns_algorithm="gram", backend="cuda")


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(d, d)
        self.mlp = nn.Linear(d, 4 * d)


class _Net(nn.Module):
    def __init__(self, d: int = D, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(layers))
        self.lm_head = nn.Linear(d, 10)


def test_param_groups_split_and_heads_rules():
    net = _Net()
    groups = muon.param_groups(net, split={"*.attn.qkv.weight": [D, D, D]}, heads={"*.attn.proj.*": 4})
    by_option = {(tuple(g["split"]) if g.get("split") else None, g.get("heads")): g for g in groups if g["use_muon"]}
    qkv = by_option[((D, D, D), None)]["params"]
    assert [id(p) for p in qkv] == [id(b.attn.qkv.weight) for b in net.blocks]
    assert [id(p) for p in by_option[(None, 4)]["params"]] == [id(b.attn.proj.weight) for b in net.blocks]
    assert [id(p) for p in by_option[(None, None)]["params"]] == [id(b.mlp.weight) for b in net.blocks]
    # biases matched by the heads pattern stay in AdamW, untouched
    adamw = next(g for g in groups if not g["use_muon"])
    assert any(p is net.blocks[0].attn.proj.bias for p in adamw["params"])
    opt = muon.Muon(groups, lr=0.02)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    with pytest.raises(ValueError, match=r"'blocks.0.attn.qkv.weight' has 48 rows"):
        muon.param_groups(net, split={"*.qkv.weight": [D, D]})
    with pytest.raises(ValueError, match="matches two split/heads patterns"):
        muon.param_groups(net, split={"*.qkv.weight": [D, D, D]}, heads={"*.attn.*": 4})
    with pytest.raises(ValueError, match="matches no parameter routed to Muon"):
        muon.param_groups(net, heads={"*.attention.*": 4})


def test_flops_count_split_blocks():
    from muon import flops

    net = _Net()
    shapes, _, _ = flops.muon_matrices(net, split={"*.qkv.weight": [2 * D, D // 2, D // 2]},
                                       heads={"*.proj.weight": 4})  # fmt: skip
    assert sorted(shapes) == sorted([(1, 2 * D, D), (2, D // 2, D), (4, D // 4, D), (1, 4 * D, D)] * 2)
    plain, _, _ = flops.muon_matrices(net)
    split = flops.overhead(net, 1024, split={"*.qkv.weight": [D, D, D]})
    whole = flops.overhead(net, 1024)
    nsf = flops.newton_schulz_flops
    # two layers: each 48×16 QKV matrix becomes three 16×16 ones
    assert split.ns_flops == whole.ns_flops - 2 * nsf(3 * D, D, 5) + 6 * nsf(D, D, 5)
    assert len(plain) == 6


def test_compiled_step_with_split_groups_has_no_graph_breaks():
    """Block members (views taken every step, mirrored momentum) trace with fullgraph=True."""
    torch._dynamo.reset()
    muon.newton_schulz(torch.randn(4, 8))  # the torch backend imported outside the trace
    gen = torch.Generator().manual_seed(0)
    shapes = [(24, 16), (12, 8)]
    a = [torch.randn(s, generator=gen).requires_grad_(True) for s in shapes]
    b = [p.detach().clone().requires_grad_(True) for p in a]

    def groups(params):
        return [{"params": params[:1], "split": [16, 4, 4]}, {"params": params[1:], "heads": 3}]

    opt, twin = muon.Muon(groups(a), lr=0.02), muon.Muon(groups(b), lr=0.02)
    compiled = torch.compile(opt.step, fullgraph=True, backend="eager")
    for step in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=gen)
            if step == 2 and p.shape[0] == 24:
                p.grad[20, 0] = float("nan")
            q.grad = p.grad.clone()
        compiled()
        twin.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)
            assert torch.equal(opt.state[p]["momentum_buffer"], twin.state[q]["momentum_buffer"])
    assert opt.state[a[0]]["nonfinite_skips"].item() == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("foreach", [None, False])
def test_distributed_ns_refuses_split_before_changing_anything(monkeypatch, foreach):
    """The DTensor NS phases of muon.distributed (the owner plan's, foreach=False's gathered one) have
    no row blocks yet: refused when the plan is built, before anything changes."""
    from muon import distributed
    from muon.distributed import sharded

    W = torch.randn(24, 8, requires_grad=True)
    opt = make_muon([W], split=[8, 8, 8], foreach=foreach)
    W.grad = torch.randn(24, 8)
    opt.step()
    before, buf = W.detach().clone(), opt.state[W]["momentum_buffer"].clone()
    W.grad = torch.randn(24, 8)
    opt.add_param_group({"params": [torch.randn(4, 4, requires_grad=True)], "split": None})  # a new plan
    opt.param_groups[-1]["params"][0].grad = torch.randn(4, 4)
    # W seen as a DTensor by the step and by the DTensor planners
    monkeypatch.setattr(distributed, "is_dtensor", lambda t: t is W or t is W.grad)
    monkeypatch.setattr(sharded, "is_dtensor", lambda t: t is W or t is W.grad)
    with pytest.raises(NotImplementedError, match=r"param_groups\[0\]: split, heads"):
        opt.step()
    assert torch.equal(W, before) and torch.equal(opt.state[W]["momentum_buffer"], buf)


def test_a_parameter_whose_blocks_cannot_be_viewed_is_refused():
    conv = torch.randn(8, 3, 2, 2).to(memory_format=torch.channels_last).requires_grad_(True)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*cannot be viewed in place"):
        muon.Muon([conv], flatten=True, split=[2, 6])
    # equal wide blocks are stacked as the parameter: no view of it needed, and both paths agree
    twin = conv.detach().clone().requires_grad_(True)
    opts = [make_muon([w], flatten=True, heads=2, foreach=f) for w, f in ((conv, True), (twin, "reference"))]
    for _ in range(2):
        g = torch.randn(8, 3, 2, 2)
        conv.grad, twin.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    assert torch.equal(conv, twin)
    assert torch.equal(opts[0].state[conv]["momentum_buffer"], opts[1].state[twin]["momentum_buffer"])


@pytest.mark.parametrize("blocks", [{"split": [4, 4]}, {"heads": 2}])
def test_normuon_with_row_blocks_is_refused_naming_the_group(blocks):
    W = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match=r"param_groups\[0\]: variant='normuon' does not combine with split/heads"):
        muon.Muon([{"params": [W], **blocks}], variant="normuon")
