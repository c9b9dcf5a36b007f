"""Output layers of a vectorisation: layer names, the planned files, staging writes, publishing, COCO.

Every file is written into a staging folder first; :func:`publish` moves them into the output
folder (removing what a previous run wrote and this one does not), and ``vectors.json`` comes last.
A little over 400 lines: one room for one chore (the layer files), most of it docstrings.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import shapely

from geoseg.engine.progress import compute_tasks
from geoseg.errors import OutputError, OutputExistsError
from geoseg.io.mask import MaskClass, MaskSource
from geoseg.io.outdir import check_is_folder, existing_outputs, fsync_replace
from geoseg.io.styles import TrueColour, legend_label, true_colour
from geoseg.vector import qgis
from geoseg.vector.coco import annotate_part, write_coco_stream
from geoseg.vector.geometry import reproject
from geoseg.vector.params import VectorParams
from geoseg.vector.project import mask_classes, project_source, write_project
from geoseg.vector.writers import EXTENSIONS, Layer, layer_batches, write_layer

__all__ = [
    "COCO_NAME",
    "GPKG_NAME",
    "MAX_LAYER_NAME",
    "PROJECT_NAME",
    "REPORT_NAME",
    "STYLE_DIR",
    "VECTOR_DIR",
    "check_out",
    "layer_names",
    "layer_totals",
    "planned_outputs",
    "publish",
    "safe_name",
    "write_outputs",
]

GPKG_NAME = "geoseg.gpkg"
PROJECT_NAME = "project.qgz"
REPORT_NAME = "vectors.json"
COCO_NAME = "coco.json"
VECTOR_DIR = "vectors"
STYLE_DIR = "styles"

#: Longest layer name (characters; also at most this many x 2 bytes in UTF-8): file names
#: ``vectors/<layer>.geojson`` and ``styles/<layer>.qml`` stay far below 255 bytes.
MAX_LAYER_NAME = 64


def safe_name(name: str) -> str:
    """A file- and layer-safe name: letters, digits, ``_`` and ``-``; short in characters and bytes.

    Parameters
    ----------
    name : str
        A class name.

    Returns
    -------
    str
        At most :data:`MAX_LAYER_NAME` characters; ``class`` when nothing is left.
    """
    out = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name.strip())
    out = out[:MAX_LAYER_NAME]
    while len(out.encode("utf-8", "surrogatepass")) > 2 * MAX_LAYER_NAME:
        out = out[:-1]
    return out or "class"


def layer_names(classes: Sequence[MaskClass]) -> dict[int, str]:
    """File-safe layer names, unique ignoring case (GeoPackage layer names are case-insensitive).

    Parameters
    ----------
    classes : sequence of MaskClass
        The mask's classes.

    Returns
    -------
    dict
        Class id -> layer name (a clash gets ``_<id>`` appended).
    """
    names: dict[int, str] = {}
    taken: set[str] = set()
    for c in sorted(classes, key=lambda c: c.id):
        name = safe_name(c.name)
        if name.lower() in taken:
            name = f"{name}_{c.id}"
        taken.add(name.lower())
        names[c.id] = name
    return names


def planned_outputs(formats: Sequence[str], names: Sequence[str], project: bool) -> list[str]:
    """The files a run will write, relative to the output folder.

    Parameters
    ----------
    formats : sequence of str
        Output formats (``geojson``, ``gpkg``, ``fgb``, ``parquet``, ``coco``).
    names : sequence of str
        Layer names of the classes to vectorise.
    project : bool
        Whether ``project.qgz`` is written (with ``gpkg`` only).

    Returns
    -------
    list of str
        Relative paths, ``vectors.json`` first.
    """
    out = [REPORT_NAME]
    if "gpkg" in formats:
        out.append(GPKG_NAME)
        if project:
            out.append(PROJECT_NAME)
    if "coco" in formats:
        out.append(COCO_NAME)
    for f in formats:
        if f not in ("gpkg", "coco"):
            out += [os.path.join(VECTOR_DIR, n + EXTENSIONS[f]) for n in names]
    return out


def check_out(out_dir: str, outputs: Sequence[str], overwrite: bool) -> None:
    """Refuse an output folder that is not a folder, holds outputs (unless overwriting), or is not writable.

    Parameters
    ----------
    out_dir : str
        The output folder (need not exist).
    outputs : sequence of str
        Planned outputs, relative to ``out_dir``.
    overwrite : bool
        Replace existing outputs.

    Raises
    ------
    OutputExistsError
        An output exists and ``overwrite`` is False.
    OutputError
        The folder (or its parent) is not writable.
    """
    check_is_folder(out_dir)
    if not overwrite:
        existing = existing_outputs(out_dir, outputs)
        if existing:
            raise OutputExistsError(f"{os.path.join(out_dir, existing[0])}: already exists; pass overwrite=True to replace it")
    parent = out_dir if os.path.isdir(out_dir) else os.path.dirname(out_dir) or "."
    if os.path.isdir(parent) and not os.access(parent, os.W_OK):
        raise OutputError(f"{out_dir}: not writable; choose another out_dir= folder")


def layer_totals(parts: Sequence[str], layers: Sequence[Layer], geo: bool) -> tuple[dict[str, int], dict[str, float | None]]:
    """Features and summed ``area_m2`` per layer in the parquet parts.

    Parameters
    ----------
    parts : sequence of str
        Parquet parts written by the chunk tasks and the seam merge.
    layers : sequence of Layer
        The output layers.
    geo : bool
        The mask is georeferenced (pixel-space features have no ``area_m2``).

    Returns
    -------
    counts : dict
        Layer name -> number of features.
    areas : dict
        Layer name -> total area in m² (None for pixel-space masks, whose features have no ``area_m2``).
    """
    import pyarrow.parquet as pq

    counts = dict.fromkeys((ly.name for ly in layers), 0)
    sums = dict.fromkeys(counts, 0.0)
    by_id = {cid: ly.name for ly in layers for cid in ly.ids}
    for p in parts:
        table = pq.read_table(p, columns=["class_id", "area_m2"])
        ids = table.column("class_id").to_numpy()
        area = table.column("area_m2").to_numpy(zero_copy_only=False).astype(float)
        for cid, name in by_id.items():
            sel = ids == cid
            counts[name] += int(sel.sum())
            sums[name] += float(np.nansum(area[sel]))
    areas = {name: (sums[name] if geo else None) for name in counts}
    return counts, areas


def write_outputs(
    staging: str,
    out_dir: str,
    parts: list[str],
    layers: list[Layer],
    formats: Sequence[str],
    src: MaskSource,
    out_crs: str | None,
    precision: int,
    params: VectorParams,
    project: bool,
    image: str | None = None,
    imagery: bool = True,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Write every format (and the QGIS project) into staging, then publish them into ``out_dir``.

    Parameters
    ----------
    staging : str
        The run's staging folder (files go to ``staging/out``).
    out_dir : str
        The output folder.
    parts : list of str
        Parquet parts holding the features.
    layers : list of Layer
        One layer per class.
    formats : sequence of str
        Output formats.
    src : MaskSource
        The mask.
    out_crs : str or None
        CRS of the GeoPackage, FlatGeobuf and GeoParquet outputs.
    precision : int
        GeoJSON coordinate decimals.
    params : VectorParams
        Vectorisation parameters (connectivity decides Polygon or MultiPolygon).
    project : bool
        Also write ``project.qgz`` (with ``gpkg``).
    image : str, optional
        The imagery under the layers in the project (default: the input named by the run.json beside the mask).
    imagery : bool
        Draw the input imagery under the layers (False: there is no file to draw, e.g. boxes found in an array).

    Returns
    -------
    written : dict
        Format -> relative path(s), as listed in ``vectors.json``.
    timings : dict
        Format -> seconds spent writing it.
    """
    gb = src.geobox
    # 4-connected regions are single polygons; 8-connected ones may join at corners
    gtype = "Polygon" if params.connectivity == 4 else "MultiPolygon"
    # edges longer than 64 pixels get intermediate vertices before reprojection
    densify = 64 * max(abs(gb.transform[0]), abs(gb.transform[4])) if gb.crs else None
    staged: dict[str, str] = {}  # final relative path -> staged path
    timings: dict[str, float] = {}
    written: dict[str, Any] = {}
    os.makedirs(os.path.join(staging, "out", VECTOR_DIR), exist_ok=True)
    os.makedirs(os.path.join(staging, "out", STYLE_DIR), exist_ok=True)

    def batches(layer: Layer, dst: str | None, prec: int | None = None):
        b = layer_batches(parts, layer, src_crs=gb.crs, dst_crs=dst, densify=densify, precision=prec)
        return _promote(b) if gtype == "MultiPolygon" else b

    for fmt in formats:
        t = time.perf_counter()
        if fmt == "coco":
            path = os.path.join(staging, "out", COCO_NAME)
            _coco(src, parts, layers, params.connectivity, staging, path)
            staged[COCO_NAME] = path
            written["coco"] = COCO_NAME
        elif fmt == "gpkg":
            _write_gpkg(os.path.join(staging, "out"), layers, batches, out_crs, gtype, staged, written)
        else:
            rels = []
            for ly in layers:
                rel = os.path.join(VECTOR_DIR, ly.name + EXTENSIONS[fmt])
                path = os.path.join(staging, "out", rel)
                if fmt == "geojson":
                    dst = "EPSG:4326" if gb.crs else None
                    write_layer(
                        fmt,
                        path,
                        ly,
                        batches(ly, dst, precision if gb.crs else None),
                        crs=dst,
                        geometry_type=gtype,
                        precision=precision,
                    )
                else:
                    write_layer(fmt, path, ly, batches(ly, out_crs), crs=out_crs, geometry_type=gtype)
                staged[rel] = path
                rels.append(rel)
            written[fmt] = rels
        timings[fmt] = time.perf_counter() - t
    if project and "gpkg" in formats:
        image_layer = _imagery(src, out_dir, image) if imagery else None
        _write_project(os.path.join(staging, "out"), out_dir, src, parts, layers, out_crs, staged, written, image_layer)
    publish(out_dir, staged)
    return written, timings


def _write_gpkg(
    out: str, layers: list[Layer], batches: Callable, out_crs: str | None, gtype: str, staged: dict, written: dict
) -> None:
    """The GeoPackage (every layer, styles stored inside) and ``styles/<layer>.qml``, staged under ``out``."""
    path = os.path.join(out, GPKG_NAME)
    for ly in layers:
        write_layer("gpkg", path, ly, batches(ly, out_crs), crs=out_crs, geometry_type=gtype)
    qml = {ly.name: qgis.layer_qml(ly.color, label=ly.name) for ly in layers}
    qgis.store_styles(path, qml)
    staged[GPKG_NAME] = path
    written["gpkg"] = GPKG_NAME
    for ly in layers:
        rel = os.path.join(STYLE_DIR, ly.name + ".qml")
        p = os.path.join(out, rel)
        with open(p, "w") as f:
            f.write(qml[ly.name])
        staged[rel] = p
    written["styles"] = [os.path.join(STYLE_DIR, ly.name + ".qml") for ly in layers]


def _write_project(
    out: str,
    out_dir: str,
    src: MaskSource,
    parts: list[str],
    layers: list[Layer],
    out_crs: str | None,
    staged: dict,
    written: dict,
    imagery: TrueColour | None = None,
) -> None:
    """``project.qgz``: the input ``imagery``, the mask (by paths relative to ``out_dir``; none when
    ``src`` has no classes, as a detector's boxes) and every GeoPackage layer, styled.
    """
    gb = src.geobox
    raster = None
    if src.classes:
        raster = (os.path.relpath(src.path, out_dir), "mask", {c.id: (tuple(c.color), c.name) for c in mask_classes(src)})
    path = os.path.join(out, PROJECT_NAME)
    write_project(
        path,
        title=f"geoseg {os.path.basename(src.path)}",
        crs=out_crs,
        extent=_extent(parts, layers, gb, out_crs),
        raster=raster,
        vectors=[(GPKG_NAME, ly.name, legend_label(ly.name)) for ly in layers],
        qml={ly.name: qgis.layer_qml(ly.color, label=ly.name) for ly in layers},
        raster_crs=gb.crs,
        imagery=imagery,
    )
    staged[PROJECT_NAME] = path
    written["project"] = PROJECT_NAME


def _imagery(src: MaskSource, out_dir: str, image: str | None = None):
    """The input imagery (``image``, else the mask's run.json's ``input.path``) and its stretch, by its path from
    ``out_dir``; or None.
    """
    import dataclasses

    if image is None:
        image = _source_image(src)
        if image == src.path:
            return None
    if not os.path.isabs(image) and not os.path.exists(image):  # a relative path run.json kept: try beside the mask
        image = os.path.join(os.path.dirname(src.path), image)
    found = true_colour(image)
    return dataclasses.replace(found, path=project_source(image, out_dir)) if found is not None else None


def _source_image(src: MaskSource) -> str:
    """The image a mask was predicted from (its run.json's input), else the mask itself."""
    try:
        with open(os.path.join(os.path.dirname(src.path), "run.json")) as f:
            return str(json.load(f)["input"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return src.path


def _coco(src: MaskSource, parts: list[str], layers: list[Layer], connectivity: int, staging: str, path: str) -> int:
    """The COCO file of one mask: one image, a category per layer, an instance per polygon (one task per part)."""
    import dask

    gb = src.geobox
    folder = os.path.join(staging, "coco-parts")
    os.makedirs(folder, exist_ok=True)
    ids = [ly.class_id for ly in layers]
    outs = [os.path.join(folder, f"{k:05d}.jsonl") for k in range(len(parts))]
    tasks = [
        dask.delayed(annotate_part, pure=True)(src, part, ids, connectivity, out) for part, out in zip(parts, outs, strict=True)
    ]
    compute_tasks(tasks)
    image = {"file_name": os.path.basename(_source_image(src)), "width": gb.width, "height": gb.height}
    return write_coco_stream(path, image, [(ly.class_id, ly.name) for ly in layers], outs)


def _old_outputs(out_dir: str) -> set[str]:
    """Files a previous vectors.json in ``out_dir`` lists (relative paths inside the folder)."""
    try:
        with open(os.path.join(out_dir, REPORT_NAME)) as f:
            outputs = json.load(f).get("outputs", {})
    except (OSError, ValueError, AttributeError):
        return set()
    rels: set[str] = set()
    for v in outputs.values() if isinstance(outputs, dict) else ():
        for rel in [v] if isinstance(v, str) else v if isinstance(v, list) else ():
            if isinstance(rel, str) and not os.path.isabs(rel) and ".." not in rel.split(os.sep):
                rels.add(rel)
    return rels


def publish(out_dir: str, staged: dict[str, str]) -> None:
    """Move staged files into place; vectors.json (written after) is absent until all are in place.

    Files of a previous run that this one does not write (other classes or formats) are removed,
    so the folder never mixes two runs.

    Parameters
    ----------
    out_dir : str
        The output folder.
    staged : dict
        Relative path in ``out_dir`` -> staged file.

    Raises
    ------
    OutputError
        A file could not be put in place.
    """
    old = _old_outputs(out_dir)
    final = os.path.join(out_dir, REPORT_NAME)
    try:
        if os.path.exists(final):
            os.remove(final)
        for rel, path in staged.items():
            final = os.path.join(out_dir, rel)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            fsync_replace(path, final)
        for rel in sorted(old - set(staged)):
            final = os.path.join(out_dir, rel)
            if os.path.isfile(final):
                os.remove(final)
    except OSError as exc:
        raise OutputError(f"{final}: could not put the new file in place ({exc}); check the folder and rerun") from exc


def _extent(parts, layers, gb, out_crs) -> tuple[float, float, float, float] | None:
    b = gb.bounds
    if gb.crs and out_crs and out_crs != gb.crs:
        box = reproject(np.array([shapely.box(*b)]), gb.crs, out_crs, densify=(b[2] - b[0]) / 16)[0]
        return tuple(shapely.bounds(box))
    return tuple(b)


def _promote(batches):
    """Polygon -> MultiPolygon in WKB batches, for layers declared MultiPolygon."""
    import pyarrow as pa

    for b in batches:
        geoms = shapely.from_wkb(b.column(b.schema.get_field_index("geometry")).to_numpy(zero_copy_only=False))
        single = shapely.get_type_id(geoms) == 3
        if single.any():
            geoms[single] = shapely.multipolygons(geoms[single][:, None])
        cols = [b.column(i) for i in range(b.num_columns)]
        cols[b.schema.get_field_index("geometry")] = pa.array(shapely.to_wkb(geoms), type=pa.binary())
        yield pa.record_batch(cols, schema=b.schema)
