"""Fused Triton kernels for Newton–Schulz (installed as `muon.kernels`; needs Triton).

`import muon` never imports this package; muon.backends.triton_backend imports it on first use.

Stages (each batched over a leading dim, any strides, runtime scalars; usable alone, e.g. by benchmarks):
    normalize(X, fro_scale, eps, dtype)   scale-safe X / (fro_scale·‖X‖_F + eps), in `dtype`
    gram(X)                               A = X·Xᵀ, one triangle of tiles, mirrored store
    sym_poly(A, b, c)                     B = b·A + c·A·A for symmetric A, one triangle, b·A in the epilogue
    poly_apply(B, X, a)                   X' = a·X + B·X, a·X in the epilogue
Whole NS:
    ns_gemm(G, coefficients, fro_scale, eps, dtype)    normalize + 3 launches per step
    ns_small(G, coefficients, fro_scale, eps, dtype)   every step of a matrix with m <= 128 in one
                                                       program, the whole batch in one launch
    ns_persistent(G, coefficients, fro_scale, eps, dtype, tma=None)
                                                       v2: persistent TMA GEMM stages, normalization
                                                       folded into step 1 (kernels/persistent.py)
Optimizer state:
    lowp_momentum(state, scale, grad, weight, momentum, nesterov, u_out, state_out, scale_out)
                                                       Muon's momentum over an int8 blockwise / bf16
                                                       state in one pass (kernels/lowp_momentum.py)
"""

if __name__ != "muon.kernels":
    # Reached as a top-level `kernels` only when the repository root comes first on sys.path; an
    # installed distribution named `kernels` (Hugging Face's) must win, and this folder is muon's.
    raise ModuleNotFoundError(
        f"{__file__} is muon's Triton kernels, imported as `muon.kernels`, not as `{__name__}`: the repository "
        "root came before the installed packages on sys.path (docs/contributing.md, 'kernels/ and sys.path')",
        name=__name__,
    )

try:
    import triton  # noqa: F401
except ModuleNotFoundError as _exc:
    if _exc.name != "triton":
        raise
    # name="triton" keeps `except ModuleNotFoundError` handlers that check exc.name working.
    raise ModuleNotFoundError(
        "muon.kernels needs Triton, which is not installed: pip install 'fused-muon[triton]' (or pip install triton). "
        "Without it, muon.newton_schulz and muon.Muon use the torch backend.",
        name="triton",
    ) from None

from ._common import INTERPRETED
from .lowp_momentum import lowp_momentum
from .normalize import normalize
from .ns_gemm import ns_gemm
from .ns_small import MAX_SMALL_SIDE, max_small_side, ns_small
from .persistent import ns_persistent
from .poly_apply import poly_apply
from .syrk import gram, sym_poly

__all__ = [
    "INTERPRETED",
    "MAX_SMALL_SIDE",
    "gram",
    "lowp_momentum",
    "max_small_side",
    "normalize",
    "ns_gemm",
    "ns_persistent",
    "ns_small",
    "poly_apply",
    "sym_poly",
]
