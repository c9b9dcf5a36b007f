"""Write a lazy prediction: per-chunk parts in parallel, then COGs and run.json, atomically.

Workers write their own chunks to a staging folder inside the output folder; the client
then streams the parts into COGs (GDAL reads them block by block) and moves the finished
files into place. Nothing in the output folder is ever half-written: a failed run leaves
at most the hidden staging folder, which the next run replaces.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from contextlib import ExitStack
from typing import Any

import numpy as np

from geoseg.classes import NODATA
from geoseg.engine.graph import JOB_ATTR, job_from
from geoseg.errors import DiskFullError, GeosegError, InputError, ModelError, OutputError, OutputExistsError
from geoseg.grid import GeoBox, Window, chunk_windows
from geoseg.io.cog import Part, assemble_cog, read_part, write_part
from geoseg.io.mask import CLASSES_TAG, OBJECTS_TAG, PNG_MAX_PIXELS, write_mask_png
from geoseg.io.outdir import (
    adopt_staging,
    check_is_folder,
    disk_full_reason,
    existing_outputs,
    make_staging,
    output_lock,
    sweep_staging,
    write_json_atomic,
)
from geoseg.io.styles import mask_colormap, publish_mask_sidecars, write_mask_sidecars

log = logging.getLogger(__name__)

__all__ = ["check_output_dir", "write"]

MASK_NAME = "mask.tif"
PROB_NAME = "probabilities.tif"
RUN_NAME = "run.json"
#: Largest share of valid pixels that may be lost to NaN/Inf model outputs (or to values that
#: overflow float32 after scaling) before the run is an error; below it, a warning in run.json.
MAX_NONFINITE_FRACTION = 0.01
#: Tag in each staged mask part holding its chunk's statistics (tiles, NaN counts), for resumes.
STATS_TAG = "GEOSEG_CHUNK_STATS"
_STATS_KEYS = ("tiles", "tiles_skipped", "nonfinite", "overflow")


def check_output_dir(out_dir: str, overwrite: bool, names: tuple[str, ...] = (MASK_NAME, PROB_NAME, RUN_NAME)) -> None:
    """Fail before any work when outputs exist (without ``overwrite``) or the folder is unusable."""
    check_is_folder(out_dir)
    existing = existing_outputs(out_dir, names)
    if existing and not overwrite:
        raise OutputExistsError(
            f"{out_dir}: {', '.join(existing)} already exist; pass --overwrite to replace them or choose another --out"
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


def _geobox_of(da) -> GeoBox:
    crs = da.rio.crs
    return GeoBox(int(da.sizes["x"]), int(da.sizes["y"]), da.rio.transform(), crs.to_string() if crs else None)


def _write_mask_part(block: np.ndarray, path: str, geobox: GeoBox, window: Window, stats: dict | None) -> dict:
    t0 = time.perf_counter()
    tags = {STATS_TAG: json.dumps({k: stats[k] for k in _STATS_KEYS if k in stats})} if stats else None
    part = write_part(path, block, geobox, window, nodata=NODATA, tags=tags)
    counts = np.bincount(block.ravel(), minlength=256)
    return {"part": part, "counts": counts, "stats": stats, "write_s": time.perf_counter() - t0}


def _finished_part(path: str, window: Window, prob_path: str | None, n_probs: int, prob_dtype: str) -> dict | None:
    """A part a killed run of the same job finished, checked block by block; None when it must be redone.

    Its class counts and chunk statistics (tiles, NaN counts: a tag in the part) are read
    back, so run.json describes the whole job after a resume. A part (or its probabilities
    part) that is empty, truncated or of the wrong shape is removed and redone.
    """
    got = read_part(path, window, 1, "uint8")
    prob_ok = prob_path is None or read_part(prob_path, window, n_probs, prob_dtype) is not None
    if got is None or not prob_ok:
        for p in (path, prob_path):
            if p is not None and os.path.lexists(p):
                try:
                    os.remove(p)
                except OSError:
                    pass
        return None
    block, tags = got
    try:
        stats = json.loads(tags.get(STATS_TAG, "null"))
    except ValueError:
        stats = None
    stats = stats if isinstance(stats, dict) else None
    return {"part": Part(path, window), "counts": np.bincount(block[0].ravel(), minlength=256), "stats": stats, "write_s": 0.0}


def _write_prob_part(block: np.ndarray, path: str, geobox: GeoBox, window: Window, dtype: str) -> dict:
    t0 = time.perf_counter()
    valid = ~np.isnan(block[0])
    if dtype == "uint8":
        data = np.round(np.nan_to_num(block, nan=0.0) * 255.0).astype(np.uint8)
        part = write_part(path, data, geobox, window, valid=valid)
    else:
        part = write_part(path, block.astype(np.float32, copy=False), geobox, window, nodata=float("nan"))
    return {"part": part, "write_s": time.perf_counter() - t0}


def compute_tasks(tasks: list, progress: bool) -> list:
    """Compute delayed tasks on the active Dask client (else the current Dask scheduler)."""
    import dask

    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        client = None
    if client is not None:
        futures = client.compute(tasks)
        if progress:
            from distributed import progress as dprogress

            dprogress(futures)
        return client.gather(futures)
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return list(dask.compute(*tasks))
    return list(dask.compute(*tasks))


def _versions() -> dict[str, str]:
    import dask
    import rasterio
    import xarray

    from geoseg._version import __version__

    v = {
        "geoseg": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "dask": dask.__version__,
        "xarray": xarray.__version__,
    }
    try:
        import distributed

        v["distributed"] = distributed.__version__
    except ImportError:  # pragma: no cover
        pass
    return v


def write(
    result: Any,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    probabilities_dtype: str = "uint8",
    progress: bool = False,
    extra: dict[str, Any] | None = None,
    classes: list | None = None,
    mask_name: str = MASK_NAME,
) -> dict[str, Any]:
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
    progress : bool
        Show a progress bar.
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
    dict
        The run report, as written to ``run.json``.

    Raises
    ------
    OutputExistsError
        Outputs exist and ``overwrite`` is False.
    InputError
        ``result`` carries no job from :func:`geoseg.predict` (it is not predict's result,
        or an xarray operation made new data from it) and no ``classes`` were given: run.json
        could not name its input and model. Or every pixel is nodata: nothing is written. Or more than
        :data:`MAX_NONFINITE_FRACTION` of the valid pixels do not fit float32 once the
        card's scaling is applied.
    ModelError
        The model returned NaN or Inf for more than :data:`MAX_NONFINITE_FRACTION` of the
        valid pixels (fewer are nodata in the mask, counted in run.json's ``nonfinite`` and
        ``warnings``).

    Notes
    -----
    A run that finds the staging folder of a killed run of the same job reuses its chunk
    parts after reading each one whole (an empty or torn part is redone); their chunk
    statistics travel in the parts, so run.json counts every tile of the job.
    """
    import dask

    t0 = time.perf_counter()
    out_dir = os.fspath(out_dir)
    if probabilities_dtype not in ("uint8", "float32"):
        raise InputError(f"probabilities dtype must be uint8 or float32, got {probabilities_dtype!r}")
    is_ds = hasattr(result, "data_vars")
    mask = result["mask"] if is_ds else result
    job = job_from(result)  # the provenance predict left on the mask (source, model, parameters)
    if job is None and classes is None:
        raise InputError(_no_job_message(mask))
    probs = result["probabilities"] if is_ds and "probabilities" in result else None
    out_dir = os.path.abspath(out_dir)  # workers may run in another folder
    plain = mask.rio.crs is None and mask.sizes["x"] * mask.sizes["y"] <= PNG_MAX_PIXELS
    png_name = os.path.splitext(mask_name)[0] + ".png"
    names = (mask_name, PROB_NAME, RUN_NAME, *((png_name,) if plain else ()))
    check_output_dir(out_dir, overwrite, names)
    lock = ExitStack()
    lock.enter_context(output_lock(out_dir))  # one writer per folder: a second run is refused
    staging = ""
    keep = False
    try:
        check_output_dir(out_dir, overwrite, names)  # again, now that no other run can be writing here
        token = dask.base.tokenize(mask.data.name, probabilities_dtype, mask_name)[:16]
        # a killed run of this very job left finished chunk parts: reuse them (resume)
        staging = adopt_staging(out_dir, ".geoseg-staging-", token) or ""
        adopted = staging
        sweep_staging(out_dir, ".geoseg-staging-")  # left by killed runs of other jobs (never a live one)
        if overwrite and os.path.exists(os.path.join(out_dir, RUN_NAME)):
            # run.json describes the outputs beside it: never leave an old one next to new files
            os.remove(os.path.join(out_dir, RUN_NAME))
        geobox = _geobox_of(mask)
        staging = staging or make_staging(out_dir, ".geoseg-staging-", token)
        try:
            for sub in ("mask", *(("probabilities",) if probs is not None else ())):
                os.makedirs(os.path.join(staging, sub), exist_ok=True)
        except OSError:
            if not adopted:
                raise
            # the killed run's folder is damaged beyond its parts (a file where a folder belongs): start afresh
            shutil.rmtree(staging, ignore_errors=True)
            staging, adopted = make_staging(out_dir, ".geoseg-staging-", token), ""
            for sub in ("mask", *(("probabilities",) if probs is not None else ())):
                os.makedirs(os.path.join(staging, sub), exist_ok=True)
        windows = chunk_windows(mask.data.chunks)
        cells = [(i, j, win) for i, row in enumerate(windows) for j, win in enumerate(row)]

        def part_path(kind: str, i: int, j: int) -> str:
            return os.path.join(staging, kind, f"r{i:04d}_c{j:04d}.tif")

        n_probs = int(probs.sizes["class"]) if probs is not None else 0
        reused: dict[tuple[int, int], dict] = {}
        if adopted:  # check every part the killed run finished (on the workers); unusable ones are redone
            found = [
                (i, j, win)
                for i, j, win in cells
                if os.path.exists(part_path("mask", i, j)) and (probs is None or os.path.exists(part_path("probabilities", i, j)))
            ]
            checks = [
                dask.delayed(_finished_part, pure=False)(
                    part_path("mask", i, j), win, part_path("probabilities", i, j) if probs is not None else None,
                    n_probs, probabilities_dtype,
                )
                for i, j, win in found
            ]  # fmt: skip
            for (i, j, _), got in zip(found, compute_tasks(checks, False) if checks else [], strict=True):
                if got is not None:
                    reused[i, j] = got
        blocks = mask.data.to_delayed(optimize_graph=False)  # keep keys shared with the stats tasks
        pblocks = probs.data.to_delayed(optimize_graph=False) if probs is not None else None
        stats = job.stats if job is not None and mask.data.chunks == job.plan.chunks else None
        tasks = []
        for n, (i, j, win) in enumerate(cells):
            if (i, j) not in reused:
                st = stats[n] if stats is not None else None
                tasks.append(dask.delayed(_write_mask_part, pure=True)(blocks[i, j], part_path("mask", i, j), geobox, win, st))
        n_mask = len(tasks)
        if pblocks is not None:
            for i, j, win in cells:
                if (i, j) not in reused:
                    tasks.append(
                        dask.delayed(_write_prob_part, pure=True)(
                            pblocks[0, i, j], part_path("probabilities", i, j), geobox, win, probabilities_dtype
                        )
                    )
        tc = time.perf_counter()
        results = compute_tasks(tasks, progress) if tasks else []
        compute_s = time.perf_counter() - tc
        new_mask, new_prob = iter(results[:n_mask]), iter(results[n_mask:])
        mask_res = [reused[i, j] if (i, j) in reused else next(new_mask) for i, j, _ in cells]
        prob_parts = (
            [Part(part_path("probabilities", i, j), win) if (i, j) in reused else next(new_prob)["part"] for i, j, win in cells]
            if probs is not None
            else []
        )
        resumed = len(reused)

        counts = np.sum([r["counts"] for r in mask_res], axis=0)
        valid_px = int(counts[:NODATA].sum())
        lost = _check_nonfinite(job, mask_res, valid_px)
        if valid_px == 0:
            raise InputError(
                f"{job.source.path if job else 'input'}: every pixel is nodata (or outside the AOI) in the processed window; "
                "check the nodata value, the band choice and the AOI"
            )
        card = job.card if job else None
        table = list(card.classes) if card and card.classes else list(classes or [])
        colormap = mask_colormap(table)  # background classes and nodata transparent (issue 17)
        ta = time.perf_counter()
        final_mask = os.path.join(staging, mask_name)
        tags = None
        if table:
            tags = {CLASSES_TAG: json.dumps([{"id": c.id, "name": c.name, "color": list(c.color)} for c in table])}
            rules = {k: getattr(card, k) for k in ("min_area_m2", "max_length_m") if card and getattr(card, k) is not None}
            if rules and card.task == "objects":  # the model's object rules travel with its mask
                tags[OBJECTS_TAG] = json.dumps(rules)
        try:
            assemble_cog(
                [r["part"] for r in mask_res], final_mask, geobox, dtype="uint8", nodata=NODATA, colormap=colormap, metadata=tags
            )
            outputs = {"mask": mask_name}
            outputs.update(write_mask_sidecars(final_mask, table))  # mask.qml, mask.tif.aux.xml: class names (issue 17)
            if plain:  # a plain image's mask also as an indexed PNG of the same size (class ids, class colours)
                final_png = os.path.join(staging, png_name)
                write_mask_png(final_mask, final_png, {c.id: tuple(c.color) for c in table})
                outputs["mask_png"] = png_name
            if probs is not None:
                names = [str(c) for c in probs["class"].values]
                final_prob = os.path.join(staging, PROB_NAME)
                assemble_cog(
                    prob_parts,
                    final_prob,
                    geobox,
                    dtype=probabilities_dtype,
                    count=len(names),
                    nodata=None if probabilities_dtype == "uint8" else float("nan"),
                    descriptions=names,
                    mask=probabilities_dtype == "uint8",
                    overview_resampling="average",
                    scale=1 / 255 if probabilities_dtype == "uint8" else None,  # value x scale = probability (issue 17)
                )
                outputs["probabilities"] = PROB_NAME
        except OutputError as exc:
            if not adopted or isinstance(exc, DiskFullError):
                raise
            # parts a killed run left could not be assembled: say where they are (the folder is removed now)
            raise OutputError(
                f"{out_dir}: the chunk parts resumed from the hidden folder {os.path.basename(staging)} could not be "
                f"assembled ({exc}); it is removed now: run again (with --overwrite) to redo every chunk"
            ) from exc
        assemble_s = time.perf_counter() - ta

        report = _report(job, geobox, counts, mask_res, compute_s, assemble_s, outputs, probabilities_dtype, extra, table)
        report["resumed_chunks"] = resumed
        if lost is not None:
            report["nonfinite"] = lost["counts"]
            if lost["warning"]:
                report["warnings"].append(lost["warning"])
        # Move finished files into place (same filesystem: atomic renames), run.json last.
        os.replace(final_mask, os.path.join(out_dir, mask_name))
        publish_mask_sidecars(final_mask, out_dir)  # beside the mask; stale ones removed (issue 17)
        if plain:
            os.replace(final_png, os.path.join(out_dir, png_name))
        if probs is not None:
            os.replace(final_prob, os.path.join(out_dir, PROB_NAME))
        elif overwrite and os.path.exists(os.path.join(out_dir, PROB_NAME)):
            os.remove(os.path.join(out_dir, PROB_NAME))  # a stale file from an earlier run would mislead
        report["timings"]["total_s"] = round(report["timings"].get("predict_call_s", 0.0) + time.perf_counter() - t0, 3)
        write_json_atomic(os.path.join(out_dir, RUN_NAME), report, indent=2)
        for w in report["warnings"]:  # each once, here (run.json keeps them too)
            log.warning(w)
        return report
    except DiskFullError as exc:  # name the folder the user chose, not a staging file that is removed now
        reason = str(exc).rsplit(": the disk is full (", 1)[-1].split(")", 1)[0]
        raise DiskFullError(f"{out_dir}: the disk is full ({reason}); free space or choose another --out") from exc
    except GeosegError:
        raise  # bad input or output: the parts are of no use
    except OSError as exc:
        reason = disk_full_reason(exc)
        if reason is None:
            keep = True  # e.g. a lost worker: the next run of this job reuses the finished parts
            raise
        raise DiskFullError(f"{out_dir}: the disk is full ({reason}); free space or choose another --out") from exc
    except BaseException:
        keep = True  # interrupted (Ctrl-C, a lost worker): the next run of this job reuses the finished parts
        raise
    finally:
        if staging and not keep:
            shutil.rmtree(staging, ignore_errors=True)
        lock.close()


def _no_job_message(mask: Any) -> str:
    """Why an array without a job cannot be written with its provenance, and what to do."""
    if JOB_ATTR in getattr(mask, "attrs", {}):
        what = (
            "this mask was changed after geoseg.predict made it (an xarray operation such as arithmetic, isel, where "
            "or rechunk makes new data that predict's job no longer describes)"
        )
    else:
        what = "this array carries no job from geoseg.predict (it is not what predict returned)"
    return (
        f"{what}, so run.json could not name the input and model behind it; write predict's result as returned "
        "(to crop, give predict aoi=), or pass classes= (its class table) to write it as a class raster "
        "whose run.json has no input or model"
    )


def _check_nonfinite(job, mask_res: list[dict], valid_px: int, limit: float | None = None) -> dict[str, Any] | None:
    """Pixels lost to NaN/Inf model outputs or to float32 overflow of scaled inputs: an error past
    ``limit`` (a share of the pixels that would have been valid; default :data:`MAX_NONFINITE_FRACTION`),
    else the counts and a warning for run.json (None when nothing was lost).
    """
    limit = MAX_NONFINITE_FRACTION if limit is None else limit
    stats = [r["stats"] for r in mask_res if r.get("stats")]
    nonfinite = int(sum(s.get("nonfinite", 0) for s in stats))
    overflow = int(sum(s.get("overflow", 0) for s in stats))
    if not nonfinite and not overflow:
        return None
    total = valid_px + nonfinite + overflow
    what = job.spec.path or job.spec.id if job is not None else "model"
    src = job.source.path if job is not None else "input"
    scaling = job.spec.card.scaling if job is not None else None
    how = f"scaling {scaling.method}" if scaling is not None and scaling.method != "none" else "no scaling"
    if overflow and (valid_px == 0 or overflow / total > limit):
        raise InputError(
            f"{src}: {overflow} of {total} valid pixels ({overflow / total:.1%}) do not fit float32 once scaled ({how}); "
            "rescale the raster (e.g. gdal_translate -scale -ot Float32) or fix the card's scaling"
        )
    if nonfinite and (valid_px == 0 or nonfinite / total > limit):
        raise ModelError(
            f"{what}: the model returned NaN or Inf for {nonfinite} of {total} valid pixels ({nonfinite / total:.1%}); "
            f"check the card's scaling ({how}: inputs it was not trained on) and the model itself"
        )
    parts = []
    if nonfinite:
        parts.append(f"the model returned NaN or Inf for {nonfinite} pixels")
    if overflow:
        parts.append(f"{overflow} pixels do not fit float32 once scaled ({how})")
    warning = f"{' and '.join(parts)} of {total}; they are nodata in the mask"
    return {"counts": {"model_output_pixels": nonfinite, "input_overflow_pixels": overflow}, "warning": warning}


def _report(job, geobox, counts, mask_res, compute_s, assemble_s, outputs, prob_dtype, extra, table=()) -> dict[str, Any]:
    stats = [r["stats"] for r in mask_res if r["stats"]]
    timings: dict[str, float] = {}
    if job is not None:
        timings.update({k: round(v, 3) for k, v in job.timings.items()})
    # summed over tasks (tasks overlap, so these can exceed the wall time); "predict" is time
    # inside the model, "wait" time queued behind another task's forward pass
    for key in ("read_s", "predict_s", "wait_s", "blend_s"):
        if stats:
            timings[f"{key[:-2]}_task_s"] = round(sum(s.get(key, 0.0) for s in stats), 3)
    timings["write_task_s"] = round(sum(r["write_s"] for r in mask_res), 3)
    timings["compute_wall_s"] = round(compute_s, 3)
    timings["assemble_cog_s"] = round(assemble_s, 3)
    classes = job.card.classes if job else table
    names = {c.id: c.name for c in classes} if classes else {}
    pixels = {names.get(k, f"class_{k}"): int(counts[k]) for k in range(NODATA) if counts[k] or k in names}
    pixels["nodata"] = int(counts[NODATA])
    report: dict[str, Any] = {"geoseg_run": 1, "outputs": outputs}
    warnings = []
    present = [k for k in range(NODATA) if counts[k]]
    if len(present) == 1:
        warnings.append(
            f"every valid pixel is class {present[0]} ({names.get(present[0], '?')}); "
            "check band order and scaling if this is unexpected"
        )
    if job is not None:
        warnings += job.warnings
        src = job.source
        report["input"] = {
            "path": src.path,
            "fingerprint": src.fingerprint,
            "width": src.geobox.width,
            "height": src.geobox.height,
            "transform": list(src.geobox.transform)[:6],
            "crs": src.geobox.crs,
            "dtype": src.dtype,
            "bands": list(src.bands),
            "band_descriptions": list(src.band_descriptions),
            "nodata": src.nodata,
        }
        report["model"] = {
            "id": job.spec.id,
            "sha256": job.spec.sha256,
            "kind": job.spec.kind,
            "path": job.spec.path,
            "backend": job.info.backend,
            "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in job.card.classes],
        }
        report["parameters"] = job.params()
        report["device"] = {"requested": job.runtime.device, "used": job.info.device, "name": job.info.device_name}
        report["tiles"] = {
            "total": int(sum(s.get("tiles", 0) for s in stats)),
            "skipped_empty": int(sum(s.get("tiles_skipped", 0) for s in stats)),
            "chunks": len(mask_res),
        }
    report["output_grid"] = {
        "width": geobox.width,
        "height": geobox.height,
        "transform": list(geobox.transform)[:6],
        "crs": geobox.crs,
    }
    report["parameters"] = {
        **report.get("parameters", {}),
        "probabilities_dtype": prob_dtype if "probabilities" in outputs else None,
    }
    report["pixels"] = pixels
    report["timings"] = timings
    versions = _versions()
    if job is not None:
        versions.update(job.info.versions)
    report["versions"] = versions
    report["command"] = sys.argv
    report["warnings"] = warnings
    if extra:
        report.update(extra)
    return report
