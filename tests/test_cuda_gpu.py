"""backend="cuda" on a GPU, against the float64 reference with the tolerance rule of tests/nsref.py
(error ≤ factor × torch's own bf16 error). Skipped without a GPU (conftest)."""

from __future__ import annotations

import pytest
import torch
from nsref import assert_ns_close

import muon
from muon import _native
from muon.coefficients import resolve_schedule

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16

SHAPES = [(1, 1), (7, 33), (33, 7), (64, 64), (128, 200), (199, 64), (256, 1024), (3, 130, 384), (2, 2, 129, 257)]


PATHS = ["auto", "mma", "wgmma"]  # resolved inside the tests: nothing touches CUDA at collection


def run_path(G, path, coefficients="keller", steps=5):
    """The public API ("auto"), or the extension forced onto mma.sync or wgmma kernels."""
    if path == "auto":
        return muon.newton_schulz(G, steps, coefficients, backend="cuda")
    ext = _native.load()
    if ext is None:
        pytest.skip("muon._C is not built")
    if path == "wgmma" and not (ext.built_sm90() and torch.cuda.get_device_capability() == (9, 0)):
        pytest.skip("the wgmma path needs an sm_90 GPU and a 90a build")
    path = {"mma": 0, "wgmma": 1}[path]
    X = G.reshape(-1, *G.shape[-2:])
    if X.shape[-2] > X.shape[-1]:
        X = X.mT
    B, m, n = X.shape
    sched = resolve_schedule(coefficients, steps, 1e-7)
    out = torch.full((B, m, n), float("nan"), dtype=BF16, device=G.device)  # poisoned: unwritten shows
    ws = torch.full((ext.workspace_bytes(B, m, n),), 255, dtype=torch.uint8, device=G.device)
    codes = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
    ext.newton_schulz(X.data_ptr(), codes[X.dtype], B, m, n, tuple(X.stride()), out.data_ptr(), tuple(out.stride()),
                      [v for t in sched.coefficients for v in t], sched.fro_scale, sched.eps, ws.data_ptr(),
                      ws.numel(), torch.cuda.current_stream().cuda_stream, path)
    if G.shape[-2] > G.shape[-1]:
        out = out.mT
    return out.reshape(G.shape)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, path):
    G = torch.randn(shape, device="cuda")
    out = run_path(G, path)
    assert torch.isfinite(out).all()
    assert_ns_close(out.cpu(), G.cpu(), BF16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("coefficients", ["keller", "you", "polar_express", "cans"])
def test_presets(coefficients, path):
    G = torch.randn(96, 320, device="cuda")
    assert_ns_close(run_path(G, path, coefficients).cpu(), G.cpu(), BF16, coefficients=coefficients)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes_and_strides(dtype):
    G = torch.randn(300, 3, 160, device="cuda").to(dtype).permute(1, 2, 0)  # non-contiguous (3, 160, 300)
    out = muon.newton_schulz(G, backend="cuda")
    assert out.dtype == dtype and out.shape == G.shape
    assert_ns_close(out.cpu(), G.cpu().float(), BF16)


def test_scale_invariance_and_zero():
    G = torch.randn(2, 100, 260, device="cuda")
    base = muon.newton_schulz(G, backend="cuda").float()
    for s in (1e-25, 1e25):
        assert torch.allclose(muon.newton_schulz(G * s, backend="cuda").float(), base, atol=2e-2)
    assert (muon.newton_schulz(torch.zeros(40, 70, device="cuda"), backend="cuda") == 0).all()


def test_steps_zero_is_the_normalization():
    G = torch.randn(50, 90, device="cuda")
    out = muon.newton_schulz(G, steps=0, backend="cuda").float()
    ref = G / G.norm()
    assert torch.allclose(out, ref, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("path", ["mma", "wgmma"])
def test_gram_in_workspace_is_exactly_symmetric(path, monkeypatch):
    """The mirrored stores leave A = X·Xᵀ and B = bA + cA² symmetric bit for bit (workspace layout of
    csrc/ns_driver.cu: X0, X1, A, B, each 256-B aligned, rows padded to multiples of 8)."""
    m, n = 300, 700
    G = torch.randn(1, m, n, device="cuda")
    captured = {}
    real_full = torch.full

    def spy_full(size, fill, **kw):
        t = real_full(size, fill, **kw)
        if kw.get("dtype") == torch.uint8:
            captured["ws"] = t
        return t

    monkeypatch.setattr(torch, "full", spy_full)
    run_path(G, path, steps=1)
    torch.cuda.synchronize()
    ws = captured["ws"]
    align = lambda b: (b + 255) // 256 * 256  # noqa: E731
    ldn, ldm = (n + 7) // 8 * 8, (m + 7) // 8 * 8
    a_off = 2 * align(m * ldn * 2)
    for off in (a_off, a_off + align(m * ldm * 2)):
        M = ws[off: off + m * ldm * 2].view(torch.bfloat16).view(m, ldm)[:, :m]
        assert torch.isfinite(M).all() and torch.equal(M, M.T)


def test_cuda_graph_capture():
    G = torch.randn(4, 256, 512, device="cuda")
    eager = muon.newton_schulz(G, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        muon.newton_schulz(G, backend="cuda")  # warm-up (lazy module load) outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = muon.newton_schulz(G, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.parametrize("path", ["mma", "wgmma"])
def test_deterministic_and_paths_agree(path):
    G = torch.randn(2, 384, 1000, device="cuda")
    first = run_path(G, path)
    assert torch.equal(first, run_path(G, path))  # no atomics, fixed reduction order
    other = run_path(G, "mma")
    assert (first.float() - other.float()).abs().max() < 0.05


def test_muon_optimizer_backend_cuda_matches_torch_backend():
    torch.manual_seed(1)
    w = torch.randn(256, 512, device="cuda")
    p1, p2 = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    o1, o2 = muon.Muon([p1], lr=0.02, backend="cuda"), muon.Muon([p2], lr=0.02, backend="torch")
    for _ in range(3):
        g = torch.randn_like(w)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
        assert (p1 - p2).abs().max() < 0.02 * 0.05


def test_cupy_path_matches(monkeypatch):
    pytest.importorskip("cupy")
    from muon import cupy_path

    G = torch.randn(2, 150, 333, device="cuda")
    sched = resolve_schedule("keller", 5, 1e-7)
    out = cupy_path.run(G, sched)
    assert_ns_close(out.cpu(), G.cpu(), BF16)
    monkeypatch.setattr(_native, "_state", {"module": None, "error": "not built (test)"})
    assert torch.equal(muon.newton_schulz(G, backend="cuda"), out.float())


def test_cupy_arrays_in_and_out():
    cupy = pytest.importorskip("cupy")
    G = cupy.random.standard_normal((64, 200), dtype=cupy.float32)
    out = muon.newton_schulz(G, backend="cuda")
    assert isinstance(out, cupy.ndarray) and out.dtype == cupy.float32 and out.shape == (64, 200)
    assert_ns_close(torch.from_dlpack(out).cpu(), torch.from_dlpack(G).cpu(), BF16)
