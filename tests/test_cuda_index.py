"""Host-checkable kernel logic of csrc/, through the functions the kernels themselves use
(csrc/ns_index.h, exposed by muon._C): triangle tile scheduling, accumulator fragment coordinates,
shared-memory swizzles, and the constants the CuPy path mirrors."""

from __future__ import annotations

import pytest

from muon import _native, cupy_path

ext = _native.load()
pytestmark = pytest.mark.skipif(ext is None, reason="muon._C is not built here")


@pytest.mark.parametrize("t", [1, 2, 3, 7, 64, 513])
def test_triangle_schedule_covers_lower_triangle_once(t):
    count = ext.tri_tile_count(t)
    assert count == t * (t + 1) // 2
    tiles = [ext.tri_tile_coords(b) for b in range(count)]
    assert sorted(tiles) == sorted((i, j) for i in range(t) for j in range(i + 1))
    assert tiles == sorted(tiles)  # row-major: consecutive blocks share the row panel


def test_triangle_schedule_large_indices():
    # Past 2^31 tiles (batched huge grids): the sqrt estimate must still land on the right row.
    for i in (46340, 46341, 65535, 2**20, 3 * 10**6):
        first = i * (i + 1) // 2
        assert ext.tri_tile_coords(first) == (i, 0)
        assert ext.tri_tile_coords(first - 1) == (i - 1, i - 1)
        assert ext.tri_tile_coords(first + i) == (i, i)


def test_mma_fragment_covers_16x8_once():
    cells = [ext.mma_acc_coord(lane, r) for lane in range(32) for r in range(4)]
    assert sorted(cells) == [(row, col) for row in range(16) for col in range(8)]
    # (r, r + 1) are horizontally adjacent: the epilogue stores them as a pair
    for lane in range(32):
        for r in (0, 2):
            (r0, c0), (r1, c1) = ext.mma_acc_coord(lane, r), ext.mma_acc_coord(lane, r + 1)
            assert (r1, c1) == (r0, c0 + 1)


@pytest.mark.parametrize("n", [128, 256])
def test_wgmma_fragment_covers_64xn_once(n):
    cells = [ext.wgmma_acc_coord(t, r) for t in range(128) for r in range(n // 2)]
    assert sorted(cells) == [(row, col) for row in range(64) for col in range(n)]
    # each 8-column slice matches the mma.sync pattern (the epilogue shares that code)
    for t in range(128):
        warp, lane = divmod(t, 32)
        for r in range(n // 2):
            row, col = ext.wgmma_acc_coord(t, r)
            mrow, mcol = ext.mma_acc_coord(lane, r % 4)
            assert (row, col) == (16 * warp + mrow, 8 * (r // 4) + mcol)


def test_kmajor_swizzle_is_bijective_and_conflict_free():
    bk = ext.SM80_BK
    offsets = [ext.sm80_kmajor_offset(row, k) for row in range(128) for k in range(bk)]
    assert sorted(offsets) == list(range(128 * bk))
    # ldmatrix phase: 8 consecutive rows at one logical 16-B chunk -> 8 distinct bank windows
    for row0 in range(0, 128, 8):
        for chunk in range(bk // 8):
            slots = {ext.bank_slot(ext.sm80_kmajor_offset(row0 + i, chunk * 8)) for i in range(8)}
            assert len(slots) == 8, (row0, chunk)
    # 16-B chunks stay contiguous (cp.async writes 8 elements at once)
    for row in range(8):
        for k in range(0, bk, 8):
            base = ext.sm80_kmajor_offset(row, k)
            assert [ext.sm80_kmajor_offset(row, k + e) for e in range(8)] == list(range(base, base + 8))


def test_mnmajor_swizzle_is_bijective_and_conflict_free():
    bk, bn = ext.SM80_BK, ext.SM80_BN
    offsets = [ext.sm80_mnmajor_offset(k, n) for k in range(bk) for n in range(bn)]
    assert sorted(offsets) == list(range(bk * bn))
    for k0 in range(0, bk, 8):
        for chunk in range(bn // 8):
            slots = {ext.bank_slot(ext.sm80_mnmajor_offset(k0 + i, chunk * 8)) for i in range(8)}
            assert len(slots) == 8, (k0, chunk)


def test_cupy_path_mirrors_the_driver():
    assert ext.SM80_BN == cupy_path.SM80_BN
    for m, n in [(1, 1), (7, 33), (128, 4096), (4096, 4096), (8192, 8192), (3, 100000)]:
        assert cupy_path.norm_parts(m, n) == ext.norm_parts(m, n)


def test_workspace_grows_with_the_problem():
    small, big = ext.workspace_bytes(1, 64, 64), ext.workspace_bytes(4, 64, 64)
    # two bf16 copies of X plus A and B (rows padded to 8), partials, 256-B alignment
    assert small >= 4 * 64 * 64 * 2 and big >= 4 * small - 4 * 256
    assert ext.workspace_bytes(1, 7, 33) >= 2 * 7 * 40 * 2 + 2 * 7 * 8 * 2
