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
from geoseg.io.outdir import write_text_atomic
from geoseg.io.remote import failure_kind, gdal_path, is_remote, permanent_error, redact, remote_env, remote_name
from geoseg.workflows.spec import Imagery, check_inside

__all__ = ["Scene", "scenes"]


@dataclass(frozen=True)
class Scene:
    """One dated raster of a workflow.

    ``stamp`` is what else identifies its content beyond the files' sizes and mtimes (a STAC
    item's ``updated`` time and its assets' ``file:checksum``/``file:size``, and the hrefs
    of remote assets that cannot be stat'ed); it goes into the ledger's hash.
    """

    path: str
    date: str | None
    name: str
    stamp: str = ""


#: Longest file or folder name made from a scene or item name (bytes stay far below 255).
MAX_NAME = 80


def _slug(text: str) -> str:
    """A file-name-safe version of ``text``: never ``.``/``..`` or hidden, never longer than :data:`MAX_NAME`."""
    import hashlib

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_").lstrip(".").strip("_") or "scene"
    if len(slug) > MAX_NAME:
        slug = f"{slug[: MAX_NAME - 9]}-{hashlib.sha256(text.encode(errors='surrogateescape')).hexdigest()[:8]}"
    return slug


def _filename_date(path: str) -> str | None:
    m = re.search(r"(?<!\d)(\d{4})[-_]?(\d{2})[-_]?(\d{2})(?!\d)", os.path.basename(path))
    if m:
        return "-".join(m.groups())
    y = re.search(r"(?<!\d)(19|20)\d{2}(?!\d)", os.path.basename(path))
    return y.group(0) if y else None


def _raster_scaling(asset) -> tuple[float | None, float | None]:
    """An asset's STAC ``raster:bands`` scale and offset (None when it gives none or odd values)."""
    import math

    rb = asset.extra_fields.get("raster:bands") or []
    if len(rb) != 1 or not isinstance(rb[0], dict):
        return (None, None)

    def num(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    scale, offset = num(rb[0].get("scale")), num(rb[0].get("offset"))
    return (None, None) if scale == 0 else (scale, offset)


def _stack_vrt(
    item_id: str,
    bands: list[tuple[str, str]],
    folder: str,
    file_stem: str | None = None,
    scaling: list[tuple[float | None, float | None]] | None = None,
) -> str:
    """A VRT stacking single-band assets (same grid) with band descriptions, as ``folder/<file_stem>.vrt``.

    ``scaling`` gives each band's STAC ``raster:bands`` scale and offset (``physical = value x scale + offset``),
    written as the VRT band's ``Scale``/``Offset`` so models that take reflectance find the convention.
    """
    import rasterio

    scaling = scaling or [(None, None)] * len(bands)
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
        scale, offset = scaling[k - 1]
        if scale is not None or offset is not None:
            lines.append(f"    <Offset>{float(offset or 0.0)!r}</Offset>")
            lines.append(f"    <Scale>{float(1.0 if scale is None else scale)!r}</Scale>")
        lines.append(f'    <SimpleSource><SourceFilename relativeToVRT="0">{escape(href)}</SourceFilename>')
        lines.append("      <SourceBand>1</SourceBand></SimpleSource>")
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{file_stem or _slug(item_id)}.vrt")
    check_inside(os.path.dirname(folder), path, f"the VRT of STAC item {item_id!r}", "remove the link in .geoseg-stac")
    text = "\n".join(lines) + "\n"
    try:
        with open(path, encoding="utf-8") as f:
            same = f.read() == text
    except (OSError, UnicodeDecodeError):
        same = False
    if not same or os.path.islink(path):  # unchanged VRTs keep their mtime (ledger)
        write_text_atomic(path, text)
    return path


def _stac_stamp(item, hrefs: list[str]) -> str:
    """What identifies an item's pixels besides the local files' sizes and mtimes (see :class:`Scene`)."""
    import json

    stamp: dict[str, object] = {"updated": item.properties.get("updated")}
    assets = []
    for key, asset in sorted(item.get_assets().items()):
        href = asset.get_absolute_href() or asset.href
        if href not in hrefs:
            continue
        extra = asset.extra_fields
        local = not ("://" in href and not href.startswith("file://"))
        remote = None if local else redact(href)  # a signed href's token never reaches the ledger
        assets.append([key, extra.get("file:checksum"), extra.get("file:size"), extra.get("updated"), remote])
    stamp["assets"] = assets
    return json.dumps(stamp, sort_keys=True, default=str)


def _stac(im: Imagery, folder: str) -> list[Scene]:
    import pystac

    try:
        obj = pystac.read_file(im.stac)
    except Exception as exc:  # pystac raises several types for unreadable or invalid files
        raise InputError(f"{im.stac}: not a STAC catalog, collection or item pystac can read ({exc})") from exc
    items = [obj] if isinstance(obj, pystac.Item) else list(obj.get_items(recursive=True))
    if not items:
        raise InputError(f"{im.stac}: the catalog has no items")
    # items with the same id (or ids that make the same file name) each get their own VRT and scene
    # name, told apart by where the item lives; the same item listed twice is one scene
    slugs = [_slug(item.id) for item in items]
    out = []
    seen_items: set[tuple[str, str]] = set()
    for item, slug in zip(items, slugs, strict=True):
        where = item.get_self_href() or ""
        if (item.id, where) in seen_items:
            continue
        seen_items.add((item.id, where))
        if slugs.count(slug) > 1:
            import hashlib

            slug = f"{slug}-{hashlib.sha256(f'{where}|{item.id}'.encode(errors='surrogateescape')).hexdigest()[:8]}"
        assets = item.get_assets()
        if im.assets:
            missing = [k for k in im.assets.values() if k not in assets]
            if missing:
                raise InputError(
                    f"{im.stac}: item {item.id} has no asset {missing[0]!r} (it has {', '.join(assets)}); fix imagery.assets"
                )
            bands = [(name, assets[key].get_absolute_href()) for name, key in im.assets.items()]
            scaling = [_raster_scaling(assets[key]) for key in im.assets.values()]
        else:  # eo:bands common names
            bands = []
            scaling = []
            for _key, asset in assets.items():
                eo = asset.extra_fields.get("eo:bands") or []
                if len(eo) == 1 and eo[0].get("common_name"):
                    bands.append((eo[0]["common_name"], asset.get_absolute_href()))
                    scaling.append(_raster_scaling(asset))
            if not bands:
                raise InputError(
                    f"{im.stac}: item {item.id} has no assets with eo:bands common names; map them in imagery.assets"
                )
        date = item.datetime or item.common_metadata.start_datetime
        vrt = _stack_vrt(item.id, bands, folder, slug, scaling)
        stamp = _stac_stamp(item, [href for _, href in bands])
        out.append(Scene(vrt, date.date().isoformat() if date else None, slug, stamp))
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:  # the same id at the same place, yet different items: nothing tells them apart
        raise InputError(f"{im.stac}: STAC item {dup[0]!r} is listed twice with different content; give each item its own id")
    return out


def _has_crs(path: str) -> bool:
    """Whether GDAL finds a CRS on ``path`` (True for files it cannot open: the reader reports those)."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with remote_env(path), rasterio.open(path) as ds:
                return ds.crs is not None
    except RasterioIOError as exc:
        if is_remote(path) and failure_kind(str(exc)) == "permanent":  # a 404 or 403: one line now, the URL redacted
            raise permanent_error(path, str(exc)) from None
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
        paths = [gdal_path(p) for p in paths]  # a URL read where it is (GDAL's /vsicurl/, /vsis3/ ...), never downloaded
        for p in paths:
            if not is_remote(p) and not os.path.exists(p):
                raise InputError(f"imagery {p} does not exist; fix the path in 'imagery'")
            # workflows map places: a plain image (no CRS) is refused before any work, with the way out
            if not _has_crs(p):
                raise InputError(
                    f"{redact(p)}: has no CRS, and workflows map georeferenced imagery; assign one (gdal_edit.py -a_srs "
                    "EPSG:...) or run plain images with geoseg predict IMAGE|FOLDER|VIDEO"
                )
        dated = [(p, _filename_date(remote_name(p)) if im.date_from == "filename" else raster_date(p)) for p in paths]
        found = [Scene(p, d, _slug(os.path.splitext(remote_name(p))[0])) for p, d in dated]
    names = [s.name for s in found]
    if len(set(names)) != len(names):  # same file names in different folders: add the date, then a counter
        seen: dict[str, int] = {}
        unique = []
        for s in found:
            seen[s.name] = seen.get(s.name, 0) + 1
            unique.append(Scene(s.path, s.date, s.name if seen[s.name] == 1 else f"{s.name}-{seen[s.name]}", s.stamp))
        found = unique
    return sorted(found, key=lambda s: (s.date or "", s.name))
