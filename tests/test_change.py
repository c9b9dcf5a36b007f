"""geoseg change: aligned dates, transition codes, hectares from true pixel areas, clouds left out."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch

from geoseg.change import change, transitions
from geoseg.evaluate import evaluate
from geoseg.io.dates import raster_date


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from geoseg.sample import make_sample

    out = tmp_path_factory.mktemp("sample")
    make_sample(out, size=1024, seed=3)
    return out


def _truth_ha(sample: Path, layer: str) -> float:
    return float(gpd.read_file(sample / "labels.gpkg", layer=layer).area.sum()) / 1e4


def test_transition_names_and_dates(tmp_path: Path) -> None:
    t = transitions([(0, "other", (0, 0, 0)), (1, "forest", (0, 128, 0))], "area")
    assert [(x.code, x.name) for x in t] == [(1, "forest_gain"), (2, "forest_loss")]
    t = transitions([(0, "background", (0, 0, 0)), (1, "building", (200, 0, 0)), (2, "water", (0, 0, 200))], "objects")
    assert {x.name for x in t} >= {"new_building", "building_removed", "building_to_water", "water_removed"}
    p = tmp_path / "S2A_20230426_T29SPR.tif"
    with rasterio.open(p, "w", driver="GTiff", width=2, height=2, count=1, dtype="uint8") as ds:
        ds.write(np.zeros((1, 2, 2), np.uint8))
    assert raster_date(str(p)) == "2023-04-26"


def test_forest_loss_on_the_sample(sample: Path, tmp_path: Path) -> None:
    with dask.config.set(scheduler="threads"):
        r = change(str(sample / "scene.tif"), str(sample / "scene_after.tif"), "forest", str(tmp_path / "c"), min_area=200)
    c = r["change"]
    assert (c["before"]["date"], c["after"]["date"]) == ("2024-06-15", "2025-06-20")
    assert [x["name"] for x in c["codes"]] == ["no_change", "forest_gain", "forest_loss", "not valid on both dates"]
    # scored against the generator's truth
    ev = evaluate(str(tmp_path / "c" / "change.tif"), str(sample / "labels.gpkg"), layer="forest_loss")
    assert ev["classes"]["forest_loss"]["iou"] >= 0.85
    assert c["hectares"]["forest_loss"] == pytest.approx(_truth_ha(sample, "forest_loss"), rel=0.05)
    # the code table travels in the COG and run.json
    with rasterio.open(tmp_path / "c" / "change.tif") as ds:
        tag = json.loads(ds.tags()["GEOSEG_CLASSES"])
        assert ds.colormap(1)[2][:3] == (220, 40, 40)
    assert [x["name"] for x in tag] == ["no_change", "forest_gain", "forest_loss"]
    run = json.loads((tmp_path / "c" / "run.json").read_text())
    assert run["change"]["hectares"] == c["hectares"] and run["vectors"]["forest_loss"] >= 1
    # polygons: hectares, dates, and the minimum mapping unit
    df = pyogrio.read_dataframe(tmp_path / "c" / "geoseg.gpkg", layer="forest_loss")
    assert set(df["date_before"]) == {"2024-06-15"} and set(df["date_after"]) == {"2025-06-20"}
    assert (df["area_m2"] >= 200).all() and df["area_ha"].sum() == pytest.approx(df["area_m2"].sum() / 1e4)
    gj = json.loads((tmp_path / "c" / "vectors" / "forest_loss.geojson").read_text())
    assert "crs" not in gj and abs(gj["features"][0]["geometry"]["coordinates"][0][0][0]) < 180


def test_after_on_another_grid_gives_the_same_polygons(sample: Path, tmp_path: Path) -> None:
    """AFTER reprojected to UTM zone 33 at 2.5 m: aligned back onto BEFORE's grid inside the tasks."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    src_path = sample / "scene_after.tif"
    moved = tmp_path / "after_32633.tif"
    with rasterio.open(src_path) as src:
        transform, w, h = calculate_default_transform(src.crs, "EPSG:32633", src.width, src.height, *src.bounds, resolution=2.5)
        prof = src.profile | {"crs": "EPSG:32633", "transform": transform, "width": w, "height": h}
        with rasterio.open(moved, "w", **prof) as dst:
            for b in range(1, 5):
                reproject(rasterio.band(src, b), rasterio.band(dst, b), resampling=Resampling.bilinear, dst_nodata=0)
            dst.descriptions = src.descriptions
            dst.update_tags(**src.tags())
    with dask.config.set(scheduler="threads"):
        a = change(str(sample / "scene.tif"), str(src_path), "forest", str(tmp_path / "a"), min_area=200)
        b = change(str(sample / "scene.tif"), str(moved), "forest", str(tmp_path / "b"), min_area=200)
    assert b["change"]["after"]["aligned"] and not a["change"]["after"]["aligned"]
    ga = shapely.union_all(pyogrio.read_dataframe(tmp_path / "a" / "geoseg.gpkg", layer="forest_loss").geometry.values)
    gb = shapely.union_all(pyogrio.read_dataframe(tmp_path / "b" / "geoseg.gpkg", layer="forest_loss").geometry.values)
    # documented tolerance: two resamplings (2 m -> 2.5 m -> 2 m) move edges by about a pixel
    assert ga.symmetric_difference(gb).area / ga.union(gb).area < 0.06
    assert b["change"]["hectares"]["forest_loss"] == pytest.approx(a["change"]["hectares"]["forest_loss"], rel=0.03)


class _Clouds(torch.nn.Module):
    """A stand-in cloud model: class 1 (cloud) where the blue band is very bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cloud = (x[:, 0:1] > 5000).float()
        return torch.cat([1 - cloud, cloud], 1) * 10


def test_clouds_never_count_as_loss(sample: Path, tmp_path: Path) -> None:
    after = tmp_path / "cloudy.tif"
    with rasterio.open(sample / "scene_after.tif") as src:
        data = src.read()
        prof, desc, tags = src.profile, src.descriptions, src.tags()
    truth = gpd.read_file(sample / "labels.gpkg", layer="forest_loss").geometry.values[0]
    with rasterio.open(sample / "scene.tif") as src:
        r0, c0 = (int(v) for v in rasterio.transform.rowcol(src.transform, *shapely.get_coordinates(truth.centroid)[0]))
    data[:, r0 - 60 : r0 + 60, c0 - 60 : c0 + 60] = 9000  # a bright cloud over the clear-cut
    with rasterio.open(after, "w", **prof) as dst:
        dst.write(data)
        dst.descriptions = desc
        dst.update_tags(**tags)
    model = tmp_path / "clouds.pt"
    card = {"name": "fake_clouds", "classes": [{"id": 0, "name": "clear"}, {"id": 1, "name": "cloud"}],
            "bands": ["blue"], "activation": "softmax"}  # fmt: skip
    torch.jit.save(torch.jit.script(_Clouds()), str(model), _extra_files={"geoseg_card.json": json.dumps(card)})
    with dask.config.set(scheduler="threads"):
        plain = change(str(sample / "scene.tif"), str(after), "forest", str(tmp_path / "p"))
        masked = change(str(sample / "scene.tif"), str(after), "forest", str(tmp_path / "m"), mask_model=str(model))
    with rasterio.open(tmp_path / "m" / "change.tif") as ds:
        code = ds.read(1)
    assert (code[r0 - 60 : r0 + 60, c0 - 60 : c0 + 60] == 255).all()  # unusable, not loss
    cloud_ha = 120 * 120 * 4 / 1e4
    assert masked["change"]["valid_hectares"] == pytest.approx(plain["change"]["valid_hectares"] - cloud_ha, rel=0.01)
    assert masked["change"]["hectares"]["forest_loss"] < plain["change"]["hectares"]["forest_loss"]


def test_pucallpa_landsat_loss_hectares_match_an_equal_area_count(shared_data: Path, tmp_path: Path) -> None:
    """Real Landsat composites in EPSG:4326 (bands SWIR1, NIR, Red, Green): 2000 vs 2020."""
    from pyproj import Transformer

    d = shared_data / "geo" / "landsat_pucallpa_forest"
    with dask.config.set(scheduler="threads"):
        r = change(
            str(d / "pucallpa_landsat_2000.tif"),
            str(d / "pucallpa_landsat_2020.tif"),
            "forest",
            str(tmp_path / "p"),
            bands_before="nir=2,red=3",
            bands_after="nir=2,red=3",
        )
    assert (r["change"]["before"]["date"], r["change"]["after"]["date"]) == ("2000", "2020")
    with rasterio.open(tmp_path / "p" / "change.tif") as ds:
        code, t = ds.read(1), ds.transform
    loss = next(x["code"] for x in r["change"]["codes"] if x["name"] == "forest_loss")
    rows, cols = np.nonzero(code == loss)
    assert len(rows) > 1000
    # independent: every loss pixel as a polygon in a Lambert equal-area projection centred on the scene
    lon0, lat0 = t * (code.shape[1] / 2, code.shape[0] / 2)
    laea = Transformer.from_crs("EPSG:4326", f"+proj=laea +lat_0={lat0} +lon_0={lon0} +ellps=WGS84", always_xy=True)
    xs = np.stack([t.c + t.a * (cols + dx) for dx in (0, 1, 1, 0)], 1)
    ys = np.stack([t.f + t.e * (rows + dy) for dy in (0, 0, 1, 1)], 1)
    ex, ey = laea.transform(xs, ys)
    area = 0.5 * np.abs(np.sum(ex * np.roll(ey, -1, 1) - np.roll(ex, -1, 1) * ey, axis=1))
    assert r["change"]["hectares"]["forest_loss"] == pytest.approx(area.sum() / 1e4, rel=0.005)
    print("Pucallpa forest loss 2000-2020:", r["change"]["hectares"]["forest_loss"], "ha")


def test_change_command_line(sample: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "geoseg", "change", str(sample / "scene.tif"), str(sample / "scene_after.tif")]
    proc = subprocess.run([*cmd, "--model", "forest", "--out", str(out), "--min-area", "200", "--scheduler", "threads"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "forest_loss" in proc.stdout and "hectares" in proc.stdout
    assert (out / "change.tif").exists() and (out / "before" / "mask.tif").exists()
    again = subprocess.run([*cmd, "--model", "forest", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "already exist" in again.stderr and "--overwrite" in again.stderr


def test_pixels_after_does_not_cover_are_not_change(sample: Path, tmp_path: Path) -> None:
    """AFTER covers only the east half (and has no nodata value): the west half is 'not valid', not loss."""
    from rasterio.windows import Window

    half = tmp_path / "east.tif"
    with rasterio.open(sample / "scene_after.tif") as src:
        w = src.width // 2
        prof = src.profile | {"width": w, "transform": src.window_transform(Window(w, 0, w, src.height)), "nodata": None}
        with rasterio.open(half, "w", **prof) as dst:
            dst.write(src.read(window=Window(w, 0, w, src.height)))
            dst.descriptions = src.descriptions
            dst.update_tags(**src.tags())
    with dask.config.set(scheduler="threads"):
        full = change(str(sample / "scene.tif"), str(sample / "scene_after.tif"), "forest", str(tmp_path / "f"))
        east = change(str(sample / "scene.tif"), str(half), "forest", str(tmp_path / "e"))
    with rasterio.open(tmp_path / "e" / "change.tif") as ds:
        code = ds.read(1)
    assert (code[:, : code.shape[1] // 2 - 1] == 255).all() and (code[:, code.shape[1] // 2 + 1 :] != 255).all()
    assert east["change"]["valid_hectares"] == pytest.approx(full["change"]["valid_hectares"] / 2, rel=0.01)
