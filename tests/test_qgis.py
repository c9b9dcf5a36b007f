"""QGIS styles and project: the files as written, and what a real (headless) QGIS makes of them."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import zipfile
from pathlib import Path
from xml.etree import ElementTree as ET

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine
from shapely.geometry import box

from geoseg.errors import InputError, OutputError
from geoseg.vector.project import write_project
from geoseg.vector.qgis import layer_qml, store_styles

SYSTEM_PYTHON = "/usr/bin/python3"
CHECK_SCRIPT = Path(__file__).with_name("qgis_check.py")
CRS = "EPSG:32632"
X0, Y0, RES, SIZE = 500000.0, 4100000.0, 2.0, 64
# class id -> (colour, name); 0 is background (raster only), 255 nodata
CLASSES = {0: ((200, 200, 200), "background"), 1: ((220, 40, 40), "buildings"), 2: ((30, 100, 220), "water")}
FEATURES = {"buildings": 3, "water": 2}


def _polygons(n: int, offset: float) -> list:
    return [box(X0 + offset + 20 * i, Y0 - 60 - 10 * i, X0 + offset + 20 * i + 12, Y0 - 50 - 10 * i) for i in range(n)]


def build_output(folder: Path) -> Path:
    """A small geoseg-like output folder: mask.tif, geoseg.gpkg (styled), styles/*.qml, project.qgz."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.zeros((SIZE, SIZE), np.uint8)
    data[8:30, 8:30] = 1
    data[40:60, 30:60] = 2
    data[:4, :] = 255
    profile = {
        "driver": "COG",
        "width": SIZE,
        "height": SIZE,
        "count": 1,
        "dtype": "uint8",
        "nodata": 255,
        "crs": CRS,
        "transform": Affine(RES, 0.0, X0, 0.0, -RES, Y0),
    }
    with rasterio.open(folder / "mask.tif", "w", **profile) as dst:
        dst.write(data, 1)
        dst.write_colormap(1, {k: (*rgb, 255) for k, (rgb, _) in CLASSES.items()})

    gpkg = folder / "geoseg.gpkg"
    for i, (name, n) in enumerate(FEATURES.items()):
        gdf = gpd.GeoDataFrame({"class_id": [i + 1] * n, "area": [120.0] * n}, geometry=_polygons(n, 30.0 * i), crs=CRS)
        pyogrio.write_dataframe(gdf, gpkg, layer=name, driver="GPKG")

    colors = {name: rgb for rgb, name in CLASSES.values()}
    styles = {name: layer_qml(colors[name], label=name) for name in FEATURES}
    store_styles(str(gpkg), styles)
    (folder / "styles").mkdir(exist_ok=True)
    for name, qml in styles.items():
        (folder / "styles" / f"{name}.qml").write_text(qml, encoding="utf-8")
    write_project(
        str(folder / "project.qgz"),
        title="geoseg test",
        crs=CRS,
        extent=(X0, Y0 - SIZE * RES, X0 + SIZE * RES, Y0),
        raster=("mask.tif", "classes", CLASSES),
        vectors=[("geoseg.gpkg", name, name.title()) for name in FEATURES],
        qml=styles,
    )
    return folder


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_output(tmp_path_factory.mktemp("qgis") / "out")


def _qgs(path: Path) -> ET.Element:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert names == [path.stem + ".qgs"]
        return ET.fromstring(zf.read(names[0]))


# ---------------------------------------------------------------- without QGIS


def test_layer_qml_is_a_polygon_single_symbol_style() -> None:
    root = ET.fromstring(layer_qml((10, 20, 30), fill_opacity=0.25, label="roads"))
    assert root.tag == "qgis"
    assert root.find("renderer-v2").get("type") == "singleSymbol"
    fill = root.find("renderer-v2/symbols/symbol/layer")
    assert fill.get("class") == "SimpleFill"
    opts = {o.get("name"): o.get("value") for o in fill.findall("Option/Option")}
    assert opts["color"] == "10,20,30,64"
    assert opts["outline_color"] == "10,20,30,255"
    assert opts["outline_width"] == "0.4" and opts["outline_width_unit"] == "MM"
    assert {p.get("k"): p.get("v") for p in fill.findall("prop")} == opts
    assert root.find("layerGeometryType").text == "2"
    assert root.find("customproperties/Option/Option").get("value") == "roads"


@pytest.mark.parametrize("color", [(256, 0, 0), (-1, 0, 0), (1, 2)])
def test_layer_qml_rejects_bad_colours(color) -> None:
    with pytest.raises(InputError):
        layer_qml(color)


def test_layer_qml_rejects_bad_opacity() -> None:
    with pytest.raises(InputError, match="fill_opacity"):
        layer_qml((1, 2, 3), fill_opacity=1.5)


def test_styles_are_stored_as_defaults(output: Path) -> None:
    gpkg = output / "geoseg.gpkg"
    con = sqlite3.connect(gpkg)
    try:
        cols = [r[1] for r in con.execute("PRAGMA table_info(layer_styles)")]
        assert cols == [
            "id", "f_table_catalog", "f_table_schema", "f_table_name", "f_geometry_column", "styleName",
            "styleQML", "styleSLD", "useAsDefault", "description", "owner", "ui", "update_time",
        ]  # fmt: skip
        rows = con.execute(
            "SELECT f_table_catalog, f_table_schema, f_table_name, f_geometry_column, useAsDefault, styleQML, update_time "
            "FROM layer_styles ORDER BY f_table_name"
        ).fetchall()
        assert [r[:5] for r in rows] == [("", "", "buildings", "geom", 1), ("", "", "water", "geom", 1)]
        for row in rows:
            assert row[5] == (output / "styles" / f"{row[2]}.qml").read_text(encoding="utf-8")
            assert row[6]  # timestamp filled in
        contents = con.execute("SELECT data_type, srs_id FROM gpkg_contents WHERE table_name = 'layer_styles'").fetchall()
        assert contents == [("attributes", 0)]
    finally:
        con.close()
    # GDAL still reads the GeoPackage, and sees the styles table as a plain table
    layers = {name: geom for name, geom in pyogrio.list_layers(gpkg)}
    assert set(FEATURES) <= set(layers) and layers.get("layer_styles") is None
    for name, n in FEATURES.items():
        assert len(pyogrio.read_dataframe(gpkg, layer=name)) == n


def test_store_styles_replaces_and_checks_layers(tmp_path: Path) -> None:
    folder = build_output(tmp_path / "out")
    gpkg = str(folder / "geoseg.gpkg")
    store_styles(gpkg, {"water": layer_qml((1, 2, 3))})
    con = sqlite3.connect(gpkg)
    try:
        rows = con.execute("SELECT f_table_name, styleQML FROM layer_styles ORDER BY f_table_name").fetchall()
        assert [r[0] for r in rows] == ["buildings", "water"]
        assert '"1,2,3,26"' in rows[1][1]  # default fill 10 % (issue 17: outlines over the mask)
        assert con.execute("SELECT count(*) FROM gpkg_contents WHERE table_name = 'layer_styles'").fetchone() == (1,)
    finally:
        con.close()
    with pytest.raises(OutputError, match="roads"):
        store_styles(gpkg, {"roads": layer_qml((1, 2, 3))})
    with pytest.raises(OutputError):
        store_styles(str(tmp_path / "missing.gpkg"), {})


def test_project_is_a_zipped_qgs_with_relative_sources(output: Path) -> None:
    root = _qgs(output / "project.qgz")
    assert root.tag == "qgis" and root.findtext("title") == "geoseg test"
    assert root.findtext("properties/Paths/Absolute") == "false"
    assert root.findtext("projectCrs/spatialrefsys/authid") == CRS
    layers = root.findall("projectlayers/maplayer")
    sources = [ml.findtext("datasource") for ml in layers]
    assert sources == ["./geoseg.gpkg|layername=buildings", "./geoseg.gpkg|layername=water", "./mask.tif"]
    for ml in layers:
        assert ml.findtext("srs/spatialrefsys/authid") == CRS
    # legend order: vectors above the raster, all switched on
    tree = root.findall("layer-tree-group/layer-tree-layer")
    assert [n.get("name") for n in tree] == ["Buildings", "Water", "Class mask"]  # issue 17: names a user reads
    assert all(n.get("checked") == "Qt::Checked" for n in tree)
    fill = layers[0].find("renderer-v2/symbols/symbol/layer/Option")
    assert {o.get("name"): o.get("value") for o in fill}["color"] == "220,40,40,26"  # faint fill (issue 17)
    assert layers[2].find("pipe/rasterrenderer").get("type") == "paletted"
    palette = layers[2].findall("pipe/rasterrenderer/colorPalette/paletteEntry")
    # issue 17: background transparent (alpha 0), legend labels as a user reads them, mask half transparent
    assert [(p.get("value"), p.get("color"), p.get("alpha"), p.get("label")) for p in palette] == [
        ("0", "#c8c8c8", "0", "Background"),
        ("1", "#dc2828", "255", "Buildings"),
        ("2", "#1e64dc", "255", "Water"),
    ]
    assert layers[2].find("pipe/rasterrenderer").get("opacity") == "0.5"
    assert not [p for p in os.listdir(output) if ".tmp-" in p]


def test_project_without_crs(tmp_path: Path) -> None:
    out = write_project(
        str(tmp_path / "p.qgz"),
        title="pixels",
        crs=None,
        extent=None,
        raster=("mask.tif", "mask", {1: ((1, 2, 3), "a")}),
        vectors=[],
        qml={},
    )
    root = _qgs(Path(out))
    assert root.findtext("projectCrs/spatialrefsys/wkt") == ""
    assert root.find("mapcanvas") is None


def test_project_write_failure_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write the QGIS project"):
        write_project(str(blocker / "p.qgz"), title="t", crs=None, extent=None, raster=None, vectors=[], qml={})


# ---------------------------------------------------------------- with QGIS


def _have_qgis() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    try:
        probe = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True, env=_qgis_env(), timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def _qgis_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["QT_QPA_PLATFORM"] = "offscreen"
    return env


needs_qgis = pytest.mark.skipif(
    not _have_qgis(),
    reason="QGIS (Debian python3-qgis) not installed for /usr/bin/python3; apt-get install python3-qgis qgis-providers",
)


@pytest.fixture(scope="module")
def qgis_view(output: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    # open a moved copy: the project must only use paths relative to itself
    moved = tmp_path_factory.mktemp("moved") / "elsewhere"
    shutil.copytree(output, moved)
    proc = subprocess.run(
        [SYSTEM_PYTHON, str(CHECK_SCRIPT), str(moved)], capture_output=True, text=True, env=_qgis_env(), timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"qgis_check.py printed no JSON (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(lines[-1])
    assert "error" not in result, result["error"]
    return result


@needs_qgis
def test_qgis_opens_gpkg_layers_with_default_style(qgis_view: dict) -> None:
    layers = qgis_view["gpkg_layers"]
    assert set(layers) == set(FEATURES)
    colors = {name: rgb for rgb, name in CLASSES.values()}
    for name, info in layers.items():
        assert info["valid"], name
        assert info["crs"] == CRS
        assert info["features"] == FEATURES[name]
        assert info["styles_in_db"] >= 1
        assert info["renderer"] == "singleSymbol"
        assert info["symbol_class"] == "SimpleFill"
        assert info["symbol_color"] == [*colors[name], 26]  # faint fill, opaque outline (issue 17)
        assert info["stroke_color"] == [*colors[name], 255]
        assert info["stroke_width"] == pytest.approx(0.4)
        assert info["class_property"] == name
        sidecar = info["qml_file"]  # styles/<layer>.qml through QgsVectorLayer.loadNamedStyle
        assert sidecar["loaded"], sidecar["message"]
        assert sidecar["symbol_color"] == [*colors[name], 26]


@needs_qgis
def test_qgis_reads_the_project(qgis_view: dict) -> None:
    proj = qgis_view["project"]
    assert proj["read"] and proj["title"] == "geoseg test"
    assert proj["crs"] == CRS and proj["absolute_paths"] is False
    data_extent = [X0, Y0 - SIZE * RES, X0 + SIZE * RES, Y0]
    assert proj["default_extent"] == pytest.approx(data_extent)
    # the map opens on the data: the canvas shows the extent (widened to the window's aspect)
    cx0, cy0, cx1, cy1 = proj["canvas_extent"]
    assert cx0 <= X0 and cy0 <= Y0 - SIZE * RES and cx1 >= X0 + SIZE * RES and cy1 >= Y0
    assert (cx1 - cx0) * (cy1 - cy0) < 4 * (SIZE * RES) ** 2
    names = [layer["name"] for layer in proj["layers"]]
    assert names == ["Buildings", "Water", "Class mask"]
    for layer in proj["layers"]:
        assert layer["valid"], layer
        assert layer["visible"], layer
        assert layer["crs"] == CRS
    colors = {name: rgb for rgb, name in CLASSES.values()}
    for layer in proj["layers"][:2]:
        assert layer["type"] == "vector" and layer["renderer"] == "singleSymbol"
        assert layer["features"] == FEATURES[layer["name"].lower()]
        assert layer["symbol_color"] == [*colors[layer["name"].lower()], 26]
    raster = proj["layers"][2]
    assert raster["type"] == "raster" and raster["renderer"] == "paletted"
    assert raster["class_count"] == len(CLASSES)
    # background transparent, the others opaque (the layer itself is drawn at 50 %); labels capitalised (issue 17)
    assert raster["classes"] == [[k, [*rgb, 0 if k == 0 else 255], name.capitalize()] for k, (rgb, name) in CLASSES.items()]


@needs_qgis
def test_qgis_opens_the_mask(qgis_view: dict) -> None:
    mask = qgis_view["mask"]
    assert mask["valid"] and mask["crs"] == CRS and mask["bands"] == 1


@pytest.fixture(scope="module")
def vectorized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``geoseg vectorize`` output folder: the mask, the GeoPackage and the project side by side."""
    from click.testing import CliRunner

    from geoseg.cli import main
    from tests.test_vector import CLASSES as VCLASSES
    from tests.test_vector import _scene_mask, write_mask

    out = tmp_path_factory.mktemp("real") / "run"
    out.mkdir()
    write_mask(out / "mask.tif", _scene_mask(), classes=VCLASSES)
    res = CliRunner().invoke(main, ["vectorize", str(out / "mask.tif"), "--out", str(out), "--scheduler", "synchronous"])
    assert res.exit_code == 0, res.output
    return out


@needs_qgis
def test_qgis_opens_real_vectorize_output(vectorized: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    moved = tmp_path_factory.mktemp("moved_real") / "elsewhere"
    shutil.copytree(vectorized, moved)
    proc = subprocess.run(
        [SYSTEM_PYTHON, str(CHECK_SCRIPT), str(moved)], capture_output=True, text=True, env=_qgis_env(), timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"qgis_check.py printed no JSON (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    view = json.loads(lines[-1])
    report = json.loads((vectorized / "vectors.json").read_text())
    expected = {ly["name"]: (ly["features"], ly["color"]) for ly in report["layers"]}
    assert set(view["gpkg_layers"]) == set(expected) == {"building", "water", "storage_tank", "ship"}
    for name, info in view["gpkg_layers"].items():
        assert info["valid"] and info["crs"] == "EPSG:32632", info
        assert info["features"] == expected[name][0] > 0
        assert info["styles_in_db"] >= 1 and info["symbol_color"][:3] == expected[name][1]
    proj = view["project"]
    assert proj["read"] and proj["crs"] == "EPSG:32632"
    # issue 17: layers named as a user reads them (no run.json beside this mask: no imagery layer)
    assert [ly["name"] for ly in proj["layers"]] == [*(n.replace("_", " ").capitalize() for n in expected), "Class mask"]
    for layer in proj["layers"]:
        assert layer["valid"] and layer["crs"] == "EPSG:32632", layer
    assert proj["layers"][-1]["renderer"] == "paletted"
    assert view["mask"]["valid"]
