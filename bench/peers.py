"""Other libraries' Newton–Schulz, as optional benchmark columns.

Each peer is a loader returning `fn(X, steps) -> result` for a (B, m, n) stack with m <= n, or
raising `PeerUnavailable` with the reason (not installed, needs a GPU, wrong dtype). A missing peer is
a skipped column, never a crash. Peers use their own coefficients and normalization: their FLOPs per
step are the same, their outputs differ slightly from muon's Keller schedule (the `coefficients`
column says which set ran).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from muon.coefficients import KELLER

PeerFn = Callable[[Tensor, int], object]


class PeerUnavailable(RuntimeError):
    pass


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeerUnavailable(f"{module} not importable ({exc})") from None


def torch_optim_muon(X: Tensor, dtype: torch.dtype) -> PeerFn:
    """torch.optim.Muon's own NS (bf16 only, one 2-D matrix per call, as its step runs it)."""
    if dtype != torch.bfloat16:
        raise PeerUnavailable("torch.optim.Muon's NS computes in bf16 only")
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz
    except ImportError as exc:
        raise PeerUnavailable(f"this torch has no torch.optim.Muon ({exc})") from None

    def run(X: Tensor, steps: int):
        return [_zeropower_via_newtonschulz(x, KELLER, steps, 1e-7) for x in X]

    return run


def dion(X: Tensor, dtype: torch.dtype) -> PeerFn:
    """microsoft/dion's Triton NS (symmetric X·Xᵀ kernel; Polar Express coefficients, 5 steps)."""
    mod = _import("dion.newton_schulz_triton")
    if X.device.type != "cuda":
        raise PeerUnavailable("dion's Triton NS needs a CUDA device")
    fn = getattr(mod, "newton_schulz_triton", None)
    if fn is None:
        raise PeerUnavailable("dion.newton_schulz_triton has no newton_schulz_triton function")
    return lambda X, steps: fn(X)


def emerging_optimizers(X: Tensor, dtype: torch.dtype) -> PeerFn:
    """NVIDIA Emerging-Optimizers' muon_utils.newton_schulz (one 2-D matrix per call)."""
    mod = _import("emerging_optimizers.orthogonalized_optimizers.muon_utils")
    fn = getattr(mod, "newton_schulz", None)
    if fn is None:
        raise PeerUnavailable("emerging_optimizers muon_utils has no newton_schulz")
    return lambda X, steps: [fn(x, steps=steps) for x in X]


def gram_newton_schulz(X: Tensor, dtype: torch.dtype) -> PeerFn:
    """Dao AI Lab's Gram Newton–Schulz (iterates on X·Xᵀ; fewer FLOPs on rectangular shapes)."""
    mod = _import("gram_newton_schulz")
    for name in ("gram_newton_schulz", "newton_schulz", "gram_ns"):
        fn = getattr(mod, name, None)
        if callable(fn):
            return lambda X, steps: fn(X)
    raise PeerUnavailable("gram_newton_schulz exposes no gram_newton_schulz/newton_schulz function")


PEERS: dict[str, tuple[Callable[[Tensor, torch.dtype], PeerFn], str]] = {
    "torch.optim.Muon": (torch_optim_muon, "keller"),
    "dion": (dion, "polar_express (dion's)"),
    "emerging-optimizers": (emerging_optimizers, "library default"),
    "gram-newton-schulz": (gram_newton_schulz, "library default"),
}


def load(name: str, X: Tensor, dtype: torch.dtype) -> PeerFn:
    """The peer's NS function for inputs like X, after one trial call (so a failure is a skip)."""
    loader, _ = PEERS[name]
    fn = loader(X, dtype)
    try:
        fn(X[:1, : min(8, X.shape[1]), : min(16, X.shape[2])].contiguous(), 1)
    except Exception as exc:  # a peer that installs but cannot run here is a skipped column
        raise PeerUnavailable(f"{name} failed a trial call: {type(exc).__name__}: {exc}") from None
    return fn
