"""Radiometry: how a raster's stored values become surface reflectance.

Models trained on reflectance (the bundled ``ships``) must see the same physical quantity
whatever convention a product stores it in. Sentinel-2 L2A alone comes as

- ESA products from processing baseline 04.00 (2022-01-25) on, and the COGs of STAC
  catalogues built from them: ``DN = 10000 * reflectance + 1000`` (``BOA_ADD_OFFSET`` -1000);
- ESA products before that baseline, harmonised collections (Sentinel Hub "DN", Earth
  Engine ``S2_SR_HARMONIZED``): ``DN = 10000 * reflectance``;
- Sentinel Hub EO Browser 16-bit "raw" exports: ``DN = 65535 * reflectance``;
- float reflectance (odc-stac/stackstac with the scale applied, Sentinel Hub FLOAT32).

:func:`resolve_radiometry` finds the convention of one raster, in this order of evidence:
what the caller says; the bands' own GDAL scale/offset (what a STAC ``raster:bands``
entry becomes in a VRT, and what careful producers write); product metadata
(``BOA_ADD_OFFSET``, ``BOA_QUANTIFICATION_VALUE``, ``PROCESSING_BASELINE``); the ESA
product name in the path (``_N0509_``); float data already in reflectance; and last the
value range, which is logged as an assumption with the fix. Each answer says where it came
from, so run.json can record it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from geoseg.errors import InputError
from geoseg.io.raster import RasterSource, read_overview

__all__ = ["PRESETS", "Radiometry", "parse_radiometry", "resolve_radiometry"]

#: named conventions: ``reflectance = value * scale + offset``
PRESETS: dict[str, tuple[float, float, str]] = {
    "reflectance": (1.0, 0.0, "surface reflectance (0-1)"),
    "s2-l2a": (1e-4, -0.1, "Sentinel-2 L2A, ESA processing baseline >= 04.00: DN = 10000 x reflectance + 1000"),
    "s2-l2a-harmonized": (
        1e-4,
        0.0,
        "reflectance x 10000 without offset (Sentinel-2 L2A before baseline 04.00, harmonised collections)",
    ),
    "sentinelhub-raw16": (1.0 / 65535.0, 0.0, "Sentinel Hub 16-bit raw export: DN = 65535 x reflectance"),
    "landsat-c2-l2": (2.75e-5, -0.2, "Landsat Collection 2 Level-2 surface reflectance: DN x 0.0000275 - 0.2"),
}

#: stored values above this in 0.5 % of a raster's pixels cannot be reflectance x 10000 (1.5)
_RAW16_ABOVE = 15000.0
#: with the baseline-04.00 offset nearly nothing reads below 1000 (reflectance 0)
_OFFSET_FLOOR = 900.0


@dataclass(frozen=True)
class Radiometry:
    """``reflectance = value * scale + offset`` per band, and where that came from.

    Parameters
    ----------
    name : str
        A key of :data:`PRESETS`, ``band metadata`` or ``custom``.
    scale, offset : tuple of float
        One value per band (or one for all).
    source : str
        The evidence: ``given``, ``band scale/offset``, ``product metadata``, ``product name``,
        ``float data``, ``value range (assumed)`` or ``training recipe``.
    """

    name: str
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    source: str

    def per_band(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``scale`` and ``offset`` as float64 arrays of ``n`` values."""
        s = np.broadcast_to(np.asarray(self.scale, np.float64), (n,))
        o = np.broadcast_to(np.asarray(self.offset, np.float64), (n,))
        return s.copy(), o.copy()

    def describe(self) -> str:
        """One line for logs: the convention and its evidence."""
        what = PRESETS[self.name][2] if self.name in PRESETS else f"value x {_fmt(self.scale)} + {_fmt(self.offset)}"
        return f"{self.name} ({what}; from {self.source})"

    def record(self) -> dict:
        """A JSON-ready record for run.json."""
        return {"name": self.name, "scale": list(self.scale), "offset": list(self.offset), "source": self.source}


def _fmt(v: tuple[float, ...]) -> str:
    return ",".join(f"{x:.6g}" for x in v) if len(set(v)) > 1 else f"{v[0]:.6g}"


def parse_radiometry(value: str | Radiometry | Mapping | None, source: str = "given") -> Radiometry | None:
    """Read a radiometry option: a preset name, ``scale=S,offset=O``, a mapping or a :class:`Radiometry`.

    Raises
    ------
    InputError
        Unknown preset names, malformed or non-finite numbers, a zero scale.
    """
    if value is None or isinstance(value, Radiometry):
        return value
    if isinstance(value, Mapping):
        items = dict(value)
    else:
        text = str(value).strip()
        if text.lower() in PRESETS:
            s, o, _ = PRESETS[text.lower()]
            return Radiometry(text.lower(), (s,), (o,), source)
        if "=" not in text:
            raise InputError(
                f"radiometry {value!r} is unknown; use one of {', '.join(PRESETS)} or scale=S,offset=O "
                "(reflectance = value x S + O)"
            )
        items = {}
        for part in text.split(","):
            k, _, v = part.partition("=")
            items[k.strip().lower()] = v.strip()
    unknown = set(items) - {"scale", "offset"}
    if unknown or "scale" not in items:
        raise InputError(f"radiometry {value!r}: give scale=S[,offset=O] (reflectance = value x S + O)")
    try:
        scale = tuple(float(x) for x in _as_list(items["scale"]))
        offset = tuple(float(x) for x in _as_list(items.get("offset", 0.0)))
    except (TypeError, ValueError):
        raise InputError(f"radiometry {value!r}: scale and offset must be numbers") from None
    if not scale or not offset or not all(math.isfinite(v) for v in scale + offset) or any(s <= 0 for s in scale):
        raise InputError(f"radiometry {value!r}: scale must be a positive finite number and offset finite")
    return Radiometry("custom", scale, offset, source)


def _as_list(v) -> list:
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, str) and ";" in v:
        return v.split(";")
    return [v]


def _baseline_from_name(path: str) -> float | None:
    """The processing baseline in an ESA product name (``..._N0509_...``), if the path has one."""
    m = re.search(r"MSIL2A_\d{8}T\d{6}_N(\d{2})(\d{2})_", path) or re.search(r"_N(\d{2})(\d{2})_R\d{3}_", path)
    return int(m.group(1)) + int(m.group(2)) / 100 if m else None


def _from_tags(tags: Mapping[str, str]) -> tuple[float, float] | None:
    """Scale and offset from Sentinel-2 product metadata tags (GDAL's SENTINEL2 driver and others)."""
    upper = {k.upper(): v for k, v in tags.items()}
    quant = None
    for key in ("BOA_QUANTIFICATION_VALUE", "QUANTIFICATION_VALUE"):
        if key in upper:
            try:
                quant = float(upper[key])
            except ValueError:
                pass
    offsets = []
    for k, v in upper.items():
        if k.startswith(("BOA_ADD_OFFSET", "RADIO_ADD_OFFSET")):
            try:
                offsets.append(float(v))
            except ValueError:
                pass
    baseline = None
    if "PROCESSING_BASELINE" in upper:
        try:
            baseline = float(upper["PROCESSING_BASELINE"])
        except ValueError:
            pass
    if quant is None and not offsets and baseline is None:
        return None
    q = quant if quant and quant > 0 else 10000.0
    if offsets:
        add = offsets[0]
    elif baseline is not None:
        add = -1000.0 if baseline >= 4 else 0.0
    else:
        add = 0.0
    return 1.0 / q, add / q


def resolve_radiometry(source, given: str | Radiometry | Mapping | None = None, max_side: int = 512) -> Radiometry:
    """The radiometric convention of ``source`` (a :class:`~geoseg.io.raster.RasterSource`, or an
    :class:`~geoseg.io.xarray_source.ArraySource`: its ``scale_factor``/``add_offset`` attributes, then its values).

    Parameters
    ----------
    source : RasterSource or ArraySource
        The raster, with the bands the model takes.
    given : str, Radiometry or mapping, optional
        What the caller says (a :data:`PRESETS` name or ``scale=S,offset=O``); wins over
        everything in the file.
    max_side : int
        Decimated read for the value-range guess.

    Returns
    -------
    Radiometry
        Its ``source`` says which evidence decided; ``value range (assumed)`` means none
        did and the caller should log it with the fix.
    """
    r = parse_radiometry(given)
    if r is not None:
        return r
    n = len(source.bands)
    scales, offsets, tags = _file_metadata(source) if isinstance(source, RasterSource) else (source.scales, source.offsets, {})
    if any(s not in (None, 1.0) for s in scales) or any(o not in (None, 0.0) for o in offsets):
        s = tuple(float(v if v is not None else 1.0) for v in scales)
        o = tuple(float(v if v is not None else 0.0) for v in offsets)
        if all(math.isfinite(v) and v != 0 for v in s) and all(math.isfinite(v) for v in o):
            return Radiometry(_preset_of(s, o) or "band metadata", s, o, "band scale/offset")
    tagged = _from_tags(tags)
    if tagged is not None:
        return Radiometry(_preset_of((tagged[0],), (tagged[1],)) or "custom", (tagged[0],), (tagged[1],), "product metadata")
    baseline = _baseline_from_name(source.label)
    if baseline is not None:
        name = "s2-l2a" if baseline >= 4 else "s2-l2a-harmonized"
        s, o, _ = PRESETS[name]
        return Radiometry(name, (s,), (o,), f"product name (processing baseline {baseline:05.2f})")
    data, _ = read_overview(source, max_side)
    arr = data.astype(np.float64).filled(np.nan).reshape(n, -1)
    arr[~np.isfinite(arr)] = np.nan
    arr[:, (arr == 0).all(axis=0)] = np.nan  # zero in every band: fill, whatever the nodata setting says
    if not np.isfinite(arr).any():
        raise InputError(f"{source.label}: no valid pixel to tell the radiometry from; check the nodata value")
    hi = float(np.nanmax([np.nanpercentile(b, 99.5) for b in arr if np.isfinite(b).any()]))
    if np.issubdtype(np.dtype(source.dtype), np.floating) and hi <= 2.0:
        return Radiometry("reflectance", (1.0,), (0.0,), "float data")
    dark = float(np.nanmin([np.nanpercentile(b, 0.5) for b in arr if np.isfinite(b).any()]))
    if hi > _RAW16_ABOVE:
        name = "sentinelhub-raw16"
    elif dark >= _OFFSET_FLOOR:
        name = "s2-l2a"
    else:
        name = "s2-l2a-harmonized"
    s, o, _ = PRESETS[name]
    return Radiometry(name, (s,), (o,), "value range (assumed)")


def _file_metadata(source: RasterSource) -> tuple[list, list, dict[str, str]]:
    """The bands' GDAL scales and offsets, and the dataset's and bands' product tags."""
    with source.env(), source.dataset() as ds:
        scales = [ds.scales[b - 1] for b in source.bands]
        offsets = [ds.offsets[b - 1] for b in source.bands]
        tags = dict(ds.tags())
        for b in source.bands:
            tags.update({k: v for k, v in ds.tags(b).items() if k.upper().startswith(("BOA_", "RADIO_", "QUANT"))})
    return scales, offsets, tags


def _preset_of(scale: tuple[float, ...], offset: tuple[float, ...]) -> str | None:
    if len(set(scale)) > 1 or len(set(offset)) > 1:
        return None
    for name, (s, o, _) in PRESETS.items():
        if math.isclose(scale[0], s, rel_tol=1e-6) and math.isclose(offset[0], o, rel_tol=1e-6, abs_tol=1e-9):
            return name
    return None
