"""The fused low-precision momentum pass (issue 30) in `python -m bench kernels`: its bandwidth against
the memory-copy limit.

Per (B, m, n) stack of B same-shape parameters (one launch) and state dtype (int8 blockwise, bf16),
with fp32 gradients and a bf16 NS input, in the same interleaved rounds (do_bench per round):
- `muon[triton:lowp_momentum]`: the Triton kernel (kernels/lowp_momentum.py), outputs preallocated;
- `muon[torch:lowp_momentum]`: the op's torch kernel (muon.functional in torch ops), what a CPU runs;
- `copy`: one device copy of the same number of bytes (read + write), the memory-copy limit.

Rows (op `low_precision_momentum`): the median ms, `bytes` (what the fused pass reads and writes: state,
scales, gradient, next state, scales, U), `gbps` (bytes / time) and `pct_copy` (copy time / this
time, %: the fraction of the copy bandwidth reached). A CPU run adds one skipped row: the fused pass
is a GPU kernel, unmeasured here.
"""

from __future__ import annotations

import torch

from muon import functional as F

from ..common import dtype_name, shape_str
from ..schema import Results
from ..timing import interleaved

OP = "low_precision_momentum"
# (B, m, n): parameters of a 4096-wide model, one of 16384 columns, stacks of GPT-2-sized matrices
SHAPES = [(1, 4096, 4096), (1, 4096, 16384), (8, 1024, 4096), (12, 768, 3072)]
STATE_DTYPES = (torch.int8, torch.bfloat16)
FUSED, TORCH, COPY = "muon[triton:lowp_momentum]", "muon[torch:lowp_momentum]", "copy"


def pass_bytes(shape, state_dtype: torch.dtype, grad_dtype=torch.float32, u_dtype=torch.bfloat16) -> int:
    """Bytes the fused pass moves: state, scales and gradient read; state, scales and U written."""
    b, m, n = shape
    numel = b * m * n
    scales = b * m * F.quant_blocks(n) * 4 if state_dtype == torch.int8 else 0
    state = numel * torch.empty((), dtype=state_dtype).element_size()
    return 2 * (state + scales) + numel * (torch.empty((), dtype=grad_dtype).element_size()
                                           + torch.empty((), dtype=u_dtype).element_size())


def measure(device: torch.device, results: Results, rounds: int, rep_ms: float, shapes=None) -> None:
    """The rows of the momentum pass: measured on CUDA with Triton, one skipped row elsewhere."""
    if device.type != "cuda":
        results.add(OP, FUSED, "-", "int8", status="skipped: unmeasured: the fused momentum pass is a GPU kernel "
                    "(its bandwidth against the copy limit needs a CUDA device)")
        return
    try:
        from muon import kernels
    except ModuleNotFoundError as exc:
        results.add(OP, FUSED, "-", "int8", status=f"skipped: {exc}")
        return
    from muon.backends import momentum_op

    gen = torch.Generator(device=device).manual_seed(0)
    for shape in shapes or SHAPES:
        for state_dtype in STATE_DTYPES:
            x = torch.randn(shape, device=device, generator=gen)
            if state_dtype == torch.int8:  # B parameters of m rows, each quantized on its own
                q, s = F.quantize_blockwise(x.view(-1, shape[-1]))
                state, scale = q.view(shape), s.view(*shape[:2], -1)
            else:
                state, scale = x.to(state_dtype), None
            grad = torch.randn(shape, device=device, generator=gen)
            w = torch.tensor(0.05, device=device)
            u = torch.empty(shape, dtype=torch.bfloat16, device=device)
            state_out = torch.empty_like(state)
            scale_out = None if scale is None else torch.empty_like(scale)
            nbytes = pass_bytes(shape, state_dtype)
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            args = (state, scale, grad, w, 0.95, True, u, state_out, scale_out)
            calls = {FUSED: lambda args=args: kernels.lowp_momentum(*args),
                     TORCH: lambda args=args: momentum_op._torch_kernel(*args),
                     COPY: lambda src=src, dst=dst: dst.copy_(src)}
            samples = interleaved(calls, device, rounds=rounds, budget_ms=rep_ms, kernel=True)
            copy_ms = samples[COPY].stats.median
            for provider, s in samples.items():
                ms = s.stats.median
                results.add(OP, provider, shape_str(shape), dtype_name(state_dtype), stats=s.stats,
                            bytes=nbytes, gbps=nbytes / ms / 1e6, pct_copy=100 * copy_ms / ms,
                            grad_dtype="float32", u_dtype="bfloat16", timer="do_bench")
            del state, scale, grad, u, state_out, scale_out, src, dst
