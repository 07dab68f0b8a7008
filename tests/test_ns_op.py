"""`muon::newton_schulz`, Newton–Schulz as one registered torch op (muon/backends/op.py).

torch.library.opcheck checks the schema, the fake (meta) kernel against the real one, the autograd
registration and AOT dispatch; torch.compile(fullgraph=True) of the public function and of a whole
optimizer step sees the op without a graph break and gives eager's bits.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import muon
from muon.backends import op, torch_backend
from muon.coefficients import resolve_schedule
from muon.profiling import count_dispatched_ops, count_matmul_flops

OP = torch.ops.muon.newton_schulz.default
SHAPES = [(8, 12), (12, 8), (3, 8, 12), (3, 12, 8)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def op_args(G, dtype=torch.float32, backend="torch", algorithm="standard", preset="keller", steps=5,
            precondition=None, restarts=(2,)):
    schedule = resolve_schedule(preset, steps, 1e-7, precondition=precondition)
    coefficients, fro_scale, eps, pre = op.schedule_args(schedule)
    return (G, coefficients, fro_scale, eps, pre, dtype, backend, algorithm, list(restarts))


def test_schema_is_registered_once():
    assert str(OP._schema) == "muon::" + op.SCHEMA
    assert op.OPERATOR is OP
    assert torch._C._dispatch_has_kernel_for_dispatch_key("muon::newton_schulz", "CompositeExplicitAutograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("muon::newton_schulz", "CUDA")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_opcheck_torch_backend(shape, dtype):
    """Schema, fake tensors (shape, dtype, strides: a tall input's result is a transposed stack),
    autograd registration and AOT dispatch, with and without a gradient."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(OP, op_args(G, dtype))
    if dtype in (torch.float32, torch.float64):  # the backward recomputes the torch oracle
        torch.library.opcheck(OP, op_args(G.clone().requires_grad_(True), dtype))


@pytest.mark.parametrize("precondition", ["frobenius", "aol"])
@pytest.mark.parametrize("shape", [(8, 24), (2, 24, 8)], ids=str)
def test_opcheck_gram_and_aol(shape, precondition):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for algorithm in ("standard", "gram"):
        torch.library.opcheck(OP, op_args(G, torch.bfloat16, algorithm=algorithm, preset="polar_express",
                                          precondition=precondition))


def test_opcheck_edge_cases():
    """Zero steps, an empty stack, a non-contiguous input, a bf16 input."""
    gen = torch.Generator().manual_seed(2)
    torch.library.opcheck(OP, op_args(torch.randn(6, 10, generator=gen), steps=0))
    torch.library.opcheck(OP, op_args(torch.randn(0, 6, 10)))
    torch.library.opcheck(OP, op_args(torch.randn(3, 10, 6, generator=gen).mT))
    torch.library.opcheck(OP, op_args(torch.randn(3, 6, 10, generator=gen).to(torch.bfloat16)))


@pytest.mark.parametrize("algorithm", ["standard", "gram"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_default_kernel_is_the_torch_backend_bit_for_bit(shape, algorithm):
    """The op's default kernel runs the torch backend (the oracle) on the small side of G."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    schedule = resolve_schedule("polar_express", 5, 1e-7)
    X = G.reshape(-1, *G.shape[-2:])
    tall = X.shape[-2] > X.shape[-1]
    X = X.mT if tall else X
    if algorithm == "gram":
        ref = torch_backend.run_gram(X, schedule, torch.bfloat16, (2,))
    else:
        ref = torch_backend.run(X, schedule, torch.bfloat16)
    ref = (ref.mT if tall else ref).reshape(G.shape)
    out = OP(*op_args(G, torch.bfloat16, algorithm=algorithm, preset="polar_express"))
    assert torch.equal(out, ref)
    public = muon.newton_schulz(G, coefficients="polar_express", dtype=torch.bfloat16, backend="torch",
                                algorithm=algorithm)
    assert torch.equal(public, ref.to(G.dtype))


def test_op_checks_its_arguments():
    G = torch.randn(4, 6)
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        OP(*op_args(G, algorithm="auto"))
    with pytest.raises(ValueError, match="flattened"):
        OP(G, [1.0, 2.0], 1.0, 1e-7, "frobenius", torch.float32, "torch", "standard", [])
    with pytest.raises(ValueError, match="stack"):
        OP(*op_args(torch.randn(2, 2, 4, 6)))
    with pytest.raises(muon.backends.BackendUnavailable, match="CUDA tensors"):
        OP(*op_args(G, backend="cuda"))


def test_fake_tensors_see_one_op():
    with FakeTensorMode():
        G = torch.empty(5, 12, 7)
        out = muon.newton_schulz(G, dtype=torch.bfloat16, backend="torch")
        raw = OP(*op_args(G, torch.bfloat16))
    assert out.shape == G.shape and out.dtype == torch.float32
    assert raw.shape == G.shape and raw.dtype == torch.bfloat16 and raw.stride() == (84, 1, 12)


def test_user_dispatch_modes_see_the_backend_ops():
    """Counters, profilers and emulators (TorchDispatchModes of the user's) see the torch backend's
    aten ops, as before the op: the public function runs the kernel directly under them."""
    G = torch.randn(2, 8, 24)
    with count_dispatched_ops() as ops, count_matmul_flops() as flops:
        out = muon.newton_schulz(G, steps=3, backend="torch")
    assert "muon.newton_schulz.default" not in ops and ops["aten.bmm.default"] == 3
    assert flops.total > 0
    assert torch.equal(out, muon.newton_schulz(G, steps=3, backend="torch"))


def _graph_ops(gm) -> list[str]:
    return [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]


def test_compiled_newton_schulz_is_one_op_without_graph_breaks():
    """fullgraph=True (a graph break raises) through dynamo and AOT autograd (fake tensors): the graph
    holds the op once, and the compiled result is eager's, bit for bit."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        def record(g, _):
            graphs.append(_graph_ops(g))
            return g

        return aot_autograd(fw_compiler=record)(gm, example_inputs)

    def f(G):
        return muon.newton_schulz(G, dtype=torch.float32, backend="torch") * 2

    gen = torch.Generator().manual_seed(4)
    for shape in [(16, 24), (3, 24, 16)]:
        G = torch.randn(shape, generator=gen)
        compiled = torch.compile(f, fullgraph=True, backend=backend)
        assert torch.equal(compiled(G), f(G))
    assert len(graphs) == 2 and all(ops.count("muon.newton_schulz.default") == 1 for ops in graphs), graphs
    torch._dynamo.reset()


def test_inductor_compiled_newton_schulz_matches_eager():
    """The op is opaque to inductor, which calls its kernel: eager's bits (measured: equal)."""
    pytest.importorskip("triton")  # inductor's CPU backend ships with Triton's toolchain checks
    torch._dynamo.reset()
    G = torch.randn(4, 16, 24, generator=torch.Generator().manual_seed(5))

    def f(G):
        return muon.newton_schulz(G, dtype=torch.float32, backend="torch")

    try:
        compiled = torch.compile(f, fullgraph=True)(G)
    except Exception as exc:  # no C++ compiler for inductor's CPU code here
        pytest.skip(f"inductor cannot compile on this machine: {type(exc).__name__}")
    assert torch.equal(compiled, f(G))
    torch._dynamo.reset()


def test_compiled_step_calls_the_op_once_per_bucket():
    """torch.compile(opt.step, fullgraph=True) sees muon::newton_schulz per bucket; eager's bits."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(_graph_ops(gm))
        return gm

    gen = torch.Generator().manual_seed(6)
    params = [torch.randn(s, generator=gen, requires_grad=True) for s in [(8, 12), (8, 12), (12, 20)]]
    twin = [p.detach().clone().requires_grad_(True) for p in params]
    opt, ref = muon.Muon(params, lr=0.02, backend="torch"), muon.Muon(twin, lr=0.02, backend="torch")
    compiled = torch.compile(opt.step, fullgraph=True, backend=backend)
    for _ in range(2):
        for p, q in zip(params, twin):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        compiled()
        ref.step()
        for p, q in zip(params, twin):
            assert torch.equal(p, q)
    buckets = len(ref._plan.groups[0].buckets)  # the eager twin's plan (the same groups)
    assert graphs and graphs[-1].count("muon.newton_schulz.default") == buckets, graphs[-1]
    torch._dynamo.reset()


def test_calling_the_op_imports_neither_dynamo_nor_triton():
    code = (
        "import sys, torch, muon\n"
        "muon.newton_schulz(torch.randn(4, 6))\n"
        "muon.newton_schulz(torch.randn(6, 4, requires_grad=True)).sum().backward()\n"
        "heavy = [m for m in ('torch._dynamo', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.getcwd())


# --------------------------------------------------------------------- Triton (interpreter on a CPU)
@pytest.mark.interpret
@pytest.mark.parametrize("shape", [(8, 16), (2, 16, 8)], ids=str)
def test_opcheck_triton_backend(shape):
    pytest.importorskip("triton")
    from muon.backends import unavailable_reason

    device = "cuda" if torch.cuda.is_available() else "cpu"
    G = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device)
    if unavailable_reason("triton", G) is not None:
        pytest.skip(unavailable_reason("triton", G))
    for algorithm in ("standard", "gram"):
        args = op_args(G, torch.float32, backend="triton", algorithm=algorithm, steps=2)
        torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor"))
        out = OP(*args)
        public = muon.newton_schulz(G, steps=2, dtype=torch.float32, backend="triton", algorithm=algorithm)
        assert torch.equal(out, public)


# --------------------------------------------------------------------------------- CUDA kernels
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda", "auto"])
@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (4, 64, 96)], ids=str)
def test_opcheck_cuda_kernels(backend, shape):
    from muon.backends import unavailable_reason

    G = torch.randn(shape, device="cuda")
    if unavailable_reason(backend, G) is not None:
        pytest.skip(unavailable_reason(backend, G))
    args = op_args(G, torch.bfloat16, backend=backend)
    torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    ref = muon.newton_schulz(G, dtype=torch.bfloat16, backend=backend)
    assert torch.equal(OP(*args).float(), ref)
