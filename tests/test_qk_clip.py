"""QK-clip against a float64 hand-written reference on a tiny attention: only offending heads change,
their max logit lands on τ, GQA (both rules), biases, DTensor shards, and no host sync."""

from __future__ import annotations

import math

import docblocks
import pytest
import torch
from torch import nn

import muon
from muon.profiling import count_dispatched_ops
from muon.qk_clip import _scale_local_rows_

EPS32 = torch.finfo(torch.float32).eps


def _weights(num_heads, num_kv_heads, head_dim, d_in=12, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    wq = torch.randn(num_heads * head_dim, d_in, generator=g) * 0.8
    wk = torch.randn(num_kv_heads * head_dim, d_in, generator=g) * 0.8
    bq = torch.randn(num_heads * head_dim, generator=g) if bias else None
    bk = torch.randn(num_kv_heads * head_dim, generator=g) if bias else None
    x = torch.randn(2, 6, d_in, generator=g, dtype=torch.float64)
    return wq, wk, bq, bk, x


def _logits64(wq, wk, bq, bk, x, num_heads, num_kv_heads):
    """(B, H, L, L) logits q·kᵀ/√d in float64 from the (fp32) weights."""
    head_dim = wq.shape[0] // num_heads
    q = x @ wq.double().T + (0 if bq is None else bq.double())
    k = x @ wk.double().T + (0 if bk is None else bk.double())
    q = q.unflatten(-1, (num_heads, head_dim)).transpose(1, 2)
    k = k.unflatten(-1, (num_kv_heads, head_dim)).transpose(1, 2)
    k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
    return q @ k.transpose(-1, -2) / math.sqrt(head_dim)


def _head_max(logits):
    return logits.transpose(0, 1).reshape(logits.shape[1], -1).amax(dim=1)


def _rows(w, head, head_dim):
    return w[head * head_dim : (head + 1) * head_dim]


def _tau_between(S, n_offending):
    """A threshold with exactly n heads above it."""
    s = S.sort(descending=True).values
    return float((s[n_offending - 1] + s[n_offending]) / 2)


@pytest.mark.parametrize("bias", [False, True])
def test_mha_only_offending_heads_change_and_land_on_tau(bias):
    H, d = 4, 3
    wq, wk, bq, bk, x = _weights(H, H, d, bias=bias)
    S = _head_max(_logits64(wq, wk, bq, bk, x, H, H))
    tau = _tau_between(S, 2)
    offending = S > tau
    before = [t.clone() for t in (wq, wk, bq, bk) if t is not None]
    gamma = muon.qk_clip_(wq, wk, S.float(), tau, H, q_bias=bq, k_bias=bk)

    ref_gamma = torch.where(offending, tau / S, torch.ones_like(S))
    torch.testing.assert_close(gamma.double(), ref_gamma, rtol=2 * EPS32, atol=0)
    for orig, new in zip(before, (t for t in (wq, wk, bq, bk) if t is not None)):
        for h in range(H):
            got, was = _rows(new, h, d), _rows(orig, h, d)
            if not offending[h]:
                assert torch.equal(got, was)  # bit for bit
            else:
                want = was.double() * ref_gamma[h].sqrt()  # √γ on q and on k (and their biases)
                torch.testing.assert_close(got.double(), want, rtol=3 * EPS32, atol=0)
    S_after = _head_max(_logits64(wq, wk, bq, bk, x, H, H))
    # every logit of a head scales by exactly γ (biases included), so S lands on τ
    torch.testing.assert_close(S_after[offending], torch.full_like(S_after[offending], tau), rtol=1e-6, atol=0)
    assert torch.equal(S_after[~offending], S[~offending])


def test_alpha_puts_the_whole_factor_on_queries():
    H, d = 3, 4
    wq, wk, _, _, x = _weights(H, H, d)
    S = _head_max(_logits64(wq, wk, None, None, x, H, H))
    tau = _tau_between(S, 1)
    wk0 = wk.clone()
    muon.qk_clip_(wq, wk, S, tau, H, alpha=1.0)
    assert torch.equal(wk, wk0)
    S_after = _head_max(_logits64(wq, wk, None, None, x, H, H))
    assert abs(S_after.max().item() - tau) <= 1e-6 * tau


def test_gqa_per_head_leaves_shared_keys_and_other_heads():
    H, Hkv, d = 4, 2, 3
    wq, wk, bq, bk, x = _weights(H, Hkv, d, bias=True, seed=1)
    S = _head_max(_logits64(wq, wk, bq, bk, x, H, Hkv))
    tau = _tau_between(S, 1)
    offending = S > tau
    wq0, wk0, bk0 = wq.clone(), wk.clone(), bk.clone()
    muon.qk_clip_(wq, wk, S, tau, H, num_kv_heads=Hkv, q_bias=bq, k_bias=bk)
    assert torch.equal(wk, wk0) and torch.equal(bk, bk0)  # shared keys untouched (Kimi K2)
    for h in range(H):
        if not offending[h]:
            assert torch.equal(_rows(wq, h, d), _rows(wq0, h, d))
        else:
            want = _rows(wq0, h, d).double() * (tau / S[h])  # the whole γ on the query
            torch.testing.assert_close(_rows(wq, h, d).double(), want, rtol=2 * EPS32, atol=0)
    S_after = _head_max(_logits64(wq, wk, bq, bk, x, H, Hkv))
    torch.testing.assert_close(S_after[offending], torch.full_like(S_after[offending], tau), rtol=1e-6, atol=0)
    assert torch.equal(S_after[~offending], S[~offending])


def test_gqa_group_rule_matches_megatron():
    H, Hkv, d = 4, 2, 3
    wq, wk, _, _, x = _weights(H, Hkv, d, seed=2)
    S = _head_max(_logits64(wq, wk, None, None, x, H, Hkv))
    tau = _tau_between(S, 1)
    wq0, wk0 = wq.clone(), wk.clone()
    gamma = muon.qk_clip_(wq, wk, S, tau, H, gqa="group")
    # Megatron-LM clip_qk: η_g = min(1, τ / max over the group's heads); q·η^α, k·η^(1-α)
    eta = torch.clamp(tau / S.view(Hkv, -1).amax(dim=1), max=1.0)
    torch.testing.assert_close(gamma.double(), eta.repeat_interleave(2), rtol=2 * EPS32, atol=0)
    for h in range(H):
        want = _rows(wq0, h, d).double() * eta[h // 2].sqrt()
        torch.testing.assert_close(_rows(wq, h, d).double(), want, rtol=3 * EPS32, atol=0)
    for g in range(Hkv):
        want = _rows(wk0, g, d).double() * eta[g].sqrt()
        torch.testing.assert_close(_rows(wk, g, d).double(), want, rtol=3 * EPS32, atol=0)
    S_after = _head_max(_logits64(wq, wk, None, None, x, H, Hkv))
    assert S_after.max().item() <= tau * (1 + 1e-6)


def test_heads_at_or_below_tau_or_without_a_finite_record_keep_their_bits():
    H, d = 4, 2
    wq, wk, _, _, _ = _weights(H, H, d, d_in=5)
    wq0, wk0 = wq.clone(), wk.clone()
    S = torch.tensor([5.0, -3.0, float("nan"), float("inf")])
    gamma = muon.qk_clip_(wq, wk, S, 5.0, H)  # S == τ is not above it
    assert torch.equal(gamma, torch.ones(H)) and torch.equal(wq, wq0) and torch.equal(wk, wk0)


def test_bf16_weights_scale_in_place():
    H, d = 2, 4
    wq, wk, _, _, _ = _weights(H, H, d)
    wq, wk = wq.bfloat16(), wk.bfloat16()
    wq0 = wq.clone()
    muon.qk_clip_(wq, wk, torch.tensor([8.0, 1.0]), 2.0, H)
    assert wq.dtype == torch.bfloat16 and torch.equal(wq[d:], wq0[d:])
    torch.testing.assert_close(wq[:d].float(), (wq0[:d].float() * 0.5).bfloat16().float(), rtol=0, atol=0)


def test_bad_arguments_name_the_argument_and_change_nothing():
    H, d = 4, 3
    wq, wk, bq, bk, _ = _weights(H, H, d, bias=True)
    snapshot = [t.clone() for t in (wq, wk, bq, bk)]
    S = torch.full((H,), 100.0)
    cases = [
        (dict(num_heads=5), "q_weight has 12 rows, not a multiple of num_heads=5"),
        (dict(num_heads=0), "num_heads"),
        (dict(max_logits=torch.ones(3)), "max_logits must have shape"),
        (dict(max_logits=[1.0] * 4), "max_logits"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=float("inf")), "threshold"),
        (dict(alpha=1.5), "alpha"),
        (dict(gqa="avg"), "gqa"),
        (dict(num_kv_heads=3), "num_kv_heads=3"),
        (dict(k_weight=torch.randn(10, 12)), "k_weight has 10 rows"),
        (dict(k_weight=torch.randn(12, 7)), "k_weight has 7 input features"),
        (dict(q_weight=torch.randn(12)), "q_weight must be 2-D"),
        (dict(q_weight=torch.ones(12, 12, dtype=torch.int64)), "q_weight must be a floating"),
        (dict(q_bias=torch.randn(11)), "q_bias must have shape"),
        (dict(k_bias=torch.randn(12, 1)), "k_bias must have shape"),
    ]
    for override, message in cases:
        kwargs = dict(q_weight=wq, k_weight=wk, max_logits=S, threshold=1.0, num_heads=H, q_bias=bq, k_bias=bk)
        kwargs.update(override)
        with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(")):
            muon.qk_clip_(**kwargs)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, (wq, wk, bq, bk)))
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        muon.qk_clip_(torch.randn(6, 4), torch.randn(4, 4), torch.ones(6), 1.0, 6)
    with pytest.raises(ValueError, match="threshold"):
        muon.QKClip(-1.0)


# ------------------------------------------------------------------------------------- QKClip
class TinyAttention(nn.Module):
    """Causal multi-head attention that exposes its pre-softmax logits through a `scores` submodule."""

    def __init__(self, dim=16, heads=4, kv_heads=4, bias=True):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.head_dim, bias=bias)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.o = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.scores = nn.Identity()  # a place for a forward hook to see the logits

    def forward(self, x):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        mask = torch.ones(L, L, dtype=torch.bool).triu(1)
        logits = self.scores(logits.masked_fill(mask, -math.inf))
        out = logits.softmax(-1) @ v
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


def _true_max(attn, x):
    with torch.no_grad():
        q, k = attn.q, attn.k
        return _head_max(_logits64(q.weight, k.weight, q.bias, k.bias, x.double(), attn.heads, attn.kv_heads))


def test_qkclip_records_running_max_and_clips_after_the_optimizer_step():
    torch.manual_seed(0)
    attn = TinyAttention()
    with torch.no_grad():
        attn.q.weight.mul_(3.0)  # large logits on some heads
    x1, x2 = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    clip = muon.QKClip(threshold=1.0)  # set below, once the logits are known
    clip.add("attn", attn.q, attn.k, num_heads=attn.heads)
    handle = clip.attach("attn", attn.scores)
    opt = torch.optim.SGD(attn.parameters(), lr=0.0)  # lr 0: the step itself changes nothing
    clip.attach_optimizer(opt)

    # running max over two batches, masked (-inf) entries ignored: the causal max of each head
    def causal_max(x):
        logits = _logits64(attn.q.weight, attn.k.weight, attn.q.bias, attn.k.bias, x.double(), 4, 4)
        return _head_max(logits.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), -math.inf))

    with torch.no_grad():
        S = torch.maximum(causal_max(x1), causal_max(x2))
    clip.threshold = _tau_between(S, 2)
    attn(x1).sum().backward()
    attn(x2).sum()
    torch.testing.assert_close(clip.max_logits["attn"].double(), S, rtol=1e-5, atol=1e-5)
    q0 = attn.q.weight.detach().clone()
    opt.step()
    assert clip.max_logits == {}  # reset after the step
    offending = S > clip.threshold
    for h in range(4):
        same = torch.equal(_rows(attn.q.weight, h, 4), _rows(q0, h, 4))
        assert same == (not offending[h].item())
    with torch.no_grad():
        S_after = torch.maximum(causal_max(x1), causal_max(x2))
    assert (S_after[offending] <= clip.threshold * (1 + 1e-5)).all()
    attn.eval()
    attn(x1)  # eval forwards are not recorded
    assert clip.max_logits == {}
    attn.train()
    handle.remove()
    attn(x1)
    assert clip.max_logits == {}


def test_qkclip_record_from_attention_code_and_errors():
    attn = TinyAttention(heads=4, kv_heads=2, bias=False)
    clip = muon.QKClip(threshold=0.5, gqa="group")
    clip.add("a", attn.q.weight, attn.k.weight, num_heads=4)
    with pytest.raises(KeyError, match="'b'"):
        clip.record("b", torch.zeros(4))
    with pytest.raises(ValueError, match="expected num_heads=4"):
        clip.record("a", torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match="already registered"):
        clip.add("a", attn.q, attn.k, num_heads=4)
    with pytest.raises(ValueError, match="k_weight has 7 rows, not a multiple of the head size 4"):
        clip.add("c", attn.q, nn.Linear(16, 7), num_heads=4)
    assert "c" not in clip._attn
    clip.record("a", torch.tensor([0.1, 2.0, 0.2, 0.3]))  # already reduced per-head maxima
    clip.record("a", torch.tensor([0.1, 0.2, 0.3, 0.4]))
    factors = clip.step()
    torch.testing.assert_close(factors["a"], torch.tensor([0.25, 0.25, 1.0, 1.0]))


def test_modules_are_looked_up_at_each_step():
    # fully_shard and some .to() paths swap in new Parameter objects after registration
    attn = TinyAttention()
    clip = muon.QKClip(threshold=1.0)
    clip.add("attn", attn.q, attn.k, num_heads=4)
    old = attn.q.weight
    before = old.detach().clone()
    attn.q.weight = nn.Parameter(old.detach().clone())
    clip.record("attn", torch.tensor([4.0, 0.0, 0.0, 0.0]))
    clip.step()
    assert torch.equal(attn.q.weight[:4], before[:4] * 0.5)  # the new parameter was clipped
    assert torch.equal(old, before)  # the replaced one was not
    with pytest.raises(TypeError, match="without a `weight`"):
        clip.add("x", nn.ReLU(), attn.k, num_heads=4)


def test_no_host_sync_in_the_clip_path():
    attn = TinyAttention()
    clip = muon.QKClip(threshold=0.01)
    clip.add("attn", attn.q, attn.k, num_heads=4)
    clip.attach("attn", attn.scores)
    x = torch.randn(1, 8, 16)
    with count_dispatched_ops() as ops:
        attn(x)
        clip.step()
        muon.qk_clip_(attn.q.weight, attn.k.weight, torch.full((4,), 5.0), 1.0, 4)
    assert "aten._local_scalar_dense.default" not in ops, ops
    assert ops["aten.mul_.Tensor"] >= 4  # the clip did run
    with count_dispatched_ops() as control:  # the detector sees a sync when there is one
        bool(torch.ones(1) > 0)
    assert control["aten._local_scalar_dense.default"] == 1


# --------------------------------------------------------------------------------- DTensor shards
def test_row_to_head_mapping_on_uneven_shards():
    # 5 heads of 3 rows = 15 rows split 8/7 (torch's chunking): head 2 spans both shards.
    per_head = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    full = torch.ones(15, 2)
    for start, stop in ((0, 8), (8, 15), (0, 4), (4, 9), (9, 15)):
        local = full[start:stop].clone()
        _scale_local_rows_(local, start, per_head, 3)
        assert torch.equal(local[:, 0], per_head[torch.arange(start, stop) // 3])


@pytest.fixture
def fake_two_rank():
    """A 2-rank process group faked inside this process: be rank `r` of a Shard(0) mesh."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    FakeStore = pytest.importorskip("torch.testing._internal.distributed.fake_pg").FakeStore

    def start(rank):
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", rank=rank, world_size=2, store=FakeStore())
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh("cpu", (2,))

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("rank", [0, 1])
def test_dtensor_shard0_each_rank_scales_the_rows_it_holds(fake_two_rank, rank):
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = fake_two_rank(rank)
    H, Hkv, d = 5, 5, 3  # 15 rows: rank 0 holds 8, rank 1 holds 7
    wq, wk, bq, bk, x = _weights(H, Hkv, d, bias=True, seed=3)
    S = _head_max(_logits64(wq, wk, bq, bk, x, H, Hkv)).float()
    tau = _tau_between(S.double(), 3)
    ref = [t.clone() for t in (wq, wk, bq, bk)]
    muon.qk_clip_(*ref[:2], S, tau, H, q_bias=ref[2], k_bias=ref[3])

    def shard(t):
        return DTensor.from_local(t.chunk(2)[rank].clone(), mesh, [Shard(0)], shape=t.shape, stride=t.stride())

    dq, dk, dbq, dbk = (shard(t) for t in (wq, wk, bq, bk))
    dS = DTensor.from_local(S.clone(), mesh, [Replicate()])
    muon.qk_clip_(dq, dk, dS, tau, H, q_bias=dbq, k_bias=dbk)
    for got, want in zip((dq, dk, dbq, dbk), ref):
        assert torch.equal(got.to_local(), want.chunk(2)[rank])  # same floats as the unsharded call


def test_dtensor_on_a_one_rank_gloo_mesh_and_qkclip_sync():
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        H, d = 4, 3
        wq, wk, _, _, _ = _weights(H, H, d, seed=4)
        ref_q, ref_k = wq.clone(), wk.clone()
        S = torch.tensor([9.0, 1.0, 4.0, 0.5])
        muon.qk_clip_(ref_q, ref_k, S, 2.0, H)
        dq = nn.Parameter(distribute_tensor(wq, mesh, [Shard(0)]))
        dk = nn.Parameter(distribute_tensor(wk, mesh, [Shard(0)]))
        clip = muon.QKClip(threshold=2.0)
        clip.add("attn", dq, dk, num_heads=H)
        clip.add("idle", torch.randn(4, 2), torch.randn(4, 2), num_heads=2)  # nothing recorded: untouched
        clip.record("attn", S)
        clip.step()  # MAX all-reduce over the (1-rank) default group, then the clip
        assert torch.equal(dq.to_local(), ref_q) and torch.equal(dk.to_local(), ref_k)
    finally:
        dist.destroy_process_group()


def test_readme_example_runs_and_clips():
    scope = docblocks.run(docblocks.block("docs/qk-clip.md", "QK-clip"))
    seen, tau = scope["seen"], scope["clip"].threshold
    assert seen[0] > 2 * tau  # the example starts far above τ ...
    assert all(s <= 1.15 * tau for s in seen[1:])  # ... and each later step starts near τ (one update's growth)
    torch.testing.assert_close(scope["gamma"], torch.tensor([5 / 9, 1.0, 1.0, 1.0]))


def _two_rank_job(rank, world, port, outdir):
    """Each rank holds a Shard(0) half of q/k and records its own logits; 'other' only on rank 0."""
    import json
    import traceback
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    result = "ok"
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
        )
        mesh = init_device_mesh("cpu", (world,))
        H, d = 5, 3  # 15 rows: 8 on rank 0, 7 on rank 1, head 2 split between them
        wq, wk, bq, bk, _ = _weights(H, H, d, bias=True, seed=5)
        records = [torch.tensor([9.0, 1.0, 2.0, 0.5, 3.0]), torch.tensor([1.0, 1.0, 6.0, 0.5, 7.0])]
        ow, _, _, _, _ = _weights(2, 2, 2, d_in=4, seed=6)
        ref = [t.clone() for t in (wq, wk, bq, bk)]
        muon.qk_clip_(*ref[:2], torch.maximum(*records), 2.5, H, q_bias=ref[2], k_bias=ref[3])
        other_ref = [ow.clone(), ow.clone()]
        muon.qk_clip_(*other_ref, torch.tensor([4.0, 1.0]), 2.5, 2)
        shards = [distribute_tensor(t, mesh, [Shard(0)]) for t in (wq, wk, bq, bk)]
        other = [distribute_tensor(ow, mesh, [Shard(0)]) for _ in range(2)]
        clip = muon.QKClip(threshold=2.5)
        clip.add("attn", shards[0], shards[1], num_heads=H, q_bias=shards[2], k_bias=shards[3])
        clip.add("other", other[0], other[1], num_heads=2)
        clip.record("attn", records[rank])
        if rank == 0:
            clip.record("other", torch.tensor([4.0, 1.0]))
        clip.step()
        for got, want in zip(shards + other, ref + other_ref):
            assert torch.equal(got.full_tensor(), want), (got.full_tensor(), want)
        dist.destroy_process_group()
    except Exception:
        result = traceback.format_exc()
    with open(f"{outdir}/rank{rank}.json", "w") as f:
        json.dump(result, f)


@pytest.mark.slow  # two spawned processes: ~8 s of start-up on two cores
@pytest.mark.xdist_group("processes")  # with the other multi-process tests (tests/test_distributed.py)
def test_two_gloo_ranks_clip_identically_from_their_own_records(tmp_path):
    import json

    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs gloo")
    from dist_harness import launch

    codes = launch(_two_rank_job, 2, str(tmp_path), deadline_s=90)
    assert codes == [0, 0]
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == "ok"
