"""Vectorise a class mask in parallel: the orchestration of Dask chunk tasks, the seam merge and the writers.

The chunk task, class resolution and run id stay beside :func:`vectorize` as the pieces it
orchestrates; its arguments are checked in :mod:`~geoseg.vector.options`.

Data flow::

    mask.tif ─(chunk windows)─▶ polygonize_block ─┬─ interior pieces ─▶ attributes ─▶ part-NNNN.parquet
                                                  └─ seam pieces (WKB) ─▶ merge_seams ─▶ attributes ─▶ part-seams.parquet
    parts ─(per class, batch by batch, reprojected)─▶ GeoJSON (EPSG:4326) / GeoPackage + styles / FlatGeobuf / GeoParquet
    ─▶ project.qgz, vectors.json

Each task opens the mask by path and returns only the pieces that touch a chunk seam, so no
process ever holds the whole raster, and the client holds only seam polygons. The rooms:
:mod:`~geoseg.vector.params` (what a task needs), :mod:`~geoseg.vector.attributes` (a chunk's
attribute table), :mod:`~geoseg.vector.layers` (layer names, planned outputs, writing, publishing).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np

from geoseg.classes import NODATA, default_palette, is_background, object_kind
from geoseg.engine.progress import compute_tasks, counter
from geoseg.errors import DiskFullError, GeosegError, InputError, OutputError, OutputExistsError
from geoseg.grid import Window, chunk_windows, regular_chunks
from geoseg.io.mask import MaskClass, MaskSource, read_mask_window, read_prob_window
from geoseg.io.outdir import (
    disk_full_now,
    disk_full_reason,
    make_staging,
    output_lock,
    sweep_staging,
    write_json_atomic,
)
from geoseg.vector.attributes import features_table, write_part
from geoseg.vector.geometry import metric_crs
from geoseg.vector.layers import (
    REPORT_NAME,
    check_out,
    layer_names,
    layer_totals,
    planned_outputs,
    safe_name,
    write_outputs,
)
from geoseg.vector.options import (
    DEFAULT_FORMATS,
    check_field,
    check_formats,
    geojson_precision,
    open_for_vectorize,
    size_rules,
)
from geoseg.vector.params import VectorParams, pixel_size_m
from geoseg.vector.polygonize import Pieces, merge_seams, polygonize_block
from geoseg.vector.report import VectorReport, vector_record
from geoseg.vector.writers import Layer

__all__ = ["vectorize"]


def vectorize(
    mask: str,
    out_dir: str,
    *,
    probabilities: str | None = None,
    classes: Sequence[str | int] | None = None,
    min_area: float | None = None,
    min_pixels: int | None = None,
    simplify: float = 0.0,
    connectivity: int = 4,
    crs: str | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    precision: int | None = None,
    regularize: bool = False,
    chunk: int = 2048,
    project: bool = True,
    overwrite: bool = False,
    progress: bool | Callable[[int, int, str], None] = False,
    attributes: dict[str, str] | None = None,
    kind: str | None = None,
    field: str | None = None,
) -> VectorReport:
    """Turn a class mask into styled polygon layers, one per class (or one layer with a value field).

    Runs on the active Dask scheduler (see :func:`geoseg.scheduler`): one task per chunk
    polygonises its window and writes the polygons that do not touch a chunk seam; the
    pieces cut by seams are merged on the client so the result equals vectorising the
    whole raster at once.

    Parameters
    ----------
    mask : str
        Class mask (``mask.tif`` from ``geoseg predict``; 255 = nodata).
    out_dir : str
        Output folder: ``geoseg.gpkg``, ``vectors/<class>.geojson|.fgb|.parquet``,
        ``styles/<class>.qml``, ``project.qgz``, ``vectors.json``.
    probabilities : str, optional
        Probabilities raster for the ``score`` attribute; default ``probabilities.tif``
        beside the mask when present.
    classes : sequence of str or int, optional
        Class names or values to vectorise; default every class but background ones
        (``background``, ``other``, ...; class 0 when the mask has no class names); ``["all"]``
        for every class.
    min_pixels : int, optional
        Minimum mapping unit of area classes (forest, water, land cover, change), in pixels:
        smaller patches are speckle and are not written. Default: the model's, carried by the
        mask (its card's ``mmu_px``, 4 for area models), else 0; ``0`` keeps every patch.
    min_area : float, optional
        Drop polygons smaller than this (m²; pixels for pixel-space masks). Default: the
        model's object rule carried by the mask (its card's ``objects.min_area_m2``), else 0;
        the model's ``max_length_m`` (objects longer than that are dropped) applies with it.
    simplify : float
        Topology-preserving simplification tolerance in metres (pixels in pixel space); 0 keeps
        the exact pixel outlines.
    connectivity : int
        4 (GDAL's default: diagonal pixels are separate polygons) or 8.
    crs : str, optional
        CRS of the GeoPackage, FlatGeobuf and GeoParquet outputs (default the mask's).
        GeoJSON is always EPSG:4326 (RFC 7946).
    formats : sequence of str
        Any of ``geojson``, ``gpkg``, ``fgb``, ``parquet``.
    precision : int, optional
        GeoJSON coordinate decimals; default 7 (about 1 cm), more for pixels under 10 cm.
        Decimals too coarse for the pixel size (a rounding step over a tenth of a pixel) are
        an error.
    regularize : bool
        Replace building outlines with right-angled footprints.
    chunk : int
        Chunk size in pixels (rounded up to the mask's block size).
    project : bool
        Also write ``project.qgz`` (a QGIS project with the mask and every layer, styled).
    overwrite : bool
        Replace existing outputs.
    progress : bool or callable
        Count the chunk windows polygonized, with MP/s and an ETA: True for a bar on a terminal
        (plain lines in logs), or a callable receiving ``(done, total, unit)``.
    attributes : dict, optional
        Constant text attributes added to every feature (e.g. ``date_before``).
    kind : str, optional
        Treat every class as this kind (``area``: hectares; change transitions) instead of
        guessing it from the class name.
    field : str, optional
        Write ONE layer, named after the mask file, holding the polygons of every value
        vectorised, with the pixel value in this attribute (as ``gdal_polygonize -f``): for
        rasters whose values are data, not classes (Hansen loss year 1..23). Polygons still
        merge only with neighbours of the same value; every value is an area (``area_ha``).

    Returns
    -------
    VectorReport
        What was written: the record also written to ``vectors.json`` (indexable like it), the
        output files and each layer's total area.
    """
    t_start = time.perf_counter()
    formats = check_formats(formats, connectivity)
    check_field(field, formats, attributes)
    kind = kind or ("area" if field else None)  # a value raster's polygons are areas
    min_area, max_length, min_pixels = size_rules(mask, min_area, min_pixels, simplify)
    src, out_crs, formats = open_for_vectorize(mask, probabilities, crs, formats)
    formats = tuple(f for f in formats if f != "coco") if field else formats  # COCO is per class
    out_dir = os.path.abspath(out_dir)
    full, ids = resolve_classes(src, classes)
    chunk = max(src.block, math.ceil(chunk / src.block) * src.block)
    run_params = {
        "classes": ids,
        "min_area": min_area,
        "max_length": max_length,
        **({"min_pixels": min_pixels} if min_pixels else {}),
        "simplify": simplify,
        "connectivity": connectivity,
        "regularize": regularize,
        "crs": out_crs,
        "attributes": dict(attributes or {}),
        "kind": kind,
        **({"field": field} if field else {}),
    }
    kind_of = (lambda _c: kind) if kind else (lambda c: object_kind(c.name, c.kind))
    params = _vector_params(src, full, run_params, kind_of)
    precision = geojson_precision(src, formats, precision, params.pixel_size_m)
    outputs = planned_outputs(formats, [ly.name for ly in _layers(mask, full, ids, params, kind_of, field)], project)
    check_out(out_dir, outputs, overwrite)
    lock = ExitStack()
    lock.enter_context(output_lock(out_dir))  # one writer per folder: a second run is refused
    staging = ""
    try:
        check_out(out_dir, outputs, overwrite)  # again, now that no other run can be writing here
        sweep_staging(out_dir, ".geoseg-vstaging-")  # left by killed runs (never a live one)
        staging = make_staging(out_dir, ".geoseg-vstaging-", params.run_id)
        run = _polygonize(src, params, staging, chunk, progress)
        if not src.named and (classes is None or str(classes[0]).lower() == "all"):
            ids = [i for i in ids if i in run.present]
        layers = _layers(mask, full, ids, params, kind_of, field)
        counts, areas = layer_totals(run.parts, layers, geo=src.geobox.crs is not None)
        written, write_s = write_outputs(staging, out_dir, run.parts, layers, formats, src, out_crs, precision, params, project)
        parameters = {**run_params, "formats": list(formats), "precision": precision, "chunk": chunk}
        record = vector_record(src, params, out_crs, parameters, layers, counts, written, run, write_s, t_start)
        write_json_atomic(os.path.join(out_dir, REPORT_NAME), record, indent=2)
        return VectorReport(record, out_dir, areas)
    except DiskFullError as exc:  # name the folder the user chose, not a staging file that is removed now
        reason = disk_full_reason(exc) or "No space left on device"
        raise DiskFullError(f"{out_dir}: the disk is full ({reason}); free space or choose another out_dir=") from None
    except OSError as exc:  # a write that failed for lack of room, reported by GDAL without its cause
        if isinstance(exc, OutputExistsError) or (isinstance(exc, GeosegError) and not isinstance(exc, OutputError)):
            raise
        reason = disk_full_reason(exc) or disk_full_now(staging or out_dir)
        if reason:
            raise DiskFullError(f"{out_dir}: the disk is full ({reason}); free space or choose another out_dir=") from None
        raise
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
        lock.close()


def _layers(
    mask: str, full: Sequence[MaskClass], ids: Sequence[int], params: VectorParams, kind_of: Callable, field: str | None
) -> list[Layer]:
    """The output layers: one per class id, or one value layer (named after the mask file) holding every id."""
    extra = tuple(k for k, _ in params.attributes)
    if field:
        name = safe_name(os.path.splitext(os.path.basename(mask))[0])
        color = tuple(full[ids[0]].color) if ids else (230, 25, 75)
        return [Layer(name, -1, "area", color, extra, field=field, values=tuple(ids))]  # a value raster's polygons are areas
    names = layer_names(full)
    return [Layer(names[i], i, kind_of(full[i]), tuple(full[i].color), extra) for i in ids]


def _vector_params(
    src: MaskSource, full: Sequence[MaskClass], run_params: dict[str, Any], kind_of: Callable[[MaskClass], str | None]
) -> VectorParams:
    """The parameters every chunk task carries: classes, names, kinds, size rules, metric CRS, run id."""
    gb = src.geobox
    mcrs = metric_crs(gb.crs, gb.bounds) if gb.crs else None
    return VectorParams(
        classes=tuple(run_params["classes"]),
        names=tuple((c.id, c.name) for c in full),
        kinds=tuple((c.id, kind_of(c)) for c in full),
        attributes=tuple(sorted((str(k), str(v)) for k, v in run_params["attributes"].items())),
        connectivity=run_params["connectivity"],
        min_area=run_params["min_area"],
        max_length=run_params["max_length"],
        min_pixels=run_params.get("min_pixels", 0),
        simplify=run_params["simplify"],
        regularize=run_params["regularize"],
        run_id=run_id(src, run_params),
        metric_crs=mcrs,
        pixel_size_m=pixel_size_m(src, mcrs),
    )


@dataclass(frozen=True)
class _ChunkRun:
    """What the chunk tasks and the seam merge left: the parquet parts and the numbers for the report."""

    results: list[dict[str, Any]]
    parts: list[str]
    present: list[int]
    seam_pieces: int
    seam_objects: int
    chunks_wall_s: float
    merge_s: float


def _polygonize(src: MaskSource, params: VectorParams, staging: str, chunk: int, progress: Any) -> _ChunkRun:
    """One Dask task per chunk window (interior pieces written as parts), then the seam pieces merged on the client."""
    import dask

    gb = src.geobox
    os.makedirs(os.path.join(staging, "parts"))
    windows = [w for row in chunk_windows(regular_chunks(gb.height, gb.width, chunk)) for w in row]
    tasks = [
        dask.delayed(vectorize_chunk, pure=True)(
            src,
            params,
            w,
            k,
            os.path.join(staging, "parts", f"part-{k:05d}.parquet"),
            dask_key_name=f"vectorize-{params.run_id}-{k}",
        )
        for k, w in enumerate(windows)
    ]
    t0 = time.perf_counter()
    count = counter(progress, len(tasks), "chunk windows", f"vectorize {os.path.basename(src.path)}", gb.width * gb.height)
    results = compute_tasks(tasks, count)
    t1 = time.perf_counter()
    seam = Pieces.concat([Pieces.from_wire(r["seam"]) for r in results])
    merged = merge_seams(seam, params.connectivity)
    parts = [r["part"] for r in results if r["part"]]
    if len(merged):
        table = features_table(merged, src, params)
        if table.num_rows:
            path = os.path.join(staging, "parts", "part-seams.parquet")
            write_part(table, path)
            parts.append(path)
    t2 = time.perf_counter()
    present = sorted({v for r in results for v in r["values"]})
    return _ChunkRun(results, parts, present, len(seam), len(merged), t1 - t0, t2 - t1)


def vectorize_chunk(src: MaskSource, params: VectorParams, window: Window, index: int, part: str) -> dict[str, Any]:
    """One Dask task: polygonise a chunk, write its finished features, return its seam pieces."""
    t0 = time.perf_counter()
    block = read_mask_window(src, window)
    prob = read_prob_window(src, window) if src.prob_bands else None
    t1 = time.perf_counter()
    pieces = polygonize_block(
        block,
        window.row_off,
        window.col_off,
        (src.geobox.height, src.geobox.width),
        classes=set(params.classes),
        connectivity=params.connectivity,
        prob=prob,
        prob_band=dict(src.prob_bands),
        simplify=params.simplify_px,
        chunk=index,
    )
    t2 = time.perf_counter()
    inner = pieces.take(~pieces.seam)
    rows = 0
    if len(inner):
        table = features_table(inner, src, params)
        rows = table.num_rows
        if rows:
            write_part(table, part)
    present = np.unique(block)
    return {
        "seam": pieces.take(pieces.seam).to_wire(),
        "rows": rows,
        "part": part if rows else None,
        "values": [int(v) for v in present if v != NODATA],
        "pieces": len(pieces),
        "read_s": t1 - t0,
        "polygonize_s": t2 - t1,
        "finish_s": time.perf_counter() - t2,
    }


def resolve_classes(src: MaskSource, classes: Sequence[str | int] | None) -> tuple[list[MaskClass], list[int]]:
    """Known classes (filled in for values without metadata) and the ids to vectorise."""
    known = {c.id: c for c in src.classes}
    palette = default_palette(256)
    if classes is None or (len(classes) == 1 and str(classes[0]).lower() == "all"):
        wanted_all = classes is not None
        if not src.named:  # no class list: the values present (found while reading), 0 counting as background
            ids = list(range(0 if wanted_all else 1, NODATA))
        else:
            ids = [c.id for c in src.classes if wanted_all or not is_background(c.name)]
    else:
        ids = []
        by_name = {c.name: c.id for c in src.classes}
        for c in classes:
            s = str(c).strip()
            if s in by_name:
                ids.append(by_name[s])
            elif s.isdigit() and int(s) < NODATA:
                ids.append(int(s))
            else:
                names = ", ".join(sorted(by_name)) or "none recorded; use class values"
                raise InputError(f"{src.path}: unknown class {s!r} in classes=; known classes: {names}")
    full = [known.get(i) or MaskClass(i, f"class_{i}", tuple(palette[i % len(palette)])) for i in range(NODATA)]
    full = [c if c.color else MaskClass(c.id, c.name, tuple(palette[c.id % len(palette)])) for c in full]
    return full, sorted(set(ids))


def run_id(src: MaskSource, params: dict[str, Any]) -> str:
    """Deterministic: the mask's content (head and tail bytes, size) and the parameters."""
    h = hashlib.sha256()
    try:
        size = os.path.getsize(src.path)
        with open(src.path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read(1 << 20))
        h.update(str(size).encode())
    except OSError:
        h.update(src.path.encode())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
