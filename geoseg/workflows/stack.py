"""Band assets stacked into a VRT: one band per name, each band a file per STAC item (mosaicked when several).

Band descriptions are the band names, so the engine matches them to a model card like any
raster. Remote assets (``https://``, ``s3://``, ``gs://``) stay remote: the VRT names them
through GDAL's ``/vsicurl/`` (``/vsis3/``, ``/vsigs/``), so each chunk task reads its window
with range requests. An unchanged VRT is not rewritten (its mtime keys a run's resumable
chunks); the ledger keys a STAC scene by the VRT's text instead (:func:`geoseg.io.files.file_fingerprint`).

Signed hrefs (a token in the query, as Planetary Computer or a presigned S3 URL gives) must
reach GDAL whole, so a VRT naming them holds secrets: it is written to geoseg's private cache
folder (:func:`geoseg.io.remote.write_private`, mode 0600), never beside the outputs, and the
ledger keys it by its text with the tokens redacted (a re-signed VRT is the same scene).
"""

from __future__ import annotations

import hashlib
import os
from xml.sax.saxutils import escape

from geoseg.errors import GeosegError, InputError
from geoseg.io.outdir import write_text_atomic
from geoseg.io.remote import gdal_path, has_secret, is_remote, redact, remote_gdal_options, retrying, write_private
from geoseg.workflows.spec import check_inside

__all__ = ["asset_crs", "gdal_href", "stack_vrt"]


def gdal_href(href: str) -> str:
    """An asset href as GDAL reads it: URLs through :func:`geoseg.io.remote.gdal_path` (``/vsicurl/``, ``/vsis3/``,
    ``/vsigs/``, ``/vsiaz/``), ``file://`` hrefs and local ones as paths.
    """
    from urllib.parse import unquote, urlparse

    if href.startswith("file://"):
        return unquote(urlparse(href).path)
    return gdal_path(href)


def _grids(hrefs: list[str]) -> list[tuple]:
    """(width, height, transform, CRS WKT, dtype, nodata) of each asset, opened by GDAL (remote ones by range
    requests, retried as every remote read: :func:`geoseg.io.remote.retrying`).
    """
    return [_grid(href) for href in hrefs]


def _grid(href: str) -> tuple:
    """One asset's grid (see :func:`_grids`); an asset that cannot be opened is one line naming it, redacted."""
    import rasterio

    from geoseg.io.files import LIST_GDAL_OPTIONS

    path = gdal_href(href)
    remote = is_remote(path)
    options = {**LIST_GDAL_OPTIONS, **(remote_gdal_options(path) if remote else {})}

    def read() -> tuple:
        with rasterio.Env(**options), rasterio.open(path) as ds:
            return ds.width, ds.height, tuple(ds.transform)[:6], ds.crs.to_wkt() if ds.crs else "", ds.dtypes[0], ds.nodata

    try:
        return retrying(path, "opening a STAC asset", read) if remote else read()
    except (rasterio.errors.RasterioIOError, GeosegError) as exc:
        reason = redact(str(exc))
        raise InputError(f"{redact(href)}: a STAC asset GDAL cannot open ({reason}); check the catalog's hrefs") from None


def asset_crs(href: str) -> str:
    """The CRS of an asset's pixels, read by GDAL: ``EPSG:<code>``, else its WKT ("" for none)."""
    from rasterio.crs import CRS

    wkt = _grids([href])[0][3]
    if not wkt:
        return ""
    epsg = CRS.from_wkt(wkt).to_epsg()
    return f"EPSG:{epsg}" if epsg else wkt


def _layout(label: str, grids: list[tuple]) -> tuple[int, int, tuple, list[tuple[int, int] | None]]:
    """The mosaic's size and transform, and each source's pixel offset in it (None: one source, the whole grid)."""
    if len({g[:4] for g in grids}) == 1:
        return grids[0][0], grids[0][1], grids[0][2], [None] * len(grids)
    t = grids[0][2]
    if len({g[3] for g in grids}) != 1 or any(g[2][0] != t[0] or g[2][4] != t[4] or g[2][1] or g[2][3] for g in grids):
        raise InputError(
            f"{label}: its band assets are on different grids (CRS or pixel size); resample them to one grid first, "
            "or narrow the search to one projection (collections, the AOI)"
        )
    x0 = min(g[2][2] for g in grids)
    y0 = max(g[2][5] for g in grids)
    offsets = []
    for g in grids:
        dx, dy = (g[2][2] - x0) / t[0], (g[2][5] - y0) / t[4]
        if abs(dx - round(dx)) > 1e-6 or abs(dy - round(dy)) > 1e-6:
            raise InputError(f"{label}: its items' pixels are not aligned on one grid; resample them to one grid first")
        offsets.append((round(dx), round(dy)))
    width = max(o[0] + g[0] for o, g in zip(offsets, grids, strict=True))
    height = max(o[1] + g[1] for o, g in zip(offsets, grids, strict=True))
    return width, height, (t[0], 0.0, x0, 0.0, t[4], y0), offsets


GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
              "float32": "Float32", "float64": "Float64"}  # fmt: skip


def _vrt_text(bands: list[tuple[str, list[str]]], grids: list[tuple], layout: tuple, scaling: list[tuple]) -> str:
    """The VRT's XML: a band per name, a source per href (placed at its offset when there are several)."""
    width, height, t, offsets = layout
    lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">', f"  <SRS>{escape(grids[0][3])}</SRS>"]
    lines.append(f"  <GeoTransform>{t[2]!r}, {t[0]!r}, {t[1]!r}, {t[5]!r}, {t[3]!r}, {t[4]!r}</GeoTransform>")
    k = 0
    for band, ((name, hrefs), (scale, offset)) in enumerate(zip(bands, scaling, strict=True), start=1):
        g = grids[k]
        lines.append(f'  <VRTRasterBand dataType="{GDAL_TYPES.get(g[4], "Float32")}" band="{band}">')
        lines.append(f"    <Description>{escape(name)}</Description>")
        if g[5] is not None:
            lines.append(f"    <NoDataValue>{g[5]!r}</NoDataValue>")
        if scale is not None or offset is not None:
            lines.append(f"    <Offset>{float(offset or 0.0)!r}</Offset>")
            lines.append(f"    <Scale>{float(1.0 if scale is None else scale)!r}</Scale>")
        for href in hrefs:
            lines.append(f'    <SimpleSource><SourceFilename relativeToVRT="0">{escape(gdal_href(href))}</SourceFilename>')
            place = offsets[k]
            if place is None:
                lines.append("      <SourceBand>1</SourceBand></SimpleSource>")
            else:
                w, h = grids[k][0], grids[k][1]
                lines.append("      <SourceBand>1</SourceBand>")
                lines.append(f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>')
                lines.append(f'      <DstRect xOff="{place[0]}" yOff="{place[1]}" xSize="{w}" ySize="{h}"/></SimpleSource>')
            k += 1
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    return "\n".join(lines) + "\n"


def stack_vrt(
    label: str,
    bands: list[tuple[str, list[str]]],
    folder: str,
    file_stem: str,
    scaling: list[tuple[float | None, float | None]] | None = None,
) -> str:
    """A VRT stacking single-band assets with band descriptions, as ``folder/<file_stem>.vrt``.

    Parameters
    ----------
    label : str
        What the VRT is of (``STAC item X``), for messages.
    bands : list of (str, list of str)
        Band name and its assets' hrefs: one per item, mosaicked when several (one CRS and pixel size).
    folder, file_stem : str
        Where the VRT is written (an unchanged VRT keeps its mtime); a VRT
        of signed hrefs goes to the private cache folder instead, named by ``file_stem`` and ``folder``.
    scaling : list of (float or None, float or None), optional
        Each band's STAC ``raster:bands`` scale and offset (``physical = value x scale + offset``),
        written as the VRT band's ``Scale``/``Offset`` so models that take reflectance find the convention.

    Returns
    -------
    str
        The VRT's path (in the private cache folder when the hrefs carry tokens).
    """
    hrefs = [h for _, hs in bands for h in hs]
    grids = _grids(hrefs)
    text = _vrt_text(bands, grids, _layout(label, grids), scaling or [(None, None)] * len(bands))
    path = os.path.join(folder, f"{file_stem}.vrt")
    if has_secret(text):  # signed hrefs: GDAL needs their tokens, and the outputs must never hold one
        check_inside(os.path.dirname(folder), path, f"the VRT of {label}", "remove the link in .geoseg-stac")
        if os.path.lexists(path):  # an earlier run's VRT there (tokens of the past): gone
            os.remove(path)
        place = hashlib.sha256(os.path.abspath(folder).encode(errors="surrogateescape")).hexdigest()[:12]
        return write_private(f"{file_stem}-{place}.vrt", text)
    os.makedirs(folder, exist_ok=True)
    check_inside(os.path.dirname(folder), path, f"the VRT of {label}", "remove the link in .geoseg-stac")
    try:
        with open(path, encoding="utf-8") as f:
            same = f.read() == text
    except (OSError, UnicodeDecodeError):
        same = False
    if not same or os.path.islink(path):  # unchanged VRTs keep their mtime (ledger)
        write_text_atomic(path, text)
    return path
