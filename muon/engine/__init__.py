"""The fast step of `muon.Muon`: plan once (`plan`), then a few batched launches per shape bucket,
computed first and committed after (`execute`). The reference it must match bit for bit is the
per-parameter loop of tests/reference_loop.py; both take their formulas from `muon.functional`."""

from __future__ import annotations

from .plan import MUON_PLAN_KEYS, Plan, build_plan, default_chunk_bytes, local, plan_key
from .step import bucket_ns, chunked_ns, execute, finite_flags, first_nonfinite, local_ns

__all__ = [
    "MUON_PLAN_KEYS", "Plan", "bucket_ns", "build_plan", "chunked_ns", "default_chunk_bytes", "execute", "finite_flags",
    "first_nonfinite",
    "local", "local_ns", "plan_key",
]  # fmt: skip
