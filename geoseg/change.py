"""Change detection between two dates: align, segment both, code the transitions, map them.

``geoseg change BEFORE AFTER --model forest --out DIR``:

1. AFTER is read aligned onto BEFORE's grid (or a grid the user names) through a
   :class:`rasterio.vrt.WarpedVRT` inside every read task: any CRS, resolution, extent,
   dtype or band order (bands are matched by the model card's names per file).
2. Both dates are segmented by the same engine (``before/mask.tif``, ``after/mask.tif``),
   on the same grid and AOI. Optionally a mask model (the bundled ``clouds``) marks cloud and
   shadow pixels on either date as unusable, so clouds never count as loss.
3. ``change.tif`` (COG) codes every pixel valid on both dates: 0 = no change, then one
   code per transition (``forest_loss``, ``forest_gain`` for area classes; ``new_building``,
   ``building_removed`` for objects; ``water_to_forest`` between two named classes); 255 =
   not valid on both dates. The code table is in the COG's metadata, its colour table and
   ``run.json``.
4. Transition polygons (``vectorize``) with ``area_ha``, ``date_before`` and ``date_after``,
   a minimum mapping unit, GeoJSON (RFC 7946) and a styled GeoPackage.
5. A summary of hectares per transition, from the pixels, with every pixel's true area
   (geodesic, on the WGS84 ellipsoid) so it holds in EPSG:4326 or Web Mercator too.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from geoseg.classes import NODATA, ClassInfo, is_background
from geoseg.errors import InputError

__all__ = ["Transition", "change", "format_change", "hectares", "raster_date", "transitions"]


@dataclass(frozen=True)
class Transition:
    """One change code: from class ``before`` to class ``after``."""

    code: int
    name: str
    before: int
    after: int
    color: tuple[int, int, int]


def transitions(classes: list[tuple[int, str, tuple[int, int, int]]], task: str) -> list[Transition]:
    """Every ordered pair of different classes, with a name and a colour.

    Area models (land cover): ``<class>_loss`` (to background), ``<class>_gain`` (from
    background), ``<a>_to_<b>``. Object models: ``new_<class>``, ``<class>_removed``.
    """
    out = []
    code = 1
    for a_id, a, _ in classes:
        for b_id, b, b_col in classes:
            if a_id == b_id:
                continue
            a_bg, b_bg = is_background(a), is_background(b)
            if b_bg and not a_bg:
                name = f"{a}_removed" if task == "objects" else f"{a}_loss"
                color = (128, 128, 128) if task == "objects" else (220, 40, 40)
            elif a_bg and not b_bg:
                name = f"new_{b}" if task == "objects" else f"{b}_gain"
                color = tuple(b_col) if task == "objects" else (40, 170, 60)
            else:
                name, color = f"{a}_to_{b}", tuple(b_col)
            out.append(Transition(code, name, a_id, b_id, tuple(int(c) for c in color)))
            code += 1
    if len(out) > 254:
        raise InputError(f"{len(classes)} classes make {len(out)} transitions, more than a uint8 change map holds")
    return out


_DATE = re.compile(r"(?<!\d)(\d{4})[-_]?(\d{2})[-_]?(\d{2})(?!\d)")


def raster_date(path: str) -> str | None:
    """Acquisition date (``YYYY-MM-DD``) from the raster's metadata, else from its file name."""
    import rasterio

    try:
        with rasterio.open(path) as ds:
            tags = ds.tags()
    except rasterio.errors.RasterioIOError:
        tags = {}

    def valid(m) -> str | None:
        import datetime

        if not m:
            return None
        try:
            return datetime.date(*(int(g) for g in m.groups())).isoformat()
        except ValueError:
            return None

    for key in ("ACQUISITION_DATE", "DATE_ACQUIRED", "datetime"):
        hit = valid(_DATE.search(tags.get(key, "").replace(":", "-")))
        if hit:
            return hit
    name = os.path.basename(path)
    hit = valid(_DATE.search(name))
    if hit:
        return hit
    hit = valid(_DATE.search(tags.get("TIFFTAG_DATETIME", "").replace(":", "-")))  # often the processing time: last
    if hit:
        return hit
    year = re.search(r"(?<!\d)(19|20)\d{2}(?!\d)", name)
    return year.group(0) if year else None


def _pixel_areas(geobox, rows: np.ndarray, col: float) -> np.ndarray:
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


def _code_chunk(
    before_path: str, after_path: str, window, lut: np.ndarray, masks: tuple[str, ...], inputs: str, sieve_px: int = 0
) -> np.ndarray:
    """Transition codes over one window (255 where either date, or a cloud mask, says unusable).

    With ``sieve_px`` > 1, patches smaller than that (4-connected) take the value of their
    largest neighbour (the minimum mapping unit), computed over the window grown by a halo
    so a patch cut by a chunk edge is judged whole. ``inputs`` (fingerprints of the mask
    files) only keys the task: a resumed write never reuses parts made from other masks.
    """
    from geoseg.grid import Window
    from geoseg.io.mask import open_mask, read_mask_window

    src_b = open_mask(before_path)
    gb = src_b.geobox
    halo = 2 * int(np.ceil(np.sqrt(sieve_px))) + 2 if sieve_px > 1 else 0
    r0, c0 = max(0, window.row_off - halo), max(0, window.col_off - halo)
    r1, c1 = min(gb.height, window.row_stop + halo), min(gb.width, window.col_stop + halo)
    grown = Window(r0, c0, r1 - r0, c1 - c0)
    b = read_mask_window(src_b, grown)
    a = read_mask_window(open_mask(after_path), grown)
    invalid = (b == NODATA) | (a == NODATA)
    for path in masks:  # cloud/shadow masks of either date: any non-background class is unusable
        src = open_mask(path)
        m = read_mask_window(src, grown)
        clear = [c.id for c in src.classes if is_background(c.name)] or [0]
        invalid |= ~np.isin(m, [*clear, NODATA])
    code = lut[b.astype(np.int32) * 256 + a.astype(np.int32)]
    code[invalid] = NODATA
    code = code.astype(np.uint8)
    if sieve_px > 1:
        from rasterio.features import sieve

        code = sieve(code, size=sieve_px, connectivity=4)
        code[invalid] = NODATA  # unusable pixels stay unusable (and never grow into a patch)
    return code[window.row_off - r0 : window.row_stop - r0, window.col_off - c0 : window.col_stop - c0]


def _hectares_chunk(path: str, window) -> np.ndarray:
    """Hectares per code over one window of a code raster, with each pixel's true area."""
    from geoseg.io.mask import open_mask, read_mask_window

    src = open_mask(path)
    code = read_mask_window(src, window)
    px = _pixel_areas(src.geobox, np.arange(window.row_off, window.row_stop, dtype=float), window.col_off + window.width / 2)
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

    from geoseg.engine.write import compute_tasks
    from geoseg.io.mask import open_mask

    gb = open_mask(path).geobox
    if gb.crs is None:
        raise InputError(f"{path}: no CRS, so no areas in hectares; georeference the rasters")
    tasks = [dask.delayed(_hectares_chunk, pure=True)(path, w) for row in _grid(gb, step) for w in row]
    return np.sum(compute_tasks(tasks, progress=False), axis=0)


def _grid(gb, step: int):
    from geoseg.grid import chunk_windows

    rows = [step] * (gb.height // step) + ([gb.height % step] if gb.height % step else [])
    cols = [step] * (gb.width // step) + ([gb.width % step] if gb.width % step else [])
    return chunk_windows((tuple(rows), tuple(cols)))


def change(
    before: str,
    after: str,
    model: Any,
    out_dir: str,
    *,
    grid: str | None = None,
    aoi: str | None = None,
    bands_before: str | None = None,
    bands_after: str | None = None,
    mask_model: Any = None,
    min_area: float = 0.0,
    formats: tuple[str, ...] = ("geojson", "gpkg"),
    resampling: str = "bilinear",
    date_before: str | None = None,
    date_after: str | None = None,
    overwrite: bool = False,
    chunk: int | None = None,
    masks: tuple[str, str] | None = None,
    crs: str | None = None,
    radiometry: str | None = None,
) -> dict[str, Any]:
    """Detect change between two rasters with one model.

    Parameters
    ----------
    before, after : str
        The two dates' rasters (any CRS, resolution, extent, dtype, band order).
    model : str or ModelSpec
        Segmentation model (bundled name or file) run on both dates.
    out_dir : str
        Output folder: ``before/``, ``after/`` (masks), ``change.tif``, polygons, ``run.json``.
    grid : str, optional
        Raster whose grid both dates are aligned onto (default BEFORE's).
    aoi : str, optional
        Vector file limiting the area.
    bands_before, bands_after : str, optional
        ``--bands`` mappings per date (e.g. ``nir=2,red=3``) when descriptions do not say.
    mask_model : str, optional
        A model whose non-background classes (clouds, shadows) make pixels unusable on either
        date (e.g. ``clouds``).
    min_area : float
        Minimum mapping unit in m²: smaller patches of any code in ``change.tif`` take their
        largest neighbour's code (GDAL's sieve), and smaller polygons are dropped.
    formats : tuple of str
        Vector formats.
    resampling : str
        How AFTER (and BEFORE, with ``grid``) is resampled onto the grid.
    date_before, date_after : str, optional
        Dates for the attributes (default from metadata or file names).
    overwrite : bool
        Replace existing outputs.
    chunk : int, optional
        Engine chunk size.
    masks : (str, str), optional
        Class masks of both dates already made with ``model`` on one grid (a workflow's
        segmentation outputs): used instead of segmenting again (ignored when their grids differ).
    crs : str, optional
        CRS of the GeoPackage/FlatGeobuf/GeoParquet polygons (default the grid's).
    radiometry : str, optional
        How both dates store reflectance, for models that take it (see :func:`geoseg.predict`).

    Returns
    -------
    dict
        The report (also ``run.json``): code table, hectares per transition, paths, timings.
    """
    import dask

    from geoseg.engine import predict, write
    from geoseg.engine.write import check_output_dir
    from geoseg.io.mask import open_mask
    from geoseg.io.raster import file_fingerprint, open_source
    from geoseg.models.bands import match_bands, parse_band_option
    from geoseg.models.spec import resolve_model
    from geoseg.vector import vectorize

    t0 = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    check_output_dir(out_dir, overwrite, ("change.tif", "run.json"))
    from geoseg.vector.writers import FORMATS

    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InputError(f"unknown vector format(s) {bad or list(formats)}; choose from {', '.join(FORMATS)}")
    if resampling not in ("nearest", "bilinear", "cubic", "average", "cubic_spline", "lanczos", "mode"):
        raise InputError(f"resampling {resampling!r} is unknown; use nearest, bilinear, cubic or average")
    spec = resolve_model(model)
    if mask_model is not None:
        resolve_model(mask_model)  # a missing mask model fails before any work
    target = open_source(grid or before).geobox
    date_before = date_before or raster_date(before)
    date_after = date_after or raster_date(after)

    def aligned(path: str, bands: str | None, model_spec):
        """``path`` with the bands ``model_spec``'s card names, read on the target grid."""
        idx, mapping = parse_band_option(bands)
        if idx is None and model_spec.card.bands:
            everything = open_source(path)
            idx = match_bands(model_spec.card.bands, everything.band_descriptions, mapping, origin=everything.path)
        src = open_source(path, idx)
        same = src.geobox == target
        return src if same else open_source(path, idx, warp_to=target, resampling=resampling)

    src_b, src_a = aligned(before, bands_before, spec), aligned(after, bands_after, spec)
    made: dict[str, str] = {}
    if masks is not None and open_mask(masks[0]).geobox == open_mask(masks[1]).geobox:
        made = {"before": os.path.abspath(masks[0]), "after": os.path.abspath(masks[1])}
    else:  # no masks, or masks on different grids: segment both dates aligned on one grid
        for name, src in (("before", src_b), ("after", src_a)):
            result = predict(src, spec, aoi=aoi, chunk=chunk, radiometry=radiometry)
            write(result, os.path.join(out_dir, name), overwrite=True)
            made[name] = os.path.join(out_dir, name, "mask.tif")
    masks_ = made
    cloud_masks: list[str] = []
    if mask_model is not None:
        mspec = resolve_model(mask_model)
        for name, path in (("before", before), ("after", after)):
            src = aligned(path, None, mspec)
            folder = os.path.join(out_dir, f"mask_{name}")
            write(predict(src, mspec, aoi=aoi, chunk=chunk), folder, overwrite=True)
            cloud_masks.append(os.path.join(folder, "mask.tif"))

    mb = open_mask(masks_["before"])
    classes = [(c.id, c.name, tuple(c.color or (0, 0, 0))) for c in mb.classes]
    trans = transitions(classes, spec.card.task)
    lut = np.zeros(256 * 256, np.uint8)
    for t in trans:
        lut[t.before * 256 + t.after] = t.code
    gb = mb.geobox
    import dask.array as da

    wins = _grid(gb, 2048)
    inputs = "|".join(file_fingerprint(p) for p in (masks_["before"], masks_["after"], *cloud_masks))
    sieve_px = 0
    if min_area > 0 and gb.crs is not None:  # the minimum mapping unit, in pixels at the grid's centre
        px_m2 = float(_pixel_areas(gb, np.array([gb.height / 2]), gb.width / 2)[0])
        sieve_px = int(np.ceil(min_area / px_m2))
    blocks = [
        [
            da.from_delayed(
                dask.delayed(_code_chunk, pure=True)(
                    masks_["before"], masks_["after"], w, lut, tuple(cloud_masks), inputs, sieve_px
                ),
                shape=w.shape,
                dtype=np.uint8,
            )
            for w in row
        ]
        for row in wins
    ]
    arr = _as_dataarray(da.block(blocks), gb)
    info = [ClassInfo(0, "no_change", (235, 235, 235))] + [ClassInfo(t.code, t.name, t.color) for t in trans]
    table = [{"code": t.code, "name": t.name, "before": t.before, "after": t.after, "color": list(t.color)} for t in trans]
    extra = {
        "change": {
            "before": {"path": os.path.abspath(before), "date": date_before, "mask": masks_["before"]},
            "after": {
                "path": os.path.abspath(after),
                "date": date_after,
                "mask": masks_["after"],
                "aligned": src_a.warp is not None,
            },
            "model": spec.id,
            "codes": [{"code": 0, "name": "no_change"}, *table, {"code": NODATA, "name": "not valid on both dates"}],
            "cloud_masks": cloud_masks,
            "resampling": resampling,
        }
    }
    report = write(arr, out_dir, overwrite=True, classes=info, extra=extra, mask_name="change.tif")
    ha = hectares(os.path.join(out_dir, "change.tif"))
    report["change"]["hectares"] = {t.name: round(float(ha[t.code]), 4) for t in trans}
    report["change"]["valid_hectares"] = round(float(ha[:NODATA].sum()), 4)
    vrep = vectorize(
        os.path.join(out_dir, "change.tif"),
        out_dir,
        classes=[t.name for t in trans],
        min_area=min_area,
        formats=formats,
        crs=crs,
        overwrite=True,
        attributes={"date_before": date_before or "", "date_after": date_after or ""},
        kind="area",
    )
    report["vectors"] = {ly["name"]: ly["features"] for ly in vrep["layers"]}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    from geoseg.io.outdir import write_json_atomic

    write_json_atomic(os.path.join(out_dir, "run.json"), report, indent=2)  # the report with hectares and polygons, last
    return report


def _as_dataarray(arr, geobox):
    import rioxarray  # noqa: F401  (registers .rio)
    import xarray as xr

    t = geobox.transform
    xs = t.c + t.a * (np.arange(geobox.width) + 0.5)
    ys = t.f + t.e * (np.arange(geobox.height) + 0.5)
    out = xr.DataArray(arr, dims=("y", "x"), coords={"y": ys, "x": xs}, name="change")
    if geobox.crs:
        out = out.rio.write_crs(geobox.crs)
    return out.rio.write_transform(t).rio.write_nodata(NODATA)


def format_change(report: dict[str, Any]) -> str:
    """Hectares per transition as a table."""
    c = report["change"]
    lines = [f"change {c['before']['date'] or '?'} -> {c['after']['date'] or '?'} ({c['model']})"]
    lines.append(f"  {'transition':<24} {'hectares':>12} {'polygons':>9}")
    for name, ha in c["hectares"].items():
        lines.append(f"  {name:<24} {ha:>12.2f} {report.get('vectors', {}).get(name, 0):>9}")
    lines.append(f"  {'valid on both dates':<24} {c['valid_hectares']:>12.2f}")
    return "\n".join(lines)
