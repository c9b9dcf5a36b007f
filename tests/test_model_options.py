"""What a card asks of the engine besides bands and scaling: test-time augmentation and object rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

import geoseg
from geoseg.errors import ModelError
from geoseg.evaluate import evaluate
from geoseg.models.card import card_from_dict, card_to_dict


class Lopsided(torch.nn.Module):
    """Not rotation-equivariant: a 3x3 kernel with one heavy corner, two logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[[3.0, -1.0, 0.0], [0.5, -1.0, 0.2], [0.0, 0.3, -1.5]]]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x[:, :1] / 1000.0)  # raw values of a few thousand: logits of a few units
        return torch.cat([torch.zeros_like(y), y], dim=1)


def test_tta_averages_the_eight_dihedral_views(make_raster) -> None:
    src = make_raster(64, 64, bands=1, dtype="float32", seed=3)
    net = Lopsided().eval()
    card = card_from_dict({"name": "lop", "tile": 64, "halo": 8, "size_multiple": 1, "tta": 8}, "t")
    with rasterio.open(src) as ds:
        x = torch.from_numpy(ds.read().astype(np.float32))[None]
    views = []
    for k in (0, 2, 1, 3):
        for flip in (False, True):
            v = torch.rot90(x.flip(-1) if flip else x, k, (2, 3))
            with torch.no_grad():
                y = torch.rot90(net(torch.nn.functional.pad(v, (8, 8, 8, 8), mode="reflect")), -k, (2, 3))
            y = y.flip(-1) if flip else y
            views.append(y[..., 8:-8, 8:-8])
    want = torch.stack(views).mean(0).softmax(1)[0].numpy()
    with geoseg.scheduler("synchronous"):
        got = geoseg.predict(str(src), net, card=card, probabilities=True)["probabilities"].values
        plain = geoseg.predict(str(src), net, card=card, probabilities=True, tta=1)["probabilities"].values
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(plain - want).max() > 1e-3  # the views differ, so the test can fail
    with pytest.raises(ModelError, match="tta must be"):
        card_from_dict({"name": "x", "tta": 3}, "t")


class Bright(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x[:, :1] - 100.0) / 10.0
        return torch.cat([torch.zeros_like(y), y], dim=1)


def _scene(path: Path) -> Path:
    """10 m pixels: a 4 x 8 px ship (80 m), a 1 px speck, and a 2 x 70 px breakwater (700 m)."""
    data = np.zeros((1, 100, 100), np.float32)
    data[0, 10:14, 10:18] = 200  # ship
    data[0, 30, 30] = 200  # speck (100 m2)
    data[0, 60:62, 15:85] = 200  # breakwater
    prof = dict(driver="GTiff", width=100, height=100, count=1, dtype="float32", crs="EPSG:32632",
                transform=from_origin(500000, 5000000, 10, 10))  # fmt: skip
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
    return path


def test_object_rules_travel_with_the_mask_to_vectorize_and_evaluate(tmp_path: Path) -> None:
    import geopandas as gpd
    import pyogrio
    import shapely

    from geoseg.vector import vectorize

    src = _scene(tmp_path / "s.tif")
    card = card_from_dict(
        {
            "name": "ships",
            "task": "objects",
            "tile": 64,
            "halo": 4,
            "size_multiple": 1,
            "classes": [{"id": 0, "name": "background"}, {"id": 1, "name": "ship"}],
            "objects": {"min_area_m2": 1000, "max_length_m": 500},
        },
        "t",
    )
    assert card_to_dict(card)["objects"] == {"min_area_m2": 1000.0, "max_length_m": 500.0}
    with geoseg.scheduler("synchronous"):
        geoseg.write(geoseg.predict(str(src), Bright(), card=card), str(tmp_path / "o"))
        with rasterio.open(tmp_path / "o" / "mask.tif") as ds:
            assert json.loads(ds.tags()["GEOSEG_OBJECTS"]) == {"min_area_m2": 1000.0, "max_length_m": 500.0}
            assert (ds.read(1) == 1).sum() == 32 + 1 + 140  # the mask keeps every pixel
        vectorize(str(tmp_path / "o" / "mask.tif"), str(tmp_path / "o"), formats=["gpkg"])
        df = pyogrio.read_dataframe(tmp_path / "o" / "geoseg.gpkg", layer="ship")
        assert len(df) == 1 and df.length_m.iloc[0] == pytest.approx(80, abs=1)  # speck and breakwater dropped
        report = json.loads((tmp_path / "o" / "vectors.json").read_text())
        assert report["parameters"]["min_area"] == 1000 and report["parameters"]["max_length"] == 500
        vectorize(str(tmp_path / "o" / "mask.tif"), str(tmp_path / "all"), formats=["gpkg"], min_area=0)
        assert len(pyogrio.read_dataframe(tmp_path / "all" / "geoseg.gpkg", layer="ship")) == 3  # explicit: all
    labels = tmp_path / "labels.gpkg"
    box = shapely.box(500100, 4999860, 500180, 4999900)  # the ship's pixels
    gpd.GeoDataFrame({"class": ["ship"]}, geometry=[box], crs="EPSG:32632").to_file(labels)
    r = evaluate(str(tmp_path / "o" / "mask.tif"), str(labels))["classes"]["ship"]
    assert (r["objects_pred"], r["object_tp"], r["object_f1"]) == (1, 1, 1.0)
    r = evaluate(str(tmp_path / "o" / "mask.tif"), str(labels), min_area=0, max_length=0)["classes"]["ship"]
    assert r["objects_pred"] == 3


def test_bad_object_rules_are_card_errors() -> None:
    for bad in ({"min_area_m2": -1}, {"max_length": 3}, "big"):
        with pytest.raises(ModelError, match="objects"):
            card_from_dict({"name": "x", "objects": bad}, "t")


def test_workflow_radiometry_is_checked_before_any_work(tmp_path: Path) -> None:
    from geoseg.errors import InputError
    from geoseg.workflows.spec import load_workflow

    wf = tmp_path / "w.yaml"
    wf.write_text("name: w\nimagery: {files: [a.tif], radiometry: dn}\nmodels: [ships]\noutputs: {folder: out}\n")
    with pytest.raises(InputError, match=r"w\.yaml:2.*radiometry"):
        load_workflow(str(wf))
    wf.write_text("name: w\nimagery: {files: [a.tif], radiometry: s2-l2a}\nmodels: [ships]\noutputs: {folder: out}\n")
    assert load_workflow(str(wf)).imagery.radiometry == "s2-l2a"
