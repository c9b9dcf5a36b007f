"""Write a lazy prediction: per-chunk parts in parallel, then COGs and run.json, atomically.

Workers write their own chunks to a staging folder inside the output folder; the client
then streams the parts into COGs (GDAL reads them block by block) and moves the finished
files into place. Nothing in the output folder is ever half-written: a failed run leaves
at most the hidden staging folder, which the next run replaces.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from contextlib import ExitStack
from typing import Any

import numpy as np

from geoseg.engine.graph import job_of
from geoseg.engine.tasks import NODATA
from geoseg.errors import GeosegError, InputError, OutputError, OutputExistsError
from geoseg.grid import GeoBox, Window
from geoseg.io.cog import (
    DiskFullError,
    Part,
    adopt_staging,
    assemble_cog,
    atomic_path,
    disk_full_reason,
    fsync_replace,
    make_staging,
    output_lock,
    sweep_staging,
    write_part,
)
from geoseg.io.mask import CLASSES_TAG, PNG_MAX_PIXELS, write_mask_png

__all__ = ["check_output_dir", "write"]

MASK_NAME = "mask.tif"
PROB_NAME = "probabilities.tif"
RUN_NAME = "run.json"


def check_output_dir(out_dir: str, overwrite: bool, names: tuple[str, ...] = (MASK_NAME, PROB_NAME, RUN_NAME)) -> None:
    """Fail before any work when outputs exist (without ``overwrite``) or the folder is unusable."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"{out_dir}: exists and is not a folder; give --out a folder path")
    existing = [n for n in names if os.path.exists(os.path.join(out_dir, n))]
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


def _windows(chunks: tuple[tuple[int, ...], tuple[int, ...]]) -> list[list[Window]]:
    rows = np.concatenate([[0], np.cumsum(chunks[0])])
    cols = np.concatenate([[0], np.cumsum(chunks[1])])
    return [
        [Window(int(rows[i]), int(cols[j]), int(chunks[0][i]), int(chunks[1][j])) for j in range(len(chunks[1]))]
        for i in range(len(chunks[0]))
    ]


def _write_mask_part(block: np.ndarray, path: str, geobox: GeoBox, window: Window, stats: dict | None) -> dict:
    t0 = time.perf_counter()
    part = write_part(path, block, geobox, window, nodata=NODATA)
    counts = np.bincount(block.ravel(), minlength=256)
    return {"part": part, "counts": counts, "stats": stats, "write_s": time.perf_counter() - t0}


def _finished_part(path: str, window: Window) -> dict:
    """A part a killed run of the same job finished: reused as it is (its class counts re-read)."""
    import rasterio

    with rasterio.open(path) as ds:
        block = ds.read(1)
    return {"part": Part(path, window), "counts": np.bincount(block.ravel(), minlength=256), "stats": None, "write_s": 0.0}


def _finished_prob(path: str, window: Window) -> dict:
    return {"part": Part(path, window), "write_s": 0.0}


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
        change map): colour table and ``GEOSEG_CLASSES`` metadata.
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
        Every pixel is nodata: nothing is written.
    """
    import dask

    t0 = time.perf_counter()
    out_dir = os.fspath(out_dir)
    if probabilities_dtype not in ("uint8", "float32"):
        raise InputError(f"probabilities dtype must be uint8 or float32, got {probabilities_dtype!r}")
    is_ds = hasattr(result, "data_vars")
    mask = result["mask"] if is_ds else result
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
        sweep_staging(out_dir, ".geoseg-staging-")  # left by killed runs of other jobs (never a live one)
        if overwrite and os.path.exists(os.path.join(out_dir, RUN_NAME)):
            # run.json describes the outputs beside it: never leave an old one next to new files
            os.remove(os.path.join(out_dir, RUN_NAME))
        job = job_of(result)
        geobox = _geobox_of(mask)
        staging = staging or make_staging(out_dir, ".geoseg-staging-", token)
        os.makedirs(os.path.join(staging, "mask"), exist_ok=True)
        windows = _windows(mask.data.chunks)
        blocks = mask.data.to_delayed(optimize_graph=False)  # keep keys shared with the stats tasks
        stats = job.stats if job is not None and mask.data.chunks == job.plan.chunks else None
        tasks = []
        n = 0
        resumed = 0
        for i, row in enumerate(windows):
            for j, win in enumerate(row):
                path = os.path.join(staging, "mask", f"r{i:04d}_c{j:04d}.tif")
                ppath = os.path.join(staging, "probabilities", f"r{i:04d}_c{j:04d}.tif")
                st = stats[n] if stats is not None else None
                if os.path.exists(path) and (probs is None or os.path.exists(ppath)):
                    tasks.append(dask.delayed(_finished_part, pure=True)(path, win))  # parts are renamed into place whole
                    resumed += 1
                else:
                    tasks.append(dask.delayed(_write_mask_part, pure=True)(blocks[i, j], path, geobox, win, st))
                n += 1
        n_mask = len(tasks)
        if probs is not None:
            os.makedirs(os.path.join(staging, "probabilities"), exist_ok=True)
            pblocks = probs.data.to_delayed(optimize_graph=False)
            for i, row in enumerate(windows):
                for j, win in enumerate(row):
                    path = os.path.join(staging, "probabilities", f"r{i:04d}_c{j:04d}.tif")
                    mpath = os.path.join(staging, "mask", f"r{i:04d}_c{j:04d}.tif")
                    if os.path.exists(path) and os.path.exists(mpath):
                        tasks.append(dask.delayed(_finished_prob, pure=True)(path, win))
                    else:
                        tasks.append(
                            dask.delayed(_write_prob_part, pure=True)(pblocks[0, i, j], path, geobox, win, probabilities_dtype)
                        )
        tc = time.perf_counter()
        results = compute_tasks(tasks, progress)
        compute_s = time.perf_counter() - tc

        mask_res = results[:n_mask]
        counts = np.sum([r["counts"] for r in mask_res], axis=0)
        valid_px = int(counts[:NODATA].sum())
        if valid_px == 0:
            raise InputError(
                f"{job.source.path if job else 'input'}: every pixel is nodata (or outside the AOI) in the processed window; "
                "check the nodata value, the band choice and the AOI"
            )
        card = job.card if job else None
        table = list(card.classes) if card and card.classes else list(classes or [])
        colormap = {c.id: (*c.color, 255) for c in table} or None
        ta = time.perf_counter()
        final_mask = os.path.join(staging, mask_name)
        tags = None
        if table:
            tags = {CLASSES_TAG: json.dumps([{"id": c.id, "name": c.name, "color": list(c.color)} for c in table])}
        assemble_cog(
            [r["part"] for r in mask_res], final_mask, geobox, dtype="uint8", nodata=NODATA, colormap=colormap, metadata=tags
        )
        outputs = {"mask": mask_name}
        if plain:  # a plain image's mask also as an indexed PNG of the same size (class ids, class colours)
            final_png = os.path.join(staging, png_name)
            write_mask_png(final_mask, final_png, {c.id: tuple(c.color) for c in table})
            outputs["mask_png"] = png_name
        if probs is not None:
            names = [str(c) for c in probs["class"].values]
            final_prob = os.path.join(staging, PROB_NAME)
            assemble_cog(
                [r["part"] for r in results[n_mask:]],
                final_prob,
                geobox,
                dtype=probabilities_dtype,
                count=len(names),
                nodata=None if probabilities_dtype == "uint8" else float("nan"),
                descriptions=names,
                mask=probabilities_dtype == "uint8",
                overview_resampling="average",
            )
            outputs["probabilities"] = PROB_NAME
        assemble_s = time.perf_counter() - ta

        report = _report(job, geobox, counts, mask_res, compute_s, assemble_s, outputs, probabilities_dtype, extra, table)
        report["resumed_chunks"] = resumed
        # Move finished files into place (same filesystem: atomic renames), run.json last.
        os.replace(final_mask, os.path.join(out_dir, mask_name))
        if plain:
            os.replace(final_png, os.path.join(out_dir, png_name))
        if probs is not None:
            os.replace(final_prob, os.path.join(out_dir, PROB_NAME))
        elif overwrite and os.path.exists(os.path.join(out_dir, PROB_NAME)):
            os.remove(os.path.join(out_dir, PROB_NAME))  # a stale file from an earlier run would mislead
        report["timings"]["total_s"] = round(report["timings"].get("predict_call_s", 0.0) + time.perf_counter() - t0, 3)
        tmp = atomic_path(os.path.join(out_dir, RUN_NAME))
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        fsync_replace(tmp, os.path.join(out_dir, RUN_NAME))
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
            "total": int(sum(s["tiles"] for s in stats)),
            "skipped_empty": int(sum(s["tiles_skipped"] for s in stats)),
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
