"""A detector's boxes as styled polygon layers, through the same attribute code and writers as a mask's polygons.

:func:`write_detections` takes what :func:`geoseg.engine.detect.detect` found (boxes in raster
pixel coordinates) and writes, into one output folder, a layer per class in every format
vectorize writes (GeoPackage with styles, GeoJSON RFC 7946, FlatGeobuf, GeoParquet), the QGIS
project over the input imagery, ``vectors.json`` and ``run.json`` (counts per class; no mask).
Each box gets the attributes of a segmented object (:func:`geoseg.vector.attributes.features_table`:
``area_m2``, ``perimeter_m``, ``length_m``/``width_m``/``heading_deg`` ...), ``score`` and ``class``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import shapely

from geoseg.classes import object_kind
from geoseg.engine.detect import Detections
from geoseg.engine.report import RunReport
from geoseg.io.mask import MaskSource
from geoseg.io.outdir import make_staging, output_lock, sweep_staging, write_json_atomic
from geoseg.vector.attributes import features_table, write_part
from geoseg.vector.geometry import metric_crs
from geoseg.vector.layers import REPORT_NAME, check_out, layer_names, layer_totals, planned_outputs, write_outputs
from geoseg.vector.options import DEFAULT_FORMATS, check_formats, geojson_precision, output_crs
from geoseg.vector.params import VectorParams, pixel_size_m
from geoseg.vector.polygonize import Pieces
from geoseg.vector.report import VectorReport, vector_record
from geoseg.vector.stac import ITEM_NAME
from geoseg.vector.writers import Layer

__all__ = ["RUN_NAME", "write_detections"]

RUN_NAME = "run.json"
STAGING_PREFIX = ".geoseg-dstaging-"
#: what an earlier run leaves in a folder that a detector's run replaces (it writes no mask; its item.json comes after)
STALE = ("mask.tif", "mask.qml", "mask.tif.aux.xml", "mask.png", "probabilities.tif", ITEM_NAME)


def write_detections(
    found: Detections,
    out_dir: str | os.PathLike,
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    crs: str | None = None,
    precision: int | None = None,
    project: bool = True,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> tuple[RunReport, VectorReport]:
    """Write a detector's boxes as one polygon layer per class, with ``vectors.json`` and ``run.json``.

    Parameters
    ----------
    found : Detections
        What :func:`geoseg.engine.detect.detect` returned.
    out_dir : str or os.PathLike
        Output folder: ``geoseg.gpkg``, ``vectors/<class>.geojson``, ``styles/<class>.qml``,
        ``project.qgz``, ``vectors.json``, ``run.json`` (no ``mask.tif``: a detector gives boxes).
    formats : sequence of str
        Any of ``geojson``, ``gpkg``, ``fgb``, ``parquet``.
    crs : str, optional
        CRS of the GeoPackage, FlatGeobuf and GeoParquet layers (default the raster's); GeoJSON
        is always EPSG:4326 (RFC 7946).
    precision : int, optional
        GeoJSON coordinate decimals (default 7, more for pixels under 10 cm).
    project : bool
        Also write ``project.qgz`` (the input imagery and every layer, styled; with ``gpkg``).
    overwrite : bool
        Replace existing outputs.
    extra : dict, optional
        More entries for ``run.json`` (e.g. the scheduler used).

    Returns
    -------
    run : RunReport
        The ``run.json`` record: input, model, parameters (``conf``, ``iou``), ``detections``
        (total, per class, the layer files; ``mask`` says there is none).
    vectors : VectorReport
        The ``vectors.json`` record: layers with their feature counts, files written.
    """
    t0 = time.perf_counter()
    out_dir = os.path.abspath(os.fspath(out_dir))
    formats = tuple(f for f in check_formats(formats, 4) if f != "coco")  # COCO instances come from masks
    job = found.job
    image = getattr(job.source, "path", None)  # an xarray input has none: no imagery to draw, its label names it
    src = MaskSource(path=image or job.source.label, geobox=job.source.geobox, classes=())
    out_crs = output_crs(src.path, src.geobox.crs, crs, "its boxes")
    params = _params(found, src, crs, formats)
    precision = geojson_precision(src, formats, precision, params.pixel_size_m)
    layers = _layers(found)
    outputs = [*planned_outputs(formats, [ly.name for ly in layers], project), RUN_NAME]
    check_out(out_dir, outputs, overwrite)
    with output_lock(out_dir):  # one writer per folder: a second run is refused
        check_out(out_dir, outputs, overwrite)
        sweep_staging(out_dir, STAGING_PREFIX)
        staging = make_staging(out_dir, STAGING_PREFIX, params.run_id)
        try:
            if overwrite:  # run.json describes the files beside it: no mask of an earlier run may stay
                for name in (RUN_NAME, *STALE):
                    if os.path.isfile(os.path.join(out_dir, name)):
                        os.remove(os.path.join(out_dir, name))
            parts = _parts(found, src, params, staging)
            counts, areas = layer_totals(parts, layers, geo=src.geobox.crs is not None)
            written, write_s = write_outputs(
                staging, out_dir, parts, layers, formats, src, out_crs, precision, params, project, image, image is not None
            )
            parameters = {"crs": out_crs, "formats": list(formats), "precision": precision}
            vrecord = vector_record(src, params, out_crs, parameters, layers, counts, written, None, write_s, t0)
            write_json_atomic(os.path.join(out_dir, REPORT_NAME), vrecord, indent=2)
            record = found.record(written, extra)
            writing = time.perf_counter() - t0  # planning, the chunk tasks and the merge came before (found.timings)
            total = job.timings.get("predict_call_s", 0.0) + sum(found.timings.values()) + writing
            record["timings"].update(write_s=round(writing, 3), total_s=round(total, 3))
            write_json_atomic(os.path.join(out_dir, RUN_NAME), record, indent=2)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return RunReport(record, out_dir), VectorReport(vrecord, out_dir, areas)


def _kinds(found: Detections) -> tuple[tuple[int, str], ...]:
    """Each class's kind of object (``object``, or ``ship``/``tank``/``building`` by its name): never an area."""
    return tuple((c.id, object_kind(c.name, "object")) for c in found.job.card.classes)


def _params(found: Detections, src: MaskSource, crs: str | None, formats: Sequence[str]) -> VectorParams:
    """What the attribute code needs: class names and kinds, the metric CRS, the run id."""
    gb = src.geobox
    classes = found.job.card.classes
    mcrs = metric_crs(gb.crs, gb.bounds) if gb.crs else None
    h = hashlib.sha256(found.job.spec.sha256.encode())
    h.update(json.dumps([src.path, found.job.source.fingerprint, crs, list(formats), str(found.detector)]).encode())
    return VectorParams(
        classes=tuple(c.id for c in classes),
        names=tuple((c.id, c.name) for c in classes),
        kinds=_kinds(found),
        run_id=h.hexdigest()[:16],
        metric_crs=mcrs,
        pixel_size_m=pixel_size_m(src, mcrs),
    )


def _layers(found: Detections) -> list[Layer]:
    """One layer per class of the model (empty ones too: a count of zero is an answer)."""
    classes = found.job.card.classes
    names = layer_names(classes)
    kinds = dict(_kinds(found))
    return [Layer(names[c.id], c.id, kinds[c.id], tuple(c.color)) for c in classes]


def _parts(found: Detections, src: MaskSource, params: VectorParams, staging: str) -> list[str]:
    """The boxes' attribute table as one parquet part (the writers stream the layers from it)."""
    boxes = found.boxes
    if not len(boxes):
        return []
    area = shapely.area(boxes.geometry)
    pieces = Pieces(
        geometry=boxes.geometry,
        class_id=boxes.class_id,
        count=np.rint(area).astype(np.int64),  # area_px: the box's area in pixels
        prob_sum=np.full(len(boxes), np.nan),
        first=np.arange(len(boxes), dtype=np.int64),  # the id: rank, best first (the same for any chunking)
        seam=np.zeros(len(boxes), bool),
        chunk=np.full(len(boxes), -1, np.int32),
    )
    table = features_table(pieces, src, params, score=boxes.score)
    os.makedirs(os.path.join(staging, "parts"))
    path = os.path.join(staging, "parts", "part-boxes.parquet")
    write_part(table, path)
    return [path]
