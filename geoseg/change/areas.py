"""Hectares from pixels: every pixel with its true area on the WGS84 ellipsoid, one task per window."""

from __future__ import annotations

import numpy as np

from geoseg.engine.progress import compute_tasks
from geoseg.errors import InputError
from geoseg.grid import chunk_windows, regular_chunks
from geoseg.io.mask import open_mask, read_mask_window

__all__ = ["hectares", "pixel_areas"]


def pixel_areas(geobox, rows: np.ndarray, col: float) -> np.ndarray:
    """True area (m², WGS84 ellipsoid) of one pixel at each row, at column ``col``."""
    from pyproj import Geod, Transformer

    t = geobox.transform
    to_ll = Transformer.from_crs(geobox.crs, "EPSG:4326", always_xy=True)
    geod = Geod(ellps="WGS84")
    corners = np.array([(0, 0), (1, 0), (1, 1), (0, 1)], float)
    cols = col + corners[:, 0][None, :]
    rws = rows[:, None] + corners[:, 1][None, :]
    x, y = t @ (cols + 0 * rws, rws)
    lon, lat = to_ll.transform(np.asarray(x), np.asarray(y))
    out = np.empty(len(rows))
    for k in range(len(rows)):
        area, _ = geod.polygon_area_perimeter(lon[k], lat[k])
        out[k] = abs(area)
    return out


def _hectares_chunk(path: str, window) -> np.ndarray:
    """Hectares per code over one window of a code raster, with each pixel's true area."""
    src = open_mask(path)
    code = read_mask_window(src, window)
    px = pixel_areas(src.geobox, np.arange(window.row_off, window.row_stop, dtype=float), window.col_off + window.width / 2)
    out = np.zeros(256)
    for k in np.unique(code):
        out[k] = float((np.count_nonzero(code == k, axis=1) * px).sum()) / 1e4
    return out


def hectares(path: str, step: int = 2048) -> np.ndarray:
    """Hectares per value (0-255) of a class/code raster, on the active Dask scheduler.

    Each pixel counts with its own area on the WGS84 ellipsoid (rows of a chunk use the
    area at the chunk's centre column), so the sums hold for EPSG:4326, Web Mercator and
    wide UTM rasters alike.
    """
    import dask

    gb = open_mask(path).geobox
    if gb.crs is None:
        raise InputError(f"{path}: no CRS, so no areas in hectares; georeference the rasters")
    tasks = [
        dask.delayed(_hectares_chunk, pure=True)(path, w)
        for row in chunk_windows(regular_chunks(gb.height, gb.width, step))
        for w in row
    ]
    return np.sum(compute_tasks(tasks), axis=0)
