"""Build the lazy segmentation of a raster: a Dask graph of read -> predict -> (blend) tasks.

:func:`predict` returns an xarray object backed by that graph; nothing heavy runs until
it is computed or written (:func:`geoseg.engine.write.write`). Task keys are
deterministic (hashes of the source, plan, model and options), so the same job always
builds the same graph. What the graph is built from (source, model, tile plan) is
planned by :func:`geoseg.engine.plan.plan_job`.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from geoseg.classes import NODATA
from geoseg.engine import tasks
from geoseg.engine.job import JOB_ATTR, Job, JobRef
from geoseg.engine.plan import plan_job
from geoseg.errors import InputError
from geoseg.grid import GeoBox
from geoseg.io.xarray_source import ArraySource
from geoseg.models.card import ModelCard

__all__ = ["Prediction", "chunk_reads", "predict", "prediction"]


def predict(
    source: Any,
    model: Any,
    *,
    bands: list[int] | tuple[int, ...] | None = None,
    band_map: dict[str, int] | None = None,
    aoi: str | os.PathLike | None = None,
    tile: int | None = None,
    halo: int | None = None,
    chunk: int | None = None,
    blend: str = "crop",
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    num_threads: int | None = None,
    probabilities: bool = False,
    card: ModelCard | None = None,
    resources: dict[str, float] | None = None,
    resample: bool = True,
    radiometry: Any = None,
    trust_model: bool = False,
    tta: int | None = None,
    threshold: float | None = None,
):
    """Segment a raster lazily with a model, tile by tile, without seams.

    Parameters
    ----------
    source : str, os.PathLike, xarray.DataArray, xarray.Dataset or RasterSource
        Any raster GDAL opens (GeoTIFF, COG, VRT, JP2, ``/vsi...``), or a ``(band, y, x)``
        DataArray, lazy (odc-stac, stackstac, ``rioxarray.open_rasterio(..., chunks=)``) or in
        memory, with its CRS (``.rio.crs``/``.odc.geobox``; none: pixel coordinates): each
        chunk's read task depends on the blocks of its Dask graph that the chunk's window
        overlaps, so it is computed block by block, each block once, never whole (see
        :mod:`geoseg.io.xarray_source`).
    model : str, os.PathLike, ModelSpec or torch.nn.Module
        TorchScript ``.pt``, ONNX ``.onnx`` or an in-memory module. It receives float32 raw
        band values ``(N, bands, H, W)`` and returns class logits ``(N, classes, H, W)``.
    bands : sequence of int, optional
        1-based bands, in the order the model takes them (default: the card's band names
        matched to band descriptions, or to an array's band coordinate, else all bands in order).
    band_map : dict, optional
        ``{band name: 1-based band}`` for card band names the descriptions do not give,
        e.g. ``{"nir": 4, "red": 3}``.
    aoi : path, optional
        Vector file in any CRS: only the raster window covering it is segmented, and
        pixels outside its polygons are nodata.
    tile, halo : int, optional
        Model input size and context per edge in pixels (default: card, else 512 and 32).
    chunk : int, optional
        Pixels per Dask task side, rounded to whole tile cores (default 1536 on a CPU, 3 x 3
        tiles of 512 px per task; 2048 on a GPU, 5 x 5 tiles to fill its batches; smaller
        chunks re-read more halo).
    blend : {"crop", "cosine"}
        ``crop`` keeps each tile's centre (exactly whole-image inference when the model's
        receptive field fits in the halo); ``cosine`` averages overlapping predictions with
        weights normalised to sum to one.
    batch_size : int, optional
        Tiles per forward pass (default 1 on CPU, 8 on CUDA).
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. CUDA where there is none is an error.
    precision : {"fp32", "bf16", "fp16"}
        Autocast precision on torch models.
    num_threads : int, optional
        Intra-op threads per worker process.
    probabilities : bool
        Also return per-class probabilities; the result is then a Dataset.
    card : ModelCard, optional
        Classes, colours and defaults for the model.
    resources : dict, optional
        Dask resource annotation for predict tasks (e.g. ``{"GPU": 1}``).
    resample : bool
        Resample tiles on the fly to the card's pixel size when the raster's differs by
        up to 4x (see :func:`geoseg.engine.plan.gsd_plan`); the mask is still on the raster's grid.
    radiometry : str, optional
        For models that take reflectance (card scaling ``reflectance``): how the raster
        stores it, a :data:`geoseg.io.radiometry.PRESETS` name (``s2-l2a``,
        ``s2-l2a-harmonized``, ``sentinelhub-raw16``, ``reflectance``, ...) or
        ``scale=S,offset=O``. Default: from the raster's metadata, else guessed from its
        value range (logged, and recorded in run.json).
    trust_model : bool
        Load a TorchScript file whose code runs at load or touches files (refused
        otherwise; see :mod:`geoseg.models.safety`). Only for files you made.
    tta : int, optional
        Test-time augmentation: 1, 2, 4 or 8 dihedral views of every tile, logits averaged
        (default: the card's ``tta``, else 1). Costs that many forward passes.
    threshold : float, optional
        Binary models (one output channel, or two): class 1 where its probability is at least
        this (default: the card's ``threshold``, e.g. a Deepness ``seg_thresh``, else the larger
        class). Recorded in run.json's ``parameters``.

    Returns
    -------
    xarray.DataArray or xarray.Dataset
        ``mask`` (uint8 class ids, 255 = nodata) on the input grid (or the AOI's window of
        it), lazy, with CRS and transform set through rioxarray; with
        ``probabilities=True`` a Dataset that also holds ``probabilities`` (float32,
        ``(class, y, x)``, NaN where nodata). The mask's ``attrs[JOB_ATTR]`` (a
        :class:`JobRef`) carries the job (source, model, parameters) that
        :func:`geoseg.write` records in run.json; write the result as returned (an
        xarray operation on it makes an array that job no longer describes).

    Examples
    --------
    >>> mask = geoseg.predict("scene.tif", model="unet.pt", aoi="aoi.gpkg")  # doctest: +SKIP
    >>> geoseg.write(mask, "out/")  # doctest: +SKIP
    """
    return prediction(
        source,
        model,
        probabilities=probabilities,
        resources=resources,
        bands=bands,
        band_map=band_map,
        aoi=aoi,
        tile=tile,
        halo=halo,
        chunk=chunk,
        blend=blend,
        batch_size=batch_size,
        device=device,
        precision=precision,
        num_threads=num_threads,
        card=card,
        resample=resample,
        radiometry=radiometry,
        trust_model=trust_model,
        tta=tta,
        threshold=threshold,
    ).to_xarray()


def prediction(
    source: Any, model: Any, *, probabilities: bool = False, resources: dict[str, float] | None = None, **options: Any
) -> Prediction:
    """:func:`predict`'s graph as a :class:`Prediction`, before it becomes xarray (what :func:`geoseg.segment` writes).

    Parameters
    ----------
    source, model
        As for :func:`predict`.
    probabilities : bool
        Also build the per-class probabilities.
    resources : dict, optional
        Dask resource annotation for predict tasks.
    **options
        :func:`predict`'s other options (``tile``, ``aoi``, ``device``, ...).

    Returns
    -------
    Prediction
    """
    t0 = time.perf_counter()
    job = plan_job(source, model, **options)
    if job.spec.card.detector is not None:
        raise InputError(
            f"{job.spec.path or job.spec.card.name}: a detector gives boxes, not a mask; use geoseg.segment (or geoseg "
            "predict), which writes its boxes as polygon layers, or geoseg.engine.detect.detect"
        )
    final, token = _graph(job, probabilities, resources)
    job.stats = [final[i, j]["stats"] for i, j in job.plan.iter_chunks()]
    job.timings["predict_call_s"] = time.perf_counter() - t0  # opening, probing, planning, graph building
    return Prediction(job, final, probabilities, f"geoseg-mask-{token}")


@dataclass(eq=False)
class Prediction:
    """A planned segmentation: the final task of every chunk, on the job's output grid.

    :func:`predict` wraps it in xarray (a lazy DataArray, or a Dataset with probabilities);
    :func:`geoseg.engine.write.write` also takes it as it is, which spares a command-line run
    the imports of ``dask.array`` — it imports xarray, pandas and pyarrow when they are
    installed: 0.7 s and about 110 MiB before the first tile (see DESIGN.md, "Speed and memory").

    Parameters
    ----------
    job : Job
        The planned job (its ``stats`` hold each chunk's statistics task).
    final : dict
        ``(i, j)`` -> the chunk's final task, a dict with ``mask``, ``probs`` and ``stats``.
    probabilities : bool
        Whether the tasks also give per-class probabilities.
    name : str
        Names the mask (like a Dask array's name): the same job, the same name.
    """

    job: Job
    final: dict[tuple[int, int], Any]
    probabilities: bool
    name: str

    @property
    def geobox(self) -> GeoBox:
        """The output grid: the input's, cropped to the job's region (an AOI's window)."""
        return self.job.source.geobox.crop(self.job.plan.region)

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Row and column sizes of the chunks, as Dask's ``chunks``."""
        return self.job.plan.chunks

    @property
    def class_names(self) -> list[str]:
        """The names of the probability bands."""
        return [c.name for c in self.job.card.classes]

    def blocks(self, what: str) -> np.ndarray:
        """``[i, j]`` -> the Delayed ``what`` (``mask`` or ``probs``) of chunk ``(i, j)``."""
        ny, nx = self.job.plan.shape
        out = np.empty((ny, nx), dtype=object)
        for (i, j), task in self.final.items():
            out[i, j] = task[what]
        return out

    def to_xarray(self):
        """The lazy mask as a DataArray carrying its :class:`JobRef`, or with probabilities a Dataset."""
        mask = _mask(self)
        if not self.probabilities:
            return mask
        import xarray as xr

        return xr.Dataset({"mask": mask, "probabilities": _probabilities(self)})


def chunk_reads(job: Job, token: str) -> tuple[Any, dict[tuple[int, int], Any]]:
    """What every engine graph starts from (predict's and :func:`geoseg.engine.detect.detect`'s): the model as one
    graph key and the read task of every chunk.

    The model spec and the AOI are one graph key each: shipped once per worker, not per task. A file is
    read by path inside its task; an array's read task depends on the array's own Dask blocks its window
    overlaps, each cut to it (:meth:`ArraySource.pixels`). Sets ``job.channel``, the tiles' progress
    channel (in no key: the graph stays the same).

    Parameters
    ----------
    job : Job
        The planned job (source, model, plan, AOI).
    token : str
        The graph's deterministic token (every key is named by it).

    Returns
    -------
    spec : dask.delayed.Delayed
        The model spec.
    reads : dict
        ``(i, j)`` -> the chunk's :func:`~geoseg.engine.tasks.read_chunk` task, row-major.
    """
    import dask

    src, plan = job.source, job.plan
    job.channel = f"geoseg-tiles-{token}"
    d_spec = dask.delayed(job.spec, name=f"geoseg-model-{dask.base.tokenize(job.spec)}")
    d_aoi = dask.delayed(job.aoi, name=f"geoseg-aoi-{token}") if job.aoi is not None else None
    reads = {}
    for i, j in plan.iter_chunks():
        pixels = (src.pixels(plan.input_window(i, j)),) if isinstance(src, ArraySource) else ()
        key = f"geoseg-read-{token}-{i}-{j}"
        reads[i, j] = dask.delayed(tasks.read_chunk)(src, plan, i, j, d_aoi, *pixels, dask_key_name=key)
    return d_spec, reads


def _graph(job: Job, probabilities: bool, resources: dict[str, float] | None) -> tuple[dict[tuple[int, int], Any], str]:
    """The final task of every chunk (row-major ``(i, j)``), a dict with ``mask``, ``probs`` and ``stats``, and the
    graph's token.
    """
    import dask

    src, spec, runtime, plan, blend, aoi = job.source, job.spec, job.runtime, job.plan, job.blend, job.aoi
    token = dask.base.tokenize(src, spec, runtime, plan, blend, aoi, probabilities, len(job.card.classes))
    d_spec, read = chunk_reads(job, token)
    pred = {}
    with dask.annotate(resources=resources) if resources else contextlib.nullcontext():
        for i, j in plan.iter_chunks():
            pred[i, j] = dask.delayed(tasks.predict_chunk)(
                read[i, j],
                d_spec,
                runtime,
                plan,
                i,
                j,
                blend,
                len(job.card.classes),
                probabilities,
                job.channel,
                dask_key_name=f"geoseg-predict-{token}-{i}-{j}",
            )
    return (_blended(pred, plan, probabilities, token, runtime.threshold) if blend == "cosine" else pred), token


def _blended(pred: dict, plan, probabilities: bool, token: str, threshold: float | None) -> dict[tuple[int, int], Any]:
    """Cosine blending: each chunk's accumulator plus its neighbours' halo strips, normalised."""
    import dask

    final = {}
    for i, j in plan.iter_chunks():
        cw = plan.chunk_window(i, j)
        strips = [
            dask.delayed(tasks.strip)(pred[a, b], cw, dask_key_name=f"geoseg-strip-{token}-{a}-{b}-to-{i}-{j}")
            for a, b in plan.neighbours(i, j)
            if (a, b) != (i, j)
        ]
        final[i, j] = dask.delayed(tasks.blend_chunk)(
            pred[i, j], strips, plan, i, j, probabilities, threshold, dask_key_name=f"geoseg-blend-{token}-{i}-{j}"
        )
    return final


def _mask(pred: Prediction):
    """The mask as a lazy DataArray on the output grid, carrying its :class:`JobRef`."""
    import dask.array as da

    job, tasks_ = pred.job, pred.blocks("mask")
    row_chunks, col_chunks = pred.chunks
    blocks = [
        [da.from_delayed(t, shape=(row_chunks[i], col_chunks[j]), dtype=np.uint8) for j, t in enumerate(row)]
        for i, row in enumerate(tasks_)
    ]
    mask = da.block(blocks)
    mask_da = _to_xarray(mask, pred.geobox, ("y", "x"), name="mask")
    mask_da.attrs.update(
        {
            "model": job.spec.id,
            "classes": ", ".join(f"{c.id}={c.name}" for c in job.card.classes),
            "nodata_value": NODATA,
            "source": job.source.label,
        }
    )
    mask_da = mask_da.rio.write_nodata(NODATA)
    mask_da.attrs[JOB_ATTR] = JobRef(mask.name, job)  # provenance travels with the result
    return mask_da


def _probabilities(pred: Prediction):
    """Per-class probabilities as a lazy ``(class, y, x)`` DataArray, NaN where nodata."""
    import dask.array as da

    names, tasks_ = pred.class_names, pred.blocks("probs")
    row_chunks, col_chunks = pred.chunks
    blocks = [
        [da.from_delayed(t, shape=(len(names), row_chunks[i], col_chunks[j]), dtype=np.float32) for j, t in enumerate(row)]
        for i, row in enumerate(tasks_)
    ]
    probs = da.block([blocks])
    probs_da = _to_xarray(probs, pred.geobox, ("class", "y", "x"), name="probabilities")
    return probs_da.assign_coords({"class": names}).rio.write_nodata(np.nan)


def _to_xarray(arr, geobox, dims, name):
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    t = geobox.transform
    xs = t.c + t.a * (np.arange(geobox.width) + 0.5)
    ys = t.f + t.e * (np.arange(geobox.height) + 0.5)
    out = xr.DataArray(arr, dims=dims, coords={"y": ys, "x": xs}, name=name)
    if geobox.crs:
        out = out.rio.write_crs(geobox.crs)
    return out.rio.write_transform(t)
