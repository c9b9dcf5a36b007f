"""xarray input: a ``(band, y, x)`` DataArray (odc-stac, stackstac, rioxarray), described for the engine.

:func:`open_array` turns an :class:`xarray.DataArray` (or a Dataset of bands) into an
:class:`ArraySource`: the description a :class:`~geoseg.io.raster.RasterSource` is (grid,
bands in the model's order, dtype, nodata), plus the array itself, which stays in the process
that opened it (never pickled, never a task argument). The engine makes each chunk's read
task depend on the blocks of the array's own Dask graph that the chunk's input window
overlaps, each cut to it (:meth:`ArraySource.pixels`), so a lazy cube is computed block by
block on the workers, each block once, never whole; :func:`read_pixels` then mirrors past the
edges and marks valid pixels as :func:`~geoseg.io.raster.read_window` does for a file. An
array without Dask chunks (numpy, or a lazily indexed file) is given chunks by xarray and
takes the same path; this module imports no Dask itself. Just over 400 lines: the
description, its reads and the xarray conventions it reads (dimensions, band names, nodata,
georeference) belong together.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine

from geoseg.errors import InputError, warn_not_georeferenced
from geoseg.grid import GeoBox, Window, reflect_window

__all__ = ["ARRAY_CHUNK", "BAND_DIMS", "TIME_DIMS", "ArraySource", "is_xarray", "open_array", "read_pixels"]

#: names of the dimension that holds bands (the one non-spatial dimension of any name also does)
BAND_DIMS = ("band", "bands", "variable", "channel", "channels")
#: names of a dimension of dates (a datetime coordinate also makes one): never bands, one date is segmented
TIME_DIMS = ("time", "t", "date", "datetime")
#: side of the Dask chunks xarray gives an array that has none (numpy, a lazily indexed file)
ARRAY_CHUNK = 2048


@dataclass(frozen=True)
class ArraySource:
    """An xarray input, described for the engine as a :class:`~geoseg.io.raster.RasterSource` describes a file.

    Parameters
    ----------
    label : str
        What messages call it (``DataArray 'name' (band: 3, y: 4000, x: 4000)``); not a path.
    bands : tuple of int
        1-based positions along the band dimension, in the order the model receives them.
    geobox : GeoBox
        The array's grid (identity transform and no CRS for an array without a CRS).
    dtype : str
        The array's data type.
    band_descriptions : tuple of str or None
        The selected bands' names (band coordinate, STAC common names, descriptions).
    nodata : float or None
        Nodata of the first selected band.
    band_nodata : tuple of float or None
        Nodata of each selected band: a pixel is valid when any band differs from its own.
    fingerprint : str
        The caller's Dask name (of the selected bands for a Dataset; xarray's content hash of a
        numpy array): new data, new task keys.
    band_names : tuple of str
        Every band of the array, as its band coordinate names them.
    sizes : tuple of (str, int)
        The caller's dimensions and their sizes, as given.
    kind : str
        ``DataArray`` or ``Dataset``.
    lazy : bool
        Whether the caller's array was Dask-backed (False: held in memory).
    scales, offsets : tuple of float or None
        Each selected band's ``scale_factor`` and ``add_offset`` attributes (radiometry).
    """

    label: str
    bands: tuple[int, ...]
    geobox: GeoBox
    dtype: str
    band_descriptions: tuple[str | None, ...] = ()
    nodata: float | None = None
    band_nodata: tuple[float | None, ...] = ()
    fingerprint: str = ""
    band_names: tuple[str, ...] = ()
    sizes: tuple[tuple[str, int], ...] = ()
    kind: str = "DataArray"
    lazy: bool = True
    scales: tuple[float | None, ...] = ()
    offsets: tuple[float | None, ...] = ()

    @property
    def count(self) -> int:
        """Number of bands the model receives."""
        return len(self.bands)

    def __getstate__(self) -> dict[str, Any]:
        """Pickles hold the description only: the pixels stay in the process that opened the array."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_array", "_blocks")}

    def __copy__(self) -> ArraySource:
        return self  # immutable, and the array is shared

    def __deepcopy__(self, memo: dict) -> ArraySource:
        return self

    def _selected(self) -> Any:
        array = self.__dict__.get("_array")
        if array is None:
            raise InputError(
                f"{self.label}: this description was pickled and its pixels stayed in the process that opened it; "
                "pass the DataArray to geoseg.predict in that process"
            )
        return array

    def pixels(self, window: Window) -> tuple[Window, list]:
        """The raster pixels ``window`` needs, as tasks of the array's own graph: for every Dask block
        they overlap, that block cut to them (``block[:, rows, cols]``, a task beside the block).

        ``window`` may reach past the raster. Returns the in-raster span and the cut blocks as
        nested lists ``[band block][row block][column block]`` (``numpy.block`` assembles the span;
        :func:`read_pixels` mirrors it into the window). Blocks are the array's own keys, unfused:
        a block that several windows overlap is computed once.
        """
        span, _, _ = reflect_window(window, self.geobox.height, self.geobox.width)
        if "_blocks" not in self.__dict__:  # the array's own block keys, and where its blocks start
            data = self._selected().data
            edges = tuple(np.cumsum((0, *c)) for c in data.chunks[1:])
            self.__dict__["_blocks"] = (data.to_delayed(optimize_graph=False), *edges)
        blocks, row_edges, col_edges = self.__dict__["_blocks"]
        rows = _cuts(row_edges, span.row_off, span.row_stop)
        cols = _cuts(col_edges, span.col_off, span.col_stop)
        cut = [[[blocks[b, i, j][:, rs, cs] for j, cs in cols] for i, rs in rows] for b in range(blocks.shape[0])]
        return span, cut

    def overview(self, max_side: int = 1024) -> tuple[np.ma.MaskedArray, int]:
        """Every ``f``-th pixel of the selected bands, at most ``max_side`` a side, masked where invalid.

        Computed chunk by chunk (each chunk is read, then decimated). Returns the data and ``f``.
        """
        gb = self.geobox
        f = max(1, math.ceil(max(gb.width, gb.height) / max_side))
        data = self._selected().data[:, ::f, ::f]
        data = np.asarray(data.compute() if hasattr(data, "compute") else data)
        return np.ma.MaskedArray(data, mask=~_band_valid(data, self.band_nodata)), f

    def record(self) -> dict[str, Any]:
        """run.json's ``input``: the array (kind, dimensions, band names, fingerprint), its grid and bands; no path."""
        gb = self.geobox
        return {
            "array": f"xarray.{self.kind}",
            "lazy": self.lazy,
            "sizes": dict(self.sizes),
            "band_names": list(self.band_names),
            "fingerprint": self.fingerprint,
            "width": gb.width,
            "height": gb.height,
            "transform": list(gb.transform)[:6],
            "crs": gb.crs,
            "dtype": self.dtype,
            "bands": list(self.bands),
            "band_descriptions": list(self.band_descriptions),
            "nodata": self.nodata,
        }


def _cuts(edges: np.ndarray, start: int, stop: int) -> list[tuple[int, slice]]:
    """The blocks along one axis (block ``k`` spans ``edges[k]:edges[k + 1]``) that ``start:stop`` overlaps,
    each with the slice of it that lies inside ``start:stop``.
    """
    first = int(np.searchsorted(edges, start, side="right")) - 1
    last = int(np.searchsorted(edges, stop, side="left"))
    return [
        (k, slice(max(start, int(edges[k])) - int(edges[k]), min(stop, int(edges[k + 1])) - int(edges[k])))
        for k in range(first, last)
    ]


def is_xarray(obj: Any) -> bool:
    """True for an :class:`xarray.DataArray` or :class:`xarray.Dataset`."""
    if not type(obj).__module__.startswith("xarray"):
        return False
    import xarray as xr

    return isinstance(obj, (xr.DataArray, xr.Dataset))


def open_array(data: Any, bands: tuple[int, ...] | list[int] | None = None, require_crs: bool = True) -> ArraySource:
    """Describe a DataArray (or a Dataset of bands) for the engine; nothing is computed.

    Parameters
    ----------
    data : xarray.DataArray or xarray.Dataset
        ``(band, y, x)`` (any band dimension name; ``(y, x)`` is one band; other dimensions
        of size one are dropped), Dask-backed or in memory. A Dataset's variables are its
        bands. CRS and transform from odc-geo's ``.odc.geobox`` when odc-geo is installed,
        else rioxarray's ``.rio.crs`` and ``.rio.transform()``; nodata from ``.rio.nodata``
        (``_FillValue``, ``nodata`` attributes); NaN/Inf are always invalid.
    bands : sequence of int, optional
        1-based positions along the band dimension, in the model's order; default all.
    require_crs : bool
        Raise when the array has no CRS (an AOI needs one); otherwise warn (pixel coordinates).

    Returns
    -------
    ArraySource

    Raises
    ------
    InputError
        No spatial dimensions, a further dimension of more than one slice (``time``), a
        band that does not exist, a data type no model takes, or no CRS where one is required.
    """
    import rioxarray  # noqa: F401  (the .rio accessor)

    kind, name, sizes = type(data).__name__, getattr(data, "name", None), tuple((str(d), int(n)) for d, n in data.sizes.items())
    label = _label(kind, name, sizes)
    arr, nodata, scales, offsets = _as_bands(data, label)
    picked = _pick_bands(int(arr.shape[0]), bands, label)
    dtype = _check_dtype(arr.dtype, label)
    geobox = _grid(arr, label, require_crs)
    names, descriptions = _band_names(arr, name)
    lazy = arr.chunks is not None
    selected = arr.isel({arr.dims[0]: [b - 1 for b in picked]})
    if not lazy:  # numpy or a lazily indexed file: xarray gives it Dask chunks (one graph path for every array)
        selected = selected.chunk({arr.dims[0]: -1, arr.dims[1]: ARRAY_CHUNK, arr.dims[2]: ARRAY_CHUNK})
    source = ArraySource(
        label=label,
        bands=picked,
        geobox=geobox,
        dtype=dtype,
        band_descriptions=tuple(descriptions[b - 1] for b in picked),
        nodata=nodata[picked[0] - 1],
        band_nodata=tuple(nodata[b - 1] for b in picked),
        fingerprint=str(data.data.name if kind == "DataArray" and lazy else selected.data.name),
        band_names=names,
        sizes=sizes,
        kind=kind,
        lazy=lazy,
        scales=tuple(scales[b - 1] for b in picked),
        offsets=tuple(offsets[b - 1] for b in picked),
    )
    object.__setattr__(source, "_array", selected)  # not a field: never tokenized, pickled or unpacked by Dask
    return source


def _label(kind: str, name: Any, sizes: tuple[tuple[str, int], ...]) -> str:
    dims = ", ".join(f"{d}: {n}" for d, n in sizes)
    return f"{kind} {name!r} ({dims})" if isinstance(name, str) else f"{kind} ({dims})"


def _as_bands(data: Any, label: str) -> tuple[Any, list, list, list]:
    """The data as a ``(band, y, x)`` DataArray, and each band's nodata, scale and offset."""
    import xarray as xr

    if isinstance(data, xr.Dataset):
        variables = list(data.data_vars)
        if not variables:
            raise InputError(f"{label}: the Dataset has no data variables; give one with the bands as variables")
        per_band = [_band_attrs(data[v]) for v in variables]
        data = data.to_array("band")
    else:
        per_band = None
    arr = _band_first(data, label)
    per_band = per_band or [_band_attrs(arr)] * int(arr.shape[0])
    nodata, scales, offsets = (list(v) for v in zip(*per_band, strict=True))
    return arr, nodata, scales, offsets


def _band_attrs(arr: Any) -> tuple[float | None, float | None, float | None]:
    """A band's nodata (``.rio.nodata``), ``scale_factor`` and ``add_offset``."""
    nodata = arr.rio.nodata
    scale, offset = arr.attrs.get("scale_factor"), arr.attrs.get("add_offset")
    return (
        None if nodata is None else float(nodata),
        None if scale is None else float(scale),
        None if offset is None else float(offset),
    )


def _band_first(arr: Any, label: str) -> Any:
    """``arr`` as ``(band, y, x)``: spatial dimensions found by rioxarray, size-one extras dropped."""
    try:
        y, x = arr.rio.y_dim, arr.rio.x_dim
    except Exception:  # rioxarray's MissingSpatialDimensionError
        raise InputError(
            f"{label}: no spatial dimensions among {tuple(arr.dims)} (y/x, latitude/longitude); rename them, "
            "e.g. data_array.rename({'rows': 'y', 'cols': 'x'})"
        ) from None
    others = [d for d in arr.dims if d not in (y, x)]
    dated = [d for d in others if str(d).lower() in TIME_DIMS or (d in arr.coords and arr[d].dtype.kind == "M")]
    candidates = [d for d in others if d not in dated]  # dates are never bands
    named = [d for d in candidates if str(d).lower() in BAND_DIMS]
    several = [d for d in candidates if arr.sizes[d] > 1]
    band = named[0] if named else (several[0] if several else (candidates[0] if candidates else None))
    extra = [d for d in others if d != band]
    for d in extra:
        if arr.sizes[d] > 1:
            raise InputError(
                f"{label}: its {d!r} dimension holds {arr.sizes[d]} slices but geoseg segments one (band, y, x) image; "
                f"pick one with .isel({d}=0) or reduce it, e.g. .median({d!r})"
            )
    arr = arr.squeeze(extra)
    if band is None:  # one band (a scalar band coordinate, e.g. from .sel(band="red"), becomes its name)
        arr, band = arr.expand_dims("band"), "band"
    return arr.transpose(band, y, x)


def _pick_bands(count: int, bands: tuple[int, ...] | list[int] | None, label: str) -> tuple[int, ...]:
    if bands is None or len(bands) == 0:
        return tuple(range(1, count + 1))
    picked = tuple(int(b) for b in bands)
    bad = [b for b in picked if b < 1 or b > count]
    if bad:
        raise InputError(f"{label}: band(s) {bad} do not exist (the array has {count}); fix bands=")
    return picked


def _check_dtype(dtype: np.dtype, label: str) -> str:
    """The array's dtype name, when a model can take it."""
    if dtype.kind == "c":
        raise InputError(f"{label}: complex bands are not model inputs; convert them first, e.g. abs(data_array)")
    if dtype.kind not in "iuf":
        raise InputError(f"{label}: {dtype} bands are not model inputs; convert them first, e.g. data_array.astype('uint8')")
    return str(dtype)


def _band_names(arr: Any, name: Any) -> tuple[tuple[str, ...], list[str | None]]:
    """Every band's name as the band coordinate gives it, and what bands are matched by: the STAC common
    name (stackstac's ``common_name``), else a string band coordinate, else rioxarray's ``long_name``
    descriptions, else the name of a one-band array.
    """
    band, n = arr.dims[0], int(arr.shape[0])
    coord = [str(v) for v in arr[band].values] if band in arr.coords else None
    texts: list[str | None] = [None] * n
    if coord is not None and arr[band].dtype.kind in "OUS":
        texts = list(coord)
    long_name = arr.attrs.get("long_name")
    if isinstance(long_name, (tuple, list)) and len(long_name) == n and not any(texts):
        texts = [str(v) if v else None for v in long_name]
    elif n == 1 and not any(texts) and isinstance(name, str):
        texts = [name]
    common = next((c for c in ("common_name", "eo:bands_common_name") if c in arr.coords and arr[c].dims == (band,)), None)
    if common is not None:  # stackstac's STAC eo:bands common names (red, nir, swir16)
        texts = [str(c) if isinstance(c, str) and c else t for c, t in zip(arr[common].values, texts, strict=True)]
    names = tuple(coord) if coord is not None else tuple(t or str(k + 1) for k, t in enumerate(texts))
    return names, texts


def _grid(arr: Any, label: str, require_crs: bool) -> GeoBox:
    """The array's grid; without a CRS, pixel coordinates (identity transform), as for a plain image."""
    height, width = int(arr.shape[1]), int(arr.shape[2])
    crs, transform = _georeference(arr)
    if crs is not None and not transform.is_identity:
        return GeoBox(width, height, transform, crs)
    if require_crs:
        raise InputError(
            f"{label}: the array has no CRS or no coordinates; set them (data_array.rio.write_crs('EPSG:32633'), "
            "with x/y coordinates) or predict without aoi= in pixel coordinates"
        )
    warn_not_georeferenced(label)
    return GeoBox(width, height)


def _georeference(arr: Any) -> tuple[str | None, Affine]:
    """CRS (``EPSG:n`` when it has a code, else WKT) and transform: odc-geo's geobox when there is one, else rioxarray's."""
    from rasterio.crs import CRS

    geobox = _odc_geobox(arr)
    if geobox is not None:
        crs, transform = CRS.from_wkt(geobox.crs.wkt), Affine(*tuple(geobox.affine)[:6])
    else:
        crs = arr.rio.crs
        if crs is None:
            return None, Affine.identity()
        transform = arr.rio.transform()
    epsg = crs.to_epsg()
    return (f"EPSG:{epsg}" if epsg is not None else crs.to_wkt()), _corner_named(arr, transform)


def _corner_named(arr: Any, transform: Affine) -> Affine:
    """The transform of an array whose coordinates name pixel corners, not centres.

    stackstac (its default ``xy_coords="topleft"``) keeps its affine in ``attrs["transform"]``
    and labels each pixel by its top-left corner; rioxarray and odc-geo read coordinates as
    centres, half a pixel off. When the first coordinates sit on that affine's pixel corners,
    the grid starts there.
    """
    try:
        stored = Affine(*tuple(arr.attrs["transform"])[:6])
        x0, y0 = float(arr[arr.rio.x_dim][0]), float(arr[arr.rio.y_dim][0])
    except (KeyError, TypeError, ValueError, IndexError):
        return transform
    if not stored.is_rectilinear or stored.a == 0 or stored.e == 0:
        return transform
    col, row = (x0 - stored.c) / stored.a, (y0 - stored.f) / stored.e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return transform  # centres (or no relation to the stored affine)
    return Affine(stored.a, 0.0, x0, 0.0, stored.e, y0)


def _odc_geobox(arr: Any) -> Any:
    """odc-geo's GeoBox of ``arr`` (with a CRS and an affine), or None without odc-geo or one."""
    try:
        import odc.geo.xr  # noqa: F401  (the .odc accessor)
    except ImportError:
        return None
    try:
        geobox = arr.odc.geobox
    except Exception:  # odc-geo could not read a grid from the coordinates
        return None
    if geobox is None or geobox.crs is None or not hasattr(geobox, "affine"):
        return None
    return geobox


def _band_valid(data: np.ndarray, band_nodata: tuple[float | None, ...]) -> np.ndarray:
    """Per band, True where the pixel is not that band's nodata (GDAL's per-band nodata masks)."""
    valid = np.ones(data.shape, dtype=bool)
    for b, nodata in enumerate(band_nodata):
        if nodata is not None and not math.isnan(nodata):
            valid[b] = data[b] != nodata
        elif nodata is not None:
            valid[b] = ~np.isnan(data[b])
    return valid


def read_pixels(source: ArraySource, pixels: tuple[Window, list], window: Window) -> tuple[np.ndarray, np.ndarray, float]:
    """A window of an array (which may reach past it, mirrored) from what :meth:`ArraySource.pixels` cut.

    Runs inside the read task, on the computed blocks; returns what
    :func:`~geoseg.io.raster.read_window` returns for a file: ``(data, valid, seconds)``,
    ``valid`` False where every band is its nodata or any band is NaN/Inf, invalid pixels 0.
    """
    t0 = time.perf_counter()
    from geoseg.io.raster import window_pixels

    span, blocks = pixels
    _, rows, cols = reflect_window(window, source.geobox.height, source.geobox.width)
    data = np.block(blocks).astype(source.dtype, copy=False)  # a new array: the blocks Dask shares are never written
    data, valid = window_pixels(data, _band_valid(data, source.band_nodata).any(axis=0), window, span, rows, cols)
    return data, valid, time.perf_counter() - t0
