"""The parts of a card document: checks of single values, and one pydantic model per nested mapping
(``classes`` entries, ``scaling``, ``architecture``, ``objects``); :class:`geoseg.models.card.CardDocument`
puts them together.

Each validator raises ``ValueError`` with the message (without the origin), which
:func:`geoseg.models.card.card_from_dict` turns into a one-line :class:`ModelError` naming the card.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from geoseg.classes import CLASS_KINDS, NODATA, ClassInfo, default_palette
from geoseg.errors import ModelError
from geoseg.models.scaling import SCALING_METHODS, Scaling

__all__ = [
    "ArchitectureDocument",
    "ClassDocument",
    "Detector",
    "DetectorDocument",
    "Document",
    "ObjectsDocument",
    "ScalingDocument",
    "as_json",
    "finite_number",
    "float_list",
    "int_at_least",
    "parse_color",
    "reject_unknown",
    "threshold_value",
]

CLASS_KEYS = {"id", "name", "color", "kind"}
SCALING_KEYS = {"method", "value", "mean", "std", "low", "high", "clip", "dark_percentile"}


def finite_number(v: Any) -> float | None:
    """``v`` as a finite float, or None when it is not a finite number (bools, strings, NaN, huge ints)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def float_list(v: Any, key: str) -> tuple[float, ...] | None:
    """A scaling parameter (one number or a list of them) as floats; None stays None."""
    if v is None:
        return None
    seq = v if isinstance(v, (list, tuple)) else [v]
    try:
        if not seq or any(isinstance(x, bool) for x in seq):
            raise ValueError(key)
        return tuple(float(x) for x in seq)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"scaling {key} must be a number or a non-empty list of numbers, got {v!r}") from None


def as_json(v: Any, what: str, origin: str, **kwargs: Any) -> str:
    """``v`` as sorted JSON; :class:`ModelError` when it cannot be written (odd keys, cycles, too deep)."""
    try:
        return json.dumps(v, sort_keys=True, **kwargs)
    except (TypeError, ValueError, RecursionError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__
        raise ModelError(f"{origin}: {what} cannot be stored as JSON ({reason}); use string keys and plain values") from None


def parse_color(v: Any, name: str) -> tuple[int, int, int]:
    """A class colour: ``[r, g, b]`` (or ``[r, g, b, a]``), 0-255, or ``'#rrggbb'``."""
    if isinstance(v, str) and re.fullmatch("#[0-9a-fA-F]{6}", v):
        return (int(v[1:3], 16), int(v[3:5], 16), int(v[5:7], 16))

    def channel(c: Any) -> bool:
        return isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255

    if isinstance(v, (list, tuple)) and len(v) in (3, 4) and all(channel(c) for c in v):
        return (int(v[0]), int(v[1]), int(v[2]))
    raise ValueError(f"class {name!r} colour {v!r} is not [r, g, b] (0-255) or '#rrggbb'")


def reject_unknown(d: Mapping[Any, Any], allowed: set[str], what: str) -> None:
    """Refuse the keys of ``d`` that are not ``allowed`` (all of them, in one message: a typo must not be ignored)."""
    unknown = sorted(set(d) - allowed, key=repr)
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ValueError(f"unknown {what} key(s) {names}; allowed: {', '.join(sorted(allowed))}")


def int_at_least(v: Any, key: str, minimum: int) -> int | None:
    """``v`` when it is an integer (not a bool) of at least ``minimum``; None stays None."""
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {v!r}")
    return v


# ---------------------------------------------------------------- the documents


class Document(BaseModel):
    """A part of a card document: frozen, unknown keys refused (each part's before-validator names them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassDocument(Document):
    """One entry of ``classes``: ``{id, name, color, kind}`` (colour from the default palette when left out)."""

    id: int
    name: str
    color: tuple[int, int, int] | None = None
    kind: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, c: Any) -> Any:
        if not isinstance(c, Mapping) or "id" not in c or "name" not in c:
            raise ValueError(f"each class needs an id and a name, got {c!r}")
        reject_unknown(c, CLASS_KEYS, "class")
        return dict(c)

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, cid: Any) -> int:
        if not isinstance(cid, int) or isinstance(cid, bool) or not 0 <= cid < NODATA:
            raise ValueError(f"class id {cid!r} must be an integer 0-254 (255 is nodata)")
        return cid

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, name: Any) -> str:
        return str(name)

    @field_validator("color", mode="before")
    @classmethod
    def _color(cls, v: Any, info: ValidationInfo) -> tuple[int, int, int]:
        name = info.data.get("name", "?")
        if v is None:
            raise ValueError(f"class {name!r} has an empty colour (in YAML, quote hex colours: color: '#00ff00')")
        return parse_color(v, name)

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, kind: Any, info: ValidationInfo) -> str | None:
        if kind is not None and (not isinstance(kind, str) or kind not in CLASS_KINDS):
            raise ValueError(f"class {info.data.get('name', '?')!r} kind must be 'object' or 'area', got {kind!r}")
        return kind

    def info(self, detector: bool = False) -> ClassInfo:
        """The class, coloured from the default palette when the card gives no colour.

        A detector's classes are all objects (the default kind) and, having no background,
        take their default colours from the palette's second on.
        """
        k = self.id + int(detector)
        kind = self.kind or ("object" if detector else None)
        return ClassInfo(self.id, self.name, self.color or default_palette(k + 1)[k], kind)


class ScalingDocument(Document):
    """The ``scaling`` mapping (see :class:`geoseg.models.scaling.Scaling` for the methods)."""

    method: str
    value: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    clip: bool = True
    dark_percentile: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, sc: Mapping[str, Any]) -> dict[str, Any]:
        if "method" not in sc:
            raise ValueError(f"scaling needs a method ({', '.join(SCALING_METHODS)})")
        reject_unknown(sc, SCALING_KEYS, "scaling")
        return {**sc, "method": str(sc["method"])}

    @field_validator("value", mode="before")
    @classmethod
    def _value(cls, value: Any) -> float | None:
        try:
            if isinstance(value, bool):
                raise TypeError(value)
            return float(value) if value is not None else None
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"scaling value must be a number, got {value!r}") from None

    @field_validator("mean", "std", "low", "high", mode="before")
    @classmethod
    def _per_band(cls, v: Any, info: ValidationInfo) -> tuple[float, ...] | None:
        return float_list(v, info.field_name)

    @field_validator("clip", mode="before")
    @classmethod
    def _clip(cls, clip: Any, info: ValidationInfo) -> bool:
        if not isinstance(clip, bool):
            raise ValueError(f"scaling clip must be true or false, got {clip!r}")
        if info.data.get("method") not in ("minmax", "percentile"):
            raise ValueError("scaling clip applies to minmax and percentile only")
        return clip

    @field_validator("dark_percentile", mode="before")
    @classmethod
    def _dark(cls, dp: Any) -> float | None:
        if dp is not None and finite_number(dp) is None:
            raise ValueError(f"scaling dark_percentile must be a number, got {dp!r}")
        return finite_number(dp) if dp is not None else None

    def scaling(self) -> Scaling:
        """The :class:`Scaling` this document describes (not yet checked against the bands)."""
        return Scaling(**self.model_dump())


class ArchitectureDocument(Document):
    """``architecture``: ``{name: geoseg.unet | smp.<Architecture>, args: {...}}`` for state-dict models."""

    name: str
    args: Any = None

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, arch: Any) -> Any:
        if not isinstance(arch, Mapping) or not isinstance(arch.get("name"), str):
            raise ValueError("architecture must be {name: geoseg.unet | smp.<Architecture>, args: {...}}")
        reject_unknown(arch, {"name", "args"}, "architecture")
        if not isinstance(arch.get("args", {}), Mapping):
            raise ValueError("architecture args must be a mapping of keyword arguments")
        return dict(arch)

    def to_json(self, origin: str) -> str:
        """The architecture as sorted JSON (what :attr:`ModelCard.architecture_json` holds)."""
        return as_json({"name": self.name, "args": dict(self.args or {})}, "architecture", origin)


class ObjectsDocument(Document):
    """``objects``: the object rules of an ``objects`` model (see :class:`ModelCard`)."""

    min_area_m2: float | None = None
    max_length_m: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, objects: Any) -> Any:
        objects = objects or {}
        if not isinstance(objects, Mapping):
            raise ValueError("objects must be a mapping such as {min_area_m2: 1000, max_length_m: 500}")
        reject_unknown(objects, {"min_area_m2", "max_length_m"}, "objects")
        return dict(objects)

    @field_validator("min_area_m2", "max_length_m", mode="before")
    @classmethod
    def _rule(cls, v: Any, info: ValidationInfo) -> float | None:
        f = finite_number(v) if v is not None else None
        if v is not None and (f is None or f < 0):
            raise ValueError(f"objects {info.field_name} must be a number >= 0, got {v!r}")
        return f


#: output layouts of object detectors (see :mod:`geoseg.models.detector`)
DETECTOR_LAYOUTS = ("yolov5", "yolov6", "ultralytics", "ultralytics_obb", "ultralytics_seg")


def threshold_value(v: Any, key: str) -> float | None:
    """A score threshold: a number in ``(0, 1]`` (None stays None)."""
    if v is None:
        return None
    f = finite_number(v)
    if f is None or not 0.0 < f <= 1.0:
        raise ValueError(f"{key} must be a number in (0, 1], got {v!r}")
    return f


@dataclass(frozen=True)
class Detector:
    """How an object detector's output reads: its ``layout``, the score under which boxes are
    dropped (``conf``) and the IoU above which a box suppresses a lower-scored one of its class (``iou``).
    """

    layout: str
    conf: float = 0.25
    iou: float = 0.45


class DetectorDocument(Document):
    """``detector``: ``{layout: yolov5 | yolov6 | ultralytics | ultralytics_obb | ultralytics_seg, conf, iou}``."""

    layout: str
    conf: float = Detector.conf
    iou: float = Detector.iou

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, det: Any) -> Any:
        if not isinstance(det, Mapping) or det.get("layout") not in DETECTOR_LAYOUTS:
            got = det.get("layout") if isinstance(det, Mapping) else det
            raise ValueError(f"detector needs a layout, one of {', '.join(DETECTOR_LAYOUTS)}; got {got!r}")
        reject_unknown(det, {"layout", "conf", "iou"}, "detector")
        return dict(det)

    @field_validator("conf", "iou", mode="before")
    @classmethod
    def _score(cls, v: Any, info: ValidationInfo) -> float:
        return threshold_value(v, f"detector {info.field_name}")

    def detector(self) -> Detector:
        """The :class:`Detector` this document describes."""
        return Detector(self.layout, self.conf, self.iou)
