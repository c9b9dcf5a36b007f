"""What lands on disk: a valid COG on the input grid, probabilities, run.json, nodata, AOI."""

from __future__ import annotations

import hashlib
import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from pyproj import Transformer
from rio_cogeo.cogeo import cog_validate
from shapely.geometry import Polygon

import geoseg
from geoseg.errors import InputError, OutputExistsError
from tests.conftest import conv_net, read, whole_image_reference


def _predict_write(path, model, out, **kw):
    write_kw = {k: kw.pop(k) for k in ("overwrite", "probabilities_dtype") if k in kw}
    with geoseg.scheduler("threads"):
        result = geoseg.predict(path, model, **kw)
        return geoseg.write(result, out, **write_kw)


def test_mask_is_a_valid_cog_on_the_input_grid(make_raster, torchscript_model, tmp_path) -> None:
    src = make_raster(700, 900, seed=1, crs="EPSG:32633")
    report = _predict_write(src, str(torchscript_model), tmp_path / "out", tile=128, halo=16, chunk=300)
    mask_path = tmp_path / "out" / "mask.tif"
    ok, errors, _ = cog_validate(str(mask_path), quiet=True)
    assert ok, errors
    with rasterio.open(src) as s, rasterio.open(mask_path) as m:
        assert (m.width, m.height) == (s.width, s.height)
        assert m.transform == s.transform
        assert m.crs == s.crs
        assert m.dtypes == ("uint8",) and m.nodata == 255
        assert m.compression.name == "deflate"
        assert m.profile["tiled"] and m.block_shapes[0] == (512, 512)
        assert m.overviews(1)  # internal overviews exist
        cmap = m.colormap(1)
        expected_colors = {c["id"]: tuple(c["color"]) for c in report["model"]["classes"]}
        for cid, rgb in expected_colors.items():
            assert cmap[cid][:3] == rgb
        mask = m.read(1)
    net = torch.jit.load(str(torchscript_model))
    np.testing.assert_array_equal(mask, whole_image_reference(net, read(src, None), 16))

    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run == report
    assert run["model"]["sha256"] == hashlib.sha256(torchscript_model.read_bytes()).hexdigest()
    assert run["input"]["path"] == str(src)
    assert run["parameters"]["tile"] == 128 and run["parameters"]["halo"] == 16 and run["parameters"]["blend"] == "crop"
    assert sum(run["pixels"].values()) == 700 * 900
    for c in run["model"]["classes"]:
        assert run["pixels"][c["name"]] == int((mask == c["id"]).sum())
    assert run["device"]["used"] == "cpu"
    assert run["tiles"]["total"] == 8 * 10 and run["tiles"]["skipped_empty"] == 0
    for key in ("read_task_s", "predict_task_s", "write_task_s", "assemble_cog_s", "total_s", "probe_s"):
        assert run["timings"][key] >= 0
    assert {"geoseg", "rasterio", "gdal", "dask", "torch"} <= set(run["versions"])
    assert not list((tmp_path / "out").glob(".*"))  # no staging or temporary files left


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_probabilities_file(make_raster, tmp_path, dtype) -> None:
    src = make_raster(150, 170, seed=2, nodata=0, nodata_box=(0, 40, 0, 50))
    net = conv_net(depth=2)
    _predict_write(src, net, tmp_path / "o", tile=64, halo=4, chunk=70, probabilities=True, probabilities_dtype=dtype)
    ref = whole_image_reference(net, read(src, None), 4, probabilities=True)
    with rasterio.open(tmp_path / "o" / "probabilities.tif") as p:
        assert p.count == 4 and p.dtypes[0] == dtype
        assert p.descriptions == ("class_0", "class_1", "class_2", "class_3")
        data = p.read()
        valid = p.dataset_mask() > 0
    assert cog_validate(str(tmp_path / "o" / "probabilities.tif"), quiet=True)[0]
    assert not valid[:40, :50].any() and valid[40:, :].all() and valid[:, 50:].all()
    if dtype == "uint8":
        np.testing.assert_allclose(data[:, valid] / 255.0, ref[:, valid], atol=0.5 / 255 + 1e-6)
    else:
        np.testing.assert_allclose(data[:, valid], ref[:, valid], atol=1e-5)
        assert np.isnan(data[:, ~valid]).all()


@pytest.mark.parametrize("probabilities", [False, True])
def test_nodata_flows_and_empty_tiles_are_skipped(make_raster, tmp_path, probabilities) -> None:
    # nodata covers the top-left 128x128 block = 4 whole 32 px tile cores... and more
    src = make_raster(200, 260, seed=4, nodata=0, nodata_box=(0, 128, 0, 128))
    net = conv_net(depth=2)
    calls = []
    net.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    report = _predict_write(src, net, tmp_path / "o", tile=48, halo=8, chunk=64, probabilities=probabilities)
    mask = read(tmp_path / "o" / "mask.tif")
    assert (mask[:128, :128] == 255).all()
    assert (mask[128:, :] != 255).all() and (mask[:, 128:] != 255).all()
    # 32 px cores: 7 x 9 tiles; the 4 x 4 inside the nodata block are skipped without running the model
    assert report["tiles"] == {"total": 63, "skipped_empty": 16, "chunks": 20}
    assert sum(calls) == 63 - 16 + 1  # each tile once (+ the probe's one), also when probabilities are written
    assert report["pixels"]["nodata"] == 128 * 128


def test_alpha_band_is_nodata(tmp_path) -> None:
    path = tmp_path / "rgba.tif"
    data = np.full((4, 64, 80), 120, dtype=np.uint8)
    data[3] = 255
    data[3, :, :20] = 0  # transparent strip
    profile = {
        "driver": "GTiff",
        "width": 80,
        "height": 64,
        "count": 4,
        "dtype": "uint8",
        "crs": "EPSG:3857",
        "transform": rasterio.transform.from_origin(0, 0, 1, 1),
        "photometric": "RGB",
        "alpha": "YES",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    net = conv_net(bands=3, depth=1)
    # default bands leave the alpha band out of the model input; it only marks validity
    report = _predict_write(path, net, tmp_path / "o", tile=32, halo=4)
    assert report["input"]["bands"] == [1, 2, 3]
    mask = read(tmp_path / "o" / "mask.tif")
    assert (mask[:, :20] == 255).all() and (mask[:, 20:] != 255).all()


def test_everything_nodata_is_an_error_and_writes_nothing(make_raster, tmp_path) -> None:
    src = make_raster(64, 64, seed=5, nodata=0, nodata_box=(0, 64, 0, 64))
    with pytest.raises(InputError, match="every pixel is nodata"):
        _predict_write(src, conv_net(depth=1), tmp_path / "o", tile=32, halo=4)
    assert not any((tmp_path / "o").iterdir())


def test_existing_output_is_never_clobbered(make_raster, tmp_path) -> None:
    src = make_raster(64, 64, seed=6)
    out = tmp_path / "o"
    _predict_write(src, conv_net(depth=1), out, tile=32, halo=4)
    before = (out / "mask.tif").read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        _predict_write(src, conv_net(depth=1, seed=9), out, tile=32, halo=4)
    assert (out / "mask.tif").read_bytes() == before
    _predict_write(src, conv_net(depth=1, seed=9), out, tile=32, halo=4, overwrite=True)
    assert (out / "mask.tif").read_bytes() != before


def test_aoi_in_another_crs(make_raster, tmp_path) -> None:
    src = make_raster(300, 400, seed=7, crs="EPSG:32633", res=2.0)
    # a triangle in lon/lat inside the raster (raster origin 500000, 4100000, 2 m pixels)
    to_ll = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    pts_utm = [(500100.0, 4099900.0), (500700.0, 4099850.0), (500300.0, 4099500.0)]
    tri = Polygon([to_ll.transform(x, y) for x, y in pts_utm])
    aoi = tmp_path / "aoi.geojson"
    gpd.GeoDataFrame(geometry=[tri], crs="EPSG:4326").to_file(aoi)
    net = conv_net(depth=3)
    report = _predict_write(src, net, tmp_path / "o", tile=64, halo=8, chunk=64, aoi=str(aoi))
    with rasterio.open(tmp_path / "o" / "mask.tif") as m:
        mask = m.read(1)
        col0, row0 = ~m.transform @ (500000.0, 4100000.0)
        transform = m.transform
    # the output window starts on the input grid near the AOI's bounding box
    assert float(col0).is_integer() and float(row0).is_integer()
    assert -51 <= col0 <= -49 and -51 <= row0 <= -49
    assert report["output_grid"]["width"] < 400 and report["output_grid"]["height"] < 300
    # inside the AOI: equal to the whole-raster result; outside: nodata
    full = whole_image_reference(net, read(src, None), 8)
    r0, c0 = int(-row0), int(-col0)
    window_ref = full[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]]
    from rasterio.features import geometry_mask

    tri_utm = Polygon(pts_utm)
    inside = geometry_mask([tri_utm], out_shape=mask.shape, transform=transform, invert=True)
    assert inside.sum() > 1000
    np.testing.assert_array_equal(mask[inside], window_ref[inside])
    assert (mask[~inside] == 255).all()


def test_aoi_missing_the_raster(make_raster, tmp_path) -> None:
    src = make_raster(50, 50, seed=8)
    aoi = tmp_path / "far.geojson"
    gpd.GeoDataFrame(geometry=[Polygon([(0, 0), (1, 0), (1, 1)])], crs="EPSG:4326").to_file(aoi)
    with pytest.raises(InputError, match="does not overlap"):
        _predict_write(src, conv_net(depth=1), tmp_path / "o", tile=32, halo=4, aoi=str(aoi))
    assert not (tmp_path / "o").exists()


def test_other_gdal_formats_and_vsi_paths(make_raster, tmp_path) -> None:
    """VRT, JP2 and /vsizip inputs go through the same path and give the GeoTIFF's result."""
    import zipfile

    from rasterio.shutil import copy as rio_copy

    src = make_raster(90, 110, bands=3, dtype="uint8", seed=10)
    net = conv_net(depth=2)
    with geoseg.scheduler("threads"):
        expected = geoseg.predict(src, net, tile=32, halo=4).values
        vrt = tmp_path / "src.vrt"
        rio_copy(src, vrt, driver="VRT")
        jp2 = tmp_path / "src.jp2"
        rio_copy(src, jp2, driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES")
        zpath = tmp_path / "src.zip"
        with zipfile.ZipFile(zpath, "w") as z:
            z.write(src, "inner/src.tif")
        for path in (str(vrt), str(jp2), f"/vsizip/{zpath}/inner/src.tif"):
            np.testing.assert_array_equal(geoseg.predict(path, net, tile=32, halo=4).values, expected, err_msg=path)


def test_lazy_result_carries_georeference(make_raster) -> None:
    src = make_raster(40, 60, seed=12)
    with geoseg.scheduler("threads"):
        da = geoseg.predict(src, conv_net(depth=1), tile=32, halo=4)
    import dask.array

    assert isinstance(da.data, dask.array.Array)
    with rasterio.open(src) as s:
        assert da.rio.crs == s.crs
        assert da.rio.transform() == s.transform
        assert da.rio.nodata == 255
    assert da.shape == (40, 60) and da.dtype == np.uint8


def test_provenance_travels_with_the_result_and_a_changed_array_says_so(make_raster, tmp_path) -> None:
    import pickle

    import dask
    import xarray as xr

    from geoseg.engine.job import JOB_ATTR, JobRef, job_from

    src = make_raster(40, 60, seed=12)
    with geoseg.scheduler("synchronous"):
        result = geoseg.predict(src, conv_net(depth=1), tile=32, halo=4)
        ref = result.attrs[JOB_ATTR]
        assert isinstance(ref, JobRef) and job_from(result) is ref.job and ref.job.source.path == str(src)
        assert job_from(result.copy()) is ref.job  # a copy is the same prediction
        # tokens and pickles (what reaches a worker) see the plain Dask name, never the job
        assert dask.base.tokenize(result) == dask.base.tokenize(result)
        shipped = pickle.loads(pickle.dumps(result))
        assert type(shipped.attrs[JOB_ATTR]) is str and job_from(shipped) is None
        for changed in (result + 0, result.isel(x=slice(0, 30))):
            with pytest.raises(InputError, match=r"changed after geoseg\.predict") as err:
                geoseg.write(changed, tmp_path / "changed")
            assert "run.json could not name the input and model" in str(err.value)
            assert "aoi=" in str(err.value) and "classes=" in str(err.value)
        bare = xr.DataArray(result.data, dims=("y", "x"))
        with pytest.raises(InputError, match=r"carries no job from geoseg\.predict"):
            geoseg.write(bare, tmp_path / "changed")
        assert not (tmp_path / "changed").exists()  # refused before any output
        report = geoseg.write(result, tmp_path / "ok")
    assert report["input"]["path"] == str(src) and report["model"]["classes"]


def test_nan_pixels_are_nodata_and_do_not_poison_neighbours(tmp_path) -> None:
    path = tmp_path / "float.tif"
    rng = np.random.default_rng(3)
    data = rng.uniform(0, 3000, (3, 80, 90)).astype(np.float32)
    data[:, :, 60:] = np.nan
    data[1, 5, 5] = np.inf
    profile = {
        "driver": "GTiff",
        "width": 90,
        "height": 80,
        "count": 3,
        "dtype": "float32",
        "crs": "EPSG:32633",
        "transform": rasterio.transform.from_origin(0, 0, 1, 1),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    net = conv_net(depth=3)
    _predict_write(path, net, tmp_path / "o", tile=32, halo=4, probabilities=True, probabilities_dtype="float32")
    mask = read(tmp_path / "o" / "mask.tif")
    probs = read(tmp_path / "o" / "probabilities.tif", None)
    invalid = ~np.isfinite(data).all(axis=0)
    assert (mask[invalid] == 255).all() and (mask[~invalid] != 255).all()
    # invalid pixels reach the model as 0 (not NaN), so their valid neighbours stay finite and exact
    filled = np.where(invalid, 0, data)  # every band of an invalid pixel is zeroed
    np.testing.assert_array_equal(mask[~invalid], whole_image_reference(net, filled, 4)[~invalid])
    assert np.isfinite(probs[:, ~invalid]).all() and np.isnan(probs[:, invalid]).all()


def test_relative_paths_become_absolute(make_raster, monkeypatch) -> None:
    from geoseg.io import open_source

    src = make_raster(20, 20)
    monkeypatch.chdir(src.parent)
    assert open_source(src.name).path == str(src)


def test_internal_mask_is_nodata(tmp_path) -> None:
    """A GDAL internal (per-dataset) mask marks nodata like a nodata value does."""
    path = tmp_path / "masked.tif"
    data = np.random.default_rng(4).integers(1, 255, (3, 70, 90), dtype=np.uint8)
    profile = {
        "driver": "GTiff",
        "width": 90,
        "height": 70,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": rasterio.transform.from_origin(0, 0, 1, 1),
        "tiled": True,
        "blockxsize": 32,
        "blockysize": 32,
    }
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        m = np.full((70, 90), 255, dtype=np.uint8)
        m[50:, 30:60] = 0
        dst.write_mask(m)
    _predict_write(path, conv_net(depth=2), tmp_path / "o", tile=32, halo=4)
    mask = read(tmp_path / "o" / "mask.tif")
    assert (mask[50:, 30:60] == 255).all()
    assert (mask != 255).sum() == 70 * 90 - 20 * 30
