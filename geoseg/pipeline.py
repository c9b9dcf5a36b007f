"""One pipeline for every command: predict → write (→ vectorize), returning a typed report.

``geoseg predict``, ``geoseg run`` (each scene × model unit), the frames of a sequence and the
two dates of ``geoseg change`` all segment an image the same way, through :func:`segment`::

    src ─ engine.predict (lazy mask, its Job in attrs) ─ engine.write (mask.tif, run.json)
        └─ [vector.vectorize (layers, vectors.json, project.qgz)] ─▶ Segmented

A detector model (its card has a ``detector``) takes the same road to boxes instead of a mask::

    src ─ engine.detect (the same plan and reads; boxes, NMS across tiles and chunks)
        ─ vector.detections.write_detections (layers, vectors.json, project.qgz, run.json) ─ item.json ─▶ Segmented

Callers read what was made from the returned :class:`Segmented` (the run record, the vector
report with each layer's area, the list of files written), not from the files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from geoseg.engine.progress import Progress
from geoseg.engine.report import RunReport
from geoseg.errors import InputError
from geoseg.vector.report import VectorReport

__all__ = ["Segmented", "segment"]


@dataclass(frozen=True)
class Segmented:
    """What :func:`segment` made in one folder.

    Attributes
    ----------
    folder : str
        The output folder (absolute).
    run : RunReport
        What :func:`geoseg.write` made (its record is ``run.json``: input, model, grid, tiles,
        timings, warnings, outputs).
    vectors : VectorReport or None
        The polygon layers, when they were asked for.
    item : str or None
        The STAC Item describing the folder (``item.json``, a detector's too; None for an image without a CRS).
    """

    folder: str
    run: RunReport
    vectors: VectorReport | None = None
    item: str | None = None

    @property
    def mask(self) -> str | None:
        """Path of the class mask (``mask.tif``); None for a detector, which writes layers only."""
        return self.run.mask

    def files(self) -> list[str]:
        """Every file written, relative to :attr:`folder`."""
        files = self.run.files() + (self.vectors.files() if self.vectors is not None else [])
        files += [os.path.basename(self.item)] if self.item else []
        return list(dict.fromkeys(files))

    def classes(self) -> dict[str, dict[str, Any]]:
        """Layer name -> ``{"objects": n, "area_ha": hectares}`` (empty without vectors)."""
        return self.vectors.classes() if self.vectors is not None else {}


def segment(
    src: Any,
    model: Any,
    out_dir: str | os.PathLike,
    *,
    vectorize: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool | Callable[[int, int, str], None] | Progress = False,
    probabilities_dtype: str = "uint8",
    extra: dict[str, Any] | None = None,
    date: str | None = None,
    derived_from: Sequence[str] = (),
    **predict_kwargs: Any,
) -> Segmented:
    """Segment one image into ``out_dir``: the mask and its run record, and polygons on request.

    Runs on the active Dask scheduler (see :func:`geoseg.scheduler`).

    Parameters
    ----------
    src : str, os.PathLike, xarray.DataArray, xarray.Dataset or RasterSource
        The image, as for :func:`geoseg.predict` (a lazy or in-memory cube too).
    model : str, ModelSpec or torch.nn.Module
        The model, as for :func:`geoseg.predict`.
    out_dir : str or os.PathLike
        Output folder.
    vectorize : mapping, optional
        Keyword arguments of :func:`geoseg.vector.vectorize` (``formats``, ``min_area``, ...);
        an empty mapping vectorises with its defaults, None writes no polygons.
    overwrite : bool
        Replace existing outputs.
    progress : bool, callable or Progress
        Count the model's tiles (then the chunk windows polygonized), with MP/s and an ETA:
        True for a bar on a terminal (plain lines in logs), or a callable receiving
        ``(done, total, unit)`` (see :mod:`geoseg.engine.progress`).
    probabilities_dtype : {"uint8", "float32"}
        Encoding of ``probabilities.tif`` (with ``probabilities=True``).
    extra : dict, optional
        More entries for ``run.json`` (e.g. the scheduler used).
    date : str, optional
        The input's acquisition date (``YYYY-MM-DD``) for ``item.json``; default: from the raster's
        metadata or file name, else the item says it carries the run's time.
    derived_from : sequence of str
        The STAC items the input was made from (their URLs or paths), linked from ``item.json``
        as ``derived_from`` (a workflow passes its scene's items).
    **predict_kwargs
        Passed to :func:`geoseg.predict` (``tile``, ``aoi``, ``bands``, ``device``, ``threshold``, ...);
        for a detector to :func:`geoseg.engine.detect.detect` (``conf``, ``iou`` and the planning options).

    Returns
    -------
    Segmented
        What was written (for a detector: its polygon layers and run.json, no mask).
    """
    from geoseg.engine import write
    from geoseg.engine.graph import prediction
    from geoseg.models.spec import resolve_model

    out_dir = os.fspath(out_dir)  # paths in the records stay as the caller gave them
    model = resolve_model(model, predict_kwargs.get("card"), trust=predict_kwargs.get("trust_model", False))
    conf, iou = predict_kwargs.pop("conf", None), predict_kwargs.pop("iou", None)
    if model.card.detector is not None:
        run, vectors, job = _detect(src, model, out_dir, vectorize, overwrite, progress, extra, conf, iou, predict_kwargs)
    elif conf is not None or iou is not None:
        raise InputError(f"{model.path or model.card.name}: conf= and iou= are a detector's; this is a segmentation model")
    else:
        result = prediction(src, model, **predict_kwargs)  # written as it is: no xarray imported on the way
        job = result.job
        run = write(result, out_dir, overwrite=overwrite, probabilities_dtype=probabilities_dtype, progress=progress, extra=extra)
        vectors = None
        if vectorize is not None:
            from geoseg.vector import vectorize as run_vectorize

            mask = os.path.join(out_dir, run["outputs"]["mask"])  # as the caller gave the folder
            vectors = run_vectorize(mask, out_dir, overwrite=overwrite, progress=progress, **vectorize)
    item = _item(out_dir, run, vectors, job, date, derived_from)  # the input's date and the STAC items it came from
    return Segmented(os.path.abspath(out_dir), run, vectors, item)


def _item(
    out_dir: str, run: RunReport, vectors: VectorReport | None, job: Any, date: str | None, derived_from: Sequence[str]
) -> str | None:
    """The folder's STAC Item (the input's date, the model's card), written last; None without a CRS."""
    from geoseg.io.remote import remote_name
    from geoseg.vector.stac import write_item

    if not run["output_grid"].get("crs"):
        return None
    path = getattr(job.source, "path", None)  # an xarray input has none: the item takes the run's time
    when = date or getattr(job.source, "date", None)  # read with the raster's header when it was opened
    stem = os.path.splitext(remote_name(path))[0] if path else "array"
    return write_item(out_dir, run, vectors, job.card.classes, job.spec, f"{stem}-{job.card.name}", when, derived_from)


def _detect(
    src: Any,
    model: Any,
    out_dir: str,
    vectorize: Mapping[str, Any] | None,
    overwrite: bool,
    progress: Any,
    extra: dict[str, Any] | None,
    conf: float | None,
    iou: float | None,
    options: dict[str, Any],
) -> tuple[RunReport, VectorReport | None, Any]:
    """A detector's run: boxes (engine.detect) written as layers with run.json (vector.detections).

    Returns the run record, the layers' record and the job.
    """
    from geoseg.engine.detect import detect
    from geoseg.vector.detections import write_detections

    if options.pop("probabilities", False):
        name = model.path or model.card.name
        raise InputError(f"{name}: a detector gives boxes, not per-class probabilities; drop probabilities=")
    options.pop("blend", None)  # boxes are merged by suppression, never blended
    layer_options = {k: v for k, v in (vectorize or {}).items() if k in ("formats", "crs", "precision", "project")}
    found = detect(src, model, conf=conf, iou=iou, progress=progress, **options)
    run, vectors = write_detections(found, out_dir, overwrite=overwrite, extra=extra, **layer_options)
    return run, vectors, found.job
