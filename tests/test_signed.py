"""Signed URLs end to end, against a server of signed URLs on 127.0.0.1 (``tests/servers.py`` with ``tokens``).

The server answers 403 to any request without a valid token, so a read made with a redacted
URL fails and is logged. A scene read through predict, a change pair and a STAC workflow: the
token is in no file written, no ledger row and no log line; signed again, the workflow's units
are the same units (skipped); a STAC scene's VRT of remote assets is read as remote files are
(503s mid-run retried).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

import geoseg
from tests.servers import range_server
from tests.test_remote import write_cog

SECRET = "S1gn3d-t0k3n-A"
RESIGNED = "S1gn3d-t0k3n-B"
BANDS = ("green", "nir")


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
    monkeypatch.setenv("GEOSEG_REMOTE_RETRY_DELAY", "0.05")


def _assets(folder: Path, stem: str, seed: int, size: int = 256) -> Path:
    """A two-band COG ``stem.tif`` (the reference) and its bands as single-band COGs ``stem_<band>.tif`` (STAC assets)."""
    ref = write_cog(folder / f"{stem}.tif", size, 128, seed=seed)
    with rasterio.open(ref) as ds:
        data, crs, transform = ds.read(), ds.crs, ds.transform
    for k, band in enumerate(BANDS):
        profile = {"width": size, "height": size, "count": 1, "dtype": "uint8", "nodata": 0, "crs": crs, "transform": transform}
        with rasterio.open(folder / f"{stem}_{band}.tif", "w", driver="COG", blocksize=128, **profile) as out:
            out.write(data[k], 1)
    return ref


def _catalog(folder: Path, url: str, token: str) -> Path:
    """A static STAC catalog of two dated items whose band assets are signed URLs."""
    ring = [[15.0, 54.1], [15.01, 54.1], [15.01, 54.09], [15.0, 54.09], [15.0, 54.1]]
    links = []
    for stem, day in (("early", "2024-01-10"), ("late", "2024-05-20")):
        item = {
            "type": "Feature", "stac_version": "1.0.0", "id": stem, "links": [],
            "geometry": {"type": "Polygon", "coordinates": [ring]}, "bbox": [15.0, 54.09, 15.01, 54.1],
            "properties": {"datetime": f"{day}T10:00:00Z"},
            "assets": {b: {"href": f"{url}/{stem}_{b}.tif?token={token}", "eo:bands": [{"name": b, "common_name": b}]}
                       for b in BANDS},
        }  # fmt: skip
        (folder / f"{stem}.json").write_text(json.dumps(item))
        links.append({"rel": "item", "href": f"./{stem}.json", "type": "application/json"})
    catalog = {"type": "Catalog", "stac_version": "1.0.0", "id": "signed", "description": "signed assets", "links": links}
    (folder / "catalog.json").write_text(json.dumps(catalog))
    return folder / "catalog.json"


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "geoseg", "-v", *args], capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _written(folder: Path, leave_out: tuple[Path, ...]) -> str:
    """Every byte of every file under ``folder`` (but those left out: the user's own), as text for grepping."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not any(p.is_relative_to(x) for x in leave_out)]
    return "\n".join(p.read_bytes().decode("latin-1") for p in files)


def test_a_signed_token_is_in_no_output_no_ledger_and_no_log(tmp_path: Path) -> None:
    """predict, a change pair and a STAC workflow over signed URLs; signed again, the workflow has nothing new to do."""
    served_dir, user = tmp_path / "served", tmp_path / "user"
    served_dir.mkdir()
    user.mkdir()
    for stem, seed in (("early", 0), ("late", 3)):
        _assets(served_dir, stem, seed)
    cache = tmp_path / "cache"
    logs = [tmp_path / f"dask-{k}.log" for k in range(4)]
    env = {"GDAL_HTTP_RETRY_DELAY": "0.05", "GEOSEG_REMOTE_RETRY_DELAY": "0.05", "GEOSEG_CACHE": str(cache)}
    with range_server(served_dir, tokens={SECRET}) as served:
        early, late = (f"{served.url}/{s}.tif?token={SECRET}" for s in ("early", "late"))
        out = tmp_path / "out"
        procs = [
            _cli("predict", early, "-m", "water", "-o", str(out / "predict"), "--vectorize", "--chunk", "128",
                 env={**env, "GEOSEG_DASK_LOG": str(logs[0])}),
            _cli("change", early, late, "-m", "water", "-o", str(out / "change"), env={**env, "GEOSEG_DASK_LOG": str(logs[1])}),
        ]  # fmt: skip
        flow = user / "wf.yaml"
        _catalog(user, served.url, SECRET)
        flow.write_text(
            "name: signed\nimagery: {stac: catalog.json}\nmodels: [water]\nchange: {model: water}\n"
            "outputs: {folder: runs, formats: [gpkg]}\nscheduler: synchronous\nchunk: 128\n"
        )
        procs.append(_cli("run", str(flow), "--out", str(out / "runs"), env={**env, "GEOSEG_DASK_LOG": str(logs[2])}))
        first = json.loads((out / "runs" / "summary.json").read_text())
        _catalog(user, served.url, RESIGNED)  # the provider signs the hrefs again; the old token expires
        served.tokens = {RESIGNED}
        procs.append(_cli("run", str(flow), "--out", str(out / "runs"), env={**env, "GEOSEG_DASK_LOG": str(logs[3])}))
        again = json.loads((out / "runs" / "summary.json").read_text())
        refused = list(served.refused)
    assert first["units"] == {"done": 3, "skipped": 0, "failed": 0}  # two scenes and their change pair
    assert again["units"] == {"done": 0, "skipped": 3, "failed": 0}  # re-signed hrefs: the same scenes
    assert refused == []  # no read was made with a redacted (or stale) URL
    with sqlite3.connect(out / "runs" / "ledger.sqlite") as db:
        rows = [str(r) for table in ("runs", "units") for r in db.execute(f"SELECT * FROM {table}")]
    logged = [p.read_text() for p in logs if p.exists()] + [p.stdout + p.stderr for p in procs]
    text = _written(tmp_path, leave_out=(user, cache, served_dir)) + "\n".join(rows + logged)
    assert SECRET not in text and RESIGNED not in text
    private = cache / "private"
    vrts = sorted(private.glob("*.vrt"))
    assert len(vrts) == 2 and stat.S_IMODE(private.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(v.stat().st_mode) == 0o600 and RESIGNED in v.read_text() for v in vrts)
    assert not list((out / "runs").rglob("*.vrt"))  # nothing beside the outputs names a signed href


def test_a_vrt_of_remote_assets_is_read_as_remote_files_and_survives_503s(tmp_path: Path) -> None:
    """A STAC scene's VRT names its COGs by URL: GDAL's retries, geoseg's back-off and cache bypass apply to it."""
    from geoseg.io.raster import open_source
    from geoseg.workflows.stack import stack_vrt

    ref = _assets(tmp_path, "scene", 0, size=640)  # 25 chunks: most of its tiles are fetched after the first
    with range_server(tmp_path) as served:
        vrt = stack_vrt("a day", [(b, [f"{served.url}/scene_{b}.tif"]) for b in BANDS], str(tmp_path / "o" / ".s"), "day")
        assert open_source(vrt).remote

        def inject(done: int, total: int, unit: str) -> None:
            if done == 1:
                served.fail_next["/scene_nir.tif"] = 7  # past GDAL's own 5 tries: geoseg's retry carries the run

        before = served.count("/scene_nir.tif")
        with geoseg.scheduler("synchronous"):
            geoseg.segment(vrt, "water", tmp_path / "vrt", tile=128, halo=16, chunk=128, progress=inject)
        failed = sum(1 for _, p, n in served.requests[before:] if p == "/scene_nir.tif" and n == 0)
    with geoseg.scheduler("synchronous"):
        geoseg.segment(str(ref), "water", tmp_path / "local", tile=128, halo=16, chunk=128)
    assert failed >= 7 and served.fail_next["/scene_nir.tif"] == 0
    with rasterio.open(tmp_path / "vrt" / "mask.tif") as a, rasterio.open(tmp_path / "local" / "mask.tif") as b:
        assert a.transform == b.transform and np.array_equal(a.read(), b.read())
