"""On-demand benchmark: bytes read over HTTP for an AOI of a remote COG, against the file's size.

Run from the repository root (tens of seconds, most of it writing the COG)::

    python -m tests.benchmarks.bench_remote                 # 4096 x 4096, AOIs of 512 and 2048 px
    python -m tests.benchmarks.bench_remote --size 8192 --aoi 512 --aoi 2048

The input is a two-band (green, nir) uint8 COG (DEFLATE, 512 px blocks, overviews) written by
``tests.test_remote.write_cog`` into ``--out-dir`` and served by ``tests.servers.range_server``
on 127.0.0.1. Each row runs ``geoseg.segment(URL, "water", aoi=...)`` on the synchronous
scheduler over a square AOI in the middle of the raster, with a fresh server (so GDAL's cache of
a previous row cannot help: each row starts a new process), and prints the body bytes the server
sent, the requests it answered and their share of the file. Nothing leaves the loopback address.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(cog: Path, aoi_px: int, out: Path) -> dict:
    """One run in this process (called in a fresh subprocess per row)."""
    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    import geoseg
    from tests.servers import range_server

    with rasterio.open(cog) as ds:
        size, (x0, y0) = ds.width, ds.transform * (ds.width // 2 - aoi_px // 2, ds.height // 2 - aoi_px // 2)
        px = ds.transform.a
    aoi = out / f"aoi_{aoi_px}.geojson"
    gpd.GeoDataFrame(geometry=[box(x0, y0 - aoi_px * px, x0 + aoi_px * px, y0)], crs="EPSG:32633").to_file(aoi)
    with range_server(cog.parent) as server, geoseg.scheduler("synchronous"):
        t0 = time.perf_counter()
        geoseg.segment(f"{server.url}/{cog.name}", "water", out / f"run_{aoi_px}", aoi=str(aoi), overwrite=True)
        seconds = time.perf_counter() - t0
        sent, requests = server.bytes_sent(f"/{cog.name}"), server.count(f"/{cog.name}")
    return {"size": size, "aoi": aoi_px, "sent": sent, "requests": requests, "file": cog.stat().st_size, "s": seconds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--aoi", type=int, action="append", help="AOI side in pixels (repeat) [512, 2048]")
    ap.add_argument("--out-dir", default=None, help="Where the COG and outputs go [a temporary folder]")
    ap.add_argument("--run", nargs=2, metavar=("COG", "AOI"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run:
        cog = Path(args.run[0])
        print(json.dumps(_one(cog, int(args.run[1]), cog.parent)))
        return
    from tests.test_remote import write_cog

    out = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_remote_"))
    out.mkdir(parents=True, exist_ok=True)
    cog = out / f"cog_{args.size}.tif"
    if not cog.exists():
        write_cog(cog, args.size, 512, seed=1)
    print(f"{'raster':>11} {'AOI':>6} {'requests':>9} {'bytes read':>12} {'file':>12} {'share':>7} {'time':>7}")
    for aoi in args.aoi or [512, 2048]:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.benchmarks.bench_remote", "--run", str(cog), str(aoi)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{r['size']:>5}x{r['size']:<5} {r['aoi']:>5}² {r['requests']:>9} {r['sent'] / 1e6:>9.2f} MB "
            f"{r['file'] / 1e6:>9.1f} MB {r['sent'] / r['file']:>6.1%} {r['s']:>6.1f}s"
        )


if __name__ == "__main__":
    main()
