"""Time muon.Muon's distributed step on GPUs with NCCL, per layout (unmeasured so far: no multi-GPU
machine has run it). Run with torchrun, one process per GPU:

    torchrun --standalone --nproc_per_node=4 bench/optimizer/dist_step_time.py --layout fsdp_tp --layers 32

Layouts: ddp (replicated), fsdp (FSDP2 over all ranks), fsdp_tp (FSDP2 × TP, mesh (W/2, 2): column-
and row-parallel linears), hsdp (Replicate × Shard, mesh (2, W/2)). Per layout it prints one JSON row
(rank 0): the median step time over --steps timed steps after --warmup (CUDA events, the step alone,
gradients fixed), the counted collectives and bytes of the step on every rank, the traffic model's
bytes for the same parameters (`muon.distributed.comm_bytes_per_step`), the dispatched ops of one
step, and the GPU/torch versions. --out appends the row to a JSON-lines file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.o(torch.tanh(self.q(h)) * self.v(h))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class Model(nn.Module):
    def __init__(self, layers: int, d: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(layout: str, layers: int, d: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = Model(layers, d).cuda()
    if layout == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if layout == "fsdp_tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cuda", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        plan = {}
        for i in range(layers):
            plan.update({f"blocks.{i}.{n}": ColwiseParallel() for n in ("q", "v", "up")})
            plan.update({f"blocks.{i}.{n}": RowwiseParallel() for n in ("o", "down")})
        parallelize_module(model, mesh["tp"], plan)
        dp = mesh["dp"]
    elif layout == "hsdp":
        dp = init_device_mesh("cuda", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        dp = init_device_mesh("cuda", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=dp)
    fully_shard(model, mesh=dp)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=("ddp", "fsdp", "fsdp_tp", "hsdp"), default="fsdp")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from muon import Muon, param_groups
    from muon.distributed import comm_bytes_per_step, count_comm_bytes
    from muon.profiling import count_dispatched_ops

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch.manual_seed(0)
    model = build(args.layout, args.layers, args.width, world)
    groups = param_groups(model)
    opt = Muon(groups, lr=0.02)
    x = torch.randn(8, args.width, device="cuda")
    model(x).square().mean().backward()  # gradients kept fixed: the step alone is timed
    for _ in range(args.warmup):
        opt.step()
    with count_comm_bytes() as comm, count_dispatched_ops() as ops:
        opt.step()
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    per_rank = [None] * world
    dist.all_gather_object(per_rank, (comm.collectives, comm.bytes))
    muon = [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    if args.layout == "ddp":
        model_bytes = comm_bytes_per_step([tuple(p.shape) for p in muon], world_size=world)
    elif args.layout == "fsdp":
        model_bytes = comm_bytes_per_step([tuple(p.shape) for p in muon], world_size=world, sharding="fsdp")
    else:
        mesh = max((p.device_mesh for p in muon), key=lambda m: m.ndim)
        placements = []
        for p in muon:
            if p.device_mesh.ndim == mesh.ndim:
                placements.append(tuple(p.placements))
            else:
                from torch.distributed.tensor import Replicate

                full = [Replicate()] * mesh.ndim
                for name, pl in zip(p.device_mesh.mesh_dim_names, p.placements, strict=True):
                    full[mesh.mesh_dim_names.index(name)] = pl
                placements.append(tuple(full))
        model_bytes = comm_bytes_per_step([tuple(p.shape) for p in muon], world_size=world, sharding="mesh",
                                          mesh_shape=tuple(mesh.mesh.shape), placements=placements)  # fmt: skip
    if rank == 0:
        row = {
            "layout": args.layout, "world": world, "layers": args.layers, "width": args.width,
            "step_ms_median": statistics.median(times), "step_ms_min": min(times),
            "collectives_per_rank": [c for c, _ in per_rank], "bytes_per_rank": [b for _, b in per_rank],
            "modelled_bytes_per_rank": list(model_bytes.muon_optimizer_per_rank), "dispatched_ops": ops.total,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        }  # fmt: skip
        print(json.dumps(row))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
