"""run.json: what :func:`~geoseg.engine.write.write` reports about a prediction it wrote.

The input, model, parameters and device come from the :class:`~geoseg.engine.job.Job`;
pixel counts, tile counts and timings from the chunk parts; pixels lost to NaN/Inf model
outputs or to float32 overflow are counted here and, past :data:`MAX_NONFINITE_FRACTION`,
refused.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from geoseg._version import __version__
from geoseg.classes import NODATA
from geoseg.engine.job import JOB_ATTR, Job
from geoseg.errors import InputError, ModelError
from geoseg.grid import GeoBox
from geoseg.io.remote import redact
from geoseg.io.xarray_source import ArraySource
from geoseg.records import Record

__all__ = ["MAX_NONFINITE_FRACTION", "check_nonfinite", "command_line", "job_entries", "no_job_message", "run_report", "versions"]

#: Largest share of valid pixels that may be lost to NaN/Inf model outputs (or to values that
#: overflow float32 after scaling) before the run is an error; below it, a warning in run.json.
MAX_NONFINITE_FRACTION = 0.01


def no_job_message(mask: Any) -> str:
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


def check_nonfinite(job: Job | None, mask_res: list[dict], valid_px: int, limit: float | None = None) -> dict[str, Any] | None:
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
    src = job.source.label if job is not None else "input"
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


def class_entry(c: Any) -> dict[str, Any]:
    """A class as the mask's ``GEOSEG_CLASSES`` metadata and run.json list it (``kind`` only when the card gives one)."""
    entry = {"id": c.id, "name": c.name, "color": list(c.color)}
    if getattr(c, "kind", None):
        entry["kind"] = c.kind
    return entry


@dataclass(frozen=True, eq=False)
class RunReport(Record):
    """What :func:`geoseg.write` made: reads like its ``run.json`` record (``report["outputs"]``).

    Attributes
    ----------
    record : dict
        The contents of ``run.json``: input, model, grid, tiles, pixels per class, timings, warnings, outputs.
    folder : str
        The output folder (absolute).
    """

    record: dict[str, Any]
    folder: str

    @property
    def mask(self) -> str | None:
        """Path of the class raster (``mask.tif``, or ``change.tif`` for a change map); None for a detector's run."""
        name = self.record["outputs"].get("mask")
        return os.path.join(self.folder, name) if name else None

    def files(self) -> list[str]:
        """Every file written, relative to :attr:`folder` (``run.json`` last)."""
        return [*self.record["outputs"].values(), "run.json"]


def run_report(
    job: Job | None,
    geobox: GeoBox,
    counts: np.ndarray,
    mask_res: list[dict],
    seconds: dict[str, float],
    outputs: dict[str, str],
    prob_dtype: str,
    extra: dict[str, Any] | None,
    table: list = (),
    lost: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run report, as written to run.json.

    Parameters
    ----------
    job : Job or None
        The prediction's job (None: a class raster of the caller's, with ``table``).
    geobox : GeoBox
        The output grid.
    counts : numpy.ndarray
        Pixels per value 0-255 of the whole mask.
    mask_res : list of dict
        Each chunk's mask part: ``stats`` (None when unknown) and ``write_s``.
    seconds : dict
        ``compute_s`` (workers computing and writing parts) and ``assemble_s`` (COGs).
    outputs : dict
        File of each output.
    prob_dtype : str
        Encoding of the probabilities, recorded when they were written.
    extra : dict, optional
        More entries (e.g. the scheduler used).
    table : list of ClassInfo
        Class table when there is no job.
    lost : dict, optional
        :func:`check_nonfinite`'s counts and warning.
    """
    stats = [r["stats"] for r in mask_res if r["stats"]]
    classes = job.card.classes if job else table
    names = {c.id: c.name for c in classes} if classes else {}
    report: dict[str, Any] = {"geoseg_run": 1, "outputs": outputs}
    if job is not None:
        report.update(job_entries(job, stats, len(mask_res)))
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
    report["pixels"] = _pixels(counts, names)
    report["timings"] = _timings(job, stats, mask_res, seconds)
    report["versions"] = {**versions(), **(job.info.versions if job is not None else {})}
    report["command"] = command_line()
    report["warnings"] = _warnings(counts, names, job)
    if extra:
        report.update(extra)
    report["resumed_chunks"] = sum(1 for r in mask_res if r.get("resumed"))
    if lost is not None:
        report["nonfinite"] = lost["counts"]
        if lost["warning"]:
            report["warnings"].append(lost["warning"])
    return report


def command_line() -> list[str]:
    """The command line as run.json records it: every argument with any URL's token redacted."""
    return [redact(a) for a in sys.argv]


def job_entries(job: Job, stats: list[dict], n_chunks: int) -> dict[str, Any]:
    """What the job says: input (an array's record has no path), model, parameters, device and tile counts."""
    src = job.source
    return {
        "input": src.record()
        if isinstance(src, ArraySource)
        else {
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
        },
        "model": {
            "id": job.spec.id,
            "sha256": job.spec.sha256,
            "kind": job.spec.kind,
            "path": job.spec.path,
            "backend": job.info.backend,
            "precision": job.info.precision,  # the arithmetic used; parameters.precision is what was asked
            "classes": [class_entry(c) for c in job.card.classes],
        },
        "parameters": {**job.params(), "mmu_px": job.card.mmu},  # the minimum mapping unit vectorize applies
        "device": {"requested": job.runtime.device, "used": job.info.device, "name": job.info.device_name},
        "tiles": {
            "total": int(sum(s.get("tiles", 0) for s in stats)),
            "skipped_empty": int(sum(s.get("tiles_skipped", 0) for s in stats)),
            "chunks": n_chunks,
        },
    }


def _pixels(counts: np.ndarray, names: dict[int, str]) -> dict[str, int]:
    pixels = {names.get(k, f"class_{k}"): int(counts[k]) for k in range(NODATA) if counts[k] or k in names}
    pixels["nodata"] = int(counts[NODATA])
    return pixels


def _timings(job: Job | None, stats: list[dict], mask_res: list[dict], seconds: dict[str, float]) -> dict[str, float]:
    timings: dict[str, float] = {}
    if job is not None:
        timings.update({k: round(v, 3) for k, v in job.timings.items()})
    # summed over tasks (tasks overlap, so these can exceed the wall time); "predict" is time
    # inside the model, "wait" time queued behind another task's forward pass
    for key in ("read_s", "predict_s", "wait_s", "blend_s"):
        if stats:
            timings[f"{key[:-2]}_task_s"] = round(sum(s.get(key, 0.0) for s in stats), 3)
    timings["write_task_s"] = round(sum(r["write_s"] for r in mask_res), 3)
    timings["compute_wall_s"] = round(seconds["compute_s"], 3)
    timings["assemble_cog_s"] = round(seconds["assemble_s"], 3)
    return timings


def _warnings(counts: np.ndarray, names: dict[int, str], job: Job | None) -> list[str]:
    """A mask of a single class (often a wrong band order or scaling), then what planning flagged."""
    warnings = []
    present = [k for k in range(NODATA) if counts[k]]
    if len(present) == 1:
        warnings.append(
            f"every valid pixel is class {present[0]} ({names.get(present[0], '?')}); "
            "check band order and scaling if this is unexpected"
        )
    return warnings + (job.warnings if job is not None else [])


def _distribution_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover  (a core dependency)
        return "not installed"


def versions() -> dict[str, str]:
    """The versions of geoseg, Python and the libraries a run depends on."""
    import dask
    import rasterio

    v = {
        "geoseg": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "dask": dask.__version__,
        "xarray": _distribution_version("xarray"),  # not imported for this: dask.array would be, with pandas
    }
    v["distributed"] = _distribution_version("distributed")  # a threaded run never imports it
    return v
