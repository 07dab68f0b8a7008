"""The telescoping sweep's schedule: grid sizes, spacing, centring and cost, on a synthetic loss."""

from __future__ import annotations

import math

import pytest

from bench.experiments.telescope import grid, points_per_dim, telescope, total_runs, widths


def test_points_per_dim_shrink_by_4_to_the_minus_1_over_k():
    assert [points_per_dim(8, 2, s) for s in range(4)] == [8, 5, 3, 1]  # the paper's 8x8 -> 5x5 -> 3x3 -> 1x1
    assert [points_per_dim(9, 1, s) for s in range(4)] == [9, 3, 1, 1]  # 9, 2.25, 0.56, 0.14
    assert [points_per_dim(16, 4, s) for s in range(5)] == [16, 11, 9, 5, 5]  # 16·(1/sqrt2)^s: 11.3, 8, 5.7, 4
    for n0, k in ((8, 2), (7, 3), (5, 1), (20, 2)):
        for s in range(1, 6):
            n = points_per_dim(n0, k, s)
            assert n % 2 == 1  # odd: the previous optimum is a grid point
            assert abs(n - n0 * 4 ** (-s / k)) <= 1.0  # the nearest odd number to n0·4^(-s/k)
    with pytest.raises(ValueError, match="n0"):
        points_per_dim(0, 2, 1)


def test_grid_size_spacing_and_centre():
    pts = grid((1.0, -2.0), (0.5, 2.0), 4)
    assert len(pts) == 16 and len(set(pts)) == 16
    xs, ys = sorted({p[0] for p in pts}), sorted({p[1] for p in pts})
    assert xs == pytest.approx([0.25, 0.75, 1.25, 1.75]) and ys == pytest.approx([-5.0, -3.0, -1.0, 1.0])
    assert sum(p[0] for p in pts) / 16 == pytest.approx(1.0) and sum(p[1] for p in pts) / 16 == pytest.approx(-2.0)
    assert (1.0, -2.0) in grid((1.0, -2.0), (0.5, 2.0), 3)  # odd grids contain their centre
    assert grid((3.0,), (1.0,), 1) == [(3.0,)]
    assert widths(32, 256) == [32, 64, 128, 256]
    with pytest.raises(ValueError, match="power of 2"):
        widths(32, 96)


def _synthetic(c0=(0.3, -0.7), drift=(0.6, -0.5)):
    """A bowl whose optimum drifts as O(1/width): opt(w) = c0 + drift/w. Records every call."""
    calls = []

    def optimum(width):
        return tuple(c + d / width for c, d in zip(c0, drift, strict=True))

    def loss(width, point):
        calls.append((width, point))
        return sum((x - o) ** 2 for x, o in zip(point, optimum(width), strict=True))

    return loss, optimum, calls


def test_telescope_on_a_drifting_optimum():
    loss, optimum, calls = _synthetic()
    n0, base, final, spacing = 8, 4, 32, (0.4, 0.4)
    # the paper's schedule as it is: no grid extension (test_grid_extension_* cover those)
    res = telescope(loss, center=(0.0, 0.0), spacing=spacing, n0=n0, base_width=base, final_width=final,
                    names=["lr", "wd"], max_extensions=0)
    stages = res["stages"]
    assert [st["width"] for st in stages] == [4, 8, 16, 32]
    assert [st["points_per_dim"] for st in stages] == [8, 5, 3, 1]
    assert [len(st["grid"]) for st in stages] == [64, 25, 9, 1]
    assert len(calls) == 64 + 25 + 9 + 1  # each stage's calls are checked below
    start = 0
    for s, st in enumerate(stages):
        stage_calls = calls[start:start + len(st["grid"])]
        start += len(st["grid"])
        assert {w for w, _ in stage_calls} == {st["width"]}
        h = spacing[0] / 2**s  # spacing halves each doubling
        assert st["spacing"] == {"lr": pytest.approx(h), "wd": pytest.approx(h)}
        xs = sorted({e["point"]["lr"] for e in st["grid"]})
        assert all(b - a == pytest.approx(h) for a, b in zip(xs, xs[1:], strict=False))
        # centred: on the initial centre, then on the previous stage's optimum (which is a grid point)
        centre = (0.0, 0.0) if s == 0 else tuple(stages[s - 1]["best"]["point"][n] for n in ("lr", "wd"))
        assert (st["center"]["lr"], st["center"]["wd"]) == pytest.approx(centre)
        mean = [sum(e["point"][n] for e in st["grid"]) / len(st["grid"]) for n in ("lr", "wd")]
        assert mean == pytest.approx(list(centre))
        if s > 0:
            assert any(tuple(e["point"].values()) == pytest.approx(centre) for e in st["grid"])
        # the best is the argmin of what was tried, and is within half a spacing of the true optimum
        # wherever the true optimum lies inside the grid
        assert st["best"]["loss"] == min(e["loss"] for e in st["grid"])
        if st["points_per_dim"] > 1:
            for i, n in enumerate(("lr", "wd")):
                lo, hi = min(e["point"][n] for e in st["grid"]), max(e["point"][n] for e in st["grid"])
                if lo <= optimum(st["width"])[i] <= hi:
                    assert abs(st["best"]["point"][n] - optimum(st["width"])[i]) <= h / 2 + 1e-12
    # the transferred optimum tracks the drift: closer to the final width's optimum than the base optimum is
    final_opt = optimum(final)
    err = lambda p: math.dist((p["lr"], p["wd"]), final_opt)
    assert err(res["best"]["point"]) < err(stages[0]["best"]["point"])
    # per dimension: the last grid with more than one point (width 16, spacing 0.1) resolved the width-16
    # optimum to half a spacing, and the optimum moved by |drift|·(1/16 - 1/32) since
    for i, n in enumerate(("lr", "wd")):
        moved = abs(optimum(16)[i] - optimum(final)[i])
        assert abs(res["best"]["point"][n] - final_opt[i]) <= spacing[i] / 4 / 2 + moved + 1e-12
    # cost: a run at width w costs (w/base)^2; brute force is the base grid at the final width
    assert [st["cost"] for st in stages] == [64 * 1, 25 * 4, 9 * 16, 1 * 64]
    assert res["cost"] == 372 and res["brute_force_cost"] == 64 * 64
    assert res["cost_ratio_vs_brute_force"] == pytest.approx(372 / 4096)
    assert total_runs(n0, 2, 4) == 99


def test_telescope_any_k_custom_cost_and_divergence():
    def loss(width, point):
        if point[0] > 1.0:
            return math.nan  # diverged runs never win
        return sum((x - 0.25) ** 2 for x in point)

    res = telescope(loss, center=(0.5, 0.5, 0.5), spacing=(0.5, 0.5, 0.5), n0=4, base_width=8, final_width=32,
                    cost=lambda w: float(w))
    assert [len(st["grid"]) for st in res["stages"]] == [64, 3**3, 1]  # 4·4^(-1/3)=2.5 -> 3; 4^(1/3)=1.6 -> 1
    assert all(math.isfinite(st["best"]["loss"]) for st in res["stages"])
    assert res["cost"] == 64 * 8 + 27 * 16 + 1 * 32 and res["brute_force_cost"] == 64 * 32
    assert list(res["best"]["point"]) == ["x0", "x1", "x2"]
    with pytest.raises(ValueError, match="spacing"):
        telescope(loss, center=(0.0,), spacing=(0.0,), n0=3, base_width=8, final_width=8)
    with pytest.raises(ValueError, match="same k"):
        telescope(loss, center=(0.0, 1.0), spacing=(1.0,), n0=3, base_width=8, final_width=8)


def _grid_edges(stage, name):
    values = [e["point"][name] for e in stage["grid"]]
    return min(values), max(values)


def test_grid_extension_brings_each_optimum_inside_its_grid():
    """A base grid centred far from the optimum: the stage extends slab by slab until its best point
    is inside (not on an edge) in every dimension; each slab is one more value of one hyperparameter
    across every value of the others, at the stage's spacing."""
    loss, optimum, calls = _synthetic(c0=(2.3, -1.9), drift=(0.0, 0.0))  # optimum (2.3, -1.9) at every width
    res = telescope(loss, center=(0.0, 0.0), spacing=(1.0, 1.0), n0=4, base_width=8, final_width=32,
                    names=["lr", "wd"], max_extensions=8)
    base = res["stages"][0]
    # base axes -1.5 .. 1.5: lr needs 2.5 and 3.5 (2 slabs of 4 wd values... then 5), wd needs -2.5 (1 slab)
    assert base["extensions"] == 3 and not base["best_on_edge"]
    assert len(base["grid"]) == 16 + 4 + 4 + 6  # 4x4, lr 2.5 (x4 wd), lr 3.5 (x4 wd), wd -2.5 (x6 lr)
    assert [e["extension"] for e in base["grid"]].count(0) == 16
    assert base["axes"]["lr"] == pytest.approx([-1.5, -0.5, 0.5, 1.5, 2.5, 3.5])
    assert base["axes"]["wd"] == pytest.approx([-2.5, -1.5, -0.5, 0.5, 1.5])
    assert len({tuple(e["point"].values()) for e in base["grid"]}) == len(base["grid"])  # no run twice
    assert len(calls) == sum(len(st["grid"]) for st in res["stages"])
    for st in res["stages"]:
        if st["points_per_dim"] > 1:
            for i, name in enumerate(("lr", "wd")):
                lo, hi = _grid_edges(st, name)
                assert lo < st["best"]["point"][name] < hi  # inside, not on the edge
                assert abs(st["best"]["point"][name] - optimum(st["width"])[i]) <= st["spacing"][name] / 2 + 1e-12
        else:
            assert st["extensions"] == 0 and not st["best_on_edge"]  # a one-point stage is the transfer
    # cost counts every run, extensions included
    assert res["stages"][0]["cost"] == len(base["grid"]) * 1.0


def test_grid_extension_is_bounded_and_says_so():
    loss, _, calls = _synthetic(c0=(40.0, 0.0), drift=(0.0, 0.0))  # far beyond any reach
    res = telescope(loss, center=(0.0, 0.0), spacing=(1.0, 1.0), n0=3, base_width=8, final_width=8,
                    max_extensions=2)
    (stage,) = res["stages"]
    assert stage["extensions"] == 2 and stage["best_on_edge"]
    assert len(calls) == 9 + 3 + 3
    assert stage["best"]["point"]["x0"] == max(e["point"]["x0"] for e in stage["grid"])
    with pytest.raises(ValueError, match="max_extensions"):
        telescope(loss, center=(0.0,), spacing=(1.0,), n0=3, base_width=8, final_width=8, max_extensions=-1)


def test_grid_extension_one_dimension_and_divergence():
    """k = 1 extends along its only axis; a diverged (NaN) run beyond the edge ends the search there."""
    def loss(width, point):
        return math.nan if point[0] > 2.0 else (point[0] - 5.0) ** 2  # optimum beyond where runs diverge

    res = telescope(loss, center=(0.0,), spacing=(1.0,), n0=3, base_width=8, final_width=8, max_extensions=5)
    (stage,) = res["stages"]
    assert stage["axes"]["x0"] == pytest.approx([-1.0, 0.0, 1.0, 2.0, 3.0])
    assert stage["best"]["point"]["x0"] == 2.0 and not stage["best_on_edge"]  # 3.0 diverged: 2.0 is inside
