"""STAC out: ``item.json`` beside every result, and a workflow's ``collection.json`` over its results.

The item describes one output folder: its footprint (the mask's grid, in EPSG:4326), its date
(the input's, or the run's, said in ``geoseg:datetime_source``), and every file as an asset
with its role: the mask COG (``data``, with ``proj:``, ``raster:bands`` and the class table as
``classification:classes``), the polygon layers (``data``; the item carries the label
extension's ``label:*``), ``run.json``/``vectors.json`` (``metadata``), styles, quicklook and
QGIS project (``visual``). The model is described with the Machine Learning Model extension
(``mlm:*``) from its card; its file is an asset with a relative href when it lies inside the
folder, else a content reference (``ni:///sha-256;...``, RFC 6920: its name as title and its
SHA-256 as ``file:checksum``), never a local path outside. The STAC items the input was made
from are ``derived_from`` links. Asset hrefs and links are relative: the folder can move.

A detector's folder (its run.json has ``detections``) has no mask: the footprint is the grid it
looked at, the layers of boxes are the data assets, ``label:tasks`` is ``detection`` and
``mlm:tasks`` ``object-detection``.

A mask without a CRS (a plain image, a video frame) has no place on Earth: no item is written.

Over 400 lines because one STAC Item carries six extensions (proj, raster, classification, label, mlm, file)
for three kinds of runs (a mask, a detector's layers, a change map), and the workflow's collection.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from geoseg.classes import NODATA, ClassInfo
from geoseg.io.outdir import write_json_atomic, write_text_atomic
from geoseg.models.spec import ModelSpec

__all__ = ["COLLECTION_NAME", "ITEM_NAME", "item_record", "write_collection", "write_item"]

ITEM_NAME = "item.json"
COLLECTION_NAME = "collection.json"
STAC_VERSION = "1.1.0"
EXT = {
    "proj": "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "raster": "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "classification": "https://stac-extensions.github.io/classification/v2.0.0/schema.json",
    "label": "https://stac-extensions.github.io/label/v1.0.1/schema.json",
    "mlm": "https://stac-extensions.github.io/mlm/v1.4.0/schema.json",
    "file": "https://stac-extensions.github.io/file/v2.1.0/schema.json",
}
COG = "image/tiff; application=geotiff; profile=cloud-optimized"
#: media type and roles of each kind of output file (by run.json / vectors.json output key)
KINDS: dict[str, tuple[str, list[str]]] = {
    "mask": (COG, ["data"]),
    "probabilities": (COG, ["data"]),
    "mask_png": ("image/png", ["visual"]),
    "mask_style": ("application/xml", ["visual"]),
    "mask_classes": ("application/xml", ["metadata"]),
    "geojson": ("application/geo+json", ["data"]),
    "gpkg": ("application/geopackage+sqlite3", ["data"]),
    "fgb": ("application/vnd.flatgeobuf", ["data"]),
    "parquet": ("application/vnd.apache.parquet", ["data"]),
    "coco": ("application/json", ["data"]),
    "styles": ("application/xml", ["visual"]),
    "project": ("application/x-qgis-project", ["visual"]),
}
FRAMEWORKS = {"onnx": ("ONNX", "onnx"), "torchscript": ("PyTorch", "torch.jit.script"),
              "exported": ("PyTorch", "torch.export.save"), "statedict": ("PyTorch", "torch.save"),
              "module": ("PyTorch", None)}  # fmt: skip


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _times(when: str | tuple[str | None, str | None] | None) -> dict[str, Any]:
    """STAC's datetime fields: a day (``YYYY-MM-DD``), a year, a pair of dates (change), else the run time."""
    if isinstance(when, tuple):
        if all(when):
            start, end = sorted(_times(w)["datetime"] or _times(w)["start_datetime"] for w in when)
            return {"datetime": None, "start_datetime": start, "end_datetime": end, "geoseg:datetime_source": "input dates"}
        when = None
    if when and re.fullmatch(r"\d{4}-\d{2}-\d{2}", when):
        return {"datetime": f"{when}T00:00:00Z", "geoseg:datetime_source": "input date (day)"}
    if when and re.fullmatch(r"\d{4}", when):
        return {"datetime": None, "start_datetime": f"{when}-01-01T00:00:00Z", "end_datetime": f"{when}-12-31T23:59:59Z",
                "geoseg:datetime_source": "input date (year)"}  # fmt: skip
    return {"datetime": _now(), "geoseg:datetime_source": "run (the input has no date)"}


def _footprint(grid: Mapping[str, Any]) -> tuple[dict[str, Any], list[float]]:
    """The grid's outline (edges densified) in EPSG:4326 and its bbox."""
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom

    a, b, c, d, e, f = grid["transform"]
    w, h = grid["width"], grid["height"]
    steps = [i / 20 for i in range(20)]
    px = [(s * w, 0) for s in steps] + [(w, s * h) for s in steps] + [(w - s * w, h) for s in steps]
    px += [(0, h - s * h) for s in steps] + [(0, 0)]
    ring = [(a * x + b * y + c, d * x + e * y + f) for x, y in px]
    geom = transform_geom(CRS.from_user_input(grid["crs"]), "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
    coords = [p for part in ([geom["coordinates"][0]] if geom["type"] == "Polygon" else
                             [r[0] for r in geom["coordinates"]]) for p in part]  # fmt: skip
    lons, lats = [p[0] for p in coords], [p[1] for p in coords]
    return json.loads(json.dumps(geom)), [min(lons), min(lats), max(lons), max(lats)]


def _class_name(name: str) -> str:
    """A class name as the classification extension allows it (letters, digits, ``-``, ``_``)."""
    return re.sub(r"[^0-9A-Za-z_-]+", "_", name).strip("_") or "class"


def _classes(classes: Sequence[ClassInfo]) -> list[dict[str, Any]]:
    """``classification:classes`` of a mask: value, name, colour hint; and its nodata value."""
    out = []
    for c in classes:
        entry = {"value": int(c.id), "name": _class_name(c.name), "description": c.name,
                 "color_hint": "{:02X}{:02X}{:02X}".format(*c.color)}  # fmt: skip
        if entry["name"] != c.name:
            entry["title"] = c.name
        out.append(entry)
    return [*out, {"value": NODATA, "name": "nodata", "description": "nodata, or outside the AOI", "nodata": True}]


def _proj(grid: Mapping[str, Any]) -> dict[str, Any]:
    """``proj:code`` (or ``proj:wkt2`` for a CRS without an authority code), shape and transform of a grid.

    A grid's CRS that is already an EPSG code (as geoseg records one that has it) is that code: pyproj's
    search of its database for an authority (40 ms, and its import) is only for the others.
    """
    out: dict[str, Any] = {"proj:shape": [grid["height"], grid["width"]], "proj:transform": list(grid["transform"])[:6]}
    if re.fullmatch(r"EPSG:\d+", str(grid["crs"])):
        return {"proj:code": grid["crs"], **out}
    from pyproj import CRS

    crs = CRS.from_user_input(grid["crs"])
    auth = crs.to_authority()
    code: dict[str, Any] = {"proj:code": f"{auth[0]}:{auth[1]}" if auth else None}
    if not auth:
        code["proj:wkt2"] = crs.to_wkt()
    return {**code, **out}


def _asset(href: str, kind: str, title: str | None = None) -> dict[str, Any]:
    media, roles = KINDS.get(kind, ("application/octet-stream", ["data"]))
    out = {"href": f"./{href}", "type": media, "roles": list(roles)}
    return {**out, "title": title} if title else out


def _is_detection(run: Mapping[str, Any]) -> bool:
    """Whether ``run`` is a detector's record (boxes as polygon layers, no mask)."""
    return "detections" in run


def _run_assets(run: Mapping[str, Any], classes: Sequence[ClassInfo]) -> dict[str, dict[str, Any]]:
    """The mask (with proj, raster and classification fields), its sidecars, probabilities and run.json;
    a detector's record names only its layers' ``vectors.json`` (an asset of :func:`_vector_assets`).
    """
    assets: dict[str, dict[str, Any]] = {}
    grid = run["output_grid"]
    for key, name in run["outputs"].items():
        if key != "vectors":
            assets[key] = _asset(name, key)
    assets["run"] = {"href": "./run.json", "type": "application/json", "roles": ["metadata"], "title": "geoseg run record"}
    if "mask" not in assets:
        return assets
    mask = assets["mask"]
    mask.update(_proj(grid))
    mask["raster:bands"] = [{"nodata": NODATA, "data_type": "uint8"}]
    mask["classification:classes"] = _classes(classes)
    if "probabilities" in assets:
        dtype = (run.get("parameters") or {}).get("probabilities_dtype") or "uint8"
        assets["probabilities"].update(_proj(grid))
        assets["probabilities"]["raster:bands"] = [{"data_type": dtype} for c in classes]
    return assets


def _vector_assets(vectors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every file vectorize wrote, keyed by format (and layer, for one file per layer)."""
    assets = {"vectors": {"href": "./vectors.json", "type": "application/json", "roles": ["metadata"]}}
    for kind, names in vectors["outputs"].items():
        for name in [names] if isinstance(names, str) else names:
            key = kind if isinstance(names, str) else f"{kind}-{os.path.splitext(os.path.basename(name))[0]}"
            assets[key] = _asset(name, kind)
    return assets


def _label(vectors: Mapping[str, Any], detection: bool = False) -> dict[str, Any]:
    """The label extension's item fields: polygons of the mask's classes (or a detector's boxes), the class in each
    feature's field.
    """
    layers = vectors["layers"]
    field = next((ly["field"] for ly in layers if ly.get("field")), "class")
    names = [str(v) for ly in layers for v in ly.get("values", [])] if field != "class" else [ly["name"] for ly in layers]
    what = "boxes of the objects a detector found" if detection else "polygons of the mask's classes"
    return {
        "label:description": f"{what}, one layer per class",
        "label:type": "vector",
        "label:properties": [field],
        "label:classes": [{"name": field, "classes": names}],
        "label:tasks": ["detection" if detection else "segmentation"],
        "label:methods": ["automated"],
    }


def _model_asset(model: ModelSpec, folder: str | None) -> dict[str, Any]:
    """The model file as an ``mlm:model`` asset: relative inside ``folder``, else a reference by content (no local path)."""
    import base64

    path = os.path.abspath(os.fspath(model.path))
    name = os.path.basename(path)
    asset: dict[str, Any] = {"type": "application/octet-stream", "roles": ["mlm:model"], "title": name,
                             "file:checksum": f"1220{model.sha256}"}  # fmt: skip
    root = os.path.abspath(folder) if folder else None
    if root and os.path.splitdrive(root)[0] == os.path.splitdrive(path)[0] and os.path.commonpath([root, path]) == root:
        asset["href"] = f"./{os.path.relpath(path, root).replace(os.sep, '/')}"
        return asset
    digest = base64.urlsafe_b64encode(bytes.fromhex(model.sha256)).decode().rstrip("=")
    return {"href": f"ni:///sha-256;{digest}", **asset,
            "description": f"the model file {name}, not kept with these outputs: known by its SHA-256"}  # fmt: skip


def _mlm(
    model: ModelSpec, classes: Sequence[ClassInfo], bands: Sequence[str], folder: str | None
) -> tuple[dict[str, Any], dict | None]:
    """The ML Model extension's item fields from the model card, and the model file as an ``mlm:model`` asset."""
    card = model.card
    det = card.detector
    kind = f"{det.layout} detector" if det is not None else f"{card.task} segmentation"
    arch = json.loads(card.architecture_json or "{}").get("name") or f"{model.kind} ({kind})"
    framework, artifact = FRAMEWORKS.get(model.kind, ("PyTorch", None))
    size = card.tile or -1
    names = list(card.bands or bands)
    task = "object-detection" if det is not None else "semantic-segmentation"
    fields = {
        "mlm:name": re.sub(r"[^A-Za-z0-9_.-]+", "_", card.name),  # the extension's name pattern
        "mlm:architecture": arch,
        "mlm:tasks": [task],
        "mlm:framework": framework,
        "mlm:input": [{
            "name": "image", "bands": names,
            "input": {"shape": [-1, len(names), size, size], "dim_order": ["batch", "bands", "height", "width"],
                      "data_type": "float32"},
        }],
        "mlm:output": [{
            "name": "boxes" if det is not None else "classes", "tasks": [task],
            "result": _detector_result(det.layout) if det is not None else
                      {"shape": [-1, len(classes), size, size], "dim_order": ["batch", "channel", "height", "width"],
                       "data_type": "float32"},
            "classification:classes": _classes(classes)[:-1],
        }],
    }  # fmt: skip
    if not model.path:
        return fields, None
    asset = _model_asset(model, folder)
    if artifact:
        asset["mlm:artifact_type"] = artifact
    return fields, asset


def _detector_result(layout: str) -> dict[str, Any]:
    """``mlm:output``'s result of a detector: candidate boxes as rows (YOLOv5/v6) or columns (Ultralytics)."""
    rows = layout in ("yolov5", "yolov6")
    return {
        "shape": [-1, -1, -1],
        "dim_order": ["batch", "boxes", "box"] if rows else ["batch", "box", "boxes"],
        "data_type": "float32",
        "description": f"candidate boxes in geoseg's {layout!r} layout (geoseg.models.detector), before suppression",
    }


def item_record(
    run: Mapping[str, Any],
    vectors: Mapping[str, Any] | None,
    classes: Sequence[ClassInfo],
    model: ModelSpec | None,
    item_id: str,
    when: str | tuple[str | None, str | None] | None = None,
    *,
    folder: str | None = None,
    derived_from: Sequence[str] = (),
) -> dict[str, Any]:
    """The STAC Item (a dict) of one output folder; see the module's description.

    Parameters
    ----------
    run : mapping
        The mask's run record (``run.json``: outputs, output grid, input).
    vectors : mapping, optional
        The polygons' record (``vectors.json``), when they were made.
    classes : sequence of ClassInfo
        The mask's class table.
    model : ModelSpec, optional
        The model that made the mask (the ML Model extension's fields).
    item_id : str
        The item's id.
    when : str or (str, str), optional
        The input's date (``YYYY-MM-DD`` or a year), the two dates of a change map; None: the run time.
    folder : str, optional
        The output folder the item describes: a model file inside it is linked relative to it.
    derived_from : sequence of str
        The STAC items the input was made from (URLs, or paths: made relative to ``folder``).
    """
    grid = run["output_grid"]
    geometry, bbox = _footprint(grid)
    props: dict[str, Any] = {**_times(when), "created": _now(), "proj:code": _proj(grid)["proj:code"]}
    assets = _run_assets(run, classes)
    detection = _is_detection(run)
    used = ["proj", "classification"] if detection else ["proj", "raster", "classification"]
    if vectors is not None:
        assets.update(_vector_assets(vectors))
        props.update(_label(vectors, detection))
        used.append("label")
    if model is not None:
        fields, model_asset = _mlm(model, classes, (run.get("input") or {}).get("band_descriptions") or [], folder)
        props.update(fields)
        if model_asset is not None:
            assets["model"] = model_asset
            used += ["mlm", "file"]
        else:
            used.append("mlm")
    return {
        "type": "Feature", "stac_version": STAC_VERSION, "stac_extensions": [EXT[k] for k in used], "id": item_id,
        "geometry": geometry, "bbox": bbox, "properties": props, "links": _derived_links(derived_from, folder),
        "assets": assets,
    }  # fmt: skip


def _derived_links(hrefs: Sequence[str], folder: str | None) -> list[dict[str, Any]]:
    """``derived_from`` links to the input's STAC items: URLs as given, paths relative to ``folder``."""
    links = []
    for href in dict.fromkeys(hrefs):
        if folder and "://" not in href and os.path.isabs(href):
            try:
                href = os.path.relpath(href, os.path.abspath(folder)).replace(os.sep, "/")
            except ValueError:  # another drive: only the name stays (no local path outside the folder)
                href = os.path.basename(href)
        links.append({"rel": "derived_from", "href": href, "type": "application/geo+json"})
    return links


def write_item(
    folder: str,
    run: Mapping[str, Any],
    vectors: Mapping[str, Any] | None,
    classes: Sequence[ClassInfo],
    model: ModelSpec | None,
    item_id: str | None = None,
    when: str | tuple[str | None, str | None] | None = None,
    derived_from: Sequence[str] = (),
) -> str | None:
    """Write ``folder/item.json`` (see :func:`item_record`); None, and nothing written, for a mask without a CRS.

    ``item_id`` defaults to the folder's name; ``derived_from``: the STAC items the input came from.
    """
    if not run["output_grid"].get("crs"):
        return None
    item_id = item_id or os.path.basename(os.path.abspath(folder))
    record = item_record(run, vectors, classes, model, item_id, when, folder=folder, derived_from=derived_from)
    path = os.path.join(folder, ITEM_NAME)
    write_json_atomic(path, record, indent=2)
    return path


def _stac_io() -> Any:
    """Pystac's file access, writing each file atomically (a reader never sees half a catalog)."""
    from pystac.stac_io import DefaultStacIO

    class AtomicStacIO(DefaultStacIO):
        def write_text_to_href(self, href: str, txt: str) -> None:
            os.makedirs(os.path.dirname(os.path.abspath(href)), exist_ok=True)
            write_text_atomic(href, txt)

    return AtomicStacIO()


def write_collection(
    path: str, items: Sequence[tuple[str, Mapping[str, str]]], collection_id: str, description: str, assets: Mapping[str, str]
) -> str:
    """A STAC Collection at ``path`` over existing items, links relative (the folder can move).

    Parameters
    ----------
    path : str
        The ``collection.json`` to write.
    items : sequence of (str, mapping)
        Each item's ``item.json`` and more assets to give it (key -> file, e.g. the scene's quicklook).
        Items whose file is missing are left out; ids seen twice get the folder's path as their id.
    collection_id, description : str
        The collection's id and description.
    assets : mapping
        The collection's own files (key -> file): the summary, the QGIS project.

    Returns
    -------
    str
        ``path``.
    """
    import pystac

    io = _stac_io()
    root = os.path.dirname(os.path.abspath(path))
    loaded = [(pystac.Item.from_file(p, stac_io=io), p, more) for p, more in items if os.path.isfile(p)]
    ids = [it.id for it, _, _ in loaded]
    for it, p, more in loaded:
        if ids.count(it.id) > 1:
            it.id = re.sub(r"[^0-9A-Za-z_.-]+", "_", os.path.relpath(os.path.dirname(p), root))
        for key, f in more.items():
            if os.path.exists(f):
                media, roles = (
                    ("image/png", ["visual", "overview"]) if f.endswith(".png") else ("application/octet-stream", ["visual"])
                )
                it.add_asset(key, pystac.Asset(os.path.relpath(f, os.path.dirname(p)), media_type=media, roles=roles))
    coll = pystac.Collection(collection_id, description, _extent([it for it, _, _ in loaded]), license="other")
    coll.set_self_href(path)
    for key, f in assets.items():
        coll.add_asset(
            key, pystac.Asset(f"./{os.path.relpath(f, root)}", roles=["metadata" if f.endswith(".json") else "visual"])
        )
    for it, p, _ in loaded:
        coll.add_item(it)
        it.set_self_href(p)
    coll.save(catalog_type=pystac.CatalogType.SELF_CONTAINED, stac_io=io)
    return path


def _extent(items: Sequence[Any]) -> Any:
    """The items' union of bboxes and their time span (the whole Earth and no time for none)."""
    import pystac

    if not items:
        return pystac.Extent(pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]), pystac.TemporalExtent([[None, None]]))
    boxes = [it.bbox for it in items]
    union = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
    times = [t for it in items for t in (it.datetime, it.common_metadata.start_datetime, it.common_metadata.end_datetime) if t]
    return pystac.Extent(pystac.SpatialExtent([union]), pystac.TemporalExtent([[min(times), max(times)]]))
