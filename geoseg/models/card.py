"""Model cards: what a model means (classes, bands, scaling, pixel size, tiles), and their checks.

:class:`ModelCard` is what the rest of geoseg reads. A card document (JSON/YAML, or metadata
embedded in the model: see :mod:`geoseg.models.card_sources`) is checked by a pydantic model,
:class:`CardDocument`, one validator per key; every refusal is a one-line :class:`ModelError`
that names the card's origin and the key. :func:`card_to_dict` writes a card back as a document.
Just over 400 lines: one validator per card key, each a few lines, and the card's field docs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError, ValidationInfo, field_validator, model_validator

from geoseg.classes import NODATA, ClassInfo
from geoseg.errors import ModelError
from geoseg.models.card_parts import (
    ArchitectureDocument,
    ClassDocument,
    Detector,
    DetectorDocument,
    Document,
    ObjectsDocument,
    ScalingDocument,
    as_json,
    finite_number,
    int_at_least,
    reject_unknown,
    threshold_value,
)
from geoseg.models.scaling import Scaling

__all__ = ["CARD_KEYS", "CardDocument", "ModelCard", "card_from_dict", "card_to_dict"]

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
    "mmu_px",
    "detector",
    "threshold",
}
TASKS = ("area", "objects")
#: minimum mapping unit (pixels) of an area model whose card gives none: a 2 x 2 patch; single pixels are speckle
DEFAULT_MMU_PX = 4
ACTIVATIONS = ("auto", "softmax", "sigmoid", "none")
INFO_KEYS = ("description", "license", "metrics", "training")


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
        How raw values become model inputs (see :class:`geoseg.models.scaling.Scaling`).
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
    mmu_px : int, optional
        Minimum mapping unit of the area classes, in pixels: smaller patches are speckle, not
        features (vectorize drops them; summaries never count them). None: :data:`DEFAULT_MMU_PX`
        for ``task: area`` models, none for objects models (their object rules apply); 0: none.
    info_json : str
        Description, licence, metrics and training recipe (JSON), carried for the record.
    detector : Detector, optional
        An object detector's output layout and score/IoU thresholds: the model gives boxes,
        not per-pixel classes (see :mod:`geoseg.models.detector`).
    threshold : float, optional
        A binary model's cut: class 1 where its probability is at least this (default: the larger class).
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
    mmu_px: int | None = None
    detector: Detector | None = None
    threshold: float | None = None

    @property
    def mmu(self) -> int:
        """The minimum mapping unit in pixels that applies: the card's, else the default of its task."""
        if self.mmu_px is not None:
            return self.mmu_px
        return DEFAULT_MMU_PX if self.task == "area" else 0

    def with_classes(self, n_outputs: int) -> ModelCard:
        """The card with default classes for a model with ``n_outputs`` channels."""
        if self.classes is not None:
            return self
        n = 2 if n_outputs == 1 and self.detector is None else n_outputs  # a detector's classes are all objects
        if n > NODATA:  # ids 0..254; 255 is the mask's nodata
            raise ModelError(f"{self.name}: {n} output classes do not fit a uint8 mask (at most 255)")
        detector = self.detector is not None
        return replace(self, classes=tuple(ClassDocument(id=i, name=f"class_{i}").info(detector) for i in range(n)))


class CardDocument(Document):
    """A card document as written (JSON/YAML or model metadata), checked key by key.

    Validate with ``CardDocument.model_validate(d, context={"origin": path})`` (the origin
    names the file in scaling errors); :func:`card_from_dict` does it and turns the first
    refusal into a one-line :class:`ModelError`.
    """

    name: Any = None
    version: Any = None
    task: str = "area"
    classes: tuple[ClassDocument, ...] | None = None
    bands: tuple[str, ...] | None = None
    scaling: ScalingDocument = ScalingDocument(method="none")
    activation: str = "auto"
    gsd_m: float | None = None
    gsd_range_m: tuple[float, float] | None = None
    architecture: ArchitectureDocument | None = None
    tta: int = 1
    objects: ObjectsDocument = ObjectsDocument()
    mmu_px: int | None = None
    detector: DetectorDocument | None = None
    threshold: float | None = None
    tile: int | None = None
    halo: int | None = None
    size_multiple: int | None = None
    description: Any = None
    license: Any = None
    metrics: Any = None
    training: Any = None

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, d: Any) -> Any:
        if not isinstance(d, Mapping):
            raise ValueError(f"a model card must be a mapping of keys, got {type(d).__name__}")
        reject_unknown(d, CARD_KEYS, "card")
        return dict(d)

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, task: Any) -> str:
        if not isinstance(task, str) or task not in TASKS:
            raise ValueError(f"task must be 'area' or 'objects', got {task!r}")
        return task

    @field_validator("classes", mode="before")
    @classmethod
    def _class_list(cls, raw: Any) -> Any:
        if raw is not None and (not isinstance(raw, list) or not raw):
            raise ValueError("classes must be a non-empty list of {id, name, color}")
        return raw

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, classes: tuple[ClassDocument, ...] | None) -> tuple[ClassDocument, ...] | None:
        if classes is None:
            return None
        ids, names = set(), set()
        for c in classes:
            if c.id in ids:
                raise ValueError(f"class id {c.id} appears twice; class ids must be unique")
            if c.name in names:
                raise ValueError(f"class name {c.name!r} appears twice; class names must be unique")
            ids.add(c.id)
            names.add(c.name)
        return tuple(sorted(classes, key=lambda c: c.id))

    @field_validator("bands", mode="before")
    @classmethod
    def _bands(cls, bands: Any) -> tuple[str, ...] | None:
        if bands is None:
            return None
        if not isinstance(bands, list) or not bands or not all(isinstance(b, str) and b.strip() for b in bands):
            raise ValueError("bands must be a list of band names such as [blue, green, red, nir]")
        if len({b.lower() for b in bands}) != len(bands):
            raise ValueError(f"a band is listed twice in {bands}")
        return tuple(b.strip().lower() for b in bands)

    @field_validator("scaling", mode="before")
    @classmethod
    def _scaling(cls, sc: Any) -> Any:
        sc = sc or {"method": "none"}
        if not isinstance(sc, Mapping):
            raise ValueError("scaling must be a mapping such as {method: divide, value: 10000}")
        return sc

    @field_validator("activation", mode="before")
    @classmethod
    def _activation(cls, activation: Any) -> str:
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        return activation

    @field_validator("tile", "halo", "size_multiple", mode="before")
    @classmethod
    def _sizes(cls, v: Any, info: ValidationInfo) -> int | None:
        return int_at_least(v, info.field_name, {"tile": 8, "halo": 0, "size_multiple": 1}[info.field_name])

    @field_validator("gsd_m", mode="before")
    @classmethod
    def _gsd(cls, gsd: Any) -> float | None:
        f = finite_number(gsd)
        if gsd is not None and (f is None or f <= 0):
            raise ValueError(f"gsd_m must be a positive number of metres per pixel, got {gsd!r}")
        return f

    @field_validator("gsd_range_m", mode="before")
    @classmethod
    def _gsd_range(cls, gsd_range: Any) -> tuple[float, float] | None:
        if gsd_range is None:
            return None
        pair = [finite_number(v) for v in gsd_range] if isinstance(gsd_range, (list, tuple)) else []
        if len(pair) != 2 or None in pair or not 0 < pair[0] <= pair[1]:
            raise ValueError(f"gsd_range_m must be [low, high] metres per pixel with 0 < low <= high, got {gsd_range!r}")
        return (pair[0], pair[1])

    @field_validator("mmu_px", mode="before")
    @classmethod
    def _mmu(cls, mmu: Any) -> int | None:
        if mmu is None:
            return None
        if isinstance(mmu, bool) or not isinstance(mmu, int) or mmu < 0:
            raise ValueError(f"mmu_px must be a whole number of pixels >= 0 (0: no minimum mapping unit), got {mmu!r}")
        return mmu

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, threshold: Any) -> float | None:
        return threshold_value(threshold, "threshold")

    @field_validator("tta", mode="before")
    @classmethod
    def _tta(cls, tta: Any) -> int:
        if isinstance(tta, bool) or tta not in (1, 2, 4, 8):
            raise ValueError(f"tta must be 1, 2, 4 or 8 (dihedral views per tile), got {tta!r}")
        return int(tta)

    @model_validator(mode="after")
    def _scaling_fits_bands(self, info: ValidationInfo) -> CardDocument:
        origin = (info.context or {}).get("origin", "card")
        self.scaling.scaling().validate(len(self.bands) if self.bands else None, origin)
        return self

    def card(self, origin: str, default_name: str) -> ModelCard:
        """The :class:`ModelCard` this document describes (``default_name`` when it names none)."""
        info = {k: getattr(self, k) for k in INFO_KEYS if getattr(self, k) is not None}
        gsd_range = self.gsd_range_m
        return ModelCard(
            name=str(self.name or default_name),
            classes=tuple(c.info(self.detector is not None) for c in self.classes) if self.classes else None,
            tile=self.tile,
            halo=self.halo,
            size_multiple=self.size_multiple or 32,
            activation=self.activation,
            version=str(self.version) if self.version is not None else None,
            task="objects" if self.detector else self.task,
            bands=self.bands,
            scaling=self.scaling.scaling(),
            gsd_m=self.gsd_m if self.gsd_m is not None else gsd_range[0] if gsd_range else None,
            gsd_range_m=gsd_range,
            architecture_json=self.architecture.to_json(origin) if self.architecture else "",
            info_json=as_json(info, "description, license, metrics or training", origin, default=str),
            tta=self.tta,
            min_area_m2=self.objects.min_area_m2,
            max_length_m=self.objects.max_length_m,
            mmu_px=self.mmu_px,
            detector=self.detector.detector() if self.detector else None,
            threshold=self.threshold,
        )


def card_from_dict(d: Mapping[str, Any], origin: str, default_name: str = "model") -> ModelCard:
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
        Unknown keys, duplicate class ids, bad colours, band or scaling mismatches: the first
        refusal, one line naming ``origin`` and the key.
    """
    try:
        doc = CardDocument.model_validate(d, context={"origin": origin})
    except ValidationError as exc:
        raise _refusal(exc, origin) from None
    return doc.card(origin, default_name)


def _refusal(exc: ValidationError, origin: str) -> ModelError:
    """The first error of a card's validation as a :class:`ModelError` naming ``origin``."""
    err = exc.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ModelError):  # Scaling.validate names the origin itself
        return cause
    if cause is not None:
        return ModelError(f"{origin}: {cause}")
    key = ".".join(str(x) for x in err["loc"]) or "(top level)"
    return ModelError(f"{origin}: {key}: {err['msg']}")


def card_to_dict(card: ModelCard) -> dict[str, Any]:
    """The card as a plain dictionary (what :func:`card_from_dict` reads)."""
    out: dict[str, Any] = {"name": card.name, "task": card.task}
    if card.version:
        out["version"] = card.version
    if card.classes:
        out["classes"] = [
            {"id": c.id, "name": c.name, "color": list(c.color), **({"kind": c.kind} if c.kind else {})} for c in card.classes
        ]
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
    if card.mmu_px is not None:
        out["mmu_px"] = card.mmu_px
    if card.detector is not None:
        out["detector"] = {"layout": card.detector.layout, "conf": card.detector.conf, "iou": card.detector.iou}
    if card.threshold is not None:
        out["threshold"] = card.threshold
    out.update(json.loads(card.info_json or "{}"))
    return out
