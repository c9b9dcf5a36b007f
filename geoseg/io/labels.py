"""Raster labels: a label image on an image's pixel grid, its pixel values mapped to class ids.

A label raster (a PNG or GeoTIFF of class values, e.g. 0 = membrane, 255 = cell) is the
other way to give training and evaluation labels besides vector polygons. It must be the
same size as the image (plain images: pixel to pixel), or georeferenced like the image
(then it is read aligned onto the image's grid, nearest neighbour, inside each read). Its
values become class ids: by default a value is the class with that id; ``--label-values``
(``0=membrane,255=cell``, ``VALUE=ignore``) maps any other encoding. Nodata pixels and
values mapped to ``ignore`` are :data:`IGNORE`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from geoseg.errors import InputError, NotGeoreferencedWarning
from geoseg.grid import GeoBox, Window
from geoseg.io.raster import RasterSource, open_source, read_window

__all__ = ["IGNORE", "RASTER_LABEL_SUFFIXES", "RasterLabels", "is_raster_labels", "open_raster_labels", "parse_label_values"]

#: label value the loss (and scoring) ignores: nodata, ``ignore`` values, other split, outside the image
IGNORE = 255

#: file name endings read as label rasters (anything else is a vector file); ``.vrt`` is sniffed
RASTER_LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".jp2", ".img", ".vrt")

_EXAMPLE = "give VALUE=CLASS pairs such as label_values={0: 'membrane', 255: 'cell'} (CLASS a class name or id, or ignore)"


def is_raster_labels(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a label raster (by its ending; a ``.vrt`` by its first bytes)."""
    path = os.fspath(path)
    low = path.lower()
    if not low.endswith(RASTER_LABEL_SUFFIXES):
        return False
    if low.endswith(".vrt"):
        try:
            with open(path, "rb") as f:
                return b"<OGRVRTDataSource" not in f.read(512)
        except OSError:
            return True
    return True


def parse_label_values(value: str | Mapping[Any, Any] | None) -> dict[int | float, str]:
    """``"0=membrane,255=cell"`` -> ``{0: "membrane", 255: "cell"}`` (``ignore`` is kept as is).

    Parameters
    ----------
    value : str, mapping or None
        Comma-separated ``VALUE=CLASS`` pairs (or a mapping of them); None or empty: ``{}``.

    Returns
    -------
    dict
        Pixel value (int, or float when not whole) -> class name, class id as text, or ``ignore``.

    Raises
    ------
    InputError
        A pair without ``=``, a value that is not a number, a value given twice, an empty class.
    """
    if value is None:
        return {}
    pairs = list(value.items()) if isinstance(value, Mapping) else [p.split("=", 1) for p in str(value).split(",") if p.strip()]
    out: dict[int | float, str] = {}
    for pair in pairs:
        if len(pair) != 2:
            raise InputError(f"label_values={value!r}: {'='.join(pair)!r} has no '='; {_EXAMPLE}")
        raw, name = str(pair[0]).strip(), str(pair[1]).strip()
        try:
            num = float(raw)
        except ValueError:
            num = math.nan
        if not math.isfinite(num):
            raise InputError(f"label_values={value!r}: {raw!r} is not a pixel value (a finite number); {_EXAMPLE}")
        if not name:
            raise InputError(f"label_values={value!r}: value {raw} has no class; {_EXAMPLE}")
        key: int | float = int(num) if num.is_integer() else num
        if key in out:
            raise InputError(f"label_values={value!r}: value {raw} is given twice; give each pixel value once")
        out[key] = name
    return out


@dataclass(frozen=True)
class RasterLabels:
    """A label raster on an image's grid, with its values mapped to class ids.

    Parameters
    ----------
    path : str
        The label raster.
    source : RasterSource
        Its single band, on the image's grid (same size, or aligned through a WarpedVRT).
    values, ids : numpy.ndarray
        Sorted pixel values and the class id of each (:data:`IGNORE` for ``ignore``).
    counts : mapping
        Labelled pixels per class name (background included).
    centres : numpy.ndarray
        ``(n, 2)`` fractional ``(row, col)`` positions on labelled foreground, about one per
        16 x 16 pixel cell that has some (centres of object-centred training chips).
    """

    path: str
    source: RasterSource
    values: np.ndarray
    ids: np.ndarray
    counts: Mapping[str, int]
    centres: np.ndarray

    def classify(self, raw: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Class ids (uint8) of raw label values; :data:`IGNORE` where invalid or not mapped."""
        idx = np.searchsorted(self.values, raw).clip(0, len(self.values) - 1)
        hit = (self.values[idx] == raw) & valid
        return np.where(hit, self.ids[idx], IGNORE).astype(np.uint8)

    def read(self, window: Window) -> np.ndarray:
        """Class ids over ``window`` (mirrored past the raster edge, like image reads)."""
        raw, valid, _ = read_window(self.source, window)
        return self.classify(raw[0], valid)


def _georeferenced(gb: GeoBox) -> bool:
    return gb.crs is not None and not gb.transform.is_identity


def _same_grid(a: GeoBox, b: GeoBox) -> bool:
    return a.shape == b.shape and a.crs == b.crs and a.transform.almost_equals(b.transform, precision=1e-9)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def open_raster_labels(
    path: str | os.PathLike,
    geobox: GeoBox,
    classes: Mapping[str, int],
    label_values: Mapping[int | float, str] | None = None,
    *,
    image: str = "the image",
    cell: int = 16,
    max_side: int = 4096,
    require_foreground: bool = True,
) -> RasterLabels:
    """Open a label raster on an image's grid and map its values to the model's classes.

    Reads the whole raster once (in strips) to check that every value it holds maps to a
    class, count pixels per class and place object centres.

    Parameters
    ----------
    path : str or os.PathLike
        Single-band raster of class values (PNG, GeoTIFF, ...).
    geobox : GeoBox
        The image's grid. The labels must have its size, or be georeferenced like it (then
        they are aligned onto it, nearest neighbour; pixels they do not cover are ignored).
    classes : mapping
        ``{class name: id}`` of the model (or of the mask being scored).
    label_values : mapping, optional
        Pixel value -> class name, class id or ``ignore`` (:func:`parse_label_values`);
        values not listed are the class with that id.
    image : str
        The image's name, for messages.
    cell, max_side : int
        Object centres: one per ``cell`` px square holding foreground, found on a copy of at
        most ``max_side`` px a side.
    require_foreground : bool
        Refuse labels without a pixel of a class other than background (training needs one).

    Returns
    -------
    RasterLabels

    Raises
    ------
    InputError
        Missing file, more than one band, a size or grid mismatch, values that map to no
        class, or no pixel of a class other than background.
    """
    path = os.fspath(path)
    src = _open_on_grid(path, geobox, image)
    # every value the raster holds, with counts, and a decimated copy for object centres
    f = max(1, math.ceil(max(geobox.width, geobox.height) / max_side))
    found, raw_small, valid_small = _scan_values(src, geobox, f)
    names = {cid: name for name, cid in classes.items()}
    table = _value_table(path, found, classes, names, label_values)
    values = np.array(sorted(table), dtype=np.float64)
    ids = np.array([table[v] for v in values.tolist()], dtype=np.uint8)
    counts = {name: 0 for name in classes}
    for v, n in found.items():
        if table[v] != IGNORE:
            counts[names[table[v]]] += n
    if require_foreground and not any(n for name, n in counts.items() if classes[name] != 0):
        shown = ", ".join(f"{_fmt(v)} ({n} px)" for v, n in sorted(found.items())[:8]) or "no valid pixel"
        raise InputError(
            f"{path}: no pixel has a class other than background; the raster holds {shown}; fix label_values= "
            "(e.g. 255=<class>) or the card's classes"
        )
    labels = RasterLabels(path, src, values, ids, counts, np.zeros((0, 2)))
    small = labels.classify(raw_small, valid_small)
    return RasterLabels(path, src, values, ids, counts, _centres(small, f, cell))


def _open_on_grid(path: str, geobox: GeoBox, image: str) -> RasterSource:
    """The label raster's single band on the image's grid: pixel to pixel, or aligned when both are georeferenced."""
    if not os.path.exists(path):
        raise InputError(f"{path}: label raster not found; give a PNG/GeoTIFF of class values the size of {image}")
    with warnings.catch_warnings():  # a plain label image beside a plain image: the image already said so
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        src = open_source(path, require_crs=False)
    if src.count != 1:
        raise InputError(
            f"{path}: a label raster has one band of class values, this one has {src.count}; give a single-band raster"
        )
    lab = src.geobox
    if _georeferenced(lab) and _georeferenced(geobox) and not _same_grid(lab, geobox):
        return open_source(path, warp_to=geobox, resampling="nearest")  # read aligned onto the image's grid
    if lab.shape != geobox.shape:
        raise InputError(
            f"{path}: the label raster is {lab.width}x{lab.height} px but {image} is {geobox.width}x{geobox.height}; "
            "give labels of the image's size (or georeference both)"
        )
    return replace(src, geobox=geobox)  # pixel to pixel on the image's grid


def _scan_values(src: RasterSource, geobox: GeoBox, f: int) -> tuple[dict[float, int], np.ndarray, np.ndarray]:
    """Read the labels once, in strips: pixels per value, and the raw values and validity decimated by ``f``."""
    step = max(f, (8_000_000 // geobox.width) // f * f)
    found: dict[float, int] = {}
    raws, valids = [], []
    for r0 in range(0, geobox.height, step):
        raw, valid, _ = read_window(src, Window(r0, 0, min(step, geobox.height - r0), geobox.width))
        vals, n = np.unique(raw[0][valid], return_counts=True)
        for v, c in zip(vals.tolist(), n.tolist(), strict=True):
            found[v] = found.get(v, 0) + c
        raws.append(raw[0, ::f, ::f])
        valids.append(valid[::f, ::f])
    return found, np.concatenate(raws), np.concatenate(valids)


def _value_table(
    path: str,
    found: Mapping[float, int],
    classes: Mapping[str, int],
    names: Mapping[int, str],
    label_values: Mapping[int | float, str] | None,
) -> dict[float, int]:
    """Pixel value -> class id for every value found: ``label_values`` first, else the class with that id."""
    table: dict[float, int] = {}
    for v, name in (label_values or {}).items():
        if name.lower() == "ignore":
            table[float(v)] = IGNORE
        elif name in classes:
            table[float(v)] = classes[name]
        elif name.isdigit() and int(name) in names:
            table[float(v)] = int(name)
        else:
            raise InputError(
                f"{path}: label_values= maps {_fmt(v)} to {name!r}, not a class ({', '.join(list(classes)[:8])}"
                f"{', ...' if len(classes) > 8 else ''}); "
                "give a class name, a class id or ignore"
            )
    unmapped = []
    for v in found:
        if v in table:
            continue
        if float(v).is_integer() and int(v) in names:
            table[v] = int(v)
        else:
            unmapped.append(v)
    if unmapped:
        shown = ", ".join(_fmt(v) for v in sorted(unmapped)[:8]) + (", ..." if len(unmapped) > 8 else "")
        ids = ", ".join(f"{cid}={name}" for cid, name in sorted(names.items())[:8]) + (", ..." if len(names) > 8 else "")
        example = names[min((k for k in names if k > 0), default=max(names))]
        raise InputError(
            f"{path}: pixel values {shown} are not class ids ({ids}); map them with label_values=, "
            f"e.g. label_values={{{_fmt(sorted(unmapped)[0])}: {example!r}}} (or 'ignore')"
        )
    return table


def _centres(cls: np.ndarray, f: int, cell: int) -> np.ndarray:
    """One foreground pixel per ``cell`` px square (the one nearest the square's middle), as full-res (row, col)."""
    c = max(1, round(cell / f))
    h, w = cls.shape
    hp, wp = -(-h // c) * c, -(-w // c) * c
    fg = np.zeros((hp, wp), bool)
    fg[:h, :w] = (cls > 0) & (cls != IGNORE)
    cells = fg.reshape(hp // c, c, wp // c, c).transpose(0, 2, 1, 3).reshape(hp // c, wp // c, c * c)
    yy, xx = np.mgrid[:c, :c]
    near = (c * c - ((yy - (c - 1) / 2) ** 2 + (xx - (c - 1) / 2) ** 2)).ravel()  # larger nearer the middle
    best = np.where(cells, near, -np.inf).argmax(axis=2)
    has = cells.any(axis=2)
    gr, gc = np.nonzero(has)
    k = best[gr, gc]
    rows, cols = gr * c + k // c, gc * c + k % c
    return np.column_stack([rows * f + 0.5, cols * f + 0.5]).astype(np.float64)  # the sampled full-res pixel's centre
