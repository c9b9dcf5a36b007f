"""Radiometry: the same reflectance whatever convention a raster stores it in (io.radiometry, card scaling)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from geoseg.errors import InputError, ModelError
from geoseg.io.radiometry import PRESETS, parse_radiometry, resolve_radiometry
from geoseg.io.raster import open_source
from geoseg.models.card import card_from_dict
from geoseg.models.scaling import Scaling


def _reflectance(seed: int = 0, shape: tuple[int, int] = (96, 96)) -> np.ndarray:
    """Three bands of plausible surface reflectance: dark water and a bright land half."""
    rng = np.random.default_rng(seed)
    refl = np.empty((3, *shape), np.float64)
    refl[:, :, : shape[1] // 2] = rng.uniform(0.01, 0.04, (3, shape[0], shape[1] // 2))  # water
    refl[:, :, shape[1] // 2 :] = rng.uniform(0.08, 0.45, (3, shape[0], shape[1] - shape[1] // 2))  # land
    return refl


def _write(path: Path, values: np.ndarray, *, dtype: str = "uint16", scales=None, offsets=None, tags=None) -> Path:
    prof = {
        "driver": "GTiff",
        "width": values.shape[2],
        "height": values.shape[1],
        "count": values.shape[0],
        "dtype": dtype,
        "crs": "EPSG:32633",
        "transform": from_origin(500000, 4100000, 10, 10),
    }
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(values.astype(dtype))
        for b, name in enumerate(("B03", "B04", "B08")[: values.shape[0]], start=1):
            dst.set_band_description(b, name)
        if scales is not None:
            dst.scales = scales
            dst.offsets = offsets
        if tags:
            dst.update_tags(**tags)
    return path


def _encode(refl: np.ndarray, name: str) -> np.ndarray:
    scale, offset, _ = PRESETS[name]
    return np.round((refl - offset) / scale)


def _resolved(path: Path, given=None):
    src = open_source(str(path))
    return src, resolve_radiometry(src, given)


@pytest.mark.parametrize("name", ["s2-l2a", "s2-l2a-harmonized", "sentinelhub-raw16"])
def test_each_convention_is_told_from_the_values_alone(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / f"{name}.tif", _encode(_reflectance(), name))
    _, rad = _resolved(path)
    assert rad.name == name
    assert rad.source == "value range (assumed)"


def test_metadata_beats_the_value_range(tmp_path: Path) -> None:
    refl = _reflectance()
    # raw16 values, but the band metadata says x 1/65535: the metadata decides
    path = _write(tmp_path / "meta.tif", _encode(refl, "sentinelhub-raw16"), scales=[1 / 65535] * 3, offsets=[0.0] * 3)
    _, rad = _resolved(path)
    assert (rad.name, rad.source) == ("sentinelhub-raw16", "band scale/offset")
    # STAC-style scale/offset of the ESA convention on ESA values
    path = _write(tmp_path / "stac.tif", _encode(refl, "s2-l2a"), scales=[1e-4] * 3, offsets=[-0.1] * 3)
    assert _resolved(path)[1].name == "s2-l2a"
    # product metadata (GDAL's SENTINEL2 driver keys)
    path = _write(
        tmp_path / "tags.tif", _encode(refl, "s2-l2a"), tags={"BOA_QUANTIFICATION_VALUE": "10000", "BOA_ADD_OFFSET_B2": "-1000"}
    )
    _, rad = _resolved(path)
    assert (rad.name, rad.source) == ("s2-l2a", "product metadata")
    # an ESA product name in the path: processing baseline 05.09 has the offset, 03.01 has not
    safe = tmp_path / "S2A_MSIL2A_20230426T105621_N0509_R094_T29SPR_20230426T161101.SAFE"
    safe.mkdir()
    rad = _resolved(_write(safe / "T29SPR_B08_10m.tif", _encode(refl, "s2-l2a")))[1]
    assert rad.name == "s2-l2a" and rad.source.startswith("product name")
    old = tmp_path / "S2B_MSIL2A_20210301T105621_N0301_R094_T29SPR_20210301T161101.SAFE"
    old.mkdir()
    assert _resolved(_write(old / "b.tif", _encode(refl, "s2-l2a-harmonized")))[1].name == "s2-l2a-harmonized"
    # what the caller says wins over everything
    assert _resolved(path, "scale=0.0002,offset=0")[1].scale == (0.0002,)


def test_float_reflectance(tmp_path: Path) -> None:
    _, rad = _resolved(_write(tmp_path / "f.tif", _reflectance(), dtype="float32"))
    assert (rad.name, rad.source) == ("reflectance", "float data")


@pytest.mark.parametrize("bad", ["dn", "scale=0", "scale=nan", "scale=1,offset=x", "gain=2"])
def test_bad_radiometry_options_are_one_line_errors(bad: str) -> None:
    with pytest.raises(InputError, match="radiometry"):
        parse_radiometry(bad)


def test_reflectance_scaling_resolves_to_the_same_model_input_for_every_convention(tmp_path: Path) -> None:
    refl = _reflectance()
    card = card_from_dict(
        {"name": "r", "bands": ["green", "red", "nir"], "scaling": {"method": "reflectance", "mean": [0.05], "std": [0.1]}}, "t"
    )
    want = ((refl - 0.05) / 0.1).astype(np.float32)
    for name in ("s2-l2a", "s2-l2a-harmonized", "sentinelhub-raw16"):
        raw = _encode(refl, name)
        _, rad = _resolved(_write(tmp_path / f"{name}.tif", raw))
        got = card.scaling.resolve(radiometry=rad, n_bands=3).apply(raw.astype(np.float32))
        tol = PRESETS[name][0] / 0.1  # half a stored step, in model units, and a little
        np.testing.assert_allclose(got, want, atol=tol)


def test_reflectance_card_validation() -> None:
    with pytest.raises(ModelError, match="both mean and std"):
        card_from_dict({"name": "r", "scaling": {"method": "reflectance", "mean": [0.1]}}, "t")
    with pytest.raises(ModelError, match="does not use"):
        card_from_dict({"name": "r", "scaling": {"method": "reflectance", "value": 3}}, "t")
    with pytest.raises(ModelError, match="resolved"):
        Scaling("reflectance").apply(np.zeros((1, 2, 2), np.float32))


def test_dark_object_subtraction_takes_out_haze_and_the_storage_offset(tmp_path: Path) -> None:
    """A hazy copy of a scene (every band lifted) gives the same model input as the clear one."""
    refl = _reflectance(seed=2)
    scaling = {"method": "reflectance", "mean": [0.0], "std": [0.1], "dark_percentile": 1}
    card = card_from_dict({"name": "r", "bands": ["green", "red", "nir"], "scaling": scaling}, "t")
    from geoseg.io.raster import band_percentiles

    got = []
    for name, haze in (("s2-l2a", 0.0), ("sentinelhub-raw16", 0.0), ("s2-l2a-harmonized", 0.06)):
        raw = _encode(refl + haze, name)
        src, rad = _resolved(_write(tmp_path / f"{name}.tif", raw))
        resolved = card.scaling.resolve(lambda lo, hi, s=src: band_percentiles(s, lo, hi), radiometry=rad, n_bands=3)
        got.append(resolved.apply(raw.astype(np.float32)))
    for other in got[1:]:
        np.testing.assert_allclose(other, got[0], atol=0.01)  # a few storage steps, in model units (0.1 reflectance)
    assert float(np.percentile(got[0][2], 1)) == pytest.approx(0.0, abs=0.01)  # the dark end sits at zero
    with pytest.raises(ModelError, match="dark_percentile"):
        card_from_dict({"name": "r", "scaling": {"method": "divide", "value": 2, "dark_percentile": 1}}, "t")
