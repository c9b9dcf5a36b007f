"""Training chips cut on the fly: windowed reads of the raster plus labels rasterised on its grid.

No chip files are written. Each training image is a :class:`~geoseg.io.raster.RasterSource`
(the same description the engine reads), its vector labels are reprojected once onto the
image's CRS, and every chip is a :class:`~geoseg.grid.Window` read with
:func:`~geoseg.io.raster.read_window` (mirrored past the raster edge like engine tiles)
and labels burnt onto exactly that window with :func:`rasterio.features.rasterize`.
Raster labels (:class:`~geoseg.io.labels.RasterLabels`) are read over the same window
instead and sampled at the chip's pixel centres (nearest), so both kinds feed one sampler.
Plain images (no CRS) work in pixel coordinates: their blocks are pixel squares.

Validation is split by area: the CRS is cut into square blocks shared by every image (two
dates of one place get the same split) and a seeded share of them is validation; every
label pixel outside the chip's own split (or outside the training AOI, or on invalid
input) is ``IGNORE``, so no labelled pixel is both trained on and validated (an object
crossing a block edge contributes its pixels on each side to that side's split).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from affine import Affine

from geoseg.errors import InputError
from geoseg.grid import Window
from geoseg.io.labels import IGNORE, RasterLabels
from geoseg.io.raster import RasterSource, read_window

__all__ = ["IGNORE", "ChipImage", "ChipSampler", "assign_split", "load_labels"]


@dataclass(frozen=True)
class Labels:
    """Label polygons of one image in its CRS, with their class ids (0 = background)."""

    path: str
    geoms: np.ndarray  # shapely geometries
    class_ids: np.ndarray  # int per geometry
    counts: Mapping[str, int]  # labels per known class name


def load_labels(
    path: str | os.PathLike,
    crs: str | None,
    classes: Mapping[str, int],
    *,
    layer: str | None = None,
    class_field: str = "class",
    label_class: str | None = None,
) -> Labels:
    """Read vector labels and map them to class ids on a raster's CRS.

    Labels whose class the model does not have are burnt as background (id 0), so a
    buildings model learns that ships are not buildings.

    Parameters
    ----------
    path : str or os.PathLike
        Any vector file pyogrio reads, any CRS.
    crs : str or None
        The image's CRS (labels are reprojected onto it, ``always_xy``).
    classes : mapping
        ``{class name: id}`` of the model (background excluded or included, either way).
    layer, class_field, label_class
        Which layer, which attribute holds the class name (or id), or one class for all.

    Returns
    -------
    Labels

    Raises
    ------
    InputError
        Unreadable file, no CRS, or no label of any of the model's classes.
    """
    import geopandas as gpd
    import shapely

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: labels file not found; give a GeoPackage/GeoJSON with a {class_field!r} attribute")
    try:
        df = gpd.read_file(path, layer=layer)
    except Exception as exc:  # pyogrio's own error types
        raise InputError(f"{path}: cannot read the labels ({exc}); give a vector file GDAL opens") from exc
    if crs is not None:
        if df.crs is None:
            raise InputError(f"{path}: the labels have no CRS; set one (e.g. ogr2ogr -a_srs EPSG:32632)")
        df = df.to_crs(crs)
    if label_class is not None:
        if label_class not in classes:
            raise InputError(f"{path}: label_class={label_class!r} is not a class of the model ({', '.join(classes)})")
        names = [label_class] * len(df)
    elif class_field in df.columns:
        by_id = {v: k for k, v in classes.items()}
        names = [str(v) if str(v) in classes else by_id.get(_as_int(v), str(v)) for v in df[class_field]]
    else:
        raise InputError(f"{path}: no {class_field!r} attribute; name it with class_field= or give label_class=")
    geoms = df.geometry.values
    ids = np.array([classes.get(n, 0) for n in names], dtype=np.int64)
    keep = ~(shapely.is_empty(geoms) | shapely.is_missing(geoms)) & np.isin(shapely.get_type_id(geoms), (3, 6))
    geoms, ids = shapely.make_valid(np.asarray(geoms[keep])), ids[keep]
    names = [n for n, k in zip(names, keep, strict=True) if k]
    counts = {n: int(sum(1 for x in names if x == n)) for n, cid in classes.items() if cid != 0}
    if not any(counts.values()):
        found = ", ".join(sorted(set(names))[:8]) or "none"
        raise InputError(
            f"{path}: no label has a class of the model ({', '.join(n for n, c in classes.items() if c)}); the labels have "
            f"{found}; fix class_field=, layers= or the card's class names"
        )
    return Labels(path, geoms, ids, counts)


def _as_int(v) -> int | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) and f.is_integer() else None


def _keys(bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    """One int64 per world block index pair."""
    return (bx.astype(np.int64) + (1 << 31)) * (1 << 32) + (by.astype(np.int64) + (1 << 31))


@dataclass
class ChipImage:
    """One training image: what to read, its labels, where training may look, its split.

    The split lives on a grid of ``block`` x ``block`` pixel squares anchored at the CRS's
    origin (not the image's corner), so images of the same place (two dates, overlapping
    scenes) share it: a square is validation in every image or in none
    (:func:`assign_split`).
    """

    source: RasterSource
    labels: Labels | RasterLabels
    allowed: np.ndarray | None = None  # shapely polygons (raster CRS) training is limited to
    block: int = 512
    scaling: Any = None  # the model card's scaling, resolved for this image (set by the trainer)
    radiometry: dict | None = None  # reflectance cards: the image's radiometry record (set by the trainer)
    hard: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # mined false positives (rows, cols)

    def __post_init__(self) -> None:
        import shapely

        gb = self.source.geobox
        self.block_size = self.block * math.sqrt(abs(gb.transform.a * gb.transform.e - gb.transform.b * gb.transform.d))
        self._allowed_union = shapely.union_all(self.allowed) if self.allowed is not None else None
        # world blocks over the image that training may use (overlapping the AOI with some area)
        minx, miny, maxx, maxy = _bounds(gb.transform, gb.width, gb.height)
        bxs = np.arange(math.floor(minx / self.block_size), math.floor(maxx / self.block_size) + 1)
        bys = np.arange(math.floor(miny / self.block_size), math.floor(maxy / self.block_size) + 1)
        gx, gy = np.meshgrid(bxs, bys)
        boxes = shapely.box(gx * self.block_size, gy * self.block_size, (gx + 1) * self.block_size, (gy + 1) * self.block_size)
        area = shapely.box(minx, miny, maxx, maxy) if self._allowed_union is None else self._allowed_union
        usable = shapely.area(shapely.intersection(boxes, area)) > 0
        self.usable_keys = np.unique(_keys(gx[usable], gy[usable]))
        # object centres (pixel coordinates) and their blocks
        self._rc = np.zeros((0, 2))
        self._tree = None
        if isinstance(self.labels, RasterLabels):
            rc = self.labels.centres
            if self._allowed_union is not None and len(rc):
                x, y = gb.transform @ (rc[:, 1], rc[:, 0])
                rc = rc[shapely.contains_xy(self._allowed_union, x, y)]
            self._rc = rc
        elif (self.labels.class_ids > 0).any():
            fg = self.labels.class_ids > 0
            pts = shapely.point_on_surface(self.labels.geoms[fg])
            if self._allowed_union is not None:
                pts = pts[shapely.contains(self._allowed_union, pts)]
            xy = shapely.get_coordinates(pts)
            cols, rows = ~gb.transform @ (xy[:, 0], xy[:, 1])
            rc = np.column_stack([rows, cols])
            self._rc = rc[(rows >= 0) & (rows < gb.height) & (cols >= 0) & (cols < gb.width)]
        self.object_keys = np.unique(self.keys(self._rc[:, 0], self._rc[:, 1]))
        self.val_keys = np.zeros(0, np.int64)
        self.centres: dict[str, np.ndarray] = {"train": self._rc, "val": self._rc[:0]}
        if isinstance(self.labels, Labels):
            self._tree = shapely.STRtree(self.labels.geoms)

    def keys(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """World block keys of pixel positions (fractional rows/cols on this image's grid)."""
        x, y = self.source.geobox.transform @ (np.asarray(cols, float), np.asarray(rows, float))
        return _keys(np.floor(np.asarray(x) / self.block_size), np.floor(np.asarray(y) / self.block_size))

    def set_split(self, val_keys: np.ndarray) -> None:
        """Use ``val_keys`` (world blocks) as validation; sort object centres by split."""
        self.val_keys = np.asarray(val_keys, np.int64)
        val = np.isin(self.keys(self._rc[:, 0], self._rc[:, 1]), self.val_keys)
        self.centres = {"train": self._rc[~val], "val": self._rc[val]}

    def split_mask(self, rows: np.ndarray, cols: np.ndarray, split: str) -> np.ndarray:
        """True where pixel centres (fractional rows/cols, raster grid) are in ``split``'s blocks."""
        gb = self.source.geobox
        inside = (rows >= 0) & (rows < gb.height) & (cols >= 0) & (cols < gb.width)
        k = self.keys(rows, cols)
        is_val = np.isin(k, self.val_keys)
        want = is_val if split == "val" else (~is_val & np.isin(k, self.usable_keys))
        return want & inside

    def area(self, split: str) -> float:
        """Blocks in ``split`` (for weighting images)."""
        is_val = np.isin(self.usable_keys, self.val_keys)
        return float(is_val.sum() if split == "val" else (~is_val).sum())

    def read(self, window: Window, out: int, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw bands over ``window`` and labels on an ``out x out`` grid covering it.

        Returns
        -------
        x : numpy.ndarray
            ``(bands, window.height, window.width)`` raw values (0 where invalid).
        y : numpy.ndarray
            ``(out, out)`` uint8 class ids, :data:`IGNORE` outside the split, outside the
            training AOI, outside the raster, or on invalid input.
        valid : numpy.ndarray
            ``(window.height, window.width)`` bool, the input's validity.
        """
        import warnings

        from rasterio.errors import NotGeoreferencedWarning
        from rasterio.features import geometry_mask, rasterize

        gb = self.source.geobox
        x, valid, _ = read_window(self.source, window)
        f = window.height / out
        transform = gb.transform @ Affine.translation(window.col_off, window.row_off) @ Affine.scale(f)
        centres = (np.arange(out) + 0.5) * f
        rows, cols = window.row_off + centres[:, None], window.col_off + centres[None, :]
        rows, cols = np.broadcast_to(rows, (out, out)), np.broadcast_to(cols, (out, out))
        keep = self.split_mask(rows, cols, split)
        fine_r = np.clip((centres).astype(int), 0, window.height - 1)
        keep &= valid[fine_r[:, None], fine_r[None, :]]
        import shapely

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            if self._allowed_union is not None:
                keep &= geometry_mask([self._allowed_union], out_shape=(out, out), transform=transform, invert=True)
            if isinstance(self.labels, RasterLabels):  # the label window, sampled at the chip's pixel centres
                y = self.labels.read(window)[fine_r[:, None], fine_r[None, :]]
                y[~keep] = IGNORE
                return x, y, valid
            box = shapely.box(*_bounds(transform, out))
            hits = self._tree.query(box)
            y = np.zeros((out, out), np.uint8)
            if len(hits):
                geoms, ids = self.labels.geoms[hits], self.labels.class_ids[hits]
                order = np.argsort(-shapely.area(geoms))  # small labels on top
                shapes = [(g, int(c)) for g, c in zip(geoms[order], ids[order], strict=True)]
                y = rasterize(shapes, out_shape=(out, out), transform=transform, fill=0, dtype="uint8")
        y[~keep] = IGNORE
        return x, y, valid


def assign_split(images: Sequence[ChipImage], val_fraction: float, seed: int) -> np.ndarray:
    """Pick validation blocks shared by all images: the same share of blocks with labelled
    objects and of blocks without, so both splits see objects. Returns the keys chosen.
    """
    usable = np.unique(np.concatenate([im.usable_keys for im in images])) if images else np.zeros(0, np.int64)
    with_objects = np.unique(np.concatenate([im.object_keys for im in images]))
    with_objects = with_objects[np.isin(with_objects, usable)]
    rng = np.random.default_rng([seed, 7919])
    chosen = []
    if val_fraction > 0:
        for group in (with_objects, usable[~np.isin(usable, with_objects)]):
            n = round(val_fraction * len(group))
            if len(group) > 1:
                n = min(max(n, 1), len(group) - 1)
            chosen.append(rng.permutation(group)[:n])
    keys = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    for im in images:
        im.set_split(keys)
    return keys


def _bounds(transform, n: int, m: int | None = None) -> tuple[float, float, float, float]:
    """Bounds of an ``n`` wide, ``m`` (default ``n``) high pixel grid."""
    m = n if m is None else m
    xs, ys = zip(*(transform @ (c, r) for c in (0, n) for r in (0, m)), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


class ChipSampler:
    """Draw chip windows from training images: object-centred or uniform, at several scales.

    Parameters
    ----------
    images : sequence of ChipImage
    chip : int
        Chip side in model pixels.
    scales : (float, float)
        Range of read-window/chip size ratios (1 = native resolution; 2 = the chip sees
        twice the ground distance per pixel, i.e. a coarser GSD). Drawn log-uniformly.
    object_share : float
        Share of chips centred on a labelled object (the rest are uniform over the split).
    hard_share : float
        Share of training chips centred on mined false positives (``ChipImage.hard``: where
        the model being trained saw objects that are not there), once some are mined.
    """

    def __init__(
        self,
        images: Sequence[ChipImage],
        chip: int,
        scales: tuple[float, float] = (1.0, 1.0),
        object_share: float = 0.6,
        hard_share: float = 0.0,
    ) -> None:
        if not images:
            raise InputError("training needs at least one image")
        self.images = list(images)
        self.chip = chip
        self.scales = scales
        self.object_share = object_share
        self.hard_share = hard_share

    def windows(self, rng: np.random.Generator, n: int, split: str) -> list[tuple[int, Window, int]]:
        """``n`` chip draws: (image index, read window, output size)."""
        weights = np.array([im.area(split) for im in self.images])
        if weights.sum() <= 0:
            raise InputError(f"no {split} area: lower block= (the validation block size) or give larger images")
        weights = weights / weights.sum()
        out = []
        lo, hi = np.log(self.scales[0]), np.log(self.scales[1])
        for _ in range(n):
            k = int(rng.choice(len(self.images), p=weights))
            im = self.images[k]
            gb = im.source.geobox
            f = float(np.exp(rng.uniform(lo, hi)))
            side = max(self.chip, round(self.chip * f))
            centres = im.centres[split]
            hard = im.hard if split == "train" else im.hard[:0]
            if len(centres) and rng.random() < self.object_share:
                r, c = centres[rng.integers(len(centres))]
                r += rng.uniform(-0.35, 0.35) * side
                c += rng.uniform(-0.35, 0.35) * side
            elif len(hard) and rng.random() < self.hard_share / max(1e-9, 1.0 - self.object_share):
                r, c = hard[rng.integers(len(hard))]
                r += rng.uniform(-0.35, 0.35) * side
                c += rng.uniform(-0.35, 0.35) * side
            else:
                for _ in range(50):  # a point inside this split's blocks
                    r, c = rng.uniform(0, gb.height), rng.uniform(0, gb.width)
                    if im.split_mask(np.array([r]), np.array([c]), split)[0]:
                        break
            out.append((k, Window(int(r - side / 2), int(c - side / 2), side, side), self.chip))
        return out

    def read(self, draw: tuple[int, Window, int], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Read one draw: raw bands, labels on the chip grid, input validity, image index."""
        k, window, out = draw
        x, y, valid = self.images[k].read(window, out, split)
        return x, y, valid, k
