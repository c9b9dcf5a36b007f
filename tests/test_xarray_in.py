"""xarray in: a (band, y, x) DataArray, lazy (rioxarray, odc-stac) or in memory, predicts as the GeoTIFF it came from."""

from __future__ import annotations

import datetime
import json
import threading
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rioxarray
import xarray as xr
from shapely.geometry import box

import geoseg
from geoseg.errors import InputError, ModelError, NotGeoreferencedWarning
from geoseg.models.card import card_from_dict
from tests.conftest import conv_net, read, write_raster

# (blend, rioxarray chunks, tile, halo, chunk): input chunks unrelated to geoseg's, smaller than a tile,
# larger than a chunk, ragged edges
CASES = [
    ("crop", {"band": 3, "y": 64, "x": 80}, 64, 8, 100),
    ("crop", {"band": 1, "y": 233, "x": 317}, 96, 16, 250),
    ("cosine", {"band": 3, "y": 100, "x": 100}, 48, 12, 60),
    ("cosine", {"band": 2, "y": 37, "x": 53}, 40, 4, 61),
]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """233 x 317, 3 bands, nodata 0 with a nodata box, 2 m UTM pixels."""
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    return write_raster(path, 233, 317, 3, nodata=0, nodata_box=(10, 60, 20, 90), seed=11)


@pytest.fixture(scope="module")
def net():
    return conv_net(depth=3)  # receptive radius 3


def _same_grid(a: xr.DataArray, b: xr.DataArray) -> None:
    assert a.rio.crs == b.rio.crs
    assert a.rio.transform() == b.rio.transform()
    np.testing.assert_array_equal(a["x"].values, b["x"].values)
    np.testing.assert_array_equal(a["y"].values, b["y"].values)


@pytest.mark.parametrize(("blend", "chunks", "tile", "halo", "chunk"), CASES)
def test_rioxarray_cube_equals_the_file(scene, net, blend, chunks, tile, halo, chunk) -> None:
    kw = {"tile": tile, "halo": halo, "chunk": chunk, "blend": blend}
    with geoseg.scheduler("threads"):
        want = geoseg.predict(scene, net, probabilities=True, **kw)
        got = geoseg.predict(rioxarray.open_rasterio(scene, chunks=chunks), net, probabilities=True, **kw)
        np.testing.assert_array_equal(got["mask"].values, want["mask"].values)
        np.testing.assert_array_equal(got["probabilities"].values, want["probabilities"].values)
    _same_grid(got["mask"], want["mask"])
    assert got["mask"].attrs["source"] == "DataArray (band: 3, y: 233, x: 317)"


def _aoi(tmp_path: Path) -> Path:
    path = tmp_path / "aoi.geojson"
    gpd.GeoDataFrame(geometry=[box(500151.0, 4099613.0, 500507.0, 4099901.0)], crs="EPSG:32633").to_file(path)
    return path


def test_written_outputs_with_an_aoi_equal_the_files_and_say_the_input_was_an_array(scene, net, tmp_path) -> None:
    aoi = _aoi(tmp_path)
    kw = {"tile": 64, "halo": 8, "chunk": 64, "aoi": str(aoi), "blend": "cosine"}
    with geoseg.scheduler("threads"):
        by_path = geoseg.write(geoseg.predict(scene, net, **kw), tmp_path / "path")
        cube = rioxarray.open_rasterio(scene, chunks={"band": 3, "y": 100, "x": 128})
        by_array = geoseg.write(geoseg.predict(cube, net, **kw), tmp_path / "array")
    with rasterio.open(tmp_path / "path" / "mask.tif") as a, rasterio.open(tmp_path / "array" / "mask.tif") as b:
        np.testing.assert_array_equal(b.read(), a.read())
        assert (b.crs, b.transform, b.shape) == (a.crs, a.transform, a.shape)
        assert a.shape[0] < 233 and a.shape[1] < 317  # the AOI's window
    assert by_array["output_grid"] == by_path["output_grid"]
    assert by_array["pixels"] == by_path["pixels"]
    record = json.loads((tmp_path / "array" / "run.json").read_text())["input"]
    assert "path" not in record
    assert record["array"] == "xarray.DataArray" and record["lazy"] is True
    assert record["sizes"] == {"band": 3, "y": 233, "x": 317}
    assert record["band_names"] == ["1", "2", "3"] and record["bands"] == [1, 2, 3]
    assert record["crs"] == "EPSG:32633" and record["nodata"] == 0
    assert record["fingerprint"].startswith("open_rasterio-")
    path_record = json.loads((tmp_path / "path" / "run.json").read_text())["input"]
    assert record["transform"] == path_record["transform"]


CARD = {"name": "named", "bands": ["red", "green", "nir"]}


def test_band_names_select_and_reorder_bands_as_for_a_file(tmp_path, net) -> None:
    """The card's band names pick bands by the band coordinate (aliases too), in the card's order."""
    data = read(write_raster(tmp_path / "raw.tif", 150, 170, 3, seed=4), None)
    path = write_raster(tmp_path / "named.tif", 150, 170, 3, seed=4)
    with rasterio.open(path, "r+") as ds:
        ds.descriptions = ("nir", "red", "green")  # file order: nir, red, green
    ref = rioxarray.open_rasterio(path)
    # the array: four bands in another order, named as Sentinel-2 assets (B04 = red, B03 = green, B08 = nir)
    stack = np.stack([data[2], data[0] // 2, data[1], data[0]])
    cube = xr.DataArray(
        stack, dims=("band", "y", "x"), coords={"band": ["B03", "B11", "B04", "B08"], "y": ref["y"], "x": ref["x"]}
    ).rio.write_crs("EPSG:32633")
    card = card_from_dict(CARD, "test card")
    with geoseg.scheduler("threads"):
        want = geoseg.predict(path, net, card=card, tile=64, halo=8, chunk=64)
        got = geoseg.predict(cube.chunk({"y": 50, "x": 60}), net, card=card, tile=64, halo=8, chunk=64)
        np.testing.assert_array_equal(got.values, want.values)
        report = geoseg.write(got, tmp_path / "out")
    assert report["input"]["bands"] == [3, 1, 4]
    assert report["input"]["band_descriptions"] == ["B04", "B03", "B08"]
    assert report["input"]["band_names"] == ["B03", "B11", "B04", "B08"]
    with geoseg.scheduler("threads"), pytest.raises(ModelError, match="band 'nir'"):
        geoseg.predict(cube.isel(band=[0, 1, 2]), net, card=card)


def test_numpy_backed_array_equals_the_file_and_is_left_untouched(scene, net) -> None:
    ref = rioxarray.open_rasterio(scene)
    values = ref.values.copy()
    cube = xr.DataArray(values, dims=("band", "y", "x"), coords={"y": ref["y"], "x": ref["x"]})
    cube = cube.rio.write_crs("EPSG:32633").rio.write_nodata(0)
    with geoseg.scheduler("threads"):
        want = geoseg.predict(scene, net, tile=64, halo=8, chunk=100)
        got = geoseg.predict(cube, net, tile=64, halo=8, chunk=100)
        np.testing.assert_array_equal(got.values, want.values)
        # without chunks= rioxarray indexes the file lazily (no Dask): given chunks, read block by block
        indexed = geoseg.predict(rioxarray.open_rasterio(scene), net, tile=64, halo=8, chunk=100)
        np.testing.assert_array_equal(indexed.values, want.values)
    _same_grid(got, want)
    np.testing.assert_array_equal(values, ref.values)  # nodata pixels are zeroed in copies, never in the caller's array
    assert (got.values == 255).sum() > 0  # the nodata box
    assert got.attrs["geoseg_job"].job.source.record()["lazy"] is False
    # task keys follow the data (what resume finds a killed run's parts by): same pixels, same keys; others, new ones
    with geoseg.scheduler("threads"):
        again = geoseg.predict(cube.copy(deep=True), net, tile=64, halo=8, chunk=100)
        changed = geoseg.predict(cube + 1, net, tile=64, halo=8, chunk=100)
    assert again.data.name == got.data.name and changed.data.name != got.data.name


class _Guarded:
    """An array that records each read's pixel count and fails any read larger than ``most`` pixels."""

    def __init__(self, data: np.ndarray, most: int) -> None:
        self.data, self.most, self.reads = data, most, []
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self.lock = threading.Lock()

    def __getitem__(self, key):
        out = self.data[key]
        pixels = int(np.prod(out.shape[-2:]))
        assert pixels <= self.most, f"a read of {out.shape} from an array that must be read chunk by chunk"
        with self.lock:
            self.reads.append(pixels)
        return out


def test_a_large_cube_is_computed_window_by_window_never_whole(scene, net) -> None:
    import dask.array as da

    ref = rioxarray.open_rasterio(scene)
    guard = _Guarded(ref.values, most=64 * 64)
    lazy = da.from_array(guard, chunks=(3, 64, 64), name="guarded-cube", asarray=True)
    cube = xr.DataArray(lazy, dims=("band", "y", "x"), coords={"y": ref["y"], "x": ref["x"]}).rio.write_crs("EPSG:32633")
    cube = cube.rio.write_nodata(0)
    with geoseg.scheduler("threads"):
        result = geoseg.predict(cube, net, tile=64, halo=8, chunk=100)
        assert sum(guard.reads) == 0  # predict builds the graph and reads nothing
        got = result.values
        want = geoseg.predict(scene, net, tile=64, halo=8, chunk=100).values
    np.testing.assert_array_equal(got, want)
    assert max(guard.reads) <= 64 * 64
    assert sum(guard.reads) == 233 * 317  # every input chunk once, shared by the windows that overlap it


def test_an_array_without_a_crs_gives_pixel_coordinates_like_a_plain_image(tmp_path, net) -> None:
    path = write_raster(tmp_path / "plain.tif", 120, 140, 3, crs=None, seed=2)
    cube = xr.DataArray(read(path, None), dims=("band", "y", "x"))  # no coordinates, no CRS
    with geoseg.scheduler("threads"), pytest.warns(NotGeoreferencedWarning, match="DataArray"):
        got = geoseg.predict(cube, net, tile=64, halo=8, chunk=64)
    with geoseg.scheduler("threads"):
        want = geoseg.predict(path, net, tile=64, halo=8, chunk=64)
        np.testing.assert_array_equal(got.values, want.values)
        report = geoseg.write(got, tmp_path / "out")
    assert got.rio.crs is None and got.rio.transform() == want.rio.transform()
    np.testing.assert_array_equal(got["x"].values, np.arange(140) + 0.5)
    assert report["output_grid"]["crs"] is None and "mask_png" in report["outputs"]  # a plain image's PNG too
    with pytest.raises(InputError, match="no CRS") as err:
        geoseg.predict(cube, net, aoi=str(_aoi(tmp_path)))
    assert "\n" not in str(err.value)


def test_a_two_dimensional_array_is_one_band_named_by_the_array(tmp_path) -> None:
    path = write_raster(tmp_path / "one.tif", 90, 110, 1, seed=6)
    ref = rioxarray.open_rasterio(path, chunks={"y": 40, "x": 40})
    one = ref.isel(band=0, drop=True).rename("nir")  # (y, x), named
    net = conv_net(bands=1, depth=2)
    card = card_from_dict({"name": "pan", "bands": ["nir"]}, "test card")
    with geoseg.scheduler("threads"):
        want = geoseg.predict(path, net, tile=64, halo=4, chunk=64)
        got = geoseg.predict(one, net, card=card, tile=64, halo=4, chunk=64)
        np.testing.assert_array_equal(got.values, want.values)
    _same_grid(got, want)


def test_a_dataset_of_bands_with_a_time_of_one_is_a_cube_and_more_dates_are_refused(scene, net) -> None:
    """What odc-stac's load returns: a Dataset, a variable per band, with a time dimension."""
    ref = rioxarray.open_rasterio(scene, chunks={"band": 1, "y": 128, "x": 128})
    ds = xr.Dataset({name: ref.isel(band=k, drop=True).expand_dims(time=1) for k, name in enumerate(("red", "green", "nir"))})
    for name in ds.data_vars:
        ds[name].attrs["nodata"] = 0
    card = card_from_dict(CARD, "test card")
    with geoseg.scheduler("threads"):
        want = geoseg.predict(scene, net, tile=64, halo=8, chunk=128)
        got = geoseg.predict(ds, net, card=card, tile=64, halo=8, chunk=128)
        np.testing.assert_array_equal(got.values, want.values)
    two = xr.concat([ds, ds], dim="time")
    with pytest.raises(InputError, match=r"'time' dimension holds 2 slices.*isel\(time=0\)") as err:
        geoseg.predict(two, net, card=card)
    assert "\n" not in str(err.value)
    # one band over dates: the dates are never taken for bands
    with pytest.raises(InputError, match=r"'time' dimension holds 2 slices"):
        geoseg.predict(two["red"], net)


def test_a_stackstac_style_cube_named_by_pixel_corners_and_common_names(scene, net) -> None:
    """stackstac's layout: (time, band, y, x), asset ids as bands with STAC common names beside them, coordinates
    on pixel top-left corners (its default) with the affine in attrs: read on the file's grid, not half a pixel off."""
    from rasterio.transform import from_origin

    data = read(scene, None)
    transform = from_origin(500000.0, 4100000.0, 2.0, 2.0)
    height, width = data.shape[1:]
    cube = xr.DataArray(
        np.stack([data[2], data[0], data[1]])[None],
        dims=("time", "band", "y", "x"),
        coords={
            "time": [np.datetime64("2024-05-01")],
            "band": ["nir08", "red", "green"],
            "common_name": ("band", ["nir", "red", "green"]),
            "x": 500000.0 + 2.0 * np.arange(width),
            "y": 4100000.0 - 2.0 * np.arange(height),
        },
        attrs={"crs": "epsg:32633", "transform": transform, "resolution": 2.0},
    ).chunk({"band": 1, "y": 128, "x": 128})
    cube = cube.rio.write_nodata(0)
    card = card_from_dict(CARD, "test card")
    with geoseg.scheduler("threads"):
        want = geoseg.predict(scene, net, tile=64, halo=8, chunk=128)
        got = geoseg.predict(cube, net, card=card, tile=64, halo=8, chunk=128)
        np.testing.assert_array_equal(got.values, want.values)
    _same_grid(got, want)
    assert got.attrs["geoseg_job"].job.source.band_descriptions == ("red", "green", "nir")


def test_arrays_geoseg_cannot_read_are_one_line_errors(net) -> None:
    odd = xr.DataArray(np.zeros((3, 20, 20), np.uint8), dims=("a", "rows", "cols"))
    with pytest.raises(InputError, match=r"no spatial dimensions .*rename"):
        geoseg.predict(odd, net)
    cube = xr.DataArray(np.zeros((3, 20, 20), np.uint8), dims=("band", "y", "x"))
    with pytest.raises(InputError, match=r"band\(s\) \[5\] do not exist"):
        geoseg.predict(cube, net, bands=[1, 2, 5])
    with pytest.raises(InputError, match="complex"):
        geoseg.predict(cube.astype(np.complex64), net)


def test_percentile_scaling_is_resolved_on_the_array_as_on_the_file(scene, net) -> None:
    card = card_from_dict({"name": "p", "scaling": {"method": "percentile", "low": 2, "high": 98}}, "test card")
    cube = rioxarray.open_rasterio(scene, chunks={"band": 3, "y": 128, "x": 128})
    with geoseg.scheduler("threads"):
        want = geoseg.predict(scene, net, card=card, tile=64, halo=8, chunk=128)
        got = geoseg.predict(cube, net, card=card, tile=64, halo=8, chunk=128)
        np.testing.assert_array_equal(got.values, want.values)
    assert got.attrs["geoseg_job"].job.spec.card.scaling == want.attrs["geoseg_job"].job.spec.card.scaling


def test_reflectance_cards_tell_the_arrays_radiometry_as_the_files(scene, net) -> None:
    """No metadata either way: the value range decides, on the same decimated pixels; (y, x, band) order is fine."""
    scaling = {"method": "reflectance", "mean": [0.05], "std": [0.1]}
    card = card_from_dict({"name": "r", "scaling": scaling}, "test card")
    cube = rioxarray.open_rasterio(scene, chunks={"band": 3, "y": 128, "x": 128}).transpose("y", "x", "band")
    with geoseg.scheduler("threads"):
        want = geoseg.predict(scene, net, card=card, tile=64, halo=8, chunk=128)
        got = geoseg.predict(cube, net, card=card, tile=64, halo=8, chunk=128)
        np.testing.assert_array_equal(got.values, want.values)
    assert got.attrs["geoseg_job"].job.radiometry == want.attrs["geoseg_job"].job.radiometry


def test_segment_of_a_cube_on_the_local_cluster(scene, net, tmp_path) -> None:
    """The default local cluster (worker processes): rioxarray's read tasks run window by window on the workers."""
    with geoseg.scheduler("threads"):
        want = geoseg.predict(scene, net, tile=64, halo=8, chunk=128).values
    cube = rioxarray.open_rasterio(scene, chunks={"band": 3, "y": 128, "x": 128})
    with geoseg.scheduler("local", workers=1, device="cpu"):
        done = geoseg.segment(cube, net, tmp_path / "out", vectorize={"formats": ("gpkg",)}, tile=64, halo=8, chunk=128)
    np.testing.assert_array_equal(read(done.mask), want)
    assert "path" not in done.run["input"] and done.run["input"]["array"] == "xarray.DataArray"
    assert (tmp_path / "out" / "project.qgz").exists()  # no input imagery to add: the project has the mask and layers


def _stac_item(folder: Path, bands: dict[str, np.ndarray]):
    """A static STAC item (projection and raster extensions) whose assets are local single-band GeoTIFFs."""
    import pystac
    from rasterio.transform import from_origin

    transform = from_origin(500000.0, 4100000.0, 2.0, 2.0)
    height, width = next(iter(bands.values())).shape
    item = pystac.Item(
        "scene",
        geometry=box(14.99, 37.03, 15.01, 37.04).__geo_interface__,
        bbox=[14.99, 37.03, 15.01, 37.04],
        datetime=datetime.datetime(2024, 5, 1),
        properties={"proj:epsg": 32633, "proj:shape": [height, width], "proj:transform": list(transform)[:6]},
        stac_extensions=[
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
        ],
    )
    for name, band in bands.items():
        path = folder / f"{name}.tif"
        profile = {"driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": band.dtype.name}
        profile.update(crs="EPSG:32633", transform=transform, nodata=0, tiled=True, blockxsize=128, blockysize=128)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(band, 1)
        asset = pystac.Asset(str(path), media_type=pystac.MediaType.COG, roles=["data"])
        asset.extra_fields["raster:bands"] = [{"nodata": 0, "data_type": band.dtype.name}]
        item.add_asset(name, asset)
    return item


def test_an_odc_stac_cube_from_a_static_item_equals_the_stacked_file(scene, net, tmp_path) -> None:
    odc_stac = pytest.importorskip("odc.stac", reason="odc-stac is not installed (pip install odc-stac)")
    data = read(scene, None)
    item = _stac_item(tmp_path, {"nir": data[2], "green": data[1], "red": data[0]})
    card = card_from_dict(CARD, "test card")
    cube = odc_stac.load([item], bands=["nir", "green", "red"], chunks={"x": 128, "y": 96})  # a Dataset, time: 1
    with geoseg.scheduler("threads"):
        want = geoseg.predict(scene, net, tile=64, halo=8, chunk=128)
        got = geoseg.predict(cube, net, card=card, tile=64, halo=8, chunk=128)
        np.testing.assert_array_equal(got.values, want.values)
        # to_array drops the variables' attributes, nodata among them: say it again
        stacked = cube.isel(time=0).to_array("band").rio.write_nodata(0)
        stacked = geoseg.predict(stacked, net, card=card, tile=64, halo=8, chunk=128)
        np.testing.assert_array_equal(stacked.values, want.values)
    _same_grid(got, want)
    job = got.attrs["geoseg_job"].job
    assert job.source.bands == (3, 2, 1) and job.source.band_nodata == (0.0, 0.0, 0.0)
