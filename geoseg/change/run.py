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
import time
from dataclasses import dataclass
from typing import Any

from geoseg.change.areas import hectares
from geoseg.change.codes import Transition, code_classes, code_map, code_table, transitions
from geoseg.classes import NODATA
from geoseg.engine import write
from geoseg.engine.write import check_output_dir
from geoseg.errors import InputError
from geoseg.io.mask import open_mask
from geoseg.io.outdir import write_json_atomic
from geoseg.io.raster import open_source
from geoseg.io.remote import shown_path
from geoseg.models.bands import match_bands, parse_band_option
from geoseg.models.spec import resolve_model
from geoseg.pipeline import segment
from geoseg.records import Record, hectares_text
from geoseg.vector import vectorize
from geoseg.vector.stac import write_item
from geoseg.vector.writers import FORMATS

__all__ = ["ChangeReport", "change", "format_change"]


@dataclass(frozen=True, eq=False)
class ChangeReport(Record):
    """What :func:`change` made: reads like its ``run.json`` record, with the polygon layers' report.

    Attributes
    ----------
    record : dict
        The contents of ``run.json`` (code table, hectares per transition, paths, timings).
    folder : str
        The output folder (absolute).
    vectors : VectorReport
        The transition polygons.
    item : str or None
        The STAC Item of the change map (``item.json``; None for a grid without a CRS).
    """

    record: dict[str, Any]
    folder: str
    vectors: Any
    item: str | None = None

    def files(self) -> list[str]:
        """Every file of the change map and its polygons, relative to :attr:`folder` (the dates' masks not included)."""
        item = [os.path.basename(self.item)] if self.item else []
        return [*self.record["outputs"].values(), "run.json", *self.vectors.files(), *item]


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
    progress: Any = False,
) -> ChangeReport:
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
    progress : bool, callable or Progress
        Count each date's model tiles, then the change map's chunks and polygon windows, with
        MP/s and an ETA: True for a bar on a terminal (plain lines in logs), or a callable
        receiving ``(done, total, unit)`` (see :mod:`geoseg.engine.progress`).

    Returns
    -------
    ChangeReport
        The report (its record is also ``run.json``): code table, hectares per transition,
        paths, timings; with the polygons' report.
    """
    t0 = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    _check_arguments(out_dir, overwrite, formats, resampling)
    spec = resolve_model(model)
    mspec = resolve_model(mask_model) if mask_model is not None else None  # a missing mask model fails before any work
    target = open_source(grid or before).geobox
    src_b = _aligned(before, bands_before, spec, target, resampling)
    src_a = _aligned(after, bands_after, spec, target, resampling)
    dates = {"before": date_before or src_b.date, "after": date_after or src_a.date}  # read when they were opened
    made = _date_masks(masks, src_b, src_a, spec, out_dir, progress=progress, aoi=aoi, chunk=chunk, radiometry=radiometry)
    cloud_masks = [] if mspec is None else _cloud_masks(mspec, before, after, target, resampling, out_dir, aoi, chunk, progress)
    mb = open_mask(made["before"])
    trans = transitions([(c.id, c.name, tuple(c.color or (0, 0, 0))) for c in mb.classes], spec.card.task)
    codes = code_map(made, cloud_masks, trans, mb.geobox, min_area)
    record = {
        "before": {"path": shown_path(before), "date": dates["before"], "mask": made["before"]},
        "after": {
            "path": shown_path(after),  # a URL as GDAL reads it, its token redacted
            "date": dates["after"],
            "mask": made["after"],
            "aligned": src_a.warp is not None,
        },
        "model": spec.id,
        "codes": [{"code": 0, "name": "no_change"}, *code_table(trans), {"code": NODATA, "name": "not valid on both dates"}],
        "cloud_masks": cloud_masks,
        "resampling": resampling,
    }
    written = write(
        codes, out_dir, overwrite=True, classes=code_classes(trans), extra={"change": record}, mask_name="change.tif",
        progress=progress,
    )  # fmt: skip
    report = dict(written.record)  # run.json again at the end, with hectares and polygons
    ha = hectares(os.path.join(out_dir, "change.tif"))
    report["change"]["hectares"] = {t.name: round(float(ha[t.code]), 4) for t in trans}
    report["change"]["valid_hectares"] = round(float(ha[:NODATA].sum()), 4)
    vrep = _polygons(out_dir, trans, min_area, formats, crs, dates, progress)
    report["vectors"] = {ly["name"]: ly["features"] for ly in vrep["layers"]}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(os.path.join(out_dir, "run.json"), report, indent=2)  # the report with hectares and polygons
    item_id = f"change-{spec.card.name}-{dates['before'] or 'before'}_{dates['after'] or 'after'}"
    item = write_item(out_dir, report, vrep, code_classes(trans), spec, item_id, (dates["before"], dates["after"]))
    return ChangeReport(report, out_dir, vrep, item)


def _check_arguments(out_dir: str, overwrite: bool, formats: tuple[str, ...], resampling: str) -> None:
    """Refuse existing outputs, unknown vector formats and an unknown resampling before any work."""
    check_output_dir(out_dir, overwrite, ("change.tif", "run.json"))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InputError(f"unknown vector format(s) {bad or list(formats)}; choose from {', '.join(FORMATS)}")
    if resampling not in ("nearest", "bilinear", "cubic", "average", "cubic_spline", "lanczos", "mode"):
        raise InputError(f"resampling {resampling!r} is unknown; use nearest, bilinear, cubic or average")


def _aligned(path: str, bands: str | None, model_spec: Any, target: Any, resampling: str) -> Any:
    """``path`` with the bands ``model_spec``'s card names, read on the ``target`` grid."""
    idx, mapping = parse_band_option(bands)
    if idx is None and model_spec.card.bands:
        everything = open_source(path)
        idx = match_bands(model_spec.card.bands, everything.band_descriptions, mapping, origin=everything.path)
    src = open_source(path, idx)
    return src if src.geobox == target else open_source(path, idx, warp_to=target, resampling=resampling)


def _date_masks(
    masks: tuple[str, str] | None, src_b: Any, src_a: Any, spec: Any, out_dir: str, progress: Any, **predict_kwargs: Any
) -> dict[str, str]:
    """Both dates' class masks: the given ones when they share a grid, else both segmented on one grid."""
    if masks is not None and open_mask(masks[0]).geobox == open_mask(masks[1]).geobox:
        return {"before": os.path.abspath(masks[0]), "after": os.path.abspath(masks[1])}
    made = {}
    for name, src in (("before", src_b), ("after", src_a)):
        made[name] = segment(src, spec, os.path.join(out_dir, name), overwrite=True, progress=progress, **predict_kwargs).mask
    return made


def _cloud_masks(
    mspec: Any,
    before: str,
    after: str,
    target: Any,
    resampling: str,
    out_dir: str,
    aoi: str | None,
    chunk: int | None,
    progress: Any = False,
) -> list[str]:
    """The mask model's class masks of both dates (``mask_before/``, ``mask_after/``), on the target grid."""
    out = []
    for name, path in (("before", before), ("after", after)):
        src = _aligned(path, None, mspec, target, resampling)
        where = os.path.join(out_dir, f"mask_{name}")
        out.append(segment(src, mspec, where, overwrite=True, aoi=aoi, chunk=chunk, progress=progress).mask)
    return out


def _polygons(
    out_dir: str,
    trans: list[Transition],
    min_area: float,
    formats: tuple[str, ...],
    crs: str | None,
    dates: dict,
    progress: Any = False,
) -> Any:
    """Transition polygons with both dates as attributes (every transition an area class)."""
    return vectorize(
        os.path.join(out_dir, "change.tif"),
        out_dir,
        classes=[t.name for t in trans],
        min_area=min_area,
        formats=formats,
        crs=crs,
        overwrite=True,
        attributes={"date_before": dates["before"] or "", "date_after": dates["after"] or ""},
        kind="area",
        progress=progress,
    )


def format_change(report: dict[str, Any]) -> str:
    """Hectares per transition as a table."""
    c = report["change"]
    lines = [f"change {c['before']['date'] or '?'} -> {c['after']['date'] or '?'} ({c['model']})"]
    lines.append(f"  {'transition':<24} {'hectares':>12} {'polygons':>9}")
    for name, ha in c["hectares"].items():
        lines.append(f"  {name:<24} {hectares_text(ha):>12} {report.get('vectors', {}).get(name, 0):>9}")
    lines.append(f"  {'valid on both dates':<24} {hectares_text(c['valid_hectares']):>12}")
    return "\n".join(lines)
