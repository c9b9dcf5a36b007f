"""STAC out: item.json beside every result (segment, change, workflow units) and a workflow's collection.json.

The items are read back with pystac. JSON-schema validation runs against the STAC core schemas
pystac ships (offline; jsonschema is in the test extra, so it never skips). The extension schemas
(classification, label, mlm, projection, raster, file) live only on stac-extensions.github.io:
the pystac-ext-* packages ship Python, no JSON schemas, and tests reach no network. So the
extensions' fields are read through pystac's extension classes (which also check that the
declared schema URIs are the versions they implement) and checked field by field here.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

import geoseg
from geoseg.io.mask import open_mask


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from geoseg.sample import make_sample

    folder = tmp_path_factory.mktemp("sample")
    make_sample(str(folder), size=256, seed=3)
    return folder


def _validate_core(item: dict, href: str) -> None:
    """The item against pystac's bundled STAC core schema (no network)."""
    from pystac import STACObjectType
    from pystac.validation.stac_validator import JsonSchemaSTACValidator

    JsonSchemaSTACValidator().validate_core(item, STACObjectType.ITEM, item["stac_version"], href)


def _check_item(folder: Path, mask_name: str = "mask.tif") -> object:
    """Read ``folder/item.json`` with pystac and check it against the files it describes."""
    import pystac

    path = folder / "item.json"
    item = pystac.Item.from_file(str(path))
    raw = json.loads(path.read_text())
    _validate_core(raw, str(path))
    for key, asset in item.assets.items():
        if asset.href.startswith("ni:///sha-256;"):  # a model file outside the folder: known by its content only
            assert key == "model"
            continue
        href = asset.get_absolute_href()
        assert href and Path(href).is_file(), f"asset {key}: {asset.href} does not resolve to a file"
        assert not Path(asset.href).is_absolute() and "://" not in asset.href, "asset hrefs are relative: the folder can move"
    mask = item.assets["mask"]
    assert mask.roles == ["data"] and mask.media_type.startswith("image/tiff; application=geotiff; profile=cloud-optimized")
    with rasterio.open(folder / mask_name) as ds:
        assert mask.extra_fields["proj:transform"] == list(ds.transform)[:6]
        assert mask.extra_fields["proj:shape"] == [ds.height, ds.width]
        assert mask.extra_fields["proj:code"] == f"EPSG:{ds.crs.to_epsg()}"
        bounds = rasterio.warp.transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    assert mask.extra_fields["raster:bands"] == [{"nodata": 255, "data_type": "uint8"}]
    table = open_mask(str(folder / mask_name)).classes
    classes = mask.extra_fields["classification:classes"]
    assert [(c["value"], c.get("title", c["name"])) for c in classes[:-1]] == [(c.id, c.name) for c in table]
    assert [c["color_hint"] for c in classes[:-1]] == ["{:02X}{:02X}{:02X}".format(*c.color) for c in table]
    assert classes[-1]["value"] == 255 and classes[-1]["nodata"] is True
    assert item.bbox == pytest.approx(list(bounds), abs=1e-6)
    assert item.assets["run"].roles == ["metadata"]
    ext = set(raw["stac_extensions"])
    assert {"projection/v2.0.0", "raster/v1.1.0", "classification/v2.0.0"} <= {u.split("/", 3)[3].rsplit("/", 1)[0] for u in ext}
    _check_extensions(item, raw)
    return item


def _check_extensions(item: object, raw: dict) -> None:
    """The extensions' fields read through pystac's extension classes (each refuses an undeclared schema URI)."""
    from pystac.extensions.classification import ClassificationExtension
    from pystac.extensions.file import FileExtension
    from pystac.extensions.label import LabelExtension
    from pystac.extensions.mlm import MLMExtension
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import RasterExtension

    mask = item.assets["mask"]
    assert ProjectionExtension.ext(mask).code == mask.extra_fields["proj:code"]
    assert RasterExtension.ext(mask).bands[0].nodata == 255
    assert [c.value for c in ClassificationExtension.ext(mask).classes][-1] == 255
    if "label:type" in item.properties:
        assert LabelExtension.ext(item).label_type == "vector"
    if "mlm:name" in item.properties:
        mlm = MLMExtension.ext(item)
        assert mlm.name and mlm.architecture and mlm.tasks and mlm.input and mlm.output
    model = item.assets.get("model")
    if model is not None:
        assert "mlm:model" in model.roles
        checksum = FileExtension.ext(model).checksum  # file:checksum with the file extension declared
        assert checksum.startswith("1220") and len(checksum) == 68
        if model.href.startswith("ni:///sha-256;"):
            digest = model.href.split(";", 1)[1]
            assert base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex() == checksum[4:]
            assert "/" not in model.title and "\\" not in model.title  # the file's name, no path
    text = json.dumps(raw)
    assert str(Path.home()) not in text and "site-packages" not in text  # no local paths outside the folder


def test_segment_writes_an_item_of_its_outputs(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with geoseg.scheduler("synchronous"):
        done = geoseg.segment(str(sample / "scene.tif"), "water", out,
                              vectorize={"formats": ("gpkg", "geojson", "parquet")})  # fmt: skip
    assert done.item == str(out / "item.json") and "item.json" in done.files()
    item = _check_item(out)
    props = item.properties
    assert props["geoseg:datetime_source"].startswith("input date") and item.datetime is not None
    # the polygon layers, with the label extension
    keys = set(item.assets)
    assert {"gpkg", "geojson-water", "parquet-water", "vectors", "mask_style", "styles-water", "project"} <= keys
    assert item.assets["gpkg"].media_type == "application/geopackage+sqlite3"
    assert item.assets["mask_style"].roles == ["visual"] and item.assets["vectors"].roles == ["metadata"]
    assert props["label:type"] == "vector" and props["label:properties"] == ["class"]
    assert props["label:classes"] == [{"name": "class", "classes": ["water"]}]
    # the model, with the ML Model extension (from its card)
    card = done.run["model"]
    assert props["mlm:name"] == "water" and props["mlm:framework"] == "ONNX"
    assert props["mlm:tasks"] == ["semantic-segmentation"]
    assert props["mlm:input"][0]["bands"] == ["green", "nir"]
    assert props["mlm:input"][0]["input"]["shape"][:2] == [-1, 2]
    assert [c["name"] for c in props["mlm:output"][0]["classification:classes"]] == [c["name"] for c in card["classes"]]
    model = item.assets["model"]  # the bundled model lies outside the folder: a reference by content, no path
    assert model.roles == ["mlm:model"] and model.extra_fields["mlm:artifact_type"] == "onnx"
    assert model.href.startswith("ni:///sha-256;") and model.title.endswith(".onnx")
    assert model.extra_fields["file:checksum"] == f"1220{card_sha(done)}"
    # and the outputs the item describes are what they were: nothing else in the folder changed
    assert sorted(done.files()) == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def card_sha(done: object) -> str:
    """The SHA-256 of the model that made a result, from its run record."""
    return done.run["model"]["sha256"]


def test_a_model_file_inside_the_output_folder_is_a_relative_asset(sample: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from geoseg.models.spec import resolve_model

    spec = resolve_model("water")
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    shutil.copy(spec.path, out / "model" / "water.onnx")
    source = tmp_path / "catalog" / "items" / "scene.json"  # the STAC items the input came from: a file and a URL
    source.parent.mkdir(parents=True)
    source.write_text("{}")
    api_item = "https://stac.example.org/collections/s2/items/scene"
    with geoseg.scheduler("synchronous"):
        geoseg.segment(str(sample / "scene.tif"), replace(spec, path=str(out / "model" / "water.onnx")), out,
                       derived_from=[str(source), api_item])  # fmt: skip
    item = _check_item(out)
    model = item.assets["model"]
    assert model.href == "./model/water.onnx" and Path(model.get_absolute_href()).read_bytes() == Path(spec.path).read_bytes()
    assert "description" not in model.extra_fields
    links = item.get_links("derived_from")
    assert [ln.href for ln in links] == ["../catalog/items/scene.json", api_item]  # a path relative: the folders move together
    assert Path(links[0].get_absolute_href()) == source


def test_an_undated_input_says_the_item_carries_the_run_time(sample: Path, tmp_path: Path) -> None:
    src = tmp_path / "plain_name.tif"
    with rasterio.open(sample / "scene.tif") as ds:
        profile, data = ds.profile, ds.read()
        descriptions = ds.descriptions
    with rasterio.open(src, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = descriptions
    with geoseg.scheduler("synchronous"):
        done = geoseg.segment(str(src), "water", tmp_path / "o")
    item = _check_item(tmp_path / "o")
    assert item.properties["geoseg:datetime_source"].startswith("run")
    assert "label:type" not in item.properties  # no polygons, no label fields
    assert done.files()[-1] == "item.json"


def test_change_writes_an_item_over_both_dates(sample: Path, tmp_path: Path) -> None:
    from geoseg.change import change

    with geoseg.scheduler("synchronous"):
        rep = change(str(sample / "scene.tif"), str(sample / "scene_after.tif"), "forest", str(tmp_path / "c"),
                     date_before="2024-05-01", date_after="2024-08-01", formats=("geojson",))  # fmt: skip
    assert "item.json" in rep.files()
    item = _check_item(tmp_path / "c", "change.tif")
    p = item.properties
    assert p["datetime"] is None and p["start_datetime"] == "2024-05-01T00:00:00Z" and p["end_datetime"] == "2024-08-01T00:00:00Z"
    names = [c.get("title", c["name"]) for c in item.assets["mask"].extra_fields["classification:classes"]]
    assert names[0] == "no_change" and set(p["label:classes"][0]["classes"]) <= set(names)
    assert p["mlm:name"] == "forest"
    # the dates' own masks have their items too
    for d in ("before", "after"):
        if (tmp_path / "c" / d / "mask.tif").exists():
            _check_item(tmp_path / "c" / d)


WORKFLOW = """name: stacout
imagery: [{a}, {b}]
models: [water]
change: {{model: forest}}
outputs: {{folder: out, formats: [geojson, gpkg]}}
scheduler: synchronous
"""


def test_workflow_collection_walks_to_every_item_and_moves_with_its_folder(sample: Path, tmp_path: Path) -> None:
    import pystac

    from geoseg.workflows.run import run_workflow

    a, b = tmp_path / "scene_2024-05-01.tif", tmp_path / "scene_2024-08-01.tif"
    shutil.copy(sample / "scene.tif", a)
    shutil.copy(sample / "scene_after.tif", b)
    f = tmp_path / "w.yaml"
    f.write_text(WORKFLOW.format(a=a.name, b=b.name))
    s = run_workflow(f)
    units = [m["folder"] for e in s["images"] for m in e["models"].values()] + [c["folder"] for c in s["changes"]]
    assert len(units) == 3
    for u in units:
        _check_item(Path(u), "change.tif" if "/change/" in u else "mask.tif")
    again = run_workflow(f)
    assert again["units"]["skipped"] == 3

    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "out"), moved)
    coll = pystac.Collection.from_file(str(moved / "collection.json"))
    items = list(coll.get_items(recursive=True))
    assert sorted(Path(it.get_self_href()).parent for it in items) == sorted(
        moved / Path(u).relative_to(tmp_path / "out") for u in units
    )
    for it in items:
        for key, asset in it.assets.items():
            assert Path(asset.get_absolute_href()).is_file() or asset.href.startswith("ni:///sha-256;"), (it.id, key)
        if "quicklook" in it.assets:
            assert it.assets["quicklook"].roles == ["visual", "overview"]
    assert sum("quicklook" in it.assets for it in items) == 2  # each scene's units show its quicklook
    assert coll.extent.temporal.intervals[0][0].date().isoformat() == s["images"][0]["date"]
    text = (moved / "collection.json").read_text() + "".join(Path(it.get_self_href()).read_text() for it in items)
    assert str(tmp_path) not in text  # links and asset hrefs relative; the model files outside: by content only
    assert np.isfinite(coll.extent.spatial.bboxes[0]).all()
