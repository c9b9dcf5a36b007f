"""The :class:`Job` behind a prediction, and the :class:`JobRef` that carries it on the mask.

:func:`~geoseg.engine.plan.plan_job` makes the job, :func:`~geoseg.engine.graph.predict`
leaves it in the mask's ``attrs`` and :func:`~geoseg.engine.write.write` reads it back
with :func:`job_from`: provenance travels with the result, never in a registry on the side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from geoseg.grid import TilePlan
from geoseg.io.aoi import AOI
from geoseg.io.raster import RasterSource
from geoseg.io.xarray_source import ArraySource
from geoseg.models.card import ModelCard
from geoseg.models.spec import ModelSpec, Runtime

__all__ = ["JOB_ATTR", "Job", "JobRef", "job_from"]


@dataclass
class Job:
    """Everything about one lazy prediction that the writer and run.json need."""

    source: RasterSource | ArraySource
    spec: ModelSpec
    card: ModelCard
    runtime: Runtime
    plan: TilePlan
    blend: str
    aoi: AOI | None
    info: Any
    stats: list = field(default_factory=list)  # one Delayed per chunk, row-major
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    radiometry: dict[str, Any] | None = None  # how raw values became reflectance (reflectance-scaled cards)
    channel: str | None = None  # where its chunk tasks report finished tiles (engine.progress.TileReport)

    def params(self) -> dict[str, Any]:
        """Every parameter of the job, JSON-ready."""
        return {
            "tile": self.plan.tile,
            "halo": self.plan.halo,
            "chunk": self.plan.chunk_px,
            "blend": self.blend,
            "size_multiple": self.plan.size_multiple,
            "fixed_size": self.plan.fixed_size,
            "bands": list(self.source.bands),
            "aoi": self.aoi.path if self.aoi else None,
            "device": self.runtime.device,
            "precision": self.runtime.precision,
            "batch_size": self.runtime.batch_size,
            "num_threads": self.runtime.num_threads,
            "resample_scale": self.runtime.scale,
            "tta": self.runtime.tta,
            "radiometry": self.radiometry,
            **({"threshold": self.runtime.threshold} if self.runtime.threshold is not None else {}),  # a binary model's cut
        }


#: Key in the mask's ``attrs`` under which :func:`~geoseg.engine.graph.predict` leaves its :class:`JobRef`.
JOB_ATTR = "geoseg_job"


class JobRef(str):
    """The :class:`Job` behind a prediction, carried in its mask's ``attrs``.

    As a string it is the Dask name of the mask that :func:`~geoseg.engine.graph.predict` built, so an array
    made from it by an xarray operation (which keeps ``attrs`` but makes new data) is told
    apart from the prediction itself. The job rides along in-process only: copies keep it,
    but pickling (shipping the array to a worker, saving it) keeps the plain name, so Dask
    tokens and task payloads are those of a string.

    Parameters
    ----------
    name : str
        Dask name of the mask the job describes.
    job : Job
        The job.
    """

    __slots__ = ("job",)
    job: Job

    def __new__(cls, name: str, job: Job) -> JobRef:  # noqa: D102  (the class docstring says it)
        ref = super().__new__(cls, name)
        ref.job = job
        return ref

    def __reduce__(self) -> tuple[type[str], tuple[str]]:
        return (str, (str(self),))

    def __copy__(self) -> JobRef:
        return self

    def __deepcopy__(self, memo: dict) -> JobRef:
        return self


def job_from(obj: Any) -> Job | None:
    """The :class:`Job` behind what :func:`~geoseg.engine.graph.predict` returned, read from the object itself.

    Parameters
    ----------
    obj : xarray.DataArray or xarray.Dataset
        A mask, or a Dataset with a ``mask`` variable.

    Returns
    -------
    Job or None
        None when the mask carries no job, or carries one for other data: it was made
        from a prediction by an xarray operation (arithmetic, ``isel``, ``where``,
        rechunking), so the job no longer describes it.
    """
    mask = obj["mask"] if hasattr(obj, "data_vars") else obj
    ref = getattr(mask, "attrs", {}).get(JOB_ATTR)
    name = getattr(getattr(mask, "data", None), "name", None)
    if isinstance(ref, JobRef) and name is not None and str(ref) == name:
        return ref.job
    return None
