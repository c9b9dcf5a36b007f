"""Vectorize's arguments, checked and resolved before any work: formats, a value field, size rules, CRS, decimals.

Each function refuses a bad argument in one line naming the keyword (the command line shows its flag) and
returns what :func:`geoseg.vector.vectorize` runs with.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

from geoseg.errors import InputError
from geoseg.io.mask import MaskSource, open_mask
from geoseg.vector.writers import FORMATS, KIND_COLUMNS, VALUE_COLUMNS

__all__ = [
    "DEFAULT_FORMATS",
    "check_field",
    "check_formats",
    "geojson_precision",
    "open_for_vectorize",
    "output_crs",
    "size_rules",
]

DEFAULT_FORMATS = ("geojson", "gpkg")


def check_formats(formats: Sequence[str], connectivity: int) -> tuple[str, ...]:
    """The requested formats, normalised and deduplicated; refuse unknown ones and a bad connectivity."""
    formats = tuple(dict.fromkeys(f.strip().lower() for f in formats))
    bad = [f for f in formats if f not in (*FORMATS, "coco")]
    if bad or not formats:
        raise InputError(f"unknown vector format(s) {bad or formats}; choose from {', '.join(FORMATS)}, coco")
    if connectivity not in (4, 8):
        raise InputError(f"connectivity= must be 4 or 8, got {connectivity}")
    return formats


def check_field(field: str | None, formats: Sequence[str], attributes: dict[str, str] | None) -> None:
    """A value field's name: a plain column name no other column has; no COCO (its instances are per class)."""
    if field is None:
        return
    taken = {"id", "geometry", "geom", *VALUE_COLUMNS, *KIND_COLUMNS["area"], *(attributes or {})}
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", field) or field.lower() in taken:
        raise InputError(f"field={field!r}: give a column name of letters, digits and _ not among {', '.join(sorted(taken))}")
    if "coco" in formats:
        raise InputError(
            "field= writes one layer of values; COCO instances are per class: leave coco out of formats= or drop field="
        )


def size_rules(mask: str, min_area: float | None, min_pixels: int | None, simplify: float) -> tuple[float, float, int]:
    """``(min_area, max_length, min_pixels)``: the given ones, else the model's rules carried by the mask."""
    rules = dict(open_mask(mask, None).object_rules) if min_area is None or min_pixels is None else {}
    if min_area is None:  # the model's object rules, from the mask's metadata
        min_area = rules.get("min_area_m2", 0.0)
        max_length = rules.get("max_length_m", 0.0)
    else:
        max_length = 0.0
    if min_pixels is None:
        min_pixels = int(rules.get("mmu_px", 0))
    if isinstance(min_pixels, bool) or not isinstance(min_pixels, int) or min_pixels < 0:
        raise InputError(
            f"min_pixels must be a whole number >= 0, got {min_pixels!r}; give e.g. min_pixels=4 (0: keep every patch)"
        )
    for name, value in (("min_area", min_area), ("simplify", simplify)):
        if not math.isfinite(value) or value < 0:
            raise InputError(f"{name}= must be a finite number >= 0, got {value!r}; give e.g. {name}=0")
    return min_area, max_length, min_pixels


def open_for_vectorize(
    mask: str, probabilities: str | None, crs: str | None, formats: tuple[str, ...]
) -> tuple[MaskSource, str | None, tuple[str, ...]]:
    """Open the mask (with ``probabilities.tif`` beside it by default); the output CRS; COCO added for plain images."""
    if probabilities is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(mask)), "probabilities.tif")
        probabilities = beside if os.path.exists(beside) else None
    src = open_mask(mask, probabilities)
    out_crs = output_crs(mask, src.geobox.crs, crs)
    if src.geobox.crs is None and formats == DEFAULT_FORMATS:
        formats = (*formats, "coco")  # a plain image: objects also as COCO instances (pixel coordinates)
    return src, out_crs, formats


def output_crs(path: str, raster_crs: str | None, crs: str | None, what: str = "it") -> str | None:
    """The output CRS: ``crs`` (checked with pyproj), else the raster's; a raster without one takes none.

    Raises
    ------
    InputError
        ``crs`` given for a raster without a CRS (``what`` cannot be reprojected), or unknown to pyproj.
    """
    if not crs:
        return raster_crs
    if raster_crs is None:
        raise InputError(f"{path}: has no CRS, so {what} cannot be reprojected to {crs}; leave out crs=")
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_user_input(crs)
    except CRSError as exc:
        raise InputError(f"crs={crs!r} is not a CRS pyproj knows ({exc}); use e.g. EPSG:32632") from exc
    return crs


def geojson_precision(src: MaskSource, formats: Sequence[str], precision: int | None, pixel_m: float) -> int:
    """GeoJSON decimals: default 7, more for fine pixels; refuse a rounding step over a tenth of a pixel."""
    if src.geobox.crs and "geojson" in formats:
        # a rounding step of at most a tenth of a pixel keeps every polygon's shape
        needed = max(0, math.ceil(-math.log10(pixel_m / 111_320.0 / 10.0)))
        if precision is None:
            precision = max(7, needed)
        elif precision < needed:
            raise InputError(
                f"precision={precision} rounds lon/lat coarser than a tenth of a {pixel_m:.3g} m pixel; "
                f"use precision={needed} or more"
            )
    return 7 if precision is None else precision
