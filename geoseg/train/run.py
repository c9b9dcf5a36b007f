"""``geoseg train``: train (or fine-tune) a card's network on rasters and labels; export ONNX with the card.

Labels are vector polygons (any CRS) or label rasters of class values on the image's grid
(:mod:`geoseg.io.labels`); plain images without a CRS train in pixel coordinates. The run
reads top to bottom: check the inputs -> start the network (device, seed, a checkpoint to
resume) -> prepare the images (:mod:`geoseg.train.data`) -> build the chip sampler
(:mod:`geoseg.train.chips`: windowed reads, labels rasterised on each image's grid, a
block-wise train/validation split) -> the loop (:mod:`geoseg.models.loop`: augmentation,
optimiser, checkpoints, mined hard negatives) -> export the selected epoch as ONNX with the
card, the training recipe and the validation metrics embedded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from geoseg.errors import ModelError
from geoseg.models import loop
from geoseg.models.card import ModelCard, card_to_dict
from geoseg.models.train_config import TrainConfig
from geoseg.train.chips import ChipImage
from geoseg.train.data import build_sampler, post_scaling, prepare_images

__all__ = ["train"]


def train(
    config: TrainConfig,
    card: ModelCard,
    *,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the card's architecture and export the best epoch as ONNX with its card.

    Parameters
    ----------
    config : TrainConfig
        Data, schedule, augmentation, device.
    card : ModelCard
        Classes (ids ``0..K-1``, 0 = background), bands, scaling, tile/halo and
        ``architecture`` (default ``geoseg.unet`` width 16, depth 3).
    resume : bool
        Continue from ``OUT.ckpt`` (same config and card required).
    progress : callable, optional
        Called after each epoch with that epoch's record.

    Returns
    -------
    dict
        ``model`` (path), ``checkpoint``, ``history`` (per epoch: loss, validation IoU,
        seconds), ``best_epoch``, ``metrics``.

    Raises
    ------
    InputError, ModelError
        Bad settings or data; a checkpoint from another configuration.
    """
    arch = _check(config, card)
    recipe = _recipe(config, arch)
    fingerprint = json.dumps({"recipe": recipe, "card": card_to_dict(card)}, sort_keys=True, default=str)
    session = loop.start(config, arch, len(card.bands), len(card.classes), card.name, fingerprint, resume=resume)
    images = prepare_images(config, card)
    sampler = build_sampler(config, images)
    post = post_scaling(card)  # reflectance cards: chips come in reflectance, the card's mean/std follow the augmentation
    loop.fit(session, config, sampler, images, post, progress)
    loop.export_best(session, _export_card(config, card, recipe, session, images), config.out, config.threshold)
    best = session.best
    return {
        "model": config.out,
        "checkpoint": session.checkpoint,
        "history": session.history,
        "best_epoch": best["epoch"],
        "metrics": best["metrics"],
    }


def _check(config: TrainConfig, card: ModelCard) -> dict[str, Any]:
    """Refuse settings and cards that cannot train; return the architecture to build."""
    config.validate()
    ids = sorted(c.id for c in card.classes or ())
    if not card.classes or ids != list(range(len(ids))) or len(ids) < 2:
        raise ModelError(f"{card.name}: training needs classes with ids 0..K-1 (0 = background) and at least two")
    if not card.bands:
        raise ModelError(f"{card.name}: training needs the card's bands (e.g. bands: [blue, green, red, nir])")
    if card.architecture_json:
        return json.loads(card.architecture_json)
    return {"name": "geoseg.unet", "args": {"width": 16, "depth": 3}}  # the network when the card names none


def _recipe(config: TrainConfig, arch: dict[str, Any]) -> dict[str, Any]:
    """The training recipe the card records (and a checkpoint's fingerprint holds): settings, file names, network."""
    recipe = {k: v for k, v in asdict(config).items() if k not in ("out", "device", "threads")}
    recipe["images"] = [os.path.basename(p) for p in config.images]
    recipe["labels"] = [os.path.basename(p) for p in config.labels]
    recipe["aois"] = [os.path.basename(p) if p else None for p in config.aois]
    if not recipe["label_values"]:  # vector labels: the recipe (and a checkpoint's fingerprint) as before
        del recipe["label_values"]
    else:
        recipe["label_values"] = {str(k): v for k, v in config.label_values.items()}
    recipe["architecture"] = arch
    return recipe


def _export_card(
    config: TrainConfig, card: ModelCard, recipe: dict[str, Any], session: loop.Session, images: Sequence[ChipImage]
) -> dict[str, Any]:
    """The card the exported model carries: the card, its training recipe and validation metrics."""
    d = card_to_dict(card)
    d.pop("architecture", None)  # ONNX carries its graph: the card describes, it does not build
    d["training"] = {
        **recipe,
        "best_epoch": session.best["epoch"],
        **session.runtime(),
        "images_radiometry": [im.radiometry for im in images] if card.scaling.method == "reflectance" else None,
    }
    d["metrics"] = {
        "validation": {"split": "blocks" if config.val_fraction > 0 else "training area", **session.best["metrics"]},
        **(d.get("metrics") or {}),
    }
    return d
