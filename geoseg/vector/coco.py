"""COCO instance annotations from a class mask and its vectorised objects.

Each polygon geoseg writes is one connected region of one class (merged across chunk seams).
Its COCO annotation is taken from the *mask*, not from the (possibly simplified) outline: the
region is found again by connected-component labelling of a window around the polygon, seeded
at the polygon's first pixel (its ``id``), and encoded as uncompressed run-length encoding
(column-major, as COCO defines it). So a COCO reader decodes exactly the mask's pixels, and
``area`` is the pixel count. Holes are kept (COCO polygons cannot hold them; RLE can).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import shapely

from geoseg.grid import Window
from geoseg.io.mask import MaskSource, mask_reader
from geoseg.io.outdir import atomic_path, fsync_replace, write_json_atomic

__all__ = [
    "annotate_part",
    "coco_document",
    "rle_from_window",
    "track_instances",
    "write_coco",
    "write_coco_stream",
]


def rle_from_window(inst: np.ndarray, row_off: int, col_off: int, height: int, width: int) -> list[int]:
    """Uncompressed COCO RLE of a boolean window placed at ``(row_off, col_off)`` in an image.

    Parameters
    ----------
    inst : numpy.ndarray
        ``(rows, cols)`` bool: the instance's pixels in the window.
    row_off, col_off : int
        Window position in the image.
    height, width : int
        Image size.

    Returns
    -------
    list of int
        Alternating run lengths (zeros first) in column-major order, summing to ``height * width``.
    """
    cols, rows = np.nonzero(inst.T)  # column-major order: by column, then row
    if len(cols) == 0:
        return [height * width]
    pos = (cols.astype(np.int64) + col_off) * height + rows.astype(np.int64) + row_off
    breaks = np.flatnonzero(np.diff(pos) != 1)
    starts = np.concatenate([[pos[0]], pos[breaks + 1]])
    ends = np.concatenate([pos[breaks] + 1, [pos[-1] + 1]])
    counts = np.empty(2 * len(starts) + 1, dtype=np.int64)
    counts[0] = starts[0]
    counts[1:-1:2] = ends - starts
    counts[2:-1:2] = starts[1:] - ends[:-1]
    counts[-1] = height * width - ends[-1]
    return counts.tolist()


def _instance(read, gb, class_id: int, first: int, bounds: Sequence[float], connectivity: int, pad: int):
    """The connected region of ``class_id`` holding pixel ``first``: (bool window, row_off, col_off)."""
    from scipy import ndimage

    row, col = divmod(int(first), gb.width)
    inv = ~gb.transform
    xs, ys = zip(*(inv * (x, y) for x in (bounds[0], bounds[2]) for y in (bounds[1], bounds[3])), strict=True)
    r0, r1 = math.floor(min(ys)) - pad, math.ceil(max(ys)) + pad
    c0, c1 = math.floor(min(xs)) - pad, math.ceil(max(xs)) + pad
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    while True:
        r0, c0 = max(0, min(r0, row)), max(0, min(c0, col))
        r1, c1 = min(gb.height, max(r1, row + 1)), min(gb.width, max(c1, col + 1))
        block = read(Window(r0, c0, r1 - r0, c1 - c0)) == class_id
        labels, _ = ndimage.label(block, structure=structure)
        inst = labels == labels[row - r0, col - c0]
        # the region must not touch a window edge that is not the image edge: else grow and retry
        grow = [
            r0 > 0 and inst[0].any(),
            r1 < gb.height and inst[-1].any(),
            c0 > 0 and inst[:, 0].any(),
            c1 < gb.width and inst[:, -1].any(),
        ]
        if not any(grow):
            rr, cc = np.nonzero(inst)
            a, b, c, d = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
            return inst[a:b, c:d], r0 + int(a), c0 + int(c)
        step = max(16, (r1 - r0) // 2, (c1 - c0) // 2)
        r0, r1 = (r0 - step if grow[0] else r0), (r1 + step if grow[1] else r1)
        c0, c1 = (c0 - step if grow[2] else c0), (c1 + step if grow[3] else c1)


def annotate_part(
    src: MaskSource,
    part: str,
    class_ids: Sequence[int],
    connectivity: int,
    out: str,
    pad: int = 2,
) -> int:
    """One Dask task: COCO annotations of one parquet part's polygons, as JSON lines sorted by first pixel.

    Each annotation (without ``id``/``image_id``) has ``category_id``, ``segmentation``
    (uncompressed RLE), ``area``, ``bbox``, ``iscrowd``, ``score`` (when known) and
    ``geoseg_first_pixel``. The mask stays open for the whole part.

    Parameters
    ----------
    src : MaskSource
        The class mask the polygons came from.
    part : str
        A parquet part written by :func:`geoseg.vector.vectorize` (``id`` = first pixel).
    class_ids : sequence of int
        Classes to annotate.
    connectivity : int
        4 or 8, as used for the polygons.
    out : str
        JSON-lines file to write (temporary name, then renamed).
    pad : int
        Pixels added around each polygon's bounds (simplified outlines may lie inside the region).

    Returns
    -------
    int
        Annotations written.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(part, columns=["id", "class_id", "score", "geometry"])
    ids = table.column("id").to_numpy()
    cls = table.column("class_id").to_numpy()
    score = table.column("score").to_numpy(zero_copy_only=False)
    geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    bounds = shapely.bounds(geoms)
    keep = np.flatnonzero(np.isin(cls, [int(c) for c in class_ids]))
    keep = keep[np.argsort(ids[keep], kind="stable")]
    gb = src.geobox
    tmp = atomic_path(out)
    with mask_reader(src) as read, open(tmp, "w") as f:
        for k in keep:
            inst, r0, c0 = _instance(read, gb, int(cls[k]), int(ids[k]), bounds[k], connectivity, pad)
            ann: dict[str, Any] = {
                "category_id": int(cls[k]),
                "segmentation": {"size": [gb.height, gb.width], "counts": rle_from_window(inst, r0, c0, gb.height, gb.width)},
                "area": int(inst.sum()),
                "bbox": [c0, r0, int(inst.shape[1]), int(inst.shape[0])],
                "iscrowd": 0,
                "geoseg_first_pixel": int(ids[k]),
            }
            if np.isfinite(score[k]):
                ann["score"] = round(float(score[k]), 4)
            f.write(json.dumps(ann, separators=(",", ":")) + "\n")
    os.replace(tmp, out)  # a staging file: no fsync needed
    return len(keep)


def write_coco_stream(
    path: str,
    image: dict[str, Any],
    categories: Sequence[tuple[int, str]],
    annotation_files: Sequence[str],
    description: str = "geoseg predictions",
) -> int:
    """Write a one-image COCO file from sorted JSON-lines parts, streaming (memory does not grow with objects).

    The parts (from :func:`annotate_part`) are merged by first pixel, so annotation ids follow
    raster order whatever the chunking. Written to a temporary name, then renamed.

    Returns
    -------
    int
        Annotations written.
    """
    import heapq

    head = coco_document([image], categories, [[]], description=description)
    del head["annotations"]  # written last, streamed
    head_text = json.dumps(head, separators=(",", ":"))[:-1] + ',"annotations":['
    tmp = atomic_path(path)
    n = 0
    with contextlib.ExitStack() as stack:
        streams = [
            ((json.loads(line) for line in stack.enter_context(open(p))) if os.path.getsize(p) else iter(()))
            for p in annotation_files
        ]
        with open(tmp, "w") as f:
            f.write(head_text)
            for ann in heapq.merge(*streams, key=lambda a: a["geoseg_first_pixel"]):
                n += 1
                f.write(("," if n > 1 else "") + json.dumps({"id": n, "image_id": 1, **ann}, separators=(",", ":")))
            f.write("]}")
    fsync_replace(tmp, path)
    return n


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ax1, ay1, ax2, ay2 = a[0], a[1], a[0] + a[2], a[1] + a[3]
    bx1, by1, bx2, by2 = b[0], b[1], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0.0, min(ax2, bx2) - max(ax1, bx1)), max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _rle_iou(a: dict, b: dict) -> float:
    """IoU of two uncompressed RLEs of one image size (interval overlap, no decoding)."""

    def runs(rle: dict) -> np.ndarray:
        c = np.cumsum(rle["counts"])
        return np.stack([c[0:-1:2], c[1::2]], axis=1)  # [start, end) of each run of ones

    ra, rb = runs(a["segmentation"]), runs(b["segmentation"])
    if len(ra) == 0 or len(rb) == 0:
        return 0.0
    i = j = 0
    inter = 0
    while i < len(ra) and j < len(rb):
        lo, hi = max(ra[i, 0], rb[j, 0]), min(ra[i, 1], rb[j, 1])
        inter += max(0, hi - lo)
        if ra[i, 1] < rb[j, 1]:
            i += 1
        else:
            j += 1
    union = a["area"] + b["area"] - inter
    return float(inter / union) if union else 0.0


def track_instances(frames: Sequence[list[dict[str, Any]]], min_iou: float = 0.3) -> int:
    """Give the annotations of consecutive frames a ``track_id`` (in place); returns the number of tracks.

    Greedy matching by mask IoU, best pairs first, within a class: an object keeps its track
    when it overlaps its previous-frame self by at least ``min_iou``; otherwise a new track
    starts. Enough for objects that move less than their own size between frames.
    """
    next_id = 1
    prev: list[dict[str, Any]] = []
    for anns in frames:
        pairs = []
        for i, a in enumerate(anns):
            for j, b in enumerate(prev):
                if a["category_id"] == b["category_id"] and _box_iou(a["bbox"], b["bbox"]) > 0:
                    iou = _rle_iou(a, b)
                    if iou >= min_iou:
                        pairs.append((iou, i, j))
        used_a: set[int] = set()
        used_b: set[int] = set()
        for _iou, i, j in sorted(pairs, reverse=True):
            if i not in used_a and j not in used_b:
                anns[i]["track_id"] = prev[j]["track_id"]
                used_a.add(i)
                used_b.add(j)
        for i, a in enumerate(anns):
            if i not in used_a:
                a["track_id"] = next_id
                next_id += 1
        prev = anns
    return next_id - 1


def coco_document(
    images: Sequence[dict[str, Any]],
    categories: Sequence[tuple[int, str]],
    annotations: Sequence[list[dict[str, Any]]],
    description: str = "geoseg predictions",
) -> dict[str, Any]:
    """A COCO instances document: ``images`` (``file_name``, ``width``, ``height``), one annotation list per image."""
    doc: dict[str, Any] = {
        "info": {
            "description": description,
            "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "geoseg_coordinates": "pixels of each image: x = column, y = row from the top-left corner",
        },
        "licenses": [],
        "images": [],
        "categories": [{"id": int(i), "name": n, "supercategory": "geoseg"} for i, n in categories],
        "annotations": [],
    }
    ann_id = 1
    for image_id, (img, anns) in enumerate(zip(images, annotations, strict=True), start=1):
        doc["images"].append({**{k: v for k, v in img.items() if k != "id"}, "id": image_id})
        for a in anns:
            doc["annotations"].append({"id": ann_id, "image_id": image_id, **a})
            ann_id += 1
    return doc


def write_coco(path: str, doc: dict[str, Any]) -> None:
    """Write a COCO document atomically (temporary name, then rename)."""
    write_json_atomic(path, doc, separators=(",", ":"))
