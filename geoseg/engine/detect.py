"""Detect objects in a raster with a detector model: predict's plan, reads and tiles, boxes instead of a mask.

A model whose card has a ``detector`` (a Deepness/GeoDeep ``Detector``, a YOLO export)
returns boxes, not per-pixel classes. :func:`detect` plans the job as
:func:`~geoseg.engine.graph.predict` does (:func:`~geoseg.engine.plan.plan_job`: bands,
scaling, pixel size, probe, tile/halo/chunk) and runs one task per chunk after the same
read tasks (:func:`~geoseg.engine.graph.chunk_reads`: a file by path, an array by its own blocks)::

    read_chunk ─▶ detect_chunk: tiles through the model; per tile: decode (models.detector, raster
                  pixels, score >= conf, cut to what the tile saw) ─▶ NMS per class in the tile
                  ─▶ settle the chunk: groups of conflicting boxes no other chunk's box can reach
                     are suppressed here (final); groups near a chunk seam come back whole
    client: one NMS over the seam groups of every chunk ─▶ final boxes ─▶ AOI ─▶ Detections

The result is exactly what running every tile and suppressing all their boxes at once gives
(:func:`geoseg.models.detector.settle` says why), whatever the chunk size. Nothing is written
here: :func:`geoseg.vector.detections.write_detections` writes the layers and run.json.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import shapely

from geoseg.engine.graph import chunk_reads
from geoseg.engine.job import Job
from geoseg.engine.plan import plan_job
from geoseg.engine.progress import TileReport, compute_tasks, counter
from geoseg.engine.report import command_line, job_entries, versions
from geoseg.engine.tasks import TileInputs, model_inputs, tile_batches
from geoseg.errors import InputError
from geoseg.grid import TilePlan, Window
from geoseg.models.card_parts import Detector
from geoseg.models.detector import Boxes, nms, rank_order, settle, tile_boxes
from geoseg.models.runtime import get_predictor, resample_batch
from geoseg.models.spec import ModelSpec, Runtime, resolve_model

__all__ = ["NO_MASK", "Detections", "detect", "detect_chunk"]

#: what run.json says in place of a mask
NO_MASK = "none: a detector gives boxes, not per-pixel classes; they are the polygon layers listed in vectors.json"


@dataclass
class Detections:
    """What :func:`detect` found: the final boxes (raster pixel coordinates, best first) and their job.

    Attributes
    ----------
    job : Job
        Source, model, card, runtime and tile plan.
    detector : Detector
        The layout and the ``conf`` and ``iou`` the run used.
    boxes : Boxes
        Every detection, in raster pixel coordinates (x = column, y = row), best first.
    seam_boxes : int
        Boxes that went to the cross-chunk suppression (near chunk seams).
    stats : list of dict
        Each chunk task's tile counts and seconds.
    timings : dict
        Seconds: planning (``predict_call_s``), the chunk tasks (``compute_wall_s``), the merge.
    """

    job: Job
    detector: Detector
    boxes: Boxes
    seam_boxes: int
    stats: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Class name -> boxes (every class of the model, zero included)."""
        found = np.bincount(self.boxes.class_id.astype(np.int64), minlength=len(self.job.card.classes))
        return {c.name: int(found[c.id]) if c.id < len(found) else 0 for c in self.job.card.classes}

    def record(self, layers: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run record (run.json) of a detection run whose polygon layers are ``layers`` (vectors.json's outputs)."""
        job = self.job
        report: dict[str, Any] = {"geoseg_run": 1, "outputs": {"vectors": "vectors.json"}}
        report.update(job_entries(job, self.stats, len(self.stats)))
        grid = job.source.geobox.crop(job.plan.region)  # what was looked at: the boxes lie in it
        report["output_grid"] = {"width": grid.width, "height": grid.height, "transform": list(grid.transform)[:6],
                                 "crs": grid.crs}  # fmt: skip
        report["parameters"].update(conf=self.detector.conf, iou=self.detector.iou, layout=self.detector.layout)
        report["detections"] = {
            "mask": NO_MASK,
            "total": len(self.boxes),
            "classes": self.counts(),
            "seam_boxes": self.seam_boxes,
            "layers": layers,
        }
        stats = self.stats
        report["timings"] = {
            **{k: round(v, 3) for k, v in {**job.timings, **self.timings}.items()},
            **{f"{k[:-2]}_task_s": round(sum(s[k] for s in stats), 3) for k in ("read_s", "predict_s", "wait_s", "nms_s")},
        }
        report["versions"] = {**versions(), **job.info.versions}
        report["command"] = command_line()
        report["warnings"] = list(job.warnings)
        report.update(extra or {})
        return report


def detect(
    source: Any,
    model: Any,
    *,
    conf: float | None = None,
    iou: float | None = None,
    progress: Any = False,
    resources: dict[str, float] | None = None,
    **options: Any,
) -> Detections:
    """Detect objects in a raster with a detector model, tile by tile, one box per object across seams.

    Runs on the active Dask scheduler (see :func:`geoseg.scheduler`).

    Parameters
    ----------
    source : str, os.PathLike, xarray.DataArray, xarray.Dataset or RasterSource
        The raster, as for :func:`geoseg.predict` (a lazy or in-memory cube too).
    model : str, os.PathLike or ModelSpec
        A detector: an ONNX file with Deepness/GeoDeep metadata (``model_type: Detector``,
        ``det_type``) or a card with a ``detector`` (see :mod:`geoseg.models.detector`).
    conf : float, optional
        Lowest score kept (default: the card's ``conf``, Deepness's ``det_conf``).
    iou : float, optional
        IoU above which a box suppresses a lower-scored one of its class (default: the card's
        ``iou``, Deepness's ``det_iou_thresh``).
    progress : bool, callable or Progress
        Count the model's tiles as they finish (see :mod:`geoseg.engine.progress`).
    resources : dict, optional
        Dask resource annotation for the detect tasks (e.g. ``{"GPU": 1}``).
    **options
        :func:`geoseg.predict`'s planning options: ``bands``, ``band_map``, ``aoi``, ``tile``,
        ``halo`` (objects up to the halo's size are seen whole by every tile that sees them),
        ``chunk``, ``batch_size``, ``device``, ``precision``, ``num_threads``, ``card``,
        ``resample``, ``radiometry``, ``trust_model``.

    Returns
    -------
    Detections

    Raises
    ------
    InputError
        The model is not a detector, or ``conf``/``iou`` are not in (0, 1].
    """
    t0 = time.perf_counter()
    model = resolve_model(model, options.get("card"), trust=options.get("trust_model", False))
    detector = _detector(model, conf, iou)
    job = plan_job(source, model, **options)
    tasks = _graph(job, detector, resources)
    job.timings["predict_call_s"] = time.perf_counter() - t0
    plan, name = job.plan, os.path.basename(job.source.label)  # an array has no path: its label
    count = counter(progress, plan.n_tiles(), "tiles", f"detect {name}", plan.region.height * plan.region.width)
    tc = time.perf_counter()
    results = compute_tasks(tasks, count, channel=job.channel)
    tm = time.perf_counter()
    seam = Boxes.concat([Boxes.from_wire(r["seam"]) for r in results])
    boxes = Boxes.concat([*(Boxes.from_wire(r["final"]) for r in results), nms(seam, detector.iou)])
    boxes = _inside(boxes, job)
    boxes = boxes.take(rank_order(boxes))
    timings = {"compute_wall_s": tm - tc, "merge_s": time.perf_counter() - tm}
    return Detections(job, detector, boxes, len(seam), [r["stats"] for r in results], timings)


def _detector(spec: ModelSpec, conf: float | None, iou: float | None) -> Detector:
    """The card's detector with ``conf``/``iou`` given here; :class:`InputError` for a model that is not one."""
    det = spec.card.detector
    if det is None:
        raise InputError(
            f"{spec.path or spec.card.name}: not a detector (its card has no detector; ONNX metadata model_type: Detector "
            "with a det_type makes one); segmentation models take predict, without conf= or iou="
        )
    for key, value in (("conf", conf), ("iou", iou)):
        if value is not None and not 0.0 < value <= 1.0:
            raise InputError(f"{key}={value!r}: give a number in (0, 1], e.g. {key}={getattr(Detector, key)}")
    return replace(det, conf=det.conf if conf is None else float(conf), iou=det.iou if iou is None else float(iou))


def _graph(job: Job, detector: Detector, resources: dict[str, float] | None) -> list:
    """One read and one detect task per chunk (row-major), the model and the AOI one graph key each."""
    import dask

    src, spec, runtime, plan, aoi = job.source, job.spec, job.runtime, job.plan, job.aoi
    token = dask.base.tokenize(src, spec, runtime, plan, aoi, detector, len(job.card.classes))
    d_spec, reads = chunk_reads(job, token)
    with dask.annotate(resources=resources) if resources else contextlib.nullcontext():
        return [
            dask.delayed(detect_chunk)(
                reads[i, j], d_spec, runtime, plan, i, j, detector, len(job.card.classes), job.channel,
                dask_key_name=f"geoseg-detect-{token}-{i}-{j}",
            )
            for i, j in plan.iter_chunks()
        ]  # fmt: skip


def detect_chunk(
    chunk: dict[str, Any],
    spec: ModelSpec,
    runtime: Runtime,
    plan: TilePlan,
    i: int,
    j: int,
    detector: Detector,
    n_classes: int,
    channel: str | None = None,
) -> dict[str, Any]:
    """Detect in the tiles of chunk ``(i, j)`` and settle its boxes (one Dask task).

    Returns
    -------
    dict
        ``final`` (boxes no other chunk can touch, suppressed), ``seam`` (the groups that may
        continue in other chunks, whole), both as :meth:`Boxes.to_wire`, and ``stats``.
    """
    t0 = time.perf_counter()
    predictor = get_predictor(spec, runtime)
    cw = plan.chunk_window(i, j)
    inputs, valid, overflow = model_inputs(chunk["data"], chunk["window"], chunk["valid"], chunk["valid_input"], spec, cw)
    batches, n_tiles, skipped = tile_batches(plan, i, j, valid, runtime.batch_size)
    report = TileReport(channel)
    report.add(skipped)  # nothing to look at in those: done
    timings = {"forward_s": 0.0, "wait_s": 0.0, "nms_s": 0.0}
    found = []
    for batch in batches:
        found += _batch_boxes(predictor, runtime, inputs, batch, plan, detector, n_classes, timings)
        report.add(len(batch))
    tn = time.perf_counter()
    final, seam = settle(Boxes.concat(found), detector.iou, _foreign(plan, i, j))
    timings["nms_s"] += time.perf_counter() - tn
    report.flush()
    stats = {"tiles": n_tiles, "tiles_skipped": skipped, "read_s": chunk["read_s"], "overflow": overflow}
    stats.update(predict_s=timings["forward_s"], wait_s=timings["wait_s"], nms_s=timings["nms_s"])
    stats["total_s"] = time.perf_counter() - t0
    return {"final": final.to_wire(), "seam": seam.to_wire(), "stats": stats}


def _batch_boxes(
    predictor: Any,
    runtime: Runtime,
    inputs: TileInputs,
    batch: list,
    plan: TilePlan,
    detector: Detector,
    n_classes: int,
    timings: dict[str, float],
) -> list[Boxes]:
    """Each tile's boxes of one batch: decoded in raster pixels, cut to the raster, suppressed within the tile."""
    x = inputs.batch(batch)
    if runtime.scale != 1.0:  # the model's pixel size: the tiles resampled, the boxes scaled back
        x = resample_batch(x, (runtime.model_size, runtime.model_size))
    y = predictor(x, want="logits", timings=timings)
    t0 = time.perf_counter()
    out = []
    for t, yt in zip(batch, y, strict=True):
        win = t.input
        clip = _on_raster(plan, win)
        factor = (win.width / x.shape[3], win.height / x.shape[2])
        boxes = tile_boxes(yt, detector, n_classes, detector.conf, (win.col_off, win.row_off), factor, clip)
        out.append(nms(boxes, detector.iou))
    timings["nms_s"] += time.perf_counter() - t0
    return out


def _on_raster(plan: TilePlan, w: Window) -> tuple[int, int, int, int]:
    """The part of window ``w`` on the raster, as ``xmin, ymin, xmax, ymax`` in pixels."""
    return (max(w.col_off, 0), max(w.row_off, 0), min(w.col_stop, plan.raster_width), min(w.row_stop, plan.raster_height))


def _reach(plan: TilePlan, i: int, j: int) -> tuple[int, int, int, int]:
    """Where chunk ``(i, j)``'s boxes can lie: its tiles' inputs on the raster (each box is cut to its tile's)."""
    return _on_raster(plan, plan.input_window(i, j))


def _foreign(plan: TilePlan, i: int, j: int) -> list[tuple[int, int, int, int]]:
    """The reaches of the chunks whose boxes may meet chunk ``(i, j)``'s (a chunk is at least a halo wide: two rings)."""
    ny, nx = plan.shape
    return [
        _reach(plan, a, b)
        for a in range(max(0, i - 2), min(ny, i + 3))
        for b in range(max(0, j - 2), min(nx, j + 3))
        if (a, b) != (i, j)
    ]


def _inside(boxes: Boxes, job: Job) -> Boxes:
    """The boxes whose centre lies in the processed region (and, with an AOI, inside its polygons)."""
    if not len(boxes):
        return boxes
    region = job.plan.region
    c = shapely.centroid(boxes.geometry)
    x, y = shapely.get_x(c), shapely.get_y(c)
    keep = (x >= region.col_off) & (x < region.col_stop) & (y >= region.row_off) & (y < region.row_stop)
    if job.aoi is not None:
        t = job.source.geobox.transform
        wx, wy = t.c + t.a * x + t.b * y, t.f + t.d * x + t.e * y
        area = shapely.union_all(shapely.from_wkb(list(job.aoi.wkb)))
        keep &= shapely.contains_xy(area, wx, wy)
    return boxes.take(keep)
