"""The one place a group's `backend` and `ns_algorithm` ("auto" included) become an NS function.

`resolve(backend, algorithm, X, ns_dtype, steps)` decides, for a (B, s, l) stack X computed in
`ns_dtype`: the algorithm ("auto": `dispatch.choose_algorithm`, standard where the backend has no
Gram NS) and the backend's run function (`select` / `select_gram`; "auto" picks per call from the
measured table). The optimizer's plan, its reference loop and `muon.newton_schulz` all ask here.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from ..coefficients import DEFAULT_RESTARTS, Schedule
from . import _MODULES, BACKENDS, BackendUnavailable, has_gram, select, select_gram
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
    """The backend `select` (or `select_gram` for Gram NS) chose, called through its module's `run`
    (`run_gram`) attribute at each step, as the dispatcher does (instrumentation that replaces
    `run`, e.g. bench profile, sees it)."""

    def __init__(self, fn, algorithm: str = "standard", restarts=DEFAULT_RESTARTS) -> None:
        self.fn, self.module, self.algorithm = fn, None, algorithm
        self.attr = "run_gram" if algorithm == "gram" else "run"
        self.extra = (tuple(restarts),) if algorithm == "gram" else ()
        for name in BACKENDS:
            module = sys.modules.get(_MODULES[name])
            if module is not None and getattr(module, self.attr, None) is fn:
                self.module = module

    def __call__(self, X: Tensor, schedule: Schedule, dtype: torch.dtype) -> Tensor:
        run = self.fn if self.module is None else getattr(self.module, self.attr)
        return run(X, schedule, dtype, *self.extra)


def resolve(backend: str, algorithm: str, X: Tensor, ns_dtype: torch.dtype, steps: int,
            restarts=DEFAULT_RESTARTS) -> BackendRun:
    """The NS function of (backend, algorithm) for stack X; BackendUnavailable when it cannot run."""
    algorithm = resolve_algorithm(backend, algorithm, X, ns_dtype, steps, restarts)
    if algorithm == "gram":
        return BackendRun(select_gram(backend, X), algorithm, restarts)
    return BackendRun(select(backend, X), algorithm)


__all__ = ["DEFAULT_RESTARTS", "BackendRun", "BackendUnavailable", "resolve", "resolve_algorithm"]
