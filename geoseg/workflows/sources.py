"""Scenes of a workflow: files, a glob, or a static STAC catalog/collection, each with a date.

A STAC item's band assets (one file per band, as Sentinel-2 and Landsat ship) are stacked
into a small VRT beside the outputs (``.geoseg-stac/<item>.vrt``), with band descriptions
set to the band names, so the engine matches them to a model card like any raster.
"""

from __future__ import annotations

import glob as globlib
import os
import re
from dataclasses import dataclass
from xml.sax.saxutils import escape

from geoseg.change import raster_date
from geoseg.errors import InputError
from geoseg.workflows.spec import Imagery

__all__ = ["Scene", "scenes"]


@dataclass(frozen=True)
class Scene:
    """One dated raster of a workflow."""

    path: str
    date: str | None
    name: str


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "scene"


def _filename_date(path: str) -> str | None:
    m = re.search(r"(?<!\d)(\d{4})[-_]?(\d{2})[-_]?(\d{2})(?!\d)", os.path.basename(path))
    if m:
        return "-".join(m.groups())
    y = re.search(r"(?<!\d)(19|20)\d{2}(?!\d)", os.path.basename(path))
    return y.group(0) if y else None


def _stack_vrt(item_id: str, bands: list[tuple[str, str]], folder: str) -> str:
    """A VRT stacking single-band assets (same grid) with band descriptions."""
    import rasterio

    grids = []
    for _, href in bands:
        try:
            with rasterio.open(href) as ds:
                grids.append(
                    (ds.width, ds.height, tuple(ds.transform)[:6], ds.crs.to_wkt() if ds.crs else "", ds.dtypes[0], ds.nodata)
                )
        except rasterio.errors.RasterioIOError as exc:
            raise InputError(f"{href}: a STAC asset GDAL cannot open ({exc}); check the catalog's hrefs") from exc
    if len({g[:4] for g in grids}) != 1:
        raise InputError(f"STAC item {item_id}: its band assets are on different grids; resample them to one grid first")
    width, height, t, wkt, _, _ = grids[0]
    gdal_types = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
                  "float32": "Float32", "float64": "Float64"}  # fmt: skip
    lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">', f"  <SRS>{escape(wkt)}</SRS>"]
    lines.append(f"  <GeoTransform>{t[2]!r}, {t[0]!r}, {t[1]!r}, {t[5]!r}, {t[3]!r}, {t[4]!r}</GeoTransform>")
    for k, ((name, href), g) in enumerate(zip(bands, grids, strict=True), start=1):
        lines.append(f'  <VRTRasterBand dataType="{gdal_types.get(g[4], "Float32")}" band="{k}">')
        lines.append(f"    <Description>{escape(name)}</Description>")
        if g[5] is not None:
            lines.append(f"    <NoDataValue>{g[5]!r}</NoDataValue>")
        lines.append(f'    <SimpleSource><SourceFilename relativeToVRT="0">{escape(href)}</SourceFilename>')
        lines.append("      <SourceBand>1</SourceBand></SimpleSource>")
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{_slug(item_id)}.vrt")
    text = "\n".join(lines) + "\n"
    if not os.path.exists(path) or open(path).read() != text:  # unchanged VRTs keep their mtime (ledger)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


def _stac(im: Imagery, folder: str) -> list[Scene]:
    import pystac

    try:
        obj = pystac.read_file(im.stac)
    except Exception as exc:  # pystac raises several types for unreadable or invalid files
        raise InputError(f"{im.stac}: not a STAC catalog, collection or item pystac can read ({exc})") from exc
    items = [obj] if isinstance(obj, pystac.Item) else list(obj.get_items(recursive=True))
    if not items:
        raise InputError(f"{im.stac}: the catalog has no items")
    out = []
    for item in items:
        assets = item.get_assets()
        if im.assets:
            missing = [k for k in im.assets.values() if k not in assets]
            if missing:
                raise InputError(
                    f"{im.stac}: item {item.id} has no asset {missing[0]!r} (it has {', '.join(assets)}); fix imagery.assets"
                )
            bands = [(name, assets[key].get_absolute_href()) for name, key in im.assets.items()]
        else:  # eo:bands common names
            bands = []
            for _key, asset in assets.items():
                eo = asset.extra_fields.get("eo:bands") or []
                if len(eo) == 1 and eo[0].get("common_name"):
                    bands.append((eo[0]["common_name"], asset.get_absolute_href()))
            if not bands:
                raise InputError(
                    f"{im.stac}: item {item.id} has no assets with eo:bands common names; map them in imagery.assets"
                )
        date = item.datetime or item.common_metadata.start_datetime
        out.append(Scene(_stack_vrt(item.id, bands, folder), date.date().isoformat() if date else None, _slug(item.id)))
    return out


def _has_crs(path: str) -> bool:
    """Whether GDAL finds a CRS on ``path`` (True for files it cannot open: the reader reports those)."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                return ds.crs is not None
    except RasterioIOError:
        return True


def scenes(im: Imagery, work_folder: str) -> list[Scene]:
    """The workflow's scenes, sorted by date (then name); dates from metadata or file names.

    Raises
    ------
    InputError
        A glob that matches nothing, a file that does not exist, an unreadable catalog.
    """
    if im.stac:
        found = _stac(im, os.path.join(work_folder, ".geoseg-stac"))
    else:
        paths = sorted(globlib.glob(im.glob)) if im.glob else list(im.files or [])
        if im.glob and not paths:
            raise InputError(f"imagery glob {im.glob!r} matches no file; fix the pattern")
        for p in paths:
            if not os.path.exists(p):
                raise InputError(f"imagery {p} does not exist; fix the path in 'imagery'")
            # workflows map places: a plain image (no CRS) is refused before any work, with the way out
            if not _has_crs(p):
                raise InputError(
                    f"{p}: has no CRS, and workflows map georeferenced imagery; assign one (gdal_edit.py -a_srs EPSG:...) "
                    "or run plain images with geoseg predict IMAGE|FOLDER|VIDEO"
                )
        dated = [(p, _filename_date(p) if im.date_from == "filename" else raster_date(p)) for p in paths]
        found = [Scene(p, d, _slug(os.path.splitext(os.path.basename(p))[0])) for p, d in dated]
    names = [s.name for s in found]
    if len(set(names)) != len(names):  # same file names in different folders: add the date, then a counter
        seen: dict[str, int] = {}
        unique = []
        for s in found:
            seen[s.name] = seen.get(s.name, 0) + 1
            unique.append(Scene(s.path, s.date, s.name if seen[s.name] == 1 else f"{s.name}-{seen[s.name]}"))
        found = unique
    return sorted(found, key=lambda s: (s.date or "", s.name))
