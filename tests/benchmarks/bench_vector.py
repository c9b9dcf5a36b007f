"""On-demand vectorisation benchmark: ``geoseg.vectorize`` on 1 and 2 workers against ``rasterio.features.shapes``.

Run from the repository root (minutes at 20000²)::

    python -m tests.benchmarks.bench_vector                        # 8192 x 8192
    python -m tests.benchmarks.bench_vector --size 2048 --chunk 512
    python -m tests.benchmarks.bench_vector --size 20000 --skip-whole

The input is a synthetic ``SIZE x SIZE`` class mask (single-band uint8 GeoTIFF, 512x512
deflate blocks, nodata 255, EPSG:32632, 1 m pixels, ``GEOSEG_CLASSES`` = background 0,
building 1, water 2) written strip by strip (2048 rows at a time, never the whole array) and
cached in ``--out-dir`` under a name keyed by its parameters. It holds:

* **buildings**: one axis-aligned rectangle (6 to 17 px a side) in 95 % of the cells of a
  19 px grid, always a pixel apart from its neighbours: about one million at 20000²;
* **water**: a river meandering from the top edge to the bottom one, and a few lobed blobs
  (radius 3 % to 7 % of the side, each with an island of untouched land inside) painted over
  the buildings, so the large polygons cross chunk seams, have holes, and cut buildings.

Everything is drawn from ``numpy.random.default_rng`` seeded by ``--seed``, the size and the
cell row, so a strip is the same whichever order strips are written in.

Runs, each in a fresh subprocess of this module (``--run NAME``) so peaks never accumulate:

* ``rasterio_whole``: the single-process baseline: read the whole mask, then
  ``rasterio.features.shapes(mask, mask=(mask != 0) & (mask != 255), connectivity=4)`` with
  every polygon turned into a shapely geometry and kept in a list (as a script that then
  writes them would). ``--skip-whole`` leaves it out.
* ``geoseg_1w`` and ``geoseg_2w``: ``geoseg.vectorize(mask, formats=["fgb"], project=False)``
  on ``geoseg.scheduler("local", workers=1|2, device="cpu")``. The timed span is the
  ``vectorize()`` call (read, polygonise, seam merge, attributes, FlatGeobuf); the cluster's
  start-up is a column of its own.
* ``writers``: one more ``vectorize()`` on the 2-worker cluster with
  ``formats=["geojson", "gpkg", "fgb"]``; its ``timings.write_<fmt>_s`` give each writer's
  throughput (features per second; GeoJSON includes the reprojection to EPSG:4326 and the
  coordinate rounding).

Peak memory is the summed RSS of the run's whole process tree (the Dask scheduler, nannies and
workers included), sampled every 0.1 s; the largest single process is reported beside it.
Polygon counts per class of every geoseg run are checked against the whole-raster ones (against
``geoseg_1w`` when the whole run is skipped). Before each run the script waits (``--wait-idle``)
for an idle CPU; the last column of the table says how much CPU other processes took during it
(all busy time minus the run's own process tree), and a note names the busiest of them.
Results are printed as Markdown and written to ``OUT_DIR/bench_vector.json``.

Only the standard library is imported at module level: Dask's worker processes are spawned
and import this module as their ``__main__``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULT_TAG = "BENCH_RESULT "
RUNS = ("rasterio_whole", "geoseg_1w", "geoseg_2w", "writers")
MAIN_RUNS = ("rasterio_whole", "geoseg_1w", "geoseg_2w")
GEOSEG_WORKERS = {"geoseg_1w": 1, "geoseg_2w": 2, "writers": 2}
RUN_FORMATS = {"geoseg_1w": ("fgb",), "geoseg_2w": ("fgb",), "writers": ("geojson", "gpkg", "fgb")}
RUN_LABELS = {
    "rasterio_whole": "rasterio.features.shapes, whole array, 1 process",
    "geoseg_1w": "geoseg.vectorize, local cluster, 1 worker",
    "geoseg_2w": "geoseg.vectorize, local cluster, 2 workers",
    "writers": "geoseg.vectorize, 2 workers, GeoJSON + GPKG + FGB",
}
FORMAT_EXT = {"geojson": ".geojson", "gpkg": ".gpkg", "fgb": ".fgb"}

#: the mask's classes (written as the ``GEOSEG_CLASSES`` tag)
CLASSES = [
    {"id": 0, "name": "background", "color": [0, 0, 0]},
    {"id": 1, "name": "building", "color": [230, 25, 75]},
    {"id": 2, "name": "water", "color": [0, 130, 200]},
]
BACKGROUND, BUILDING, WATER, NODATA = 0, 1, 2, 255
#: bump when the generator changes, so cached masks are regenerated
GENERATOR_VERSION = 1
CELL = 19  # building grid: one rectangle per cell, 6..CELL-2 px a side, at least 1 px from its neighbours
OCCUPANCY = 0.95
STRIP = 2048  # rows generated and written at a time
BLOCK = 512
MASK_TAG = "GEOSEG_BENCH_MASK"


def _tree_sampler():
    """The engine benchmark's sampler: peak RSS and CPU time of this process and its descendants."""
    try:
        from .bench_engine import PeakMemory
    except ImportError:  # run as a plain script
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.benchmarks.bench_engine import PeakMemory
    return PeakMemory()


# --------------------------------------------------------------------------------------
# The synthetic mask
# --------------------------------------------------------------------------------------
def mask_params(size: int, seed: int) -> dict[str, Any]:
    """Everything that shapes the mask: the cache key, and the water features (small lists)."""
    import numpy as np

    rng = np.random.default_rng([seed, size, 0])
    blobs = []
    for _ in range(max(2, round(size * size / 5000**2))):
        radius = float(rng.uniform(0.03, 0.07) * size)
        cy, cx = (float(v) for v in rng.uniform(0.0, size, 2))
        ks = list(range(2, 7))
        amps = [float(rng.uniform(0.0, 0.25 / k)) for k in ks]  # lobes; r(theta) >= 0.63 radius
        phases = [float(rng.uniform(0.0, 2 * math.pi)) for _ in ks]
        blobs.append({"cy": cy, "cx": cx, "r": radius, "k": ks, "amp": amps, "phase": phases, "island": 0.2 * radius})
    river = {
        "x0": float(rng.uniform(0.3, 0.7) * size),
        "amp": 0.08 * size,
        "period": 0.5 * size,
        "phase": float(rng.uniform(0.0, 2 * math.pi)),
        "width": max(8.0, 0.006 * size),
    }
    return {
        "version": GENERATOR_VERSION,
        "size": size,
        "seed": seed,
        "cell": CELL,
        "occupancy": OCCUPANCY,
        "blobs": blobs,
        "river": river,
    }


def _paint_buildings(out, r0: int, size: int, seed: int) -> None:
    """Paint the building rectangles of rows ``r0 .. r0 + len(out)`` into ``out`` (a row strip)."""
    import numpy as np

    h = out.shape[0]
    n = -(-size // CELL)
    offs = np.arange(CELL)[:, None]
    for cr in range(r0 // CELL, (r0 + h - 1) // CELL + 1):
        rng = np.random.default_rng([seed, size, 1, cr])  # one stream per cell row: strips are independent
        bh = rng.integers(6, CELL - 1, n)
        bw = rng.integers(6, CELL - 1, n)
        y0 = rng.integers(0, CELL - bh)  # y0 + bh <= CELL - 1: the cell's last row stays empty
        x0 = rng.integers(0, CELL - bw)
        used = rng.random(n) < OCCUPANCY
        rows_in = (offs >= y0) & (offs < y0 + bh) & used  # (CELL, n)
        cols_in = (offs >= x0) & (offs < x0 + bw)  # (CELL, n)
        tile = (rows_in[:, :, None] & cols_in.T[None, :, :]).reshape(CELL, n * CELL)[:, :size]
        a, b = max(cr * CELL, r0), min(cr * CELL + CELL, r0 + h)
        if a < b:
            sub = tile[a - cr * CELL : b - cr * CELL]
            out[a - r0 : b - r0][sub] = BUILDING


def _paint_water(out, r0: int, params: dict[str, Any]) -> None:
    """Paint the river and the blobs (each but its island) over rows ``r0 .. r0 + len(out)``."""
    import numpy as np

    h, size = out.shape
    rv = params["river"]
    ys = np.arange(r0, r0 + h, dtype=np.float64) + 0.5
    xc = rv["x0"] + rv["amp"] * np.sin(2 * math.pi * ys / rv["period"] + rv["phase"])
    lo = np.clip(np.floor(xc - rv["width"] / 2).astype(np.int64), 0, size)
    hi = np.clip(np.ceil(xc + rv["width"] / 2).astype(np.int64), 0, size)
    for i in range(h):
        out[i, lo[i] : hi[i]] = WATER
    for b in params["blobs"]:
        reach = 1.4 * b["r"]
        ra, rb = max(r0, int(b["cy"] - reach)), min(r0 + h, int(b["cy"] + reach) + 1)
        ca, cb = max(0, int(b["cx"] - reach)), min(size, int(b["cx"] + reach) + 1)
        if ra >= rb or ca >= cb:
            continue
        dy = (np.arange(ra, rb, dtype=np.float32) + 0.5 - b["cy"])[:, None]
        dx = (np.arange(ca, cb, dtype=np.float32) + 0.5 - b["cx"])[None, :]
        dist = np.hypot(dy, dx)
        theta = np.arctan2(dy, dx)
        edge = np.ones_like(dist)
        for k, amp, phase in zip(b["k"], b["amp"], b["phase"], strict=True):
            edge += amp * np.cos(k * theta + phase)
        inside = (dist < b["r"] * edge) & (dist >= b["island"])
        out[ra - r0 : rb - r0, ca:cb][inside] = WATER


def make_mask(out_dir: Path, size: int, seed: int = 7) -> Path:
    """Write (or reuse) the benchmark mask for ``size`` and ``seed``; returns its path.

    The file name and a metadata tag carry the parameters; a file whose tag differs is
    regenerated. Written under a temporary name and renamed, so an interrupted run never
    leaves a half mask to reuse.
    """
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    params = mask_params(size, seed)
    key = json.dumps(params, sort_keys=True)
    path = out_dir / f"vector_mask_{size}_seed{seed}_v{GENERATOR_VERSION}.tif"
    if path.exists():
        try:
            with rasterio.open(path) as ds:
                if ds.tags().get(MASK_TAG) == key:
                    return path
        except rasterio.errors.RasterioIOError:
            pass
    t0 = time.perf_counter()
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 1,
        "dtype": "uint8",
        "nodata": NODATA,
        "crs": "EPSG:32632",
        "transform": Affine(1.0, 0.0, 300000.0, 0.0, -1.0, 5100000.0),  # 1 m pixels
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
        "NUM_THREADS": "ALL_CPUS",
    }
    tmp = path.with_name(f".{path.name}.tmp")
    with rasterio.Env(GDAL_CACHEMAX=256), rasterio.open(tmp, "w", **profile) as dst:
        dst.update_tags(GEOSEG_CLASSES=json.dumps(CLASSES), **{MASK_TAG: key})
        for r0 in range(0, size, STRIP):
            h = min(STRIP, size - r0)
            strip = np.zeros((h, size), np.uint8)
            _paint_buildings(strip, r0, size, seed)
            _paint_water(strip, r0, params)
            dst.write(strip, 1, window=Window(0, r0, size, h))
    os.replace(tmp, path)
    print(f"# wrote {path.name} ({size}x{size} uint8) in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path


# --------------------------------------------------------------------------------------
# The measured runs (each in its own subprocess)
# --------------------------------------------------------------------------------------
def run_whole(args: argparse.Namespace) -> dict[str, Any]:
    """The single-process baseline: whole array in memory, ``rasterio.features.shapes``, shapely."""
    import rasterio
    import shapely
    import shapely.geometry
    from rasterio import features

    t0 = time.perf_counter()
    with rasterio.open(args.mask) as ds:
        mask = ds.read(1)
        transform = ds.transform
    t1 = time.perf_counter()
    polygons = []
    counts: dict[str, int] = {}
    for geom, value in features.shapes(mask, mask=(mask != 0) & (mask != 255), connectivity=4, transform=transform):
        polygons.append(shapely.geometry.shape(geom))
        key = str(int(value))
        counts[key] = counts.get(key, 0) + 1
    t2 = time.perf_counter()
    return {
        "seconds": t2 - t0,
        "read_s": t1 - t0,
        "shapes_s": t2 - t1,
        "polygons": len(polygons),
        "counts": counts,
        "vertices": int(shapely.get_num_coordinates(polygons).sum()) if polygons else 0,
    }


def run_geoseg(args: argparse.Namespace) -> dict[str, Any]:
    """``geoseg.vectorize`` on a local cluster of 1 or 2 workers."""
    from geoseg.engine import scheduler
    from geoseg.vector import vectorize

    workers = GEOSEG_WORKERS[args.run]
    formats = RUN_FORMATS[args.run]
    work = Path(args.work)
    t0 = time.perf_counter()
    with scheduler("local", workers=workers, device="cpu") as sched:
        t1 = time.perf_counter()
        report = vectorize(args.mask, str(work), formats=list(formats), project=False, overwrite=True, chunk=args.chunk)
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    sizes = {}
    for fmt in formats:
        files = [work / "geoseg.gpkg"] if fmt == "gpkg" else sorted((work / "vectors").glob(f"*{FORMAT_EXT[fmt]}"))
        sizes[fmt] = sum(f.stat().st_size for f in files if f.exists())
    return {
        "seconds": t2 - t1,
        "cluster_start_s": t1 - t0,
        "cluster_close_s": t3 - t2,
        "workers": sched.workers,
        "threads_per_worker": sched.num_threads,
        "polygons": report["features"],
        "counts": {str(ly["class_id"]): ly["features"] for ly in report["layers"]},
        "chunks": report["chunks"],
        "chunk_px": report["parameters"]["chunk"],
        "seam_pieces": report["seam_pieces"],
        "seam_objects": report["seam_objects"],
        "timings": report["timings"],
        "formats": list(formats),
        "output_bytes": sizes,
    }


def child_main(args: argparse.Namespace) -> None:
    """One measured run: print its result as one JSON line tagged ``BENCH_RESULT``."""
    if args.run == "rasterio_whole":
        import rasterio  # noqa: F401  (imports stay off the clock, as in the geoseg runs)
        import shapely  # noqa: F401

        fn = run_whole
    else:
        import geoseg.engine
        import geoseg.vector.run  # noqa: F401

        fn = run_geoseg
    with _tree_sampler() as mem:
        res = fn(args)
    res.update(
        run=args.run,
        peak_mib=mem.peak_mib,
        largest_process_mib=max(mem.peak_by_process.values(), default=0) / 2**20,
        memory_samples=mem.samples,
        cpu_s=mem.cpu_s,
        peak_by_process_mib={k: round(v / 2**20, 1) for k, v in sorted(mem.peak_by_process.items(), key=lambda kv: -kv[1])},
    )
    print(RESULT_TAG + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------
# The parent: make the mask, run each measurement in a subprocess, print tables
# --------------------------------------------------------------------------------------
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


class OtherProcesses:
    """Which other processes took CPU while a run ran (sampled every second, for the notes).

    ``tree`` is the run's process id: it and its descendants are left out, as is this process.
    """

    def __init__(self, tree: int, interval: float = 1.0) -> None:
        import psutil

        self._psutil = psutil
        self.tree = tree
        self.interval = interval
        self.start: dict[tuple[int, float], float] = {}
        self.last: dict[tuple[int, float], tuple[float, str]] = {}
        self.excluded: set[int] = {os.getpid(), tree}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="other-processes", daemon=True)

    def sample(self, first: bool = False) -> None:
        """Record every process's CPU time now (``first``: as the baseline of those already running)."""
        psutil = self._psutil
        try:
            self.excluded.update(p.pid for p in psutil.Process(self.tree).children(recursive=True))
        except psutil.Error:
            pass
        for p in psutil.process_iter(["pid", "create_time", "cpu_times", "name", "cmdline"]):
            info = p.info
            if info["cpu_times"] is None or info["create_time"] is None:
                continue
            key = (info["pid"], info["create_time"])
            cpu = info["cpu_times"].user + info["cpu_times"].system
            self.start.setdefault(key, cpu if first else 0.0)
            self.last[key] = (cpu, " ".join(info["cmdline"] or [info["name"] or "?"])[:100])

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> OtherProcesses:
        self.sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def top(self, n: int = 3, min_s: float = 0.5) -> list[dict[str, Any]]:
        """The ``n`` other processes that used the most CPU (at least ``min_s`` seconds)."""
        used = [
            {"pid": key[0], "cpu_s": round(cpu - self.start.get(key, 0.0), 1), "cmd": cmd}
            for key, (cpu, cmd) in self.last.items()
            if key[0] not in self.excluded and cpu - self.start.get(key, 0.0) >= min_s
        ]
        return sorted(used, key=lambda d: -d["cpu_s"])[:n]


def _spawn(args: argparse.Namespace, run: str, mask: Path, work: Path) -> dict[str, Any]:
    """Run ``run`` in a fresh subprocess (its own session, killed whole on time-out); return its result."""
    import psutil

    me = ["-m", f"{__package__}.bench_vector"] if __package__ else [str(Path(__file__).resolve())]
    cmd = [sys.executable, *me, "--run", run, "--mask", str(mask), "--work", str(work), "--chunk", str(args.chunk)]
    print(f"# {run}: {RUN_LABELS[run]} on {mask.name} ...", file=sys.stderr, flush=True)
    waited = _wait_idle(args.wait_idle)
    cpu0, t0 = psutil.cpu_times(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT), start_new_session=True)
    with OtherProcesses(proc.pid) as others:
        try:
            out, err = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and its Dask processes: its own session
            proc.communicate()
            print(f"#   timed out after {args.timeout:.0f} s", file=sys.stderr, flush=True)
            return {"run": run, "timed_out": True, "timeout_s": args.timeout}
        cpu1, wall = psutil.cpu_times(), time.perf_counter() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(err[-4000:])
        raise RuntimeError(f"benchmark run {run} failed (exit {proc.returncode}); see the log above")
    res = json.loads(lines[-1][len(RESULT_TAG) :])
    res["waited_for_idle_s"] = waited
    res["process_wall_s"] = wall
    # CPU time other processes took while this run ran: all busy time minus the run's own (its whole tree)
    busy = sum(getattr(cpu1, f) - getattr(cpu0, f) for f in ("user", "nice", "system", "irq", "softirq") if hasattr(cpu1, f))
    own = res["cpu_s"]
    cores = os.cpu_count() or 1
    res["other_cpu_share"] = max(0.0, busy - own) / (wall * cores)
    res["steal_share"] = (getattr(cpu1, "steal", 0.0) - getattr(cpu0, "steal", 0.0)) / (wall * cores)
    res["other_processes"] = others.top()
    print(f"#   {res['seconds']:.1f} s, {res['polygons']} polygons, peak {res['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return res


def _check_counts(rows: list[dict]) -> tuple[str | None, bool | None, dict[str, bool]]:
    """Reference run, whether every other run's per-class counts equal it, and the verdict per run."""
    done = [r for r in rows if not r.get("timed_out")]
    ref = next((r for r in done if r["run"] == "rasterio_whole"), None) or next(
        (r for r in done if r["run"] != "rasterio_whole"), None
    )
    if ref is None:
        return None, None, {}
    verdict = {r["run"]: r["counts"] == ref["counts"] for r in done if r is not ref}
    return ref["run"], (all(verdict.values()) if verdict else None), verdict


def _fmt(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _int(v: int | None) -> str:
    return "" if v is None else f"{v:,}"


def format_tables(res: dict[str, Any]) -> str:
    """The Markdown report: machine, the runs, geoseg's time split, the writers, the count check."""
    m = res["machine"]
    names = {str(c["id"]): c["name"] for c in CLASSES}
    ref = next((r for r in res["rows"] if r.get("counts")), None)
    what = ", ".join(f"{_int(n)} {names.get(k, k)}" for k, n in sorted(ref["counts"].items())) if ref else "?"
    chunk = next((r.get("chunk_px") for r in res["rows"] if r.get("chunk_px")), res["args"]["chunk"])
    chunks = next((r.get("chunks") for r in res["rows"] if r.get("chunks")), None)
    lines = [
        f"### Vectorisation of a {res['size']} x {res['size']} uint8 mask ({res['megapixels']:.1f} MP): {what} polygons; "
        f"geoseg chunk {chunk} px ({chunks} chunks)",
        "",
        f"Machine: {m.get('cpu')}, {m['cpu_count']} cores, {m['ram_gib']:.0f} GiB RAM; geoseg {m['geoseg']}, "
        f"rasterio {m['rasterio']} (GDAL {m['gdal']}), shapely {m['shapely']}, pyogrio {m['pyogrio']}, "
        f"dask {m['dask']}, numpy {m['numpy']}, Python {m['python']}.",
        "",
        "| run | seconds | polygons | polygons/s | MP/s | peak MiB (process tree) | largest process MiB "
        "| cluster start s | CPU taken by others |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        if r["run"] not in MAIN_RUNS:
            continue
        if r.get("timed_out"):
            lines.append(f"| {r['run']} | timed out after {r['timeout_s']:.0f} s | | | | | | | |")
            continue
        lines.append(
            f"| {r['run']} | {_fmt(r['seconds'], 1)} | {_int(r['polygons'])} | {_int(round(r['polygons_per_s']))} | "
            f"{_fmt(r['mp_per_s'])} | {r['peak_mib']:.0f} | {r['largest_process_mib']:.0f} | "
            f"{_fmt(r.get('cluster_start_s'), 1)} | {r['other_cpu_share'] + r.get('steal_share', 0.0):.0%} |"
        )
    lines += ["", f"Runs: {'; '.join(f'`{k}` = {RUN_LABELS[k]}' for k in RUNS)}."]
    for r in res["rows"]:
        share = r.get("other_cpu_share", 0.0) + r.get("steal_share", 0.0)
        if share > 0.1:
            who = ", ".join(f"{o['cmd'][:60]} ({o['cpu_s']:.0f} CPU s)" for o in r.get("other_processes", [])) or "unknown"
            lines.append(f"- `{r['run']}`: other processes took {share:.0%} of the CPU (its timings are pessimistic): {who}.")
    whole = next((r for r in res["rows"] if r["run"] == "rasterio_whole" and not r.get("timed_out")), None)
    if whole:
        lines.append(
            f"`rasterio_whole`: {whole['read_s']:.1f} s reading the array, {whole['shapes_s']:.1f} s in shapes() + shapely "
            f"({_int(whole['vertices'])} vertices)."
        )
    geo = [r for r in res["rows"] if r["run"] in GEOSEG_WORKERS and not r.get("timed_out")]
    if geo:
        lines += [
            "",
            "geoseg's time split (task columns are summed over the chunk tasks, so they exceed the wall time on 2 workers):",
            "",
            "| run | vectorize() s | chunk tasks wall s | read (tasks) s | polygonize (tasks) s | attributes + parquet (tasks) s "
            "| seam merge s | writers s | seam pieces -> objects |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in geo:
            t = r["timings"]
            write = sum(v for k, v in t.items() if k.startswith("write_"))
            lines.append(
                f"| {r['run']} | {r['seconds']:.1f} | {t['chunks_wall_s']:.1f} | {t['read_task_s']:.1f} | "
                f"{t['polygonize_task_s']:.1f} | {t['attributes_task_s']:.1f} | {t['merge_s']:.1f} | {write:.1f} "
                f"({', '.join(k[6:-2] for k in t if k.startswith('write_'))}) | "
                f"{_int(r['seam_pieces'])} -> {_int(r['seam_objects'])} |"
            )
    if res.get("writers"):
        lines += [
            "",
            "Writers (one `vectorize()` on 2 workers with all three formats; GeoJSON is reprojected to EPSG:4326 and rounded "
            "to 7 decimals):",
            "",
            "| format | features | write s | features/s | output MiB |",
            "|---|---:|---:|---:|---:|",
        ]
        for w in res["writers"]:
            lines.append(
                f"| {w['format']} | {_int(w['features'])} | {w['seconds']:.1f} | {_int(round(w['features_per_s']))} | "
                f"{w['output_mib']:.1f} |"
            )
    lines.append("")
    if res["counts_reference"] is None:
        lines.append("Polygon counts: no run finished.")
    elif res["counts_match"] is None:
        lines.append(f"Polygon counts: only `{res['counts_reference']}` ran; nothing to compare.")
    else:
        per = ", ".join(f"`{k}` {'equal' if ok else 'DIFFERENT'}" for k, ok in res["counts_by_run"].items())
        verdict = "MATCH" if res["counts_match"] else "DO NOT MATCH"
        lines.append(f"Polygon counts per class {verdict} `{res['counts_reference']}`: {per}.")
        for r in res["rows"]:
            if not r.get("timed_out") and res["counts_by_run"].get(r["run"]) is False:
                lines.append(f"- `{r['run']}` counts: {r['counts']}")
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    """The engine benchmark's machine description, plus the vector stack's versions."""
    import psutil
    import pyogrio
    import shapely

    try:
        from .bench_engine import _machine as engine_machine
    except ImportError:  # run as a plain script
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.benchmarks.bench_engine import _machine as engine_machine
    info = engine_machine()
    info.update(
        ram_gib=psutil.virtual_memory().total / 2**30,
        shapely=shapely.__version__,
        geos=shapely.geos_version_string,
        pyogrio=pyogrio.__version__,
    )
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (the ``--run`` group is for the measured subprocesses)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=8192, help="side of the mask in pixels (default 8192)")
    p.add_argument("--seed", type=int, default=7, help="seed of the synthetic mask (default 7)")
    p.add_argument("--chunk", type=int, default=2048, help="geoseg chunk in pixels (geoseg's default is 2048)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"runs to measure (default: {','.join(RUNS)})")
    p.add_argument("--skip-whole", action="store_true", help="leave out the whole-array rasterio baseline")
    p.add_argument("--out-dir", default="/tmp/geoseg-bench-vector", help="mask cache, outputs and bench_vector.json")
    p.add_argument("--keep-outputs", action="store_true", help="keep the vector outputs of each run (default: deleted)")
    p.add_argument("--wait-idle", type=float, default=60.0, help="seconds to wait for an idle CPU before each run (default 60)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is killed (default 3600)")
    g = p.add_argument_group("one measured run (used internally)")
    g.add_argument("--run", choices=RUNS)
    g.add_argument("--mask")
    g.add_argument("--work")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables; return (and save) the results."""
    args = parse_args(argv)
    if args.run:
        child_main(args)
        return {}
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise SystemExit(f"unknown runs {bad}; choose from {', '.join(RUNS)}")
    if args.skip_whole:
        runs = [r for r in runs if r != "rasterio_whole"]
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir = str(out_dir)

    mask = make_mask(out_dir, args.size, args.seed)
    mp = args.size * args.size / 1e6
    rows = []
    for run in runs:
        work = out_dir / f"out-{args.size}-{run}"
        res = _spawn(args, run, mask, work)
        if not res.get("timed_out"):
            res["polygons_per_s"] = res["polygons"] / res["seconds"]
            res["mp_per_s"] = mp / res["seconds"]
        rows.append(res)
        if not args.keep_outputs:
            shutil.rmtree(work, ignore_errors=True)
    writers = []
    wr = next((r for r in rows if r["run"] == "writers" and not r.get("timed_out")), None)
    if wr:
        for fmt in RUN_FORMATS["writers"]:
            seconds = wr["timings"][f"write_{fmt}_s"]
            writers.append(
                {
                    "format": fmt,
                    "features": wr["polygons"],
                    "seconds": seconds,
                    "features_per_s": wr["polygons"] / seconds if seconds > 0 else float("nan"),
                    "output_mib": wr["output_bytes"][fmt] / 2**20,
                }
            )
    ref, match, by_run = _check_counts(rows)
    results: dict[str, Any] = {
        "machine": _machine(),
        "args": vars(args),
        "size": args.size,
        "megapixels": mp,
        "mask": str(mask),
        "mask_params": mask_params(args.size, args.seed),
        "rows": rows,
        "writers": writers,
        "counts_reference": ref,
        "counts_match": match,
        "counts_by_run": by_run,
    }
    text = format_tables(results)
    print(text)
    results["markdown"] = text
    with open(out_dir / "bench_vector.json", "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nResults: {out_dir / 'bench_vector.json'}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
