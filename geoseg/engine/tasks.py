"""The functions Dask runs: read a chunk, segment its tiles, blend across chunk seams.

Each takes small, picklable descriptions (a :class:`~geoseg.io.RasterSource`, a
:class:`~geoseg.grid.TilePlan`, a :class:`~geoseg.models.ModelSpec`) and chunk indices; it
opens files and loads models itself, on the worker that runs it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np

from geoseg.classes import NODATA
from geoseg.engine.progress import TileReport
from geoseg.grid import TilePlan, Window, blend_window_1d
from geoseg.io.aoi import AOI
from geoseg.io.raster import RasterSource, read_window
from geoseg.io.xarray_source import ArraySource, read_pixels
from geoseg.models.runtime import binary_classes, get_predictor
from geoseg.models.spec import ModelSpec, Runtime

__all__ = ["TileInputs", "blend_chunk", "model_inputs", "predict_chunk", "read_chunk", "tile_batches"]


def read_chunk(
    source: RasterSource | ArraySource, plan: TilePlan, i: int, j: int, aoi: AOI | None, pixels: Any = None
) -> dict[str, Any]:
    """Read everything chunk ``(i, j)``'s tiles see, and which of its pixels are valid.

    A file is read by path; an array's ``pixels`` (its blocks that the chunk's input window
    overlaps, cut to it and computed by Dask before this task runs: :meth:`ArraySource.pixels`)
    are assembled, mirrored and masked.

    Returns
    -------
    dict
        ``data`` (bands, h, w) raw values over the chunk's input window; ``window``;
        ``valid`` bool over the chunk window (input valid and inside the AOI); ``valid_input``
        bool over the input window;
        ``read_s``.
    """
    win = plan.input_window(i, j)
    data, valid_in, seconds = read_window(source, win) if pixels is None else read_pixels(source, pixels, win)
    cw = plan.chunk_window(i, j)
    valid = valid_in[cw.slices(win)].copy()
    if aoi is not None:
        valid &= aoi.mask(source.geobox, cw)
    return {"data": data, "window": win, "valid": valid, "valid_input": valid_in, "read_s": seconds}


def tile_batches(plan: TilePlan, i: int, j: int, valid: np.ndarray, batch_size: int):
    """Tiles of a chunk with any valid core pixel, grouped by input shape, in batches."""
    cw = plan.chunk_window(i, j)
    groups: dict[tuple[int, int], list] = defaultdict(list)
    skipped = 0
    tiles = plan.tiles(i, j)
    for t in tiles:
        if valid[t.core.slices(cw)].any():
            groups[t.input.shape].append(t)
        else:
            skipped += 1
    batches = []
    for group in groups.values():
        for k in range(0, len(group), batch_size):
            batches.append(group[k : k + batch_size])
    return batches, len(tiles), skipped


class TileInputs:
    """A chunk's model inputs, made tile by tile from its raw values: float32, the card's scaling
    applied, invalid pixels 0.

    Scaling each tile as it is stacked (rather than the whole chunk up front) keeps one float32
    copy of a batch in memory instead of one of the whole chunk: 64 MiB less per chunk in flight
    for a 2304 px RGB input window. Scaling is elementwise, so the values are the same.
    """

    def __init__(self, data: np.ndarray, origin: Window, valid_input: np.ndarray, spec: ModelSpec) -> None:
        self.data, self.origin, self.valid_input = data, origin, valid_input
        self.scaling = spec.card.scaling
        # only scaling or float64 values turn valid, finite pixels into +-inf/NaN; those, and the
        # invalid pixels whose raw 0 scaling moved, are zeroed after the conversion
        self.zero_invalid = self.scaling.method != "none" or data.dtype == np.float64

    def convert(self, raw: np.ndarray) -> np.ndarray:
        """Raw values to the model's float32 (a new array unless they already are float32, unscaled)."""
        if self.scaling.method != "none":
            return self.scaling.apply(raw)
        with np.errstate(over="ignore", invalid="ignore"):
            return raw.astype(np.float32, copy=False)

    def batch(self, tiles: list) -> np.ndarray:
        """``(N, bands, h, w)`` float32 for tiles of one input shape."""
        out = []
        for t in tiles:
            sl = t.input.slices(self.origin)
            x = self.convert(self.data[(slice(None), *sl)])
            if self.zero_invalid:
                x = x.copy() if np.may_share_memory(x, self.data) else x  # never zero the chunk's raw values
                x[:, ~self.valid_input[sl]] = 0.0
            out.append(x)
        return np.stack(out).astype(np.float32, copy=False)


def model_inputs(
    data: np.ndarray, origin: Window, valid: np.ndarray, valid_input: np.ndarray, spec: ModelSpec, cw: Window
) -> tuple[TileInputs, np.ndarray, int]:
    """The chunk's model inputs (see :class:`TileInputs`) and its valid pixels.

    Pixels whose values do not fit float32 after scaling (float64 data near 1e300, a scaling
    that overflows) are never fed to the model as inf: they become invalid (nodata) and are
    counted. They are found strip by strip, never holding a float32 copy of the whole chunk.
    Returns ``(inputs, valid, overflow)``, ``valid`` over the chunk window ``cw``.
    """
    inputs = TileInputs(data, origin, valid_input, spec)
    overflow = 0
    if inputs.zero_invalid:
        bad = np.zeros(valid_input.shape, dtype=bool)
        step = max(1, (1 << 22) // max(1, data.shape[0] * data.shape[2]))  # about 4 Mi values per strip
        for r in range(0, data.shape[1], step):
            strip = inputs.convert(data[:, r : r + step])
            bad[r : r + step] = valid_input[r : r + step] & ~np.isfinite(strip).all(axis=0)
        if bad.any():
            inputs.valid_input = valid_input & ~bad
            in_chunk = bad[cw.slices(origin)]
            overflow = int((valid & in_chunk).sum())
            valid = valid & ~in_chunk
    return inputs, valid, overflow


def _model_size(runtime: Runtime) -> tuple[int, int] | None:
    return (runtime.model_size, runtime.model_size) if runtime.scale != 1.0 else None


def predict_chunk(
    chunk: dict[str, Any],
    spec: ModelSpec,
    runtime: Runtime,
    plan: TilePlan,
    i: int,
    j: int,
    blend: str,
    n_classes: int,
    probabilities: bool,
    channel: str | None = None,
) -> dict[str, Any]:
    """Segment the tiles of chunk ``(i, j)``; finished tiles are reported on ``channel`` (progress).

    With ``blend="crop"`` each tile's core is written straight into the chunk: the result
    is final. With ``blend="cosine"`` each tile's probabilities are weighted and summed
    into an accumulator over the chunk grown by the halo; :func:`blend_chunk` adds the
    neighbours' overlaps and normalises.
    """
    t0 = time.perf_counter()
    predictor = get_predictor(spec, runtime)
    cw = plan.chunk_window(i, j)
    inputs, valid, overflow = model_inputs(chunk["data"], chunk["window"], chunk["valid"], chunk["valid_input"], spec, cw)
    batches, n_tiles, skipped = tile_batches(plan, i, j, valid, runtime.batch_size)
    stats = {"tiles": n_tiles, "tiles_skipped": skipped, "read_s": chunk["read_s"], "overflow": overflow, "nonfinite": 0}
    model_t: dict[str, float] = {"forward_s": 0.0, "wait_s": 0.0}
    report = TileReport(channel)
    report.add(skipped)  # nothing to segment in those: done
    run = _Forward(predictor, runtime, inputs, model_t, report)
    if blend == "crop":
        out = _crop(run, batches, cw, valid, n_classes, probabilities)
        stats["nonfinite"] = out.pop("nonfinite")
    else:
        out = _accumulate(run, batches, plan.accumulator_window(i, j), plan.halo, n_classes)
        out["valid"] = valid
    report.flush()
    blend_s = out.pop("blend_s")
    stats.update(predict_s=model_t["forward_s"], wait_s=model_t["wait_s"], blend_s=blend_s, total_s=time.perf_counter() - t0)
    return {**out, "stats": stats}


class _Forward:
    """The model on batches of a chunk's tiles: inputs made from the chunk's raw values, times summed in ``timings``,
    each batch's tiles reported done.
    """

    def __init__(self, predictor: Any, runtime: Runtime, inputs: TileInputs, timings: dict, report: TileReport) -> None:
        self.predictor, self.runtime, self.inputs, self.timings = predictor, runtime, inputs, timings
        self.report = report

    def __call__(self, batch: list, want: str) -> np.ndarray:
        x = self.inputs.batch(batch)
        y = self.predictor(x, want=want, timings=self.timings, size=_model_size(self.runtime), tta=self.runtime.tta)
        self.report.add(len(batch))
        return y


def _crop(run: _Forward, batches: list, cw: Window, valid: np.ndarray, n_classes: int, probabilities: bool) -> dict:
    """``blend="crop"``: each tile's core written straight into the chunk, which is then final.

    Returns ``mask``, ``probs`` (None without probabilities), ``nonfinite`` (valid pixels
    the model gave NaN/Inf: nodata in both) and ``blend_s``.
    """
    mask = np.full(cw.shape, NODATA, dtype=np.uint8)
    probs = np.full((n_classes, *cw.shape), np.nan, dtype=np.float32) if probabilities else None
    # classes come from the logits here (not from the device's argmax) so NaN/Inf outputs are seen:
    # an argmax would silently make them a class
    for batch in batches:
        y = run(batch, "probs" if probabilities else "logits")
        if not probabilities:
            finite = np.isfinite(y).all(axis=1)
            cut = run.runtime.threshold
            if finite.all():
                y = run.predictor._finish(y, "classes", cut)
            else:
                y = np.where(finite, run.predictor._finish(np.nan_to_num(y), "classes", cut), NODATA).astype(np.uint8)
        for t, out in zip(batch, y, strict=True):
            rs, cs = t.core.slices(t.input)
            dst = t.core.slices(cw)
            if probabilities:
                probs[(slice(None), *dst)] = out[:, rs, cs]
            else:
                mask[dst] = out[rs, cs]
    if probabilities:
        bad = valid & ~np.isfinite(probs).all(axis=0)
        valid = valid & ~bad  # a model that outputs NaN gives nodata, in both files (counted, reported)
        mask = np.where(valid, binary_classes(np.nan_to_num(probs, nan=-1.0), run.runtime.threshold, 0), NODATA)
        mask = mask.astype(np.uint8)
        probs[:, ~valid] = np.nan
    else:
        bad = valid & (mask == NODATA)
        mask[~valid] = NODATA
    return {"mask": mask, "probs": probs, "nonfinite": int(bad.sum()), "blend_s": 0.0}


def _accumulate(run: _Forward, batches: list, acc_win: Window, halo: int, n_classes: int) -> dict:
    """``blend="cosine"``: each tile's probabilities weighted and summed over the chunk grown by the halo.

    :func:`blend_chunk` adds the neighbours' overlaps and normalises. Returns ``acc``,
    ``wsum``, ``window`` and ``blend_s``.
    """
    acc = np.zeros((n_classes, *acc_win.shape), dtype=np.float32)
    wsum = np.zeros(acc_win.shape, dtype=np.float32)
    blend_s = 0.0
    for batch in batches:
        y = run(batch, "probs")
        tb = time.perf_counter()
        for t, out in zip(batch, y, strict=True):
            part = t.input.intersection(acc_win)
            w = np.outer(blend_window_1d(t.input.height, halo), blend_window_1d(t.input.width, halo))
            src = part.slices(t.input)
            dst = part.slices(acc_win)
            acc[(slice(None), *dst)] += out[(slice(None), *src)] * w[src]
            wsum[dst] += w[src]
        blend_s += time.perf_counter() - tb
    return {"acc": acc, "wsum": wsum, "window": acc_win, "blend_s": blend_s}


def blend_chunk(
    own: dict[str, Any],
    neighbours: list[dict[str, Any]],
    plan: TilePlan,
    i: int,
    j: int,
    probabilities: bool,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Finish chunk ``(i, j)`` under cosine blending: sum every accumulator that overlaps it
    (its own and its neighbours'), divide by the summed weights, take the argmax (or a binary
    model's ``threshold``).
    """
    t0 = time.perf_counter()
    cw = plan.chunk_window(i, j)
    n_classes = own["acc"].shape[0]
    acc = np.zeros((n_classes, *cw.shape), dtype=np.float32)
    wsum = np.zeros(cw.shape, dtype=np.float32)
    for part in [own, *neighbours]:
        inter = part["window"].intersection(cw)
        if inter.empty:
            continue
        src = inter.slices(part["window"])
        dst = inter.slices(cw)
        acc[(slice(None), *dst)] += part["acc"][(slice(None), *src)]
        wsum[dst] += part["wsum"][src]
    probs = acc / np.where(wsum > 0, wsum, 1.0)
    finite = np.isfinite(probs).all(axis=0)
    valid = own["valid"] & (wsum > 0)
    bad = valid & ~finite  # NaN/Inf from the model: nodata, counted and reported, never a class
    valid &= finite
    scores = probs if not bad.any() else np.nan_to_num(probs, nan=-1.0)
    mask = np.where(valid, binary_classes(scores, threshold, 0), NODATA).astype(np.uint8)
    stats = dict(own["stats"])
    stats["nonfinite"] = int(bad.sum())
    stats["blend_s"] += time.perf_counter() - t0
    if probabilities:
        probs[:, ~valid] = np.nan
        return {"mask": mask, "probs": probs, "stats": stats}
    return {"mask": mask, "probs": None, "stats": stats}


def strip(result: dict[str, Any], target: Window) -> dict[str, Any]:
    """The part of a blend accumulator that falls on another chunk (runs where the data is,
    so only halo strips cross between workers).
    """
    inter = result["window"].intersection(target)
    src = inter.slices(result["window"])
    return {"acc": result["acc"][(slice(None), *src)].copy(), "wsum": result["wsum"][src].copy(), "window": inter}
