"""Rasters behind a URL, read window by window over HTTP from a real server on 127.0.0.1 (tests/servers.py).

The server honours byte ranges, logs every request and answers injected 503s; nothing here
reaches beyond the loopback address.
"""

from __future__ import annotations

import json
import os
import sqlite3
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import given
from hypothesis import strategies as st
from rasterio.transform import from_origin

import geoseg
from geoseg.errors import RasterReadError
from geoseg.io.remote import gdal_path, is_remote, is_url, redact, remote_name, retrying
from tests.servers import range_server

SECRET = "S3CR3T-t0k3n"


def write_cog(path: Path, size: int, blocksize: int, seed: int = 0) -> Path:
    """A two-band (green, nir) uint8 COG with water-like regions, tiled ``blocksize`` px, with overviews."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    wave = np.sin(xx / 37.0) * np.cos(yy / 53.0)
    green = (120 + 60 * wave + rng.normal(0, 12, (size, size))).clip(1, 255).astype("uint8")
    nir = (120 - 60 * wave + rng.normal(0, 12, (size, size))).clip(1, 255).astype("uint8")
    plain = path.with_suffix(".plain.tif")
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 2, "dtype": "uint8", "nodata": 0}
    profile.update(crs="EPSG:32633", transform=from_origin(500000, 6000000, 0.5, 0.5))
    with rasterio.open(plain, "w", **profile) as ds:
        ds.write(np.stack([green, nir]))
        ds.descriptions = ("green", "nir")
    from rasterio.shutil import copy

    copy(plain, path, driver="COG", compress="DEFLATE", blocksize=blocksize)
    plain.unlink()
    return path


@pytest.fixture(scope="module")
def _server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("served")
    write_cog(folder / "scene.tif", 384, 128)
    with range_server(folder) as server:
        yield server


@pytest.fixture
def served(_server):
    """The module's server; the 503s a test injects end with it, whatever happens (no cascade into the next)."""
    try:
        yield _server
    finally:
        with _server.lock:
            _server.fail_next.clear()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries as in production, with short delays (the environment wins over geoseg's GDAL settings)."""
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
    monkeypatch.setenv("GEOSEG_REMOTE_RETRY_DELAY", "0.05")


def _masks_equal(a: Path, b: Path) -> None:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        assert x.transform == y.transform and x.crs == y.crs and x.shape == y.shape
        assert np.array_equal(x.read(), y.read())


def _tree_text(folder: Path) -> str:
    """Every byte under ``folder`` (files of any kind, the ledger included), as text for grepping."""
    return "\n".join(p.read_bytes().decode("latin-1") for p in sorted(folder.rglob("*")) if p.is_file())


def test_urls_map_onto_gdal_file_systems_and_secrets_are_redacted() -> None:
    assert gdal_path("https://h.example/a/b.tif?x=1") == "/vsicurl/https://h.example/a/b.tif?x=1"
    assert gdal_path("s3://bucket/key/b.tif") == "/vsis3/bucket/key/b.tif"
    assert gdal_path("gs://bucket/b.tif") == "/vsigs/bucket/b.tif"
    assert gdal_path("az://container/b.tif") == "/vsiaz/container/b.tif"
    assert gdal_path("/vsis3/bucket/b.tif") == "/vsis3/bucket/b.tif" and gdal_path("scene.tif") == "scene.tif"
    assert is_remote("s3://b/k") and is_remote("/vsizip//vsicurl/https://h/a.zip/x.tif") and not is_remote("/vsimem/x.tif")
    assert not is_remote("data/scene.tif")
    text = (
        f"failed: '/vsicurl/https://u:pw@h.example/b.tif?X-Amz-Signature={SECRET}&X-Amz-Date=1' and "
        f"https://acct.blob.core.windows.net/c/b.tif?sv=2024&sig={SECRET} (HTTP 403)"
    )
    clean = redact(text)
    assert SECRET not in clean and "pw" not in clean and "(HTTP 403)" in clean
    assert "/vsicurl/https://***@h.example/b.tif?<redacted>'" in clean
    assert redact("/data/scene.tif: no such file") == "/data/scene.tif: no such file"
    assert remote_name(f"/vsicurl/https://h/x/20240102_scene.tif?sig={SECRET}") == "20240102_scene.tif"


@given(
    token=st.text(alphabet=string.ascii_letters + string.digits + "-_.~%+/=:@", min_size=12, max_size=40),
    scheme=st.sampled_from(["https://", "http://", "s3://", "/vsicurl/https://", "/vsiaz/", "/vsigs/"]),
    key=st.sampled_from(["X-Amz-Signature", "sig", "token", "se", "code"]),
    wrap=st.sampled_from(["{}", "'{}'", "open {} failed", '"{}": HTTP 403', "{}\nnext line"]),
)
def test_redaction_removes_any_query_in_any_message(token: str, scheme: str, key: str, wrap: str) -> None:
    url = f"{scheme}host.example/a/b.tif?X-Amz-Date=20240101&{key}={token}&z=1"
    shown = redact(wrap.format(url))
    assert token not in shown and "b.tif?<redacted>" in shown


@pytest.mark.parametrize("scheduler", ["synchronous", "local"])
def test_predict_over_http_equals_predict_on_the_local_file(served, scheduler: str, tmp_path: Path) -> None:
    """Same pixels, same grid; run.json names the URL, never its token, and the fingerprint comes from HTTP metadata."""
    url = f"{served.url}/scene.tif?token={SECRET}"
    options = {"tile": 128, "halo": 16, "chunk": 128}
    with geoseg.scheduler(scheduler):
        remote = geoseg.segment(url, "water", tmp_path / "http", **options)
    with geoseg.scheduler("synchronous"):
        geoseg.segment(str(served.root / "scene.tif"), "water", tmp_path / "local", **options)
    _masks_equal(tmp_path / "http" / "mask.tif", tmp_path / "local" / "mask.tif")
    entry = remote.run["input"]
    assert entry["path"] == f"/vsicurl/{served.url}/scene.tif?<redacted>"
    size = (served.root / "scene.tif").stat().st_size
    assert entry["fingerprint"].startswith(f"/vsicurl/{served.url}/scene.tif?<redacted>:{size}:")
    assert SECRET not in _tree_text(tmp_path / "http")


def test_a_small_aoi_of_a_big_cog_reads_a_small_fraction_of_its_bytes(tmp_path: Path) -> None:
    """A 512 px AOI of a 4096 px COG: GDAL fetches the header and the few tiles the AOI and its halo touch."""
    import geopandas as gpd
    from shapely.geometry import box

    folder = tmp_path / "big"
    folder.mkdir()
    cog = write_cog(folder / "big.tif", 4096, 512, seed=1)
    x0, y0 = 500000 + 1800 * 0.5, 6000000 - 1800 * 0.5
    aoi = tmp_path / "aoi.geojson"
    gpd.GeoDataFrame(geometry=[box(x0, y0 - 256, x0 + 256, y0)], crs="EPSG:32633").to_file(aoi)
    with range_server(folder) as server, geoseg.scheduler("synchronous"):
        done = geoseg.segment(f"{server.url}/big.tif", "water", tmp_path / "out", aoi=str(aoi))
        fraction = server.bytes_sent("/big.tif") / cog.stat().st_size
    assert done.run["output_grid"]["width"] <= 600
    assert fraction < 0.10, f"read {fraction:.1%} of the file for a 512 px AOI"


def test_503s_mid_run_are_retried_and_the_result_is_identical(served, tmp_path: Path) -> None:
    """Failures injected after the first chunk, more than GDAL's own retries: geoseg's retry carries the run."""
    url = f"{served.url}/scene.tif"

    def inject(done: int, total: int, unit: str) -> None:
        if done == 1:
            served.fail_next["/scene.tif"] = 7  # GDAL tries 5 times (GDAL_HTTP_MAX_RETRY=4), then geoseg again

    before = served.count("/scene.tif")
    with geoseg.scheduler("synchronous"):
        geoseg.segment(url, "water", tmp_path / "http", tile=128, halo=16, chunk=128, progress=inject)
        geoseg.segment(str(served.root / "scene.tif"), "water", tmp_path / "local", tile=128, halo=16, chunk=128)
    assert served.fail_next["/scene.tif"] == 0
    failed = sum(1 for _, p, n in served.requests[before:] if p == "/scene.tif" and n == 0)
    assert failed >= 7
    _masks_equal(tmp_path / "http" / "mask.tif", tmp_path / "local" / "mask.tif")


def test_retrying_bypasses_gdals_cache_of_a_failure_and_gives_up_in_one_line(served, monkeypatch) -> None:
    from geoseg.io.raster import open_source

    served.fail_next["/scene.tif"] = 6  # the open itself fails in GDAL, then succeeds on geoseg's retry
    src = open_source(f"{served.url}/scene.tif?sig={SECRET}")
    assert src.geobox.width == 384 and SECRET not in repr(src) and SECRET in src.location
    monkeypatch.setenv("GEOSEG_REMOTE_ATTEMPTS", "2")
    served.fail_next["/scene.tif"] = 100
    other = f"{served.url}/scene.tif?sig={SECRET}&signed=again"  # not in GDAL's cache (the first URL's header is)
    with pytest.raises(RasterReadError, match=r"failed after 2 attempts .*try again later") as info:
        retrying(gdal_path(other), "reading", lambda: open_source(other))
    assert SECRET not in str(info.value) and "\n" not in str(info.value)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "geoseg", *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def test_a_missing_url_fails_at_once_in_one_line_and_writes_nothing(served, tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = served.count("/missing.tif")
    proc = _cli("predict", f"{served.url}/missing.tif?token={SECRET}", "-m", "water", "-o", str(out))
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not found (HTTP 404)" in lines[0] and "missing.tif?<redacted>" in lines[0], proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert not out.exists()
    assert served.count("/missing.tif") - before <= 2  # no retries of a permanent error


def test_a_signed_url_token_is_in_no_output_and_no_log(served, tmp_path: Path) -> None:
    """predict -v --vectorize, then a workflow over the same URL: the token is nowhere in files, ledger or logs."""
    url = f"{served.url}/scene.tif?X-Amz-Signature={SECRET}&token={SECRET}"
    log = tmp_path / "dask.log"
    proc = _cli(
        "-v", "predict", url, "-m", "water", "-o", str(tmp_path / "out"), "--vectorize", "--chunk", "128",
        "--scheduler", "local", env={"GEOSEG_DASK_LOG": str(log)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    flow = tmp_path / "wf.yaml"
    flow.write_text(
        f"name: remote\nimagery: ['{url}']\nmodels: [water]\noutputs: {{folder: runs, formats: [gpkg]}}\n"
        "scheduler: synchronous\nchunk: 128\n"
    )
    run = _cli("-v", "run", str(flow))
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert summary["images"][0]["image"].endswith("scene.tif?<redacted>")
    with sqlite3.connect(tmp_path / "runs" / "ledger.sqlite") as db:  # the ledger's rows, not only its file's bytes
        rows = [str(r) for table in ("runs", "units") for r in db.execute(f"SELECT * FROM {table}")]
    flow.unlink()  # the one file that holds the token: the user's own
    outputs = _tree_text(tmp_path) + "\n".join(rows) + proc.stdout + proc.stderr + run.stdout + run.stderr
    assert SECRET not in outputs
    assert "predict scene.tif?<redacted>" in proc.stderr  # the progress line names the file, not its token


def test_s3_urls_read_through_gdal_and_a_missing_key_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """``s3://`` becomes ``/vsis3/``; GDAL's S3 client is pointed at the loopback server (a public bucket, unsigned)."""
    bucket = tmp_path / "root" / "bucket"
    bucket.mkdir(parents=True)
    write_cog(bucket / "scene.tif", 256, 128)
    with range_server(tmp_path / "root") as server, geoseg.scheduler("synchronous"):
        host = server.url.split("//", 1)[1]
        for key, value in {"AWS_S3_ENDPOINT": host, "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "YES")
        done = geoseg.segment("s3://bucket/scene.tif", "water", tmp_path / "s3", tile=128, halo=16)
        assert done.run["input"]["path"] == "/vsis3/bucket/scene.tif" and server.count("/bucket/scene.tif") >= 2
        with pytest.raises(RasterReadError, match=r"^/vsis3/bucket/missing.tif: not found \(HTTP 404\)"):
            geoseg.segment("s3://bucket/missing.tif", "water", tmp_path / "missing")
    with geoseg.scheduler("synchronous"):
        geoseg.segment(str(bucket / "scene.tif"), "water", tmp_path / "local", tile=128, halo=16)
    _masks_equal(tmp_path / "s3" / "mask.tif", tmp_path / "local" / "mask.tif")
    assert not (tmp_path / "missing").exists()


def test_a_workflow_over_a_missing_url_fails_before_any_unit_in_one_line(served, tmp_path: Path) -> None:
    flow = tmp_path / "wf.yaml"
    flow.write_text(
        f"name: gone\nimagery: ['{served.url}/gone.tif?sig={SECRET}']\nmodels: [water]\noutputs: {{folder: runs}}\n"
        "scheduler: synchronous\n"
    )
    proc = _cli("run", str(flow))
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "gone.tif?<redacted>: not found (HTTP 404)" in lines[0], proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


def test_the_declared_size_guard_holds_for_remote_rasters(served, monkeypatch) -> None:
    from geoseg.errors import InputError
    from geoseg.io.raster import open_source

    monkeypatch.setenv("GEOSEG_MAX_PIXELS", "1000")
    with pytest.raises(InputError, match=r"scene.tif\?<redacted>: declares 384 x 384 pixels") as info:
        open_source(f"{served.url}/scene.tif?sig={SECRET}")
    assert SECRET not in str(info.value)


def test_redaction_takes_any_scheme_case_and_fingerprints_hold_no_token(monkeypatch) -> None:
    """``HTTPS://`` is a URL to :func:`is_url`, so to :func:`redact` too; the header-digest fingerprint ignores tokens."""
    from geoseg.io.remote import remote_fingerprint

    for scheme in ("HTTPS://", "Http://", "S3://", "Gs://"):
        assert is_url(f"{scheme}h.example/a.tif")
        once = redact(f"open {scheme}h.example/a.tif?sig={SECRET} failed")
        assert SECRET not in once and redact(once) == once  # redacting twice changes nothing
    one = remote_fingerprint(f"/vsis3/b/a.tif?sig={SECRET}", "GTiff:10x10", {})
    two = remote_fingerprint("/vsis3/b/a.tif?sig=other-token", "GTiff:10x10", {})
    assert one == two and SECRET not in one  # re-signed, the same object keeps its fingerprint


def test_a_retry_drops_gdals_cache_of_the_failed_file_only(tmp_path: Path) -> None:
    """GDAL splits CPL_VSIL_CURL_NON_CACHED on ':' (http://host:port): the retry must not uncache every http file."""
    from geoseg.io.remote import remote_gdal_options

    write_cog(tmp_path / "a.tif", 256, 128)
    write_cog(tmp_path / "b.tif", 256, 128, seed=2)
    with range_server(tmp_path) as server:
        a, b = (gdal_path(f"{server.url}/{n}.tif") for n in "ab")

        def read(path: str) -> np.ndarray:
            with rasterio.open(path) as ds:
                return ds.read()

        with rasterio.Env(**remote_gdal_options(a)):
            first = read(b)  # in GDAL's cache now
            asked = server.count("/b.tif")
            server.fail_next["/a.tif"] = 6  # GDAL's own 5 tries fail, geoseg's retry succeeds
            _, again = retrying(a, "reading", lambda: (read(a), read(b)))
        assert server.fail_next["/a.tif"] == 0 and np.array_equal(first, again)
        assert server.count("/b.tif") == asked  # b.tif came from the cache: only a.tif was asked again


def test_dates_are_read_one_way_and_checked() -> None:
    from geoseg.io.dates import date_text, filename_date, tags_date

    assert filename_date("S2_20240105_T31.tif") == "2024-01-05" and filename_date("2024-01-05_x.tif") == "2024-01-05"
    assert filename_date("tile_20241345_20240106.tif") == "2024-01-06"  # 2024-13-45 is no day
    assert filename_date("2024-13-45.tif") == "2024" and filename_date("scene.tif") is None
    assert tags_date({"TIFFTAG_DATETIME": "2023:04:26 10:00:00"}, "x.tif") == "2023-04-26"
    assert tags_date({"ACQUISITION_DATE": "2022-02-30"}, "s_2021-06-01.tif") == "2021-06-01"
    import datetime

    assert date_text(datetime.datetime(2024, 5, 20, 10, 30)) == "2024-05-20" and date_text(None) is None


def test_every_sink_redacts_a_token(tmp_path: Path, monkeypatch, capsys) -> None:
    """The ledger's error column, the log lines, run.json's command line (segmenters and detectors share it)."""
    import logging

    from geoseg.engine.report import command_line
    from geoseg.io.remote import RedactFilter
    from geoseg.workflows.ledger import Ledger

    monkeypatch.setattr(sys, "argv", ["geoseg", "predict", f"https://h.example/a.tif?sig={SECRET}"])
    assert command_line() == ["geoseg", "predict", "https://h.example/a.tif?<redacted>"]
    ledger = Ledger(str(tmp_path))
    ledger.start_run()
    ledger.begin("u", "segment", "s", "m", {}, "d")
    ledger.failed("u", f"/vsicurl/https://h.example/a.tif?sig={SECRET}: HTTP 500", 1.0)
    assert SECRET not in str(ledger.units()) and "a.tif?<redacted>" in str(ledger.units())
    ledger.close()
    logger = logging.getLogger("geoseg.test_redact")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactFilter())
    logger.addHandler(handler)
    try:
        try:
            raise OSError(f"HTTPS://h.example/a.tif?token={SECRET} refused")
        except OSError:
            logger.exception("reading %s", f"https://h.example/b.tif?sig={SECRET}")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert SECRET not in err and "b.tif?<redacted>" in err and "a.tif?<redacted> refused" in err
