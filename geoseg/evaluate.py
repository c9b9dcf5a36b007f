"""Score a class mask against labels: pixel IoU/precision/recall/F1 (= Dice) and object F1.

Labels (any vector format and CRS) are reprojected to the mask's CRS and rasterised on its
grid; pixels that are nodata in the mask are left out. Object scores match predicted
objects (connected components, as ``geoseg vectorize`` draws them) one-to-one with label
polygons at IoU >= 0.5, best pairs first, inside the mask's valid area: labels are clipped
to it, and labels mostly outside it (with the predictions lying on them) are not scored.

A label raster (class values the size of the mask, or on its georeferenced grid;
:mod:`geoseg.io.labels`) is scored pixel by pixel on every class, background included, where
both are valid; it has no object scores.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import shapely

from geoseg.classes import NODATA, object_kind
from geoseg.errors import InputError
from geoseg.io.labels import IGNORE, is_raster_labels, open_raster_labels
from geoseg.io.mask import open_mask, read_mask_window
from geoseg.vector.geometry import metric_crs, oriented_box, pixel_to_world, to_metric
from geoseg.vector.polygonize import polygonize_block

__all__ = ["evaluate", "evaluate_raster", "format_table", "match_objects"]


def match_objects(pred: Sequence, truth: Sequence, threshold: float = 0.5) -> tuple[int, int, int]:
    """One-to-one matches between predicted and true polygons at IoU >= ``threshold``, best pairs first.

    ``threshold`` 0 matches any pair that overlaps with some area (the rule for small
    objects such as ships at 10 m, whose outlines are a few pixels wide).

    Returns
    -------
    tp, fp, fn : int
    """
    pred = np.asarray(pred, dtype=object)
    truth = np.asarray(truth, dtype=object)
    if len(pred) == 0 or len(truth) == 0:
        return 0, len(pred), len(truth)
    tree = shapely.STRtree(truth)
    i, j = tree.query(pred, predicate="intersects")
    if len(i) == 0:
        return 0, len(pred), len(truth)
    inter = shapely.area(shapely.intersection(pred[i], truth[j]))
    union = shapely.area(pred[i]) + shapely.area(truth[j]) - inter
    iou = np.where(union > 0, inter / union, 0.0)
    order = np.argsort(-iou, kind="stable")
    used_p, used_t = set(), set()
    tp = 0
    for k in order:
        if iou[k] < threshold or iou[k] <= 0:
            break
        if i[k] in used_p or j[k] in used_t:
            continue
        used_p.add(int(i[k]))
        used_t.add(int(j[k]))
        tp += 1
    return tp, len(pred) - tp, len(truth) - tp


def _as_int(v: Any) -> int | None:
    """A class id from a label attribute (``1``, ``"1"``, ``1.0``), else None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if np.isfinite(f) and f.is_integer() else None


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b else None


def evaluate(
    pred: str,
    labels: str,
    *,
    layer: str | None = None,
    class_field: str = "class",
    label_class: str | None = None,
    object_classes: Sequence[str] | None = None,
    iou_threshold: float = 0.5,
    label_values: Mapping[int | float, str] | None = None,
    min_area: float | None = None,
    max_length: float | None = None,
) -> dict[str, Any]:
    """Compare a predicted class mask with vector labels or a label raster.

    Parameters
    ----------
    pred : str
        Class mask (``mask.tif``; class names from its metadata or run.json).
    labels : str
        Vector labels (GeoPackage, GeoJSON, ...), any CRS; or a label raster (``.png``,
        ``.tif``, ...; :func:`geoseg.io.labels.is_raster_labels`), scored by
        :func:`evaluate_raster`.
    layer : str, optional
        Layer of ``labels`` (default the first).
    class_field : str
        Attribute holding each label's class name or id.
    label_class : str, optional
        Class of every label when they have no class attribute (e.g. ``building``).
    object_classes : sequence of str, optional
        Classes scored as objects too (default: classes whose name says building, ship,
        tank or vessel).
    iou_threshold : float
        Object match threshold (0: any overlap matches).
    label_values : mapping, optional
        Label rasters only: pixel value -> class name, id or ``ignore``.
    min_area, max_length : float, optional
        Predicted objects smaller than ``min_area`` (square metres, or pixels without a CRS)
        or longer than ``max_length`` (metres) are not counted, as vectorize leaves them out
        of the layers; default the model's object rules the mask carries. Pixel scores are
        unchanged.

    Returns
    -------
    dict
        ``classes``: per class ``iou, precision, recall, f1, pixels_true, pixels_pred`` and,
        for object classes, ``objects_true, objects_pred, object_tp, object_precision,
        object_recall, object_f1``; plus ``mask``, ``labels``, ``valid_pixels``.
    """
    if is_raster_labels(labels):
        return evaluate_raster(pred, labels, label_values=label_values)
    if label_values:
        raise InputError(f"{labels}: label_values= applies to label rasters, this is a vector file; drop it")
    src = open_mask(pred)
    gb = src.geobox
    df = _read_labels(labels, layer, gb.crs, pred)
    names = {c.id: c.name for c in src.classes}
    ids = _label_ids(df, names, labels, pred, label_class, class_field)
    ignored = sorted({str(v) for v, k in zip(df[class_field], ids, strict=True) if k < 0}) if label_class is None else []
    geoms = df.geometry.values
    keep = ~(shapely.is_empty(geoms) | shapely.is_missing(geoms)) & (ids >= 0)
    geoms, ids = geoms[keep], ids[keep]
    mask = read_mask_window(src, gb.window)
    valid = mask != NODATA
    truth = _burn(geoms, ids, gb)
    classes = sorted(({int(c) for c in ids} | {int(v) for v in np.unique(mask[valid])}) - {0})
    result: dict[str, Any] = {
        "ignored_label_classes": ignored,
        "mask": src.path,
        "labels": os.path.abspath(labels),
        "valid_pixels": int(valid.sum()),
        "classes": {},
    }
    kinds = {c.id: c.kind for c in src.classes}
    objects = None  # the mask's polygons and its valid area, drawn once for the first object class
    for k in classes:
        name = names.get(k, f"class_{k}")
        row = _pixel_scores((truth == k) & valid, (mask == k) & valid)
        if _is_object(name, kinds.get(k), object_classes):
            pieces, valid_area = objects = objects or _mask_objects(mask, valid, classes, gb)
            rules = _object_rules(src.object_rules, min_area, max_length)
            pred_polys = _sized(pieces.geometry[pieces.class_id == k], gb, rules)
            row.update(_object_scores(pred_polys, geoms[ids == k], valid_area, iou_threshold))
        result["classes"][name] = row
    return result


def _read_labels(labels: str, layer: str | None, crs: str | None, pred: str) -> Any:
    """The vector labels as a GeoDataFrame, in the mask's CRS (as they are for a mask without one)."""
    import geopandas as gpd

    if not os.path.exists(labels):
        raise InputError(f"{labels}: no such file; give the labels as a vector file (GeoPackage, GeoJSON, ...)")
    try:
        df = gpd.read_file(labels, layer=layer)
    except Exception as exc:  # pyogrio raises its own error types for unreadable files
        raise InputError(f"{labels}: cannot read the labels ({exc}); give a vector file GDAL opens") from exc
    if crs is not None:
        if df.crs is None:
            raise InputError(f"{labels}: the labels have no CRS; set one (e.g. with ogr2ogr -a_srs) to compare with {pred}")
        df = df.to_crs(crs)
    return df


def _label_ids(df: Any, names: dict[int, str], labels: str, pred: str, label_class: str | None, class_field: str) -> np.ndarray:
    """The mask's class id of every label (-1: a class the mask does not have, not scored)."""
    by_name = {v: k for k, v in names.items()}
    if label_class is not None:
        if label_class not in by_name:
            raise InputError(f"{pred}: has no class {label_class!r}; its classes are {', '.join(by_name)}")
        return np.full(len(df), by_name[label_class])
    if class_field not in df.columns:
        raise InputError(f"{labels}: no {class_field!r} attribute; name it with class_field= or give label_class=")
    ids = []
    for v in df[class_field]:
        if isinstance(v, str) and v in by_name:
            ids.append(by_name[v])
        elif _as_int(v) in names:
            ids.append(_as_int(v))
        else:
            ids.append(-1)  # a class this prediction does not have: not scored
    ids = np.asarray(ids)
    if not (ids >= 0).any():
        found = ", ".join(sorted({str(v) for v in df[class_field]})[:8])
        raise InputError(
            f"{labels}: no label has a class of {pred} ({', '.join(by_name)}); labels have {found}; "
            "fix class_field= or give label_class="
        )
    return ids


def _burn(geoms: np.ndarray, ids: np.ndarray, gb: Any) -> np.ndarray:
    """The labels rasterised on the mask's grid (small labels drawn last: on top; 0 elsewhere)."""
    from rasterio import features

    order = np.argsort(-shapely.area(geoms))
    return features.rasterize(
        [(g, int(c)) for g, c in zip(geoms[order], ids[order], strict=True)],
        out_shape=(gb.height, gb.width),
        transform=gb.transform,
        fill=0,
        dtype="uint8",
    )


def _is_object(name: str, kind: str | None, object_classes: Sequence[str] | None) -> bool:
    """Whether class ``name`` is scored as objects too (by default: buildings, ships, tanks; the card's kind first)."""
    if object_classes is not None:
        return name in set(object_classes)
    return object_kind(name, kind) in ("building", "ship", "tank")


def _object_rules(rules: Mapping[str, float], min_area: float | None, max_length: float | None) -> tuple[float, float]:
    """``(min_area, max_length)``: the caller's, else the model's object rules the mask carries (0: none)."""
    rules = dict(rules)
    lo = rules.get("min_area_m2", 0.0) if min_area is None else min_area
    hi = rules.get("max_length_m", 0.0) if max_length is None else max_length
    return lo, hi


def _mask_objects(mask: np.ndarray, valid: np.ndarray, classes: list[int], gb: Any) -> tuple[Any, Any]:
    """The mask's polygons (pixel coordinates) and its valid area (the mask's CRS)."""
    pieces = polygonize_block(mask, 0, 0, (gb.height, gb.width), classes=set(classes))
    valid_px = polygonize_block(valid.astype(np.uint8), 0, 0, valid.shape, classes={1}).geometry
    valid_area = pixel_to_world(np.array([shapely.union_all(valid_px)]), gb.transform)[0]
    return pieces, valid_area


def _sized(polygons: np.ndarray, gb: Any, rules: tuple[float, float]) -> np.ndarray:
    """One class's predicted objects (pixel polygons) in the mask's CRS, less those the object rules leave out."""
    pred_polys = pixel_to_world(polygons, gb.transform)
    lo, hi = rules
    if (lo > 0 or hi > 0) and len(pred_polys):  # true metres, as vectorize measures them
        sized = to_metric(pred_polys, gb.crs, metric_crs(gb.crs, gb.bounds))[0] if gb.crs else pred_polys
        keep = shapely.area(sized) >= lo
        if hi > 0:
            keep &= oriented_box(sized)[0] <= hi
        pred_polys = pred_polys[keep]
    return pred_polys


def _object_scores(pred_polys: np.ndarray, labels: np.ndarray, valid_area: Any, iou_threshold: float) -> dict[str, Any]:
    """Object counts and scores of one class inside the mask's valid area.

    Objects are scored inside the valid area (an AOI, a held-out half): labels are clipped to
    it; a label with less than half its area inside is not scored, and neither is a predicted
    object lying mostly on such a label. Each part of a label is an object.
    """
    true_polys = shapely.get_parts(labels)
    inside = shapely.intersection(true_polys, valid_area)
    share = shapely.area(inside) / np.maximum(shapely.area(true_polys), 1e-12)
    cut = true_polys[(share > 0) & (share < 0.5)]
    true_polys = inside[share >= 0.5]
    if len(cut):
        over = np.zeros(len(pred_polys))
        tree = shapely.STRtree(cut)
        pi, ci = tree.query(pred_polys, predicate="intersects")
        np.add.at(over, pi, shapely.area(shapely.intersection(pred_polys[pi], cut[ci])))
        pred_polys = pred_polys[over < 0.5 * shapely.area(pred_polys)]
    otp, ofp, ofn = match_objects(pred_polys, true_polys, iou_threshold)
    return {
        "objects_true": len(true_polys),
        "objects_pred": len(pred_polys),
        "object_tp": otp,
        "object_precision": _ratio(otp, otp + ofp),
        "object_recall": _ratio(otp, otp + ofn),
        "object_f1": _ratio(2 * otp, 2 * otp + ofp + ofn),
    }


def _pixel_scores(t: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Pixel scores of one class: ``t``/``p`` are its true/predicted pixels on the valid area."""
    tp = int((t & p).sum())
    fp = int((~t & p).sum())
    fn = int((t & ~p).sum())
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "pixels_true": int(t.sum()),
        "pixels_pred": int(p.sum()),
    }


def evaluate_raster(pred: str, labels: str, *, label_values: Mapping[int | float, str] | None = None) -> dict[str, Any]:
    """Compare a predicted class mask with a label raster, pixel by pixel.

    Parameters
    ----------
    pred : str
        Class mask (``mask.tif``; class names from its metadata or run.json).
    labels : str
        Label raster of class values, the size of the mask or on its georeferenced grid.
    label_values : mapping, optional
        Pixel value -> class name (of the mask), class id or ``ignore``; unlisted values are
        class ids (:func:`geoseg.io.labels.parse_label_values`).

    Returns
    -------
    dict
        As :func:`evaluate` without object scores: ``classes`` (every class of the mask or the
        labels, background included: ``iou, precision, recall, f1`` (= Dice),
        ``pixels_true, pixels_pred``), ``mask``, ``labels``, ``label_values``,
        ``valid_pixels`` (valid in the mask and labelled, not ignored),
        ``ignored_label_classes`` (empty: every value maps to a class or to ignore).
    """
    src = open_mask(pred)
    gb = src.geobox
    names = {v: f"class_{v}" for v in range(NODATA)}  # values the mask does not name are ids
    names.update({c.id: c.name for c in src.classes})
    classes = {name: cid for cid, name in names.items()}
    lab = open_raster_labels(labels, gb, classes, label_values, image=pred, require_foreground=False)
    mask = read_mask_window(src, gb.window)
    truth = lab.read(gb.window)
    valid = (mask != NODATA) & (truth != IGNORE)
    present = {int(v) for v in np.unique(truth[valid])} | {int(v) for v in np.unique(mask[valid])}
    present |= {classes[n] for n, c in lab.counts.items() if c}
    result: dict[str, Any] = {
        "ignored_label_classes": [],
        "mask": src.path,
        "labels": os.path.abspath(labels),
        "label_values": {str(k): v for k, v in (label_values or {}).items()},
        "valid_pixels": int(valid.sum()),
        "classes": {},
    }
    for k in sorted(present):
        result["classes"][names.get(k, f"class_{k}")] = _pixel_scores((truth == k) & valid, (mask == k) & valid)
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`evaluate`'s result."""

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"{'class':<16} {'IoU':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'obj F1':>7} {'objects (true/pred/tp)':>24}",
    ]
    for name, r in result["classes"].items():
        obj = f"{r['objects_true']}/{r['objects_pred']}/{r['object_tp']}" if "object_f1" in r else "-"
        lines.append(
            f"{name:<16} {f(r['iou']):>6} {f(r['precision']):>6} {f(r['recall']):>6} {f(r['f1']):>6} "
            f"{f(r.get('object_f1')):>7} {obj:>24}"
        )
    return "\n".join(lines)
