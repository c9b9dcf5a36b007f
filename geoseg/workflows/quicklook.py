"""A quicklook PNG: the scene in true colour, every model's classes filled and outlined, a legend.

So a person can see a result without opening a GIS. The scene is read decimated (at most
``max_side`` pixels a side), stretched per band between its 2nd and 98th percentiles, and
each mask is laid on it from its own grid (an AOI run's mask covers only the AOI window).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from geoseg.classes import NODATA, is_background
from geoseg.errors import InputError, ModelError

__all__ = ["Overlay", "quicklook"]


@dataclass(frozen=True)
class Overlay:
    """A class mask to draw, and a label for its legend entries."""

    mask: str
    label: str


def _true_colour(path: str, max_side: int) -> tuple[np.ndarray, int, object]:
    from geoseg.io.raster import open_source, read_overview
    from geoseg.models.bands import match_bands

    src = open_source(path)
    try:  # described red/green/blue (B04, SR_B4, ...); else the first three bands, or one grey band
        bands = list(match_bands(["red", "green", "blue"], src.band_descriptions, origin=path))
    except ModelError:
        bands = [1, 2, 3] if src.count >= 3 else [1, 1, 1]
    data, f = read_overview(open_source(path, bands), max_side, exact=True)  # overlays sit on exact pixels
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
    """Write a PNG of ``scene`` with ``overlays`` drawn over it and a legend.

    Parameters
    ----------
    scene : str
        The raster (true colour from its red/green/blue bands, else the first three).
    overlays : sequence of Overlay
        Class masks on the scene's grid or a window of it (drawn in order, later on top).
    out : str
        PNG path (written atomically).
    title : str
        A line above the legend.
    max_side : int
        Longest side of the image in pixels.
    alpha : float
        Fill opacity of the classes (outlines are opaque).

    Returns
    -------
    str
        ``out``.
    """
    from PIL import Image, ImageDraw, ImageFont

    from geoseg.io.mask import open_mask

    rgb, f, gb = _true_colour(scene, max_side)
    img = rgb.astype(np.float32)
    h, w = rgb.shape[:2]
    legend: list[tuple[str, tuple[int, int, int]]] = []
    analysed = np.zeros((h, w), bool)  # pixels some mask covers (inside the AOI)
    for ov in overlays:
        src = open_mask(ov.mask)
        mgb = src.geobox
        # the mask's offset on the scene grid (same pixel size, whole-pixel shift)
        col0, row0 = (~gb.transform) @ (mgb.transform.c, mgb.transform.f)
        row0, col0 = round(row0), round(col0)
        if abs(mgb.transform.a - gb.transform.a) > 1e-9 * abs(gb.transform.a):
            raise InputError(f"{ov.mask}: not on the grid of {scene}; a quicklook needs masks made from that scene")
        # scene pixels of the decimated image that the mask covers
        rows = np.arange(h) * f - row0
        cols = np.arange(w) * f - col0
        rin = (rows >= 0) & (rows < mgb.height)
        cin = (cols >= 0) & (cols < mgb.width)
        if not rin.any() or not cin.any():
            continue
        sub = np.full((h, w), NODATA, np.uint8)
        sub[np.ix_(rin, cin)] = _sampled(src.path, rows[rin], cols[cin])
        analysed |= sub != NODATA
        edge = np.zeros((h, w), bool)
        edge[:-1] |= sub[:-1] != sub[1:]
        edge[1:] |= sub[:-1] != sub[1:]
        edge[:, :-1] |= sub[:, :-1] != sub[:, 1:]
        edge[:, 1:] |= sub[:, :-1] != sub[:, 1:]
        for c in src.classes:
            if is_background(c.name):  # drawn as nothing
                continue
            sel = sub == c.id
            if not sel.any():
                continue
            color = np.asarray(c.color, np.float32)
            img[sel] = img[sel] * (1 - alpha) + color * alpha
            img[sel & edge] = color
            legend.append((f"{c.name} ({ov.label})" if ov.label and ov.label != c.name else c.name, tuple(c.color)))
    if overlays and analysed.any():
        img[~analysed] *= 0.55  # outside the AOI / nodata: dimmed
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    font = ImageFont.load_default()
    line = 16
    entries = ([(title, None)] if title else []) + legend
    if entries:
        draw = ImageDraw.Draw(canvas, "RGBA")
        width = 22 + max(int(draw.textlength(t, font=font)) for t, _ in entries)
        draw.rectangle([6, 6, 6 + width + 8, 6 + line * len(entries) + 8], fill=(255, 255, 255, 215), outline=(60, 60, 60, 255))
        for k, (text, color) in enumerate(entries):
            y = 10 + k * line
            x = 12
            if color is not None:
                draw.rectangle([x, y + 2, x + 12, y + 12], fill=(*color, 255), outline=(0, 0, 0, 255))
                x += 18
            draw.text((x, y), text, fill=(0, 0, 0, 255), font=font)
    from geoseg.io.outdir import atomic_path, fsync_replace

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = atomic_path(out)
    canvas.save(tmp, format="PNG")
    fsync_replace(tmp, out)
    return out
