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


def _gns_callable(cls, kwargs: dict):
    """An instance of a gram_newton_schulz orthogonalizer class, called without the torch.compile
    wrapper on its __call__ (as in the H100 measurement: a compile per new shape would dominate the
    benchmark's budget and time the compiler, not the kernels)."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    obj = cls(**{k: v for k, v in kwargs.items() if k in accepted})
    call = type(obj).__call__
    raw = getattr(call, "_torchdynamo_orig_callable", None) or getattr(call, "__wrapped__", None)
    return (lambda X: raw(obj, X)) if raw is not None else obj


def _gns(X: Tensor, dtype: torch.dtype, gram: bool) -> PeerFn:
    mod = _import("gram_newton_schulz")
    if X.device.type != "cuda":
        raise PeerUnavailable("gram-newton-schulz's CuTe-DSL kernels need a CUDA device (Hopper or Blackwell)")
    if gram:
        cls = getattr(mod, "GramNewtonSchulz", None)
        kwargs = {"use_gram_newton_schulz": True}
    else:
        cls = getattr(mod, "StandardNewtonSchulz", None)
        kwargs = {}
        if cls is None:  # releases with one class and a switch
            cls, kwargs = getattr(mod, "GramNewtonSchulz", None), {"use_gram_newton_schulz": False}
    if cls is None:
        raise PeerUnavailable("gram_newton_schulz has no StandardNewtonSchulz/GramNewtonSchulz class")
    # its kernels are its point: on (they engage for a small side >= 256, torch matmuls below)
    fn = _gns_callable(cls, {"ns_use_kernels": True, **kwargs})
    # it normalizes `X.to(float32)` in place, which is the caller's tensor when that is fp32 already:
    # a copy keeps the shared benchmark input intact (≈1 % of its time at 8192², a fp32 read + write)
    return lambda X, steps: fn(X.clone() if X.dtype == torch.float32 else X)


def gram_newton_schulz_standard(X: Tensor, dtype: torch.dtype) -> PeerFn:
    """Dao AI Lab's gram-newton-schulz package, ordinary NS on quack's symmetric CuTe-DSL GEMMs
    (Polar Express coefficients, fp16, 5 steps)."""
    return _gns(X, dtype, gram=False)


def gram_newton_schulz(X: Tensor, dtype: torch.dtype) -> PeerFn:
    """Dao AI Lab's Gram Newton–Schulz (iterates on the m×m Gram matrix, one restart; fewer FLOPs on
    rectangular shapes)."""
    return _gns(X, dtype, gram=True)


# name -> (loader, coefficients it runs, whether its kernels compute one triangle of the symmetric
# products: its actual FLOPs are then muon.flops' symmetric count)
PEERS: dict[str, tuple[Callable[[Tensor, torch.dtype], PeerFn], str, bool]] = {
    "torch.optim.Muon": (torch_optim_muon, "keller", False),
    "dion": (dion, "polar_express (dion's)", True),
    "emerging-optimizers": (emerging_optimizers, "library default", False),
    "gram-newton-schulz:standard": (gram_newton_schulz_standard, "polar_express (library's)", True),
    "gram-newton-schulz:gram": (gram_newton_schulz, "polar_express (library's)", True),
}
_DISTRIBUTIONS = {"torch.optim.Muon": "torch", "dion": "dion", "emerging-optimizers": "emerging_optimizers",
                  "gram-newton-schulz:standard": "gram-newton-schulz", "gram-newton-schulz:gram": "gram-newton-schulz"}


def version(name: str) -> str:
    """The installed version of a peer's distribution (its kernel_version column)."""
    from importlib import metadata

    dist = _DISTRIBUTIONS[name]
    try:
        return f"{dist}-{metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return dist


def load(name: str, X: Tensor, dtype: torch.dtype) -> PeerFn:
    """The peer's NS function for inputs like X, after one trial call (so a failure is a skip)."""
    loader = PEERS[name][0]
    fn = loader(X, dtype)
    try:
        fn(X[:1, : min(8, X.shape[1]), : min(16, X.shape[2])].contiguous(), 1)
    except Exception as exc:  # a peer that installs but cannot run here is a skipped column
        raise PeerUnavailable(f"{name} failed a trial call: {type(exc).__name__}: {exc}") from None
    return fn
