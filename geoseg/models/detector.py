"""Object detectors' outputs: the zoos' layouts decoded to boxes, and class-wise non-maximum suppression.

A detector (a card with a ``detector``; Deepness/GeoDeep ``model_type: Detector``) returns, per
image, one array of candidate boxes in the pixels of its input, in one of these layouts:

``yolov5`` (``YOLO_v5_or_v7_default``)
    ``(N, 5 + C)`` rows: ``cx, cy, w, h, objectness, C class scores``; a box's score is
    objectness times its best class score (YOLOv5/v7's own ``conf = obj_conf * cls_conf``).
``yolov6`` (``YOLO_v6``)
    the same rows; objectness is ignored (always 1 in its exports): score = best class score.
``ultralytics`` (``YOLO_Ultralytics``, GeoDeep's ``YOLO_v9``; YOLOv8/v9/v11)
    ``(4 + C, N)`` columns: ``cx, cy, w, h, C class scores``; score = best class score.
``ultralytics_obb`` (``YOLO_Ultralytics_obb``)
    ``(4 + C + 1, N)`` columns: as ``ultralytics``, then the box's rotation in radians
    (clockwise on the image, y down: Ultralytics' ``xywhr``).
``ultralytics_seg`` (``YOLO_Ultralytics_segmentation``)
    ``(4 + C + M, N)`` columns: as ``ultralytics`` then M mask coefficients, which are ignored
    (boxes only; the class count comes from the card).

:func:`tile_boxes` turns one tile's output into :class:`Boxes` in whole-raster pixel
coordinates (x = column, y = row), clipped to what the tile saw of the raster, scores at
least ``conf``. :func:`nms` is greedy class-wise suppression (a box goes when a kept,
higher-ranked box of its class overlaps it with IoU above ``iou``); ranks are a total order
(score, then bounds, then class), so the result does not depend on the order boxes arrive in.
:func:`settle` splits a chunk's boxes into those final already and those whose suppression
depends on other chunks (see :mod:`geoseg.engine.detect`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import shapely

from geoseg.errors import ModelError
from geoseg.models.card_parts import Detector

__all__ = ["Boxes", "class_count", "nms", "rank_order", "settle", "tile_boxes"]

#: mask coefficients of an Ultralytics segmentation head (its ``nm``)
SEG_COEFFICIENTS = 32


@dataclass
class Boxes:
    """Detections as parallel columns: polygons in whole-raster pixel coordinates, scores, class ids."""

    geometry: np.ndarray
    score: np.ndarray
    class_id: np.ndarray

    def __len__(self) -> int:
        return len(self.geometry)

    def take(self, idx: np.ndarray) -> Boxes:
        """The boxes at ``idx`` (an index or boolean array)."""
        return Boxes(self.geometry[idx], self.score[idx], self.class_id[idx])

    @staticmethod
    def empty() -> Boxes:
        """No boxes."""
        return Boxes(np.empty(0, dtype=object), np.empty(0, np.float64), np.empty(0, np.int16))

    @staticmethod
    def concat(parts: Sequence[Boxes]) -> Boxes:
        """All boxes of ``parts``, in order."""
        if not parts:
            return Boxes.empty()
        return Boxes(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Boxes)))

    def to_wire(self) -> dict[str, np.ndarray]:
        """A picklable form (geometry as WKB)."""
        return {"geometry": shapely.to_wkb(self.geometry), "score": self.score, "class_id": self.class_id}

    @staticmethod
    def from_wire(d: dict[str, np.ndarray]) -> Boxes:
        """Inverse of :meth:`to_wire`."""
        return Boxes(shapely.from_wkb(d["geometry"]), d["score"], d["class_id"])


def class_count(shape: tuple[int, ...], detector: Detector, known: int | None = None) -> int:
    """The class count an output of ``shape`` ``(batch, ., .)`` holds in the detector's layout.

    Parameters
    ----------
    shape : tuple of int
        The model's output shape for a batch.
    detector : Detector
        Its layout.
    known : int, optional
        The card's class count (needed by ``ultralytics_seg``, checked for the others).

    Returns
    -------
    int

    Raises
    ------
    ModelError
        The shape does not fit the layout (or the card's classes).
    """
    layout = detector.layout
    if len(shape) != 3:
        raise ModelError(f"a {layout} detector returns (batch, ., .) boxes, got an output of shape {shape}; check det_type")
    extra = {"yolov5": 5, "yolov6": 5, "ultralytics": 4, "ultralytics_obb": 5}
    width = shape[2] if layout in ("yolov5", "yolov6") else shape[1]
    if layout == "ultralytics_seg":
        n = known if known is not None else width - 4 - SEG_COEFFICIENTS
    else:
        n = width - extra[layout]
    if n < 1 or (known is not None and n != known) or n > width:
        want = f"{known} classes (the card's)" if known is not None else "at least one class"
        raise ModelError(f"a {layout} detector's output of shape {tuple(shape)} does not hold {want}; check det_type")
    return n


def _rows(y: np.ndarray, layout: str, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(xywh, score, class, angle)`` of every candidate of one image's output ``y`` (float64)."""
    y = np.asarray(y, dtype=np.float64)
    if layout in ("yolov5", "yolov6"):
        cls = y[:, 5 : 5 + n_classes]
        best = cls.max(axis=1)
        score = best * y[:, 4] if layout == "yolov5" else best
        return y[:, :4], score, cls.argmax(axis=1), np.zeros(len(y))
    cols = y.T
    cls = cols[:, 4 : 4 + n_classes]
    angle = cols[:, 4 + n_classes] if layout == "ultralytics_obb" else np.zeros(len(cols))
    return cols[:, :4], cls.max(axis=1), cls.argmax(axis=1), angle


def _corners(xywh: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """``(n, 4, 2)`` corners of rotated boxes (Ultralytics' ``xywhr2xyxyxyxy``; y down)."""
    c, s = np.cos(angle), np.sin(angle)
    half_w = np.stack([xywh[:, 2] / 2 * c, xywh[:, 2] / 2 * s], axis=1)
    half_h = np.stack([-xywh[:, 3] / 2 * s, xywh[:, 3] / 2 * c], axis=1)
    ctr = xywh[:, :2]
    return np.stack([ctr + half_w + half_h, ctr + half_w - half_h, ctr - half_w - half_h, ctr - half_w + half_h], axis=1)


def tile_boxes(
    y: np.ndarray,
    detector: Detector,
    n_classes: int,
    conf: float,
    origin: tuple[float, float],
    factor: tuple[float, float],
    clip: tuple[float, float, float, float],
) -> Boxes:
    """One tile's boxes in whole-raster pixels: scores at least ``conf``, clipped to ``clip``.

    Parameters
    ----------
    y : numpy.ndarray
        The model's output for this tile (the batch axis taken).
    detector : Detector
        Its layout.
    n_classes : int
        Classes the output holds (:func:`class_count`).
    conf : float
        Lowest score kept.
    origin : (float, float)
        Column and row of the tile input's top-left pixel corner in the raster.
    factor : (float, float)
        Raster pixels per model input pixel along x and y (1 unless tiles are resampled).
    clip : (float, float, float, float)
        ``xmin, ymin, xmax, ymax``: what the tile saw of the raster; boxes are cut to it and
        those left without area are dropped.

    Returns
    -------
    Boxes
    """
    xywh, score, cls, angle = _rows(y, detector.layout, n_classes)
    keep = np.flatnonzero(score >= conf)  # NaN scores never pass
    xywh, score, cls, angle = xywh[keep], score[keep], cls[keep], angle[keep]
    if detector.layout == "ultralytics_obb":
        pts = _corners(xywh, angle) * factor + origin
        geoms = shapely.clip_by_rect(shapely.polygons(pts), *clip)
    else:
        lo = np.maximum((xywh[:, :2] - xywh[:, 2:] / 2) * factor + origin, clip[:2])
        hi = np.minimum((xywh[:, :2] + xywh[:, 2:] / 2) * factor + origin, clip[2:])
        geoms = shapely.box(lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1])
        geoms[~((hi > lo).all(axis=1))] = shapely.Polygon()
    alive = ~shapely.is_empty(geoms) & (shapely.area(geoms) > 0) & np.isfinite(xywh).all(axis=1)
    return Boxes(geoms[alive], score[alive], cls[alive].astype(np.int16))


def rank_order(boxes: Boxes) -> np.ndarray:
    """Indices from the highest-ranked box down: score, then bounds and class (a total order)."""
    b = shapely.bounds(boxes.geometry)
    return np.lexsort((boxes.class_id, b[:, 3], b[:, 2], b[:, 1], b[:, 0], -boxes.score))


def _conflicts(boxes: Boxes, iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i < j``, of boxes of one class whose IoU is above ``iou``."""
    if len(boxes) < 2:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    i, j = shapely.STRtree(boxes.geometry).query(boxes.geometry, predicate="intersects")
    sel = (i < j) & (boxes.class_id[i] == boxes.class_id[j])
    i, j = i[sel], j[sel]
    inter = shapely.area(shapely.intersection(boxes.geometry[i], boxes.geometry[j]))
    area = shapely.area(boxes.geometry)
    union = area[i] + area[j] - inter
    hit = inter > iou * union
    return i[hit], j[hit]


def _greedy(boxes: Boxes, pairs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Which boxes greedy suppression keeps (bool), given the conflicting pairs."""
    n = len(boxes)
    keep = np.zeros(n, bool)
    i, j = pairs
    a, b = np.concatenate([i, j]), np.concatenate([j, i])
    srt = np.argsort(a, kind="stable")
    starts = np.searchsorted(a[srt], np.arange(n + 1))
    near = b[srt]
    for k in rank_order(boxes):
        if not keep[near[starts[k] : starts[k + 1]]].any():
            keep[k] = True
    return keep


def nms(boxes: Boxes, iou: float) -> Boxes:
    """Greedy class-wise non-maximum suppression, the kept boxes from the highest-ranked down.

    Parameters
    ----------
    boxes : Boxes
        Candidates.
    iou : float
        A box goes when a kept, higher-ranked box of its class overlaps it with IoU above this.

    Returns
    -------
    Boxes
    """
    keep = _greedy(boxes, _conflicts(boxes, iou))
    order = rank_order(boxes)
    return boxes.take(order[keep[order]])


def settle(boxes: Boxes, iou: float, foreign: Sequence[tuple[float, float, float, float]]) -> tuple[Boxes, Boxes]:
    """Split a chunk's boxes into those final already and those other chunks' boxes may touch.

    Boxes that conflict (same class, IoU above ``iou``) form connected groups; suppression in
    one group never depends on another. A group with a box overlapping a ``foreign`` rectangle
    (where other chunks' boxes can lie) may join boxes of other chunks: it is returned whole,
    unsuppressed, for the cross-chunk pass. The other groups are suppressed here, which is
    exactly what suppressing all boxes of the raster at once does to them.

    Parameters
    ----------
    boxes : Boxes
        The chunk's boxes (each tile's already suppressed within the tile).
    iou : float
        The suppression IoU.
    foreign : sequence of (xmin, ymin, xmax, ymax)
        Rectangles holding every box of every other chunk.

    Returns
    -------
    final : Boxes
        Kept boxes of groups inside the chunk.
    seam : Boxes
        Every box of the groups that may continue in other chunks.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(boxes)
    pairs = _conflicts(boxes, iou)
    graph = coo_matrix((np.ones(len(pairs[0])), pairs), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    b = shapely.bounds(boxes.geometry).reshape(n, 4)
    near = np.zeros(n, bool)
    for x0, y0, x1, y1 in foreign:  # a positive-area overlap is needed for an IoU above zero
        near |= (b[:, 0] < x1) & (b[:, 2] > x0) & (b[:, 1] < y1) & (b[:, 3] > y0)
    seam = np.isin(label, label[near])
    keep = _greedy(boxes, pairs) & ~seam
    order = rank_order(boxes)
    return boxes.take(order[keep[order]]), boxes.take(np.flatnonzero(seam))
