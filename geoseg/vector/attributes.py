"""The attribute table of a chunk's finished pieces: georeference, filter, measure, one Arrow table."""

from __future__ import annotations

import math
import os

import numpy as np
import shapely

from geoseg.grid import GeoBox
from geoseg.io.mask import MaskSource
from geoseg.io.outdir import atomic_path
from geoseg.vector.geometry import oriented_box, pixel_to_world, regularize, reproject, to_metric
from geoseg.vector.params import VectorParams
from geoseg.vector.polygonize import Pieces

__all__ = ["features_table", "write_part"]


def features_table(pieces: Pieces, src: MaskSource, params: VectorParams, score: np.ndarray | None = None):
    """Georeference pieces, drop small ones, measure them, and return an Arrow table.

    Parameters
    ----------
    pieces : Pieces
        Finished polygons (interior pieces or merged seam objects), in pixel coordinates.
    src : MaskSource
        The mask (grid and CRS).
    params : VectorParams
        Vectorisation parameters.
    score : numpy.ndarray, optional
        Each piece's score (a detector's boxes); default the mean class probability of its pixels.

    Returns
    -------
    pyarrow.Table
        Columns of :mod:`geoseg.vector.writers` plus WKB ``geometry`` in the mask's CRS.
    """
    import pyarrow as pa

    gb = src.geobox
    kinds = dict(params.kinds)
    world = pixel_to_world(pieces.geometry, gb.transform)
    metric, metric_crss, area, perim, size = _measure(pieces, world, gb, params)
    keep = _keep(pieces, metric, size, gb, params)
    if not keep.all():
        pieces, world, metric, area, perim = pieces.take(keep), world[keep], metric[keep], area[keep], perim[keep]
        metric_crss = metric_crss[keep]
        score = score[keep] if score is not None else None
    cols = _identity_columns(pieces, params)
    kind = np.array([kinds[int(c)] for c in pieces.class_id], dtype=object)
    extra = _kind_columns(kind, world, metric, area, gb, params)
    if params.regularize:
        _regularize_buildings(kind, world, metric, metric_crss, area, perim, gb, params)
    if score is None:
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(pieces.count > 0, pieces.prob_sum / pieces.count, np.nan)
    if not gb.crs:  # pixel space: no metres (area_px stays; min_area above was in pixels)
        nan = np.full(len(world), np.nan)
        area = perim = nan
        extra = {k: (v if k in ("center_lon", "center_lat") else nan) for k, v in extra.items()}
    cols.update(area_m2=area, perimeter_m=perim, score=score, **extra)
    world = shapely.orient_polygons(world)
    arrays = {k: pa.array(v, from_pandas=True) for k, v in cols.items()}
    arrays["geometry"] = pa.array(shapely.to_wkb(world), type=pa.binary())
    return pa.table(arrays)


def _measure(pieces: Pieces, world: np.ndarray, gb: GeoBox, params: VectorParams) -> tuple[np.ndarray, ...]:
    """Metric geometry (with each one's metric CRS), area, perimeter, and the size ``min_area`` is read against."""
    if gb.crs and params.metric_crs:
        metric, metric_crss = to_metric(world, gb.crs, params.metric_crs)
        area = shapely.area(metric)
        return metric, metric_crss, area, shapely.length(metric), area
    # pixel space: no metres; sizes in pixels
    metric_crss = np.full(len(world), None, dtype=object)
    return world, metric_crss, shapely.area(world), shapely.length(world), pieces.count.astype(np.float64)


def _keep(pieces: Pieces, metric: np.ndarray, size: np.ndarray, gb: GeoBox, params: VectorParams) -> np.ndarray:
    """Which pieces stay: at least ``min_area``, area patches of ``min_pixels``, objects no longer than ``max_length``."""
    keep = size >= params.min_area if params.min_area > 0 else np.ones(len(metric), bool)
    if params.max_length <= 0 and params.min_pixels <= 0:
        return keep
    kinds = dict(params.kinds)
    kinds_ = np.array([kinds[int(c)] for c in pieces.class_id], dtype=object)
    if params.min_pixels > 0:  # speckle of an area class is not a feature (the minimum mapping unit)
        keep &= (kinds_ != "area") | (pieces.count >= params.min_pixels)
    if params.max_length > 0 and gb.crs:  # too long to be one object of the model's kind (a breakwater)
        sel = np.flatnonzero(keep & (kinds_ != "area"))
        if len(sel):
            length = oriented_box(metric[sel])[0]
            keep[sel[length > params.max_length]] = False
    return keep


def _identity_columns(pieces: Pieces, params: VectorParams) -> dict[str, np.ndarray]:
    """Id, class, run and pixel-count columns, then the run's constant attributes (e.g. the dates of a change)."""
    names = dict(params.names)
    n = len(pieces)
    cols: dict[str, np.ndarray] = {
        "id": pieces.first,
        "class": np.array([names[int(c)] for c in pieces.class_id], dtype=object),
        "class_id": pieces.class_id.astype(np.int16),
        "run_id": np.full(n, params.run_id, dtype=object),
        "area_px": pieces.count,
    }
    for key, value in params.attributes:
        cols[key] = np.full(n, value, dtype=object)
    return cols


def _kind_columns(
    kind: np.ndarray, world: np.ndarray, metric: np.ndarray, area: np.ndarray, gb: GeoBox, params: VectorParams
) -> dict[str, np.ndarray]:
    """Measures that depend on the class kind (NaN elsewhere): hectares of areas, tank sizes, object boxes."""
    nan = np.full(len(world), np.nan)
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
    return extra


def _regularize_buildings(
    kind: np.ndarray,
    world: np.ndarray,
    metric: np.ndarray,
    metric_crss: np.ndarray,
    area: np.ndarray,
    perim: np.ndarray,
    gb: GeoBox,
    params: VectorParams,
) -> None:
    """Square the outlines of buildings, in place (geometries, area and perimeter)."""
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


def write_part(table, path: str) -> None:
    """Write an attribute table to a GeoParquet part, atomically.

    Parameters
    ----------
    table : pyarrow.Table
        A table from :func:`features_table`.
    path : str
        The part's final path (written beside it first, then renamed).
    """
    import pyarrow.parquet as pq

    tmp = atomic_path(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
