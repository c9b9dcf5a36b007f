"""Whole-slide-sized plain images: ``geoseg predict`` streams a non-georeferenced TIFF with bounded memory.

Run from the repository root (a 50000² run takes many minutes and a few GB of disk)::

    python -m tests.benchmarks.bench_plain_big --size 8000 --work /tmp/geoseg-plain
    python -m tests.benchmarks.bench_plain_big --size 50000 --work /tmp/geoseg-plain --clean

The input is a generated ``SIZE x SIZE`` 3-band uint8 RGB TIFF **without CRS or geotransform**
(tiled 512 x 512, DEFLATE by default or JPEG, BigTIFF when needed), made to look like a
stained microscopy slide: light glass, a large tissue region of pinkish cytoplasm with dark
purple nuclei, red blood cells and dark debris ("cells"), and a small tissue fragment in the
bottom-right corner. A handful of distinct 512 x 512 blocks (periodic, so any cyclic shift is
seamless within a block) is drawn once from a seeded generator; every block of the slide is one
of them, flipped/rotated and cyclically shifted by offsets drawn from ``--seed`` and the block
row. The file (``WORK/slide_SIZE_sSEED_COMPRESS.tif``) is written one row of blocks at a time
(never the whole image), under a temporary name renamed when complete, and reused when present.

The model is a TorchScript 3x3 convolution with 2 classes (background, cell) and its card
embedded (``_extra_files={"geoseg_card.json": ...}``; tile 512, halo 16, no scaling): the
cell logit is ``T - sum(3x3x3 neighbourhood)`` with ``T = 27 * DARK + 0.5`` and the
background logit is 0, so a pixel is a cell where its neighbourhood's mean value is below
``DARK``. Every value is an integer below 2^24 and ``T`` is a half integer, so the logits are
exact in float32 whatever the summation order and never tie: the mask is bit-for-bit
reproducible, which is what the window checks rely on.

Each run is ``python -m geoseg predict SLIDE -m MODEL -o OUT --overwrite`` (the default local
Dask cluster) in a subprocess; the summed RSS of its whole process tree (the CLI and all its
descendants: Dask worker processes, nannies when there are any) is sampled every 0.2 s. After the run, ``OUT/mask.tif`` is read
back with rasterio: its size must equal the input's, it must have no CRS, and four 1024 x 1024
windows (three seeded random ones wholly in tissue, and the bottom-right corner, where a tissue
fragment meets the image edges) must equal the model run directly on the input window grown by
the halo (mirrored at the image edges as geoseg does). Its tiling, compression and overviews are
reported.

A second row runs the same with ``--vectorize``. With ``--vectorize auto`` (the default) a
probe ``--vectorize`` run at ``--probe-size`` comes first (a row of its own): the estimate for
``SIZE`` is the plain run's measured time plus the probe's vectorisation time scaled by the
pixel count, and the ``SIZE`` row is skipped, saying why, when it exceeds
``--vectorize-limit-min`` minutes.

Results are printed as a Markdown table and written to ``WORK/bench_plain_big.json``.
``--clean`` deletes the generated slide and outputs at the end (the model is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

BLOCK = 512
#: mean band value under which a pixel's 3x3 neighbourhood counts as a cell
DARK = 110
HALO = 16
TILE = 512
#: distinct 512 x 512 blocks the slide is made of (plus one of bare glass)
N_BASE = 6
GLASS = (238, 232, 238)
CYTOPLASM = (226, 160, 200)
NUCLEUS = (72, 48, 128)
LYMPHOCYTE = (52, 36, 104)
BLOOD = (208, 92, 100)
DEBRIS = (60, 52, 64)
RESULT_TAG = "PLAIN_BIG_RESULT "


# --------------------------------------------------------------------------------------
# Peak memory of a process tree (a subprocess and its descendants)
# --------------------------------------------------------------------------------------
class TreeMemory:
    """Samples the summed RSS of process ``pid`` and all its descendants in a background thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_largest = 0
        self.peak_processes = 0
        self.peak_by_process: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-memory", daemon=True)

    def sample(self) -> int:
        """Take one sample now; returns the summed RSS in bytes (0 once the process is gone)."""
        psutil = self._psutil
        try:
            procs = [self._proc, *self._proc.children(recursive=True)]
        except psutil.Error:
            return 0
        total, parts = 0, {}
        for p in procs:
            try:
                rss = p.memory_info().rss
                name = " ".join(p.cmdline()[1:4])[:60] or p.name()
            except psutil.Error:  # exited between listing and reading
                continue
            total += rss
            parts[f"{p.pid} {name}"] = rss
        self.samples += 1
        if total > self.peak:
            self.peak = total
            self.peak_by_process = parts
            self.peak_processes = len(parts)
        self.peak_largest = max(self.peak_largest, max(parts.values(), default=0))
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------
# The slide
# --------------------------------------------------------------------------------------
def _ellipse(img, cy: float, cx: float, ry: float, rx: float, angle: float, color, rng, jitter: int = 10) -> None:
    """Paint a filled, rotated ellipse on the periodic (3, BLOCK, BLOCK) ``img`` (wrapping at its edges)."""
    import numpy as np

    r = int(np.ceil(max(ry, rx))) + 1
    ys = np.arange(int(cy) - r, int(cy) + r + 1)
    xs = np.arange(int(cx) - r, int(cx) + r + 1)
    dy, dx = ys[:, None] - cy, xs[None, :] - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    inside = u * u + v * v <= 1.0
    rows, cols = np.nonzero(inside)
    rr, cc = ys[rows] % BLOCK, xs[cols] % BLOCK
    shade = rng.integers(-jitter, jitter + 1, 3)
    tex = rng.integers(-6, 7, rows.size)  # chromatin-like texture
    for b in range(3):
        img[b, rr, cc] = np.clip(color[b] + shade[b] + tex, 0, 255)


def base_blocks(seed: int = 0, n: int = N_BASE):
    """``n`` distinct periodic (3, 512, 512) uint8 tissue blocks and one of bare glass, drawn from ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:BLOCK, 0:BLOCK].astype(np.float32) * (2 * np.pi / BLOCK)
    blocks = []
    for _ in range(n):
        # light background with a gentle periodic wash and a little sensor noise
        wash = 3 * np.sin(yy * rng.integers(1, 3) + rng.random() * 6) * np.cos(xx * rng.integers(1, 3) + rng.random() * 6)
        img = np.empty((3, BLOCK, BLOCK), np.int16)
        for b in range(3):
            img[b] = np.clip(GLASS[b] - 8 + wash + rng.normal(0, 2.0, (BLOCK, BLOCK)), 0, 255)
        for _ in range(int(rng.integers(90, 130))):  # cells: cytoplasm with a nucleus
            cy, cx = rng.random(2) * BLOCK
            ry, rx = rng.uniform(9, 20, 2)
            _ellipse(img, cy, cx, ry, rx, rng.random() * np.pi, CYTOPLASM, rng, jitter=14)
            _ellipse(img, cy + rng.normal(0, 2), cx + rng.normal(0, 2), ry * rng.uniform(0.3, 0.5), rx * rng.uniform(0.3, 0.5),
                     rng.random() * np.pi, NUCLEUS, rng)  # fmt: skip
        for _ in range(int(rng.integers(10, 25))):  # lymphocytes: small, round, dark
            cy, cx = rng.random(2) * BLOCK
            rad = rng.uniform(3.5, 6)
            _ellipse(img, cy, cx, rad, rad * rng.uniform(0.85, 1.0), 0.0, LYMPHOCYTE, rng)
        for _ in range(int(rng.integers(8, 20))):  # red blood cells: lighter than the threshold
            cy, cx = rng.random(2) * BLOCK
            rad = rng.uniform(3.5, 5)
            _ellipse(img, cy, cx, rad, rad, 0.0, BLOOD, rng, jitter=6)
        for _ in range(int(rng.integers(0, 6))):  # debris: tiny dark specks
            cy, cx = rng.random(2) * BLOCK
            _ellipse(img, cy, cx, 1.2, 1.6, rng.random() * np.pi, DEBRIS, rng)
        blocks.append(img.astype(np.uint8))
    glass = np.empty((3, BLOCK, BLOCK), np.uint8)
    for b in range(3):
        glass[b] = np.clip(GLASS[b] + rng.normal(0, 1.5, (BLOCK, BLOCK)), 0, 255).astype(np.uint8)
    return blocks, glass


def _variant(block, k: int, dy: int, dx: int):
    """One of the 8 flips/rotations (``k``) of a periodic block, cyclically shifted by (dy, dx)."""
    import numpy as np

    v = np.rot90(block, k % 4, axes=(1, 2))
    if k >= 4:
        v = v[:, :, ::-1]
    return np.roll(v, (dy, dx), axis=(1, 2))


def _in_tissue(size: int, r0: int, c0: int) -> bool:
    """Whether the block at (r0, c0) holds tissue: a large central ellipse and a fragment in the bottom-right corner.

    The rest is bare glass. The corner fragment (3 x 3 blocks) puts cells on the image's last rows
    and columns, where geoseg mirrors its halo and the last tiles are partial.
    """
    if size <= 4 * BLOCK:  # small slides: all tissue
        return True
    if r0 + BLOCK > size - 3 * BLOCK and c0 + BLOCK > size - 3 * BLOCK:
        return True
    cy = cx = size / 2
    y, x = (r0 + BLOCK / 2 - cy) / (0.47 * size), (c0 + BLOCK / 2 - cx) / (0.42 * size)
    return y * y + x * x <= 1.0


def tissue_windows(size: int, n: int = 3, side: int = 1024, seed: int = 1) -> list[tuple[int, int]]:
    """``n`` seeded random ``side x side`` windows (row, col) lying wholly in tissue, then the bottom-right corner."""
    import numpy as np

    side = min(side, size)
    rng = np.random.default_rng(seed)
    out: list[tuple[int, int]] = []
    for _ in range(10_000):
        if len(out) == n:
            break
        r, c = (int(v) for v in rng.integers(0, size - side + 1, 2))
        corners = [(y // BLOCK * BLOCK, x // BLOCK * BLOCK) for y in (r, r + side - 1) for x in (c, c + side - 1)]
        if all(_in_tissue(size, y, x) for y, x in corners):
            out.append((r, c))
    return [*out, (size - side, size - side)]


def slide_ok(path: Path, size: int) -> bool:
    """Whether ``path`` is a complete ``size x size`` 3-band uint8 plain TIFF (one to reuse)."""
    import rasterio

    if not path.exists():
        return False
    try:
        from geoseg.io.raster import _open_quiet

        with _open_quiet(str(path)) as ds:
            return (ds.width, ds.height, ds.count, ds.dtypes[0], ds.crs) == (size, size, 3, "uint8", None)
    except (rasterio.errors.RasterioIOError, ImportError):
        return False


def make_slide(path: Path, size: int, *, seed: int = 0, compress: str = "deflate") -> dict[str, Any]:
    """Write (or reuse) the ``size x size`` plain RGB slide at ``path``; returns what was done and how fast.

    Memory stays bounded: one row of 512-pixel blocks (``3 x 512 x size`` bytes) at a time.
    """
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    if slide_ok(path, size):
        return {"path": str(path), "reused": True, "seconds": 0.0, "bytes": path.stat().st_size}
    t0 = time.perf_counter()
    blocks, glass = base_blocks(seed)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "interleave": "pixel",
        "photometric": "RGB",
        "BIGTIFF": "IF_SAFER",
        "NUM_THREADS": "ALL_CPUS",
    }
    if compress == "jpeg":
        profile.update(compress="jpeg", photometric="YCBCR", JPEG_QUALITY=90)
    else:
        profile.update(compress="deflate", ZLEVEL=1)
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.Env(GDAL_CACHEMAX=256):  # GDAL's block cache, else 5 % of the machine's RAM
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # plain on purpose
            dst = rasterio.open(tmp, "w", **profile)
        with dst:
            for r0 in range(0, size, BLOCK):
                h = min(BLOCK, size - r0)
                rng = np.random.default_rng([seed, size, r0])  # the same strip whatever order strips are written in
                strip = np.empty((3, h, size), np.uint8)
                for c0 in range(0, size, BLOCK):
                    w = min(BLOCK, size - c0)
                    k, variant, dy, dx = rng.integers(0, (N_BASE, 8, BLOCK, BLOCK))
                    src = blocks[k] if _in_tissue(size, r0, c0) else glass
                    strip[:, :, c0 : c0 + w] = _variant(src, int(variant), int(dy), int(dx))[:, :h, :w]
                dst.write(strip, window=Window(0, r0, size, h))
    os.replace(tmp, path)
    seconds = time.perf_counter() - t0
    print(f"# wrote {path.name} ({size}x{size} RGB uint8, {compress}) in {seconds:.0f} s", file=sys.stderr, flush=True)
    return {"path": str(path), "reused": False, "seconds": seconds, "bytes": path.stat().st_size}


# --------------------------------------------------------------------------------------
# The model and the direct reference
# --------------------------------------------------------------------------------------
CARD = {
    "name": "darkcells",
    "version": "1",
    "task": "objects",
    "description": "3x3 neighbourhood darker than a threshold: a cheap stand-in for a nucleus segmenter",
    "classes": [{"id": 0, "name": "background", "color": [0, 0, 0]}, {"id": 1, "name": "cell", "color": [120, 40, 160]}],
    "scaling": {"method": "none"},
    "tile": TILE,
    "halo": HALO,
}


def build_net():
    """The 2-class 3x3 convolution: class 1 where the 3x3x3 neighbourhood's mean is below ``DARK``."""
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1)).eval()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[1] = -1.0
        net[0].bias.copy_(torch.tensor([0.0, 27 * DARK + 0.5]))
    return net


def make_model(path: Path) -> Path:
    """Save :func:`build_net` as TorchScript with its card embedded; returns ``path``."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(build_net()), str(path), _extra_files={"geoseg_card.json": json.dumps(CARD)})
    return path


def reference_window(src_path: Path, model_path: Path, row: int, col: int, height: int, width: int, halo: int = HALO):
    """The model run directly on the input window grown by ``halo`` (mirrored at the image edges); its argmax."""
    import numpy as np
    import rasterio
    import torch
    from rasterio.windows import Window

    from geoseg.grid import reflect_index
    from geoseg.io.raster import _open_quiet

    with rasterio.Env(GDAL_CACHEMAX=64), _open_quiet(str(src_path)) as ds:
        rows = reflect_index(np.arange(row - halo, row + height + halo), ds.height)
        cols = reflect_index(np.arange(col - halo, col + width + halo), ds.width)
        r0, c0 = int(rows.min()), int(cols.min())
        data = ds.read(window=Window(c0, r0, int(cols.max()) - c0 + 1, int(rows.max()) - r0 + 1))
    x = data[:, rows[:, None] - r0, cols[None, :] - c0].astype(np.float32)
    net = torch.jit.load(str(model_path), map_location="cpu").eval()
    with torch.inference_mode():
        y = net(torch.from_numpy(np.ascontiguousarray(x))[None])[0]
    return y[:, halo : halo + height, halo : halo + width].argmax(0).numpy().astype(np.uint8)


def check_windows(
    src_path: Path, mask_path: Path, model_path: Path, windows: list[tuple[int, int]], side: int = 1024
) -> list[dict]:
    """Compare the ``side x side`` mask windows at ``windows`` (row, col) with :func:`reference_window`."""
    import rasterio
    from rasterio.windows import Window

    out = []
    for r, c in windows:
        with rasterio.open(mask_path) as ds:
            h, w = min(side, ds.height - r), min(side, ds.width - c)
            got = ds.read(1, window=Window(c, r, w, h))
        ref = reference_window(src_path, model_path, r, c, h, w)
        out.append(
            {
                "row": r,
                "col": c,
                "height": h,
                "width": w,
                "mismatches": int((got != ref).sum()),
                "cell_fraction": round(float((ref == 1).mean()), 4),
            }
        )
    return out


# --------------------------------------------------------------------------------------
# One measured `geoseg predict` run
# --------------------------------------------------------------------------------------
def run_predict(
    src: Path, model: Path, out: Path, *, vectorize: bool = False, timeout_s: float | None = None, extra: list[str] | None = None
) -> dict[str, Any]:
    """Run ``python -m geoseg predict`` in a subprocess, sampling its process tree's RSS every 0.2 s."""
    import psutil

    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "geoseg", "predict", str(src), "-m", str(model), "-o", str(out), "--overwrite"]
    if vectorize:
        cmd.append("--vectorize")
    cmd += extra or []
    log_out, log_err = out.parent / f"{out.name}.stdout.log", out.parent / f"{out.name}.stderr.log"
    print(f"# {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    timed_out = False
    t0 = time.perf_counter()
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        proc = psutil.Popen(cmd, stdout=fo, stderr=fe, cwd=str(Path(__file__).resolve().parents[2]))
        with TreeMemory(proc.pid) as mem:
            try:
                rc = proc.wait(timeout=timeout_s)
            except psutil.TimeoutExpired:
                timed_out = True
                for p in [*proc.children(recursive=True), proc]:  # only the tree this run started
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                rc = proc.wait()
    seconds = time.perf_counter() - t0
    stdout, stderr = log_out.read_text(), log_err.read_text()
    res: dict[str, Any] = {
        "cmd": cmd[2:],
        "returncode": rc,
        "timed_out": timed_out,
        "seconds": seconds,
        "peak_mib": mem.peak / 2**20,
        "largest_process_mib": mem.peak_largest / 2**20,
        "processes_at_peak": mem.peak_processes,
        "peak_by_process_mib": {k: round(v / 2**20, 1) for k, v in sorted(mem.peak_by_process.items(), key=lambda kv: -kv[1])},
        "memory_samples": mem.samples,
        "warnings": [ln for ln in stderr.splitlines() if "warning" in ln.lower()],
        "stdout_tail": stdout[-2000:],
    }
    if rc != 0:
        res["stderr_tail"] = stderr[-4000:]
    run_json = out / "run.json"
    if rc == 0 and run_json.exists():
        report = json.loads(run_json.read_text())
        res["tiles"] = report.get("tiles", {}).get("total")
        res["geoseg_timings"] = report.get("timings", {})
    vec_json = out / "vectors.json"
    if vectorize and rc == 0 and vec_json.exists():
        vrep = json.loads(vec_json.read_text())
        res["polygons"] = vrep.get("features")
        res["vector_timings"] = vrep.get("timings", {})
    return res


def describe_mask(mask_path: Path) -> dict[str, Any]:
    """Size, CRS, data type, tiling, compression, overviews and file size of the written mask."""
    import rasterio

    with rasterio.open(mask_path) as ds:
        return {
            "width": ds.width,
            "height": ds.height,
            "count": ds.count,
            "dtype": ds.dtypes[0],
            "crs": None if ds.crs is None else str(ds.crs),
            "transform_is_identity": ds.transform.is_identity,
            "block": list(ds.block_shapes[0]),
            "compress": None if ds.compression is None else ds.compression.name.lower(),
            "overviews": ds.overviews(1),
            "layout": ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT"),
            "bytes": mask_path.stat().st_size,
        }


def measure(
    src: Path, model: Path, out: Path, size: int, *, vectorize: bool, timeout_s: float | None = None, checks: bool = True
) -> dict[str, Any]:
    """One run plus its mask checks; the row of the table."""
    res = run_predict(src, model, out, vectorize=vectorize, timeout_s=timeout_s)
    res.update(size=size, vectorize=vectorize, mp_per_s=size * size / 1e6 / res["seconds"])
    if res["returncode"] == 0:
        res["mask"] = describe_mask(out / "mask.tif")
        res["mask_size_ok"] = (res["mask"]["width"], res["mask"]["height"]) == (size, size)
        res["mask_crs_none"] = res["mask"]["crs"] is None
        if checks:
            t0 = time.perf_counter()
            res["windows"] = check_windows(src, out / "mask.tif", model, tissue_windows(size))
            res["windows_ok"] = all(w["mismatches"] == 0 for w in res["windows"])
            res["check_s"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_table(results: dict[str, Any]) -> str:
    """The Markdown table (and notes) of a :func:`run_benchmark` result."""
    size = results["size"]
    slide = results["slide"]
    made = "reused" if slide["reused"] else f"generated in {slide['seconds']:.0f} s"
    lines = [
        f"### Plain {size} x {size} RGB uint8 slide ({size * size / 1e6:.0f} MP, {_gib(3 * size * size)} raw; "
        f"file {_gib(slide['bytes'])}, {results['compress']}, 512² tiles, no CRS)",
        "",
        f"Slide {made}; model: 3x3 conv, 2 classes, tile {TILE}, halo {HALO}; `geoseg predict` on the default "
        f"local cluster; {results['machine']['cpu_count']} cores. Peak RSS: the CLI and all its descendants "
        "(the Dask worker processes included), summed, sampled every 0.2 s.",
        "",
        "| run | size | wall s | MP/s | peak RSS, process tree | largest process | mask | mask file "
        "| windows equal to direct | polygons |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for r in results["rows"]:
        label = "predict --vectorize" + (" (probe)" if r.get("probe") else "") if r["vectorize"] else "predict"
        head = f"| {label} | {r['size']}² "
        if r.get("skipped"):
            lines.append(f"{head}| skipped: {r['skipped']} | | | | | | | |")
            continue
        if r["returncode"] != 0:
            why = "timed out" if r["timed_out"] else f"exit {r['returncode']}"
            lines.append(f"{head}| {r['seconds']:.0f} ({why}) | | {r['peak_mib']:.0f} MiB | | | | | |")
            continue
        m = r["mask"]
        same = " (= input)" if r["mask_size_ok"] else " (WRONG SIZE)"
        mask = f"{m['width']}x{m['height']} {m['dtype']}, crs {m['crs']}{same}"
        layout = (
            f"{m['layout'] or 'GTiff'}, {m['block'][0]}x{m['block'][1]} tiles, {m['compress']}, "
            f"{len(m['overviews'])} overviews, {m['bytes'] / 2**20:.0f} MiB"
        )
        wins = r.get("windows") or []
        wtxt = f"{sum(w['mismatches'] == 0 for w in wins)}/{len(wins)} ({sum(w['mismatches'] for w in wins)} px differ)"
        polygons = "" if r.get("polygons") is None else f"{r['polygons']:,}"
        lines.append(
            f"{head}| {r['seconds']:.1f} | {r['mp_per_s']:.2f} | {r['peak_mib']:.0f} MiB | {r['largest_process_mib']:.0f} MiB "
            f"| {mask} | {layout} | {wtxt} | {polygons} |"
        )
    lines.append("")
    for r in results["rows"]:
        if not r.get("skipped") and r.get("returncode") == 0:
            t = r.get("geoseg_timings", {})
            line = (
                f"- {r['size']}² {'--vectorize' if r['vectorize'] else 'predict'}: geoseg's own timings: compute "
                f"{t.get('compute_wall_s', 0):.0f} s, COG assembly {t.get('assemble_cog_s', 0):.0f} s, "
                f"total {t.get('total_s', 0):.0f} s"
            )
            if r.get("vector_timings"):
                line += f"; vectorize {r['vector_timings'].get('total_s', 0):.0f} s"
                slow = max(((k, v) for k, v in r["vector_timings"].items() if k != "total_s"), key=lambda kv: kv[1], default=None)
                if slow:
                    line += f" (most in {slow[0]}: {slow[1]:.0f} s)"
            warns = r.get("warnings") or []
            line += f"; {len(warns)} warning line(s)" + (": " + " | ".join(w[:150] for w in warns) if warns else "")
            lines.append(line)
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines)


def run_benchmark(
    size: int,
    work: Path,
    *,
    compress: str = "deflate",
    seed: int = 0,
    vectorize: str = "auto",
    vectorize_limit_min: float = 15.0,
    probe_size: int = 4096,
    timeout_min: float = 60.0,
    clean: bool = False,
) -> dict[str, Any]:
    """Generate (or reuse) the slide, run ``geoseg predict`` (and with ``--vectorize``), check and measure."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    slide_path = work / f"slide_{size}_s{seed}_{compress}.tif"
    model = make_model(work / "darkcells.pt")
    results: dict[str, Any] = {"size": size, "compress": compress, "seed": seed, "machine": {"cpu_count": os.cpu_count()}}
    results["slide"] = make_slide(slide_path, size, seed=seed, compress=compress)
    rows = [measure(slide_path, model, work / f"out_{size}", size, vectorize=False, timeout_s=timeout_min * 60)]
    notes: list[str] = []
    if vectorize != "off":
        skip = None
        if vectorize == "auto" and size > probe_size:
            probe_path = work / f"slide_{probe_size}_s{seed}_{compress}.tif"
            make_slide(probe_path, probe_size, seed=seed, compress=compress)
            probe_out = work / f"out_{probe_size}_vec"
            probe = measure(probe_path, model, probe_out, probe_size, vectorize=True, timeout_s=timeout_min * 60)
            probe["probe"] = True
            rows.append(probe)
            if probe["returncode"] != 0:
                skip = f"the --vectorize probe at {probe_size}² failed (exit {probe['returncode']})"
            elif rows[0]["returncode"] == 0:
                # the plain run at SIZE as measured, plus the probe's vectorisation scaled by the pixel count
                scale = (size / probe_size) ** 2
                vec_s = probe.get("vector_timings", {}).get("total_s", probe["seconds"])
                est = rows[0]["seconds"] + vec_s * scale
                notes.append(
                    f"--vectorize estimate at {size}²: {rows[0]['seconds']:.0f} s (predict, measured) + {vec_s:.1f} s "
                    f"(vectorize at {probe_size}²) x {scale:.0f} = {est / 60:.0f} min, "
                    f"about {(probe.get('polygons') or 0) * scale:,.0f} polygons"
                )
                if est > vectorize_limit_min * 60:
                    skip = f"estimated {est / 60:.0f} min (> {vectorize_limit_min:.0f} min) from the {probe_size}² probe"
            if clean:
                shutil.rmtree(work / f"out_{probe_size}_vec", ignore_errors=True)
                probe_path.unlink(missing_ok=True)
        if skip:
            print(f"# --vectorize row at {size}² skipped: {skip}", file=sys.stderr, flush=True)
            rows.append({"vectorize": True, "size": size, "skipped": skip})
        else:
            timeout = max(timeout_min, 2 * vectorize_limit_min) * 60
            rows.append(measure(slide_path, model, work / f"out_{size}_vec", size, vectorize=True, timeout_s=timeout))
    results["rows"] = rows
    results["notes"] = notes
    results["markdown"] = format_table(results)
    with open(work / "bench_plain_big.json", "w") as f:
        json.dump(results, f, indent=2, default=str)
    if clean:
        slide_path.unlink(missing_ok=True)
        for name in (f"out_{size}", f"out_{size}_vec"):
            shutil.rmtree(work / name, ignore_errors=True)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.bench_plain_big",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    p.add_argument("--size", type=int, default=50000, help="side of the square slide in pixels (default 50000)")
    p.add_argument("--work", default="/tmp/geoseg-plain-big", help="folder for the slide, model and outputs")
    p.add_argument("--compress", choices=("deflate", "jpeg"), default="deflate", help="slide compression (default deflate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--vectorize",
        choices=("auto", "on", "off"),
        default="auto",
        help="the --vectorize row (auto: when the probe says it fits)",
    )
    p.add_argument("--vectorize-limit-min", type=float, default=15.0, help="skip --vectorize above this estimate (auto)")
    p.add_argument("--probe-size", type=int, default=4096, help="slide side of the --vectorize probe (default 4096)")
    p.add_argument("--timeout-min", type=float, default=60.0, help="kill a predict run after this many minutes")
    p.add_argument("--clean", action="store_true", help="delete the generated slide(s) and outputs at the end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its table."""
    args = parse_args(argv)
    results = run_benchmark(
        args.size,
        Path(args.work),
        compress=args.compress,
        seed=args.seed,
        vectorize=args.vectorize,
        vectorize_limit_min=args.vectorize_limit_min,
        probe_size=args.probe_size,
        timeout_min=args.timeout_min,
        clean=args.clean,
    )
    print(results["markdown"])
    print(f"\nResults: {Path(args.work).resolve() / 'bench_plain_big.json'}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
