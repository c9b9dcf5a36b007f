"""Checks that run before a scheduler starts, and the job's size that ``--scheduler auto`` decides by.

:func:`check_predict` reads the input's header, then resolves the model, matches its bands
and places the AOI, in that order: a missing file, an unknown model, a band mismatch or an
AOI off the raster fails in about a second, before torch, onnxruntime or Dask start (the
probe and the graph come later, in :func:`~geoseg.engine.plan.plan_job`, which takes the
resolved model as it is). :func:`count_chunks` is the cheap size estimate: whole chunks of
the region, from the header alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from geoseg.engine.plan import DEFAULT_CHUNK, open_for_model
from geoseg.grid import Window, regular_chunks
from geoseg.io.aoi import read_aoi
from geoseg.io.mask import open_mask
from geoseg.io.raster import RasterSource, open_source
from geoseg.models.spec import ModelSpec, resolve_model

__all__ = ["Preflight", "check_predict", "count_chunks", "mask_chunks", "raster_chunks"]


@dataclass(frozen=True)
class Preflight:
    """What :func:`check_predict` found: the model resolved, the source opened with its bands, the job's size in chunks."""

    spec: ModelSpec
    chunks: int
    source: RasterSource | None = None


def count_chunks(window: Window, chunk: int | None = None) -> int:
    """How many chunks of ``chunk`` px a side (default :data:`~geoseg.engine.plan.DEFAULT_CHUNK`) cover ``window``.

    An estimate: the engine rounds the chunk to whole tile cores, which may change the count
    by a row or a column.

    Parameters
    ----------
    window : Window
        The region processed (the raster, or an AOI's window on it).
    chunk : int, optional
        Chunk side in pixels.

    Returns
    -------
    int
    """
    rows, cols = regular_chunks(window.height, window.width, chunk or DEFAULT_CHUNK)
    return len(rows) * len(cols)


def raster_chunks(path: str | os.PathLike, aoi: str | os.PathLike | None = None, chunk: int | None = None) -> int:
    """:func:`count_chunks` of a raster file (inside the AOI's window, when there is one), from its header.

    Parameters
    ----------
    path : str or os.PathLike
        The raster.
    aoi : str or os.PathLike, optional
        Vector file limiting the region.
    chunk : int, optional
        Chunk side in pixels.

    Returns
    -------
    int

    Raises
    ------
    GeosegError
        The raster or the AOI cannot be read, or the AOI misses the raster.
    """
    src = open_source(path, require_crs=aoi is not None)
    window = read_aoi(aoi, src.geobox).window if aoi is not None else src.geobox.window
    return count_chunks(window, chunk)


def mask_chunks(mask: str, probabilities: str | None = None, chunk: int | None = None) -> int:
    """:func:`count_chunks` of a class mask to vectorise, after the checks :func:`geoseg.vector.vectorize` makes of it.

    Parameters
    ----------
    mask : str
        The class mask.
    probabilities : str, optional
        Its probabilities raster.
    chunk : int, optional
        Chunk side in pixels.

    Returns
    -------
    int

    Raises
    ------
    GeosegError
        The mask (or the probabilities) cannot be read or is not a class mask.
    """
    return count_chunks(open_mask(mask, probabilities).geobox.window, chunk)


def check_predict(
    source: Any,
    model: Any,
    *,
    bands: tuple[int, ...] | list[int] | None = None,
    band_map: dict[str, int] | None = None,
    aoi: str | os.PathLike | None = None,
    chunk: int | None = None,
    trust_model: bool = False,
) -> Preflight:
    """Check a prediction's inputs before any scheduler starts (parameters as :func:`geoseg.predict`'s).

    Returns
    -------
    Preflight
        The resolved model and the source opened with the bands its card takes (pass both on
        as ``model`` and ``source``: neither is resolved or opened again), and the job's size
        in chunks.

    Raises
    ------
    GeosegError
        The raster is missing or unreadable, the model unknown or refused, the bands do not
        match its card, the AOI is unreadable or misses the raster.
    """
    if not isinstance(source, (str, os.PathLike)):
        spec = resolve_model(model, trust=trust_model)
        return Preflight(spec, count_chunks(source.geobox.window, chunk), source)
    open_source(source, require_crs=aoi is not None)  # the file first: it is the commonest mistake, and the cheapest check
    spec = resolve_model(model, trust=trust_model)
    src = open_for_model(source, spec, bands, band_map or {}, require_crs=aoi is not None)
    window = read_aoi(aoi, src.geobox).window if aoi is not None else src.geobox.window
    return Preflight(spec, count_chunks(window, chunk), src)
