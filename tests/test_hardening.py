"""Hardening: every bad input gives exit 1, one ``geoseg: error:`` line naming the file and the fix,
no traceback and no partial output; and runs survive a killed Dask worker and flaky reads."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import torch

from tests.conftest import PROGRESS_LINE, read, write_raster

TILE = ["--tile", "32", "--halo", "4"]


def run_cli(*args: str, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "geoseg", *args], capture_output=True, text=True, timeout=120, preexec_fn=preexec_fn
    )


def _limit_file_size(limit: int):
    def _apply() -> None:  # runs in the child: writes past `limit` bytes fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return _apply


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.is_dir() else []


def _write_vector(path: Path, geoms: list, crs: str | None) -> Path:
    import geopandas as gpd

    gpd.GeoDataFrame({"id": list(range(len(geoms)))}, geometry=geoms, crs=crs).to_file(path)
    return path


def _raster_poly(src: Path, pixel_coords: list[tuple[float, float]]):
    """A polygon given in (col, row) pixel coordinates of ``src``, in its CRS."""
    import shapely

    with rasterio.open(src) as ds:
        t = ds.transform
    return shapely.Polygon([t * (c, r) for c, r in pixel_coords])


def _onnx_fixed16(path: Path) -> Path:
    net = torch.nn.Conv2d(3, 2, 1).eval()
    kw = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), str(path), input_names=["x"], output_names=["y"], **kw)
    return path


BAD_INPUTS = {
    # case: (text the one error line must contain, "file" whose name it must contain: src/aoi/model/out)
    "truncated": ("failed after 3 attempts", "src"),
    "corrupt_block": ("failed after 3 attempts", "src"),
    "no_crs_with_aoi": ("the raster has no CRS or geotransform", "src"),
    "all_nan": ("every pixel is nodata", "src"),
    "all_nodata": ("every pixel is nodata", "src"),
    "aoi_misses": ("does not overlap the raster", "aoi"),
    "aoi_no_crs": ("has no CRS; set one", "aoi"),
    "aoi_not_vector": ("not a vector file", "aoi"),
    "out_is_file": ("is a file; fix '--out' / '-o'", "out"),
    "out_not_writable": ("not writable", "out"),
    "out_read_only_fs": ("choose a folder you can write to", "out"),
    "empty_file": ("not a raster GDAL can open", "src"),
    "complex_dtype": ("complex bands", "src"),
    "model_bands": ("the model takes 4 bands but 3 were selected", "model"),
    "model_zip_not_ts": ("could not load the model", "model"),
    "onnx_fixed_size": ("use --tile 16", "model"),
    "disk_full": ("the disk is full (File too large); free space or choose another --out", "out"),
    "disk_full_cog": ("the disk is full (File too large); free space or choose another --out", "out"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(case, make_raster, torchscript_model, tmp_path) -> None:
    needle, names = BAD_INPUTS[case]
    src = make_raster(40, 40, seed=31)
    model = torchscript_model
    out = tmp_path / "out"
    extra: list[str] = []
    preexec = None
    if case in ("truncated", "corrupt_block"):
        src = write_raster(tmp_path / f"{case}.tif", 128, 128, blocksize=32, seed=32)
        raw = src.read_bytes()
        if case == "truncated":
            src.write_bytes(raw[: len(raw) // 2])
        else:
            mid = len(raw) // 2
            src.write_bytes(raw[:mid] + os.urandom(2048) + raw[mid + 2048 :])
    elif case == "no_crs_with_aoi":  # a plain image runs in pixel coordinates; a geographic AOI cannot apply to it
        src = make_raster(40, 40, crs=None)
        box = shapely.box(500000, 3999900, 500060, 4000000)
        extra = ["--aoi", str(_write_vector(tmp_path / "aoi.gpkg", [box], "EPSG:32633"))]
    elif case == "all_nan":
        src = make_raster(40, 40, dtype="float32")
        with rasterio.open(src, "r+") as ds:
            data = np.full((3, 40, 40), np.nan, np.float32)
            data[:, ::2] = np.inf
            ds.write(data)
    elif case == "all_nodata":
        src = make_raster(40, 40, nodata=0, nodata_box=(0, 40, 0, 40))
    elif case == "aoi_misses":
        far = _raster_poly(src, [(500, 500), (520, 500), (520, 520), (500, 520)])
        extra = ["--aoi", str(_write_vector(tmp_path / "aoi.gpkg", [far], "EPSG:32633"))]
    elif case == "aoi_no_crs":
        box = _raster_poly(src, [(5, 5), (30, 5), (30, 30), (5, 30)])
        extra = ["--aoi", str(_write_vector(tmp_path / "aoi.shp", [box], None))]
    elif case == "aoi_not_vector":
        bad = tmp_path / "aoi.gpkg"
        bad.write_text("not a vector file at all\n")
        extra = ["--aoi", str(bad)]
    elif case == "out_is_file":
        out = tmp_path / "out.txt"
        out.write_text("keep me")
    elif case == "out_not_writable":
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
        out = parent / "out"
        probe = parent / ".probe"
        try:
            probe.write_text("x")
            probe.unlink()
            can_write = True
        except OSError:
            can_write = False
        if can_write or os.access(parent, os.W_OK):
            parent.chmod(0o700)
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod 0o500 does not stop writes here")
    elif case == "out_read_only_fs":
        out = Path("/sys") / f"geoseg-out-{os.getpid()}"  # sysfs refuses new folders, even to root
        try:
            out.mkdir()
            out.rmdir()
            pytest.skip("/sys accepts new folders here; no read-only place to test")
        except OSError:
            pass
    elif case == "empty_file":
        src = tmp_path / "empty.tif"
        src.write_bytes(b"")
    elif case == "complex_dtype":
        src = tmp_path / "complex.tif"
        prof = {"driver": "GTiff", "width": 40, "height": 40, "count": 3, "dtype": "complex64", "crs": "EPSG:32633"}
        with rasterio.open(src, "w", transform=rasterio.transform.from_origin(500000, 4000000, 2, 2), **prof) as ds:
            ds.write(np.ones((3, 40, 40), np.complex64))
    elif case == "model_bands":
        model = tmp_path / "four_bands.pt"
        torch.jit.save(torch.jit.script(torch.nn.Conv2d(4, 2, 1)), str(model))
    elif case == "model_zip_not_ts":
        model = tmp_path / "model.pt"
        with zipfile.ZipFile(model, "w") as z:
            z.writestr("model/readme.txt", "a zip archive, but no TorchScript inside")
    elif case == "onnx_fixed_size":
        model = _onnx_fixed16(tmp_path / "fixed16.onnx")
    elif case in ("disk_full", "disk_full_cog"):
        # float32 probabilities of 320x320 px x 4 classes are ~1.6 MB: far past the 200 KB limit; with
        # small chunks every part fits and the COG assembly is what fails
        src = make_raster(320, 320, seed=33)
        extra = ["--probabilities", "--probabilities-dtype", "float32", *(["--chunk", "48"] if case == "disk_full_cog" else [])]
        preexec = _limit_file_size(200_000)
    before = out.read_bytes() if out.is_file() else None
    args = [str(src), "-m", str(model), "-o", str(out), "--scheduler", "synchronous", *TILE, *extra]
    proc = run_cli("predict", *args, preexec_fn=preexec)
    try:
        assert proc.returncode == 1, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not PROGRESS_LINE.match(ln)]  # work done first
        assert len(lines) == 1 and lines[0].startswith("geoseg: error:"), proc.stderr
        assert "Traceback" not in proc.stderr
        line = lines[0]
        print(f"\n[{case}] {line}")
        assert needle in line, line
        named = {"src": src, "model": model, "out": out, "aoi": Path(extra[-1]) if "--aoi" in extra else None}[names]
        assert str(named) in line, line
        if case in ("truncated", "corrupt_block"):  # the pixel window that failed
            assert "reading rows " in line and ", cols " in line, line
        if case == "disk_full":
            assert "free" in line and "--out" in line, line
        if before is not None:
            assert out.read_bytes() == before
        else:
            assert _tree(out) == [], _tree(out)  # nothing left: no mask.tif, run.json or staging folder
    finally:
        if case == "out_not_writable":
            (tmp_path / "ro").chmod(0o700)


def _predict_ok(src: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = run_cli("-q", "predict", str(src), "-m", str(model), "-o", str(out), "--scheduler", "synchronous", *TILE, *extra)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_one_pixel_raster_works(make_raster, torchscript_model, tmp_path) -> None:
    """A 1x1 raster is a valid (if tiny) raster: mirroring pads it to a tile, so it gets a 1x1 mask."""
    from tests.conftest import conv_net, whole_image_reference

    src = make_raster(1, 1, seed=34)
    _predict_ok(src, torchscript_model, tmp_path / "o")
    mask = read(tmp_path / "o" / "mask.tif")
    assert mask.shape == (1, 1)
    np.testing.assert_array_equal(mask, whole_image_reference(conv_net(), read(src, None), 4))
    with rasterio.open(tmp_path / "o" / "mask.tif") as ds, rasterio.open(src) as s:
        assert ds.transform == s.transform and ds.crs == s.crs


def test_some_nan_inf_pixels_are_nodata(make_raster, torchscript_model, tmp_path) -> None:
    src = make_raster(40, 40, dtype="float32", seed=35)
    bad = np.zeros((40, 40), bool)
    bad[3:9, 10:20] = True
    bad[30, 30] = True
    with rasterio.open(src, "r+") as ds:
        data = ds.read()
        data[0][bad] = np.nan
        data[2, 30, 30] = -np.inf
        data[1, 5, 12] = np.inf
        ds.write(data)
    _predict_ok(src, torchscript_model, tmp_path / "o")
    mask = read(tmp_path / "o" / "mask.tif")
    np.testing.assert_array_equal(mask == 255, bad)


def test_bowtie_aoi_is_made_valid(make_raster, torchscript_model, tmp_path) -> None:
    """A self-intersecting AOI is repaired (two triangles): the masked area is the valid area."""
    import shapely
    from rasterio.features import geometry_mask

    src = make_raster(64, 64, seed=36)
    # corners off the pixel grid, so no pixel centre lies on an edge
    bowtie = _raster_poly(src, [(4.3, 4.1), (60.2, 59.7), (60.2, 4.1), (4.3, 59.7), (4.3, 4.1)])
    assert not bowtie.is_valid
    aoi = _write_vector(tmp_path / "bowtie.gpkg", [bowtie], "EPSG:32633")
    _predict_ok(src, torchscript_model, tmp_path / "o", "--aoi", str(aoi))
    with rasterio.open(tmp_path / "o" / "mask.tif") as ds:
        mask = ds.read(1)
        transform = ds.transform
        px_area = abs(transform.a * transform.e)
    fixed = shapely.make_valid(bowtie)
    assert fixed.geom_type == "MultiPolygon" and fixed.area == pytest.approx(0.5 * 55.9 * 55.6 * 2.0**2)
    inside = geometry_mask([fixed], out_shape=mask.shape, transform=transform, invert=True)
    np.testing.assert_array_equal(mask != 255, inside)
    assert (mask != 255).sum() * px_area == pytest.approx(fixed.area, rel=0.06)
    # the same AOI as a STAC search's lon/lat geometry: repaired too (a raw union of the bow-tie raised GEOS's error)
    from pyproj import Transformer
    from shapely.geometry import shape

    from geoseg.io.aoi import aoi_lonlat

    lonlat = shape(aoi_lonlat(aoi))
    to_lonlat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform
    want = shapely.ops.transform(to_lonlat, fixed)
    assert lonlat.is_valid and lonlat.symmetric_difference(want).area < 1e-3 * want.area


# ---- faults -------------------------------------------------------------------------------------


def test_flaky_window_read_is_retried(make_raster, torchscript_model, tmp_path, monkeypatch) -> None:
    import contextlib

    import dask
    from rasterio.errors import RasterioIOError

    import geoseg
    from geoseg.io import raster

    src = make_raster(48, 48, seed=37)
    with dask.config.set(scheduler="synchronous"):
        reference = geoseg.predict(str(src), str(torchscript_model), tile=32, halo=4).values
    original = raster.RasterSource.dataset
    calls = {"n": 0, "fail": 2}

    @contextlib.contextmanager
    def flaky(self):
        calls["n"] += 1
        if calls["n"] <= calls["fail"]:
            raise RasterioIOError(f"{self.path}: simulated dropped connection")
        with original(self) as ds:
            yield ds

    monkeypatch.setattr(raster.RasterSource, "dataset", flaky)
    with dask.config.set(scheduler="synchronous"):
        geoseg.write(geoseg.predict(str(src), str(torchscript_model), tile=32, halo=4), tmp_path / "ok")
    assert calls["n"] == 3  # two failures, then one good read of the single chunk
    np.testing.assert_array_equal(read(tmp_path / "ok" / "mask.tif"), reference)

    calls.update(n=0, fail=10**9)  # never succeeds
    out = tmp_path / "bad"
    with dask.config.set(scheduler="synchronous"), pytest.raises(geoseg.errors.RasterReadError) as err:
        geoseg.write(geoseg.predict(str(src), str(torchscript_model), tile=32, halo=4), out)
    msg = str(err.value)
    assert str(src) in msg and "reading rows 0:48, cols 0:48 failed after 3 attempts" in msg, msg
    assert calls["n"] == 3
    assert _tree(out) == []


def test_killed_worker_is_recovered(make_raster, tmp_path) -> None:
    """SIGKILL one of two worker processes mid-run: Dask reschedules its tasks, the mask is unchanged."""
    import dask
    from distributed import Client, LocalCluster

    import geoseg

    class SlowNet(torch.nn.Module):  # defined here so cloudpickle ships it by value
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            with torch.no_grad():
                self.conv.weight.mul_(1e-3)

        def forward(self, x):
            time.sleep(0.05)
            return self.conv(x)

    net = SlowNet().eval()
    src = make_raster(192, 192, seed=38)  # 8 x 8 chunks of one tile each: ~3 s of sleeping
    kw = {"tile": 32, "halo": 4, "chunk": 32}
    with dask.config.set(scheduler="synchronous"):
        reference = geoseg.predict(str(src), net, **kw).values

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        pids = client.run(os.getpid)
        victim_addr, victim = sorted(pids.items())[0]
        killed = threading.Event()

        def kill_when_busy() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                busy = client.processing()
                if busy.get(victim_addr):
                    time.sleep(0.3)
                    os.kill(victim, signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_when_busy, daemon=True)
        killer.start()
        result = geoseg.predict(str(src), net, **kw)
        report = geoseg.write(result, tmp_path / "o")
        killer.join(5)
    assert killed.is_set(), "the worker was never seen busy"
    mask = read(tmp_path / "o" / "mask.tif")
    np.testing.assert_array_equal(mask, reference)
    assert report["tiles"]["chunks"] == 64  # 192 px in 24 px tile cores: 8 x 8 chunks
    assert not [p for p in os.listdir(tmp_path / "o") if p.startswith(".geoseg-staging")]
