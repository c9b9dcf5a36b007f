"""Per-image preparation for training: rasters, labels, training AOIs, radiometry and scaling, the sampler.

Each training image becomes a :class:`~geoseg.train.chips.ChipImage`: its raster opened with
the card's bands, its labels reprojected once onto its grid (vector) or checked and mapped
(label rasters, :mod:`geoseg.io.labels`), the training AOI in its CRS, and the card's scaling
resolved on it (percentiles per image; reflectance cards: the image's radiometry,
:mod:`geoseg.io.radiometry`, gives reflectance and the card's mean/std come after
augmenting). Everything that reads files before the loop starts happens here.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from geoseg.errors import InputError
from geoseg.io.labels import is_raster_labels, open_raster_labels
from geoseg.io.radiometry import resolve_radiometry
from geoseg.io.raster import RasterSource, band_percentiles, open_source
from geoseg.models.bands import match_bands
from geoseg.models.card import ModelCard
from geoseg.models.scaling import Scaling
from geoseg.models.train_config import TrainConfig
from geoseg.train.chips import ChipImage, ChipSampler, assign_split, load_labels

__all__ = ["build_sampler", "post_scaling", "prepare_images"]


def prepare_images(cfg: TrainConfig, card: ModelCard) -> list[ChipImage]:
    """One :class:`ChipImage` per training raster, with the block split assigned.

    Parameters
    ----------
    cfg : TrainConfig
        Images, labels (with layers, class field or class, label values), AOIs, band map,
        radiometry, block, validation share and seed.
    card : ModelCard
        Classes, bands and scaling.

    Returns
    -------
    list of ChipImage

    Raises
    ------
    InputError, ModelError
        Missing or mismatched bands, unreadable labels or AOIs, no validation block.
    """
    classes = {c.name: c.id for c in card.classes or ()}
    out = []
    for k, path in enumerate(cfg.images):
        src = _open(cfg, card, path)
        labels = _labels(cfg, classes, src, k, path)
        allowed = _allowed(_pick(cfg.aois, k), src)
        scaling, record = _scaling(cfg, card, src, k)
        out.append(ChipImage(src, labels, allowed, cfg.block, scaling, radiometry=record))
    _split(cfg, out)
    return out


def _pick(values: list, k: int) -> Any:
    """Image ``k``'s entry of a per-image setting (one value for all, or one per image)."""
    return values[k if len(values) > 1 else 0]


def _open(cfg: TrainConfig, card: ModelCard, path: str) -> RasterSource:
    """The raster with the card's bands (by name); plain images train in pixel coordinates."""
    everything = open_source(path, require_crs=False)
    bands = match_bands(card.bands, everything.band_descriptions, cfg.band_map, origin=everything.path) if card.bands else None
    src = open_source(path, bands, require_crs=False)
    if card.bands and src.count != len(card.bands):
        raise InputError(f"{path}: the card takes {len(card.bands)} bands but {src.count} were selected; fix band_map=")
    return src


def _labels(cfg: TrainConfig, classes: dict[str, int], src: RasterSource, k: int, path: str) -> Any:
    """Image ``k``'s labels: a label raster checked against its grid, or vector labels on its CRS."""
    label_path = _pick(cfg.labels, k)
    if is_raster_labels(label_path):
        return open_raster_labels(label_path, src.geobox, classes, cfg.label_values, image=path)
    if cfg.label_values:
        raise InputError(f"{label_path}: label_values= applies to label rasters, this is a vector file; drop it")
    return load_labels(
        label_path,
        src.geobox.crs,
        classes,
        layer=_pick(cfg.layers, k),
        class_field=cfg.class_field,
        label_class=cfg.label_class,
    )


def _allowed(aoi: str | None, src: RasterSource) -> np.ndarray | None:
    """The training AOI's polygons in the raster's CRS (pixel coordinates for plain images); None = everywhere."""
    if not aoi:
        return None
    import geopandas as gpd
    import shapely

    if not os.path.exists(aoi):
        raise InputError(f"{aoi}: AOI file not found; check aois=")
    df = gpd.read_file(aoi)
    if src.geobox.crs is None:  # a plain image: the AOI is in its pixel coordinates
        return shapely.make_valid(df.geometry.values)
    if df.crs is None:
        raise InputError(f"{aoi}: the AOI has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:4326)")
    return shapely.make_valid(df.to_crs(src.geobox.crs).geometry.values)


def _scaling(cfg: TrainConfig, card: ModelCard, src: RasterSource, k: int) -> tuple[Scaling, dict | None]:
    """The card's scaling resolved on image ``k``, and its radiometry record (reflectance cards, else None)."""
    if card.scaling.method != "reflectance":
        return card.scaling.resolve(lambda lo, hi, s=src: band_percentiles(s, lo, hi)), None

    rad = resolve_radiometry(src, _pick(cfg.radiometry, k))
    # chips in (dark-object subtracted) reflectance: the card's mean/std come after augmenting
    scaling = Scaling("reflectance", dark_percentile=card.scaling.dark_percentile).resolve(
        lambda lo, hi, s=src: band_percentiles(s, lo, hi), radiometry=rad, n_bands=src.count
    )
    return scaling, rad.record()


def _split(cfg: TrainConfig, images: list[ChipImage]) -> None:
    """Assign the validation blocks shared by all images; an InputError when none is left for validation."""
    keys = assign_split(images, cfg.val_fraction, cfg.seed)
    if cfg.val_fraction > 0 and not len(keys):  # e.g. one plain 512 px image in 512 px blocks
        n = len(np.unique(np.concatenate([im.usable_keys for im in images])))
        raise InputError(
            f"train: val_fraction={cfg.val_fraction} leaves no validation block: the images cover {n} block(s) of "
            f"block={cfg.block} px; give a smaller block= (e.g. {max(32, cfg.block // 4)}) or val_fraction=0"
        )


def build_sampler(cfg: TrainConfig, images: list[ChipImage]) -> ChipSampler:
    """The chip sampler over ``images`` with the run's chip size, scales and object / hard-negative shares."""
    return ChipSampler(images, cfg.chip, cfg.scales, cfg.object_share, cfg.hard_negatives)


def post_scaling(card: ModelCard) -> Scaling | None:
    """Reflectance cards: the card's mean/std, applied to chips after augmenting (they come in reflectance); else None."""
    if card.scaling.method != "reflectance":
        return None
    return Scaling("meanstd", mean=card.scaling.mean or (0.0,), std=card.scaling.std or (1.0,))
