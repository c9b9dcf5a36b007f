"""The command line: end to end on a local process cluster, errors, and import cost."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import read, whole_image_reference


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "geoseg", *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"geoseg {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_cli_import_is_light() -> None:
    code = (
        "import sys, geoseg, geoseg.cli, geoseg.grid, geoseg.models\n"
        "heavy = [m for m in ('torch', 'dask', 'distributed', 'rasterio', 'geopandas', 'xarray') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "predict" in run_cli("--help").stdout


def test_predict_on_local_process_cluster(make_raster, torchscript_model, tmp_path) -> None:
    src = make_raster(300, 420, seed=21)
    out = tmp_path / "out"
    proc = run_cli(
        "predict",
        str(src),
        "--model",
        str(torchscript_model),
        "--out",
        str(out),
        "--tile",
        "96",
        "--halo",
        "8",
        "--chunk",
        "160",
        "--workers",
        "2",
        "--probabilities",
        "--vectorize",
    )
    assert "wrote" in proc.stdout and "polygons" in proc.stdout
    net = torch.jit.load(str(torchscript_model))
    mask = read(out / "mask.tif")
    np.testing.assert_array_equal(mask, whole_image_reference(net, read(src, None), 8))
    run = json.loads((out / "run.json").read_text())
    assert run["scheduler"]["kind"] == "local" and run["scheduler"]["workers"] == 2
    assert run["scheduler"]["address"].startswith("tls://127.0.0.1:")  # only this process could connect
    assert run["parameters"]["num_threads"] >= 1
    # --vectorize: one styled layer per class but the background class_0, equal to the whole-mask polygons
    import pyogrio
    from rasterio import features
    from shapely.geometry import shape

    vec = json.loads((out / "vectors.json").read_text())
    assert [ly["name"] for ly in vec["layers"]] == ["class_1", "class_2", "class_3"]
    mmu = run["parameters"]["mmu_px"]  # a cardless model's classes are areas: speckle under the default unit is dropped
    assert mmu == 4 and vec["parameters"]["min_pixels"] == mmu
    speckle = 0
    for ly in vec["layers"]:
        shapes = [g for g, v in features.shapes(mask, mask=mask == ly["class_id"]) if v == ly["class_id"]]
        expected = sum(1 for g in shapes if shape(g).area >= mmu)  # shapes in pixel units (no transform given)
        speckle += len(shapes) - expected
        df = pyogrio.read_dataframe(out / "geoseg.gpkg", layer=ly["name"])
        assert len(df) == ly["features"] == expected
        assert df["score"].between(0, 1).all() and df.geometry.is_valid.all()
    assert speckle > 0  # the mask has patches under the unit: the rule is exercised
    assert (out / "project.qgz").exists() and (out / "vectors" / "class_1.geojson").exists()


def test_vectorize_command(tmp_path) -> None:
    from tests.test_vector import _scene_mask, write_mask

    mask = write_mask(tmp_path / "mask.tif", _scene_mask())
    out = tmp_path / "v"
    args = ["vectorize", str(mask), "--out", str(out), "--format", "gpkg,fgb", "--classes", "ship,2", "--min-area", "20"]
    proc = run_cli(*args, "--scheduler", "synchronous", "--crs", "EPSG:3035", "--simplify", "2", "--connectivity", "8")
    assert "polygons" in proc.stdout
    vec = json.loads((out / "vectors.json").read_text())
    assert [ly["name"] for ly in vec["layers"]] == ["water", "ship"]
    assert vec["parameters"] | {"connectivity": 8, "simplify": 2.0, "min_area": 20.0, "crs": "EPSG:3035"} == vec["parameters"]
    assert sorted(p.name for p in (out / "vectors").iterdir()) == ["ship.fgb", "water.fgb"]
    again = run_cli(*args, check=False)
    assert again.returncode == 1 and "already exists; pass --overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    bad = run_cli("vectorize", str(tmp_path / "nope.tif"), "--out", str(tmp_path / "w"), check=False)
    assert bad.returncode == 1 and "nope.tif: no such file" in bad.stderr


def test_bands_option_reorders(make_raster, tmp_path) -> None:
    src = make_raster(60, 70, bands=4, seed=22)
    net = torch.jit.script(torch.nn.Conv2d(3, 2, 1))
    model = tmp_path / "m.pt"
    torch.jit.save(net, str(model))
    run_cli(
        "-q",
        "predict",
        str(src),
        "-m",
        str(model),
        "-o",
        str(tmp_path / "o"),
        "--bands",
        "4,2,1",
        "--tile",
        "32",
        "--halo",
        "0",
        "--scheduler",
        "synchronous",
    )
    data = read(src, None)[[3, 1, 0]]
    np.testing.assert_array_equal(read(tmp_path / "o" / "mask.tif"), whole_image_reference(net, data, 0))


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "no such file"),
        ("not_raster", "not a raster GDAL can open"),
        ("cuda", "no usable CUDA"),
        ("bad_band", "do not exist"),
        ("exists", "--overwrite"),
        ("bad_model", "not an ONNX model"),
    ],
)
def test_errors_are_one_clear_line(case, needle, make_raster, torchscript_model, tmp_path) -> None:
    src = make_raster(40, 40, seed=23)
    out = tmp_path / "o"
    args = [str(src), "-m", str(torchscript_model), "-o", str(out), "--scheduler", "synchronous", "--tile", "32", "--halo", "4"]
    if case == "missing":
        args[0] = str(tmp_path / "nope.tif")
    elif case == "not_raster":
        bad = tmp_path / "bad.tif"
        bad.write_text("this is not a GeoTIFF")
        args[0] = str(bad)
    elif case == "cuda":
        args += ["--device", "cuda"]
    elif case == "bad_band":
        args += ["--bands", "1,2,7"]
    elif case == "exists":
        out.mkdir()
        (out / "mask.tif").write_bytes(b"keep me")
    elif case == "bad_model":
        bad = tmp_path / "model.pt"
        bad.write_bytes(b"\x80\x04not a zip")
        args[2] = str(bad)
    proc = run_cli("predict", *args, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("geoseg: error:"), proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr
    if case == "exists":
        assert (out / "mask.tif").read_bytes() == b"keep me"
    else:
        assert not out.exists() or not any(out.iterdir())


def test_verbose_shows_traceback(tmp_path, torchscript_model) -> None:
    proc = run_cli(
        "-v", "predict", str(tmp_path / "nope.tif"), "-m", str(torchscript_model), "-o", str(tmp_path / "o"), check=False
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_plain_image_runs_in_pixel_coordinates(tmp_path) -> None:
    """A PNG without georeference: the same engine, a mask of exactly its size, pixel-space polygons, one warning."""
    import json

    import rasterio
    import torch

    from tests.conftest import conv_net, whole_image_reference

    rng = np.random.default_rng(5)
    img = (rng.random((3, 70, 90)) * 255).astype(np.uint8)
    src = tmp_path / "photo.png"
    with rasterio.open(src, "w", driver="PNG", width=90, height=70, count=3, dtype="uint8") as ds:
        ds.write(img)
    net = conv_net(3, 3, depth=2)
    model = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(net), str(model))
    out = tmp_path / "o"
    args = ["-m", str(model), "-o", str(out), "--tile", "32", "--halo", "4", "--scheduler", "synchronous", "--vectorize"]
    proc = run_cli("predict", str(src), *args, check=False)
    assert proc.returncode == 0, proc.stderr
    warnings_ = [ln for ln in proc.stderr.splitlines() if "warning" in ln.lower()]
    assert len(warnings_) == 1 and "pixel coordinates" in warnings_[0], proc.stderr
    with rasterio.open(out / "mask.tif") as ds:
        assert (ds.width, ds.height) == (90, 70) and ds.crs is None
        mask = ds.read(1)
    np.testing.assert_array_equal(mask, whole_image_reference(net, img.astype(np.float32), 4))
    vec = json.loads((out / "vectors.json").read_text())
    assert vec["crs"]["mask"] is None and vec["features"] > 0
