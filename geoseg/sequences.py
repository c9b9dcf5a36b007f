"""Several images through the engine: a folder of frames, a video, a multi-page TIFF stack.

Each frame is an ordinary engine run on a path (:func:`geoseg.io.frames.list_frames` makes
the paths; a video frame is decoded inside its read task), written to ``OUT/<frame>/`` like
a single image: ``mask.tif`` and ``mask.png`` (small frames), ``run.json`` and, with
``vectorize``, the polygon layers and a per-frame ``coco.json``. Then ``OUT/coco.json``
gathers every frame's instances in one COCO document, with a ``track_id`` per object across
consecutive frames, and ``OUT/frames.json`` lists the frames with their class pixel counts.

A frame whose ``run.json`` records the same input and model is not computed again, so an
interrupted sequence resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from geoseg.errors import InputError, OutputExistsError
from geoseg.io.files import file_fingerprint
from geoseg.io.frames import Frame, list_frames
from geoseg.io.outdir import existing_outputs, write_json_atomic
from geoseg.models.spec import resolve_model
from geoseg.pipeline import segment
from geoseg.vector import vectorize as run_vectorize
from geoseg.vector.coco import coco_document, track_instances, write_coco

__all__ = ["predict_frames"]

FRAMES_REPORT = "frames.json"


def _done(frame_dir: str, frame: Frame, model_id: str) -> dict[str, Any] | None:
    """The frame's run.json when it already holds this input's result with this model."""
    try:
        with open(os.path.join(frame_dir, "run.json")) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    same_input = report.get("input", {}).get("path") == frame.path
    same_model = report.get("model", {}).get("id") == model_id
    return report if same_input and same_model and os.path.exists(os.path.join(frame_dir, "mask.tif")) else None


def _check_previous(out_dir: str, src: str, overwrite: bool) -> None:
    """Refuse a folder that holds another input's frames (unless ``overwrite``)."""
    if not existing_outputs(out_dir, [FRAMES_REPORT]) or overwrite:
        return
    try:
        with open(os.path.join(out_dir, FRAMES_REPORT)) as f:
            previous = json.load(f).get("input")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous != src:
        raise OutputExistsError(f"{out_dir}: holds the frames of {previous}; pass overwrite=True or choose another out_dir=")


def _frame(
    frame: Frame, spec: Any, frame_dir: str, vectorize: bool, overwrite: bool, progress: bool, predict_kwargs: dict[str, Any]
) -> tuple[dict[str, Any], Any]:
    """One frame through the pipeline (or its earlier outputs reused): its row for ``frames.json`` and its vector report."""
    report = None if overwrite else _done(frame_dir, frame, spec.id)
    vrep, reused = None, report is not None
    vector = {"formats": ("geojson", "coco")} if vectorize else None
    if report is None:
        done = segment(frame.path, spec, frame_dir, vectorize=vector, overwrite=True, progress=progress, **predict_kwargs)
        report, vrep = done.run, done.vectors
    elif vectorize:  # a frame done earlier: its layers are made again from its mask
        vrep = run_vectorize(os.path.join(frame_dir, "mask.tif"), frame_dir, overwrite=True, **vector)
    row = {
        "frame": frame.index,
        "name": frame.name,
        "path": frame.path,
        "mask": os.path.join(frame.name, report["outputs"]["mask"]),
        "pixels": report.get("pixels", {}),
        "reused": int(reused),
    }
    return row, vrep


class _SequenceCoco:
    """The sequence's COCO document, gathered frame by frame (instances tracked across frames)."""

    def __init__(self) -> None:
        self.images: list[dict[str, Any]] = []
        self.anns: list[list[dict[str, Any]]] = []
        self.categories: dict[int, str] = {}

    def add(self, frame: Frame, doc: dict[str, Any]) -> None:
        self.categories.update({c["id"]: c["name"] for c in doc["categories"]})
        self.images.append({**doc["images"][0], "file_name": frame.name, "frame_index": frame.index})
        self.anns.append([{k: v for k, v in a.items() if k not in ("id", "image_id")} for a in doc["annotations"]])

    def write(self, path: str, track: bool, description: str) -> dict[str, Any]:
        """Write ``coco.json``; return the entries of ``frames.json`` that describe it."""
        tracks = track_instances(self.anns) if track else None
        write_coco(path, coco_document(self.images, sorted(self.categories.items()), self.anns, description=description))
        return {"coco": os.path.basename(path), "objects": sum(len(a) for a in self.anns), "tracks": tracks}


def predict_frames(
    src: str | os.PathLike,
    model: Any,
    out_dir: str | os.PathLike,
    *,
    vectorize: bool = False,
    track: bool = True,
    overwrite: bool = False,
    progress: bool = False,
    on_frame: Callable[[Frame, dict[str, Any]], None] | None = None,
    **predict_kwargs: Any,
) -> dict[str, Any]:
    """Segment every frame of a multi-image input, one engine run per frame.

    Runs on the active Dask scheduler (see :func:`geoseg.scheduler`); each worker loads the
    model once and keeps it for every frame.

    Parameters
    ----------
    src : str or os.PathLike
        A folder of images, a video (imageio/PyAV), or a multi-page TIFF stack.
    model : str or torch.nn.Module
        As for :func:`geoseg.predict`.
    out_dir : str or os.PathLike
        Output folder: ``<frame>/`` per frame, ``frames.json`` and, with ``vectorize``, ``coco.json``.
    vectorize : bool
        Also write each frame's polygon layers and COCO instances, and the sequence's COCO file.
    track : bool
        Give objects a ``track_id`` across consecutive frames (mask IoU matching).
    overwrite : bool
        Recompute frames that are done and replace their outputs.
    progress : bool
        Progress bars.
    on_frame : callable, optional
        Called with each frame and its run report (e.g. to print progress).
    **predict_kwargs
        Passed to :func:`geoseg.predict` (``tile``, ``halo``, ``bands``, ``device``, ...).

    Returns
    -------
    dict
        The report also written to ``frames.json``.

    Raises
    ------
    InputError
        ``src`` is a single image (use :func:`geoseg.predict`).
    OutputExistsError
        ``frames.json`` exists from another input and ``overwrite`` is False.
    """
    t0 = time.perf_counter()
    src = os.path.abspath(os.fspath(src))
    out_dir = os.path.abspath(os.fspath(out_dir))
    frames = list_frames(src)
    if not frames:
        raise InputError(f"{src}: a single image, not a folder, video or multi-page TIFF; run geoseg predict on it")
    _check_previous(out_dir, src, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    rows: list[dict[str, Any]] = []
    coco = _SequenceCoco() if vectorize else None
    # resolved once: the file is hashed once, and frames already done need no graph at all
    spec = resolve_model(model, predict_kwargs.pop("card", None), trust=predict_kwargs.get("trust_model", False))
    if spec.card.detector is not None:
        raise InputError(
            f"{spec.path or spec.card.name}: a detector over a sequence of frames is not supported (its boxes have no "
            "mask to track); run geoseg predict on each image"
        )
    reused = 0
    for frame in frames:
        tf = time.perf_counter()
        row, vrep = _frame(frame, spec, os.path.join(out_dir, frame.name), vectorize, overwrite, progress, predict_kwargs)
        reused += row.pop("reused")
        if coco is not None and vrep is not None:
            row["objects"] = {ly["name"]: ly["features"] for ly in vrep["layers"]}
            coco.add(frame, vrep.coco_document())
        row["seconds"] = round(time.perf_counter() - tf, 3)
        rows.append(row)
        if on_frame is not None:
            on_frame(frame, row)
    out: dict[str, Any] = {
        "geoseg_frames": 1,
        "input": src,
        "fingerprint": file_fingerprint(src) if os.path.isfile(src) else None,
        "model": spec.id,
        "frames": rows,
        "reused_frames": reused,
    }
    if coco is not None:
        out.update(coco.write(os.path.join(out_dir, "coco.json"), track, description=f"geoseg predictions for {src}"))
    out["seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(os.path.join(out_dir, FRAMES_REPORT), out, indent=2)
    return out
