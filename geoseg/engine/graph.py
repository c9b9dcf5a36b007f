"""Build the lazy segmentation of a raster: a Dask graph of read -> predict -> (blend) tasks.

:func:`predict` returns an xarray object backed by that graph; nothing heavy runs until
it is computed or written (:func:`geoseg.engine.write.write`). Task keys are
deterministic (hashes of the source, plan, model and options), so the same job always
builds the same graph.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from geoseg.classes import NODATA
from geoseg.errors import InputError
from geoseg.grid import TilePlan
from geoseg.io.aoi import AOI, read_aoi
from geoseg.io.raster import RasterSource, open_source, raster_gsd_m
from geoseg.models.card import ModelCard
from geoseg.models.spec import ModelSpec, Runtime, resolve_model

__all__ = ["JOB_ATTR", "Job", "JobRef", "job_from", "predict"]

DEFAULT_TILE = 512
DEFAULT_HALO = 32
DEFAULT_CHUNK = 2048
log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything about one lazy prediction that the writer and run.json need."""

    source: RasterSource
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
        }


#: Key in the mask's ``attrs`` under which :func:`predict` leaves its :class:`JobRef`.
JOB_ATTR = "geoseg_job"


class JobRef(str):
    """The :class:`Job` behind a prediction, carried in its mask's ``attrs``.

    As a string it is the Dask name of the mask that :func:`predict` built, so an array
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
    """The :class:`Job` behind what :func:`predict` returned, read from the object itself.

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


def _probe(spec: ModelSpec, runtime: Runtime, bands: int, size: int):
    import dask

    from geoseg.models.runtime import probe

    try:
        return dask.delayed(probe, pure=True)(spec, runtime, bands, size).compute()
    except MemoryError:
        raise InputError(
            f"the model ran out of memory on one {size}x{size} px probe tile; lower --tile (or --halo, --batch-size)"
        ) from None


def _open_for(source, spec: ModelSpec, bands, band_map: dict[str, int], require_crs: bool = False) -> RasterSource:
    """Open the source with the bands the model's card asks for, in its order; scaling resolved."""
    from geoseg.models.bands import match_bands

    card = spec.card
    if isinstance(source, RasterSource):
        src = source
    elif card.bands and bands is None:
        everything = open_source(source, require_crs=require_crs)
        src = open_source(
            source,
            match_bands(card.bands, everything.band_descriptions, band_map, origin=everything.path),
            require_crs=require_crs,
        )
    else:
        if band_map:
            raise InputError("--bands NAME=N needs a model card that names its bands; give band numbers (e.g. 3,2,1) instead")
        src = open_source(source, bands, require_crs=require_crs)
    card.scaling.validate(src.count, f"{spec.path or card.name} (card scaling)")
    if card.bands and src.count != len(card.bands):
        raise InputError(
            f"{src.path}: the model {card.name!r} takes {len(card.bands)} bands ({', '.join(card.bands)}) but "
            f"{src.count} were selected; fix --bands"
        )
    return src


#: raster/model ground sample distance ratios within which nothing is resampled
GSD_TOLERANCE = 1.25
#: largest resampling factor applied on the fly (either way); beyond it the run is flagged instead
MAX_RESAMPLE = 4.0


def gsd_plan(src: RasterSource, card: ModelCard, allow: bool = True) -> tuple[float, str | None]:
    """How to bridge the raster's pixel size and the model's.

    A model made for ``gsd_m`` (or trained across ``gsd_range_m``) sees the raster as it
    is when its pixels are within that range (``gsd_m`` +-25 %); otherwise each tile is
    resampled to the nearest pixel size the model knows, when that takes a factor of at
    most :data:`MAX_RESAMPLE` either way, and the mask still comes out on the raster's
    grid. Beyond that (or with ``allow=False``) nothing is resampled and a warning says so.

    Returns
    -------
    scale : float
        Model pixels per raster pixel (1 = no resampling; 0.5 = the model sees pixels twice as large).
    note : str or None
        What was done, or the warning, for the log and run.json.
    """
    gsd = raster_gsd_m(src)
    if gsd is None or not (card.gsd_m or card.gsd_range_m):
        return 1.0, None
    lo, hi = card.gsd_range_m or (card.gsd_m / GSD_TOLERANCE, card.gsd_m * GSD_TOLERANCE)
    slack = 1.02  # measured sizes are off nominal by projection scale (UTM 0.5 m is 0.49986 m)
    if lo / slack <= gsd <= hi * slack:
        return 1.0, None
    target = card.gsd_m if card.gsd_range_m is None else (lo if gsd < lo else hi)
    scale = gsd / target
    if abs(scale * MAX_RESAMPLE - 1) < 0.02 or abs(scale / MAX_RESAMPLE - 1) < 0.02:
        scale = 1 / MAX_RESAMPLE if scale < 1 else MAX_RESAMPLE  # a nominal 4x stays a whole factor
    if not allow or not 1 / MAX_RESAMPLE <= scale <= MAX_RESAMPLE:
        made = f"{lo:.3g}-{hi:.3g} m" if card.gsd_range_m else f"{target:.3g} m"
        if gsd > target:  # coarser: upsampling adds no detail, so no gdalwarp advice
            fix = f"use imagery of about {made} per pixel; at {gsd:.3g} m what it looks for spans too few pixels"
        else:
            units = target / gsd * math.sqrt(abs(src.geobox.transform.a * src.geobox.transform.e))  # in the CRS's units
            fix = f"resample to the model's pixel size with gdalwarp -tr {units:.6g} {units:.6g} -r average"
            if not allow:
                fix += ", or drop --no-resample"
        why = "resampling is off" if not allow else f"more than {MAX_RESAMPLE:g}x away"
        return 1.0, f"{src.path}: pixels are {gsd:.3g} m but the model {card.name!r} was made for {made} ({why}); {fix}"
    return scale, f"{src.path}: pixels are {gsd:.3g} m; tiles resampled on the fly to the model's {target:.3g} m (x{scale:.3g})"


#: most model threads per worker, per core (at least :data:`MIN_MAX_THREADS`): far past any speed-up, and
#: well below the thread counts that crash OpenMP (100000 segfaults)
THREADS_PER_CORE = 8
MIN_MAX_THREADS = 64
#: float32 values per pixel allowed for a model's own activations when sizes are checked against the machine's
#: memory (a small U-Net holds more): only tile sizes that cannot fit are refused before the probe tries one
ACTIVATION_FLOATS = 32
#: most chunk tasks one prediction may have (each is a few graph keys; millions take minutes to build)
MAX_CHUNKS = 250_000


def max_threads() -> int:
    """The largest ``num_threads`` (``--threads``) accepted on this machine."""
    return max(MIN_MAX_THREADS, THREADS_PER_CORE * (os.cpu_count() or 1))


def _machine_memory() -> int | None:
    """Physical memory of this machine in bytes (None when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover (not POSIX)
        return None


def _round_up(n: int, mult: int) -> int:
    return -(-n // mult) * mult


def _largest_square(src: RasterSource, card: ModelCard, halo: int | None, mult: int) -> int:
    """Side of the largest square tile input the raster holds: its shorter side plus the halo on both ends."""
    h = halo if halo is not None else (card.halo if card.halo is not None else DEFAULT_HALO)
    return _round_up(min(src.geobox.height, src.geobox.width) + 2 * h, mult)


def _check_forward(rows: int, cols: int, batch: int, bands: int, n_classes: int, tile: int, halo: int | None) -> None:
    """Refuse a forward pass whose arrays cannot fit in this machine's memory (see :data:`ACTIVATION_FLOATS`)."""
    memory = _machine_memory()
    need = batch * rows * cols * 4 * (bands + 2 * n_classes + ACTIVATION_FLOATS)
    if memory and need > memory:
        what = f"{batch} tiles" if batch > 1 else "one tile"
        fix = "lower --tile" + (" or --batch-size" if batch > 1 else "")
        fix += " or --halo" if halo and 4 * halo >= min(rows, cols) else ""
        raise InputError(
            f"--tile {tile}: a forward pass of {what} of {cols}x{rows} px needs at least {_gib(need)}, more than this "
            f"machine's {_gib(memory)}; {fix}"
        )


def _gib(n: float) -> str:
    g = n / 2**30
    return f"{g:,.0f} GiB" if g >= 100 else f"{g:.3g} GiB"


def _check_costs(plan: TilePlan, runtime: Runtime, bands: int, n_classes: int, chunk: int | None) -> None:
    """Refuse tile, chunk and batch sizes this machine cannot hold, and graphs too large to build.

    Bytes are the float32 arrays geoseg holds (input, logits, probabilities) and a small
    allowance for the model's activations, so only sizes that cannot work are refused.
    """
    region = plan.region
    n_chunks = -(-region.height // plan.chunk_px) * -(-region.width // plan.chunk_px)
    if n_chunks > MAX_CHUNKS:
        raise InputError(
            f"--chunk {chunk or DEFAULT_CHUNK}: the {region.width}x{region.height} px region would be {n_chunks:,} tasks "
            f"(at most {MAX_CHUNKS:,}); raise --chunk (it is rounded to whole tile cores of {plan.core} px)"
        )
    if plan.fixed_size:  # every tile is whole (and resampled ones are model_size px)
        rows = cols = max(plan.tile, runtime.model_size or 0)
    else:  # tiles shrink to the raster at its edges
        rows = min(plan.tile, _round_up(region.height + 2 * plan.halo, plan.size_multiple))
        cols = min(plan.tile, _round_up(region.width + 2 * plan.halo, plan.size_multiple))
    per_chunk = -(-min(plan.chunk_px, region.height) // plan.core) * -(-min(plan.chunk_px, region.width) // plan.core)
    _check_forward(rows, cols, max(1, min(runtime.batch_size, per_chunk)), bands, n_classes, plan.tile, plan.halo)
    memory = _machine_memory()
    rows = min(plan.chunk_px, region.height) + 2 * plan.halo
    cols = min(plan.chunk_px, region.width) + 2 * plan.halo
    held = rows * cols * (4 * bands + 4 * n_classes + 2)
    if memory and held > memory:
        raise InputError(
            f"--chunk {chunk or DEFAULT_CHUNK}: one task holds {cols}x{rows} px (chunk and halo, {bands} bands, "
            f"{n_classes} classes): {_gib(held)}, more than this machine's {_gib(memory)}; lower --chunk"
            + (" or --halo" if plan.halo > plan.chunk_px else "")
        )


def _resolve_scaling(spec: ModelSpec, src: RasterSource, radiometry: Any = None) -> tuple[ModelSpec, Any]:
    """The spec with its scaling resolved for ``src`` (fixed values for every tile), and the
    radiometry used (reflectance cards; None otherwise).
    """
    method = spec.card.scaling.method
    if method == "reflectance":
        from geoseg.io.radiometry import resolve_radiometry
        from geoseg.io.raster import band_percentiles

        rad = resolve_radiometry(src, radiometry)
        scaling = spec.card.scaling.resolve(lambda lo, hi: band_percentiles(src, lo, hi), radiometry=rad, n_bands=src.count)
        return replace(spec, card=replace(spec.card, scaling=scaling)), rad
    if method != "percentile":
        return spec, None
    from geoseg.io.raster import band_percentiles

    scaling = spec.card.scaling.resolve(lambda lo, hi: band_percentiles(src, lo, hi))
    return replace(spec, card=replace(spec.card, scaling=scaling)), None


def predict(
    source: str | os.PathLike | RasterSource,
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
):
    """Segment a raster lazily with a model, tile by tile, without seams.

    Parameters
    ----------
    source : str, os.PathLike or RasterSource
        Any raster GDAL opens (GeoTIFF, COG, VRT, JP2, ``/vsi...``).
    model : str, os.PathLike, ModelSpec or torch.nn.Module
        TorchScript ``.pt``, ONNX ``.onnx`` or an in-memory module. It receives float32 raw
        band values ``(N, bands, H, W)`` and returns class logits ``(N, classes, H, W)``.
    bands : sequence of int, optional
        1-based bands, in the order the model takes them (default: the card's band names
        matched to band descriptions, else all bands in file order).
    band_map : dict, optional
        ``{band name: 1-based band}`` for card band names the descriptions do not give,
        e.g. ``{"nir": 4, "red": 3}``.
    aoi : path, optional
        Vector file in any CRS: only the raster window covering it is segmented, and
        pixels outside its polygons are nodata.
    tile, halo : int, optional
        Model input size and context per edge in pixels (default: card, else 512 and 32).
    chunk : int, optional
        Pixels per Dask task side, rounded to whole tile cores (default 2048: with 512 px
        tiles, 5 x 5 tiles per task, tens of MiB per task; smaller chunks re-read more halo).
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
        up to 4x (see :func:`gsd_plan`); the mask is still on the raster's grid.
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
    import dask
    import dask.array as da

    t0 = time.perf_counter()
    if blend not in ("crop", "cosine"):
        raise InputError(f"blend must be 'crop' or 'cosine', got {blend!r}")
    spec = resolve_model(model, card, trust=trust_model)
    src = _open_for(source, spec, bands, band_map or {}, require_crs=aoi is not None)  # plain images: pixel space
    spec, rad = _resolve_scaling(spec, src, radiometry)
    if num_threads is not None and not 1 <= num_threads <= max_threads():
        raise InputError(
            f"--threads {num_threads}: give 1 to {max_threads()} (model threads per worker; this machine has "
            f"{os.cpu_count() or 1} core(s))"
        )
    if num_threads is None:
        from geoseg.engine.cluster import active_scheduling

        active = active_scheduling()
        num_threads = active.num_threads if active else None
    scale, gsd_note = gsd_plan(src, spec.card, resample)
    runtime = Runtime(
        device=device,
        precision=precision,
        batch_size=batch_size or 1,
        num_threads=num_threads,
        scale=scale,
        tta=spec.card.tta if tta is None else tta,
    )

    mult = spec.card.size_multiple
    probe_size = max(mult, -(-64 // mult) * mult)
    if tile is not None:  # tiles shrink at the raster's edges: probe no larger than a square the raster holds
        probe_size = max(mult, min(tile, _largest_square(src, spec.card, halo, mult)))
        _check_forward(probe_size, probe_size, 1, src.count, 0, tile, halo)
    tp = time.perf_counter()
    info = _probe(spec, runtime, src.count, probe_size)
    probe_s = time.perf_counter() - tp
    if batch_size is None and info.device.startswith("cuda"):
        runtime = replace(runtime, batch_size=8)  # GPUs want batches; on a CPU batch 1 was fastest here
    card_ = spec.card.with_classes(info.n_outputs)
    n_classes = len(card_.classes)
    if scale != 1.0:
        # every tile is a full tile of `size` model pixels = `tile` raster pixels; the card's tile
        # and halo are in model pixels
        if info.fixed_size and tile is not None:
            raise InputError(
                f"{spec.path}: with resampling the tile is the model's fixed {info.fixed_size} px input; "
                "drop --tile, or use --no-resample"
            )
        if info.fixed_size:
            size = info.fixed_size
        else:
            want = tile * scale if tile is not None else (spec.card.tile or DEFAULT_TILE)
            size = max(mult, round(want / mult) * mult)
        tile = max(1, round(size / scale))
        if halo is None:
            halo = round((spec.card.halo if spec.card.halo is not None else DEFAULT_HALO) / scale)
        runtime = replace(runtime, model_size=size)
        mult = 1
    tile = tile or spec.card.tile or info.fixed_size or DEFAULT_TILE
    if info.fixed_size and tile != info.fixed_size and scale == 1.0:
        raise InputError(
            f"{spec.path}: the model takes fixed {info.fixed_size}x{info.fixed_size} inputs; use --tile {info.fixed_size}"
        )
    halo = spec.card.halo if halo is None and spec.card.halo is not None else (DEFAULT_HALO if halo is None else halo)
    if tile <= 2 * halo:
        raise InputError(f"tile ({tile} px) must be larger than twice the halo ({halo} px); raise --tile or lower --halo")

    aoi_ = read_aoi(aoi, src.geobox) if aoi is not None else None
    region = aoi_.window if aoi_ else src.geobox.window
    plan = TilePlan(
        src.geobox.height,
        src.geobox.width,
        region,
        tile=tile,
        halo=halo,
        chunk=chunk or DEFAULT_CHUNK,
        size_multiple=mult,
        fixed_size=info.fixed_size is not None or scale != 1.0,  # resampled tiles are always full tiles
    )
    _check_costs(plan, runtime, src.count, n_classes, chunk)
    out_box = src.geobox.crop(region)

    from geoseg.engine import tasks

    token = dask.base.tokenize(src, spec, runtime, plan, blend, aoi_, probabilities, n_classes)
    # The model spec and the AOI are one graph key each: shipped once per worker, not per task.
    d_spec = dask.delayed(spec, name=f"geoseg-model-{dask.base.tokenize(spec)}")
    d_aoi = dask.delayed(aoi_, name=f"geoseg-aoi-{token}") if aoi_ is not None else None
    ny, nx = plan.shape
    read = {}
    pred = {}
    for i, j in plan.iter_chunks():
        read[i, j] = dask.delayed(tasks.read_chunk)(src, plan, i, j, d_aoi, dask_key_name=f"geoseg-read-{token}-{i}-{j}")
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
                n_classes,
                probabilities,
                dask_key_name=f"geoseg-predict-{token}-{i}-{j}",
            )
    if blend == "cosine":
        final = {}
        for i, j in plan.iter_chunks():
            cw = plan.chunk_window(i, j)
            strips = [
                dask.delayed(tasks.strip)(pred[a, b], cw, dask_key_name=f"geoseg-strip-{token}-{a}-{b}-to-{i}-{j}")
                for a, b in plan.neighbours(i, j)
                if (a, b) != (i, j)
            ]
            final[i, j] = dask.delayed(tasks.blend_chunk)(
                pred[i, j], strips, plan, i, j, probabilities, dask_key_name=f"geoseg-blend-{token}-{i}-{j}"
            )
    else:
        final = pred

    row_chunks, col_chunks = plan.chunks
    mask_blocks = [
        [da.from_delayed(final[i, j]["mask"], shape=(row_chunks[i], col_chunks[j]), dtype=np.uint8) for j in range(nx)]
        for i in range(ny)
    ]
    mask = da.block(mask_blocks)
    job = Job(src, spec, card_, runtime, plan, blend, aoi_, info, radiometry=rad.record() if rad else None)
    if rad is not None and rad.source.endswith("(assumed)"):
        note = (
            f"{src.path}: no radiometric metadata (band scale/offset, Sentinel-2 processing baseline); from its value range "
            f"geoseg assumes {rad.describe()}; if that is wrong pass radiometry= (--radiometry) one of "
            "s2-l2a, s2-l2a-harmonized, sentinelhub-raw16, reflectance or scale=S,offset=O"
        )
        job.warnings.append(note)  # reported once, by the writer (run.json and the log)
    elif rad is not None:
        log.info("%s: radiometry %s", src.path, rad.describe())
    if gsd_note and scale != 1.0:
        log.info(gsd_note)
    elif gsd_note:  # reported once, by the writer (run.json and the log)
        job.warnings.append(gsd_note)
    job.stats = [final[i, j]["stats"] for i, j in plan.iter_chunks()]
    job.timings["probe_s"] = probe_s
    job.timings["predict_call_s"] = time.perf_counter() - t0  # opening, probing, planning, graph building

    mask_da = _to_xarray(mask, out_box, ("y", "x"), name="mask")
    mask_da.attrs.update(
        {
            "model": spec.id,
            "classes": ", ".join(f"{c.id}={c.name}" for c in card_.classes),
            "nodata_value": NODATA,
            "source": src.path,
        }
    )
    mask_da = mask_da.rio.write_nodata(NODATA)
    mask_da.attrs[JOB_ATTR] = JobRef(mask.name, job)  # provenance travels with the result
    if not probabilities:
        return mask_da

    import xarray as xr

    prob_blocks = [
        [
            da.from_delayed(final[i, j]["probs"], shape=(n_classes, row_chunks[i], col_chunks[j]), dtype=np.float32)
            for j in range(nx)
        ]
        for i in range(ny)
    ]
    probs = da.block([prob_blocks])
    probs_da = _to_xarray(probs, out_box, ("class", "y", "x"), name="probabilities")
    probs_da = probs_da.assign_coords({"class": [c.name for c in card_.classes]}).rio.write_nodata(np.nan)
    return xr.Dataset({"mask": mask_da, "probabilities": probs_da})


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
