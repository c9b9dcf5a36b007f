"""Model cards: read, validate and apply what a model expects (bands, scaling, classes).

A card is a JSON/YAML file beside the model (``model.card.json``, ``model.card.yaml``), or
embedded in it: a TorchScript ``_extra_files`` entry ``geoseg_card.json``, or an ONNX
``metadata_props`` entry ``geoseg_card``. ONNX models made for the Deepness QGIS plugin or
GeoDeep carry their own metadata keys (``class_names``, ``resolution`` in cm/px,
``tiles_size``, ``tiles_overlap`` in percent, ``standardization_mean/std``); those are
read too, so such models run unchanged.

No torch here: TorchScript archives are zip files, read with :mod:`zipfile`.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from geoseg._yaml import flat as _flat
from geoseg._yaml import load_yaml
from geoseg.classes import NODATA
from geoseg.errors import ModelError

__all__ = [
    "BAND_ALIASES",
    "CARD_KEYS",
    "ClassInfo",
    "ModelCard",
    "Scaling",
    "card_from_dict",
    "card_to_dict",
    "default_palette",
    "find_card",
    "load_text",
    "match_bands",
    "onnx_metadata",
    "parse_band_option",
]

#: every key a card may have (anything else is an error: a typo must not be ignored)
CARD_KEYS = {
    "name",
    "version",
    "task",
    "description",
    "license",
    "classes",
    "bands",
    "scaling",
    "gsd_m",
    "gsd_range_m",
    "architecture",
    "tile",
    "halo",
    "size_multiple",
    "activation",
    "metrics",
    "training",
    "tta",
    "objects",
}
CLASS_KEYS = {"id", "name", "color", "kind"}
SCALING_KEYS = {"method", "value", "mean", "std", "low", "high", "clip", "dark_percentile"}
SCALING_METHODS = ("none", "divide", "meanstd", "minmax", "percentile", "reflectance")
TASKS = ("area", "objects")
ACTIVATIONS = ("auto", "softmax", "sigmoid", "none")

#: band names and the descriptions that mean them (Sentinel-2 B02..B12, Landsat 8/9 Collection 2 SR_B2..SR_B7,
#: plain words). Bare Landsat numbers (B5 = nir on Landsat 8, red edge on Sentinel-2) are ambiguous: map them with
#: --bands instead.
BAND_ALIASES: dict[str, tuple[str, ...]] = {
    "coastal": ("coastal", "aerosol", "b01"),
    "blue": ("blue", "b", "b02", "sr_b2"),
    "green": ("green", "g", "b03", "sr_b3"),
    "red": ("red", "r", "b04", "sr_b4"),
    "rededge1": ("rededge1", "re1", "b05"),
    "rededge2": ("rededge2", "re2", "b06"),
    "rededge3": ("rededge3", "re3", "b07"),
    "nir": ("nir", "near infrared", "near-infrared", "b08", "b8a", "sr_b5"),
    "swir1": ("swir1", "swir 1", "swir16", "sr_b6"),
    "swir2": ("swir2", "swir 2", "swir22", "sr_b7"),
    "pan": ("pan", "panchromatic"),
}


@dataclass(frozen=True)
class Scaling:
    """How raw band values become model inputs.

    ``none``; ``divide`` by ``value``; ``meanstd`` ``(x - mean) / std`` per band;
    ``minmax`` ``(x - low) / (high - low)`` per band, clipped to [0, 1] unless ``clip`` is
    false (bright targets above ``high`` keep their contrast); ``percentile``:
    like ``minmax`` with ``low``/``high`` as percentiles of the whole raster, turned into
    values once before any tile runs (per-tile statistics would put seams into the result);
    ``reflectance``: surface reflectance (0-1), optionally ``(reflectance - mean) / std``,
    whatever convention the raster stores it in (:mod:`geoseg.io.radiometry` finds it per
    raster; resolved into ``meanstd`` on raw values before any tile runs); with
    ``dark_percentile`` each band's darkest reflectance over the whole raster (that
    percentile: water, shadow) is subtracted first (dark-object subtraction: haze and sun
    glint that lift a whole scene are taken out, and the storage offset cancels).
    """

    method: str = "none"
    value: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    clip: bool = True
    dark_percentile: float | None = None

    def validate(self, n_bands: int | None, origin: str) -> None:
        """Raise :class:`ModelError` (naming ``origin``) if the parameters do not fit the method."""
        m = self.method
        if m not in SCALING_METHODS:
            raise ModelError(f"{origin}: scaling method {m!r} is unknown; use one of {', '.join(SCALING_METHODS)}")
        need = {"divide": ("value",), "meanstd": ("mean", "std"), "minmax": ("low", "high"), "percentile": ("low", "high")}
        for key in need.get(m, ()):
            if getattr(self, key) is None:
                raise ModelError(f"{origin}: scaling {m!r} needs {key!r}")
        if m == "divide" and not self.value:
            raise ModelError(f"{origin}: scaling 'divide' needs a non-zero value")
        values = [self.value] if self.value is not None else []
        for key in ("mean", "std", "low", "high"):
            values += list(getattr(self, key) or ())
        if not all(np.isfinite(values)):
            raise ModelError(f"{origin}: scaling values must be finite numbers")
        # inputs reach the model as float32: a factor past its range makes every pixel inf or 0
        big = float(np.finfo(np.float32).max)
        tiny = float(np.finfo(np.float32).tiny)
        if any(abs(v) > big for v in values):
            raise ModelError(f"{origin}: scaling values must lie within float32's range (|v| <= {big:.3g}); fix the card")
        divisors = [self.value] if m == "divide" else list(self.std or ()) if m in ("meanstd", "reflectance") else []
        if m == "minmax" and self.low and self.high and (len(self.low) == len(self.high) or 1 in (len(self.low), len(self.high))):
            lo_, hi_ = np.broadcast_arrays(np.asarray(self.low, np.float64), np.asarray(self.high, np.float64))
            divisors += [float(d) for d in hi_ - lo_]
        if any(d is not None and 0 < abs(d) < tiny for d in divisors):
            raise ModelError(
                f"{origin}: scaling divides by {min(abs(d) for d in divisors if d):.3g}, which overflows float32 "
                f"(divisors must be at least {tiny:.3g}); fix the card's scaling"
            )
        used = {
            "none": (),
            "divide": ("value",),
            "meanstd": ("mean", "std"),
            "minmax": ("low", "high"),
            "percentile": ("low", "high"),
            "reflectance": ("mean", "std"),
        }
        used["reflectance"] = ("mean", "std", "dark_percentile")
        keys = ("value", "mean", "std", "low", "high", "dark_percentile")
        extra = [k for k in keys if getattr(self, k) is not None and k not in used[m]]
        if extra:
            raise ModelError(f"{origin}: scaling {m!r} does not use {', '.join(extra)}; give the method that does")
        if m in ("minmax", "percentile"):
            if len(self.low) != len(self.high) and 1 not in (len(self.low), len(self.high)):
                raise ModelError(f"{origin}: scaling low and high need the same number of values")
            lo, hi = np.broadcast_arrays(np.asarray(self.low), np.asarray(self.high))
            if not np.all(hi > lo):
                raise ModelError(f"{origin}: scaling needs high > low for every band")
        for key in ("mean", "std", "low", "high"):
            v = getattr(self, key)
            if v is not None and n_bands is not None and len(v) not in (1, n_bands):
                raise ModelError(f"{origin}: scaling {key} has {len(v)} values for {n_bands} bands; give one or one per band")
        dp = self.dark_percentile
        if dp is not None and not (isinstance(dp, (int, float)) and 0 <= dp <= 50):
            raise ModelError(f"{origin}: scaling dark_percentile must be a percentile from 0 to 50, got {dp!r}")
        if m == "reflectance" and (self.mean is None) != (self.std is None):
            raise ModelError(f"{origin}: scaling 'reflectance' takes both mean and std (of reflectance), or neither")
        if m in ("meanstd", "reflectance") and any(s <= 0 for s in self.std or ()):
            raise ModelError(f"{origin}: scaling std must be positive")
        if m == "percentile" and not (min(self.low or (0,)) >= 0 and max(self.high or (100,)) <= 100):
            raise ModelError(f"{origin}: percentile scaling needs 0 <= low < high <= 100")

    def resolve(self, percentiles: Any = None, radiometry: Any = None, n_bands: int = 1) -> Scaling:
        """The scaling one raster's tiles get: no method left that needs the whole raster.

        ``percentile`` becomes ``minmax`` with values from ``percentiles(low, high)`` (two
        per-band arrays computed on the whole raster). ``reflectance`` becomes ``meanstd`` on
        the raw values: with the raster's ``radiometry`` (``reflectance = value * scale +
        offset``, a :class:`geoseg.io.radiometry.Radiometry`) and the card's ``mean``/``std``,
        ``(value * scale + offset - mean) / std = (value - (mean - offset) / scale) / (std / scale)``.
        """
        if self.method == "reflectance":
            if radiometry is None:
                raise ModelError("reflectance scaling needs the raster's radiometry resolved first; this is a geoseg bug")
            scale, offset = radiometry.per_band(n_bands)
            mean = np.broadcast_to(np.asarray(self.mean or (0.0,), np.float64), (n_bands,))
            std = np.broadcast_to(np.asarray(self.std or (1.0,), np.float64), (n_bands,))
            if self.dark_percentile is not None:  # (value - dark) x scale: the storage offset cancels
                if percentiles is None:
                    raise ModelError("dark-object subtraction needs the raster's percentiles; this is a geoseg bug")
                dark, _ = percentiles((self.dark_percentile,), (self.dark_percentile,))
                raw_mean = np.asarray(dark, np.float64) + mean / scale
            else:
                raw_mean = (mean - offset) / scale
            return Scaling(
                "meanstd",
                mean=tuple(float(v) for v in raw_mean),
                std=tuple(float(v) for v in std / np.abs(scale)),
            )
        if self.method != "percentile":
            return self
        lo, hi = percentiles(self.low, self.high)
        hi = np.where(np.asarray(hi) > np.asarray(lo), hi, np.asarray(lo) + 1.0)
        return Scaling("minmax", low=tuple(float(v) for v in lo), high=tuple(float(v) for v in hi), clip=self.clip)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Scale a float32 ``(bands, h, w)`` or ``(n, bands, h, w)`` array (bands on axis -3)."""
        m = self.method
        if m == "none":
            return x

        # float64 inputs (or parameters beyond float32's range, e.g. resolved percentiles of float64
        # data) are scaled in float64; values that do not fit float32 afterwards come back as +-inf
        # (never silently wrapped) for the caller to count and mask
        params = [self.value or 0.0, *(self.mean or ()), *(self.std or ()), *(self.low or ()), *(self.high or ())]
        wide = x.dtype == np.float64 or any(abs(v) > 1e30 or 0 < abs(v) < 1e-30 for v in params)
        dt = np.float64 if wide else np.float32

        def per_band(v: tuple[float, ...]) -> np.ndarray:
            return np.asarray(v, dt).reshape(-1, 1, 1)

        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            x = x.astype(dt, copy=False)
            if m == "divide":
                y = x / dt(self.value)
            elif m == "meanstd":
                y = (x - per_band(self.mean)) / per_band(self.std)
            elif m == "minmax":
                lo, hi = per_band(self.low), per_band(self.high)
                y = (x - lo) / (hi - lo)
                y = np.clip(y, 0.0, 1.0) if self.clip else y
            else:
                raise ModelError(f"{m} scaling must be resolved for the raster before tiles run; this is a geoseg bug")
            return y.astype(np.float32, copy=False)


_PALETTE = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
]


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours, stable for a given ``n``."""
    out = []
    for i in range(n):
        if i < len(_PALETTE):
            out.append(_PALETTE[i])
        else:  # golden-ratio hues for long class lists
            import colorsys

            r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95)
            out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


@dataclass(frozen=True)
class ClassInfo:
    """One output class: id (value in the mask), name and RGB colour."""

    id: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class ModelCard:
    """What a model means. Fields left ``None`` are filled from the model itself.

    Parameters
    ----------
    name : str
        Model name.
    classes : tuple of ClassInfo, optional
        Output classes; default ``class_0 .. class_{n-1}`` from the output channel count.
    tile : int, optional
        Preferred model input size in pixels.
    halo : int, optional
        Preferred halo in pixels.
    size_multiple : int
        Input sizes must be a multiple of this (e.g. 32 for a 5-level U-Net).
    activation : str
        ``softmax`` (multi-class logits), ``sigmoid`` (one binary logit channel), or
        ``none`` (the model already outputs probabilities).
    version : str, optional
        Model version.
    task : str
        ``area`` (land cover, change) or ``objects`` (countable things).
    bands : tuple of str, optional
        Input band names in model order (``blue``, ``green``, ``red``, ``nir``, ``swir1``, ...),
        matched to raster bands by description or a ``--bands name=N`` mapping.
    scaling : Scaling
        How raw values become model inputs (see :class:`geoseg.models.card.Scaling`).
    gsd_m : float, optional
        Ground sample distance the model was trained at, in metres.
    gsd_range_m : (float, float), optional
        Pixel sizes the model was trained across (scale augmentation); rasters inside it
        are not resampled.
    architecture_json : str
        ``{"name": ..., "args": {...}}`` for state-dict models (see :mod:`geoseg.models.nets`).
    tta : int
        Test-time augmentation the model is run with by default: 1 (none), 2, 4 or 8
        dihedral views of every tile (flips and rotations), logits averaged.
    min_area_m2, max_length_m : float, optional
        Object rules for ``task: objects`` models: polygons smaller than ``min_area_m2`` or
        longer than ``max_length_m`` are not objects of the model's kind (a ship model's
        breakwaters, a speck); vectorize and evaluate apply them by default.
    info_json : str
        Description, licence, metrics and training recipe (JSON), carried for the record.
    """

    name: str
    classes: tuple[ClassInfo, ...] | None = None
    tile: int | None = None
    halo: int | None = None
    size_multiple: int = 32
    activation: str = "auto"
    version: str | None = None
    task: str = "area"
    bands: tuple[str, ...] | None = None
    scaling: Scaling = field(default_factory=Scaling)
    gsd_m: float | None = None
    gsd_range_m: tuple[float, float] | None = None
    architecture_json: str = ""
    info_json: str = "{}"
    tta: int = 1
    min_area_m2: float | None = None
    max_length_m: float | None = None

    def with_classes(self, n_outputs: int) -> ModelCard:
        """The card with default classes for a model with ``n_outputs`` channels."""
        if self.classes is not None:
            return self
        n = 2 if n_outputs == 1 else n_outputs
        if n > NODATA:  # ids 0..254; 255 is the mask's nodata
            raise ModelError(f"{self.name}: {n} output classes do not fit a uint8 mask (at most 255)")
        colors = default_palette(n)
        return replace(self, classes=tuple(ClassInfo(i, f"class_{i}", colors[i]) for i in range(n)))


def _floats(v: Any, key: str, origin: str) -> tuple[float, ...] | None:
    if v is None:
        return None
    seq = v if isinstance(v, (list, tuple)) else [v]
    try:
        if not seq or any(isinstance(x, bool) for x in seq):
            raise ValueError(key)
        return tuple(float(x) for x in seq)
    except (TypeError, ValueError, OverflowError):
        raise ModelError(f"{origin}: scaling {key} must be a number or a non-empty list of numbers, got {v!r}") from None


def _number(v: Any) -> float | None:
    """``v`` as a finite float, or None when it is not a finite number (bools, strings, NaN, huge ints)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _json(v: Any, what: str, origin: str, **kwargs: Any) -> str:
    """``v`` as sorted JSON; :class:`ModelError` when it cannot be written (odd keys, cycles, too deep)."""
    try:
        return json.dumps(v, sort_keys=True, **kwargs)
    except (TypeError, ValueError, RecursionError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__
        raise ModelError(f"{origin}: {what} cannot be stored as JSON ({reason}); use string keys and plain values") from None


def _color(v: Any, origin: str, name: str) -> tuple[int, int, int]:
    import re

    if isinstance(v, str) and re.fullmatch("#[0-9a-fA-F]{6}", v):
        return (int(v[1:3], 16), int(v[3:5], 16), int(v[5:7], 16))

    def channel(c: Any) -> bool:
        return isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255

    if isinstance(v, (list, tuple)) and len(v) in (3, 4) and all(channel(c) for c in v):
        return (int(v[0]), int(v[1]), int(v[2]))
    raise ModelError(f"{origin}: class {name!r} colour {v!r} is not [r, g, b] (0-255) or '#rrggbb'")


def _reject_unknown(d: Mapping[str, Any], allowed: set[str], what: str, origin: str) -> None:
    unknown = sorted(set(d) - allowed, key=repr)
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ModelError(f"{origin}: unknown {what} key(s) {names}; allowed: {', '.join(sorted(allowed))}")


def card_from_dict(d: Mapping[str, Any], origin: str, default_name: str = "model"):
    """Validate a card dictionary and build a :class:`ModelCard`.

    Parameters
    ----------
    d : mapping
        The card (from JSON/YAML or metadata).
    origin : str
        Where it came from, for error messages (a file path).
    default_name : str
        Name when the card has none.

    Returns
    -------
    ModelCard

    Raises
    ------
    ModelError
        Unknown keys, duplicate class ids, bad colours, band or scaling mismatches.
    """
    if not isinstance(d, Mapping):
        raise ModelError(f"{origin}: a model card must be a mapping of keys, got {type(d).__name__}")
    _reject_unknown(d, CARD_KEYS, "card", origin)
    task = d.get("task", "area")
    if task not in TASKS:
        raise ModelError(f"{origin}: task must be 'area' or 'objects', got {task!r}")
    classes = None
    if d.get("classes") is not None:
        raw = d["classes"]
        if not isinstance(raw, list) or not raw:
            raise ModelError(f"{origin}: classes must be a non-empty list of {{id, name, color}}")
        palette = default_palette(256)
        out, seen, names = [], set(), set()
        for c in raw:
            if not isinstance(c, Mapping) or "id" not in c or "name" not in c:
                raise ModelError(f"{origin}: each class needs an id and a name, got {c!r}")
            _reject_unknown(c, CLASS_KEYS, "class", origin)
            cid = c["id"]
            if not isinstance(cid, int) or isinstance(cid, bool) or not 0 <= cid < NODATA:
                raise ModelError(f"{origin}: class id {cid!r} must be an integer 0-254 (255 is nodata)")
            if cid in seen:
                raise ModelError(f"{origin}: class id {cid} appears twice; class ids must be unique")
            if str(c["name"]) in names:
                raise ModelError(f"{origin}: class name {c['name']!r} appears twice; class names must be unique")
            seen.add(cid)
            names.add(str(c["name"]))
            if "color" in c and c["color"] is None:
                raise ModelError(
                    f"{origin}: class {c['name']!r} has an empty colour (in YAML, quote hex colours: color: '#00ff00')"
                )
            color = _color(c["color"], origin, str(c["name"])) if "color" in c else palette[cid]
            out.append(ClassInfo(cid, str(c["name"]), color))
        classes = tuple(sorted(out, key=lambda c: c.id))
    bands = d.get("bands")
    if bands is not None:
        if not isinstance(bands, list) or not bands or not all(isinstance(b, str) and b.strip() for b in bands):
            raise ModelError(f"{origin}: bands must be a list of band names such as [blue, green, red, nir]")
        if len({b.lower() for b in bands}) != len(bands):
            raise ModelError(f"{origin}: a band is listed twice in {bands}")
        bands = tuple(b.strip().lower() for b in bands)
    sc = d.get("scaling") or {"method": "none"}
    if not isinstance(sc, Mapping):
        raise ModelError(f"{origin}: scaling must be a mapping such as {{method: divide, value: 10000}}")
    if "method" not in sc:
        raise ModelError(f"{origin}: scaling needs a method ({', '.join(SCALING_METHODS)})")
    _reject_unknown(sc, SCALING_KEYS, "scaling", origin)
    value = sc.get("value")
    try:
        if isinstance(value, bool):
            raise TypeError(value)
        value = float(value) if value is not None else None
    except (TypeError, ValueError, OverflowError):
        raise ModelError(f"{origin}: scaling value must be a number, got {value!r}") from None
    clip = sc.get("clip", True)
    if not isinstance(clip, bool):
        raise ModelError(f"{origin}: scaling clip must be true or false, got {clip!r}")
    if "clip" in sc and sc.get("method") not in ("minmax", "percentile"):
        raise ModelError(f"{origin}: scaling clip applies to minmax and percentile only")
    scaling = Scaling(
        clip=clip,
        method=str(sc.get("method", "none")),
        value=value,
        mean=_floats(sc.get("mean"), "mean", origin),
        std=_floats(sc.get("std"), "std", origin),
        low=_floats(sc.get("low"), "low", origin),
        high=_floats(sc.get("high"), "high", origin),
        dark_percentile=_number(sc["dark_percentile"]) if sc.get("dark_percentile") is not None else None,
    )
    if sc.get("dark_percentile") is not None and scaling.dark_percentile is None:
        raise ModelError(f"{origin}: scaling dark_percentile must be a number, got {sc['dark_percentile']!r}")
    scaling.validate(len(bands) if bands else None, origin)
    activation = d.get("activation", "auto")
    if activation not in ACTIVATIONS:
        raise ModelError(f"{origin}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")

    def pos_int(key: str, minimum: int = 1) -> int | None:
        v = d.get(key)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ModelError(f"{origin}: {key} must be an integer >= {minimum}, got {v!r}")
        return v

    gsd = d.get("gsd_m")
    if gsd is not None:
        gsd_f = _number(gsd)
        if gsd_f is None or gsd_f <= 0:
            raise ModelError(f"{origin}: gsd_m must be a positive number of metres per pixel, got {gsd!r}")
        gsd = gsd_f
    gsd_range = d.get("gsd_range_m")
    if gsd_range is not None:
        pair = [_number(v) for v in gsd_range] if isinstance(gsd_range, (list, tuple)) else []
        if len(pair) != 2 or None in pair or not 0 < pair[0] <= pair[1]:
            raise ModelError(
                f"{origin}: gsd_range_m must be [low, high] metres per pixel with 0 < low <= high, got {gsd_range!r}"
            )
        gsd_range = (pair[0], pair[1])
        if gsd is None:
            gsd = gsd_range[0]
    arch = d.get("architecture")
    if arch is not None:
        if not isinstance(arch, Mapping) or not isinstance(arch.get("name"), str):
            raise ModelError(f"{origin}: architecture must be {{name: geoseg.unet | smp.<Architecture>, args: {{...}}}}")
        _reject_unknown(arch, {"name", "args"}, "architecture", origin)
        if not isinstance(arch.get("args", {}), Mapping):
            raise ModelError(f"{origin}: architecture args must be a mapping of keyword arguments")
        arch = _json({"name": arch["name"], "args": dict(arch.get("args") or {})}, "architecture", origin)
    tta = d.get("tta", 1)
    if tta not in (1, 2, 4, 8) or isinstance(tta, bool):
        raise ModelError(f"{origin}: tta must be 1, 2, 4 or 8 (dihedral views per tile), got {tta!r}")
    objects = d.get("objects") or {}
    if not isinstance(objects, Mapping):
        raise ModelError(f"{origin}: objects must be a mapping such as {{min_area_m2: 1000, max_length_m: 500}}")
    _reject_unknown(objects, {"min_area_m2", "max_length_m"}, "objects", origin)
    rules: dict[str, float | None] = {}
    for key in ("min_area_m2", "max_length_m"):
        v = objects.get(key)
        f = _number(v) if v is not None else None
        if v is not None and (f is None or f < 0):
            raise ModelError(f"{origin}: objects {key} must be a number >= 0, got {v!r}")
        rules[key] = f
    info = {k: d[k] for k in ("description", "license", "metrics", "training") if d.get(k) is not None}
    info_json = _json(info, "description, license, metrics or training", origin, default=str)
    return ModelCard(
        name=str(d.get("name") or default_name),
        classes=classes,
        tile=pos_int("tile", 8),
        halo=pos_int("halo", 0),
        size_multiple=pos_int("size_multiple") or 32,
        activation=activation,
        version=str(d["version"]) if d.get("version") is not None else None,
        task=task,
        bands=bands,
        scaling=scaling,
        gsd_m=float(gsd) if gsd is not None else None,
        gsd_range_m=gsd_range,
        architecture_json=arch or "",
        info_json=info_json,
        tta=int(tta),
        min_area_m2=rules["min_area_m2"],
        max_length_m=rules["max_length_m"],
    )


def card_to_dict(card) -> dict[str, Any]:
    """The card as a plain dictionary (what :func:`card_from_dict` reads)."""
    out: dict[str, Any] = {"name": card.name, "task": card.task}
    if card.version:
        out["version"] = card.version
    if card.classes:
        out["classes"] = [{"id": c.id, "name": c.name, "color": list(c.color)} for c in card.classes]
    if card.bands:
        out["bands"] = list(card.bands)
    if card.scaling.method != "none":
        sc = {"method": card.scaling.method}
        for k in ("value", "mean", "std", "low", "high"):
            v = getattr(card.scaling, k)
            if v is not None:
                sc[k] = list(v) if isinstance(v, tuple) else v
        if not card.scaling.clip:
            sc["clip"] = False
        if card.scaling.dark_percentile is not None:
            sc["dark_percentile"] = card.scaling.dark_percentile
        out["scaling"] = sc
    for k in ("gsd_m", "tile", "halo"):
        if getattr(card, k) is not None:
            out[k] = getattr(card, k)
    if card.gsd_range_m is not None:
        out["gsd_range_m"] = list(card.gsd_range_m)
    if card.architecture_json:
        out["architecture"] = json.loads(card.architecture_json)
    out["size_multiple"] = card.size_multiple
    out["activation"] = card.activation
    if card.tta != 1:
        out["tta"] = card.tta
    rules = {k: getattr(card, k) for k in ("min_area_m2", "max_length_m") if getattr(card, k) is not None}
    if rules:
        out["objects"] = rules
    out.update(json.loads(card.info_json or "{}"))
    return out


def load_text(text: str, origin: str) -> Any:
    """Parse a card's text: YAML when ``origin`` ends in ``.yaml``/``.yml``, JSON otherwise.

    Parameters
    ----------
    text : str
        The card file's contents.
    origin : str
        Where it came from (its path), for the file type and for messages.

    Returns
    -------
    Any
        The parsed document (validated later by :func:`card_from_dict`).

    Raises
    ------
    ModelError
        The text is not valid YAML/JSON.
    """
    if origin.endswith((".yaml", ".yml")):
        return load_yaml(text, origin, ModelError, "fix the card's syntax")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ModelError(f"{origin}: not valid JSON ({_flat(str(exc))}); fix the card's syntax") from exc
    except RecursionError:
        raise ModelError(f"{origin}: not valid JSON (nested too deeply); flatten the card") from None


def _read_text(path: str, origin: str) -> str:
    """A card file's text (UTF-8, a regular file of at most 1 MiB); :class:`ModelError` naming ``origin`` otherwise."""
    from geoseg._yaml import read_text_file

    return read_text_file(path, origin, ModelError, "card")


def _decode(raw: bytes, origin: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{origin}: the card is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def _sidecars(path: str) -> list[str]:
    stem = os.path.splitext(path)[0]
    return [stem + ext for ext in (".card.json", ".card.yaml", ".card.yml")]


def _deepness(meta: Mapping[str, str], origin: str) -> dict[str, Any] | None:
    """A card from Deepness/GeoDeep ONNX metadata (class_names, resolution, tiles_size, ...)."""
    keys = {"class_names", "resolution", "tiles_size", "tiles_overlap", "standardization_mean", "model_type"}
    if not keys & set(meta):
        return None

    def val(key: str) -> Any:
        raw = meta[key]
        try:
            return json.loads(raw)
        except ValueError:
            try:
                import ast

                return ast.literal_eval(raw)  # Deepness examples store Python dict reprs
            except (ValueError, SyntaxError):
                return raw

    card: dict[str, Any] = {}
    if "class_names" in meta:
        names = val("class_names")
        if isinstance(names, Mapping):
            card["classes"] = [{"id": int(k), "name": str(v)} for k, v in sorted(names.items(), key=lambda kv: int(kv[0]))]
        elif isinstance(names, list):
            card["classes"] = [{"id": i, "name": str(v)} for i, v in enumerate(names)]
    if "resolution" in meta:
        card["gsd_m"] = float(val("resolution")) / 100.0  # centimetres per pixel
    tile = int(val("tiles_size")) if "tiles_size" in meta else None
    if tile:
        card["tile"] = tile
        if "tiles_overlap" in meta:
            card["halo"] = round(tile * float(val("tiles_overlap")) / 100.0 / 2.0)
    # both tools feed 8-bit RGB divided by 255, then optional standardisation
    if "standardization_mean" in meta and "standardization_std" in meta:
        mean = [float(v) * 255.0 for v in val("standardization_mean")]
        std = [float(v) * 255.0 for v in val("standardization_std")]
        card["scaling"] = {"method": "meanstd", "mean": mean, "std": std}
    else:
        card["scaling"] = {"method": "divide", "value": 255.0}
    return card


def onnx_metadata(path: str) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` (where geoseg keeps the card), read without running it.

    Raises
    ------
    ModelError
        The file is not a readable ONNX model (truncated, corrupt, not ONNX).
    """
    try:
        import onnx
    except ImportError:
        onnx = None
    try:
        if onnx is not None:
            model = onnx.load(path, load_external_data=False)
            return {p.key: p.value for p in model.metadata_props}
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return dict(sess.get_modelmeta().custom_metadata_map)
    except ImportError:
        return {}
    except Exception as exc:  # onnx's DecodeError, onnxruntime's Fail/InvalidProtobuf
        reason = _flat((str(exc).splitlines() or [""])[0])[:200] or type(exc).__name__
        raise ModelError(f"{path}: not a readable ONNX model ({reason}); the file may be truncated: export it again") from None


def find_card(path: str, kind: str):
    """The card of a model file: a sidecar file, else embedded metadata, else None.

    Parameters
    ----------
    path : str
        The model file.
    kind : str
        ``torchscript``, ``exported`` or ``onnx``.

    Returns
    -------
    ModelCard or None
    """
    name = os.path.splitext(os.path.basename(path))[0]
    for side in _sidecars(path):
        if os.path.exists(side):
            return card_from_dict(load_text(_read_text(side, side), side), side, name)
    if kind in ("torchscript", "exported"):
        try:
            with zipfile.ZipFile(path) as z:
                hit = [n for n in z.namelist() if n.endswith("extra/geoseg_card.json")]
                if hit:
                    origin = f"{path} (embedded card)"
                    if z.getinfo(hit[0]).file_size > 1 << 20:
                        raise ModelError(f"{origin}: the card is larger than 1 MiB; a card is a few kilobytes of text")
                    return card_from_dict(load_text(_decode(z.read(hit[0]), origin), path), origin, name)
        except zipfile.BadZipFile as exc:
            raise ModelError(f"{path}: not a valid TorchScript archive ({exc}); re-export the model") from exc
    elif kind == "onnx":
        meta = onnx_metadata(path)
        if "geoseg_card" in meta:
            return card_from_dict(load_text(meta["geoseg_card"], path), f"{path} (geoseg_card metadata)", name)
        try:
            d = _deepness(meta, path)
        except (TypeError, ValueError, AttributeError, ArithmeticError, RecursionError, MemoryError) as exc:
            reason = _flat((str(exc).splitlines() or [""])[0]) or type(exc).__name__
            raise ModelError(f"{path}: unreadable Deepness/GeoDeep metadata ({reason}); fix the model's metadata_props") from None
        if d is not None:
            return card_from_dict(d, f"{path} (Deepness/GeoDeep metadata)", name)
    return None


def parse_band_option(value: str | None) -> tuple[tuple[int, ...] | None, dict[str, int]]:
    """Parse ``--bands``: ``3,2,1`` (indices in model order) or ``nir=4,red=3`` (names).

    Returns
    -------
    indices : tuple of int or None
    mapping : dict of str to int
    """
    if not value:
        return None, {}
    import re

    items = [v.strip() for v in value.split(",") if v.strip()]
    number = re.compile(r"[0-9]+")
    if all("=" in v for v in items):
        mapping: dict[str, int] = {}
        for v in items:
            k, _, b = (x.strip() for x in v.partition("="))
            if not k or not number.fullmatch(b) or int(b) < 1:
                raise ModelError(f"--bands {value!r}: {v!r} must be NAME=BAND with a 1-based band number, e.g. nir=4")
            if k.lower() in mapping:
                raise ModelError(f"--bands {value!r}: {k!r} is given twice")
            mapping[k.lower()] = int(b)
        return None, mapping
    if any("=" in v for v in items):
        raise ModelError(f"--bands {value!r}: give 1-based band numbers (3,2,1) or NAME=BAND pairs (nir=4,red=3), not a mix")
    if all(number.fullmatch(v) and int(v) >= 1 for v in items):
        return tuple(int(v) for v in items), {}
    raise ModelError(f"--bands {value!r}: band numbers start at 1, e.g. 3,2,1")


def match_bands(
    wanted: Sequence[str],
    descriptions: Sequence[str | None],
    mapping: Mapping[str, int] | None = None,
    origin: str = "raster",
) -> tuple[int, ...]:
    """Find the raster band (1-based) for each band name a model wants.

    Order of evidence: the user's ``name=band`` mapping, then band descriptions (with
    :data:`BAND_ALIASES`, e.g. ``B08`` is ``nir``), then, when the raster has exactly as
    many bands as the model wants and none is described, file order.

    Raises
    ------
    ModelError
        A wanted band cannot be found; the message lists the raster's bands and the fix.
    """
    mapping = {k.lower(): v for k, v in (mapping or {}).items()}
    unknown = sorted(set(mapping) - set(wanted))
    if unknown:
        raise ModelError(
            f"{origin}: --bands names {', '.join(unknown)} are not bands of the model (it takes {', '.join(wanted)})"
        )
    count = len(descriptions)
    for k, b in mapping.items():
        if b > count:
            raise ModelError(f"{origin}: --bands {k}={b} but the raster has {count} band(s)")
    desc = [(d or "").strip().lower() for d in descriptions]
    out = []
    for name in wanted:
        if name in mapping:
            out.append(mapping[name])
            continue
        aliases = BAND_ALIASES.get(name, (name,))
        hits = [i + 1 for i, d in enumerate(desc) if d and (d == name or d in aliases)]
        if hits:
            out.append(hits[0])
            continue
        if not any(desc) and count == len(wanted) and not mapping:
            _announce_order(wanted, origin)
            return tuple(range(1, count + 1))
        shown = ", ".join(f"{i + 1}={d or '?'}" for i, d in enumerate(desc))
        if count == 1 and set(wanted) <= {"red", "green", "blue"} and not mapping:
            pan = ",".join(f"{b}=1" for b in wanted)
            raise ModelError(
                f"{origin}: one band (panchromatic?) but the model takes {', '.join(wanted)}; run it in pan mode with "
                f"--bands {pan} (band_map={{{', '.join(repr(b) + ': 1' for b in wanted)}}})"
            )
        raise ModelError(
            f"{origin}: the model needs band {name!r} (bands {', '.join(wanted)}) but no raster band is described as it "
            f"(bands: {shown}); map it with --bands {name}=N"
        )
    return tuple(out)


#: rasters whose assumed band order was announced already (once per raster and order in a process)
_ANNOUNCED: set[tuple[str, tuple[str, ...]]] = set()


def _announce_order(wanted: Sequence[str], origin: str) -> None:
    """Say once, as one logging warning, that undescribed bands are taken in the model's order, and how to set them."""
    import logging

    if (origin, tuple(wanted)) in _ANNOUNCED:
        return
    _ANNOUNCED.add((origin, tuple(wanted)))
    order = ", ".join(f"{i}={name}" for i, name in enumerate(wanted, start=1))
    mapping = ", ".join(f"{name!r}: N" for name in wanted)
    logging.getLogger(__name__).warning(
        "%s: no band descriptions; assuming the model's band order %s; if that is wrong, give bands=(...) "
        "(band numbers in the model's order) or band_map={%s}",
        origin,
        order,
        mapping,
    )
