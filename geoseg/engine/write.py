"""Write a lazy prediction: per-chunk parts in parallel, then COGs and run.json, atomically.

Workers write their own chunks to a staging folder inside the output folder
(:mod:`geoseg.engine.parts`); the client then streams the parts into COGs (GDAL reads them
block by block), writes the report (:mod:`geoseg.engine.report`) and moves the finished
files into place. Nothing in the output folder is ever half-written: a failed run leaves
at most the hidden staging folder, which the next run replaces. Just over 400 lines, a third
of them :func:`write`'s public docstring.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from geoseg.classes import NODATA
from geoseg.engine.graph import Prediction
from geoseg.engine.job import Job, job_from
from geoseg.engine.parts import Staging, finished_part, write_mask_part, write_prob_part
from geoseg.engine.progress import Callback, Counter, Progress, compute_tasks, counter
from geoseg.engine.report import RunReport, check_nonfinite, class_entry, no_job_message, run_report
from geoseg.errors import DiskFullError, GeosegError, InputError, OutputError, OutputExistsError
from geoseg.grid import GeoBox, Window, chunk_windows
from geoseg.io.cog import Part, assemble_cog
from geoseg.io.mask import CLASSES_TAG, OBJECTS_TAG, PNG_MAX_PIXELS, write_mask_png
from geoseg.io.outdir import check_is_folder, disk_full_error, disk_full_reason, existing_outputs, output_lock, write_json_atomic
from geoseg.io.styles import mask_colormap, publish_mask_sidecars, write_mask_sidecars
from geoseg.models.loading import trim_heap

log = logging.getLogger(__name__)

__all__ = ["check_output_dir", "write"]

MASK_NAME = "mask.tif"
PROB_NAME = "probabilities.tif"
RUN_NAME = "run.json"


def check_output_dir(out_dir: str, overwrite: bool, names: tuple[str, ...] = (MASK_NAME, PROB_NAME, RUN_NAME)) -> None:
    """Fail before any work when outputs exist (without ``overwrite``) or the folder is unusable."""
    check_is_folder(out_dir)
    existing = existing_outputs(out_dir, names)
    if existing and not overwrite:
        raise OutputExistsError(
            f"{out_dir}: {', '.join(existing)} already exist; pass overwrite=True to replace them or choose another out_dir="
        )
    parent = out_dir if os.path.isdir(out_dir) else os.path.dirname(os.path.abspath(out_dir))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.access(parent, os.W_OK):
        raise OutputError(f"{out_dir}: not writable; choose a folder you can write to")
    # os.access says yes to root even on read-only filesystems and /sys: try it
    try:
        os.makedirs(out_dir, exist_ok=True)
        import tempfile

        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot write here ({exc.strerror}); choose a folder you can write to") from None


def write(
    result: Any,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    probabilities_dtype: str = "uint8",
    progress: bool | Callback | Progress = False,
    extra: dict[str, Any] | None = None,
    classes: list | None = None,
    mask_name: str = MASK_NAME,
) -> RunReport:
    """Write a prediction from :func:`geoseg.predict` to ``out_dir``.

    Writes ``mask.tif`` (COG, uint8 class ids, colour table, nodata 255), with a Dataset
    also ``probabilities.tif`` (one band per class; uint8 0-255 with an internal nodata
    mask, or float32 with NaN nodata), and ``run.json``. Chunks are computed and written
    by the Dask workers in parallel; the active Dask client is used if there is one.

    Parameters
    ----------
    result : xarray.DataArray or xarray.Dataset
        What :func:`geoseg.predict` returned.
    out_dir : str or os.PathLike
        Output folder (created if needed).
    overwrite : bool
        Replace existing outputs; otherwise an existing output is an error.
    probabilities_dtype : {"uint8", "float32"}
        Encoding of ``probabilities.tif``.
    progress : bool, callable or Progress
        Count the model's tiles as they finish, with MP/s and an ETA: True for a bar on a
        terminal (plain lines in logs), or a callable receiving ``(done, total, unit)``
        (see :mod:`geoseg.engine.progress`). An array without predict's job counts chunks.
    extra : dict, optional
        More entries for ``run.json`` (e.g. the scheduler used).
    classes : list of ClassInfo, optional
        Class table for a uint8 array that did not come from :func:`geoseg.predict` (e.g. a
        change map): colour table and ``GEOSEG_CLASSES`` metadata. Such an array has no
        input or model, and its run.json says none; without ``classes`` only predict's
        result, as returned, can be written.
    mask_name : str
        File name of the class raster (default ``mask.tif``).

    Returns
    -------
    RunReport
        The run report: reads like ``run.json`` (its record), with the folder and files written.

    Raises
    ------
    OutputExistsError
        Outputs exist and ``overwrite`` is False.
    InputError
        ``result`` carries no job from :func:`geoseg.predict` (it is not predict's result,
        or an xarray operation made new data from it) and no ``classes`` were given: run.json
        could not name its input and model. Or every pixel is nodata: nothing is written. Or more than
        :data:`~geoseg.engine.report.MAX_NONFINITE_FRACTION` of the valid pixels do not fit float32 once the
        card's scaling is applied.
    ModelError
        The model returned NaN or Inf for more than :data:`~geoseg.engine.report.MAX_NONFINITE_FRACTION` of the
        valid pixels (fewer are nodata in the mask, counted in run.json's ``nonfinite`` and
        ``warnings``).

    Notes
    -----
    A run that finds the staging folder of a killed run of the same job reuses its chunk
    parts after reading each one whole (an empty or torn part is redone); their chunk
    statistics travel in the parts, so run.json counts every tile of the job.
    """
    t0 = time.perf_counter()
    target = _target(result, out_dir, probabilities_dtype, classes, mask_name)
    check_output_dir(target.out_dir, overwrite, target.names)
    stage = Staging(target.out_dir)
    with output_lock(target.out_dir), _cleanup(stage):  # one writer per folder: a second run is refused
        check_output_dir(target.out_dir, overwrite, target.names)  # again, now that no other run can be writing here
        stage.adopt(target.token)  # a killed run of this very job left finished chunk parts: reuse them (resume)
        if overwrite and os.path.exists(os.path.join(target.out_dir, RUN_NAME)):
            # run.json describes the outputs beside it: never leave an old one next to new files
            os.remove(os.path.join(target.out_dir, RUN_NAME))
        stage.make(("mask", *(("probabilities",) if target.prob_blocks is not None else ())))
        tc = time.perf_counter()
        mask_res, prob_parts = _compute_parts(target, stage, _resumed(target, stage), progress)
        compute_s = time.perf_counter() - tc
        counts, lost = _check_results(target, mask_res)
        trim_heap()  # the tiles' freed memory, kept for reuse, is not needed by the assembly
        ta = time.perf_counter()
        outputs = _assemble(target, stage, mask_res, prob_parts)
        seconds = {"compute_s": compute_s, "assemble_s": time.perf_counter() - ta}
        report = run_report(
            target.job, target.geobox, counts, mask_res, seconds, outputs, probabilities_dtype, extra, target.table, lost
        )
        _publish(target, stage, overwrite)
        report["timings"]["total_s"] = round(report["timings"].get("predict_call_s", 0.0) + time.perf_counter() - t0, 3)
        write_json_atomic(os.path.join(target.out_dir, RUN_NAME), report, indent=2)
        for w in report["warnings"]:  # each once, here (run.json keeps them too)
            log.warning(w)
        return RunReport(report, target.out_dir)


@dataclass
class _Target:
    """What :func:`write` writes, and where: checked before anything is touched."""

    out_dir: str
    job: Job | None
    table: list
    prob_dtype: str
    mask_name: str
    geobox: GeoBox
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    name: str  # the Dask name of the mask's data
    mask_blocks: Any  # [i, j] -> the Delayed mask block of chunk (i, j)
    prob_blocks: Any  # [i, j] -> the Delayed (class, y, x) probabilities of chunk (i, j); None without
    class_names: list[str]  # of the probability bands

    @property
    def plain(self) -> bool:
        """A plain image (no CRS) small enough for a PNG copy of its mask."""
        return self.geobox.crs is None and self.geobox.width * self.geobox.height <= PNG_MAX_PIXELS

    @property
    def from_job(self) -> bool:
        """The mask is the job's own chunks (their statistics tasks and tile reports apply)."""
        return self.job is not None and self.chunks == self.job.plan.chunks

    @cached_property
    def token(self) -> str:
        """Names the staging folder: a run of the same job finds a killed run's parts."""
        import dask

        return dask.base.tokenize(self.name, self.prob_dtype, self.mask_name)[:16]

    @cached_property
    def cells(self) -> list[tuple[int, int, Window]]:
        """Every chunk of the mask, row-major, with its window."""
        return [(i, j, win) for i, row in enumerate(chunk_windows(self.chunks)) for j, win in enumerate(row)]

    @property
    def png_name(self) -> str:
        return os.path.splitext(self.mask_name)[0] + ".png"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.mask_name, PROB_NAME, RUN_NAME, *((self.png_name,) if self.plain else ()))


def _target(result: Any, out_dir: str | os.PathLike, prob_dtype: str, classes: list | None, mask_name: str) -> _Target:
    if prob_dtype not in ("uint8", "float32"):
        raise InputError(f"probabilities dtype must be uint8 or float32, got {prob_dtype!r}")
    out_dir = os.path.abspath(os.fspath(out_dir))  # workers may run in another folder
    if isinstance(result, Prediction):  # geoseg.segment's: no xarray (nor dask.array) on the way
        job = result.job
        table = list(job.card.classes)
        probs = result.blocks("probs") if result.probabilities else None
        return _Target(
            out_dir, job, table, prob_dtype, mask_name, _output_grid(result.geobox), result.chunks, result.name,
            result.blocks("mask"), probs, result.class_names,
        )  # fmt: skip
    is_ds = hasattr(result, "data_vars")
    mask = result["mask"] if is_ds else result
    job = job_from(result)  # the provenance predict left on the mask (source, model, parameters)
    if job is None and classes is None:
        raise InputError(no_job_message(mask))
    probs = result["probabilities"] if is_ds and "probabilities" in result else None
    table = list(job.card.classes) if job and job.card.classes else list(classes or [])
    crs = mask.rio.crs
    geobox = GeoBox(int(mask.sizes["x"]), int(mask.sizes["y"]), mask.rio.transform(), crs.to_string() if crs else None)
    return _Target(
        out_dir, job, table, prob_dtype, mask_name, geobox, mask.data.chunks, mask.data.name,
        mask.data.to_delayed(optimize_graph=False),  # keep keys shared with the stats tasks
        probs.data.to_delayed(optimize_graph=False)[0] if probs is not None else None,
        [str(c) for c in probs["class"].values] if probs is not None else [],
    )  # fmt: skip


def _output_grid(geobox: GeoBox) -> GeoBox:
    """``geobox`` with its CRS spelled as rasterio spells it (as :func:`write` reads it back from an xarray result)."""
    if geobox.crs is None:
        return geobox
    from rasterio.crs import CRS

    return GeoBox(geobox.width, geobox.height, geobox.transform, CRS.from_user_input(geobox.crs).to_string())


@contextmanager
def _cleanup(stage: Staging) -> Iterator[None]:
    """Errors of the block in the user's words, and the staging folder removed unless its parts can be reused.

    A full disk names the folder the user chose (not a staging file that is removed now);
    bad input or output makes the parts useless; an interruption (Ctrl-C, a lost worker)
    keeps them for the next run of this job.
    """
    keep = False
    try:
        yield
    except DiskFullError as exc:
        raise disk_full_error(stage.out_dir, exc.reason or disk_full_reason(exc) or "No space left on device") from exc
    except GeosegError:
        raise  # bad input or output: the parts are of no use
    except OSError as exc:
        reason = disk_full_reason(exc)
        if reason is None:
            keep = True  # e.g. a lost worker: the next run of this job reuses the finished parts
            raise
        raise disk_full_error(stage.out_dir, reason) from exc
    except BaseException:
        keep = True  # interrupted (Ctrl-C, a lost worker): the next run of this job reuses the finished parts
        raise
    finally:
        if stage.folder and not keep:
            shutil.rmtree(stage.folder, ignore_errors=True)


def _resumed(target: _Target, stage: Staging) -> dict[tuple[int, int], dict]:
    """The parts an adopted folder holds that read back whole (checked on the workers); the rest are redone."""
    import dask

    if not stage.adopted:
        return {}
    probs = target.prob_blocks is not None
    found = [
        (i, j, win)
        for i, j, win in target.cells
        if os.path.exists(stage.part("mask", i, j)) and (not probs or os.path.exists(stage.part("probabilities", i, j)))
    ]
    checks = [
        dask.delayed(finished_part, pure=False)(
            stage.part("mask", i, j), win, stage.part("probabilities", i, j) if probs else None,
            len(target.class_names), target.prob_dtype,
        )
        for i, j, win in found
    ]  # fmt: skip
    got = compute_tasks(checks) if checks else []
    return {(i, j): part for (i, j, _), part in zip(found, got, strict=True) if part is not None}


def _compute_parts(target: _Target, stage: Staging, reused: dict, progress: Any) -> tuple[list[dict], list[Part]]:
    """Write every chunk part not reused (on the workers); each chunk's mask result and the probability parts."""
    import dask

    blocks, pblocks, job, cells = target.mask_blocks, target.prob_blocks, target.job, target.cells
    stats = job.stats if target.from_job else None
    todo = [(n, i, j, win) for n, (i, j, win) in enumerate(cells) if (i, j) not in reused]
    tasks = [
        dask.delayed(write_mask_part, pure=True)(
            blocks[i, j], stage.part("mask", i, j), target.geobox, win, stats[n] if stats is not None else None
        )
        for n, i, j, win in todo
    ]
    if pblocks is not None:
        tasks += [
            dask.delayed(write_prob_part, pure=True)(
                pblocks[i, j], stage.part("probabilities", i, j), target.geobox, win, target.prob_dtype
            )
            for _, i, j, win in todo
        ]
    count, how = _counting(target, [(i, j, win) for _, i, j, win in todo], len(tasks), progress)
    results = compute_tasks(tasks, count, **how)
    new_mask, new_prob = iter(results[: len(todo)]), iter(results[len(todo) :])
    mask_res = [reused[i, j] if (i, j) in reused else next(new_mask) for i, j, _ in cells]
    if pblocks is None:
        return mask_res, []
    prob_parts = [
        Part(stage.part("probabilities", i, j), win) if (i, j) in reused else next(new_prob)["part"] for i, j, win in cells
    ]
    return mask_res, prob_parts


def _counting(target: _Target, todo: list, n_tasks: int, progress: Any) -> tuple[Counter | None, dict[str, Any]]:
    """What ``progress`` counts: the model's tiles of the chunks to do (the chunk tasks report them), else chunks."""
    job, px = target.job, sum(win.height * win.width for _, _, win in todo)
    if job is not None and job.channel and target.from_job:
        tiles = sum(len(job.plan.tiles(i, j)) for i, j, _ in todo)
        return counter(progress, tiles, "tiles", f"predict {os.path.basename(job.source.label)}", px), {"channel": job.channel}
    weights = [1] * len(todo) + [0] * (n_tasks - len(todo))  # mask parts; probability parts go with them
    return counter(progress, len(todo), "chunks", f"write {target.mask_name}", px), {"weights": weights}


def _check_results(target: _Target, mask_res: list[dict]) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Pixels per class value of the whole mask, and those lost to NaN/Inf or overflow; an error when nothing is valid."""
    counts = np.sum([r["counts"] for r in mask_res], axis=0)
    valid_px = int(counts[:NODATA].sum())
    lost = check_nonfinite(target.job, mask_res, valid_px)
    if valid_px == 0:
        raise InputError(
            f"{target.job.source.label if target.job else 'input'}: every pixel is nodata (or outside the AOI) in the "
            "processed window; check the nodata value, the band choice and the AOI"
        )
    return counts, lost


def _assemble(target: _Target, stage: Staging, mask_res: list[dict], prob_parts: list[Part]) -> dict[str, str]:
    """The staged COG(s) (and a plain image's PNG) from the parts; the outputs for run.json."""
    try:
        final_mask, colormap = stage.file(target.mask_name), mask_colormap(target.table)  # background, nodata transparent
        parts = [r["part"] for r in mask_res]
        assemble_cog(parts, final_mask, target.geobox, dtype="uint8", nodata=NODATA, colormap=colormap, metadata=_tags(target))
        outputs = {"mask": target.mask_name}
        outputs.update(write_mask_sidecars(final_mask, target.table))  # mask.qml, mask.tif.aux.xml: class names
        if target.plain:  # a plain image's mask also as an indexed PNG of the same size (class ids, class colours)
            write_mask_png(final_mask, stage.file(target.png_name), {c.id: tuple(c.color) for c in target.table})
            outputs["mask_png"] = target.png_name
        if target.prob_blocks is not None:
            names = target.class_names
            assemble_cog(
                prob_parts,
                stage.file(PROB_NAME),
                target.geobox,
                dtype=target.prob_dtype,
                count=len(names),
                nodata=None if target.prob_dtype == "uint8" else float("nan"),
                descriptions=names,
                mask=target.prob_dtype == "uint8",
                overview_resampling="average",
                scale=1 / 255 if target.prob_dtype == "uint8" else None,  # value x scale = probability
            )
            outputs["probabilities"] = PROB_NAME
    except OutputError as exc:
        if not stage.adopted or isinstance(exc, DiskFullError):
            raise
        # parts a killed run left could not be assembled: say where they are (the folder is removed now)
        raise OutputError(
            f"{target.out_dir}: the chunk parts resumed from the hidden folder {os.path.basename(stage.folder)} could not be "
            f"assembled ({exc}); it is removed now: run again (with overwrite=True) to redo every chunk"
        ) from exc
    return outputs


def _tags(target: _Target) -> dict[str, str] | None:
    """The mask's metadata: its class table, and the model's object rules for an objects model."""
    if not target.table:
        return None
    tags = {CLASSES_TAG: json.dumps([class_entry(c) for c in target.table])}
    card = target.job.card if target.job else None
    rules = {k: getattr(card, k) for k in ("min_area_m2", "max_length_m") if card and getattr(card, k) is not None}
    if card is None or card.task != "objects":
        rules = {}
    if card is not None and card.mmu:
        rules["mmu_px"] = card.mmu  # the area classes' minimum mapping unit
    if rules:  # the model's object rules travel with its mask
        tags[OBJECTS_TAG] = json.dumps(rules)
    return tags


def _publish(target: _Target, stage: Staging, overwrite: bool) -> None:
    """Move the finished files into place (same filesystem: atomic renames); run.json comes after."""
    out_dir = target.out_dir
    os.replace(stage.file(target.mask_name), os.path.join(out_dir, target.mask_name))
    publish_mask_sidecars(stage.file(target.mask_name), out_dir)  # beside the mask; stale ones removed
    if target.plain:
        os.replace(stage.file(target.png_name), os.path.join(out_dir, target.png_name))
    if target.prob_blocks is not None:
        os.replace(stage.file(PROB_NAME), os.path.join(out_dir, PROB_NAME))
    elif overwrite and os.path.exists(os.path.join(out_dir, PROB_NAME)):
        os.remove(os.path.join(out_dir, PROB_NAME))  # a stale file from an earlier run would mislead
