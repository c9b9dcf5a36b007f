"""Change codes: one code per transition between two classes, coded window by window (sieved to a minimum mapping unit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from geoseg.change.areas import pixel_areas
from geoseg.classes import NODATA, ClassInfo, is_background
from geoseg.errors import InputError
from geoseg.grid import chunk_windows, regular_chunks
from geoseg.io.files import file_fingerprint
from geoseg.io.mask import open_mask, read_mask_window

__all__ = ["Transition", "as_dataarray", "code_chunk", "code_classes", "code_map", "code_table", "transitions"]


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


def code_chunk(
    before_path: str, after_path: str, window, lut: np.ndarray, masks: tuple[str, ...], inputs: str, sieve_px: int = 0
) -> np.ndarray:
    """Transition codes over one window (255 where either date, or a cloud mask, says unusable).

    With ``sieve_px`` > 1, patches smaller than that (4-connected) take the value of their
    largest neighbour (the minimum mapping unit), computed over the window grown by a margin
    so a patch cut by a chunk edge is judged whole. ``inputs`` (fingerprints of the mask
    files) only keys the task: a resumed write never reuses parts made from other masks.
    """
    src_b = open_mask(before_path)
    # the sieve judges a patch cut by the chunk edge whole: read the window grown by a margin wider than any patch it removes
    margin = 2 * int(np.ceil(np.sqrt(sieve_px))) + 2 if sieve_px > 1 else 0
    grown = window.expand(margin).intersection(src_b.geobox.window)
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
    return code[window.slices(origin=grown)]


def code_map(masks: dict[str, str], cloud_masks: list[str], trans: list[Transition], gb: Any, min_area: float) -> Any:
    """The lazy change map: one task per 2048² window codes both dates' classes (sieved to the minimum mapping unit)."""
    import dask
    import dask.array as da

    lut = np.zeros(256 * 256, np.uint8)
    for t in trans:
        lut[t.before * 256 + t.after] = t.code
    inputs = "|".join(file_fingerprint(p) for p in (masks["before"], masks["after"], *cloud_masks))
    sieve_px = 0
    if min_area > 0 and gb.crs is not None:  # the minimum mapping unit, in pixels at the grid's centre
        px_m2 = float(pixel_areas(gb, np.array([gb.height / 2]), gb.width / 2)[0])
        sieve_px = int(np.ceil(min_area / px_m2))
    code = dask.delayed(code_chunk, pure=True)
    blocks = [
        [
            da.from_delayed(
                code(masks["before"], masks["after"], w, lut, tuple(cloud_masks), inputs, sieve_px), shape=w.shape, dtype=np.uint8
            )
            for w in row
        ]
        for row in chunk_windows(regular_chunks(gb.height, gb.width, 2048))
    ]
    return as_dataarray(da.block(blocks), gb)


def code_classes(trans: list[Transition]) -> list[Any]:
    """The change map's class table: ``no_change`` and one class per transition."""
    return [ClassInfo(0, "no_change", (235, 235, 235))] + [ClassInfo(t.code, t.name, t.color) for t in trans]


def code_table(trans: list[Transition]) -> list[dict[str, Any]]:
    """The code table of ``run.json``: code, name, classes before and after, colour."""
    return [{"code": t.code, "name": t.name, "before": t.before, "after": t.after, "color": list(t.color)} for t in trans]


def as_dataarray(arr: Any, geobox: Any) -> Any:
    """A lazy uint8 array on ``geobox`` as a georeferenced DataArray (nodata 255)."""
    import rioxarray  # noqa: F401  (registers .rio)
    import xarray as xr

    t = geobox.transform
    xs = t.c + t.a * (np.arange(geobox.width) + 0.5)
    ys = t.f + t.e * (np.arange(geobox.height) + 0.5)
    out = xr.DataArray(arr, dims=("y", "x"), coords={"y": ys, "x": xs}, name="change")
    if geobox.crs:
        out = out.rio.write_crs(geobox.crs)
    return out.rio.write_transform(t).rio.write_nodata(NODATA)
