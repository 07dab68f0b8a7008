"""Where each rank's shard of a DTensor matrix sits in the full matrix, from shapes and placements alone.

The sharded plan (`muon.distributed.sharded`) runs over one *plan mesh* (the DTensor parameters'
mesh of most dims; 1-D meshes, FSDP2 × TP (dp, tp), HSDP (replicate, shard)) and one process group
holding all its ranks (the mesh flattened). Parameters on a named sub-mesh of it (FSDP2's 1-D dp
mesh for norms next to (dp, tp) TP weights) are seen on the plan mesh with Replicate() on the other
dims. Placements Shard(d), _StridedShard(d) (FSDP2 over TP) and Replicate() are understood; each
rank's local shard of a matrix must then be one rectangular block (rows r0:r0+nr, columns c0:c0+nc)
of the full m×n matrix, and the distinct blocks tile it. `matrix_layout` returns, per rank of the
group, its block ("blocks"), or for a stack of matrices whose matrix dims are not sharded (expert
stacks sharded on the expert dim) the whole matrices each rank holds ("local"); anything else
(Partial, a conv weight sharded inside its flattened columns, a 3-D stack sharded on a matrix dim,
a local shard that is not what the placements say) is a ValueError naming the parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .collectives import dist, is_dtensor

Block = tuple[int, int, int, int]  # (r0, nr, c0, nc); (0, 0, 0, 0) for an empty shard

_GROUPS: dict = {}  # plan mesh -> its flattened process group (made once: new groups are collective)


@dataclass(frozen=True)
class MeshView:
    """The plan mesh, its flattened process group, and every group rank's mesh coordinate."""

    mesh: object
    pg: object
    world: int
    rank: int
    coords: tuple[tuple[int, ...], ...]  # per group rank, its coordinate in the plan mesh


def flat_group(mesh):
    """A process group of all of the mesh's ranks (the mesh itself for 1-D, the world when the mesh
    covers it in order, else the mesh flattened)."""
    if mesh.ndim == 1:
        return mesh.get_group()
    group = _GROUPS.get(mesh)
    if group is None:
        ranks = mesh.mesh.reshape(-1).tolist()
        if ranks == list(range(dist.get_world_size())):
            group = dist.group.WORLD
        else:
            group = mesh._flatten().get_group()  # the ranks of this slice of a larger mesh (pipeline stages)
        _GROUPS[mesh] = group
    return group


def mesh_view(mesh) -> MeshView:
    pg = flat_group(mesh)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    ranks = mesh.mesh.reshape(-1).tolist()
    shape = tuple(mesh.mesh.shape)
    coords = []
    for g in range(world):
        glob = g if pg is dist.group.WORLD else dist.get_global_rank(pg, g)
        pos, coord = ranks.index(glob), []
        for size in reversed(shape):
            coord.append(pos % size)
            pos //= size
        coords.append(tuple(reversed(coord)))
    return MeshView(mesh, pg, world, rank, tuple(coords))


def mesh_dims(t, view: MeshView, where: str) -> tuple[int, ...]:
    """The plan-mesh dim of each of t's mesh dims (t on the plan mesh or on a named sub-mesh of it)."""
    mesh = t.device_mesh
    if mesh == view.mesh:
        return tuple(range(mesh.ndim))
    names, plan_names = mesh.mesh_dim_names, view.mesh.mesh_dim_names
    if names and plan_names and all(n in plan_names for n in names):
        dims = tuple(plan_names.index(n) for n in names)
        # this rank's slice of the plan mesh along those dims must be t's mesh
        me = view.coords[view.rank]
        index = tuple(slice(None) if d in dims else me[d] for d in range(view.mesh.ndim))
        kept = sorted(dims)
        expected = view.mesh.mesh[index].permute(*[kept.index(d) for d in dims])
        if expected.tolist() == mesh.mesh.tolist():
            return dims
    raise ValueError(
        f"{where} is a DTensor on mesh {mesh} that is neither the plan's mesh {view.mesh} nor a named sub-mesh "
        "of it: the Muon parameters of one optimizer must live on one device mesh (and its named sub-meshes). "
        "Use one optimizer per mesh, or Muon(..., foreach=False) to gather every full matrix on every rank"
    )


def _indices(shape, mesh_shape, coord, placements, where) -> list[list[int]]:
    """The global indices along each tensor dim that the rank at `coord` holds."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard, _StridedShardOffsetMode

    idx = [list(range(s)) for s in shape]
    for md, placement in enumerate(placements):
        if placement.is_replicate():
            continue
        if isinstance(placement, _StridedShard):
            cur = idx[placement.dim]
            size, offs = placement._local_shard_size_and_offset(
                len(cur), mesh_shape[md], coord[md], _StridedShardOffsetMode.ALL
            )
            positions = list(offs)[:size] if size else []
        elif isinstance(placement, Shard):
            cur = idx[placement.dim]
            size, off = Shard.local_shard_size_and_offset(len(cur), mesh_shape[md], coord[md])
            positions = list(range(off, off + size))
        else:
            raise ValueError(
                f"{where} has placement {placement} on mesh dim {md}: the plan takes Shard, Replicate and FSDP2's "
                "strided shards; reduce Partial gradients before the step (or Muon(..., foreach=False))"
            )
        idx[placement.dim] = [cur[i] for i in positions]
    return idx


def _span(ix: list[int], where: str, what: str) -> tuple[int, int]:
    if not ix:
        return 0, 0
    if ix != list(range(ix[0], ix[0] + len(ix))):
        raise ValueError(f"{where}: a rank's shard holds non-contiguous {what}; the plan needs rectangular blocks")
    return ix[0], len(ix)


def _block(shape, idx, flatten: bool, where: str) -> Block:
    """The rank's block of the (m, n) matrix of a 2-D (or flatten=True) parameter."""
    r0, nr = _span(idx[0], where, "rows")
    rest = shape[1:]
    partial = [k for k, ix in enumerate(idx[1:]) if len(ix) != rest[k]]
    if not partial:
        c0, nc = 0, math.prod(rest)
    else:
        k = partial[0]
        if any(len(idx[1 + j]) != rest[j] for j in partial[1:]) or math.prod(rest[:k]) != 1:
            raise ValueError(
                f"{where} (shape {tuple(shape)}, flatten=True) is sharded inside its flattened columns: "
                "shard conv weights on dim 0 or 1 only"
            )
        inner = math.prod(rest[k + 1 :])
        start, count = _span(idx[1 + k], where, "columns")
        c0, nc = start * inner, count * inner
    if nr * nc == 0:
        return (0, 0, 0, 0)
    return (r0, nr, c0, nc)


def check_gradient_layout(p, where: str) -> None:
    """A ValueError naming the parameter unless its gradient lies as it does (the same mesh and
    placements, or both plain tensors): a step reads both shard by shard."""
    g = p.grad
    if is_dtensor(p) == is_dtensor(g) and (
        not is_dtensor(p) or (g.device_mesh == p.device_mesh and tuple(g.placements) == tuple(p.placements))
    ):
        return
    mine = f"a DTensor with placements {tuple(p.placements)}" if is_dtensor(p) else "a plain tensor"
    laid = "a plain tensor" if not is_dtensor(g) else f"laid out as {tuple(g.placements)}"
    raise ValueError(
        f"{where} is {mine}, but its gradient is {laid}: the step needs gradients laid out like their "
        "parameters (FSDP2 and TP give that; reduce Partial gradients before the step)"
    )


def matrix_layout(p, flatten: bool, view: MeshView, where: str):
    """("blocks", per group rank its Block) or ("local", per group rank its number of whole matrices)
    of Muon parameter p on the plan mesh (module docstring). A plain tensor is "local" on every rank."""
    from .._shapes import matrix_shape

    batch, m, n = matrix_shape(p.shape, flatten)
    if not is_dtensor(p):
        return "local", (batch,) * view.world
    check_gradient_layout(p, where)
    g = p.grad
    dims = mesh_dims(p, view, where)
    mesh_shape = tuple(p.device_mesh.mesh.shape)
    shape = tuple(p.shape)
    coords = [tuple(c[d] for d in dims) for c in view.coords]
    indices = [_indices(shape, mesh_shape, c, p.placements, where) for c in coords]
    mine = tuple(len(ix) for ix in indices[view.rank])
    for t, what in ((p, "parameter"), (g, "gradient")):
        local = tuple(t.to_local().shape)
        if local != mine:
            raise LocalShardMismatch(
                f"{where}: this rank's {what} shard has shape {local}, but placements {tuple(p.placements)} of shape "
                f"{shape} give {mine} (torch.chunk's sizes): shards of other sizes (DTensor.from_local with custom "
                "sizes) are not on the plan; Muon(..., foreach=False) gathers them"
            )
    return geometry(shape, indices, flatten, where)


def geometry(shape: tuple, indices: list, flatten: bool, where: str):
    """`matrix_layout`'s answer from every rank's indices along each tensor dim (`_indices`)."""
    from .._shapes import matrix_shape

    _, m, n = matrix_shape(shape, flatten)
    if len(shape) > 2 and not flatten:
        if any(len(ix[-2]) != m or len(ix[-1]) != n for ix in indices if all(ix)):
            raise ValueError(
                f"{where} (shape {shape}) is a stack of matrices sharded on a matrix dim: "
                "the plan keeps expert stacks whole per rank (shard them on the stack dim) or use foreach=False"
            )
        return "local", tuple(math.prod(len(ix) for ix in idx[:-2]) if all(idx) else 0 for idx in indices)
    blocks = tuple(_block(shape, idx, flatten, where) for idx in indices)
    distinct = {b for b in blocks if b[1]}
    covered = sum(b[1] * b[3] for b in distinct)
    overlap = any(
        a != b and a[0] < b[0] + b[1] and b[0] < a[0] + a[1] and a[2] < b[2] + b[3] and b[2] < a[2] + a[3]
        for a in distinct for b in distinct
    )  # fmt: skip
    if covered != m * n or overlap:
        raise ValueError(f"{where}: the ranks' shards do not tile the {m}×{n} matrix")
    return "blocks", blocks


class LocalShardMismatch(ValueError):
    """A rank's local shard is not what its placements say: known on that rank only, so the ranks
    agree on it before raising (`muon.distributed.sharded.refuse`)."""


def mesh_coords(mesh_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Every coordinate of a mesh in row-major order (group rank g of a mesh covering the world)."""
    import itertools

    return tuple(itertools.product(*(range(s) for s in mesh_shape)))


def layout_of(shape, mesh_shape, placements, flatten: bool = False, where: str = "a parameter"):
    """`matrix_layout` from shapes alone, for a mesh covering the world in order (the traffic model)."""
    coords = mesh_coords(tuple(mesh_shape))
    if placements is None:  # a plain tensor
        from .._shapes import matrix_shape

        return "local", (matrix_shape(tuple(shape), flatten)[0],) * len(coords)
    indices = [_indices(tuple(shape), tuple(mesh_shape), c, placements, where) for c in coords]
    return geometry(tuple(shape), indices, flatten, where)


def sources(blocks: tuple[Block, ...], owner: int, coords) -> list[tuple[int, Block]]:
    """Who sends the owner each distinct block of a matrix: among the ranks holding it, the one whose
    mesh coordinate is closest to the owner's (the owner itself, else its replica group: HSDP)."""
    chosen: dict[Block, int] = {}
    for r, b in enumerate(blocks):
        if not b[1]:
            continue
        distance = sum(x != y for x, y in zip(coords[r], coords[owner], strict=True))
        best = chosen.get(b)
        if best is None or distance < sum(x != y for x, y in zip(coords[best], coords[owner], strict=True)):
            chosen[b] = r
    return sorted(((r, b) for b, r in chosen.items()), key=lambda x: x[0])
