"""Vectorisation: chunked polygons equal whole-raster polygons; files read back correctly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dask
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio import features
from rasterio.transform import Affine

from geoseg.errors import InputError, OutputExistsError
from geoseg.vector.polygonize import Pieces, make_valid, merge_seams, polygonize_block
from geoseg.vector.run import vectorize

UTM = "EPSG:32632"
ORIGIN = Affine(2.0, 0.0, 560000.0, 0.0, -2.0, 5935000.0)
CLASSES = [
    {"id": 0, "name": "background", "color": [0, 0, 0]},
    {"id": 1, "name": "building", "color": [230, 25, 75]},
    {"id": 2, "name": "water", "color": [0, 130, 200]},
    {"id": 3, "name": "storage_tank", "color": [245, 130, 48]},
    {"id": 4, "name": "ship", "color": [145, 30, 180]},
]


def write_mask(path: Path, mask: np.ndarray, *, transform=ORIGIN, crs=UTM, block: int = 64, classes=CLASSES) -> Path:
    """A tiled uint8 mask with nodata 255 and geoseg's class metadata."""
    profile = dict(
        driver="GTiff",
        width=mask.shape[1],
        height=mask.shape[0],
        count=1,
        dtype="uint8",
        nodata=255,
        tiled=True,
        blockxsize=block,
        blockysize=block,
        transform=transform,
        crs=crs,
    )
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(mask, 1)
        if classes:
            ds.update_tags(GEOSEG_CLASSES=json.dumps(classes))
    return path


def reference(mask: np.ndarray, connectivity: int, transform=None) -> dict[int, list]:
    """Whole-raster polygons per class, straight from rasterio (GDAL), made valid."""
    out: dict[int, list] = {}
    kw = {"transform": transform} if transform is not None else {}
    for geom, value in features.shapes(mask, mask=mask != 255, connectivity=connectivity, **kw):
        g = make_valid(np.array([shapely.geometry.shape(geom)]))[0]
        out.setdefault(int(value), []).append(g)
    return out


def chunked(mask: np.ndarray, chunk: int, connectivity: int, **kw) -> Pieces:
    h, w = mask.shape
    prob = kw.pop("prob", None)
    parts, k = [], 0
    for r in range(0, h, chunk):
        for c in range(0, w, chunk):
            block_prob = prob[:, r : r + chunk, c : c + chunk] if prob is not None else None
            block = mask[r : r + chunk, c : c + chunk]
            parts.append(polygonize_block(block, r, c, (h, w), connectivity=connectivity, chunk=k, prob=block_prob, **kw))
            k += 1
    p = Pieces.concat(parts)
    return Pieces.concat([p.take(~p.seam), merge_seams(p.take(p.seam), connectivity)])


def assert_same_polygons(ref: dict[int, list], got_geoms, got_classes, tol: float = 1e-9) -> None:
    """Same polygons per class: equal counts, and each reference polygon equals exactly one of ours."""
    got_classes = np.asarray(got_classes)
    assert sorted(ref) == sorted(int(c) for c in np.unique(got_classes)), "classes differ"
    for cls, polys in ref.items():
        mine = np.asarray(got_geoms, dtype=object)[got_classes == cls]
        assert len(mine) == len(polys), f"class {cls}: {len(mine)} polygons, whole raster gives {len(polys)}"
        assert shapely.is_valid(mine).all()
        tree = shapely.STRtree(mine)
        for p in polys:
            hits = tree.query(shapely.point_on_surface(p), predicate="intersects")
            assert len(hits) == 1, f"class {cls}: {len(hits)} polygons at {shapely.point_on_surface(p)}"
            diff = shapely.area(shapely.symmetric_difference(p, mine[hits[0]]))
            assert diff <= tol * max(1.0, p.area), f"class {cls}: symmetric difference {diff}"


def _blob_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[10:20, 10:20] = 1  # inside one chunk (chunk 32)
    m[5:15, 28:40] = 1  # straddles one seam (2 chunks)
    m[26:40, 26:38] = 2  # straddles a seam corner (4 chunks)
    # a ring with its hole on the seam x = 64
    m[40:60, 54:74] = 1
    m[46:54, 60:68] = 0
    # a snake crossing the seam y = 32 four times
    m[20:44, 80:82] = 3
    m[42:44, 80:86] = 3
    m[20:44, 84:86] = 3
    m[20:22, 84:90] = 3
    m[20:44, 88:90] = 3
    # corner-only contacts at the chunk corner (32, 96): class 4 diagonal pair
    m[28:32, 92:96] = 4
    m[32:36, 96:100] = 4
    # and a diagonal pair inside a chunk
    m[50:52, 100:102] = 4
    m[52:54, 102:104] = 4
    m[:4, :4] = 255  # nodata
    return m


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("chunk", [32, 48, 128])
def test_chunked_equals_whole_raster(connectivity: int, chunk: int) -> None:
    mask = _blob_mask(70, 110)
    got = chunked(mask, chunk, connectivity)
    ref = reference(mask, connectivity)
    assert_same_polygons(ref, got.geometry, got.class_id)
    # pixel counts are the exact areas
    assert np.array_equal(shapely.area(got.geometry), got.count.astype(float))
    # the corner-touching class-4 pairs: separate with 4-connectivity, joined with 8
    assert (got.class_id == 4).sum() == (4 if connectivity == 4 else 2)


def test_hole_on_seam_and_snake() -> None:
    mask = _blob_mask(70, 110)
    got = chunked(mask, 32, 4)
    ring = [g for g, c in zip(got.geometry, got.class_id, strict=True) if c == 1 and g.bounds[0] == 54]
    assert len(ring) == 1 and len(ring[0].interiors) == 1 and ring[0].area == 20 * 20 - 8 * 8
    snake = got.geometry[got.class_id == 3]
    assert len(snake) == 1 and snake[0].geom_type == "Polygon"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    h=st.integers(1, 60),
    w=st.integers(1, 60),
    chunk=st.integers(4, 40),
    classes=st.integers(2, 4),
    connectivity=st.sampled_from([4, 8]),
)
def test_random_masks_chunked_equals_whole(seed: int, h: int, w: int, chunk: int, classes: int, connectivity: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, classes, (h, w)).astype(np.uint8)
    mask[rng.random((h, w)) < 0.05] = 255
    got = chunked(mask, chunk, connectivity)
    assert_same_polygons(reference(mask, connectivity), got.geometry, got.class_id)


def test_simplify_keeps_a_coverage() -> None:
    """Simplified polygons of all classes still tile the raster: no gaps, no overlaps."""
    rng = np.random.default_rng(3)
    from scipy import ndimage

    mask = (ndimage.uniform_filter(rng.random((96, 96)), 9) * 6).astype(np.uint8) % 3
    exact = chunked(mask, 32, 4)
    simple = chunked(mask, 32, 4, simplify=1.5)
    assert len(simple) == len(exact)
    assert shapely.is_valid(simple.geometry).all()
    areas = shapely.area(simple.geometry)
    assert math.isclose(areas.sum(), 96 * 96, rel_tol=1e-12)
    assert math.isclose(shapely.area(shapely.union_all(simple.geometry)), 96 * 96, rel_tol=1e-12)
    assert shapely.get_num_coordinates(simple.geometry).sum() < 0.7 * shapely.get_num_coordinates(exact.geometry).sum()


def test_scores_are_mean_class_probability() -> None:
    mask = np.zeros((40, 40), np.uint8)
    mask[5:25, 5:35] = 1
    prob = np.zeros((2, 40, 40), np.float32)
    prob[1] = np.linspace(0.5, 1.0, 40)[None, :]
    prob[0] = 1 - prob[1]
    got = chunked(mask, 16, 4, prob=prob, prob_band={0: 0, 1: 1})
    k = int(np.flatnonzero(got.class_id == 1)[0])
    assert math.isclose(got.prob_sum[k] / got.count[k], float(prob[1][mask == 1].mean()), rel_tol=1e-9)
    # stable id: the first pixel in raster order
    assert got.first[k] == 5 * 40 + 5


# --- end to end: files on disk --------------------------------------------------------------


def _scene_mask() -> np.ndarray:
    m = _blob_mask(150, 200)
    yy, xx = np.mgrid[:150, :200]
    m[(yy - 100) ** 2 + (xx - 40) ** 2 <= 12**2] = 3  # a tank, radius 12 px (24 m) across a seam
    ship = (np.abs((xx - 150) * 0.8 + (yy - 100) * 0.6) <= 20) & (np.abs(-(xx - 150) * 0.6 + (yy - 100) * 0.8) <= 4)
    m[ship] = 4
    return m


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    d = tmp_path_factory.mktemp("vec")
    mask = _scene_mask()
    path = write_mask(d / "mask.tif", mask)
    prob = np.where(mask[None] == np.arange(5)[:, None, None], 200, 10).astype(np.uint8)
    with rasterio.open(path) as ds:
        profile = ds.profile | {"count": 5, "nodata": None}
    with rasterio.open(d / "probabilities.tif", "w", **profile) as ds:
        ds.write(prob)
        ds.descriptions = tuple(c["name"] for c in CLASSES)
    return path, mask


@pytest.fixture(scope="module")
def scene_out(scene, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vec_out")
    with dask.config.set(scheduler="threads"):
        report = vectorize(str(scene[0]), str(out), formats=["geojson", "gpkg", "fgb", "parquet"], chunk=64, classes=["all"])
    return out, report


def test_files_equal_whole_raster_reference(scene, scene_out) -> None:
    _, mask = scene
    out, report = scene_out
    ref = reference(mask, 4, transform=ORIGIN)
    layers = pyogrio.list_layers(out / "geoseg.gpkg")
    assert sorted(set(layers[:, 0]) - {"layer_styles"}) == sorted(c["name"] for c in CLASSES)
    geoms, classes = [], []
    for c in CLASSES:
        df = pyogrio.read_dataframe(out / "geoseg.gpkg", layer=c["name"])
        assert df.crs.to_epsg() == 32632
        assert df.geometry.is_valid.all()
        assert (df["class"] == c["name"]).all() and (df["class_id"] == c["id"]).all()
        assert df["id"].is_unique
        assert np.allclose(df["area_m2"], df["area_px"] * 4.0)  # exact pixel areas in the native UTM grid
        geoms += list(df.geometry.values)
        classes += [c["id"]] * len(df)
        info = pyogrio.read_info(out / "geoseg.gpkg", layer=c["name"])
        assert info["features"] == next(ly["features"] for ly in report["layers"] if ly["name"] == c["name"])
    assert_same_polygons(ref, np.array(geoms, dtype=object), classes, tol=1e-12)
    assert report["chunks"] == 12 and report["seam_objects"] > 0
    import sqlite3

    with sqlite3.connect(out / "geoseg.gpkg") as db:  # GDAL's R-tree spatial index, one per layer
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
    assert {f"rtree_{c['name']}_geom" for c in CLASSES} <= tables
    assert pyogrio.read_info(out / "vectors" / "building.fgb")["capabilities"]["fast_spatial_filter"]
    for fmt, ext in (("fgb", ".fgb"), ("parquet", ".parquet")):
        for c in CLASSES:
            f = out / "vectors" / f"{c['name']}{ext}"
            if fmt == "parquet":
                import geopandas as gpd

                df = gpd.read_parquet(f)
            else:
                df = pyogrio.read_dataframe(f)
            assert df.crs.to_epsg() == 32632 and df.geometry.is_valid.all()
            assert len(df) == len(ref.get(c["id"], []))


def test_geojson_is_rfc7946(scene_out) -> None:
    out, _ = scene_out
    import geopandas as gpd
    from pyproj import Transformer

    to_utm = Transformer.from_crs("EPSG:4326", UTM, always_xy=True)
    for name in ("building", "water", "storage_tank", "ship"):
        text = (out / "vectors" / f"{name}.geojson").read_text()
        doc = json.loads(text)
        assert doc["type"] == "FeatureCollection" and "crs" not in doc
        g = shapely.from_geojson(text)
        polys = [p for geom in shapely.get_parts(g) for p in shapely.get_parts(geom)]
        for p in polys:
            xy = shapely.get_coordinates(p)
            assert (np.abs(xy[:, 0]) <= 180).all() and (np.abs(xy[:, 1]) <= 90).all()
            assert 9 < xy[:, 0].min() < 11 and 53 < xy[:, 1].min() < 54.5  # lon, lat order (UTM 32N near Hamburg)
            assert p.exterior.is_ccw and all(not r.is_ccw for r in p.interiors)
        # round trip: back to UTM within the documented tolerance (1 cm at 7 decimals)
        gj = gpd.read_file(out / "vectors" / f"{name}.geojson").sort_values("id")
        native = pyogrio.read_dataframe(out / "geoseg.gpkg", layer=name).sort_values("id")
        assert list(gj["id"]) == list(native["id"])
        back = shapely.transform(gj.geometry.values, lambda c: np.column_stack(to_utm.transform(c[:, 0], c[:, 1])))
        dist = shapely.hausdorff_distance(back, native.geometry.values)
        assert dist.max() < 0.02, dist.max()
        assert shapely.is_valid(gj.geometry.values).all()


def test_attributes(scene_out) -> None:
    out, _ = scene_out
    tank = pyogrio.read_dataframe(out / "geoseg.gpkg", layer="storage_tank")
    big = tank.loc[tank["area_px"].idxmax()]
    assert abs(big["diameter_m"] - 48.0) < 2.0  # radius 12 px at 2 m
    assert big["circularity"] > 0.85
    assert 9 < big["center_lon"] < 11 and 53 < big["center_lat"] < 54.5
    ship = pyogrio.read_dataframe(out / "geoseg.gpkg", layer="ship")
    s = ship.loc[ship["area_px"].idxmax()]
    assert abs(s["length_m"] - 80) < 6 and abs(s["width_m"] - 16) < 4
    # long axis along (0.8, 0.6) in pixel space = east 0.8, south 0.6 -> bearing ~126.9 degrees
    assert abs(s["heading_deg"] - 126.87) < 4
    water = pyogrio.read_dataframe(out / "geoseg.gpkg", layer="water")
    assert np.allclose(water["area_ha"], water["area_m2"] / 1e4)
    bld = pyogrio.read_dataframe(out / "geoseg.gpkg", layer="building")
    assert np.allclose(bld["score"], 200 / 255)  # mean class probability from probabilities.tif
    assert (bld["run_id"] == bld["run_id"].iloc[0]).all() and len(bld["run_id"].iloc[0]) == 16


def test_ids_stable_across_chunk_sizes_and_reruns(scene, tmp_path: Path) -> None:
    path, _ = scene
    ids = []
    for chunk in (64, 128, 256):
        out = tmp_path / f"c{chunk}"
        with dask.config.set(scheduler="synchronous"):
            vectorize(str(path), str(out), formats=["gpkg"], chunk=chunk, project=False)
        df = pyogrio.read_dataframe(out / "geoseg.gpkg", layer="building").set_index("id").sort_index()
        ids.append(df)
    for df in ids[1:]:
        assert list(df.index) == list(ids[0].index)
        assert shapely.equals(df.geometry.values, ids[0].geometry.values).all()
        assert (df["run_id"] == ids[0]["run_id"]).all()


def test_min_area_and_default_classes(scene, tmp_path: Path) -> None:
    path, mask = scene
    with dask.config.set(scheduler="threads"):
        report = vectorize(str(path), str(tmp_path), formats=["gpkg"], min_area=100.0, chunk=64)
    names = [ly["name"] for ly in report["layers"]]
    assert "background" not in names and "building" in names
    df = pyogrio.read_dataframe(tmp_path / "geoseg.gpkg", layer="ship")
    assert (df["area_m2"] >= 100).all()
    full = reference(mask, 4, transform=ORIGIN)[4]
    assert len(df) == sum(p.area >= 100 for p in full) < len(full)


def test_geographic_and_web_mercator_areas_are_metres(tmp_path: Path) -> None:
    from pyproj import Geod

    mask = np.zeros((64, 64), np.uint8)
    mask[10:50, 10:40] = 1
    geod = Geod(ellps="WGS84")
    cases = {
        "EPSG:4326": Affine(1e-4, 0, 10.0, 0, -1e-4, 53.5),
        "EPSG:3857": Affine(10.0, 0, 1113194.9, 0, -10.0, 7076000.0),
    }
    for crs, tr in cases.items():
        p = write_mask(tmp_path / f"m{crs[5:]}.tif", mask, transform=tr, crs=crs)
        with dask.config.set(scheduler="synchronous"):
            vectorize(str(p), str(tmp_path / crs[5:]), formats=["gpkg", "geojson"], project=False)
        df = pyogrio.read_dataframe(tmp_path / crs[5:] / "geoseg.gpkg", layer="building")
        gj = pyogrio.read_dataframe(tmp_path / crs[5:] / "vectors" / "building.geojson")
        true_area = abs(geod.geometry_area_perimeter(gj.geometry.iloc[0])[0])
        assert df.crs.to_string() == crs
        assert math.isclose(df["area_m2"].iloc[0], true_area, rel_tol=2e-3), (crs, df["area_m2"].iloc[0], true_area)


def test_reprojected_outputs(scene, tmp_path: Path) -> None:
    path, _ = scene
    with dask.config.set(scheduler="threads"):
        vectorize(str(path), str(tmp_path), formats=["gpkg", "fgb"], crs="EPSG:3035", chunk=64, project=False)
    df = pyogrio.read_dataframe(tmp_path / "geoseg.gpkg", layer="building")
    assert df.crs.to_epsg() == 3035 and df.geometry.is_valid.all()
    native = pyogrio.read_dataframe(tmp_path / "vectors" / "building.fgb")
    assert native.crs.to_epsg() == 3035
    # areas stay metric and equal to the exact pixel areas (computed in the metric native CRS)
    assert np.allclose(df["area_m2"], df["area_px"] * 4.0)
    assert np.allclose(df.geometry.area, df["area_m2"], rtol=2e-3)


def test_errors_and_overwrite(scene, tmp_path: Path) -> None:
    path, _ = scene
    with dask.config.set(scheduler="synchronous"):
        vectorize(str(path), str(tmp_path), formats=["gpkg"], chunk=64, project=False)
        with pytest.raises(OutputExistsError, match="overwrite=True"):
            vectorize(str(path), str(tmp_path), formats=["gpkg"], chunk=64, project=False)
        with pytest.raises(InputError, match="unknown class 'trees'"):
            vectorize(str(path), str(tmp_path / "x"), classes=["trees"])
        with pytest.raises(InputError, match="unknown vector format"):
            vectorize(str(path), str(tmp_path / "x"), formats=["shp"])
    rgb = tmp_path / "rgb.tif"
    with rasterio.open(rgb, "w", driver="GTiff", width=8, height=8, count=3, dtype="uint8") as ds:
        ds.write(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(InputError, match="one uint8 band"):
        vectorize(str(rgb), str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not list(tmp_path.glob(".geoseg-vstaging-*"))


def _angles(poly) -> np.ndarray:
    xy = np.asarray(poly.exterior.coords)[:-1]
    a = np.roll(xy, 1, axis=0) - xy
    b = np.roll(xy, -1, axis=0) - xy
    cos = (a * b).sum(1) / np.hypot(*a.T) / np.hypot(*b.T)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def test_regularized_buildings_have_right_angles(tmp_path: Path) -> None:
    from shapely import affinity

    truth_px = affinity.rotate(shapely.Polygon([(0, 0), (40, 0), (40, 16), (18, 16), (18, 30), (0, 30)]), 30, origin=(0, 0))
    truth_px = affinity.translate(truth_px, 60, 30)
    mask = features.rasterize([(truth_px, 1)], out_shape=(128, 128), dtype="uint8")
    path = write_mask(tmp_path / "m.tif", mask)
    with dask.config.set(scheduler="synchronous"):
        vectorize(str(path), str(tmp_path / "raw"), formats=["gpkg"], chunk=64, project=False)
        vectorize(str(path), str(tmp_path / "reg"), formats=["gpkg"], chunk=64, project=False, regularize=True)
    raw = pyogrio.read_dataframe(tmp_path / "raw" / "geoseg.gpkg", layer="building").geometry.iloc[0]
    reg = pyogrio.read_dataframe(tmp_path / "reg" / "geoseg.gpkg", layer="building").geometry.iloc[0]
    truth = shapely.transform(truth_px, lambda xy: np.column_stack([ORIGIN.c + 2 * xy[:, 0], ORIGIN.f - 2 * xy[:, 1]]))
    assert reg.is_valid and len(reg.exterior.coords) - 1 == 6  # an L: six corners
    assert np.all(np.abs(_angles(reg) - 90) < 1.0)
    iou = lambda a, b: a.intersection(b).area / a.union(b).area  # noqa: E731
    assert iou(reg, truth) > 0.9 and iou(reg, truth) >= iou(raw, truth) - 0.02
    assert len(raw.exterior.coords) > 30  # the pixel staircase it replaces


def test_reprojection_densifies_long_edges() -> None:
    from geoseg.vector.geometry import reproject

    square = np.array([shapely.box(500000, 5900000, 520000, 5920000)])  # 20 km, UTM 32N
    plain = reproject(square, UTM, "EPSG:4326")
    dense = reproject(square, UTM, "EPSG:4326", densify=500)
    assert shapely.get_num_coordinates(plain)[0] == 5 and shapely.get_num_coordinates(dense)[0] > 100
    # the densified outline follows the true (curved) image of the edge: its midpoints map back onto the edge
    back = reproject(dense, "EPSG:4326", UTM)
    assert shapely.hausdorff_distance(back[0], square[0]) < 1e-3
    assert shapely.hausdorff_distance(reproject(plain, "EPSG:4326", UTM, densify=1e-3)[0], square[0]) > 0.01
    assert dense[0].exterior.is_ccw and shapely.is_valid(dense).all()


# --- regressions found in review ----------------------------------------------------------------


def test_simplify_never_grows_into_nodata() -> None:
    rng = np.random.default_rng(5)
    from scipy import ndimage

    mask = (ndimage.uniform_filter(rng.random((64, 64)), 7) * 6).astype(np.uint8) % 3
    mask[rng.random((64, 64)) < 0.08] = 255
    mask[20:30, :] = 255
    got = chunked(mask, 16, 4, simplify=1.5)
    valid = int((mask != 255).sum())
    assert shapely.is_valid(got.geometry).all()
    assert math.isclose(shapely.area(got.geometry).sum(), valid, rel_tol=1e-12)
    assert math.isclose(shapely.area(shapely.union_all(got.geometry)), valid, rel_tol=1e-12)
    nodata = shapely.union_all([shapely.box(c, r, c + 1, r + 1) for r, c in zip(*np.nonzero(mask == 255), strict=True)])
    assert shapely.area(shapely.intersection(shapely.union_all(got.geometry), nodata)) < 1e-9


def test_layer_names_are_unique_ignoring_case(tmp_path: Path) -> None:
    classes = [
        {"id": 1, "name": "water body", "color": [0, 0, 255]},
        {"id": 2, "name": "water_body", "color": [0, 0, 200]},
        {"id": 3, "name": "Forest", "color": [0, 255, 0]},
        {"id": 4, "name": "forest", "color": [0, 200, 0]},
    ]
    mask = np.zeros((32, 32), np.uint8)
    for k in range(1, 5):
        mask[2 + 7 * (k - 1) : 6 + 7 * (k - 1), 2:6] = k
    p = write_mask(tmp_path / "m.tif", mask, classes=classes)
    with dask.config.set(scheduler="synchronous"):
        report = vectorize(str(p), str(tmp_path / "o"), formats=["gpkg", "geojson"], project=False)
    names = [ly["name"] for ly in report["layers"]]
    assert len({n.lower() for n in names}) == 4
    for ly in report["layers"]:
        assert ly["features"] == 1
        df = pyogrio.read_dataframe(tmp_path / "o" / "geoseg.gpkg", layer=ly["name"])
        assert len(df) == 1 and df["class_id"].iloc[0] == ly["class_id"]


@pytest.mark.parametrize("metadata", ["none", "colormap"])
def test_masks_without_class_names_get_layers_for_values_present(tmp_path: Path, metadata: str) -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[4:8, 4:8] = 1
    mask[10:20, 10:20] = 7
    p = write_mask(tmp_path / "m.tif", mask, classes=None)
    if metadata == "colormap":
        with rasterio.open(p, "r+") as ds:
            ds.write_colormap(1, {0: (0, 0, 0, 255), 1: (255, 0, 0, 255), 7: (0, 0, 255, 255)})
    with dask.config.set(scheduler="synchronous"):
        default = vectorize(str(p), str(tmp_path / "d"), formats=["gpkg"], project=False)
        every = vectorize(str(p), str(tmp_path / "a"), formats=["gpkg"], project=False, classes=["all"])
    assert [ly["name"] for ly in default["layers"]] == ["class_1", "class_7"]
    assert [ly["name"] for ly in every["layers"]] == ["class_0", "class_1", "class_7"]
    if metadata == "colormap":
        assert default["layers"][1]["color"] == [0, 0, 255]


@pytest.mark.parametrize(
    ("crs", "transform"),
    [
        ("EPSG:4326", Affine(0.1, 0, -10.0, 0, -0.1, 70.0)),  # 20 x 20 degrees
        ("EPSG:4087", Affine(20.0, 0, 0.0, 0, -20.0, 6_700_000.0)),  # plate carree at 60 N: 2x areas
        ("EPSG:4326", Affine(1e-4, 0, 20.0, 0, -1e-4, 86.0)),  # beyond 84 N: UPS
    ],
)
def test_areas_and_lengths_are_true_metres(tmp_path: Path, crs: str, transform) -> None:
    from pyproj import Geod

    mask = np.zeros((200, 200), np.uint8)
    for r, c in ((5, 5), (5, 170), (170, 5), (170, 170), (90, 90)):
        mask[r : r + 25, c : c + 20] = 1
    p = write_mask(tmp_path / "m.tif", mask, transform=transform, crs=crs)
    with dask.config.set(scheduler="synchronous"):
        vectorize(str(p), str(tmp_path / "o"), formats=["gpkg", "geojson"], project=False, chunk=64)
    df = pyogrio.read_dataframe(tmp_path / "o" / "geoseg.gpkg", layer="building").sort_values("id")
    gj = pyogrio.read_dataframe(tmp_path / "o" / "vectors" / "building.geojson").sort_values("id")
    geod = Geod(ellps="WGS84")
    for (_, row), g in zip(df.iterrows(), gj.geometry, strict=True):
        area, perim = geod.geometry_area_perimeter(g)
        assert math.isclose(row["area_m2"], abs(area), rel_tol=3e-3), (row["area_m2"], area)
        assert math.isclose(row["perimeter_m"], perim, rel_tol=3e-3), (row["perimeter_m"], perim)


def test_a_second_writer_to_one_folder_is_refused(scene, tmp_path: Path) -> None:
    from geoseg.errors import OutputError
    from geoseg.io.outdir import output_lock

    path, _ = scene
    out = tmp_path / "shared"
    with output_lock(str(out)):  # another run holds the folder
        with pytest.raises(OutputError, match="another geoseg process is writing"):
            vectorize(str(path), str(out), formats=["gpkg"], chunk=64, project=False)
    assert not (out / "geoseg.gpkg").exists() and not list(out.glob(".geoseg-vstaging-*"))
    with dask.config.set(scheduler="synchronous"):
        vectorize(str(path), str(out), formats=["gpkg"], chunk=64, project=False)  # free again
    assert (out / "geoseg.gpkg").exists()


def test_stale_staging_is_swept_but_live_is_kept(tmp_path: Path) -> None:
    from geoseg.io.outdir import make_staging, sweep_staging

    live = make_staging(str(tmp_path), ".geoseg-vstaging-", "x")
    dead = make_staging(str(tmp_path), ".geoseg-vstaging-", "y")
    owner = json.loads((Path(dead) / "owner.json").read_text())
    (Path(dead) / "owner.json").write_text(json.dumps({**owner, "pid": 2**22 + 12345}))  # no such process
    sweep_staging(str(tmp_path), ".geoseg-vstaging-")
    assert Path(live).exists() and not Path(dead).exists()


def test_overwrite_removes_outputs_of_the_previous_run(scene, tmp_path: Path) -> None:
    path, _ = scene
    with dask.config.set(scheduler="synchronous"):
        vectorize(str(path), str(tmp_path), formats=["geojson", "fgb"], chunk=64, project=False)
        assert (tmp_path / "vectors" / "water.fgb").exists()
        vectorize(str(path), str(tmp_path), formats=["geojson"], classes=["building"], chunk=64, project=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "vectors").iterdir()) == ["building.geojson"]
    assert json.loads((tmp_path / "vectors.json").read_text())["outputs"] == {"geojson": ["vectors/building.geojson"]}


def test_pixel_space_min_area_counts_pixels(tmp_path: Path) -> None:
    mask = np.zeros((40, 40), np.uint8)
    mask[2:5, 2:5] = 1  # 9 px
    mask[10:20, 10:20] = 1  # 100 px
    p = write_mask(tmp_path / "m.tif", mask, transform=Affine(10, 0, 0, 0, -10, 0), crs=None)
    with pytest.warns(Warning, match="not georeferenced"), dask.config.set(scheduler="synchronous"):
        vectorize(str(p), str(tmp_path / "o"), formats=["gpkg"], project=False, min_area=50)
    df = pyogrio.read_dataframe(tmp_path / "o" / "geoseg.gpkg", layer="building")
    assert list(df["area_px"]) == [100] and df["area_m2"].isna().all()


def test_too_coarse_geojson_precision_is_an_error(scene, tmp_path: Path) -> None:
    path, _ = scene
    with pytest.raises(InputError, match="use precision=6"):
        vectorize(str(path), str(tmp_path), formats=["geojson"], precision=3)
    assert not (tmp_path / "vectors").exists()


def test_object_kinds() -> None:
    from geoseg.classes import object_kind

    assert [object_kind(n) for n in ("oil_tanker", "storage_tank", "Ship", "building", "forest_loss")] == [
        "ship",
        "tank",
        "ship",
        "building",
        "area",
    ]
    # whole words, not substrings: a scar (burn scar, landslide scar) is an area, not a car
    assert [object_kind(n) for n in ("scar", "burn_scar", "carpark", "car", "parked_cars", "TreeCrowns")] == [
        "area",
        "area",
        "area",
        "object",
        "object",
        "object",
    ]
    # the card's kind wins: an "area" class is hectares whatever its name; an "object" class the name does not
    # place is a plain object
    assert object_kind("ship", "area") == "area" and object_kind("solar_panel", "object") == "object"
    assert object_kind("vessel", "object") == "ship" and object_kind("solar_panel") == "area"


def test_card_class_kind_reaches_the_layers(tmp_path: Path) -> None:
    """A card's class ``kind`` travels with the mask (GEOSEG_CLASSES) and decides the layer's kind."""
    import torch

    import geoseg
    from geoseg.models.card import card_from_dict

    src = tmp_path / "s.tif"
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 1, "dtype": "float32", "crs": "EPSG:32633"}
    with rasterio.open(src, "w", transform=Affine(1, 0, 500000, 0, -1, 4000000), **profile) as ds:
        a = np.zeros((64, 64), np.float32)
        a[10:30, 10:30] = 1
        ds.write(a, 1)

    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.cat([1 - x, x], 1) * 10

    classes = [{"id": 0, "name": "background"}, {"id": 1, "name": "solar_panel", "kind": "object"}]
    card = card_from_dict({"name": "panels", "size_multiple": 1, "classes": classes}, "c")
    with dask.config.set(scheduler="synchronous"):
        geoseg.write(geoseg.predict(str(src), Net(), card=card), str(tmp_path / "o"))
        report = vectorize(str(tmp_path / "o" / "mask.tif"), str(tmp_path / "v"), formats=["geojson"], project=False)
    assert [(ly["name"], ly["kind"]) for ly in report["layers"]] == [("solar_panel", "object")]  # by name: an area


def test_value_field_writes_one_layer_equal_to_whole_raster_by_value(tmp_path: Path) -> None:
    """``field="value"`` (a loss-year raster, no class names): one layer, the value as an attribute, seams merged exactly."""
    rng = np.random.default_rng(17)
    mask = np.zeros((96, 96), np.uint8)
    for value in (1, 5, 23):  # blobs of a few values, many cut by the 32 px chunk seams, some touching each other
        for _ in range(6):
            r, c = rng.integers(0, 80, 2)
            mask[r : r + rng.integers(4, 30), c : c + rng.integers(4, 30)] = value
    mask[40:50, 20:70] = 5  # one object across two seams
    mask[40:50, 70:75] = 23  # a different value beside it: never merged with it
    mask[90:, 90:] = 255  # nodata
    p = write_mask(tmp_path / "lossyear.tif", mask, classes=None, block=16)
    with dask.config.set(scheduler="threads"):
        report = vectorize(str(p), str(tmp_path / "o"), formats=["gpkg", "geojson", "fgb", "parquet"], chunk=32, field="value")
    out = tmp_path / "o"
    assert [ly["name"] for ly in report["layers"]] == ["lossyear"] and report["layers"][0]["values"] == [1, 5, 23]
    assert report["chunks"] == 9 and report["seam_objects"] > 0
    assert sorted(str(f.relative_to(out)) for f in (out / "vectors").iterdir()) == [
        f"vectors/lossyear.{ext}" for ext in ("fgb", "geojson", "parquet")
    ]
    assert sorted(set(pyogrio.list_layers(out / "geoseg.gpkg")[:, 0]) - {"layer_styles"}) == ["lossyear"]
    df = pyogrio.read_dataframe(out / "geoseg.gpkg", layer="lossyear")
    assert "class" not in df and "class_id" not in df and df["value"].dtype.kind == "i"
    assert np.allclose(df["area_ha"], df["area_px"] * 4.0 / 1e4)
    ref = reference(mask, 4, transform=ORIGIN)
    del ref[0]  # 0 is no loss: not vectorised by default, as class_0
    assert_same_polygons(ref, df.geometry.values, df["value"], tol=1e-12)
    for ext in ("fgb", "geojson"):
        assert sorted(pyogrio.read_dataframe(out / "vectors" / f"lossyear.{ext}")["value"]) == sorted(df["value"])
    with pytest.raises(InputError, match="field='area_m2'"):
        vectorize(str(p), str(tmp_path / "bad"), field="area_m2")
