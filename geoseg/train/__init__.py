"""Training: chips and labels per image, the run that trains a card's network, the bundled models' recipes.

:func:`train` and :class:`TrainConfig` are imported lazily, so ``geoseg.train.chips`` and the
recipes' command line do not import torch (the loop itself is :mod:`geoseg.models.loop`)::

    from geoseg.train import TrainConfig, train
    train(TrainConfig(images=["a.tif"], labels=["a.gpkg"], out="m.onnx"), card)

Modules: :mod:`~geoseg.train.chips` (training windows, rasterised labels, the block split),
:mod:`~geoseg.train.data` (per-image preparation), :mod:`~geoseg.train.run` (``train``),
:mod:`~geoseg.train.folds` (leave-one-place-out scoring) and :mod:`~geoseg.train.recipes`
(how every bundled model is made, ``python -m geoseg.recipes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from geoseg.models.train_config import TrainConfig
    from geoseg.train.run import train

__all__ = ["TrainConfig", "train"]

_LAZY = {"train": "geoseg.train.run", "TrainConfig": "geoseg.models.train_config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geoseg.train' has no attribute {name!r}")
