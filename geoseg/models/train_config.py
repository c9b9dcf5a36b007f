"""The settings of a training run: :class:`TrainConfig` and its augmentation presets (no torch).

They live in the models layer because the loop that reads them (:mod:`geoseg.models.loop`)
does; :mod:`geoseg.train` (data preparation, orchestration) builds on them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from geoseg.errors import InputError

__all__ = ["AUGMENTS", "Augment", "TrainConfig", "parse_scales"]


@dataclass(frozen=True)
class Augment:
    """Radiometric augmentation of a batch (geometric: rotations by 90 degrees and flips, always).

    Each chip draws a brightness gain ``exp(U(-gain, gain))``, per-band gains
    ``exp(U(-band_gain, band_gain))`` (band ratios change), a contrast factor in
    ``1 +- contrast`` around the chip mean, an additive offset ``U(offset_low, offset_high)``
    (plus ``U(-band_offset, band_offset)`` per band: haze, glint, a different atmospheric
    correction) and Gaussian noise of standard deviation up to ``noise``. Values are in
    the units the augmentation sees: scaled model inputs, or reflectance for cards that
    take reflectance.
    """

    gain: float = 0.3
    band_gain: float = 0.15
    contrast: float = 0.25
    offset_low: float = -0.05
    offset_high: float = 0.05
    band_offset: float = 0.0
    noise: float = 0.03


#: augmentation presets: ``default`` for scaled inputs, ``reflectance`` for reflectance (0-1)
AUGMENTS = {
    "default": Augment(),
    "reflectance": Augment(
        gain=0.35, band_gain=0.1, contrast=0.0, offset_low=-0.012, offset_high=0.028, band_offset=0.005, noise=0.003
    ),
}


@dataclass
class TrainConfig:
    """Everything a training run depends on (recorded in the exported card).

    Parameters
    ----------
    images : list of str
        Training rasters.
    labels : list of str
        Labels: one file for all images, or one per image. Vector files (polygons with a
        class attribute), or label rasters (``.png``, ``.tif``, ...) the size of the image
        or on its georeferenced grid, whose pixel values are class ids or mapped by
        ``label_values``.
    out : str
        Exported ONNX model path (``.onnx``); the checkpoint is ``OUT.ckpt``.
    layers : list of str or None
        Labels layer: one for all images, or one per image.
    class_field, label_class
        Which attribute holds the class, or one class for every label (vector labels).
    label_values : dict
        Raster labels: pixel value -> class name, class id or ``ignore``
        (:func:`geoseg.io.labels.parse_label_values`); unlisted values are class ids.
    aois : list of str or None
        Vector files limiting where chips and labels are taken (e.g. the training half): one
        for all images, or one per image (None = the whole image).
    epochs, steps, batch, chip
        Epochs, optimiser steps per epoch, chips per step, chip side in model pixels.
    val_fraction, block, val_chips
        Share of blocks (``block`` px squares) kept for validation, and validation chips.
    lr, weight_decay
        AdamW settings (cosine decay over the run).
    scales : (float, float)
        Ground-sample-distance range as multiples of the images' own (1, 5 = from native to
        five times coarser).
    gray : float
        Probability that a chip's bands are all replaced by their mean (models that should
        also run on panchromatic imagery).
    object_share : float
        Share of chips centred on a labelled object.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (CUDA where there is none is an error).
    seed : int
        Seed of every draw: the same config gives the same chips.
    threads : int, optional
        torch intra-op threads.
    radiometry : list of str or None
        Cards that take reflectance: each image's convention (one for all images or one per
        image; :data:`geoseg.io.radiometry.PRESETS` names or ``scale=S,offset=O``); None
        finds it from the file (metadata, else its value range).
    augment : str, Augment or dict
        Radiometric augmentation: a preset name (``default``, ``reflectance``), values, or a
        preset with some values changed (``{"preset": "reflectance", "offset_high": 0.01}``).
    select : str
        ``best`` exports the epoch with the best validation IoU, ``last`` the last epoch.
    threshold : float, optional
        Binary models: the probability of class 1 from which a pixel is class 1, baked
        into the exported model as a logit bias (see :class:`geoseg.models.export.LogitBias`).
    hard_negatives : float
        Share of training chips centred on mined false positives: at 40 % and 70 % of the
        epochs the model segments the training split of every image and each object it
        finds where the labels have none becomes a chip centre (quays and piers for ships,
        say). 0 turns mining off. A resumed run mines again at its next mining epoch.
    """

    images: list[str]
    labels: list[str]
    out: str
    layers: list[str | None] = field(default_factory=lambda: [None])
    class_field: str = "class"
    label_class: str | None = None
    label_values: dict[int | float, str] = field(default_factory=dict)
    aois: list[str | None] = field(default_factory=lambda: [None])
    band_map: dict[str, int] = field(default_factory=dict)
    epochs: int = 10
    steps: int = 50
    batch: int = 16
    chip: int = 128
    val_fraction: float = 0.2
    block: int = 512
    val_chips: int = 48
    lr: float = 3e-3
    weight_decay: float = 1e-4
    scales: tuple[float, float] = (1.0, 1.0)
    gray: float = 0.0
    object_share: float = 0.6
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    radiometry: list[str | None] = field(default_factory=lambda: [None])
    augment: str | Augment | dict = "default"
    select: str = "best"
    threshold: float | None = None
    hard_negatives: float = 0.0

    def augmentation(self) -> Augment:
        """The :class:`Augment` values this run uses."""
        if isinstance(self.augment, Augment):
            return self.augment
        if isinstance(self.augment, dict):  # a preset's values, some overridden: {"preset": "reflectance", "noise": 0.01}
            values = dict(self.augment)
            return replace(AUGMENTS[values.pop("preset", "default")], **values)
        return AUGMENTS[self.augment]

    def validate(self) -> None:
        """Raise :class:`InputError` for settings that cannot train."""
        if not self.images:
            raise InputError("train: give at least one raster in images=")
        for key in ("labels", "layers", "aois", "radiometry"):
            n = len(getattr(self, key))
            if n not in (1, len(self.images)):
                raise InputError(f"train: give {key}= one entry for all images or one per image (got {n} for {len(self.images)})")
        for key in ("epochs", "steps", "batch", "val_chips"):
            if getattr(self, key) < 1:
                raise InputError(f"train: {key}= must be >= 1")
        if self.chip < 32 or self.chip % 8:
            raise InputError("train: chip= must be a multiple of 8 and >= 32")
        if not 0 <= self.val_fraction < 1:
            raise InputError("train: val_fraction= must be in [0, 1)")
        if not (self.scales[0] >= 1 and self.scales[1] >= self.scales[0]):
            raise InputError("train: scales= must be LOW,HIGH with 1 <= LOW <= HIGH (multiples of the images' pixel size)")
        if not str(self.out).endswith(".onnx"):
            raise InputError(
                f"train: out={self.out} must end in .onnx (geoseg exports ONNX with the card inside; TorchScript is "
                "deprecated in torch)"
            )
        if isinstance(self.augment, str) and self.augment not in AUGMENTS:
            raise InputError(f"train: augment {self.augment!r} is unknown; use {' or '.join(AUGMENTS)}")
        if isinstance(self.augment, dict):
            try:
                self.augmentation()
            except (KeyError, TypeError) as exc:
                raise InputError(f"train: augment {self.augment!r}: {exc}; give a preset and Augment fields") from None
        if self.select not in ("best", "last"):
            raise InputError(f"train: select must be best or last, got {self.select!r}")
        if not 0 <= self.hard_negatives < 1 or self.hard_negatives + self.object_share > 1:
            raise InputError("train: hard_negatives must be in [0, 1) and, with object_share, at most 1")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise InputError(f"train: threshold must be a probability strictly between 0 and 1, got {self.threshold}")
        folder = os.path.dirname(os.path.abspath(self.out))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise InputError(f"train: out={self.out}: the folder {folder} does not exist or is not writable; create it first")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError("train: lr= must be a positive number")
        if not all(math.isfinite(v) for v in self.scales) or self.scales[1] > 16:
            raise InputError("train: scales= must be finite, at most 16")
        d = self.device
        if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise InputError(f"train: device= must be auto, cpu, cuda or cuda:N, got {d!r}")


def parse_scales(value: str | Sequence[float] | None) -> tuple[float, float]:
    """``"1,5"`` -> ``(1.0, 5.0)``."""
    if value is None:
        return (1.0, 1.0)
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"scales={value!r}: give LOW,HIGH such as 1,4") from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2:
        raise InputError(f"scales={value!r}: give LOW,HIGH such as 1,4")
    return (nums[0], nums[1])
