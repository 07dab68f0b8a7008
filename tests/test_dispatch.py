"""backend="auto": the measured dispatch table (muon.backends.dispatch) and the CUDA-graph cache keys.

CPU only: the table's decisions are pure functions of (batch, m, n, dtype, device type); the graph
replay itself is exercised by the GPU test in tests/test_triton_persistent.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import make_muon

from muon import backends
from muon.backends import dispatch
from muon.backends.graphs import GraphCache, graph_key, unusable_reason
from muon.coefficients import resolve_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = torch.bfloat16


def test_embedded_table_is_the_h100_csv():
    assert dispatch.table_from_csv(os.path.join(ROOT, dispatch.SOURCE)) == dispatch.BACKEND_TABLE


@pytest.mark.parametrize("entry", dispatch.BACKEND_TABLE, ids=lambda e: f"{e.batch}x{e.short}x{e.long}")
def test_auto_is_never_slower_than_torch_on_a_measured_shape(entry):
    choice = dispatch.choose_for_shape(entry.batch, entry.short, entry.long, BF16)
    if entry.winner == "muon[torch]":
        assert choice.backend == "torch", choice
    else:
        assert entry.winner_ms < entry.torch_ms
        assert (choice.backend, choice.kwargs) == dispatch.AUTO_PROVIDERS[entry.winner], choice


@pytest.mark.parametrize(
    "shape, backend",
    [((1, 1024, 1024), "torch"), ((1, 2048, 2048), "torch"), ((12, 768, 768), "torch"), ((4, 1024, 4096), "torch"),
     ((16, 2048, 2048), "torch"), ((64, 128, 128), "triton"), ((32, 64, 1024), "triton"), ((24, 768, 3072), "triton"),
     ((1, 8192, 8192), "triton"), ((1, 4096, 16384), "triton"),
     # tall inputs are the same class as their transpose
     ((1, 16384, 4096), "triton"), ((24, 3072, 768), "triton")],
)
def test_the_measured_winners(shape, backend):
    assert dispatch.choose_for_shape(*shape, BF16).backend == backend


def test_unmeasured_classes_dtypes_and_devices_run_torch():
    assert dispatch.choose_for_shape(1, 128, 128, BF16).backend == "torch"  # batch 64× away from 64×128²
    assert dispatch.choose_for_shape(1, 300, 100000, BF16).backend == "torch"
    assert dispatch.choose_for_shape(64, 128, 128, torch.float32).backend == "torch"  # only bf16 measured
    assert dispatch.choose_for_shape(64, 128, 128, torch.float16).backend == "torch"
    assert dispatch.choose_for_shape(64, 128, 128, BF16, device_type="cpu").backend == "torch"
    # within a factor 2 of a measured triton win
    assert dispatch.choose_for_shape(48, 128, 160, BF16).backend == "triton"


def test_cuda_extension_and_unmeasured_kernels_are_never_auto():
    rows = [
        dict(op="newton_schulz", provider="muon[torch]", shape="1x512x512", dtype="bfloat16", ms="1.0", status="ok"),
        dict(op="newton_schulz", provider="muon[cuda]", shape="1x512x512", dtype="bfloat16", ms="0.1", status="ok"),
        dict(op="newton_schulz", provider="muon[triton:persistent]", shape="1x512x2048", dtype="bfloat16",
             ms="0.5", status="skipped: no GPU"),
        dict(op="newton_schulz", provider="muon[torch]", shape="1x512x2048", dtype="bfloat16", ms="1.0", status="ok"),
    ]
    table = dispatch.table_from_rows(rows)
    assert {e.winner for e in table} == {"muon[torch]"}
    rows[2]["status"] = "ok"
    rows[2]["kernel_version"] = "triton-v2"
    table = dispatch.table_from_rows(rows)
    win = [e for e in table if e.long == 2048][0]
    assert (win.winner, win.kernel_version) == ("muon[triton:persistent]", "triton-v2")
    choice = dispatch.choose_for_shape(1, 512, 2048, BF16, table=table)
    assert choice.kwargs == {"path": "persistent"}


def test_equidistant_disagreeing_measurements_run_torch():
    table = (dispatch.Entry(1, 256, 256, "bfloat16", "muon[triton]", "triton-v1", 1.0, 2.0),
             dispatch.Entry(1, 1024, 1024, "bfloat16", "muon[torch]", "torch", 1.0, 1.0))
    assert dispatch.choose_for_shape(1, 512, 512, BF16, table=table).backend == "torch"
    assert dispatch.choose_for_shape(1, 300, 300, BF16, table=table).backend == "triton"


def test_select_auto_keeps_its_signature_and_runs_torch_on_cpu():
    X = torch.randn(2, 8, 16)
    run = backends.select("auto", X)
    out = run(X, resolve_schedule("keller", 5, 1e-7), torch.float32)
    ref = backends.select("torch", X)(X, resolve_schedule("keller", 5, 1e-7), torch.float32)
    assert torch.equal(out, ref)
    assert backends.auto_order(X) == ("torch",)
    assert backends.unavailable_reason("auto", X) is None  # torch is its fallback
    assert "unknown backend" in backends.unavailable_reason("fastest", X)


def test_graph_key_separates_what_a_capture_depends_on():
    X = torch.randn(2, 8, 16)
    s = resolve_schedule("keller", 5, 1e-7)
    k = graph_key(X, s, BF16, "ns_small")
    assert k == graph_key(X.clone(), s, BF16, "ns_small")
    assert k == graph_key(torch.randn(2, 16, 8).mT, s, BF16, "ns_small")  # strides do not matter (copied in)
    assert k != graph_key(torch.randn(2, 8, 17), s, BF16, "ns_small")
    assert k != graph_key(X.double(), s, BF16, "ns_small")
    assert k != graph_key(X, s, torch.float32, "ns_small")
    assert k != graph_key(X, resolve_schedule("polar_express", 5, 1e-7), BF16, "ns_small")
    assert k != graph_key(X, resolve_schedule("keller", 4, 1e-7), BF16, "ns_small")
    assert k != graph_key(X, resolve_schedule("keller", 5, 1e-6), BF16, "ns_small")
    assert k != graph_key(X, s, BF16, "ns_persistent")
    assert k != graph_key(X, resolve_schedule("keller", 5, 1e-7, precondition="aol"), BF16, "ns_small")
    assert unusable_reason(X) == "not a CUDA tensor"
    assert len(GraphCache(capacity=2)) == 0


def test_bench_kernels_csv_is_the_table_format(tmp_path):
    """What `python -m bench kernels` writes is what the table is read from (a GPU run updates it)."""
    from bench.cli import main

    assert main(["kernels", "--device", "cpu", "--shapes", "2x16x32", "--preset", "none", "--peers", "",
                 "--backends", "torch,auto", "--dtype", "bf16", "--rep-ms", "1", "--gemm-size", "32", "--no-plot",
                 "--out", str(tmp_path)]) == 0
    table = dispatch.table_from_csv(tmp_path / "kernels.csv")
    assert [(e.batch, e.short, e.long, e.dtype, e.winner) for e in table] == [(2, 16, 32, "bfloat16", "muon[torch]")]


def test_graph_cache_copies_in_and_out_and_evicts_least_recently_used(monkeypatch):
    """The cache's bookkeeping with a stand-in for the CUDA graph (the real capture: the GPU test)."""

    class FakeGraph:
        def __init__(self, fn, static_in, static_out):
            self.fn, self.static_in, self.static_out = fn, static_in, static_out

        def replay(self):
            self.static_out.copy_(self.fn(self.static_in))

    from muon.backends import graphs

    def capture(self, X, fn):
        static_in = X.clone()
        static_out = fn(static_in)
        self.captures += 1
        return graphs._Entry(FakeGraph(fn, static_in, static_out), static_in, static_out)

    monkeypatch.setattr(GraphCache, "_capture", capture)
    cache = GraphCache(capacity=2)
    double = lambda X: 2 * X
    X = torch.randn(3, 4)
    out = cache.run("a", X, double)
    assert torch.equal(out, 2 * X)
    Y = torch.randn(3, 4).mT.contiguous().mT  # other strides, same shape: copied into the static input
    out2 = cache.run("a", Y, double)
    assert torch.equal(out2, 2 * Y) and torch.equal(out, 2 * X)  # outputs are copies, not the static buffer
    assert cache.captures == 1 and cache.replays == 2
    cache.run("b", X, double)
    cache.run("a", X, double)  # "a" is now the most recent
    cache.run("c", X, double)  # evicts "b"
    assert len(cache) == 2 and set(cache._entries) == {"a", "c"}
    cache.run("b", X, double)
    assert cache.captures == 4


def test_cuda_backend_refuses_aol_by_name():
    """The CUDA C++ kernels form the Frobenius start only: AOL is an error naming the backends that have
    it (raised before anything touches a GPU), not a silent Frobenius run."""
    from muon.backends import cuda_backend

    schedule = resolve_schedule("you", 4, 1e-7, precondition="aol")
    with pytest.raises(ValueError, match="precondition='aol' is not supported by backend='cuda'.*triton"):
        cuda_backend.run(torch.randn(1, 4, 8), schedule, BF16)


# ------------------------------------------------------------------------- ns_dtype="auto" on a CPU
def _entry(cpu="Test CPU 9000", threads=1, short=128, long=512, winner="bfloat16"):
    fp32, bf16 = (2.0, 1.0) if winner == "bfloat16" else (1.0, 2.0)
    return dispatch.DtypeEntry(cpu, threads, short, long, winner, fp32, bf16)


def test_embedded_cpu_dtype_table_is_the_committed_csv():
    assert dispatch.dtype_table_from_csv(os.path.join(ROOT, dispatch.CPU_DTYPE_SOURCE)) == dispatch.CPU_DTYPE_TABLE
    for e in dispatch.CPU_DTYPE_TABLE:  # a winner is what its own medians say, with the margin
        assert (e.winner == "bfloat16") == (e.bf16_ms < dispatch.BF16_MARGIN * e.fp32_ms)


def test_auto_dtype_follows_the_cpu_table():
    table = (_entry(short=128, long=512), _entry(short=512, long=512, winner="float32"),
             _entry(threads=2, short=64, long=64))
    pick = lambda m, n, **kw: dispatch.choose_ns_dtype(m, n, "cpu", cpu="Test CPU 9000", threads=1,  # noqa: E731
                                                       table=table, **kw)
    assert pick(128, 512) == BF16 and pick(512, 128) == BF16  # tall = its transpose
    assert pick(100, 400) == BF16 and pick(200, 800) == BF16  # within a factor 2 on both sides
    assert pick(256, 1024) == torch.float32  # as near to 512x512 (fp32) as to 128x512 (bf16): fp32
    assert pick(512, 512) == torch.float32  # measured: fp32 wins there
    assert pick(16, 16) == torch.float32 and pick(4096, 4096) == torch.float32  # unmeasured class: fp32
    assert pick(0, 8) == torch.float32
    # the nearest measured thread count decides: at 2 threads only the 64x64 entry exists
    two = lambda m, n: dispatch.choose_ns_dtype(m, n, "cpu", cpu="Test CPU 9000", threads=2, table=table)  # noqa: E731
    assert two(64, 64) == BF16 and two(128, 512) == torch.float32
    # CUDA is bf16 whatever the table; another device computes in fp32
    assert dispatch.choose_ns_dtype(8, 8, "cuda", table=table) == BF16
    assert dispatch.choose_ns_dtype(8, 8, "meta", table=table) == torch.float32


def test_unknown_or_unreadable_cpu_falls_back_to_fp32(monkeypatch):
    table = (_entry(),)
    assert dispatch.choose_ns_dtype(128, 512, "cpu", cpu="Another CPU", table=table) == torch.float32
    assert dispatch.choose_ns_dtype(128, 512, "cpu", cpu="", table=table) == torch.float32

    def no_file(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(dispatch.REGISTRY, "host", {})
    monkeypatch.setattr("builtins.open", no_file)
    monkeypatch.setattr(dispatch.platform, "processor", lambda: "")
    assert dispatch.cpu_model() == ""
    assert dispatch.choose_ns_dtype(128, 512, "cpu", table=table) == torch.float32


def test_optimizer_and_newton_schulz_resolve_auto_from_the_table(monkeypatch):
    """With a table that says bf16 for 16x32 on this CPU: muon.newton_schulz, the step engine's bucket
    and the per-parameter reference loop all compute that shape in bf16, the others in fp32, and the
    engine and the reference agree."""
    import muon
    from muon.newton_schulz import orthogonalize

    here = dispatch.cpu_model()
    table = (dispatch.DtypeEntry(here, torch.get_num_threads(), 16, 32, "bfloat16", 2.0, 1.0),
             dispatch.DtypeEntry(here, torch.get_num_threads(), 64, 64, "float32", 1.0, 2.0))
    monkeypatch.setattr(dispatch, "CPU_DTYPE_TABLE", table)
    schedule = resolve_schedule("keller", 5, 1e-7)
    assert orthogonalize(torch.randn(32, 16), schedule).dtype == BF16
    assert orthogonalize(torch.randn(64, 64), schedule).dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 32), (64, 64)]
    engine = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    loop = [p.detach().clone().requires_grad_() for p in engine]
    opt, ref = muon.Muon(engine, lr=0.02), make_muon(loop, lr=0.02, foreach="reference")
    for _ in range(2):
        for p, q in zip(engine, loop):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert sorted(str(b.ns_dtype) for b in opt._plan.groups[0].buckets) == ["torch.bfloat16", "torch.float32"]
    for p, q in zip(engine, loop):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ------------------------------------------------------------------ the kernel, chosen once
class _Facts(dict):
    """reasons for choose_kernel that remember which backends were asked about."""

    def __init__(self, **reasons):
        super().__init__(reasons)
        self.asked = []

    def __getitem__(self, name):
        self.asked.append(name)
        return super().__getitem__(name)


def test_choose_kernel_is_a_function_of_shape_dtype_device_options_and_facts():
    from muon.backends.op import Kernel

    choose = lambda backend, algorithm, b, s, l, dtype, device, facts, **kw: dispatch.choose_kernel(  # noqa: E731
        backend, algorithm, b, s, l, dtype, device, steps=5, reasons=facts, **kw)
    facts = _Facts(triton=None, cuda="no extension")
    assert choose("auto", "standard", 64, 128, 128, BF16, "cuda", facts) == Kernel("triton")  # measured 0.042 ms
    assert choose("auto", "standard", 1, 128, 128, BF16, "cuda", facts) == Kernel("torch")  # batch 64x away
    assert facts.asked == ["triton"]  # never the extension auto does not pick
    unusable = choose("auto", "standard", 64, 128, 128, BF16, "cuda", _Facts(triton="no Triton here"))
    assert unusable == Kernel("torch") and "no Triton here" in unusable.reason
    cpu = _Facts()
    assert choose("auto", "standard", 64, 128, 128, BF16, "cpu", cpu) == Kernel("torch") and cpu.asked == []
    assert choose("auto", "gram", 4, 64, 256, BF16, "cuda", cpu) == Kernel("torch", "gram", restarts=(2,))
    assert choose("auto", "auto", 4, 64, 256, BF16, "cpu", cpu).algorithm == "gram"  # the FLOP model, n > 1.5 m
    assert choose("cuda", "auto", 4, 64, 256, BF16, "cpu", _Facts(cuda=None)) == Kernel("cuda")  # no Gram NS there
    with pytest.raises(backends.BackendUnavailable, match="no extension"):
        choose("cuda", "standard", 4, 64, 256, BF16, "cuda", facts)
    with pytest.raises(backends.BackendUnavailable, match="has no Gram Newton–Schulz"):
        choose("cuda", "gram", 4, 64, 256, BF16, "cuda", _Facts(cuda=None))
    with pytest.raises(backends.BackendUnavailable, match="unknown backend"):
        choose("fastest", "standard", 4, 64, 256, BF16, "cuda", facts)
    table = (dispatch.Entry(8, 64, 256, "bfloat16", "muon[triton:persistent]", "triton-v2", 1.0, 2.0),)
    persistent = Kernel("triton", path="persistent")
    assert choose("auto", "standard", 8, 64, 256, BF16, "cuda", facts, table=table) == persistent
    assert persistent.name == "triton:persistent" and Kernel("triton", path="auto").name == "triton"


def test_the_plan_chooses_each_buckets_kernel_once(monkeypatch):
    """The step calls the kernel its plan chose when it was built: no choice after the first step."""
    import muon

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, requires_grad=True) for s in [(8, 12), (8, 12), (12, 20), (6, 6)]]
    opt = muon.Muon(params, lr=0.02)
    calls = []
    real = dispatch.choose_kernel
    monkeypatch.setattr(dispatch, "choose_kernel", lambda *a, **kw: calls.append(a[:7]) or real(*a, **kw))
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        if step == 0:
            buckets = opt._plan.groups[0].buckets
            assert len(calls) == len(buckets) == 3
            assert all(b.run == backends.op.Kernel("torch") for b in buckets)
            calls.clear()
    assert calls == []


def test_batch_kernel_chooses_once_per_batch():
    from muon.backends.op import BatchKernel, Kernel

    asked = []
    kernel = BatchKernel(lambda batch: asked.append(batch) or Kernel("torch"))
    schedule = resolve_schedule("keller", 5, 1e-7)
    for batch in (4, 4, 2, 4, 2):
        X = torch.randn(batch, 8, 16)
        assert torch.equal(kernel(X, schedule, torch.float32), backends.module("torch").run(X, schedule, torch.float32))
    assert asked == [4, 2] and set(kernel.by_batch) == {4, 2}


def test_registry_owns_the_process_state_and_clears_in_place():
    from muon.backends.registry import REGISTRY, BoundedCache

    muon_ns = torch.randn(4, 6)
    before = backends.module("torch")
    import muon

    muon.newton_schulz(muon_ns)
    assert REGISTRY.modules["torch"] is before and REGISTRY.sizes()["fns"] >= 1
    schedules = REGISTRY.schedules
    try:
        REGISTRY.clear()
        assert REGISTRY.schedules is schedules and set(REGISTRY.sizes().values()) == {0}
    finally:
        backends.module("torch")  # what the package loads at import
    muon.newton_schulz(muon_ns)  # rebuilt on use
    assert REGISTRY.modules["torch"] is before
    cache = BoundedCache(2)
    for k in "abc":
        cache.put(k, k)
    assert list(cache) == ["b", "c"]


def test_a_plan_whose_choice_depends_on_the_batch_chooses_once_per_batch(monkeypatch):
    """backend="auto" on CUDA (batch_matters; forced here on the CPU): the plan keeps a BatchKernel,
    which chooses at a bucket's first step and never again."""
    import muon
    from muon.backends.op import BatchKernel, Kernel

    monkeypatch.setattr(dispatch, "batch_matters", lambda backend, algorithm, device_type: True)
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen, requires_grad=True) for s in [(8, 12), (12, 8), (8, 12), (6, 6)]]
    twin = [p.detach().clone().requires_grad_(True) for p in params]
    opt, ref = muon.Muon(params, lr=0.02), muon.Muon(twin, lr=0.02, backend="torch")
    calls = []
    real = dispatch.choose_kernel
    monkeypatch.setattr(dispatch, "choose_kernel", lambda *a, **kw: calls.append(a[:7]) or real(*a, **kw))
    for step in range(3):
        for p, q in zip(params, twin):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twin))
        if step == 0:
            runs = [b.run for b in opt._plan.groups[0].buckets]
            assert all(isinstance(r, BatchKernel) for r in runs)
            assert sorted(b for r in runs for b in r.by_batch) == [1, 3]  # (8, 12) x3 (one tall), (6, 6)
            assert all(k == Kernel("torch") for r in runs for k in r.by_batch.values())
            calls.clear()
    assert calls == []
