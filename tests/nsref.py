"""Shared test references: float64 Newton–Schulz, torch's own low-precision error, tolerances.

The tolerance rule for every NS backend: its relative Frobenius error against the float64 reference
may be at most NS_ERROR_FACTOR[dtype] × the error of torch's own implementation at the same
precision on the same input (torch.optim.Muon's NS for bf16; the same three-GEMM loop in
fp16/fp32), plus a floor for cases where torch happens to be nearly exact.
"""

from __future__ import annotations

import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from muon.coefficients import resolve_schedule
from muon.newton_schulz import orthogonalize

# Measured over 20 seeds (shapes 1×7 to 3×17×40): the torch backend sits at 0.4–1.5× torch's own
# error in bf16/fp16 and 0.2–1.3× in fp32 on matrices; a factor 2 leaves room for a kernel's other
# summation order and still fails on any wrong step (a wrong coefficient or tile gives errors of O(1)).
NS_ERROR_FACTOR = {torch.bfloat16: 2.0, torch.float16: 2.0, torch.float32: 2.0}
# Floors in units of the dtype's machine epsilon: on a 1×n vector five steps round only a handful of
# numbers, so torch's own error there is luck (its ratio to ours reached 2.2× in fp16, 5.6× in fp32).
NS_ERROR_FLOOR = {
    torch.bfloat16: 0.5 * torch.finfo(torch.bfloat16).eps,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
    torch.float32: 8 * torch.finfo(torch.float32).eps,
}


def ns_float64(G: torch.Tensor, coefficients="keller", steps=5, eps=1e-7, precondition=None) -> torch.Tensor:
    schedule = resolve_schedule(coefficients, steps, eps, precondition=precondition)
    return orthogonalize(G.double(), schedule, dtype=torch.float64, backend="torch")


def torch_ns(G: torch.Tensor, coefficients="keller", steps=5, eps=1e-7, dtype=torch.bfloat16,
             precondition=None) -> torch.Tensor:
    """torch's own NS at `dtype`: torch.optim.Muon's function for bf16 and a single (a, b, c);
    otherwise the same plain loop (normalize in `dtype`, three GEMMs) for each matrix. With
    precondition="aol" the plain loop rescales as Turbo-Muon's torch code does (thib-s/flash-newton-schulz):
    d = rsqrt(max(Σ_j |A_ij|, eps)) from the first A, X = d·X, A = d·A·d, all in `dtype`."""
    schedule = resolve_schedule(coefficients, steps, eps, precondition=precondition)
    aol = schedule.precondition == "aol"
    single = len(set(schedule.coefficients)) <= 1 and schedule.fro_scale == 1.0
    out = []
    for M in G.reshape(-1, *G.shape[-2:]):
        if dtype == torch.bfloat16 and single and schedule.steps > 0 and not aol:
            out.append(_zeropower_via_newtonschulz(M, schedule.coefficients[0], schedule.steps, eps).double())
            continue
        X = M.to(dtype)
        if M.shape[0] > M.shape[1]:
            X = X.T
        X = X / (X.norm() * schedule.fro_scale + schedule.eps)
        for i, (a, b, c) in enumerate(schedule.coefficients):
            A = X @ X.T
            if aol and i == 0:
                d = torch.rsqrt(A.abs().sum(dim=-1).clamp_min(schedule.eps)) / schedule.fro_scale
                X, A = X * d[:, None], A * d[:, None] * d[None, :]
            X = a * X + (b * A + c * A @ A) @ X
        out.append((X.T if M.shape[0] > M.shape[1] else X).double())
    return torch.stack(out).reshape(G.shape)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_ns_close(out, G, dtype, coefficients="keller", steps=5, eps=1e-7, factor=None, precondition=None):
    """out (a backend's NS of G at `dtype`) is within the tolerance rule of the float64 reference
    (with `precondition`, the float64 reference and torch's plain loop both precondition alike)."""
    ref = ns_float64(G, coefficients, steps, eps, precondition)
    ours = rel_err(out, ref)
    theirs = rel_err(torch_ns(G, coefficients, steps, eps, dtype, precondition), ref)
    k = NS_ERROR_FACTOR[dtype] if factor is None else factor
    bound = k * theirs + NS_ERROR_FLOOR[dtype]
    assert ours <= bound, (f"NS error {ours:.3e} > {k} × torch's {theirs:.3e} + floor ({dtype}, {tuple(G.shape)}, "
                           f"precondition {precondition})")
    return ours, theirs
