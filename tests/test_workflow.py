"""geoseg run: workflow files validated with line numbers, the whole job, summary and quicklook."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geoseg.errors import InputError
from geoseg.workflows.spec import load_workflow

GOOD = """name: t
sample: data
aoi: data/aoi.geojson
imagery: [data/scene.tif]
models:
  - forest
  - {model: water, min_area_m2: 8}
outputs:
  folder: out
  formats: [gpkg, geojson]
scheduler: synchronous
"""


def test_workflow_paths_resolve_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "wf").mkdir()
    f = tmp_path / "wf" / "a.yaml"
    f.write_text(GOOD)
    wf = load_workflow(f)
    assert wf.imagery.files == [str(tmp_path / "wf" / "data" / "scene.tif")]
    assert wf.outputs.folder == str(tmp_path / "wf" / "out") and wf.sample == str(tmp_path / "wf" / "data")
    assert [r.model for r in wf.runs()] == ["forest", "water"] and wf.runs()[1].min_area_m2 == 8


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD.replace("scheduler: synchronous", "schedular: local"), r"a.yaml:11: schedular: unknown key"),
        (GOOD.replace("formats: [gpkg, geojson]", "formats: [gpkg, shp]"), r"a.yaml:10: outputs.formats.1: Input should be"),
        (GOOD.replace("min_area_m2: 8", "min_area_m2: -1"), r"a.yaml:7: models.1.min_area_m2: Input should be greater"),
        (GOOD.replace("imagery: [data/scene.tif]", "imagery: []"), r"a.yaml:4: imagery: .*List should have at least 1"),
        (GOOD.replace("  - forest\n", "  - water\n"), r"models: Value error, model 'water' is listed twice"),
        (GOOD.replace("name: t\n", ""), r"a.yaml: name: Field required"),
        ("name: [unclosed\n", r"a.yaml:2: not valid YAML"),
        ("- a\n- b\n", r"a workflow is a mapping"),
    ],
)
def test_workflow_errors_name_the_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "a.yaml"
    f.write_text(text)
    with pytest.raises(InputError, match=message):
        load_workflow(f)


def test_missing_workflow_and_imagery(tmp_path: Path) -> None:
    from geoseg.workflows.run import run_workflow

    with pytest.raises(InputError, match="workflow file not found"):
        load_workflow(tmp_path / "nope.yaml")
    f = tmp_path / "a.yaml"
    f.write_text(GOOD.replace("sample: data\n", ""))
    with pytest.raises(InputError, match=r"imagery .*scene.tif does not exist; fix the path"):
        run_workflow(f)
    assert not (tmp_path / "out").exists()


def test_run_generates_the_sample_and_writes_everything(tmp_path: Path) -> None:
    """The whole job on a small generated scene: masks, polygons, summary areas from the pixels, a quicklook."""
    import pyogrio

    f = tmp_path / "a.yaml"
    f.write_text(GOOD)
    # a small scene keeps the test fast (the workflow would generate the full 2048 px one)
    from geoseg.sample import make_sample

    make_sample(tmp_path / "data", size=512)
    out = tmp_path / "elsewhere"
    proc = subprocess.run(
        [sys.executable, "-m", "geoseg", "run", str(f), "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "forest" in proc.stdout and "quicklook:" in proc.stdout and "summary:" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert not (tmp_path / "out").exists()  # --out overrides the workflow's folder
    models = summary["images"][0]["models"]
    for name, cls in (("forest", "forest"), ("water", "water")):
        with rasterio.open(out / name / "mask.tif") as ds:
            mask = ds.read(1)
            px_area = abs(ds.transform.a * ds.transform.e)
        # exact pixel polygons: area = pixels x pixel area (water drops parts under 8 m2 = 2 px)
        gdf = pyogrio.read_dataframe(out / name / "geoseg.gpkg", layer=cls)
        assert models[name]["classes"][cls]["objects"] == len(gdf)
        assert models[name]["classes"][cls]["area_ha"] == pytest.approx(gdf["area_m2"].sum() / 1e4, abs=1e-3)
        # the area classes' minimum mapping unit (4 px, from the card via the mask): patches under it are speckle
        from scipy import ndimage

        sizes = np.bincount(ndimage.label(mask == 1)[0].ravel())[1:]
        kept = sizes[sizes >= 4].sum()
        assert gdf["area_px"].min() >= 4 and len(gdf) <= (sizes >= 4).sum()
        assert gdf["area_m2"].sum() == pytest.approx(kept * px_area, rel=0.002 if name == "water" else 1e-9)
        assert (out / name / "vectors" / f"{cls}.geojson").exists() and (out / name / "project.qgz").exists()
    # one project over the whole run: a group per model, each with the imagery, the mask and the polygons
    import zipfile

    assert summary["project"] == str(out / "project.qgz")
    with zipfile.ZipFile(out / "project.qgz") as z:
        qgs = z.read(next(n for n in z.namelist() if n.endswith(".qgs"))).decode()
    for name in ("forest", "water"):
        assert f'<layer-tree-group name="{summary["images"][0]["date"]} {name}"' in qgs
        assert f"./{name}/mask.tif" in qgs and f"./{name}/geoseg.gpkg" in qgs
    assert "scene.tif" in qgs  # the imagery under the masks
    from PIL import Image

    im = Image.open(out / "quicklook.png")
    left, top, w, h = map(int, im.text["geoseg:scene_box"].split(","))
    img = np.asarray(im.convert("RGB"))
    assert (w, h) == (512, 512) and img.shape[0] > top + h + 40 and img.shape[1] > left + w
    # the legend band below the scene holds the forest and water swatches in their class colours
    legend = img[top + h + 1 :].reshape(-1, 3)
    for model, cls in (("forest", "forest"), ("water", "water")):
        with rasterio.open(out / model / "mask.tif") as ds:
            meta = json.loads(ds.tags()["GEOSEG_CLASSES"])
        color = next(c["color"] for c in meta if c["name"] == cls)
        assert (np.abs(legend.astype(int) - color).sum(axis=1) == 0).sum() >= 50, cls


WATCH = """name: watch
aoi: data/aoi.geojson
imagery: {glob: data/scene*.tif}
models: [forest, {model: water, min_area_m2: 8}]
change: {model: forest, min_area_m2: 100}
outputs: {folder: out, formats: [gpkg, geojson]}
scheduler: threads
chunk: 128
"""


def _files(folder: Path) -> dict[str, bytes]:
    skip = {"ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm", "summary.json", ".geoseg-run.lock"}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from geoseg.sample import make_sample

    root = tmp_path_factory.mktemp("watch")
    make_sample(root / "data", size=512)
    return root


def test_rerun_is_a_no_op_and_a_parameter_change_redoes_only_its_unit(small: Path, tmp_path: Path) -> None:
    from geoseg.workflows.ledger import Ledger
    from geoseg.workflows.run import run_workflow

    f = small / "watch.yaml"
    f.write_text(WATCH)
    out = tmp_path / "o"
    s1 = run_workflow(f, str(out))
    assert s1["units"] == {"done": 5, "skipped": 0, "failed": 0}  # 2 dates x 2 models + 1 change pair
    assert [c["before"] for c in s1["changes"]] == ["2024-06-15"] and s1["changes"][0]["classes"]["forest_loss"]["polygons"] >= 1
    before = _files(out)
    s2 = run_workflow(f, str(out))
    assert s2["units"] == {"done": 0, "skipped": 5, "failed": 0}
    assert _files(out) == before  # not one output byte changed
    assert s2["changes"] == s1["changes"]
    # a changed parameter redoes only the units it affects
    f.write_text(WATCH.replace("min_area_m2: 8", "min_area_m2: 40"))
    s3 = run_workflow(f, str(out))
    assert s3["units"] == {"done": 2, "skipped": 3, "failed": 0}  # water on both dates
    ledger = Ledger(str(out))
    runs = ledger.runs()
    ledger.close()
    assert [(r["done"], r["skipped"]) for r in runs] == [(5, 0), (0, 5), (2, 3)]
    proc = subprocess.run([sys.executable, "-m", "geoseg", "runs", str(f), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0 and "change/forest/2024-06-15_2025-06-20" in proc.stdout and "run 3" in proc.stdout
    # the arithmetic is a parameter too: precision fast redoes water's units only, and their run.json says so
    f.write_text(WATCH.replace("min_area_m2: 8", "min_area_m2: 40, precision: fast"))
    s4 = run_workflow(f, str(out))
    assert s4["units"] == {"done": 2, "skipped": 3, "failed": 0}
    runs_json = [json.loads(p.read_text()) for p in sorted(out.rglob("water/run.json"))]
    assert len(runs_json) == 2 and all(r["parameters"]["precision"] == "fast" for r in runs_json)


def test_a_killed_run_resumes_to_the_same_outputs(small: Path, tmp_path: Path) -> None:
    """SIGKILL mid-way (after some chunk parts were written), re-run: identical to an uninterrupted run."""
    import os
    import signal
    import time

    from geoseg.io.mask import open_mask, read_mask_window

    f = small / "watch.yaml"
    many = WATCH.replace("chunk: 128", "chunk: 48").replace("models: [forest,", "models: [{model: forest, tile: 64, halo: 8},")
    f.write_text(many)  # 48 px chunks: about 80 chunks per scene
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    cmd = [sys.executable, "-m", "geoseg", "-q", "run", str(f), "--out"]
    assert subprocess.run([*cmd, str(clean)], capture_output=True, timeout=600).returncode == 0
    proc = subprocess.Popen([*cmd, str(killed)], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once the first unit has chunk parts on disk
        parts = list(killed.glob("*/forest/.geoseg-staging-*/mask/*.tif"))
        if len(parts) >= 3 or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "scene" / "forest" / "mask.tif").exists()
    assert subprocess.run([*cmd, str(killed)], capture_output=True, timeout=600).returncode == 0
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["units"]["failed"] == 0
    resumed = summary["images"][0]["models"]["forest"]["resumed_chunks"]
    assert resumed >= 3  # the killed run's finished chunks were reused, not recomputed
    for rel in (
        "scene/forest/mask.tif",
        "scene_after/forest/mask.tif",
        "scene/water/mask.tif",
        "change/forest/2024-06-15_2025-06-20/change.tif",
    ):
        a, b = open_mask(str(clean / rel)), open_mask(str(killed / rel))
        np.testing.assert_array_equal(read_mask_window(a, a.geobox.window), read_mask_window(b, b.geobox.window))
    for rel, layer in (
        ("scene/forest/geoseg.gpkg", "forest"),
        ("change/forest/2024-06-15_2025-06-20/geoseg.gpkg", "forest_loss"),
    ):
        da = pyogrio_read(clean / rel, layer)
        db = pyogrio_read(killed / rel, layer)
        assert list(da["id"]) == list(db["id"]) and all(x.equals(y) for x, y in zip(da.geometry, db.geometry, strict=True))
    from geoseg.workflows.ledger import Ledger

    ledger = Ledger(str(killed))
    runs = ledger.runs()
    ledger.close()
    assert runs[0]["status"] == "interrupted" and runs[1]["status"] == "done"


def pyogrio_read(path: Path, layer: str):
    import pyogrio

    return pyogrio.read_dataframe(path, layer=layer).sort_values("id").reset_index(drop=True)


def test_two_runs_on_one_folder_refuse(small: Path, tmp_path: Path) -> None:
    from geoseg.errors import OutputError
    from geoseg.workflows.run import run_workflow
    from geoseg.workflows.units import run_lock

    f = small / "watch.yaml"
    f.write_text(WATCH)
    with run_lock(str(tmp_path / "o")), pytest.raises(OutputError, match="another geoseg run is working on this output folder"):
        run_workflow(f, str(tmp_path / "o"))


def test_static_stac_catalog_of_single_band_assets(shared_data: Path, tmp_path: Path) -> None:
    """A STAC item with one asset per band (Sentinel-2 style) is stacked by band name and segmented."""
    import datetime

    import pystac

    d = shared_data / "geo" / "sen2ships_casablanca"
    with rasterio.open(d / "casablanca_2023-04-26_S2L2A_B02.tif") as ds:
        bbox = list(ds.bounds)
    cat = pystac.Catalog(id="casa", description="test")
    item = pystac.Item("casablanca-2023-04-26", None, bbox, datetime.datetime(2023, 4, 26), {})
    for key, band in (("B03", "green"), ("B08", "nir"), ("B04", "red")):
        asset = pystac.Asset(str(d / f"casablanca_2023-04-26_S2L2A_{key}.tif"), media_type=pystac.MediaType.GEOTIFF)
        asset.extra_fields["eo:bands"] = [{"name": key, "common_name": band}]
        asset.extra_fields["raster:bands"] = [{"scale": 1 / 65535, "offset": 0.0}]  # how the export stores reflectance
        item.add_asset(key, asset)
    cat.add_item(item)
    cat.normalize_and_save(str(tmp_path / "stac"), catalog_type=pystac.CatalogType.SELF_CONTAINED)
    f = tmp_path / "w.yaml"
    f.write_text(
        "name: s\nimagery: {stac: stac/catalog.json}\nmodels: [water]\n"
        "outputs: {folder: out, quicklook: false}\nscheduler: threads\n"
    )
    from geoseg.workflows.run import run_workflow

    s = run_workflow(f)
    entry = s["images"][0]
    assert entry["date"] == "2023-04-26" and entry["image"].endswith("casablanca-2023-04-26.vrt")
    assert entry["models"]["water"]["classes"]["water"]["area_ha"] > 100  # the Atlantic and the port basins
    # raster:bands scale/offset reach the VRT, where models that take reflectance find them
    from geoseg.io.radiometry import resolve_radiometry
    from geoseg.io.raster import open_source

    with rasterio.open(entry["image"]) as ds:
        assert ds.scales == pytest.approx((1 / 65535,) * 3) and ds.offsets == (0.0, 0.0, 0.0)
    rad = resolve_radiometry(open_source(entry["image"]))
    assert (rad.name, rad.source) == ("sentinelhub-raw16", "band scale/offset")


BANDED = """name: banded
imagery: {glob: data/scene*.tif}
models: [{model: forest, bands: "nir=4,red=3"}]
change: {model: forest}
outputs: {folder: out, formats: [gpkg]}
scheduler: synchronous
"""


@pytest.fixture(scope="module")
def undescribed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two dated 4-band scenes whose band descriptions name no band a model knows."""
    from geoseg.sample import make_sample

    root = tmp_path_factory.mktemp("banded")
    make_sample(root / "data", size=256)
    for name in ("scene.tif", "scene_after.tif"):
        with rasterio.open(root / "data" / name, "r+") as ds:
            for b in range(1, 5):
                ds.set_band_description(b, f"layer{b}")
    return root


@pytest.mark.parametrize(
    "text, key",
    [
        (BANDED.replace("{model: forest}", '{model: forest, bands: "nir=9,red=3"}'), r"change\[0\]\.bands: .*nir=9"),
        (BANDED.replace("{model: forest}", "{model: water}"), r"change\[0\]\.bands: .*needs band 'green'"),
        (BANDED.replace('"nir=4,red=3"', '"nir=4,red=x"'), r"models\[0\]\.bands: .*must be NAME=BAND"),
        (BANDED.replace('"nir=4,red=3"', '"4,3,2"'), r"models\[0\]\.bands: .*gives 3 band\(s\)"),
    ],
)
def test_workflow_band_mappings_fail_before_any_work_naming_the_yaml_key(undescribed: Path, text: str, key: str) -> None:
    from geoseg.workflows.run import run_workflow

    f = undescribed / "bad.yaml"
    f.write_text(text)
    with pytest.raises(InputError, match=key) as err:
        run_workflow(f, str(undescribed / "bad_out"))
    assert not any(api in str(err.value) for api in ("--bands", "bands=", "band_map"))  # the YAML key, not a flag or keyword
    assert not (undescribed / "bad_out").exists()  # nothing segmented, no folder made


def test_workflow_change_inherits_the_models_band_mapping(undescribed: Path) -> None:
    from geoseg.workflows.run import run_workflow

    f = undescribed / "banded.yaml"
    f.write_text(BANDED)
    lines: list[str] = []
    summary = run_workflow(f, echo=lines.append)
    assert summary["units"] == {"done": 3, "skipped": 0, "failed": 0}
    assert summary["changes"][0]["model"] == "forest"
    record = json.loads((undescribed / "out" / "change" / "forest" / "2024-06-15_2025-06-20" / "run.json").read_text())
    assert record["change"]["valid_hectares"] > 0
    # the log line gives hectares rounded for people (run.json keeps them whole)
    (line,) = [x for x in lines if x.startswith("change/forest/")]
    assert re.fullmatch(r"change/forest/\S+: forest_gain [\d,]+\.\d\d ha, forest_loss [\d,]+\.\d\d ha \(.* s\)", line), line


def test_hectares_are_rounded_where_people_read_them() -> None:
    from geoseg.change import format_change
    from geoseg.workflows.summary import format_summary
    from geoseg.workflows.units import found_text

    classes = {"forest_loss": {"hectares": 10489.9456, "polygons": 3}, "forest_gain": {"hectares": 0.0004, "polygons": 0}}
    assert found_text({"classes": classes}) == "forest_loss 10,489.95 ha, forest_gain 0.00 ha"
    assert found_text({"classes": {"building": {"objects": 12, "area_ha": 1.23456}}}) == "building 12"
    change = {"before": {"date": "2024-06-15"}, "after": {"date": "2025-06-20"}, "model": "forest"}
    change |= {"hectares": {"forest_loss": 10489.9456}, "valid_hectares": 123456.78901}
    text = format_change({"change": change, "vectors": {"forest_loss": 3}})
    assert "10,489.95" in text and "123,456.79" in text and "10489.9456" not in text
    summary = {"images": [], "changes": [{"before": "a", "after": "b", "model": "forest", "folder": "f", "classes": classes}]}
    text = format_summary(summary | {"out": "o", "seconds": 1.0, "units": {}})
    assert "10,489.95 ha" in text and "10489.9456" not in text


def _geo_raster(path: Path, data: np.ndarray, transform, crs: str, **kw) -> Path:
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype.name)
    with rasterio.open(path, "w", **profile, transform=transform, crs=crs, **kw) as ds:
        ds.write(data)
    return path


@pytest.mark.parametrize("crs, origin, pixel", [("EPSG:4326", (10.0, 0.5), 0.001), ("EPSG:32632", (560000.0, 5935000.0), 2.0)])
def test_quicklook_frames_the_scene_with_legend_scale_bar_and_coordinates(tmp_path: Path, crs, origin, pixel) -> None:
    """The scene is drawn whole (nothing over it); legend, scale bar and coordinates sit around it."""
    from PIL import Image
    from rasterio.transform import from_origin

    from geoseg.workflows.quicklook import Overlay, quicklook, scale_bar

    # a scene of 0 and 255 only renders exactly (the 2-98 % stretch of it is the identity)
    rng = np.random.default_rng(0)
    data = (rng.random((3, 150, 200)) > 0.5).astype(np.uint8) * 255
    transform = from_origin(*origin, pixel, pixel)
    scene = _geo_raster(tmp_path / "scene.tif", data, transform, crs)
    mask = np.zeros((1, 150, 200), np.uint8)
    mask[0, 40:80, 60:120] = 1
    color = [230, 25, 75]
    classes = [{"id": 0, "name": "background", "color": [0, 0, 0]}, {"id": 1, "name": "building", "color": color}]
    _geo_raster(tmp_path / "mask.tif", mask, transform, crs, nodata=255)
    with rasterio.open(tmp_path / "mask.tif", "r+") as ds:
        ds.update_tags(GEOSEG_CLASSES=json.dumps(classes))
    png = quicklook(str(scene), [Overlay(str(tmp_path / "mask.tif"), "")], str(tmp_path / "q.png"), title="t", max_side=100)
    im = Image.open(png)
    left, top, w, h = map(int, im.text["geoseg:scene_box"].split(","))
    assert (w, h) == (100, 75) and im.text["geoseg:scene_step"] == "2"
    img = np.asarray(im.convert("RGB")).astype(int)
    expected = data[:, ::2, ::2].transpose(1, 2, 0).astype(int)
    scene_px = img[top : top + h, left : left + w]
    outside = np.ones((h, w), bool)
    outside[19:41, 29:61] = False  # the class (rows 20-39, cols 30-59 of the image) and its outline
    assert np.array_equal(scene_px[outside], expected[outside])  # no legend, text or bar over the scene
    assert (scene_px[~outside] == color).all(axis=1).any()  # the class outline is drawn
    # the PNG is larger than the scene: coordinate labels left and below, the legend band below them
    assert left >= 30 and im.height >= top + h + 3 * 16
    band = img[top + h + 1 :]
    assert (band == color).all(axis=2).sum() >= 80  # the class swatch is in the band
    assert (band == 0).all(axis=2).sum() >= 100  # the text, ticks and the scale bar's black half
    # the scale bar: a round distance, true ground metres (geodesic in degrees: 0.001 deg = 111.3 m at the equator)
    px, label = scale_bar(_geobox(scene), 2, w)
    per_px = 2 * (111_319.5 * pixel if crs == "EPSG:4326" else pixel)
    value, unit = label.split()
    assert float(value) * (1000 if unit == "km" else 1) == pytest.approx(px * per_px, abs=0.6 * per_px)  # to a pixel
    assert px <= 0.3 * w and float(value) in (1, 2, 5, 10, 20, 50, 100, 200, 500)


def _geobox(path: Path):
    from geoseg.io.raster import open_source

    return open_source(str(path)).geobox


DETECT = """name: det
imagery: [scene.tif]
models:
  - {model: det.onnx}
  - seg.onnx
outputs: {folder: out, formats: [gpkg, geojson], quicklook: true}
scheduler: synchronous
chunk: 64
"""


def test_a_detector_in_a_workflow_runs_reruns_and_takes_conf(tmp_path: Path) -> None:
    """A detector's unit (layers, no mask) beside a segmentor's: project, collection and summary written, reruns
    skip, and conf changes only its unit; the units without conf/iou/threshold hash as before those keys existed.
    """
    import zipfile

    import pystac

    from geoseg.workflows.run import run_workflow
    from geoseg.workflows.units import segment_options
    from tests.test_detector import DET_META, detector_onnx, scene, segmentor_onnx

    detector_onnx(tmp_path / "det.onnx", "yolov5", {**DET_META, "det_type": "YOLO_v5_or_v7_default"})
    segmentor_onnx(tmp_path / "seg.onnx", 1, {})
    scene(tmp_path / "scene.tif")
    f = tmp_path / "det.yaml"
    f.write_text(DETECT)
    s1 = run_workflow(f)
    out = tmp_path / "out"
    assert s1["units"] == {"done": 2, "skipped": 0, "failed": 0}
    det = s1["images"][0]["models"]["det.onnx"]
    assert {k: v["objects"] for k, v in det["classes"].items()} == {"car": 2, "tree": 2}  # the card's conf (0.3)
    assert not (out / "det" / "mask.tif").exists() and (out / "seg" / "mask.tif").exists()
    with zipfile.ZipFile(out / "project.qgz") as z:
        qgs = z.read(z.namelist()[0]).decode()
    assert qgs.count('name="Class mask"') == 1 and "./det/geoseg.gpkg|layername=car" in qgs  # the segmentor's mask only
    collection = pystac.Collection.from_file(str(out / "collection.json"))
    items = {it.id: it for it in collection.get_items()}
    assert len(items) == 2 and (out / "summary.json").exists()
    det_item = next(it for it in items.values() if it.get_self_href().endswith("/det/item.json"))
    assert det_item.properties["label:tasks"] == ["detection"] and "mask" not in det_item.assets
    before = _files(out)
    s2 = run_workflow(f)
    assert s2["units"] == {"done": 0, "skipped": 2, "failed": 0} and _files(out) == before
    f.write_text(DETECT.replace("{model: det.onnx}", "{model: det.onnx, conf: 0.1}"))
    s3 = run_workflow(f)
    assert s3["units"] == {"done": 1, "skipped": 1, "failed": 0}  # the segmentor's unit: as before
    det = s3["images"][0]["models"]["det.onnx"]
    assert {k: v["objects"] for k, v in det["classes"].items()} == {"car": 3, "tree": 2}  # the faint square too
    # keys given only: the option dict (what the ledger hashes) of a unit without them is as it always was
    wf = load_workflow(f)
    plain, cut = wf.runs()[1], wf.runs()[0]
    assert not {"conf", "iou", "threshold"} & set(segment_options(wf, plain, (None, None))["predict"])
    assert segment_options(wf, cut, (None, None))["predict"]["conf"] == 0.1


@pytest.mark.parametrize(
    "text, message",
    [
        (DETECT.replace("det.onnx}", "det.onnx, threshold: 0.5}"), r"models\[0\].threshold: det.onnx is a detector; give conf"),
        (DETECT.replace("  - seg.onnx", "  - {model: seg.onnx, iou: 0.5}"), r"models\[1\].iou: seg.onnx is a segmentation model"),
        (DETECT.replace("det.onnx}", "det.onnx, conf: 1.5}"), r"det.yaml:4: models.0.conf: Input should be less than"),
        (DETECT.replace("chunk: 64", "chunk: 64\nchange: [{model: det.onnx}]"), r"change: det.onnx: a detector gives boxes"),
    ],
)
def test_workflow_cut_keys_are_checked_before_any_work(tmp_path: Path, text: str, message: str) -> None:
    from geoseg.workflows.run import run_workflow
    from tests.test_detector import DET_META, detector_onnx, scene, segmentor_onnx

    detector_onnx(tmp_path / "det.onnx", "yolov5", {**DET_META, "det_type": "YOLO_v5_or_v7_default"})
    segmentor_onnx(tmp_path / "seg.onnx", 1, {})
    scene(tmp_path / "scene.tif")
    scene(tmp_path / "scene2.tif")
    f = tmp_path / "det.yaml"
    f.write_text(text.replace("imagery: [scene.tif]", "imagery: [scene.tif, scene2.tif]") if "change" in text else text)
    with pytest.raises(InputError, match=message):
        run_workflow(f)
    assert not (tmp_path / "out").exists()
