"""The pipeline every command shares: predict -> write (-> vectorize), and the typed reports it returns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pytest

import geoseg
from geoseg.engine.report import RunReport
from geoseg.vector.report import VectorReport


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from geoseg.sample import make_sample

    folder = tmp_path_factory.mktemp("sample")
    make_sample(str(folder), size=384, seed=3)
    return folder


def test_segment_returns_what_it_wrote(sample: Path, tmp_path: Path) -> None:
    """The reports read like the JSON files, list exactly the files written, and carry the layers' areas."""
    out = tmp_path / "out"
    with geoseg.scheduler("synchronous"):
        done = geoseg.segment(str(sample / "scene.tif"), "water", out, vectorize={"formats": ("gpkg", "geojson")})
    assert isinstance(done.run, RunReport) and isinstance(done.vectors, VectorReport)
    assert done.folder == str(out) and done.mask == str(out / "mask.tif")
    assert dict(done.run) == json.loads((out / "run.json").read_text())
    assert dict(done.vectors) == json.loads((out / "vectors.json").read_text())
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert sorted(done.files()) == on_disk
    classes = done.classes()
    assert classes and set(classes) == {ly["name"] for ly in done.vectors["layers"]}
    for name, c in classes.items():  # areas from memory equal the written polygons' areas
        df = pyogrio.read_dataframe(out / "geoseg.gpkg", layer=name, columns=["area_m2"], read_geometry=False)
        assert c["objects"] == len(df)
        assert c["area_ha"] == pytest.approx(round(float(df["area_m2"].sum()) / 1e4, 3), abs=1e-3)
    assert any(c["area_ha"] > 0 for c in classes.values())


def test_segment_equals_predict_then_write(sample: Path, tmp_path: Path) -> None:
    """One pipeline: the same mask as the two calls it replaces, and no polygons unless asked for."""
    import rasterio

    with geoseg.scheduler("synchronous"):
        done = geoseg.segment(str(sample / "scene.tif"), "forest", tmp_path / "a", tile=128, halo=16)
        geoseg.write(geoseg.predict(str(sample / "scene.tif"), "forest", tile=128, halo=16), tmp_path / "b")
    assert done.vectors is None and done.classes() == {}
    assert not (tmp_path / "a" / "vectors.json").exists()
    with rasterio.open(done.mask) as a, rasterio.open(tmp_path / "b" / "mask.tif") as b:
        assert a.transform == b.transform and a.crs == b.crs
        assert np.array_equal(a.read(), b.read())


def test_area_classes_drop_speckle_by_the_cards_minimum_mapping_unit(sample: Path, tmp_path: Path) -> None:
    """Forest and water polygons under the card's minimum mapping unit (4 px by default) are speckle: never features."""
    import rasterio
    from scipy import ndimage

    with geoseg.scheduler("synchronous"):
        done = geoseg.segment(str(sample / "scene.tif"), "water", tmp_path / "a", vectorize={"formats": ("gpkg",)})
        every = geoseg.vector.vectorize(done.mask, tmp_path / "b", formats=("gpkg",), min_pixels=0)
    assert done.run["parameters"]["mmu_px"] == 4  # shown in run.json
    with rasterio.open(done.mask) as ds:
        assert json.loads(ds.tags()["GEOSEG_OBJECTS"]) == {"mmu_px": 4}  # and carried by the mask
        water = ds.read(1) == 1
    sizes = np.bincount(ndimage.label(water)[0].ravel())[1:]
    assert (sizes < 4).any()  # the scene has speckle
    assert done.vectors["parameters"]["min_pixels"] == 4
    df = pyogrio.read_dataframe(tmp_path / "a" / "geoseg.gpkg", layer="water")
    assert len(df) == (sizes >= 4).sum() and df["area_px"].min() >= 4
    assert done.classes()["water"]["objects"] == len(df)  # summaries count features, never speckle
    assert every["layers"][0]["features"] == len(sizes)  # min_pixels=0 keeps every patch


def test_predict_refuses_what_is_neither_a_path_nor_an_array_in_one_line() -> None:
    """Not read silently wrong, nor with a bare TypeError: one clear refusal (xarray input: tests/test_xarray_in.py)."""
    from geoseg.errors import InputError

    with pytest.raises(InputError, match=r"raster path .* or an xarray DataArray, got int") as err:
        geoseg.predict(3, "water")
    assert "\n" not in str(err.value)
