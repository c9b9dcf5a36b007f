"""Outputs read at a glance (issue 17, items 1-2): masks that name their classes, transparent
background, probabilities with scale/offset, GeoPackage 1.3, and QGIS projects over the imagery,
checked by rendering them with QGIS itself.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import zipfile
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from rio_cogeo.cogeo import cog_validate

import geoseg
from geoseg.io.mask import MaskClass
from geoseg.io.styles import mask_aux_xml, mask_colormap, mask_qml, true_colour, write_mask_sidecars
from geoseg.vector.project import write_run_project
from tests.conftest import conv_net
from tests.test_qgis import SYSTEM_PYTHON, _qgis_env, needs_qgis

RENDER_SCRIPT = Path(__file__).with_name("qgis_render.py")
UTM = "EPSG:32632"
RES = 2.0
ORIGIN = Affine(RES, 0.0, 560000.0, 0.0, -RES, 5935000.0)
H, W = 96, 128
SCALE = 4  # rendered pixels per mask pixel
CLASSES = [
    MaskClass(0, "background", (0, 0, 0)),
    MaskClass(1, "building", (230, 25, 75)),
    MaskClass(2, "water", (0, 130, 200)),
]
BUILDING = (slice(20, 50), slice(20, 60))
WATER = (slice(55, 85), slice(70, 120))
GPKG_APPLICATION_ID = 0x47504B47  # "GPKG"


def _imagery_bands() -> dict[str, np.ndarray]:
    """Smooth true-colour bands (neighbouring pixels alike, so resampling barely matters)."""
    yy, xx = np.mgrid[:H, :W].astype(np.float64)
    return {
        "red": 40 + xx * 1.5,
        "green": 60 + yy * 1.5,
        "blue": 120 + 50 * np.sin(xx / 9.0) * np.cos(yy / 13.0),
    }


def _write_imagery(path: Path) -> Path:
    """An RGB scene stored blue, green, red: only the band names say which is which."""
    bands = _imagery_bands()
    profile = dict(driver="GTiff", width=W, height=H, count=3, dtype="uint8", crs=UTM, transform=ORIGIN)
    with rasterio.open(path, "w", **profile) as ds:
        for k, name in enumerate(("blue", "green", "red"), start=1):
            ds.write(np.round(bands[name]).astype(np.uint8), k)
            ds.set_band_description(k, name)
    return path


def _write_mask(path: Path) -> Path:
    data = np.zeros((H, W), np.uint8)
    data[BUILDING] = 1
    data[WATER] = 2
    data[:6, :] = 255
    profile = dict(driver="GTiff", width=W, height=H, count=1, dtype="uint8", nodata=255, crs=UTM, transform=ORIGIN)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data, 1)
        ds.write_colormap(1, mask_colormap(CLASSES))
        ds.update_tags(GEOSEG_CLASSES=json.dumps([{"id": c.id, "name": c.name, "color": list(c.color)} for c in CLASSES]))
    write_mask_sidecars(str(path), CLASSES)  # as engine.write does beside every mask
    return path


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A predict-like folder (imagery elsewhere, mask + sidecars + run.json) vectorised by ``geoseg vectorize``."""
    from click.testing import CliRunner

    from geoseg.cli import main

    base = tmp_path_factory.mktemp("readable")
    image = _write_imagery(base / "scene.tif")
    out = base / "run"
    out.mkdir()
    _write_mask(out / "mask.tif")
    (out / "run.json").write_text(json.dumps({"geoseg_run": 1, "input": {"path": str(image)}}))
    res = CliRunner().invoke(main, ["vectorize", str(out / "mask.tif"), "--out", str(out), "--scheduler", "synchronous"])
    assert res.exit_code == 0, res.output
    return out


def _qgs(path: Path) -> ET.Element:
    with zipfile.ZipFile(path) as zf:
        return ET.fromstring(zf.read(zf.namelist()[0]))


# ---------------------------------------------------------------- without QGIS


def test_mask_colormap_makes_background_and_nodata_transparent() -> None:
    cmap = mask_colormap([*CLASSES, MaskClass(3, "Other", (9, 9, 9)), MaskClass(4, "no_change", None)])
    assert cmap[0] == (0, 0, 0, 0) and cmap[3] == (9, 9, 9, 0) and cmap[4] == (128, 128, 128, 0)
    assert cmap[1] == (230, 25, 75, 255) and cmap[2] == (0, 130, 200, 255)
    assert cmap[255] == (0, 0, 0, 0)
    assert mask_colormap([]) is None


def test_mask_qml_names_classes_and_hides_background() -> None:
    root = ET.fromstring(mask_qml(CLASSES))
    renderer = root.find("pipe/rasterrenderer")
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = [(e.get("value"), e.get("color"), e.get("alpha"), e.get("label")) for e in renderer.iter("paletteEntry")]
    assert entries == [("0", "#000000", "0", "Background"), ("1", "#e6194b", "255", "Building"), ("2", "#0082c8", "255", "Water")]
    assert root.find("pipe/rasterresampler") is not None  # nearest neighbour: no blended class ids


def test_aux_xml_holds_category_names_and_attribute_table() -> None:
    root = ET.fromstring(mask_aux_xml([CLASSES[0], CLASSES[2]]))  # a gap: value 1 has no class
    band = root.find("PAMRasterBand")
    assert [c.text or "" for c in band.findall("CategoryNames/Category")] == ["background", "", "water"]
    rat = band.find("GDALRasterAttributeTable")
    assert [f.findtext("Name") for f in rat.findall("FieldDefn")] == ["value", "class", "red", "green", "blue", "alpha"]
    rows = [[f.text for f in row.findall("F")] for row in rat.findall("Row")]
    assert rows == [["0", "background", "0", "0", "0", "0"], ["2", "water", "0", "130", "200", "255"]]


def test_true_colour_picks_bands_by_name_and_stretches(tmp_path: Path) -> None:
    image = true_colour(str(_write_imagery(tmp_path / "scene.tif")))
    assert image is not None and image.bands == (3, 2, 1) and image.crs == UTM
    red = np.round(_imagery_bands()["red"]).astype(np.uint8)
    lo, hi = image.ranges[0]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(red, (0.02, 0.98))))
    assert true_colour(str(tmp_path / "missing.tif")) is None


def test_engine_writes_class_names_scale_and_styles(make_raster, tmp_path: Path) -> None:
    src = make_raster(150, 170, seed=2)
    with geoseg.scheduler("threads"):
        report = geoseg.write(
            geoseg.predict(src, conv_net(depth=2), tile=64, halo=4, chunk=70, probabilities=True), tmp_path / "o"
        )
    out = tmp_path / "o"
    assert report["outputs"]["mask_style"] == "mask.qml" and report["outputs"]["mask_classes"] == "mask.tif.aux.xml"
    assert cog_validate(str(out / "mask.tif"), quiet=True)[0]  # the sidecars leave the COG as it was
    qml = ET.fromstring((out / "mask.qml").read_text())
    labels = {e.get("label"): e.get("alpha") for e in qml.iter("paletteEntry")}
    assert labels == {"Class 0": "0", "Class 1": "255", "Class 2": "255", "Class 3": "255"}  # class_0: background-like
    cats = ET.fromstring((out / "mask.tif.aux.xml").read_text()).findall("PAMRasterBand/CategoryNames/Category")
    assert [c.text for c in cats] == ["class_0", "class_1", "class_2", "class_3"]
    with rasterio.open(out / "probabilities.tif") as p:  # value x 1/255 = probability
        assert p.scales == (1 / 255,) * 4 and p.offsets == (0.0,) * 4
    assert not list(out.glob(".*"))
    # a rewrite without probabilities keeps the sidecars in step with the new mask (none stale)
    (out / "mask.qml").write_text("stale")
    with geoseg.scheduler("threads"):
        geoseg.write(geoseg.predict(src, conv_net(depth=2), tile=64, halo=4, chunk=70), out, overwrite=True)
    assert (out / "mask.qml").read_text().startswith("<!DOCTYPE qgis")


def test_gdal_reads_class_names_and_attribute_table(run_folder: Path) -> None:
    """GDAL itself (the system's osgeo bindings, as QGIS uses) reads category names and the RAT."""
    script = (
        "import json, sys\nfrom osgeo import gdal\n"
        "ds = gdal.Open(sys.argv[1])\nb = ds.GetRasterBand(1)\nrat = b.GetDefaultRAT()\n"
        "print(json.dumps({'cats': b.GetCategoryNames(), 'cols': [rat.GetNameOfCol(i) for i in range(rat.GetColumnCount())],"
        " 'rows': [[rat.GetValueAsString(r, i) for i in range(rat.GetColumnCount())] for r in range(rat.GetRowCount())]}))\n"
    )
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", script, str(run_folder / "mask.tif")], capture_output=True, text=True, env=_qgis_env()
    )
    if probe.returncode != 0 and "osgeo" in probe.stderr:
        pytest.skip("GDAL's Python bindings (python3-gdal) are not installed for /usr/bin/python3")
    assert probe.returncode == 0, probe.stderr
    got = json.loads(probe.stdout)
    assert got["cats"] == ["background", "building", "water"]
    assert got["cols"] == ["value", "class", "red", "green", "blue", "alpha"]
    assert got["rows"] == [["0", "background", "0", "0", "0", "0"], ["1", "building", "230", "25", "75", "255"],
                           ["2", "water", "0", "130", "200", "255"]]  # fmt: skip


def test_geopackage_is_version_1_3(run_folder: Path) -> None:
    con = sqlite3.connect(run_folder / "geoseg.gpkg")
    try:  # after the styles were stored too
        assert con.execute("PRAGMA application_id").fetchone()[0] == GPKG_APPLICATION_ID
        assert con.execute("PRAGMA user_version").fetchone()[0] == 10300
        assert con.execute("SELECT count(*) FROM layer_styles").fetchone()[0] >= 2
    finally:
        con.close()


def test_vectorize_project_holds_imagery_mask_and_outlines(run_folder: Path) -> None:
    root = _qgs(run_folder / "project.qgz")
    names = [n.get("name") for n in root.findall("layer-tree-group/layer-tree-layer")]
    assert names == ["Building", "Water", "Class mask", "Input imagery"]  # drawn top first
    layers = {ml.findtext("layername"): ml for ml in root.findall("projectlayers/maplayer")}
    imagery = layers["Input imagery"].find("pipe/rasterrenderer")
    assert imagery.get("type") == "multibandcolor"
    assert (imagery.get("redBand"), imagery.get("greenBand"), imagery.get("blueBand")) == ("3", "2", "1")
    assert imagery.findtext("minMaxOrigin/limits") == "CumulativeCut"
    assert layers["Input imagery"].findtext("datasource") == str(run_folder.parent / "scene.tif")  # outside: absolute
    assert layers["Class mask"].findtext("datasource") == "./mask.tif"
    assert layers["Class mask"].find("pipe/rasterrenderer").get("opacity") == "0.5"
    fill = {o.get("name"): o.get("value") for o in layers["Building"].find("renderer-v2/symbols/symbol/layer/Option")}
    assert fill["color"] == "230,25,75,26" and fill["outline_color"] == "230,25,75,255"


def test_run_project_has_a_group_per_unit(run_folder: Path, tmp_path: Path) -> None:
    path = write_run_project(
        str(run_folder / "all.qgz"),
        [
            (
                "2024-05-01 buildings",
                str(run_folder / "mask.tif"),
                [str(run_folder / "geoseg.gpkg")],
                str(run_folder.parent / "scene.tif"),
            ),
            ("change 2023 to 2024", str(run_folder / "mask.tif"), [], None),
        ],
        title="geoseg workflow",
    )
    root = _qgs(Path(path))
    groups = root.findall("layer-tree-group/layer-tree-group")
    assert [(g.get("name"), g.get("checked")) for g in groups] == [
        ("2024-05-01 buildings", "Qt::Checked"),
        ("change 2023 to 2024", "Qt::Unchecked"),
    ]
    assert [n.get("name") for n in groups[0].findall("layer-tree-layer")] == ["Building", "Water", "Class mask", "Input imagery"]
    assert [n.get("name") for n in groups[1].findall("layer-tree-layer")] == ["Class mask"]
    ids = [ml.findtext("id") for ml in root.findall("projectlayers/maplayer")]
    assert len(ids) == len(set(ids)) == 5  # the same mask in two groups: two layers
    sources = {ml.findtext("datasource") for ml in root.findall("projectlayers/maplayer")}
    assert "./geoseg.gpkg|layername=building" in sources and "./mask.tif" in sources
    assert root.findtext("projectCrs/spatialrefsys/authid") == UTM
    style = next(ml for ml in root.findall("projectlayers/maplayer") if ml.findtext("layername") == "Building")
    assert style.find("renderer-v2") is not None  # the GeoPackage's default style, embedded


# ---------------------------------------------------------------- with QGIS


def _render(project: Path, png: Path) -> dict:
    proc = subprocess.run(
        [SYSTEM_PYTHON, str(RENDER_SCRIPT), str(project), str(png), str(W * SCALE), str(H * SCALE)],
        capture_output=True, text=True, env=_qgis_env(), timeout=300,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"qgis_render.py printed no JSON (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(lines[-1])
    assert "error" not in result, result["error"]
    result["stderr"] = proc.stderr
    return result


def _expected_imagery(project: Path) -> np.ndarray:
    """The imagery as QGIS should draw it: each band stretched over the range the project states."""
    imagery = next(ml for ml in _qgs(project).findall("projectlayers/maplayer") if ml.findtext("layername") == "Input imagery")
    bands = _imagery_bands()
    out = []
    for name in ("red", "green", "blue"):
        ce = imagery.find(f"pipe/rasterrenderer/{name}ContrastEnhancement")
        lo, hi = float(ce.findtext("minValue")), float(ce.findtext("maxValue"))
        out.append(np.clip(255 * (np.round(bands[name]) - lo) / (hi - lo), 0, 255))
    return np.stack(out, axis=-1)


@needs_qgis
def test_qgis_renders_imagery_under_a_transparent_background(run_folder: Path, tmp_path: Path) -> None:
    png = tmp_path / "project.png"
    result = _render(run_folder / "project.qgz", png)
    assert result["saved"] and not result["invalid"] and not result["errors"], result
    assert result["layers"] == ["Building", "Water", "Class mask", "Input imagery"]
    assert "partially supported" not in result["stderr"]  # GeoPackage 1.3: no warning from QGIS 3.22's GDAL
    x0, y0 = ORIGIN.c, ORIGIN.f
    assert result["visible_extent"] == pytest.approx([x0, y0 - H * RES, x0 + W * RES, y0])
    with rasterio.open(png) as ds:
        img = np.moveaxis(ds.read()[:3], 0, -1).astype(np.float64)  # (rows, cols, rgb)
    assert img.shape == (H * SCALE, W * SCALE, 3)
    expected = _expected_imagery(run_folder / "project.qgz")

    def at(r: int, c: int) -> np.ndarray:
        return img[r * SCALE + SCALE // 2, c * SCALE + SCALE // 2]

    # background class and nodata: the imagery itself (stretched), not black, not the magenta map background
    for r, c in ((70, 30), (90, 10), (10, 100), (2, 64), (4, 5)):
        assert np.abs(at(r, c) - expected[r, c]).max() <= 3, (r, c, at(r, c), expected[r, c])
        assert at(r, c).sum() > 60
    # objects: the class colour at 50 % over the imagery, under a 10 % fill
    alpha = 26 / 255
    for (r, c), color in (((35, 40), CLASSES[1].color), ((70, 95), CLASSES[2].color)):
        want = alpha * np.array(color) + (1 - alpha) * (0.5 * np.array(color) + 0.5 * expected[r, c])
        assert np.abs(at(r, c) - want).max() <= 6, (r, c, at(r, c), want)
        assert np.abs(at(r, c) - np.array(color)).sum() < np.abs(expected[r, c] - np.array(color)).sum()
    # outlines: opaque class colour along the building's left edge (column 20)
    row = img[35 * SCALE + 2, 18 * SCALE : 22 * SCALE]
    assert np.abs(row - np.array(CLASSES[1].color)).max(axis=1).min() <= 40, row


@needs_qgis
def test_qgis_opens_the_mask_alone_with_class_names(run_folder: Path, tmp_path: Path) -> None:
    script = (
        "import os, json, sys\nos.environ['QT_QPA_PLATFORM'] = 'offscreen'\n"
        "from qgis.core import QgsApplication, QgsRasterLayer\napp = QgsApplication([], False); app.initQgis()\n"
        "layer = QgsRasterLayer(sys.argv[1], 'mask', 'gdal')\nr = layer.renderer()\n"
        "print(json.dumps([[c.value, c.label, list(c.color.getRgb())] for c in r.classes()])); sys.stdout.flush(); os._exit(0)\n"
    )
    proc = subprocess.run([SYSTEM_PYTHON, "-c", script, str(run_folder / "mask.tif")], capture_output=True, text=True,
                          env=_qgis_env(), timeout=300)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert lines, proc.stderr
    # mask.qml beside mask.tif is QGIS's default style: three named classes, background transparent
    assert json.loads(lines[-1]) == [[0, "Background", [0, 0, 0, 0]], [1, "Building", [230, 25, 75, 255]],
                                     [2, "Water", [0, 130, 200, 255]]]  # fmt: skip


@needs_qgis
def test_qgis_reads_the_run_project(run_folder: Path, tmp_path: Path) -> None:
    path = run_folder / "all_render.qgz"
    write_run_project(
        str(path),
        [("a", str(run_folder / "mask.tif"), [str(run_folder / "geoseg.gpkg")], str(run_folder.parent / "scene.tif")),
         ("b", str(run_folder / "mask.tif"), [], str(run_folder.parent / "scene.tif"))],
    )  # fmt: skip
    result = _render(path, tmp_path / "run.png")
    assert result["saved"] and not result["invalid"] and not result["errors"], result
    assert result["layers"] == ["Building", "Water", "Class mask", "Input imagery"]  # group b is switched off
