"""Backend registration for the pure-PyTorch reference (always available)."""

from __future__ import annotations

from torch import Tensor

from .torch_ref import newton_schulz_torch as run  # noqa: F401


def unavailable_reason(X: Tensor) -> str | None:
    return None
