"""A quicklook PNG: the scene in true colour, every model's classes filled and outlined, framed like a map.

So a person can see a result without opening a GIS. The scene is read decimated (at most
``max_side`` pixels a side), stretched per band between its 2nd and 98th percentiles, and
each mask is laid on it from its own grid (an AOI run's mask covers only the AOI window).
Around the scene, never over it: coordinate ticks in the raster's CRS on the left and bottom
edges, and a band below with the title, the legend, a scale bar (true ground metres,
measured geodesically along the image's middle row) and the CRS. The PNG's text chunk
``geoseg:scene_box`` gives where the scene sits (``left,top,width,height``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from geoseg.classes import NODATA, is_background
from geoseg.errors import InputError, ModelError
from geoseg.grid import GeoBox
from geoseg.io.mask import open_mask
from geoseg.io.outdir import atomic_path, fsync_replace
from geoseg.io.raster import open_source, read_overview
from geoseg.models.bands import match_bands

__all__ = ["Overlay", "quicklook", "scale_bar"]

#: margin, text line height, tick length and swatch size, in PNG pixels
PAD, LINE, TICK, SWATCH = 8, 16, 4, 12


@dataclass(frozen=True)
class Overlay:
    """A class mask to draw, and a label for its legend entries."""

    mask: str
    label: str


def _true_colour(path: str, max_side: int) -> tuple[np.ndarray, int, GeoBox]:

    src = open_source(path)
    try:  # described red/green/blue (B04, SR_B4, ...); else the first three bands, or one grey band
        bands = list(match_bands(["red", "green", "blue"], src.band_descriptions, origin=path))
    except ModelError:
        bands = [1, 2, 3] if src.count >= 3 else [1, 1, 1]
    # overlays sit on exact pixels; a remote scene is drawn from its overviews instead (an exact read fetches it whole)
    data, f = read_overview(open_source(path, bands), max_side, exact=not src.remote)
    arr = data.astype(np.float64).filled(np.nan)
    rgb = np.zeros((*arr.shape[1:], 3), np.uint8)
    if np.isfinite(arr).any():  # one stretch for all three bands keeps the colour balance
        lo, hi = np.nanpercentile(arr, 2), np.nanpercentile(arr, 98)
        scaled = (np.nan_to_num(arr, nan=lo) - lo) / max(hi - lo, 1e-9)
        rgb[:] = (np.clip(scaled, 0, 1) ** (1 / 1.4) * 255).astype(np.uint8).transpose(1, 2, 0)
    return rgb, f, src.geobox


def _sampled(path: str, rows: np.ndarray, cols: np.ndarray, strip: int = 1024) -> np.ndarray:
    """``mask[rows][:, cols]`` of a mask file, read in strips (never the whole mask at once)."""
    import rasterio
    from rasterio.windows import Window as RioWindow

    out = np.empty((len(rows), len(cols)), np.uint8)
    c0, c1 = int(cols.min()), int(cols.max()) + 1
    with rasterio.open(path) as ds:
        k = 0
        while k < len(rows):
            r0 = int(rows[k])
            take = rows[(rows >= r0) & (rows < r0 + strip)]
            block = ds.read(1, window=RioWindow(c0, r0, c1 - c0, int(take.max()) - r0 + 1))
            out[k : k + len(take)] = block[np.ix_(take - r0, cols - c0)]
            k += len(take)
    return out


def quicklook(
    scene: str,
    overlays: Sequence[Overlay],
    out: str,
    *,
    title: str = "",
    max_side: int = 1600,
    alpha: float = 0.45,
) -> str:
    """Write a PNG of ``scene`` with ``overlays`` drawn over it, coordinates, a legend and a scale bar.

    Parameters
    ----------
    scene : str
        The raster (true colour from its red/green/blue bands, else the first three).
    overlays : sequence of Overlay
        Class masks on the scene's grid or a window of it (drawn in order, later on top).
    out : str
        PNG path (written atomically).
    title : str
        The first line of the legend band below the scene.
    max_side : int
        Longest side of the scene in the image, in pixels.
    alpha : float
        Fill opacity of the classes (outlines are opaque).

    Returns
    -------
    str
        ``out``.
    """
    rgb, f, gb = _true_colour(scene, max_side)
    img, legend = _draw_overlays(rgb, f, gb, scene, overlays, alpha)
    canvas, box = _framed(img, gb, f, title, legend)
    _save(canvas, box, f, out)
    return out


def _draw_overlays(
    rgb: np.ndarray, f: int, gb: GeoBox, scene: str, overlays: Sequence[Overlay], alpha: float
) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int]]]]:
    """The scene with every overlay's classes filled and outlined (outside every mask dimmed), and the legend entries."""
    img = rgb.astype(np.float32)
    h, w = rgb.shape[:2]
    legend: list[tuple[str, tuple[int, int, int]]] = []
    analysed = np.zeros((h, w), bool)  # pixels some mask covers (inside the AOI)
    for ov in overlays:
        src = open_mask(ov.mask)
        sub = _mask_on_image(src, gb, f, (h, w), scene)
        if sub is None:
            continue
        analysed |= sub != NODATA
        edge = np.zeros((h, w), bool)
        edge[:-1] |= sub[:-1] != sub[1:]
        edge[1:] |= sub[:-1] != sub[1:]
        edge[:, :-1] |= sub[:, :-1] != sub[:, 1:]
        edge[:, 1:] |= sub[:, :-1] != sub[:, 1:]
        for c in src.classes:
            sel = sub == c.id
            if is_background(c.name) or not sel.any():
                continue
            color = np.asarray(c.color, np.float32)
            img[sel] = img[sel] * (1 - alpha) + color * alpha
            img[sel & edge] = color
            legend.append((f"{c.name} ({ov.label})" if ov.label and ov.label != c.name else c.name, tuple(c.color)))
    if overlays and analysed.any():
        img[~analysed] *= 0.55  # outside the AOI / nodata: dimmed
    return np.clip(img, 0, 255).astype(np.uint8), legend


def _mask_on_image(src: Any, gb: GeoBox, f: int, shape: tuple[int, int], scene: str) -> np.ndarray | None:
    """The mask sampled at the image's pixels (:data:`NODATA` where it does not reach), or None when it misses them."""
    mgb = src.geobox
    # the mask's offset on the scene grid (same pixel size, whole-pixel shift)
    col0, row0 = (~gb.transform) @ (mgb.transform.c, mgb.transform.f)
    row0, col0 = round(row0), round(col0)
    if abs(mgb.transform.a - gb.transform.a) > 1e-9 * abs(gb.transform.a):
        raise InputError(f"{src.path}: not on the grid of {scene}; a quicklook needs masks made from that scene")
    # scene pixels of the decimated image that the mask covers
    rows = np.arange(shape[0]) * f - row0
    cols = np.arange(shape[1]) * f - col0
    rin = (rows >= 0) & (rows < mgb.height)
    cin = (cols >= 0) & (cols < mgb.width)
    if not rin.any() or not cin.any():
        return None
    sub = np.full(shape, NODATA, np.uint8)
    sub[np.ix_(rin, cin)] = _sampled(src.path, rows[rin], cols[cin])
    return sub


def scale_bar(geobox: GeoBox, factor: int, width_px: int, fraction: float = 0.3) -> tuple[int, str] | None:
    """A scale bar for an image of ``geobox`` decimated by ``factor``: its length in image pixels and its label.

    The length is a round ground distance (1, 2 or 5 x 10^k metres) of at most ``fraction``
    of the image's width, measured on the ellipsoid along the image's middle row, so it holds
    in a geographic CRS (degrees) or Web Mercator as in UTM.

    Returns
    -------
    (int, str) or None
        Pixels and a label (``500 m``, ``2 km``); None without a CRS or when the CRS cannot
        be measured.
    """
    per_px = _metres_per_pixel(geobox)
    if per_px is None or per_px <= 0:
        return None
    per_px *= factor
    target = per_px * width_px * fraction
    length = 10 ** math.floor(math.log10(target))
    length = max(m * length for m in (1, 2, 5) if m * length <= target)
    label = f"{length / 1000:g} km" if length >= 1000 else f"{length:g} m"
    return max(1, round(length / per_px)), label


def _metres_per_pixel(gb: GeoBox) -> float | None:
    """Ground metres per raster pixel along the middle row (geodesic on the CRS's ellipsoid), or None."""
    if gb.crs is None:
        return None
    from pyproj import CRS, Geod, Transformer

    try:
        crs = CRS.from_user_input(gb.crs)
        geo = crs.geodetic_crs or CRS.from_epsg(4326)
        geod = crs.get_geod() or Geod(ellps="WGS84")
        cols = np.linspace(0, gb.width, 17)  # in segments: a wide raster's row is no straight line
        t, mid = gb.transform, gb.height / 2
        xs, ys = t.a * cols + t.b * mid + t.c, t.d * cols + t.e * mid + t.f
        lons, lats = Transformer.from_crs(crs, geo, always_xy=True).transform(xs, ys)
        metres = geod.line_length(lons, lats)
    except Exception:  # a CRS pyproj cannot take to its ellipsoid: no scale bar rather than a wrong one
        return None
    return metres / gb.width if math.isfinite(metres) else None


def _nice_ticks(lo: float, hi: float, n: int) -> tuple[list[float], int]:
    """Round values between ``lo`` and ``hi`` (about ``n``), and the decimals their labels need."""
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    values = [round(first + k * step, 9) for k in range(int((hi - first) / step + 1e-9) + 1)]
    decimals = next(d for d in range(12) if abs(step * 10**d - round(step * 10**d)) < 1e-6)
    return values, decimals


def _ticks(gb: GeoBox, f: int, size: tuple[int, int]) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    """Coordinate ticks on the image: (image column, label) along x and (image row, label) along y, in the CRS."""
    t = gb.transform
    if gb.crs is None or t.b or t.d:  # plain images and rotated grids: no ticks
        return [], []
    from pyproj import CRS

    degrees = CRS.from_user_input(gb.crs).is_geographic
    out = []
    for origin, step_px, extent, n in ((t.c, t.a * f, gb.width * t.a, size[1]), (t.f, t.e * f, gb.height * t.e, size[0])):
        values, d = _nice_ticks(min(origin, origin + extent), max(origin, origin + extent), max(2, n // 100))
        fmt = f"{{:.{d}f}}°" if degrees else f"{{:,.{d}f}}"
        out.append([((v - origin) / step_px, fmt.format(v)) for v in values])
    return out[0], out[1]


def _crs_note(gb: GeoBox) -> str:
    """``coordinates: EPSG:32632, metre`` (the CRS's authority code, else its name, and its unit)."""
    if gb.crs is None:
        return "pixel coordinates (no CRS)"
    from pyproj import CRS

    crs = CRS.from_user_input(gb.crs)
    auth = crs.to_authority()
    unit = crs.axis_info[0].unit_name if crs.axis_info else ""
    return f"coordinates: {':'.join(auth) if auth else crs.name}{', ' + unit if unit else ''}"


def _framed(
    img: np.ndarray, gb: GeoBox, f: int, title: str, legend: list[tuple[str, tuple[int, int, int]]]
) -> tuple[Any, tuple[int, int, int, int]]:
    """The image on a white canvas: ticks left and below, then the legend band; and where the image sits."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    size = img.shape[:2]
    xticks, yticks = _ticks(gb, f, size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    left = PAD + (max(int(measure(lab, font=font)) for _, lab in yticks) + TICK + 4 if yticks else 0)
    right = PAD + (int(measure(xticks[-1][1], font=font)) // 2 if xticks else 0)
    top = PAD
    band_top = top + size[0] + 1 + (TICK + LINE if xticks else 0) + PAD
    rows = _band_rows(title, legend, scale_bar(gb, f, size[1]), _crs_note(gb), measure, font, left + size[1] + right - 2 * PAD)
    width = max(left + size[1] + right, PAD * 2 + max((r[-1][0] + r[-1][2] for r in rows if r), default=0))
    canvas = Image.new("RGB", (width, band_top + LINE * len(rows) + PAD), (255, 255, 255))
    canvas.paste(Image.fromarray(img), (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([left - 1, top - 1, left + size[1], top + size[0]], outline=(60, 60, 60))  # just outside the scene
    _draw_ticks(draw, font, (left, top), size, xticks, yticks)
    _draw_band(draw, font, rows, band_top)
    return canvas, (left, top, size[1], size[0])


def _band_rows(
    title: str,
    legend: list[tuple[str, tuple[int, int, int]]],
    bar: tuple[int, str] | None,
    note: str,
    measure: Callable[..., float],
    font: Any,
    width: int,
) -> list[list[tuple[int, str, int, Any]]]:
    """The legend band laid out in rows of (x, kind, width, content), wrapped at ``width``."""
    rows: list[list] = [[(0, "text", int(measure(title, font=font)), title)]] if title else []
    row: list = []
    for text, color in legend:
        w = SWATCH + 6 + int(measure(text, font=font))
        x = row[-1][0] + row[-1][2] + 14 if row else 0
        if row and x + w > width:
            rows.append(row)
            row, x = [], 0
        row.append((x, "swatch", w, (text, color)))
    if row:
        rows.append(row)
    last = []
    if bar is not None:
        last.append((0, "bar", bar[0] + 6 + int(measure(bar[1], font=font)), bar))
    x = last[-1][2] + 18 if last else 0
    last.append((x, "text", int(measure(note, font=font)), note))
    return [*rows, last]


def _draw_ticks(draw: Any, font: Any, origin: tuple[int, int], size: tuple[int, int], xticks: list, yticks: list) -> None:
    """Tick marks and coordinate labels outside the scene's frame: x below it, y to its left."""
    left, top = origin
    for px, label in xticks:
        if 0 <= px <= size[1]:
            x = left + round(px)
            draw.line([x, top + size[0] + 1, x, top + size[0] + TICK], fill=(60, 60, 60))
            draw.text((x, top + size[0] + TICK + 2), label, fill=(0, 0, 0), font=font, anchor="ma")
    for py, label in yticks:
        if 0 <= py <= size[0]:
            y = top + round(py)
            draw.line([left - 1 - TICK, y, left - 2, y], fill=(60, 60, 60))
            draw.text((left - TICK - 4, y), label, fill=(0, 0, 0), font=font, anchor="rm")


def _draw_band(draw: Any, font: Any, rows: list, band_top: int) -> None:
    """The legend band: title, class swatches, scale bar and CRS note, row by row."""
    for k, row in enumerate(rows):
        y = band_top + k * LINE
        for x, kind, _, content in row:
            x += PAD
            if kind == "text":
                draw.text((x, y), content, fill=(0, 0, 0), font=font)
            elif kind == "swatch":
                text, color = content
                draw.rectangle([x, y + 1, x + SWATCH, y + 1 + SWATCH], fill=tuple(color), outline=(0, 0, 0))
                draw.text((x + SWATCH + 6, y), text, fill=(0, 0, 0), font=font)
            else:
                px, label = content
                half = px // 2
                draw.rectangle([x, y + 4, x + half, y + 10], fill=(0, 0, 0), outline=(0, 0, 0))
                draw.rectangle([x + half, y + 4, x + px, y + 10], fill=(255, 255, 255), outline=(0, 0, 0))
                draw.text((x + px + 6, y), label, fill=(0, 0, 0), font=font)


def _save(canvas: Any, box: tuple[int, int, int, int], f: int, out: str) -> None:
    """Write the PNG atomically, with where the scene sits and its pixel step as text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("geoseg:scene_box", ",".join(map(str, box)))
    info.add_text("geoseg:scene_step", str(f))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = atomic_path(out)
    canvas.save(tmp, format="PNG", pnginfo=info)
    fsync_replace(tmp, out)
