"""On-demand scaling benchmark: one job on a ``tcp://`` Dask cluster of 1, 2 and 4 worker processes.

Run from the repository root::

    python -m tests.benchmarks.bench_scale                 # 4096² RGB, ONNX U-Net, workers 1,2,4
    python -m tests.benchmarks.bench_scale --size 2048 --workers 1,2 --precision fast

Each size starts a real cluster (a scheduler and N worker processes, plain TCP on 127.0.0.1, the
cores split between the workers: model threads per worker = cores / N, at least 1), points
``geoseg.scheduler("tcp://...")`` at it, and times ``predict`` + ``write`` of the same raster and
model as ``bench_engine.py``. It prints a Markdown table: wall seconds, MP/s, speed-up over one
worker, how many times each worker loaded the model (once is the promise), and the peak memory
of the whole process tree. On one machine the workers share its cores, so this shows the
overheads of scaling out (start, transfers, a model per worker), not more compute; on several
machines each worker brings its own cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_engine import PeakMemory, make_models, make_raster  # noqa: E402  (a script beside this one)


def _run(raster: Path, model: str, out: Path, workers: int, precision: str, tile: int, halo: int) -> dict:
    from distributed import Client, LocalCluster

    import geoseg
    from geoseg.models.runtime import load_counts

    cores = os.cpu_count() or 1
    per = max(1, cores // workers)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        with (
            LocalCluster(
                n_workers=workers,
                threads_per_worker=max(2, per),
                processes=True,
                protocol="tcp://",
                host="127.0.0.1",
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            t1 = time.perf_counter()
            with geoseg.scheduler(cluster.scheduler_address) as sched:
                mask = geoseg.predict(str(raster), model=model, tile=tile, halo=halo, precision=precision, num_threads=per)
                geoseg.write(mask, out, overwrite=True)
            t2 = time.perf_counter()
            loads = client.run(load_counts)
    mp = mask.shape[-1] * mask.shape[-2] / 1e6
    return {
        "workers": workers,
        "threads": per,
        "scheduler": sched.address,
        "start_s": t1 - t0,
        "seconds": t2 - t1,
        "mp_per_s": mp / (t2 - t1),
        "loads": sorted(sum(v.values()) for v in loads.values()),
        "peak_mib": mem.peak_mib,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the scaling benchmark; print and return its rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fast"])
    p.add_argument("--out-dir", default="/tmp/geoseg-bench-scale")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--halo", type=int, default=32)
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raster = make_raster(out_dir / f"bench_{args.size}_rgb_uint8.tif", args.size, 3, "uint8")
    model = make_models(out_dir, 3)["paths"]["onnx"]
    rows = [
        _run(raster, model, out_dir / f"out-{n}", n, args.precision, args.tile, args.halo)
        for n in (int(v) for v in args.workers.split(","))
    ]
    base = rows[0]["mp_per_s"]
    print(f"### {args.size}² RGB uint8, ONNX U-Net, precision {args.precision}, tcp:// cluster on {os.cpu_count()} cores\n")
    print("| workers | model threads each | cluster start s | wall s | MP/s | x 1 worker | model loads per worker | peak MiB |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(
            f"| {r['workers']} | {r['threads']} | {r['start_s']:.1f} | {r['seconds']:.1f} | {r['mp_per_s']:.2f} | "
            f"{r['mp_per_s'] / base:.2f} | {', '.join(map(str, r['loads']))} | {r['peak_mib']:.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
