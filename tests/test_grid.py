"""Tile-plan maths: coverage, halos, alignment, mirroring and blend weights."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.errors import InputError
from geoseg.grid import GeoBox, TilePlan, Window, blend_window_1d, reflect_index


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 32])
def test_reflect_index_matches_numpy_reflect(n: int) -> None:
    a = np.arange(n)
    for pad in (1, n - 1, n, 3 * n + 2):
        expected = np.pad(a, pad, mode="reflect") if n > 1 else np.zeros(n + 2 * pad, dtype=int)
        got = reflect_index(np.arange(-pad, n + pad), n)
        np.testing.assert_array_equal(got, expected)


def test_reflect_never_wraps() -> None:
    # index -1 must mirror to 1, not wrap to n-1
    assert reflect_index(-1, 10) == 1
    assert reflect_index(10, 10) == 8


plans = st.builds(
    lambda h, w, tile, halo_frac, chunk, mult, fixed, r0, c0, rh, cw: TilePlan(
        h,
        w,
        Window(min(r0, h - 1), min(c0, w - 1), max(1, min(rh, h - min(r0, h - 1))), max(1, min(cw, w - min(c0, w - 1)))),
        tile=tile,
        halo=min(int(tile * halo_frac), (tile - 1) // 2),
        chunk=chunk,
        size_multiple=mult,
        fixed_size=fixed,
    ),
    st.integers(1, 400),
    st.integers(1, 400),
    st.integers(3, 96),
    st.floats(0, 0.49),
    st.integers(1, 300),
    st.sampled_from([1, 8, 32]),
    st.booleans(),
    st.integers(0, 399),
    st.integers(0, 399),
    st.integers(1, 400),
    st.integers(1, 400),
)


@settings(max_examples=300, deadline=None)
@given(plans)
def test_plan_cores_cover_region_exactly_once(plan: TilePlan) -> None:
    count = np.zeros((plan.raster_height, plan.raster_width), dtype=np.int32)
    chunk_count = np.zeros_like(count)
    for i, j in plan.iter_chunks():
        cw = plan.chunk_window(i, j)
        chunk_count[cw.slices()] += 1
        inp = plan.input_window(i, j)
        for t in plan.tiles(i, j):
            assert cw.contains(t.core)  # every tile belongs to one chunk
            assert inp.contains(t.input)
            # the core sits inside its input with at least a halo of context on every side
            assert t.input.contains(t.core.expand(plan.halo))
            assert t.input.height <= plan.tile and t.input.width <= plan.tile
            if plan.fixed_size:
                assert t.input.shape == (plan.tile, plan.tile)
            elif t.input.shape != (plan.tile, plan.tile):
                assert t.input.height % plan.size_multiple == 0 or t.input.height == plan.tile
            count[t.core.slices()] += 1
    region = np.zeros_like(count)
    region[plan.region.slices()] = 1
    np.testing.assert_array_equal(count, region)
    np.testing.assert_array_equal(chunk_count, region)
    assert sum(len(plan.tiles(i, j)) for i, j in plan.iter_chunks()) == plan.n_tiles()


@settings(max_examples=200, deadline=None)
@given(plans)
def test_chunk_seams_agree_with_tile_seams(plan: TilePlan) -> None:
    # chunk edges fall on the tile grid: tile cores start at multiples of `core` from the region origin
    for i, j in plan.iter_chunks():
        cw = plan.chunk_window(i, j)
        assert (cw.row_off - plan.region.row_off) % plan.core == 0
        assert (cw.col_off - plan.region.col_off) % plan.core == 0
        for t in plan.tiles(i, j):
            assert (t.core.row_off - plan.region.row_off) % plan.core == 0
            assert t.input.row_off == t.core.row_off - plan.halo


@settings(max_examples=200, deadline=None)
@given(plans)
def test_blend_weights_are_positive_and_sum_to_one_in_overlaps(plan: TilePlan) -> None:
    wsum = np.zeros((plan.raster_height + 2 * plan.tile, plan.raster_width + 2 * plan.tile))
    off = plan.tile
    for i, j in plan.iter_chunks():
        for t in plan.tiles(i, j):
            w = np.outer(blend_window_1d(t.input.height, plan.halo), blend_window_1d(t.input.width, plan.halo))
            assert (w > 0).all()
            r, c = t.input.row_off + off, t.input.col_off + off
            wsum[r : r + t.input.height, c : c + t.input.width] += w
    region = wsum[plan.region.slices(Window(-off, -off, 0, 0))]
    assert (region > 0).all()  # every output pixel gets weight, raster edges included
    # away from the region's outer ring (where fewer tiles overlap), full-size tiles' weights sum to one
    if plan.core >= 2 * plan.halo and not plan.fixed_size:
        interior = region[plan.tile : -plan.tile, plan.tile : -plan.tile]
        if interior.size:
            np.testing.assert_allclose(interior, 1.0, rtol=1e-5)


def test_blend_window_shape() -> None:
    w = blend_window_1d(64, 8)
    assert w.shape == (64,) and w.min() > 0 and w.max() == 1.0
    np.testing.assert_allclose(w[:16] + w[-16:], 1.0, rtol=1e-6)  # trailing ramp of one tile + leading of the next
    assert (blend_window_1d(10, 0) == 1).all()


def test_plan_validation_messages() -> None:
    with pytest.raises(InputError, match="larger than twice the halo"):
        TilePlan(10, 10, Window(0, 0, 10, 10), tile=64, halo=32)
    with pytest.raises(InputError, match="region"):
        TilePlan(10, 10, Window(5, 5, 10, 10), tile=64, halo=8)


def test_geobox_crop_shifts_origin() -> None:
    gb = GeoBox(100, 50, Affine(2, 0, 1000, 0, -2, 5000), "EPSG:32633")
    sub = gb.crop(Window(10, 20, 5, 6))
    assert sub.transform == Affine(2, 0, 1040, 0, -2, 4980)
    assert (sub.width, sub.height, sub.crs) == (6, 5, "EPSG:32633")
    assert gb.bounds == (1000, 4900, 1200, 5000)
    with pytest.raises(InputError):
        gb.crop(Window(45, 0, 10, 10))


def test_chunk_rounds_to_whole_cores() -> None:
    plan = TilePlan(1000, 1000, Window(0, 0, 1000, 1000), tile=512, halo=32, chunk=2048)
    assert plan.core == 448 and plan.chunk_px == 5 * 448
    assert plan.chunks == ((1000,), (1000,))
    small = TilePlan(1000, 1000, Window(0, 0, 1000, 1000), tile=512, halo=32, chunk=10)
    assert small.chunk_px == 448 and small.shape == (3, 3)
