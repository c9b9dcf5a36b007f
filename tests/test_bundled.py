"""The bundled trained networks on the sample AOI's held-out half (never seen in training)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

import geoseg
from geoseg.evaluate import evaluate
from geoseg.models.bundled import bundled_card, bundled_path


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from geoseg.sample import make_sample

    out = tmp_path_factory.mktemp("sample")
    make_sample(out)  # the full 2048 px scene, seed 42: what the models' training half came from
    return out


@pytest.mark.parametrize("name, cls", [("buildings", "building"), ("ships", "ship"), ("tanks", "storage_tank")])
def test_object_f1_on_the_held_out_half(sample: Path, tmp_path: Path, name: str, cls: str) -> None:
    card = bundled_card(name)
    assert card["training"]["aois"][0] == "train_half.gpkg"  # trained on the other half
    assert [c["name"] for c in card["classes"]] == ["background", cls]
    with geoseg.scheduler("threads"):
        mask = geoseg.predict(str(sample / "scene.tif"), name, aoi=str(sample / "holdout_half.gpkg"))
        geoseg.write(mask, str(tmp_path / name))
    r = evaluate(str(tmp_path / name / "mask.tif"), str(sample / "labels.gpkg"), layer="truth")
    row = r["classes"][cls]
    print(name, json.dumps(row))
    assert row["objects_true"] >= 7
    assert row["object_f1"] >= 0.85, row


def test_bundled_networks_are_small_and_carry_their_recipe() -> None:
    for name in ("buildings", "ships", "tanks"):
        path = Path(bundled_path(name))
        assert path.stat().st_size < 3 * 2**20
        with zipfile.ZipFile(path) as z:
            card = json.loads(z.read(next(n for n in z.namelist() if n.endswith("geoseg_card.json"))))
        assert card["architecture"]["name"] == "geoseg.unet"
        assert card["metrics"]["validation"]["iou"][1] > 0.7
        assert {"epochs", "steps", "scales", "gray", "images", "best_epoch"} <= set(card["training"])
        assert card["scaling"] == {"method": "percentile", "low": [2.0], "high": [98.0], "clip": False}


def test_new_buildings_found_by_change_detection(sample: Path, tmp_path: Path) -> None:
    from geoseg.change import change

    with geoseg.scheduler("threads"):
        r = change(str(sample / "scene.tif"), str(sample / "scene_after.tif"), "buildings", str(tmp_path / "c"), min_area=20)
    assert "new_building" in r["change"]["hectares"]
    ev = evaluate(str(tmp_path / "c" / "change.tif"), str(sample / "labels.gpkg"), layer="new_building")
    row = ev["classes"]["new_building"]
    print("new_building", json.dumps(row))
    assert row["objects_true"] == 14
    assert row["object_f1"] >= 0.8, row
