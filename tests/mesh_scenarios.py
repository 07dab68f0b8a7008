"""Four-process scenarios for tests/test_mesh.py (CPU, gloo, 2×2 meshes): FSDP2 × TP, HSDP and 1-D
FSDP2 with uneven shards on the engine's plan, against one process replaying the same gradients and
against the per-parameter loop (foreach=False), on the harness of tests/dist_harness.py."""

from __future__ import annotations

import os
import traceback

import dist_harness
import torch
import torch.distributed as dist
from dist_harness import init_gloo, write_rank
from torch import nn

LR = 0.02
STEPS = 3
WIDTH = 16


class Block(nn.Module):
    """A transformer-like block: a gated mixer (q, v column-parallel, o row-parallel) and an MLP
    (up column-parallel, down row-parallel), pre-norms; every product of column-parallel outputs is
    elementwise, so the tensor-parallel forward needs no attention kernel."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.o(torch.tanh(self.q(h)) * self.v(h))
        return x + self.down(torch.tanh(self.up(self.norm2(x))))


class Model(nn.Module):
    def __init__(self, layers: int = 2, d: int = WIDTH) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Uneven(nn.Module):
    """Rows that 4 ranks do not divide (7: 2, 2, 2, 1; 5: 2, 2, 1, 0), tall and wide, an expert stack."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 7, bias=False)
        self.c = nn.Linear(7, 5, bias=False)
        self.d = nn.Linear(5, 12, bias=False)
        self.experts = nn.Parameter(torch.randn(3, 12, 6) / 12**0.5)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))
        h = torch.einsum("bi,eio->bo", h, self.experts).tanh()
        return self.head(h)


def forward(model, x):
    return model(x)


def batch(step: int, dp_rank: int, width: int = 8, rows: int = 8):
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    return torch.randn(rows, width, generator=g), torch.randn(rows, 4, generator=g)


def tensor_parallel(model, tp_mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {}
    for i in range(len(model.blocks)):
        for name in ("q", "v", "up"):
            plan[f"blocks.{i}.{name}"] = ColwiseParallel()
        for name in ("o", "down"):
            plan[f"blocks.{i}.{name}"] = RowwiseParallel()
    parallelize_module(model, tp_mesh, plan)


def build(kind: str, layers: int = 2):
    """(model, dp coordinate, its data-parallel size) for layout `kind`, seed 0 on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    if kind == "uneven":
        model = Uneven()
        mesh = init_device_mesh("cpu", (4,))

        def columns(p):
            from torch.distributed.tensor import Shard

            return Shard(1) if p.shape == (7, 12) else None  # one row-parallel-like column sharding

        for module in (model.a, model.b, model.c, model.d, model.head):
            fully_shard(module, mesh=mesh, shard_placement_fn=columns)
        fully_shard(model, mesh=mesh)
        return model, dist.get_rank(), 4
    model = Model(layers)
    if kind == "tp_fsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        tensor_parallel(model, mesh["tp"])
        dp = mesh["dp"]
    else:  # hsdp
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        dp = mesh
    for block in model.blocks:
        fully_shard(block, mesh=dp)
    fully_shard(model, mesh=dp)
    c = mesh.get_coordinate()
    return (model, c[0], 2) if kind == "tp_fsdp" else (model, 2 * c[0] + c[1], 4)  # TP ranks share the batch


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def optimizer(model, **kw):
    from muon import Muon, param_groups

    return Muon(param_groups(model), lr=LR, weight_decay=0.1, **kw)


def replica(model, opt, solo):
    """A one-process copy: plain parameters with the full values, the same groups, process group `solo`."""
    from muon import Muon

    names = {id(p): n for n, p in model.named_parameters()}
    plain = {n: nn.Parameter(full(p).clone()) for n, p in model.named_parameters()}
    groups = []
    for group in opt.param_groups:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = [plain[names[id(p)]] for p in group["params"]]
        groups.append(g)
    return plain, Muon(groups, process_group=solo)


# measured: replaying the gathered gradients gives the same bits (tall matrices are orthogonalized as
# their transposes on the owner, as one process stacks them); the test asks for the bits
RTOL = 0.0


def scenario_matches_replay_and_loop(kind):
    def run():
        from muon.distributed import count_comm_bytes

        solo = _SOLO[dist.get_rank()]
        model, dp_rank, _ = build(kind)
        opt = optimizer(model)
        loop_model, _, _ = build(kind)
        loop_opt = optimizer(loop_model, foreach=False)
        plain, ref = replica(model, opt, solo)
        worst = 0.0
        for step in range(STEPS):
            x, y = batch(step, dp_rank)
            for m in (model, loop_model):
                nn.functional.mse_loss(forward(m, x), y).backward()
            grads = {n: full(p.grad) for n, p in model.named_parameters()}
            for n, p in plain.items():
                p.grad = grads[n].clone()
            ref.step()
            with count_comm_bytes() as comm:
                opt.step()
            if step:  # the model of the bytes (the first step's are the same; counted on one step)
                predicted = modelled_bytes(model, opt)
                assert comm.bytes == predicted, f"{kind}: counted {comm.bytes} bytes, modelled {predicted}"
                _RESULTS.setdefault("bytes", {})[kind] = comm.bytes
            loop_opt.step()
            for m in (model, loop_model):
                m.zero_grad()
            for n, p in model.named_parameters():
                a, b = full(p), plain[n].detach()
                if not torch.equal(a, b):
                    err = ((a - b).norm() / (b.norm() + 1e-30)).item()
                    worst = max(worst, err)
                    _RESULTS.setdefault("replay_differs", {}).setdefault(kind, set()).add(n)
                    assert err <= RTOL, f"{kind}: {n} differs from the one-process replay by {err:.2e}"
        assert opt._plan is not None and opt._plan.dist is not None and opt._plan.dist.sharded, "not on the plan"
        for (n, p), q in zip(model.named_parameters(), loop_model.parameters(), strict=True):
            assert torch.equal(full(p), full(q)), f"{kind}: {n}: the plan and the loop differ"
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if key in loop_opt.state[q]:
                    assert torch.equal(full(opt.state[p][key]), full(loop_opt.state[q][key])), f"{n}: {key}"
        _RESULTS.setdefault("replay_worst", {})[kind] = worst

    return run


def plan_placements(p, mesh_shape):
    """p's placements on the plan mesh (a parameter on a named sub-mesh: Replicate() elsewhere)."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(p, DTensor):
        return None
    if p.device_mesh.ndim == len(mesh_shape):
        return tuple(p.placements)
    root = p.device_mesh._get_root_mesh()
    out = [Replicate()] * len(mesh_shape)
    for name, placement in zip(p.device_mesh.mesh_dim_names, p.placements, strict=True):
        out[root.mesh_dim_names.index(name)] = placement
    return tuple(out)


def modelled_bytes(model, opt) -> int:
    """This rank's bytes per step as `comm_bytes_per_step(sharding="mesh")` models them."""
    from muon.distributed import comm_bytes_per_step

    dtensors = [p for p in model.parameters() if hasattr(p, "device_mesh")]
    mesh_shape = tuple(max((p.device_mesh for p in dtensors), key=lambda m: m.ndim).mesh.shape)
    (group,) = [g for g in opt.param_groups if g["use_muon"]]
    shapes = [tuple(p.shape) for p in group["params"]]
    placements = [plan_placements(p, mesh_shape) for p in group["params"]]
    predicted = comm_bytes_per_step(shapes, world_size=dist.get_world_size(), sharding="mesh",
                                    mesh_shape=mesh_shape, placements=placements, ns_dtype=torch.float32)  # fmt: skip
    return predicted.muon_optimizer_per_rank[dist.get_rank()]


def _ns_share(opt):
    """NS FLOPs this rank orthogonalizes per step, from the plan."""
    from muon.distributed.ownership import ns_flops

    plan, rank = opt._plan, opt._plan.dist.rank
    mine, costs = 0, []
    for g in plan.groups:
        for b in g.buckets if g.use_muon else ():
            x = b.exchange
            if x is None:
                B, m, n = b.shape
                mine += B * ns_flops(m, n, 5)
            else:
                mine += x.sent[rank] * ns_flops(x.m, x.n, 5)
                costs += [ns_flops(x.m, x.n, 5)] * sum(x.sent)
    return mine, costs


def scenario_split_and_constant(kind):
    """NS work split (each rank within one matrix of the even share); collectives per step equal at 8
    and 32 layers; dispatched ops flat in depth."""

    def run():
        from muon.distributed import count_comm_bytes
        from muon.profiling import count_dispatched_ops

        figures = {}
        for layers in (8, 32):
            model, dp_rank, _ = build(kind, layers)
            opt = optimizer(model)
            for step in range(2):
                x, y = batch(step, dp_rank)
                nn.functional.mse_loss(forward(model, x), y).backward()
                if step == 0:
                    opt.step()
                else:
                    with count_comm_bytes() as comm, count_dispatched_ops() as ops:
                        opt.step()
                model.zero_grad()
            mine, costs = _ns_share(opt)
            shares = [None] * dist.get_world_size()
            dist.all_gather_object(shares, mine)
            assert sum(shares) >= sum(costs)
            assert max(shares) <= sum(shares) / len(shares) + max(costs), (shares, max(costs))
            figures[layers] = {"collectives": comm.collectives, "bytes": comm.bytes, "ops": ops.total,
                               "shares": shares}  # fmt: skip
        # the agreement word, one packed gather and one packed scatter, whatever the depth
        assert figures[8]["collectives"] == figures[32]["collectives"] == 3, figures
        assert figures[32]["ops"] < 1.15 * figures[8]["ops"], figures
        _RESULTS.setdefault("figures", {})[kind] = figures

    return run


def uneven_rows(t, mesh):
    """t as a [Shard(0)] DTensor on a (4,) mesh whose ranks hold 3, 1, 2 and 2 of its 8 rows, where
    torch.chunk gives 2 each: ranks 0 and 1 disagree with their placements."""
    from torch.distributed.tensor import DTensor, Shard

    rank = dist.get_rank()
    rows, start = [3, 1, 2, 2][rank], [0, 3, 4, 6][rank]
    return DTensor.from_local(t[start : start + rows].clone(), mesh, [Shard(0)], shape=t.shape, stride=t.stride())


def assert_refused_on_every_rank(step, refusing: bool, where: str, what: str) -> None:
    """step() raises a DistributedStepError on every rank: naming `where`'s shard where this rank
    refused the plan, saying another rank did elsewhere."""
    from muon.distributed import DistributedStepError

    try:
        step()
    except DistributedStepError as exc:
        expected = f"{where}: this rank's parameter shard has shape" if refusing else "another rank refused the plan"
        assert expected in str(exc), str(exc)
    else:
        raise AssertionError(what)


def scenario_fail_closed():
    """Layouts the plan does not take are errors naming the parameter, on every rank, with nothing
    changed — never a silent per-parameter loop: shards of other sizes than the placements say (known
    on two ranks only, agreed before anyone raises), a Partial gradient; NorMuon at construction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    from muon import Muon

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (4,))
    torch.manual_seed(0)
    full_w = torch.randn(8, 6)
    W = nn.Parameter(uneven_rows(full_w, mesh))
    W.grad = uneven_rows(torch.randn(8, 6, generator=torch.Generator().manual_seed(1)), mesh)
    ok = nn.Parameter(DTensor.from_local(full_w.chunk(4)[rank].clone(), mesh, [Shard(0)], shape=full_w.shape,
                                         stride=full_w.stride()))  # fmt: skip
    ok.grad = DTensor.from_local(torch.ones(2, 6), mesh, [Shard(0)], shape=full_w.shape, stride=full_w.stride())
    opt = Muon([ok, W])
    before = W.to_local().clone(), ok.to_local().clone()
    assert_refused_on_every_rank(opt.step, rank in (0, 1), "param_groups[0]['params'][1]",
                                 "custom shard sizes were stepped")  # fmt: skip
    assert torch.equal(W.to_local(), before[0]) and torch.equal(ok.to_local(), before[1]) and not opt.state

    P = nn.Parameter(DTensor.from_local(torch.randn(8, 6), mesh, [Shard(1)], shape=(8, 24), stride=(24, 1)))
    P.grad = DTensor.from_local(torch.randn(8, 24), mesh, [Partial()])
    try:
        Muon([P]).step()
    except ValueError as exc:
        assert "param_groups[0]['params'][0]" in str(exc) and "its gradient is laid out as" in str(exc), str(exc)
    else:
        raise AssertionError("a Partial gradient was stepped")
    try:
        Muon([ok], variant="normuon")
    except ValueError as exc:  # at construction
        assert "param_groups[0]['params'][0] is a DTensor" in str(exc), str(exc)
    else:
        raise AssertionError("NorMuon on DTensors took a silent route")


def scenario_gathered_layouts():
    """Layouts the owner plan refuses step under foreach=False, every full matrix gathered on every
    rank (`muon.distributed.gathered`), bit for bit what one process computes on the same gradients:
    two meshes in one optimizer (1-D and 2×2), a weight sharded on its columns, a conv weight sharded
    inside its flattened columns, an expert stack sharded on both matrix dims, a tall matrix on an
    HSDP-like layout, an AdamW bias with an empty shard; a NaN in one rank's gradient shard skips that
    parameter on every rank. The default (foreach=None) refuses the two meshes and names foreach=False;
    shards of other sizes than their placements give are refused on every rank with nothing changed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from muon import Muon

    rank = dist.get_rank()
    line, square = init_device_mesh("cpu", (4,)), init_device_mesh("cpu", (2, 2))
    gen = torch.Generator().manual_seed(0)
    shapes = {"w": (12, 8), "conv": (6, 3, 4, 2), "experts": (3, 8, 6), "tall": (16, 6), "bias": (6,)}
    layouts = {"w": (line, [Shard(1)]), "conv": (line, [Shard(2)]), "experts": (square, [Shard(1), Shard(2)]),
               "tall": (square, [Shard(0), Replicate()]), "bias": (line, [Shard(0)])}  # fmt: skip
    values = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}

    def groups(ps):
        return [{"params": [ps["w"], ps["experts"], ps["tall"]]}, {"params": [ps["conv"]], "flatten": True},
                {"params": [ps["bias"]], "use_muon": False}]  # fmt: skip

    sharded = {k: nn.Parameter(distribute_tensor(v.clone(), *layouts[k])) for k, v in values.items()}
    plain = {k: nn.Parameter(v.clone()) for k, v in values.items()}
    opt = Muon(groups(sharded), lr=LR, weight_decay=0.1, foreach=False)
    ref = Muon(groups(plain), lr=LR, weight_decay=0.1, process_group=_SOLO[rank])
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        grads = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        for k, G in grads.items():
            sharded[k].grad = distribute_tensor(G, *layouts[k])
            plain[k].grad = G.clone()
        if step == 1:
            if rank == 2:  # rank 2 holds columns 4:6 of w
                sharded["w"].grad.to_local()[0, 0] = float("nan")
            plain["w"].grad[0, 4] = float("nan")
        if step == 0:  # the owner plan does not take two meshes, and says what does
            try:
                Muon(groups(sharded), lr=LR).step()
            except ValueError as exc:
                assert "foreach=False" in str(exc), str(exc)
            else:
                raise AssertionError("the owner plan took two meshes")
        opt.step()
        ref.step()
        for k in shapes:
            assert torch.equal(full(sharded[k]), plain[k].detach()), f"{k}: gathered differs from one process"
            for key, v in ref.state[plain[k]].items():
                assert torch.equal(full(opt.state[sharded[k]][key]), v), f"{k}: state {key} differs"
    assert opt._plan is not None and opt._plan.dist.agree is not None, "not on the gathered plan"
    assert int(opt.state[sharded["w"]]["nonfinite_skips"]) == 1

    full_w = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    W = nn.Parameter(uneven_rows(full_w, line))
    W.grad = uneven_rows(torch.ones(8, 6), line)
    before = W.to_local().clone()
    gathered = Muon([W], foreach=False)
    assert_refused_on_every_rank(gathered.step, rank in (0, 1), "param_groups[0]['params'][0]",
                                 "custom shard sizes were gathered")  # fmt: skip
    assert torch.equal(W.to_local(), before) and not gathered.state

    # on the 2×2 mesh: rank 0 alone holds 5 rows where [Shard(0), Replicate()] gives 4; every rank
    # raises at once (the word is reduced over both mesh dims before anyone judges it), none waits
    start, rows = (0 if square.get_coordinate()[0] == 0 else 4), (5 if rank == 0 else 4)
    V = nn.Parameter(DTensor.from_local(full_w[start : start + rows].clone(), square, [Shard(0), Replicate()],
                                        shape=full_w.shape, stride=full_w.stride(), run_check=False))  # fmt: skip
    V.grad = DTensor.from_local(torch.ones(rows, 6), square, [Shard(0), Replicate()], shape=full_w.shape,
                                stride=full_w.stride(), run_check=False)  # fmt: skip
    assert_refused_on_every_rank(Muon([V], foreach=False).step, rank == 0, "param_groups[0]['params'][0]",
                                 "a 2×2 custom shard was gathered")  # fmt: skip

    # a plain tensor's NaN on one rank only, nonfinite="raise": every rank raises, nothing changes
    plain_w = nn.Parameter(torch.randn(4, 6, generator=torch.Generator().manual_seed(4)))
    plain_w.grad = torch.full((4, 6), float("nan") if rank == 3 else 1.0)
    Q = nn.Parameter(distribute_tensor(full_w.clone(), line, [Shard(0)]))
    Q.grad = distribute_tensor(torch.ones(8, 6), line, [Shard(0)])
    before = plain_w.detach().clone(), Q.to_local().clone()
    raising = Muon([Q, plain_w], foreach=False, nonfinite="raise")
    try:
        raising.step()
    except RuntimeError as exc:
        assert "non-finite gradient in param_groups[0]['params'][1]" in str(exc), str(exc)
    else:
        raise AssertionError("a NaN on rank 3 was stepped")
    assert torch.equal(plain_w.detach(), before[0]) and torch.equal(Q.to_local(), before[1]) and not raising.state


def train(model, opt, dp_rank, steps, start=0):
    for step in range(start, start + steps):
        x, y = batch(step, dp_rank)
        nn.functional.mse_loss(forward(model, x), y).backward()
        opt.step()
        opt.zero_grad()


def full_state(model, opt) -> dict:
    """Every parameter's and state entry's full value, by parameter name (collective on DTensors)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = full(p).clone()
        for key, value in sorted(opt.state[p].items()):
            out[f"{name}/{key}"] = full(value).clone() if isinstance(value, torch.Tensor) else value
    return out


def save_checkpoint(outdir: str) -> None:
    """FSDP2 × TP on 2×2: two steps, then a DCP checkpoint and (rank 0) every full value, for the loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, dp_rank, _ = build("tp_fsdp")
    opt = optimizer(model)
    train(model, opt, dp_rank, 2)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    # per-parameter form: one entry per parameter name, momentum a DTensor of the parameter's shape
    weight = "blocks.0.up.weight"
    assert tuple(sd["optim"]["state"][weight]["momentum_buffer"].shape) == (2 * WIDTH, WIDTH)
    dcp.save(sd, checkpoint_id=os.path.join(outdir, "dcp_2x2"))
    values = full_state(model, opt)
    if dist.get_rank() == 0:
        torch.save(values, os.path.join(outdir, "dcp_2x2_values.pt"))
    dist.barrier()


def load_checkpoint(model, opt, outdir: str, dp_rank: int) -> None:
    """Load the 2×2 checkpoint into `model`/`opt` (any layout), check every value bit for bit, step once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=os.path.join(outdir, "dcp_2x2"))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    expected = torch.load(os.path.join(outdir, "dcp_2x2_values.pt"), weights_only=False)
    for key, value in full_state(model, opt).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value.reshape(expected[key].shape), expected[key]), f"{key} differs after the load"
    train(model, opt, dp_rank, 1, start=2)
    assert opt._plan is not None


def scenario_checkpoint_across_layouts():
    """DCP saved on a 2×2 FSDP2 × TP mesh loads on 4×1 (1-D FSDP2 over 4 ranks) bit for bit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    save_checkpoint(_OUTDIR[0])
    torch.manual_seed(1)  # other values: everything must come from the checkpoint
    model = Model(2)
    mesh = init_device_mesh("cpu", (4,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    load_checkpoint(model, optimizer(model), _OUTDIR[0], dist.get_rank())


def load_on_tp2(rank: int, world: int, port: int, outdir: str) -> None:
    """A second job: the 2×2 checkpoint on a 1×2 mesh (tensor parallel over 2 ranks, no FSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    init_gloo(rank, world, port, timeout_s=60)
    try:
        torch.manual_seed(1)
        model = Model(2)
        tensor_parallel(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
        load_checkpoint(model, optimizer(model), outdir, 0)
        message = "ok"
    except Exception:
        message = traceback.format_exc()
    write_rank(outdir, rank, {"message": message}, prefix="tp2_")
    dist.destroy_process_group()


def load_in_one_process(outdir: str) -> None:
    """The 2×2 checkpoint in one process without torch.distributed: plain tensors, bit for bit."""
    torch.manual_seed(1)
    model = Model(2)
    load_checkpoint(model, optimizer(model), outdir, 0)


SCENARIOS = {
    "checkpoint_2x2_loads_on_4x1": scenario_checkpoint_across_layouts,
    "fail_closed_on_every_rank": scenario_fail_closed,
    "gathered_layouts_match_one_process": scenario_gathered_layouts,
    "tp_fsdp_matches_replay_and_loop": scenario_matches_replay_and_loop("tp_fsdp"),
    "hsdp_matches_replay_and_loop": scenario_matches_replay_and_loop("hsdp"),
    "uneven_fsdp_matches_replay_and_loop": scenario_matches_replay_and_loop("uneven"),
    "tp_fsdp_split_constant_in_depth": scenario_split_and_constant("tp_fsdp"),
    "hsdp_split_constant_in_depth": scenario_split_and_constant("hsdp"),
}
_SOLO: list = []
_OUTDIR: list = []
_RESULTS: dict = {}


def run_scenarios(rank: int, world: int, port: int, outdir: str, names: list[str]) -> None:
    def setup() -> None:
        _SOLO.extend(dist.new_group([r]) for r in range(world))
        _OUTDIR.append(outdir)

    def figures() -> dict:
        return {"figures": {k: {a: sorted(b) if isinstance(b, set) else b for a, b in v.items()}
                            for k, v in _RESULTS.items()}}  # fmt: skip

    dist_harness.run_scenarios(SCENARIOS, rank, world, port, outdir, names, timeout_s=60, setup=setup, extra=figures)
