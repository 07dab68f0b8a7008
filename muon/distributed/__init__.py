"""Distributed Muon on torch.distributed: replicated (DDP) and FSDP2-sharded parameters.

`muon.Muon` uses this package from its step; users never call it directly except for the traffic
model (`comm_bytes_per_step`, `count_comm_bytes`) and to catch `DistributedStepError`.

* `collectives`: the collectives, their error wrapping (a failing rank becomes a
  DistributedStepError naming the collective, at the process group's timeout) and byte counting;
* `ownership`: which rank orthogonalizes which matrices (greedy balance by NS FLOPs, computed from
  the engine's plan buckets) and the plan signature ranks agree on;
* `agreement`: per step, the plan digest and the finite flags agreed over the ranks;
* `replicated`: replicated parameters run the engine's plan with the NS split over ranks and one
  all-gather per Muon group;
* `layout`: where each rank's shard of a DTensor matrix sits (1-D and n-D meshes, Shard(0)/Shard(1),
  FSDP2's strided shards over TP, Replicate), and what the plan refuses;
* `sharded`: DTensor parameters on the engine's plan over their local shards, with one packed
  owner all_to_all out and one back per Muon group;
* `gathered`: DTensors of any layout under foreach=False, on the engine's plan with every full
  matrix gathered on every rank;
* `traffic`: the bytes-per-step model against distributed AdamW;
* `state_dict_dtypes`: state-dict hooks that let distributed checkpoints carry ns_dtype.
"""

from __future__ import annotations

from .collectives import CommCounter, DistributedStepError, count_comm_bytes, is_dtensor, replicated_group
from .gathered import plan_muon_group as plan_gathered  # noqa: F401  (muon.optim)
from .gathered import prepare as prepare_gathered  # noqa: F401  (muon.optim)

# used by muon.optim and the tests
from .layout import LocalShardMismatch as LocalShardMismatch
from .ownership import _assign as _assign
from .ownership import _chunk_rows as _chunk_rows
from .ownership import ns_flops as ns_flops
from .ownership import share_buckets as share_buckets
from .replicated import agree_plan as agree_plan
from .replicated import prepare as prepare
from .replicated import replicated_ns as replicated_ns
from .sharded import as_dtensor as as_dtensor
from .sharded import check_options as check_options
from .sharded import plan_mesh as plan_mesh
from .sharded import planner_for as planner_for
from .sharded import prepare as prepare_sharded  # noqa: F401  (muon.optim)
from .sharded import refuse as refuse
from .sharded import sharded_ns as sharded_ns
from .state_dict_dtypes import decode_state_dict_dtypes, encode_state_dict_dtypes
from .traffic import CommBytes, comm_bytes_per_step

__all__ = [
    "CommBytes",
    "CommCounter",
    "DistributedStepError",
    "comm_bytes_per_step",
    "count_comm_bytes",
    "decode_state_dict_dtypes",
    "encode_state_dict_dtypes",
    "is_dtensor",
    "replicated_group",
]
