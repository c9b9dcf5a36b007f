"""Plan a prediction: from :func:`~geoseg.engine.graph.predict`'s options to the :class:`Job` its graph is built from.

:func:`plan_job` runs the steps in order, each once: resolve the model, open the source
with the bands its card names, resolve the card's scaling on the whole raster, bridge the
raster's and the model's pixel sizes (:func:`gsd_plan`), probe the model where it will run,
size tiles, halo and chunks, and refuse sizes this machine cannot hold. Every check that can
fail runs here, before any graph exists (which is why the file is just over 400 lines).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import replace
from typing import Any

from geoseg.engine.cluster import active_scheduling
from geoseg.engine.job import Job
from geoseg.errors import InputError
from geoseg.grid import TilePlan
from geoseg.io.aoi import read_aoi
from geoseg.io.radiometry import resolve_radiometry
from geoseg.io.raster import RasterSource, band_percentiles, open_source, raster_gsd_m
from geoseg.io.xarray_source import ArraySource, is_xarray, open_array
from geoseg.models.bands import match_bands
from geoseg.models.card import ModelCard
from geoseg.models.runtime import probe
from geoseg.models.spec import ModelSpec, Runtime, resolve_model

__all__ = ["gsd_plan", "max_threads", "open_for_model", "plan_job"]

DEFAULT_TILE = 512
DEFAULT_HALO = 32
#: chunk side on a GPU (and what ``auto`` sizes jobs in): 5 x 5 tiles of 512 px, batches of 8 and readers kept busy
DEFAULT_CHUNK = 2048
#: chunk side on a CPU: 3 x 3 tiles of 512 px; every chunk in flight holds its input, validity and mask, so
#: smaller chunks hold less (measured at 4096²: peak 60 MiB lower than 2048, same speed; DESIGN.md)
CPU_CHUNK = 1536
#: raster/model ground sample distance ratios within which nothing is resampled
GSD_TOLERANCE = 1.25
#: largest resampling factor applied on the fly (either way); beyond it the run is flagged instead
MAX_RESAMPLE = 4.0
#: most model threads per worker, per core (at least :data:`MIN_MAX_THREADS`): far past any speed-up, and
#: well below the thread counts that crash OpenMP (100000 segfaults)
THREADS_PER_CORE = 8
MIN_MAX_THREADS = 64
#: float32 values per pixel allowed for a model's own activations when sizes are checked against the machine's
#: memory (a small U-Net holds more): only tile sizes that cannot fit are refused before the probe tries one
ACTIVATION_FLOATS = 32
#: most chunk tasks one prediction may have (each is a few graph keys; millions take minutes to build)
MAX_CHUNKS = 250_000

log = logging.getLogger(__name__)


def plan_job(
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
    card: ModelCard | None = None,
    resample: bool = True,
    radiometry: Any = None,
    trust_model: bool = False,
    tta: int | None = None,
    threshold: float | None = None,
) -> Job:
    """The :class:`Job` for :func:`geoseg.engine.graph.predict`'s options (parameters as there).

    Returns
    -------
    Job
        Source, model (scaling resolved), card (with the probe's class count), runtime, tile
        plan, AOI and probe result; ``warnings`` holds what the writer reports, ``timings``
        the probe's seconds. ``stats`` is empty until the graph is built.
    """
    if blend not in ("crop", "cosine"):
        raise InputError(f"blend must be 'crop' or 'cosine', got {blend!r}")
    _check_source(source)
    spec = resolve_model(model, card, trust=trust_model)
    src = open_for_model(source, spec, bands, band_map or {}, require_crs=aoi is not None)  # plain images: pixel space
    spec, rad = _resolve_scaling(spec, src, radiometry)
    num_threads = _model_threads(num_threads)
    scale, gsd_note = gsd_plan(src, spec.card, resample)
    runtime = Runtime(
        device=device,
        precision=precision,
        batch_size=batch_size or 1,
        num_threads=num_threads,
        scale=scale,
        tta=spec.card.tta if tta is None else tta,
    )
    info, probe_s = _probe(spec, runtime, src, tile, halo)
    if batch_size is None and info.fixed_batch is not None:
        runtime = replace(runtime, batch_size=info.fixed_batch)  # a zoo's batch-1 export stays at 1, on a GPU too
    elif batch_size is None and info.device.startswith("cuda"):
        runtime = replace(runtime, batch_size=8)  # GPUs want batches; on a CPU batch 1 was fastest here
    card_ = spec.card.with_classes(info.n_outputs)
    runtime = replace(runtime, threshold=_threshold(spec, info.n_outputs, threshold, runtime.tta))
    runtime, tile, halo, mult = _tile_and_halo(spec, runtime, info, tile, halo)
    aoi_ = read_aoi(aoi, src.geobox) if aoi is not None else None
    chunk = chunk or (DEFAULT_CHUNK if info.device.startswith("cuda") else CPU_CHUNK)
    plan = TilePlan(
        src.geobox.height,
        src.geobox.width,
        aoi_.window if aoi_ else src.geobox.window,
        tile=tile,
        halo=halo,
        chunk=chunk,
        size_multiple=mult,
        fixed_size=info.fixed_size is not None or scale != 1.0,  # resampled tiles are always full tiles
    )
    _check_costs(plan, runtime, src.count, len(card_.classes), chunk)
    job = Job(src, spec, card_, runtime, plan, blend, aoi_, info, radiometry=rad.record() if rad else None)
    job.warnings += _notes(src, rad, gsd_note, scale)  # reported once, by the writer (run.json and the log)
    job.timings["probe_s"] = probe_s
    return job


def _check_source(source: Any) -> None:
    """Refuse, in one line that says what to do, a source that is not a raster path, an xarray object or a source."""
    if isinstance(source, (str, os.PathLike, RasterSource, ArraySource)) or is_xarray(source):
        return
    raise InputError(
        f"predict takes a raster path (str or os.PathLike) or an xarray DataArray, got {type(source).__name__}; "
        "give the file's path"
    )


def open_for_model(
    source: Any, spec: ModelSpec, bands: Any, band_map: dict[str, int], require_crs: bool = False
) -> RasterSource | ArraySource:
    """Open the source with the bands the model's card asks for, in its order.

    Parameters
    ----------
    source : str, os.PathLike, xarray.DataArray, xarray.Dataset, RasterSource or ArraySource
        The raster or array (a source is taken as it is).
    spec : ModelSpec
        The model; its card names the bands and their scaling.
    bands : sequence of int or None
        1-based band numbers given by the user (``--bands 3,2,1``).
    band_map : dict
        Card band names to band numbers (``--bands nir=4,red=3``).
    require_crs : bool
        Refuse a raster without a CRS (an AOI needs one).

    Returns
    -------
    RasterSource or ArraySource

    Raises
    ------
    InputError
        Bands that do not match the card, or a scaling that does not fit them.
    """
    card = spec.card
    opener = open_array if is_xarray(source) else open_source
    if isinstance(source, (RasterSource, ArraySource)):
        src = source
    elif card.bands and bands is None:
        everything = opener(source, require_crs=require_crs)
        src = opener(
            source,
            match_bands(card.bands, everything.band_descriptions, band_map, origin=everything.label),
            require_crs=require_crs,
        )
    else:
        if band_map:
            raise InputError("band_map= needs a model card that names its bands; give band numbers instead (bands=[3, 2, 1])")
        src = opener(source, bands, require_crs=require_crs)
    card.scaling.validate(src.count, f"{spec.path or card.name} (card scaling)")
    if card.bands and src.count != len(card.bands):
        raise InputError(
            f"{src.label}: the model {card.name!r} takes {len(card.bands)} bands ({', '.join(card.bands)}) but "
            f"{src.count} were selected; fix bands= or band_map="
        )
    return src


def _resolve_scaling(spec: ModelSpec, src: RasterSource, radiometry: Any = None) -> tuple[ModelSpec, Any]:
    """The spec with its scaling resolved for ``src`` (fixed values for every tile), and the
    radiometry used (reflectance cards; None otherwise).
    """
    method = spec.card.scaling.method
    if method == "reflectance":
        rad = resolve_radiometry(src, radiometry)
        scaling = spec.card.scaling.resolve(lambda lo, hi: band_percentiles(src, lo, hi), radiometry=rad, n_bands=src.count)
        return replace(spec, card=replace(spec.card, scaling=scaling)), rad
    if method != "percentile":
        return spec, None

    scaling = spec.card.scaling.resolve(lambda lo, hi: band_percentiles(src, lo, hi))
    return replace(spec, card=replace(spec.card, scaling=scaling)), None


def _threshold(spec: ModelSpec, n_outputs: int, threshold: float | None, tta: int) -> float | None:
    """The binary cut the run uses: ``threshold``, else the card's (a binary model's only); checked against the model."""
    name = spec.path or spec.card.name
    if spec.card.detector is not None:
        if threshold is not None:
            raise InputError(f"{name}: threshold= cuts a binary segmentation model; for this detector give conf= instead")
        if tta != 1:
            raise InputError(f"{name}: test-time augmentation (tta=) averages per-pixel outputs; a detector runs with tta=1")
        return None
    binary = n_outputs in (1, 2)
    if threshold is not None and not binary:
        raise InputError(
            f"{name}: threshold= cuts a binary model (one output channel, or two); this one has {n_outputs} classes: "
            "drop threshold="
        )
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise InputError(f"threshold={threshold!r}: give a probability in (0, 1], e.g. threshold=0.5")
    return threshold if threshold is not None else spec.card.threshold if binary else None


def max_threads() -> int:
    """The largest ``num_threads`` (``--threads``) accepted on this machine."""
    return max(MIN_MAX_THREADS, THREADS_PER_CORE * (os.cpu_count() or 1))


def _model_threads(num_threads: int | None) -> int | None:
    """``num_threads`` checked; when not given, the active scheduler's threads per worker (None without one)."""
    if num_threads is not None and not 1 <= num_threads <= max_threads():
        raise InputError(
            f"num_threads={num_threads}: give 1 to {max_threads()} (model threads per worker; this machine has "
            f"{os.cpu_count() or 1} core(s))"
        )
    active = active_scheduling()
    if num_threads is None and active is not None:
        return active.predict_options()["num_threads"]
    return num_threads


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
    if not (card.gsd_m or card.gsd_range_m):
        return 1.0, None
    gsd = raster_gsd_m(src)  # (imports pyproj: only for cards that name a pixel size)
    if gsd is None:
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
                fix += ", or drop resample=False"
        why = "resampling is off" if not allow else f"more than {MAX_RESAMPLE:g}x away"
        return 1.0, f"{src.label}: pixels are {gsd:.3g} m but the model {card.name!r} was made for {made} ({why}); {fix}"
    return scale, f"{src.label}: pixels are {gsd:.3g} m; tiles resampled on the fly to the model's {target:.3g} m (x{scale:.3g})"


def _probe(spec: ModelSpec, runtime: Runtime, src: RasterSource, tile: int | None, halo: int | None) -> tuple[Any, float]:
    """Load the model where it will run and learn its class count, device and any fixed input size.

    The probe tile is small, or with ``tile`` given no larger than a square the raster
    holds (tiles shrink at its edges). Returns the probe result and its seconds.
    """
    import dask

    mult = spec.card.size_multiple
    size = max(mult, -(-64 // mult) * mult)
    if tile is not None:  # tiles shrink at the raster's edges: probe no larger than a square the raster holds
        size = max(mult, min(tile, _largest_square(src, spec.card, halo, mult)))
        _check_forward(size, size, 1, src.count, 0, tile, halo)
    t0 = time.perf_counter()
    try:
        info = dask.delayed(probe, pure=True)(spec, runtime, src.count, size).compute()
    except MemoryError:
        raise InputError(
            f"the model ran out of memory on one {size}x{size} px probe tile; lower tile= (or halo=, batch_size=)"
        ) from None
    return info, time.perf_counter() - t0


def _tile_and_halo(
    spec: ModelSpec, runtime: Runtime, info: Any, tile: int | None, halo: int | None
) -> tuple[Runtime, int, int, int]:
    """Tile and halo in raster pixels (given, the card's, else the defaults), and the size multiple tiles keep.

    With resampling every tile is a full tile of the model's size (the card's tile and halo
    are in model pixels), recorded in the runtime as ``model_size``.
    """
    mult = spec.card.size_multiple
    scale = runtime.scale
    if scale != 1.0:
        # every tile is a full tile of `size` model pixels = `tile` raster pixels; the card's tile
        # and halo are in model pixels
        if info.fixed_size and tile is not None:
            raise InputError(
                f"{spec.path}: with resampling the tile is the model's fixed {info.fixed_size} px input; "
                "drop tile=, or use resample=False"
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
            f"{spec.path}: the model takes fixed {info.fixed_size}x{info.fixed_size} inputs; use tile={info.fixed_size}"
        )
    halo = spec.card.halo if halo is None and spec.card.halo is not None else (DEFAULT_HALO if halo is None else halo)
    if tile <= 2 * halo:
        raise InputError(f"tile ({tile} px) must be larger than twice the halo ({halo} px); raise tile= or lower halo=")
    return runtime, tile, halo, mult


def _notes(src: RasterSource, rad: Any, gsd_note: str | None, scale: float) -> list[str]:
    """Log what planning decided, and return what the writer must report (assumed radiometry, pixel size)."""
    warnings = []
    if rad is not None and rad.source.endswith("(assumed)"):
        warnings.append(
            f"{src.label}: no radiometric metadata (band scale/offset, Sentinel-2 processing baseline); from its value range "
            f"geoseg assumes {rad.describe()}; if that is wrong pass radiometry= one of "
            "s2-l2a, s2-l2a-harmonized, sentinelhub-raw16, reflectance or scale=S,offset=O"
        )
    elif rad is not None:
        log.info("%s: radiometry %s", src.label, rad.describe())
    if gsd_note and scale != 1.0:
        log.info(gsd_note)
    elif gsd_note:
        warnings.append(gsd_note)
    return warnings


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
        fix = "lower tile=" + (" or batch_size=" if batch > 1 else "")
        fix += " or halo=" if halo and 4 * halo >= min(rows, cols) else ""
        raise InputError(
            f"tile={tile}: a forward pass of {what} of {cols}x{rows} px needs at least {_gib(need)}, more than this "
            f"machine's {_gib(memory)}; {fix}"
        )


def _gib(n: float) -> str:
    g = n / 2**30
    return f"{g:,.0f} GiB" if g >= 100 else f"{g:.3g} GiB"


def _check_costs(plan: TilePlan, runtime: Runtime, bands: int, n_classes: int, chunk: int) -> None:
    """Refuse tile, chunk and batch sizes this machine cannot hold, and graphs too large to build.

    Bytes are the float32 arrays geoseg holds (input, logits, probabilities) and a small
    allowance for the model's activations, so only sizes that cannot work are refused.
    """
    region = plan.region
    n_chunks = -(-region.height // plan.chunk_px) * -(-region.width // plan.chunk_px)
    if n_chunks > MAX_CHUNKS:
        raise InputError(
            f"chunk={chunk}: the {region.width}x{region.height} px region would be {n_chunks:,} tasks "
            f"(at most {MAX_CHUNKS:,}); raise chunk= (it is rounded to whole tile cores of {plan.core} px)"
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
            f"chunk={chunk}: one task holds {cols}x{rows} px (chunk and halo, {bands} bands, "
            f"{n_classes} classes): {_gib(held)}, more than this machine's {_gib(memory)}; lower chunk="
            + (" or halo=" if plan.halo > plan.chunk_px else "")
        )
