"""The one place a group's `backend` and `ns_algorithm` ("auto" included) become an NS function.

`resolve(backend, algorithm, X, ns_dtype, steps)` decides, for a (B, s, l) stack X computed in
`ns_dtype`: the algorithm ("auto": `dispatch.choose_algorithm`, standard where the backend has no
Gram NS) and the backend's run function (`select` / `select_gram`; "auto" picks per call from the
measured table). The optimizer's plan, its reference loop and `muon.newton_schulz` all ask here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..coefficients import DEFAULT_RESTARTS, Schedule
from . import BackendUnavailable, has_gram, op, select, select_gram
from .dispatch import choose_algorithm


def resolve_algorithm(backend: str, algorithm: str, X: Tensor, ns_dtype: torch.dtype, steps: int,
                      restarts=DEFAULT_RESTARTS) -> str:
    """"standard" or "gram" for stack X: "auto" asks the dispatcher, and falls back to standard
    NS where the backend has no Gram NS."""
    if algorithm == "auto":
        algorithm = choose_algorithm(X.shape[-2], X.shape[-1], X.device, ns_dtype, steps=steps, restarts=restarts)
        if algorithm == "gram" and not has_gram(backend, X):
            algorithm = "standard"
    return algorithm


class BackendRun:
    """What the plan resolved for a stack: the backend name ("auto" decides per call from the measured
    table), the algorithm ("standard" or "gram") and Gram NS's restarts; called, it runs the one op
    `muon::newton_schulz` (muon.backends.op), whose kernel looks the backend's `run` (`run_gram`) up
    on its module at each call (instrumentation that replaces `run`, e.g. bench profile, sees it)."""

    def __init__(self, backend: str, algorithm: str = "standard", restarts=DEFAULT_RESTARTS) -> None:
        self.backend, self.algorithm = backend, algorithm
        self.restarts = tuple(restarts) if algorithm == "gram" else ()

    def __call__(self, X: Tensor, schedule: Schedule, dtype: torch.dtype) -> Tensor:
        return op.call(X, schedule, dtype, self.backend, self.algorithm, self.restarts)


def resolve(backend: str, algorithm: str, X: Tensor, ns_dtype: torch.dtype, steps: int,
            restarts=DEFAULT_RESTARTS) -> BackendRun:
    """The NS function of (backend, algorithm) for stack X; BackendUnavailable when it cannot run."""
    algorithm = resolve_algorithm(backend, algorithm, X, ns_dtype, steps, restarts)
    (select_gram if algorithm == "gram" else select)(backend, X)  # BackendUnavailable when it cannot run
    return BackendRun(backend, algorithm, restarts)


__all__ = ["DEFAULT_RESTARTS", "BackendRun", "BackendUnavailable", "resolve", "resolve_algorithm"]
