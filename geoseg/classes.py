"""Class facts shared by every layer: the mask's nodata value, a class's id/name/colour/kind,
the default palette, which names mean background and which kind of thing a class is.

Pure (no geoseg imports, no third-party imports), the lowest layer beside :mod:`geoseg.grid`.
"""

from __future__ import annotations

import colorsys
import itertools
import re
from dataclasses import dataclass

__all__ = [
    "BACKGROUND_NAMES",
    "CLASS_KINDS",
    "KINDS",
    "NODATA",
    "ClassInfo",
    "default_palette",
    "is_background",
    "object_kind",
]

#: Value of a class mask (uint8) where nothing was predicted: outside the AOI or the raster's
#: valid pixels, or unusable on either date of a change map. Class ids are 0..254.
NODATA = 255

#: class names that mean "none of the classes" (a model's background): not vectorised unless asked
#: for, not drawn in quicklooks, ``<class>_loss``/``_gain`` in change maps, clear in cloud masks.
#: ``class_0`` is the trainer's background of a model without class names.
BACKGROUND_NAMES = frozenset(
    {"background", "other", "none", "nodata", "no_data", "unlabeled", "unlabelled", "clear", "no_change", "class_0"}
)

#: what a card's class ``kind`` may say: ``object`` (countable things) or ``area`` (land cover)
CLASS_KINDS = ("object", "area")

#: shape attributes per kind of class (what :func:`object_kind` returns)
KINDS = ("area", "building", "ship", "tank", "object")

# whole words of a class name (singular) and the kind they mean; checked in this order:
# an oil tanker is a ship, not a tank
_KIND_WORDS: tuple[tuple[str, frozenset[str]], ...] = (
    ("ship", frozenset({"ship", "boat", "vessel", "tanker"})),
    ("tank", frozenset({"tank"})),
    ("building", frozenset({"building", "roof", "rooftop"})),
    ("object", frozenset({"car", "vehicle", "plane", "airplane", "aircraft", "object", "tree crown"})),
)

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


@dataclass(frozen=True)
class ClassInfo:
    """One output class: id (value in the mask), name, RGB colour and, when a card says it, its kind.

    ``kind`` is ``object`` (countable things), ``area`` (land cover) or None (guessed from the
    name by :func:`object_kind`).
    """

    id: int
    name: str
    color: tuple[int, int, int]
    kind: str | None = None


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours, stable for a given ``n``."""
    out = []
    for i in range(n):
        if i < len(_PALETTE):
            out.append(_PALETTE[i])
        else:  # golden-ratio hues for long class lists
            r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95)
            out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def is_background(name: str) -> bool:
    """Whether a class name means a model's background (see :data:`BACKGROUND_NAMES`; any case)."""
    return name.strip().lower() in BACKGROUND_NAMES


def _words(name: str) -> list[str]:
    """A class name's words, lower case and singular: ``OilTanker``, ``oil_tanker`` and ``oil tankers``
    all give ``["oil", "tanker"]``.
    """
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    words = [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words]


def object_kind(name: str, kind: str | None = None) -> str:
    """Kind of a class: which shape attributes its polygons get.

    ``tank`` (fitted circle), ``ship`` (oriented rectangle), ``building`` (optional
    regularised footprint), ``object`` (other countable things: oriented rectangle), or
    ``area`` (land cover and change: hectares).

    Parameters
    ----------
    name : str
        The class name; its whole words decide (``scar`` is not a ``car``).
    kind : str, optional
        The card's ``kind`` for the class, which wins: ``area`` is always an area; ``object``
        is the name's object kind, or ``object`` when the name says none.

    Returns
    -------
    str
        One of :data:`KINDS`.
    """
    if kind == "area":
        return "area"
    words = _words(name)
    terms = set(words) | {f"{a} {b}" for a, b in itertools.pairwise(words)}
    for found, vocabulary in _KIND_WORDS:
        if terms & vocabulary:
            return found
    return "object" if kind == "object" else "area"
