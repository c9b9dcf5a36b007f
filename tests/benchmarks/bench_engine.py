"""On-demand engine benchmark: geoseg end to end against the model alone and a hand-written loop.

Run from the repository root (takes many minutes at the default sizes)::

    python tests/benchmarks/bench_engine.py                      # 8192² RGB uint8 + 20000² 4-band uint16
    python tests/benchmarks/bench_engine.py --size 4096 --big 0  # quicker, no big raster
    python tests/benchmarks/bench_engine.py --backends onnx --check  # exit 1 when a target is missed

What it measures, on a generated ``SIZE x SIZE`` RGB uint8 raster (deflate, 512x512 blocks,
EPSG:32633) and a fixed 3-level U-Net (see ``unet.py``), for each backend (TorchScript,
ONNX through onnxruntime):

* **geoseg end-to-end**: ``geoseg.segment``, what ``geoseg predict`` runs (read -> predict -> stitch ->
  COG, run.json, style, STAC item) on the default scheduler; wall time from before the scheduler
  starts to after ``segment()`` returns, and the same without the scheduler's start-up.
* **model-alone ceiling**: exactly the input shapes geoseg's tile plan forwards (halos
  included, edge tiles shrunk), forwarded from memory (one random float32 array per
  distinct shape) at batch size 1 with the same thread count, in one process, with glibc's malloc
  tuned as geoseg tunes it for that runtime (``geoseg.models.loading.tune_malloc``).
* **hand-written loop**: the simplest rasterio loop: boundless 512x512 read around each
  448x448 core -> float32 -> forward -> argmax -> write the centre crop into a tiled
  deflate GeoTIFF. One process.
* **GeoDeep** (ONNX only; skipped with a note when ``geodeep`` is not installed): the peer
  tool run as its own CLI does for ``-t mask``, ``geodeep.run(raster, model,
  output_type="raw", max_threads=THREADS)`` then ``geodeep.segmentation.save_mask_to_raster``
  (the source's profile: deflate, 512x512 tiles), on the same raster and the same network:
  a copy of the ONNX model with GeoDeep's metadata (``model_type`` Segmentor, 512 px
  tiles, ``tiles_overlap`` = 2 x halo / tile = 12.5 %, ``resolution`` = the raster's pixel
  size so nothing is resampled, no small-segment sieve) and a thin wrapper GeoDeep's
  conventions need (a fixed 1x3x512x512 input, since GeoDeep takes its tile size from the
  input shape; x255 in front, since GeoDeep feeds uint8 bands divided by 255; Softmax
  behind, since GeoDeep zeroes scores under ``seg_thresh`` before its argmax). Same
  weights, same convolution FLOPs; GeoDeep is only run, never imported by geoseg. Its
  imports stay off the clock; its 5x5 median filter over the whole mask (always applied)
  uses SciPy when installed, else a NumPy fallback that copies the mask 25 times (slower,
  and a much higher peak): the table says which one ran.
* **peak memory** of each run's whole process tree (RSS of the process and all its
  children, summed, sampled every 0.1 s), and the **CPU seconds** the tree used in the timed part
  (on a machine whose cores the forward pass already fills, what a run spends beyond the ceiling's
  CPU seconds is what lengthens its wall time).

Each run is a fresh subprocess of this script (``--run e2e|ceiling|hand|geodeep``) so that peaks
never accumulate across runs. With ``--repeat N`` the runs go round-robin, N rounds of every
measurement, and each ratio (to the ceiling, to GeoDeep) is the median of the rounds' own ratios:
on a shared host whose speed drifts by 10 % within minutes, a ratio of runs made minutes apart
measured the drift. Before each run the script waits (``--wait-idle``, up to 60 s)
for an idle CPU, and the table's last column says how much CPU other processes (or the
hypervisor) took during the run: timings beside a high figure there are pessimistic.

With ``--big N`` (default 20000) the same is done for an ``N x N`` 4-band uint16 raster
(geoseg end-to-end with ONNX only, by default), against the guarantee "peak memory under
3 GiB for the whole process tree". Results are printed as Markdown tables and written to
``OUT_DIR/bench_results.json``. The GeoDeep figures quoted in ``PEERS.md`` (measured
earlier, elsewhere) stay only as a footnote under the main table.

Only the standard library is imported at module level: Dask's worker processes are
spawned and import this script as their ``__main__``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULT_TAG = "BENCH_RESULT "
#: how a model runs: the file it is (TorchScript or ONNX), the runtime, and the precision asked for
BACKENDS = ("torchscript", "onnx", "openvino", "torchscript-fast", "openvino-fast")
BACKEND_FILE = {b: "torchscript" if b.startswith("torchscript") else "onnx" for b in BACKENDS}
#: ``GEOSEG_ONNX_BACKEND`` for each ONNX backend (geoseg picks OpenVINO by itself when it is installed)
ONNX_RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino", "openvino-fast": "openvino"}
RUNS = ("e2e", "e2e_local", "e2e_threads", "ceiling", "hand", "geodeep")
E2E_RUNS = ("e2e", "e2e_local", "e2e_threads")
RUN_LABELS = {
    "e2e": "geoseg end-to-end (default: scheduler auto)",
    "e2e_local": "geoseg end-to-end (local cluster of worker processes)",
    "e2e_threads": "geoseg end-to-end (in-process threads scheduler)",
    "ceiling": "model-alone ceiling",
    "hand": "hand-written rasterio loop",
    "geodeep": "GeoDeep (geodeep.run + save_mask_to_raster)",
}
MODEL_EXT = {"torchscript": "pt", "onnx": "onnx"}
#: GeoDeep (onnxruntime) as quoted in PEERS.md, {size: (MP/s, peak MiB)}: a footnote only, the
#: comparisons use the ``geodeep`` run measured here.
GEODEEP_LITERATURE = {4096: (2.58, 390), 8192: (2.48, 494)}
TARGET_RATIO = 0.95
#: the default path against GeoDeep (speed), the fast precision against GeoDeep, and mask agreement floors
GEODEEP_SPEEDUP, FAST_SPEEDUP = 1.2, 2.0
AGREE_FP32, AGREE_FAST = 0.999, 0.995
BIG_LIMIT_MIB = 3 * 1024


# --------------------------------------------------------------------------------------
# Peak memory of a process tree
# --------------------------------------------------------------------------------------
class PeakMemory:
    """Samples the summed RSS of this process and all its descendants in a background thread."""

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.peak_by_process: dict[str, int] = {}
        self.samples = 0
        self.cpu_by_pid: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-memory", daemon=True)

    def sample(self) -> int:
        """Take one sample now; returns the summed RSS in bytes."""
        psutil = self._psutil
        total = 0
        parts: dict[str, int] = {}
        try:
            procs = [self._proc, *self._proc.children(recursive=True)]
        except psutil.Error:
            procs = [self._proc]
        for p in procs:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    cpu = p.cpu_times()
                    name = p.name()
            except psutil.Error:  # exited between listing and reading
                continue
            total += rss
            parts[f"{p.pid} {name}"] = rss
            self.cpu_by_pid[p.pid] = cpu.user + cpu.system
        self.samples += 1
        if total > self.peak:
            self.peak = total
            self.peak_by_process = parts
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_mib(self) -> float:
        """Peak summed RSS in MiB."""
        return self.peak / 2**20

    @property
    def cpu_s(self) -> float:
        """CPU seconds (user + system) used by every process of the tree, from its start."""
        return sum(self.cpu_by_pid.values())


def tree_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process and its live descendants (Dask workers)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


# --------------------------------------------------------------------------------------
# Inputs: rasters and models
# --------------------------------------------------------------------------------------
def _smooth_field(rng, height: int, width: int, cell: int):
    """A coarse random grid for one band, bilinearly upsampled later strip by strip."""
    return rng.random((height // cell + 2, width // cell + 2), dtype="float32")


def _upsample_rows(grid, rows, cols, cell: int):
    """Bilinear interpolation of ``grid`` (one value per ``cell`` pixels) at pixel rows x cols."""
    import numpy as np

    fy = rows / cell
    y0 = np.floor(fy).astype(np.int64)
    wy = (fy - y0).astype(np.float32)[:, None]
    strip = grid[y0] * (1 - wy) + grid[y0 + 1] * wy  # (len(rows), gw)
    fx = cols / cell
    x0 = np.floor(fx).astype(np.int64)
    wx = (fx - x0).astype(np.float32)[None, :]
    return strip[:, x0] * (1 - wx) + strip[:, x0 + 1] * wx


def make_raster(path: Path, size: int, bands: int, dtype: str, seed: int = 7) -> Path:
    """Write a ``size x size`` smooth-noise GeoTIFF (deflate, 512x512 blocks, EPSG:32633) strip by strip.

    Reused when a raster of the right shape and type is already there. Written under a
    temporary name and renamed, so an interrupted run never leaves a half raster to reuse.
    """
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    if path.exists():
        try:
            with rasterio.open(path) as ds:
                if (ds.width, ds.height, ds.count, ds.dtypes[0]) == (size, size, bands, dtype):
                    return path
        except rasterio.errors.RasterioIOError:
            pass
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    scale = 255.0 if dtype == "uint8" else 4000.0  # reflectance-like range for uint16
    cells = (512, 64)  # two octaves of value noise: fields, then parcels
    grids = [[(_smooth_field(rng, size, size, c), w) for c, w in zip(cells, (0.6, 0.3), strict=True)] for _ in range(bands)]
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": bands,
        "dtype": dtype,
        "crs": "EPSG:32633",
        "transform": Affine(1.0, 0.0, 400000.0, 0.0, -1.0, 5000000.0),  # 1 m pixels
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "interleave": "pixel",
        "BIGTIFF": "IF_SAFER",
        "NUM_THREADS": "ALL_CPUS",
    }
    tmp = path.with_name(f".{path.name}.tmp")
    cols = np.arange(size, dtype=np.float64)
    with rasterio.Env(GDAL_CACHEMAX=256), rasterio.open(tmp, "w", **profile) as dst:
        for r0 in range(0, size, 512):
            h = min(512, size - r0)
            rows = np.arange(r0, r0 + h, dtype=np.float64)
            out = np.empty((bands, h, size), dtype=dtype)
            for b in range(bands):
                v = np.zeros((h, size), dtype=np.float32)
                for (grid, weight), cell in zip(grids[b], cells, strict=True):
                    v += weight * _upsample_rows(grid, rows, cols, cell)
                v += 0.1 * rng.random((h, size), dtype=np.float32)  # fine texture, as imagery has
                out[b] = np.clip(v * scale, 0, np.iinfo(dtype).max).astype(dtype)
            dst.write(out, window=Window(0, r0, size, h))
    os.replace(tmp, path)
    print(f"# wrote {path.name} ({size}x{size}x{bands} {dtype}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def _unet():
    """The ``unet`` module next to this file, whether imported as a package or run as a script."""
    if __package__:
        from . import unet
    else:
        sys.path.insert(0, str(HERE))
        import unet
    return unet


def make_models(out_dir: Path, bands: int) -> dict[str, Any]:
    """Export the benchmark U-Net for ``bands`` input bands to TorchScript and ONNX; count its FLOPs."""
    unet = _unet()
    net = unet.build(in_ch=bands)
    paths = {
        "torchscript": unet.export_torchscript(net, str(out_dir / f"unet{bands}.pt"), in_ch=bands),
        "onnx": unet.export_onnx(net, str(out_dir / f"unet{bands}.onnx"), in_ch=bands),
    }
    return {"paths": paths, "gflop_per_tile": unet.count_flops(net, (1, bands, 512, 512)) / 1e9}


def geodeep_available() -> str | None:
    """GeoDeep's version when it can be imported, else None."""
    try:
        import geodeep  # noqa: F401  (AGPL peer tool: only run for comparison, never used by geoseg)
    except ImportError:
        return None
    from importlib.metadata import version

    return version("geodeep")


def make_geodeep_model(onnx_path: str, out_path: Path, raster: Path, tile: int, halo: int) -> str:
    """A copy of the benchmark ONNX model that GeoDeep runs as a segmentor on ``raster`` with our tiling.

    GeoDeep reads its settings from the model's custom metadata (JSON-encoded values) and
    its tile size from the input's last dimension, so the copy gets a fixed ``1 x C x tile x
    tile`` input. GeoDeep feeds uint8 bands divided by 255 and zeroes scores under
    ``seg_thresh`` (0.5) before its argmax, so the network (same initializers, same nodes)
    is wrapped between a ``x255`` Mul, restoring the raw band values it was built for, and a
    Softmax over the classes: the argmax of two-class probabilities >= 0.5 is the argmax of
    the logits, as in geoseg and the hand loop. ``tiles_overlap`` (percent of the tile) is
    set to ``2 x halo``: GeoDeep trims half the overlap from each inner tile side, i.e. a
    ``halo`` px margin. ``resolution`` (cm/px) is the raster's own, computed as GeoDeep
    does, so it never resamples.
    """
    import onnx
    import rasterio
    from onnx import TensorProto, helper

    with rasterio.open(raster) as ds:
        res_cm = round(max(abs(ds.transform[0]), abs(ds.transform[4])), 4) * 100  # as geodeep.run computes it
    model = onnx.load(onnx_path)
    graph = model.graph
    (inp,) = graph.input
    (out,) = graph.output
    bands = inp.type.tensor_type.shape.dim[1].dim_value
    classes = out.type.tensor_type.shape.dim[1].dim_value
    image, probs = "image", "probs"
    graph.initializer.append(helper.make_tensor("pixel_scale", TensorProto.FLOAT, [], [255.0]))
    graph.node.insert(0, helper.make_node("Mul", [image, "pixel_scale"], [inp.name], name="geodeep_unscale"))
    graph.node.append(helper.make_node("Softmax", [out.name], [probs], axis=1, name="geodeep_softmax"))
    graph.input.remove(inp)
    graph.input.append(helper.make_tensor_value_info(image, TensorProto.FLOAT, [1, bands, tile, tile]))
    graph.output.remove(out)
    graph.output.append(helper.make_tensor_value_info(probs, TensorProto.FLOAT, [1, classes, tile, tile]))
    meta = {
        "model_type": "Segmentor",
        "tiles_overlap": 100.0 * 2 * halo / tile,
        "resolution": res_cm,
        "class_names": {str(i): f"class{i}" for i in range(classes)},
        "seg_thresh": 0.5,
        "seg_small_segment": 0,  # no sieve: geoseg and the hand loop write the raw argmax
    }
    for key, value in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=json.dumps(value)))
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return str(out_path)


# --------------------------------------------------------------------------------------
# The measured runs (each in its own subprocess)
# --------------------------------------------------------------------------------------
def _plan(height: int, width: int, tile: int, halo: int, chunk: int):
    from geoseg.grid import TilePlan, Window

    return TilePlan(height, width, Window(0, 0, height, width), tile=tile, halo=halo, chunk=chunk, size_multiple=32)


def _forward_fn(backend: str, model: str, threads: int):
    """``f(x) -> logits`` for a float32 NCHW numpy batch, with the backend's intra-op threads set."""
    if backend == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def run_onnx(x):
            return sess.run(None, {name: x})[0]

        return run_onnx, {"onnxruntime": ort.__version__}
    if backend.startswith("openvino"):
        import openvino as ov

        from geoseg.models.loading import cpu_has_bf16

        bf16 = backend.endswith("-fast") and cpu_has_bf16()
        config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "INFERENCE_NUM_THREADS": threads}
        request = ov.Core().compile_model(model, "CPU", {**config, "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()

        def run_openvino(x):
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()

        return run_openvino, {"openvino": ov.__version__, "precision": "bf16" if bf16 else "fp32"}

    import torch

    from geoseg.models.loading import cpu_has_bf16

    torch.set_num_threads(threads)
    net = torch.jit.load(model, map_location="cpu").eval()
    autocast = backend.endswith("-fast") and cpu_has_bf16()

    def run_torch(x):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return net(torch.from_numpy(x)).float().numpy()

    return run_torch, {"torch": torch.__version__, "precision": "bf16" if autocast else "fp32"}


def run_e2e(args: argparse.Namespace) -> dict[str, Any]:
    """geoseg.segment (what ``geoseg predict`` runs) on the default scheduler (or the one ``--run`` names)."""
    import rasterio

    t_import = time.perf_counter()
    import geoseg
    import geoseg.engine  # geoseg itself (dask, distributed load lazily, on the clock)
    from geoseg.engine.preflight import count_chunks
    from geoseg.grid import Window

    import_s = time.perf_counter() - t_import
    out = Path(args.work)
    t0, cpu0 = time.perf_counter(), tree_cpu_s()
    kind = {"e2e": "auto", "e2e_local": "local", "e2e_threads": "threads"}[args.run]
    with rasterio.open(args.raster) as ds:
        chunks = count_chunks(Window(0, 0, ds.height, ds.width), args.chunk or None)  # as `geoseg predict` sizes `auto`
    with geoseg.scheduler(kind, workers=args.workers, device="cpu", chunks=chunks) as sched:
        t1 = time.perf_counter()
        done = geoseg.segment(  # what `geoseg predict` runs: the mask, run.json, its style and STAC item
            args.raster,
            args.model,
            out,
            overwrite=True,
            tile=args.tile,
            halo=args.halo,
            chunk=args.chunk or None,  # None: geoseg's own default
            batch_size=1,
            device="cpu",
            num_threads=args.threads or sched.num_threads,
            precision="fast" if args.backend.endswith("-fast") else "fp32",
        )
        report = done.run
        t2, cpu2 = time.perf_counter(), tree_cpu_s()
    t3 = time.perf_counter()
    with rasterio.open(out / "mask.tif") as ds:
        shape = (ds.height, ds.width)
    return {
        "seconds": t2 - t0,
        "cpu_s": cpu2 - cpu0,
        "seconds_excl_start": t2 - t1,
        "cluster_start_s": t1 - t0,
        "cluster_close_s": t3 - t2,
        "import_s": import_s,
        "workers": sched.workers,
        "threads": args.threads or sched.num_threads,
        "tiles": report.get("tiles", {}).get("total"),
        "tiles_skipped": report.get("tiles", {}).get("skipped_empty"),
        "output_shape": list(shape),
        "geoseg_timings": report.get("timings", {}),
        "chunk_px": report.get("parameters", {}).get("chunk"),
        "backend_version": report.get("model", {}).get("backend"),
        "scheduler": {"kind": sched.kind, "processes": sched.processes, "auto": sched.auto},
        "mask": str(out / "mask.tif"),
    }


def run_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    """Forward exactly the plan's tile shapes from memory, batch 1, one process."""
    import numpy as np
    import rasterio

    with rasterio.open(args.raster) as ds:
        height, width, bands = ds.height, ds.width, ds.count
    from geoseg.engine.plan import DEFAULT_CHUNK

    plan = _plan(height, width, args.tile, args.halo, args.chunk or DEFAULT_CHUNK)  # the tiles do not depend on it
    shapes = [t.input.shape for i, j in plan.iter_chunks() for t in plan.tiles(i, j)]
    rng = np.random.default_rng(0)
    arrays = {s: (rng.random((1, bands, *s), dtype=np.float32) * 255.0) for s in sorted(set(shapes))}
    threads = args.threads or os.cpu_count() or 1
    from geoseg.models.loading import tune_malloc

    # the process's malloc set as geoseg sets it for this runtime: without it torch maps and unmaps each
    # activation afresh, and its "ceiling" was 10 % slower than geoseg's own run of the same forwards
    tune_malloc(64 if args.backend.startswith("torchscript") else 16)
    forward, versions = _forward_fn(args.backend, args.model, threads)
    tw = time.perf_counter()
    for x in arrays.values():  # warm-up: one untimed pass per distinct shape
        forward(x)
    warmup_s = time.perf_counter() - tw
    t0, cpu0 = time.perf_counter(), tree_cpu_s()
    for s in shapes:
        forward(arrays[s])
    seconds, cpu_s = time.perf_counter() - t0, tree_cpu_s() - cpu0
    counts: dict[str, int] = {}
    for s in shapes:
        counts[f"{s[0]}x{s[1]}"] = counts.get(f"{s[0]}x{s[1]}", 0) + 1
    return {
        "seconds": seconds,
        "cpu_s": cpu_s,
        "warmup_s": warmup_s,
        "threads": threads,
        "tiles": len(shapes),
        "tile_shapes": counts,
        "input_px": int(sum(s[0] * s[1] for s in shapes)),
        "chunk_px": plan.chunk_px,
        "versions": versions,
    }


def run_hand(args: argparse.Namespace) -> dict[str, Any]:
    """The simplest rasterio loop: boundless read, forward, argmax, write the centre crop."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    threads = args.threads or os.cpu_count() or 1
    forward, versions = _forward_fn(args.backend, args.model, threads)
    tile, halo = args.tile, args.halo
    core = tile - 2 * halo
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    dst_path = out / "hand_mask.tif"
    n = 0
    t0 = time.perf_counter()
    with rasterio.open(args.raster) as src:
        profile = {
            "driver": "GTiff",
            "width": src.width,
            "height": src.height,
            "count": 1,
            "dtype": "uint8",
            "crs": src.crs,
            "transform": src.transform,
            "tiled": True,
            "blockxsize": 512,
            "blockysize": 512,
            "compress": "deflate",
        }
        with rasterio.open(dst_path, "w", **profile) as dst:
            for r in range(0, src.height, core):
                for c in range(0, src.width, core):
                    win = Window(c - halo, r - halo, tile, tile)
                    x = src.read(window=win, boundless=True, fill_value=0).astype(np.float32)[None]
                    y = forward(x)
                    cls = y[0].argmax(0).astype(np.uint8)
                    h, w = min(core, src.height - r), min(core, src.width - c)
                    dst.write(cls[halo : halo + h, halo : halo + w], 1, window=Window(c, r, w, h))
                    n += 1
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "threads": threads, "tiles": n, "versions": versions}


def run_geodeep(args: argparse.Namespace) -> dict[str, Any]:
    """GeoDeep as its CLI does ``-t mask``: ``geodeep.run(..., output_type="raw")``, then ``save_mask_to_raster``.

    (``output_type="mask"`` is a CLI choice only: ``run`` itself rejects it for segmentors.)
    GeoDeep's own functions are wrapped, not changed, to split the wall time: the forward
    passes (``session.run``), the 5x5 median filter it always applies to the whole mask, and
    the small-segment sieve (off in the benchmark's model copy).
    """
    from importlib.metadata import version

    import rasterio

    t_import = time.perf_counter()  # GeoDeep's imports (onnxruntime among them) stay off the clock
    import geodeep
    import geodeep.geodeep as gd
    import onnxruntime as ort
    from geodeep.segmentation import save_mask_to_raster

    import_s = time.perf_counter() - t_import
    spent = {"forward_s": 0.0, "median_filter_s": 0.0, "sieve_s": 0.0}
    calls = {"forward": 0}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t

        return wrapper

    class TimedSession:
        def __init__(self, session) -> None:
            self._session = session

        def run(self, *a, **kw):
            calls["forward"] += 1
            t = time.perf_counter()
            try:
                return self._session.run(*a, **kw)
            finally:
                spent["forward_s"] += time.perf_counter() - t

        def __getattr__(self, name: str):
            return getattr(self._session, name)

    create_session = gd.create_session
    median_impl = gd.median_filter.__module__  # scipy.ndimage when SciPy is installed, else GeoDeep's NumPy fallback

    def create_timed_session(*a, **kw):
        session, config = create_session(*a, **kw)
        return TimedSession(session), config

    gd.create_session = create_timed_session
    gd.median_filter = timed(gd.median_filter, "median_filter_s")
    gd.filter_small_segments = timed(gd.filter_small_segments, "sieve_s")

    threads = args.threads or os.cpu_count() or 1
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    dst_path = out / "geodeep_mask.tif"
    t0, cpu0 = time.perf_counter(), tree_cpu_s()
    mask = geodeep.run(args.raster, args.model, output_type="raw", max_threads=threads)
    t1 = time.perf_counter()
    save_mask_to_raster(args.raster, mask, str(dst_path))
    t2, cpu2 = time.perf_counter(), tree_cpu_s()
    with rasterio.open(dst_path) as ds:
        written = {
            "shape": [ds.height, ds.width],
            "dtype": ds.dtypes[0],
            "compress": str(ds.compression),
            "block": ds.block_shapes[0],
        }
    return {
        "seconds": t2 - t0,
        "cpu_s": cpu2 - cpu0,
        "run_s": t1 - t0,
        "write_s": t2 - t1,
        "import_s": import_s,
        **spent,
        "threads": threads,
        "tiles": calls["forward"],
        "tile": args.tile,
        "halo": args.halo,
        "output_shape": written["shape"],
        "output": written,
        "classes_seen": sorted(set(mask[::16, ::16].ravel().tolist())),  # a sample: no big copies
        "versions": {"geodeep": version("geodeep"), "onnxruntime": ort.__version__},
        "median_filter_impl": median_impl,
    }


def child_main(args: argparse.Namespace) -> None:
    """One measured run: print its result as one JSON line tagged ``BENCH_RESULT``."""
    fn = {"ceiling": run_ceiling, "hand": run_hand, "geodeep": run_geodeep}.get(args.run, run_e2e)
    with PeakMemory() as mem:
        res = fn(args)
    res.update(
        run=args.run,
        backend=args.backend,
        peak_mib=mem.peak_mib,
        memory_samples=mem.samples,
        peak_by_process_mib={k: round(v / 2**20, 1) for k, v in sorted(mem.peak_by_process.items(), key=lambda kv: -kv[1])},
    )
    print(RESULT_TAG + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------
# The parent: prepare inputs, run each measurement in a subprocess, print tables
# --------------------------------------------------------------------------------------
def _spawn(args: argparse.Namespace, run: str, backend: str, raster: Path, model: str, work: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--run",
        run,
        "--backend",
        backend,
        "--raster",
        str(raster),
        "--model",
        model,
        "--work",
        str(work),
        "--tile",
        str(args.tile),
        "--halo",
        str(args.halo),
        "--chunk",
        str(args.chunk or 0),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    import psutil

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"# {RUN_LABELS[run]} ({backend}) on {raster.name} ...", file=sys.stderr, flush=True)
    waited = _wait_idle(args.wait_idle)
    cpu0, own0, t0 = psutil.cpu_times(), os.times(), time.perf_counter()
    env = dict(os.environ)
    if backend in ONNX_RUNTIME:
        env["GEOSEG_ONNX_BACKEND"] = ONNX_RUNTIME[backend]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(HERE.parent.parent), env=env)
    cpu1, own1, wall = psutil.cpu_times(), os.times(), time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"benchmark run {run}/{backend} failed (exit {proc.returncode}); see the log above")
    res = json.loads(lines[-1][len(RESULT_TAG) :])
    res["load_before"] = load
    res["waited_for_idle_s"] = waited
    # CPU time other processes took while this run ran: all busy time minus this run's own
    # (children's user + system, the Dask workers included once they are reaped).
    busy = sum(getattr(cpu1, f) - getattr(cpu0, f) for f in ("user", "nice", "system", "irq", "softirq") if hasattr(cpu1, f))
    own = (own1.children_user - own0.children_user) + (own1.children_system - own0.children_system)
    res["other_cpu_share"] = max(0.0, busy - own) / (wall * (os.cpu_count() or 1))
    res["steal_share"] = (getattr(cpu1, "steal", 0.0) - getattr(cpu0, "steal", 0.0)) / (wall * (os.cpu_count() or 1))
    print(f"#   {res['seconds']:.1f} s, peak {res['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return res


def _wait_idle(limit_s: float, busy_pct: float = 15.0) -> float:
    """Wait (up to ``limit_s``) until the CPU is idle: under ``busy_pct`` % busy over one second."""
    import psutil

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        if psutil.cpu_percent(interval=1.0) < busy_pct:
            break
    else:
        if limit_s > 0:
            print(f"#   the CPU stayed busy for {limit_s:.0f} s; measuring anyway", file=sys.stderr, flush=True)
    return time.perf_counter() - t0


def _fmt(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _pct(r: dict) -> str:
    if "other_cpu_share" not in r:
        return ""
    return f"{r['other_cpu_share'] + r.get('steal_share', 0.0):.0%}"


def _bench_raster(
    args, label: str, raster: Path, models: dict, backends: list[str], runs: list[str], size: int, bands: int
) -> dict:
    mp = size * size / 1e6
    rows = []
    notes = []
    onnx_backends = [b for b in backends if BACKEND_FILE[b] == "onnx"]
    if "geodeep" in runs and onnx_backends:
        skip = None
        if geodeep_available() is None:
            skip = "GeoDeep not measured: `geodeep` is not installed (`pip install geodeep`)."
        elif bands != 3:
            skip = f"GeoDeep not measured: it feeds a model 3 bands (RGB) only, this raster has {bands}."
        if skip:
            print(f"# {skip}", file=sys.stderr, flush=True)
            notes.append(skip)
            runs = [r for r in runs if r != "geodeep"]
        else:
            gd_model = Path(args.out_dir) / f"unet{bands}_geodeep.onnx"
            models["paths"]["geodeep"] = make_geodeep_model(models["paths"]["onnx"], gd_model, raster, args.tile, args.halo)
    jobs = [(b, r) for b in backends for r in runs if not (r == "geodeep" and b != onnx_backends[0])]  # GeoDeep: once
    tries: dict[tuple[str, str], list[dict]] = {job: [] for job in jobs}
    for _ in range(args.repeat):  # round-robin, so that every ratio compares runs of the same minutes
        for backend, run in jobs:
            work = Path(args.out_dir) / f"out-{label}-{run}-{backend}"
            model = models["paths"]["geodeep" if run == "geodeep" else BACKEND_FILE[backend]]
            tries[(backend, run)].append(_spawn(args, run, backend, raster, model, work))
    for job in jobs:
        res = dict(sorted(tries[job], key=lambda r: r["seconds"])[len(tries[job]) // 2])  # the median run
        res["seconds_all"] = [r["seconds"] for r in tries[job]]  # in round order
        res["excl_start_all"] = [r.get("seconds_excl_start") for r in tries[job]]
        res["peak_mib_all"] = [round(r["peak_mib"]) for r in tries[job]]
        res["mp_per_s"] = mp / res["seconds"]
        if "seconds_excl_start" in res:
            res["mp_per_s_excl_start"] = mp / res["seconds_excl_start"]
        rows.append(res)
    by = {(r["run"], r["backend"]): r for r in rows}
    _agreement(rows)
    gd = next((r for r in rows if r["run"] == "geodeep"), None)
    for r in rows:
        ceil = by.get(("ceiling", r["backend"]))
        if ceil and r["run"] != "ceiling":
            r["vs_ceiling"] = _paired(ceil["seconds_all"], r["seconds_all"])
            if "mp_per_s_excl_start" in r:
                r["vs_ceiling_excl_start"] = _paired(ceil["seconds_all"], r["excl_start_all"])
        if gd is not None:
            r["x_geodeep"] = _paired(gd["seconds_all"], r["seconds_all"])
        if r["run"] == "ceiling":
            r["gflop_per_s"] = models["gflop_per_tile"] * r["input_px"] / (512 * 512) / r["seconds"]
    e2e_tiles = {r["tiles"] for r in rows if r["run"] in E2E_RUNS}
    ceil_tiles = {r["tiles"] for r in rows if r["run"] == "ceiling"}
    targets = _targets(by, backends, label == "big")
    return {
        "label": label,
        "raster": str(raster),
        "size": size,
        "bands": bands,
        "dtype": "uint8" if bands == 3 else "uint16",
        "megapixels": mp,
        "gflop_per_tile": models["gflop_per_tile"],
        "rows": rows,
        "tiles_match": None if not (e2e_tiles and ceil_tiles) else e2e_tiles == ceil_tiles,
        "targets": targets,
        "notes": notes,
    }


def _paired(reference_s: list[float], run_s: list[float]) -> float:
    """Median over the rounds of ``reference seconds / run seconds`` (the run's speed over the reference's).

    The runs are interleaved round by round (see :func:`_bench_raster`), so each round's pair ran in the same minutes:
    a machine whose speed drifts by 10 % over a quarter of an hour (a shared host) moves both of a pair.
    """
    import statistics

    return statistics.median(a / b for a, b in zip(reference_s, run_s, strict=True))


def _agreement(rows: list[dict]) -> None:
    """Each end-to-end mask's share of pixels equal to the reference fp32 mask (onnxruntime's, else the first fp32)."""
    import rasterio

    e2e = [r for r in rows if r["run"] in E2E_RUNS and r.get("mask")]
    fp32 = [r for r in e2e if not r["backend"].endswith("-fast")]
    ref = next((r for r in fp32 if r["backend"] == "onnx"), fp32[0] if fp32 else None)
    if ref is None:
        return
    with rasterio.open(ref["mask"]) as a:
        for r in e2e:
            same = total = 0
            with rasterio.open(r["mask"]) as b:
                for _, win in a.block_windows(1):
                    x, y = a.read(1, window=win), b.read(1, window=win)
                    same += int((x == y).sum())
                    total += x.size
            r["agreement"] = same / total
            r["agreement_ref"] = f"{RUN_LABELS[ref['run']]} ({ref['backend']})"


def _goal(what: str, value: float, ok: bool) -> dict[str, Any]:
    return {"what": what, "value": value, "ok": bool(ok)}


def _targets(by: dict, backends: list[str], big: bool) -> list[dict]:
    """The issue's goals for each end-to-end run: ceiling ratio, GeoDeep speed and memory, mask agreement."""
    out = []
    gd = next((r for (run, _), r in by.items() if run == "geodeep"), None)
    for b in backends:
        fast = b.endswith("-fast")
        ceil, hand = by.get(("ceiling", b)), by.get(("hand", b))
        for run in E2E_RUNS:
            e2e = by.get((run, b))
            if not e2e:
                continue
            tag = f"{b}, {RUN_LABELS[run].split('(', 1)[1].rstrip(')')}"
            if big:
                peak = e2e["peak_mib"]
                out.append(_goal(f"{tag}: peak memory under {BIG_LIMIT_MIB} MiB", peak, peak < BIG_LIMIT_MIB))
                continue
            if ceil:
                ratio = e2e["vs_ceiling"]
                out.append(_goal(f"{tag}: end-to-end >= {TARGET_RATIO} x its backend's ceiling", ratio, ratio >= TARGET_RATIO))
            if hand:
                speedup = e2e["mp_per_s"] / hand["mp_per_s"]
                out.append(_goal(f"{tag}: end-to-end faster than the hand-written loop (speed-up)", speedup, speedup > 1.0))
            if "agreement" in e2e:
                floor = AGREE_FAST if fast else AGREE_FP32
                out.append(_goal(f"{tag}: mask agreement >= {floor:.1%} with fp32", e2e["agreement"], e2e["agreement"] >= floor))
            if gd:  # measured here, same raster, same network, same thread count
                want = FAST_SPEEDUP if fast else GEODEEP_SPEEDUP
                x = e2e["x_geodeep"]
                out.append(_goal(f"{tag}: >= {want} x GeoDeep's {gd['mp_per_s']:.2f} MP/s", x, x >= want))
                mib = e2e["peak_mib"]
                out.append(_goal(f"{tag}: peak MiB <= GeoDeep's {gd['peak_mib']:.0f} MiB", mib, mib <= gd["peak_mib"]))
    return out


def format_table(t: dict) -> str:
    """One Markdown table (with a heading and the targets) for one raster."""
    shapes = next((r["tile_shapes"] for r in t["rows"] if r["run"] == "ceiling"), None)
    chunk = next((r["chunk_px"] for r in t["rows"] if r.get("chunk_px") and r["run"] in E2E_RUNS), None)
    n_tiles = next((r["tiles"] for r in t["rows"] if r["run"] in ("ceiling", *E2E_RUNS)), None)
    lines = [
        f"### {t['size']} x {t['size']} x {t['bands']} {t['dtype']} ({t['megapixels']:.1f} MP): "
        f"3-level U-Net (16 base channels), {t['gflop_per_tile']:.2f} GFLOP per {t['bands']}x512x512 tile",
        "",
    ]
    if shapes:
        lines += [
            f"Tiles 512 px, halo 32 px, geoseg's chunk {chunk or '?'} px; {n_tiles} tiles forwarded "
            f"({', '.join(f'{k}: {v}' for k, v in shapes.items())}).",
            "",
        ]
    lines += [
        "| run | backend | wall s (median, range) | CPU s | MP/s | MP/s excl. cluster start | peak MiB "
        "| ÷ its backend's ceiling | x GeoDeep | mask agreement | CPU taken by others |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in t["rows"]:
        ratio = _fmt(r.get("vs_ceiling"))
        x_gd = _fmt(r.get("x_geodeep"))
        agree = f"{r['agreement']:.2%}" if "agreement" in r else ""
        if "vs_ceiling_excl_start" in r:
            ratio += f" ({_fmt(r['vs_ceiling_excl_start'])} excl. start)"
        wall = _fmt(r["seconds"], 1)
        if len(r.get("seconds_all", [])) > 1:
            wall += f" ({min(r['seconds_all']):.1f}-{max(r['seconds_all']):.1f})"
        lines.append(
            f"| {RUN_LABELS[r['run']]} | {r['backend']} | {wall} | {_fmt(r.get('cpu_s'), 1)} | {_fmt(r['mp_per_s'])} | "
            f"{_fmt(r.get('mp_per_s_excl_start'))} | {r['peak_mib']:.0f} | {ratio} | {x_gd} | {agree} | {_pct(r)} |"
        )
    lines.append("")
    gd = next((r for r in t["rows"] if r["run"] == "geodeep"), None)
    if gd:
        scipy = gd["median_filter_impl"].startswith("scipy")
        impl = "scipy.ndimage" if scipy else "GeoDeep's NumPy fallback, SciPy not installed: an H x W x 25 copy"
        lines.append(
            f"GeoDeep {gd['versions']['geodeep']}: {gd['tiles']} windows of {gd['tile']}x{gd['tile']} forwarded "
            f"({2 * gd['halo']} px overlap, {gd['halo']} px trimmed per inner side), "
            f"{gd['forward_s']:.1f} s in the forward passes, "
            f"{gd['median_filter_s']:.1f} s in its 5x5 median filter over the whole mask ({impl}), "
            f"{gd['write_s']:.1f} s writing the mask."
        )
    if t["label"] != "big":
        lit = ", ".join(f"{mps} MP/s and {mib} MiB at {n}²" for n, (mps, mib) in GEODEEP_LITERATURE.items())
        lines.append(f"Literature (PEERS.md, measured earlier elsewhere, not by this run): GeoDeep {lit}.")
    lines += t.get("notes", [])
    lines.append("")
    if t["tiles_match"] is False:
        lines.append("**Warning:** geoseg forwarded a different number of tiles than the ceiling's plan.")
    for g in t["targets"]:
        lines.append(f"- {'PASS' if g['ok'] else 'FAIL'}: {g['what']} (got {g['value']:.2f})")
    busy = [(r["other_cpu_share"] + r.get("steal_share", 0.0), r) for r in t["rows"] if "other_cpu_share" in r]
    noisy = [f"{RUN_LABELS[r['run']]} ({r['backend']}) {share:.0%}" for share, r in busy if share > 0.05]
    if noisy:
        lines.append(f"- Note: other processes (or the hypervisor) took CPU during: {', '.join(noisy)}; those timings are low.")
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    import numpy as np
    import rasterio

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    for mod in ("torch", "onnxruntime", "openvino", "dask", "distributed", "psutil"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    from geoseg import __version__

    info["geoseg"] = __version__
    return info


def _csv(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (the ``--run`` group is for the measured subprocesses)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=8192, help="side of the RGB uint8 raster in pixels (default 8192)")
    p.add_argument("--big", type=int, default=20000, help="side of the 4-band uint16 raster; 0 skips it (default 20000)")
    p.add_argument(
        "--backends",
        default="onnx,openvino,openvino-fast,torchscript,torchscript-fast",
        help=f"backends for the main raster, from {', '.join(BACKENDS)} (default: all)",
    )
    p.add_argument("--runs", default="e2e,ceiling,geodeep", help=f"runs for the main raster, from {', '.join(RUNS)}")
    p.add_argument("--big-backends", default="onnx", help="backends for the big raster (default onnx)")
    p.add_argument("--big-runs", default="e2e", help="runs for the big raster (default e2e)")
    p.add_argument("--out-dir", default="/tmp/geoseg-bench", help="rasters, models, outputs and bench_results.json")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--halo", type=int, default=32)
    p.add_argument("--chunk", type=int, default=None, help="geoseg chunk [geoseg's own: 1536 on a CPU, 2048 on a GPU]")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: geoseg's choice, all cores)")
    p.add_argument("--workers", type=int, default=None, help="local cluster workers (default: geoseg's choice)")
    p.add_argument("--wait-idle", type=float, default=60.0, help="seconds to wait for an idle CPU before each run (default 60)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every measurement, interleaved; the table shows the median and the range, ratios are paired per round",
    )
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    g = p.add_argument_group("one measured run (used internally)")
    g.add_argument("--run", choices=RUNS)
    g.add_argument("--backend", choices=BACKENDS)
    g.add_argument("--raster")
    g.add_argument("--model")
    g.add_argument("--work")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables; return (and save) the results."""
    args = parse_args(argv)
    if args.run:
        child_main(args)
        return {}
    backends = _csv(args.backends, BACKENDS, "backends")
    runs = _csv(args.runs, RUNS, "runs")
    big_backends = _csv(args.big_backends, BACKENDS, "backends")
    big_runs = _csv(args.big_runs, RUNS, "runs")
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir = str(out_dir)

    results: dict[str, Any] = {"machine": _machine(), "args": vars(args), "tables": []}
    if args.size:
        raster = make_raster(out_dir / f"bench_{args.size}_rgb_uint8.tif", args.size, 3, "uint8")
        models = make_models(out_dir, 3)
        results["gflop_per_tile"] = models["gflop_per_tile"]
        results["tables"].append(_bench_raster(args, "main", raster, models, backends, runs, args.size, 3))
    if args.big:
        raster = make_raster(out_dir / f"bench_{args.big}_4band_uint16.tif", args.big, 4, "uint16")
        models = make_models(out_dir, 4)
        results["tables"].append(_bench_raster(args, "big", raster, models, big_backends, big_runs, args.big, 4))

    text = "\n\n".join(format_table(t) for t in results["tables"])
    print(text)
    results["markdown"] = text
    results["ok"] = all(g["ok"] for t in results["tables"] for g in t["targets"])
    with open(out_dir / "bench_results.json", "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nResults: {out_dir / 'bench_results.json'}", file=sys.stderr)
    if args.check and not results["ok"]:
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
