"""Vectorise a class mask in parallel: Dask chunk tasks, the seam merge, attributes, writers.

Data flow::

    mask.tif ─(chunk windows)─▶ polygonize_block ─┬─ interior pieces ─▶ attributes ─▶ part-NNNN.parquet
                                                  └─ seam pieces (WKB) ─▶ merge_seams ─▶ attributes ─▶ part-seams.parquet
    parts ─(per class, batch by batch, reprojected)─▶ GeoJSON (EPSG:4326) / GeoPackage + styles / FlatGeobuf / GeoParquet
    ─▶ project.qgz, vectors.json

Each task opens the mask by path and returns only the pieces that touch a chunk seam, so no
process ever holds the whole raster, and the client holds only seam polygons.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely

from geoseg.classes import NODATA
from geoseg.errors import DiskFullError, GeosegError, InputError, OutputError
from geoseg.grid import Window
from geoseg.io.mask import MaskClass, MaskSource, open_mask, read_mask_window, read_prob_window
from geoseg.io.outdir import (
    atomic_path,
    check_is_folder,
    disk_full_now,
    disk_full_reason,
    existing_outputs,
    fsync_replace,
    make_staging,
    output_lock,
    sweep_staging,
    write_json_atomic,
)
from geoseg.models.card import default_palette
from geoseg.vector.coco import annotate_part, write_coco_stream
from geoseg.vector.geometry import metric_crs, object_kind, oriented_box, pixel_to_world, regularize, reproject, to_metric
from geoseg.vector.polygonize import Pieces, merge_seams, polygonize_block
from geoseg.vector.writers import EXTENSIONS, FORMATS, Layer, layer_batches, write_layer

__all__ = ["VectorParams", "features_table", "vectorize"]

GPKG_NAME = "geoseg.gpkg"
PROJECT_NAME = "project.qgz"
REPORT_NAME = "vectors.json"
COCO_NAME = "coco.json"
VECTOR_DIR = "vectors"
STYLE_DIR = "styles"
DEFAULT_FORMATS = ("geojson", "gpkg")
#: class names never vectorised unless asked for by name or id
BACKGROUND_NAMES = {"background", "other", "none", "nodata", "no_data", "unlabeled", "unlabelled", "clear", "no_change"}


@dataclass(frozen=True)
class VectorParams:
    """Everything a chunk task needs besides its window (small, hashable, travels in the graph)."""

    classes: tuple[int, ...]
    names: tuple[tuple[int, str], ...]
    kinds: tuple[tuple[int, str], ...]
    connectivity: int = 4
    min_area: float = 0.0
    max_length: float = 0.0  # objects longer than this (m; oriented box) dropped; 0 = no limit
    simplify: float = 0.0
    regularize: bool = False
    run_id: str = ""
    metric_crs: str | None = None
    pixel_size_m: float = 1.0
    lonlat_crs: str = "EPSG:4326"
    extra: tuple[tuple[str, Any], ...] = field(default=())
    attributes: tuple[tuple[str, str], ...] = ()

    @property
    def simplify_px(self) -> float:
        """Simplification tolerance in pixels."""
        return self.simplify / self.pixel_size_m if self.simplify > 0 else 0.0


def _pixel_size_m(src: MaskSource, mcrs: str | None) -> float:
    """Side of one pixel in metres (pixels in pixel space), at the raster centre."""
    gb = src.geobox
    if mcrs is None or gb.crs is None:
        return 1.0
    cx, cy = gb.width / 2, gb.height / 2
    square = pixel_to_world(np.array([shapely.box(cx, cy, cx + 1, cy + 1)]), gb.transform)
    area = shapely.area(to_metric(square, gb.crs, mcrs)[0])[0]
    return float(math.sqrt(area))


def features_table(pieces: Pieces, src: MaskSource, params: VectorParams):
    """Georeference pieces, drop small ones, measure them, and return an Arrow table.

    Parameters
    ----------
    pieces : Pieces
        Finished polygons (interior pieces or merged seam objects), in pixel coordinates.
    src : MaskSource
        The mask (grid and CRS).
    params : VectorParams
        Vectorisation parameters.

    Returns
    -------
    pyarrow.Table
        Columns of :mod:`geoseg.vector.writers` plus WKB ``geometry`` in the mask's CRS.
    """
    import pyarrow as pa

    gb = src.geobox
    names = dict(params.names)
    kinds = dict(params.kinds)
    world = pixel_to_world(pieces.geometry, gb.transform)
    n = len(world)
    if gb.crs and params.metric_crs:
        metric, metric_crss = to_metric(world, gb.crs, params.metric_crs)
        area = shapely.area(metric)
        perim = shapely.length(metric)
        size = area
    else:  # pixel space: no metres; sizes in pixels
        metric, metric_crss = world, np.full(n, None, dtype=object)
        area = shapely.area(world)
        perim = shapely.length(world)
        size = pieces.count.astype(np.float64)
    keep = size >= params.min_area if params.min_area > 0 else np.ones(n, bool)
    if params.max_length > 0 and gb.crs:  # too long to be one object of the model's kind (a breakwater)
        kinds_ = np.array([kinds[int(c)] for c in pieces.class_id], dtype=object)
        sel = np.flatnonzero(keep & (kinds_ != "area"))
        if len(sel):
            length = oriented_box(metric[sel])[0]
            keep[sel[length > params.max_length]] = False
    if not keep.all():
        pieces, world, metric, area, perim = pieces.take(keep), world[keep], metric[keep], area[keep], perim[keep]
        metric_crss = metric_crss[keep]
        n = len(world)
    cols: dict[str, np.ndarray] = {
        "id": pieces.first,
        "class": np.array([names[int(c)] for c in pieces.class_id], dtype=object),
        "class_id": pieces.class_id.astype(np.int16),
        "run_id": np.full(n, params.run_id, dtype=object),
        "area_px": pieces.count,
    }
    for key, value in params.attributes:  # constant attributes (e.g. the dates of a change)
        cols[key] = np.full(n, value, dtype=object)
    kind = np.array([kinds[int(c)] for c in pieces.class_id], dtype=object)
    nan = np.full(n, np.nan)
    extra = {k: nan.copy() for k in ("area_ha", "diameter_m", "circularity", "center_lon", "center_lat")}
    extra.update(length_m=nan.copy(), width_m=nan.copy(), heading_deg=nan.copy())
    sel = kind == "area"
    extra["area_ha"][sel] = area[sel] / 1e4
    sel = kind == "tank"
    if sel.any():
        extra["diameter_m"][sel] = 2.0 * np.sqrt(area[sel] / math.pi)
        radius = shapely.minimum_bounding_radius(metric[sel])
        extra["circularity"][sel] = np.where(radius > 0, area[sel] / (math.pi * radius**2), np.nan)
        centre = shapely.centroid(world[sel])
        if gb.crs:
            centre = reproject(centre, gb.crs, params.lonlat_crs)
        extra["center_lon"][sel] = shapely.get_x(centre)
        extra["center_lat"][sel] = shapely.get_y(centre)
    sel = (kind == "ship") | (kind == "object")
    if sel.any():
        extra["length_m"][sel], extra["width_m"][sel], extra["heading_deg"][sel] = oriented_box(metric[sel])
    if params.regularize:
        sel = np.flatnonzero(kind == "building")
        tol = 1.5 * (params.pixel_size_m if gb.crs else max(abs(gb.transform.a), abs(gb.transform.e)))
        for k in sel:
            reg = regularize(metric[k], tol)
            if reg is not metric[k]:
                metric[k] = reg
                world[k] = reproject(np.array([reg]), metric_crss[k], gb.crs)[0] if gb.crs else reg
        if len(sel):
            area[sel] = shapely.area(metric[sel])
            perim[sel] = shapely.length(metric[sel])
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(pieces.count > 0, pieces.prob_sum / pieces.count, np.nan)
    if not gb.crs:  # pixel space: no metres (area_px stays; min_area above was in pixels)
        area = perim = nan
        extra = {k: (v if k in ("center_lon", "center_lat") else nan) for k, v in extra.items()}
    cols.update(area_m2=area, perimeter_m=perim, score=score, **extra)
    world = shapely.orient_polygons(world)
    arrays = {k: pa.array(v, from_pandas=True) for k, v in cols.items()}
    arrays["geometry"] = pa.array(shapely.to_wkb(world), type=pa.binary())
    return pa.table(arrays)


def _write_part(table, path: str) -> None:
    import pyarrow.parquet as pq

    tmp = atomic_path(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _vectorize_chunk(src: MaskSource, params: VectorParams, window: Window, index: int, part: str) -> dict[str, Any]:
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
            _write_part(table, part)
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


def _chunk_windows(height: int, width: int, chunk: int) -> list[Window]:
    return [
        Window(r, c, min(chunk, height - r), min(chunk, width - c))
        for r in range(0, height, chunk)
        for c in range(0, width, chunk)
    ]


def _resolve_classes(src: MaskSource, classes: Sequence[str | int] | None) -> tuple[list[MaskClass], list[int]]:
    """Known classes (filled in for values without metadata) and the ids to vectorise."""
    known = {c.id: c for c in src.classes}
    palette = default_palette(256)
    if classes is None or (len(classes) == 1 and str(classes[0]).lower() == "all"):
        wanted_all = classes is not None
        if not src.named:  # no class list: the values present (found while reading), 0 counting as background
            ids = list(range(0 if wanted_all else 1, NODATA))
        else:
            ids = [c.id for c in src.classes if wanted_all or (c.name.lower() not in BACKGROUND_NAMES and c.name != "class_0")]
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
                raise InputError(f"{src.path}: unknown class {s!r} in --classes; known classes: {names}")
    full = [known.get(i) or MaskClass(i, f"class_{i}", tuple(palette[i % len(palette)])) for i in range(NODATA)]
    full = [c if c.color else MaskClass(c.id, c.name, tuple(palette[c.id % len(palette)])) for c in full]
    return full, sorted(set(ids))


def _run_id(src: MaskSource, params: dict[str, Any]) -> str:
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


def vectorize(
    mask: str,
    out_dir: str,
    *,
    probabilities: str | None = None,
    classes: Sequence[str | int] | None = None,
    min_area: float | None = None,
    simplify: float = 0.0,
    connectivity: int = 4,
    crs: str | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    precision: int | None = None,
    regularize: bool = False,
    chunk: int = 2048,
    project: bool = True,
    overwrite: bool = False,
    progress: bool = False,
    attributes: dict[str, str] | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """Turn a class mask into styled polygon layers, one per class.

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
    progress : bool
        Show a progress bar.
    attributes : dict, optional
        Constant text attributes added to every feature (e.g. ``date_before``).
    kind : str, optional
        Treat every class as this kind (``area``: hectares; change transitions) instead of
        guessing it from the class name.

    Returns
    -------
    dict
        The report also written to ``vectors.json``.
    """
    import dask

    from geoseg.engine.write import compute_tasks

    t_start = time.perf_counter()
    formats = tuple(dict.fromkeys(f.strip().lower() for f in formats))
    bad = [f for f in formats if f not in (*FORMATS, "coco")]
    if bad or not formats:
        raise InputError(f"unknown vector format(s) {bad or formats}; choose from {', '.join(FORMATS)}, coco")
    if connectivity not in (4, 8):
        raise InputError(f"--connectivity must be 4 or 8, got {connectivity}")
    src = None
    if min_area is None:  # the model's object rules, from the mask's metadata
        src = open_mask(mask, None)
        rules = dict(src.object_rules)
        min_area = rules.get("min_area_m2", 0.0)
        max_length = rules.get("max_length_m", 0.0)
    else:
        max_length = 0.0
    for name, value in (("--min-area", min_area), ("--simplify", simplify)):
        if not math.isfinite(value) or value < 0:
            raise InputError(f"{name} must be a finite number >= 0, got {value!r}; give e.g. {name} 0")
    if probabilities is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(mask)), "probabilities.tif")
        probabilities = beside if os.path.exists(beside) else None
    src = open_mask(mask, probabilities)
    gb = src.geobox
    if gb.crs is None and crs:
        raise InputError(f"{mask}: has no CRS, so it cannot be reprojected to {crs}; leave out --crs")
    out_crs = crs or gb.crs
    if gb.crs is None and formats == DEFAULT_FORMATS:
        formats = (*formats, "coco")  # a plain image: objects also as COCO instances (pixel coordinates)
    if crs:
        from pyproj import CRS
        from pyproj.exceptions import CRSError

        try:
            CRS.from_user_input(crs)
        except CRSError as exc:
            raise InputError(f"--crs {crs!r} is not a CRS pyproj knows ({exc}); use e.g. EPSG:32632") from exc

    out_dir = os.path.abspath(out_dir)
    full, ids = _resolve_classes(src, classes)
    layer_names = _layer_names(full)
    mcrs = metric_crs(gb.crs, gb.bounds) if gb.crs else None
    chunk = max(src.block, math.ceil(chunk / src.block) * src.block)
    run_params = {
        "classes": ids,
        "min_area": min_area,
        "max_length": max_length,
        "simplify": simplify,
        "connectivity": connectivity,
        "regularize": regularize,
        "crs": out_crs,
        "attributes": dict(attributes or {}),
        "kind": kind,
    }
    kind_of = (lambda _name: kind) if kind else object_kind
    params = VectorParams(
        classes=tuple(ids),
        names=tuple((c.id, c.name) for c in full),
        kinds=tuple((c.id, kind_of(c.name)) for c in full),
        attributes=tuple(sorted((str(k), str(v)) for k, v in (attributes or {}).items())),
        connectivity=connectivity,
        min_area=min_area,
        max_length=max_length,
        simplify=simplify,
        regularize=regularize,
        run_id=_run_id(src, run_params),
        metric_crs=mcrs,
        pixel_size_m=_pixel_size_m(src, mcrs),
    )
    if gb.crs and "geojson" in formats:
        # a rounding step of at most a tenth of a pixel keeps every polygon's shape
        needed = max(0, math.ceil(-math.log10(params.pixel_size_m / 111_320.0 / 10.0)))
        if precision is None:
            precision = max(7, needed)
        elif precision < needed:
            raise InputError(
                f"--precision {precision} rounds lon/lat coarser than a tenth of a {params.pixel_size_m:.3g} m pixel; "
                f"use --precision {needed} or more"
            )
    precision = 7 if precision is None else precision
    outputs = _planned_outputs(formats, [layer_names[i] for i in ids], project)
    _check_out(out_dir, outputs, overwrite)
    lock = ExitStack()
    lock.enter_context(output_lock(out_dir))  # one writer per folder: a second run is refused
    staging = ""
    try:
        _check_out(out_dir, outputs, overwrite)  # again, now that no other run can be writing here
        sweep_staging(out_dir, ".geoseg-vstaging-")  # left by killed runs (never a live one)
        staging = make_staging(out_dir, ".geoseg-vstaging-", params.run_id)
        os.makedirs(os.path.join(staging, "parts"))
        windows = _chunk_windows(gb.height, gb.width, chunk)
        tasks = [
            dask.delayed(_vectorize_chunk, pure=True)(
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
        results = compute_tasks(tasks, progress)
        t1 = time.perf_counter()
        seam = Pieces.concat([Pieces.from_wire(r["seam"]) for r in results])
        merged = merge_seams(seam, connectivity)
        parts = [r["part"] for r in results if r["part"]]
        if len(merged):
            table = features_table(merged, src, params)
            if table.num_rows:
                path = os.path.join(staging, "parts", "part-seams.parquet")
                _write_part(table, path)
                parts.append(path)
        t2 = time.perf_counter()
        present = sorted({v for r in results for v in r["values"]})
        if not src.named and (classes is None or str(classes[0]).lower() == "all"):
            ids = [i for i in ids if i in present]
        extra_cols = tuple(k for k, _ in params.attributes)
        layers = [Layer(layer_names[i], i, kind_of(full[i].name), tuple(full[i].color), extra_cols) for i in ids]
        counts = _count(parts, layers)
        written, write_s = _write_outputs(staging, out_dir, parts, layers, formats, src, out_crs, precision, params, project)
        report = {
            "geoseg_vectors": 1,
            "run_id": params.run_id,
            "mask": src.path,
            "probabilities": src.prob_path,
            "crs": {"mask": gb.crs, "outputs": out_crs, "geojson": "EPSG:4326" if gb.crs else None, "metric": mcrs},
            "parameters": {**run_params, "formats": list(formats), "precision": precision, "chunk": chunk},
            "layers": [
                {"name": ly.name, "class_id": ly.class_id, "kind": ly.kind, "color": list(ly.color), "features": counts[ly.name]}
                for ly in layers
            ],
            "features": int(sum(counts.values())),
            "outputs": written,
            "chunks": len(windows),
            "seam_pieces": len(seam),
            "seam_objects": len(merged),
            "timings": {
                "chunks_wall_s": round(t1 - t0, 3),
                "read_task_s": round(sum(r["read_s"] for r in results), 3),
                "polygonize_task_s": round(sum(r["polygonize_s"] for r in results), 3),
                "attributes_task_s": round(sum(r["finish_s"] for r in results), 3),
                "merge_s": round(t2 - t1, 3),
                **{f"write_{k}_s": round(v, 3) for k, v in write_s.items()},
                "total_s": round(time.perf_counter() - t_start, 3),
            },
            "values_present": present,
        }
        write_json_atomic(os.path.join(out_dir, REPORT_NAME), report, indent=2)
        return report
    except DiskFullError as exc:  # name the folder the user chose, not a staging file that is removed now
        reason = disk_full_reason(exc) or "No space left on device"
        raise DiskFullError(f"{out_dir}: the disk is full ({reason}); free space or choose another --out") from None
    except OSError as exc:  # a write that failed for lack of room, reported by GDAL without its cause
        from geoseg.errors import OutputExistsError

        if isinstance(exc, OutputExistsError) or (isinstance(exc, GeosegError) and not isinstance(exc, OutputError)):
            raise
        reason = disk_full_reason(exc) or disk_full_now(staging or out_dir)
        if reason:
            raise DiskFullError(f"{out_dir}: the disk is full ({reason}); free space or choose another --out") from None
        raise
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
        lock.close()


#: Longest layer name (characters; also at most this many x 2 bytes in UTF-8): file names
#: ``vectors/<layer>.geojson`` and ``styles/<layer>.qml`` stay far below 255 bytes.
MAX_LAYER_NAME = 64


def _safe_name(name: str) -> str:
    """A file- and layer-safe name: letters, digits, ``_`` and ``-``; short in characters and bytes."""
    out = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name.strip())
    out = out[:MAX_LAYER_NAME]
    while len(out.encode("utf-8", "surrogatepass")) > 2 * MAX_LAYER_NAME:
        out = out[:-1]
    return out or "class"


def _layer_names(classes: Sequence[MaskClass]) -> dict[int, str]:
    """File-safe layer names, unique ignoring case (GeoPackage layer names are case-insensitive)."""
    names: dict[int, str] = {}
    taken: set[str] = set()
    for c in sorted(classes, key=lambda c: c.id):
        name = _safe_name(c.name)
        if name.lower() in taken:
            name = f"{name}_{c.id}"
        taken.add(name.lower())
        names[c.id] = name
    return names


def _planned_outputs(formats: Sequence[str], layer_names: Sequence[str], project: bool) -> list[str]:
    out = [REPORT_NAME]
    if "gpkg" in formats:
        out.append(GPKG_NAME)
        if project:
            out.append(PROJECT_NAME)
    if "coco" in formats:
        out.append(COCO_NAME)
    for f in formats:
        if f not in ("gpkg", "coco"):
            out += [os.path.join(VECTOR_DIR, n + EXTENSIONS[f]) for n in layer_names]
    return out


def _check_out(out_dir: str, outputs: Sequence[str], overwrite: bool) -> None:
    check_is_folder(out_dir)
    if not overwrite:
        existing = existing_outputs(out_dir, outputs)
        if existing:
            from geoseg.errors import OutputExistsError

            raise OutputExistsError(f"{os.path.join(out_dir, existing[0])}: already exists; pass --overwrite to replace it")
    parent = out_dir if os.path.isdir(out_dir) else os.path.dirname(out_dir) or "."
    if os.path.isdir(parent) and not os.access(parent, os.W_OK):
        raise OutputError(f"{out_dir}: not writable; choose another --out folder")


def _count(parts: Sequence[str], layers: Sequence[Layer]) -> dict[str, int]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts = dict.fromkeys((ly.name for ly in layers), 0)
    by_id = {ly.class_id: ly.name for ly in layers}
    for p in parts:
        col = pq.read_table(p, columns=["class_id"]).column("class_id")
        vc = pc.value_counts(col).to_pylist()
        for item in vc:
            name = by_id.get(int(item["values"]))
            if name:
                counts[name] += int(item["counts"])
    return counts


def _write_outputs(
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
) -> tuple[dict[str, Any], dict[str, float]]:
    from geoseg.vector import qgis

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
            path = os.path.join(staging, "out", GPKG_NAME)
            for ly in layers:
                write_layer("gpkg", path, ly, batches(ly, out_crs), crs=out_crs, geometry_type=gtype)
            qml = {ly.name: qgis.layer_qml(ly.color, label=ly.name) for ly in layers}
            qgis.store_styles(path, qml)
            staged[GPKG_NAME] = path
            written["gpkg"] = GPKG_NAME
            for ly in layers:
                rel = os.path.join(STYLE_DIR, ly.name + ".qml")
                p = os.path.join(staging, "out", rel)
                with open(p, "w") as f:
                    f.write(qml[ly.name])
                staged[rel] = p
            written["styles"] = [os.path.join(STYLE_DIR, ly.name + ".qml") for ly in layers]
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
        mask_rel = os.path.relpath(src.path, out_dir)
        raster = (mask_rel, "mask", {c.id: (tuple(c.color), c.name) for c in _mask_classes(src)}) if src.classes else None
        path = os.path.join(staging, "out", PROJECT_NAME)
        qgis.write_project(
            path,
            title=f"geoseg {os.path.basename(src.path)}",
            crs=out_crs,
            extent=_extent(parts, layers, gb, out_crs),
            raster=raster,
            vectors=[(GPKG_NAME, ly.name, ly.name) for ly in layers],
            qml={ly.name: qgis.layer_qml(ly.color, label=ly.name) for ly in layers},
            raster_crs=gb.crs,
        )
        staged[PROJECT_NAME] = path
        written["project"] = PROJECT_NAME
    _publish(out_dir, staged)
    return written, timings


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

    from geoseg.engine.write import compute_tasks

    gb = src.geobox
    folder = os.path.join(staging, "coco-parts")
    os.makedirs(folder, exist_ok=True)
    ids = [ly.class_id for ly in layers]
    outs = [os.path.join(folder, f"{k:05d}.jsonl") for k in range(len(parts))]
    tasks = [
        dask.delayed(annotate_part, pure=True)(src, part, ids, connectivity, out) for part, out in zip(parts, outs, strict=True)
    ]
    compute_tasks(tasks, False)
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


def _publish(out_dir: str, staged: dict[str, str]) -> None:
    """Move staged files into place; vectors.json (written after) is absent until all are in place.

    Files of a previous run that this one does not write (other classes or formats) are removed,
    so the folder never mixes two runs.
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


def _mask_classes(src: MaskSource) -> list[MaskClass]:
    palette = default_palette(256)
    return [c if c.color else MaskClass(c.id, c.name, tuple(palette[c.id % len(palette)])) for c in src.classes]


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
