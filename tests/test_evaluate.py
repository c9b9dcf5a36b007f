"""geoseg evaluate: pixel and object scores against vector labels in another CRS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely

from geoseg.errors import InputError
from geoseg.evaluate import evaluate, match_objects
from tests.test_vector import ORIGIN, write_mask


def _world(r0: int, r1: int, c0: int, c1: int):
    x0, y0 = ORIGIN * (c0, r0)
    x1, y1 = ORIGIN * (c1, r1)
    return shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


@pytest.fixture
def case(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    mask = np.zeros((100, 100), np.uint8)
    mask[10:20, 10:20] = 1  # matches its label exactly
    mask[40:50, 40:52] = 1  # label 40:50 x 40:50: IoU 100/120 -> match
    mask[70:80, 70:80] = 1  # no label: false positive
    mask[5:15, 60:90] = 2  # water
    mask[95:, :] = 255  # nodata
    labels = [
        ("building", _world(10, 20, 10, 20)),
        ("building", _world(40, 50, 40, 50)),
        ("building", _world(80, 90, 10, 20)),  # missed: false negative
        ("building", _world(200, 210, 10, 20)),  # outside the raster: not scored
        ("building", _world(96, 99, 30, 40)),  # over mask nodata: not scored
        ("water", _world(5, 15, 60, 80)),
    ]
    df = gpd.GeoDataFrame({"class": [c for c, _ in labels]}, geometry=[g for _, g in labels], crs="EPSG:32632").to_crs(4326)
    df["class_id"] = [1.0 if c == "building" else 2.0 for c, _ in labels]  # ids stored as floats (REAL fields)
    path = tmp_path / "labels.gpkg"
    df.to_file(path, layer="truth")
    return write_mask(tmp_path / "mask.tif", mask), path, mask


def test_scores(case) -> None:
    mask_path, labels, _ = case
    r = evaluate(str(mask_path), str(labels))
    b, w = r["classes"]["building"], r["classes"]["water"]
    assert (b["objects_true"], b["objects_pred"], b["object_tp"]) == (3, 3, 2)
    assert b["object_f1"] == pytest.approx(2 / 3)
    # pixels (labels came back from EPSG:4326, so borders may move by a pixel at most)
    assert b["pixels_pred"] == 320 and abs(b["pixels_true"] - 300) <= 40
    assert w["iou"] == pytest.approx(200 / 300, abs=0.03) and w["recall"] == pytest.approx(1.0, abs=0.03)
    assert "object_f1" not in w and r["ignored_label_classes"] == []


def test_float_ids_and_multipolygon_labels(case, tmp_path: Path) -> None:
    mask_path, labels, _ = case
    r = evaluate(str(mask_path), str(labels), class_field="class_id")
    assert r["classes"]["building"]["object_tp"] == 2
    df = gpd.read_file(labels)
    merged = gpd.GeoDataFrame({"class": ["building"]}, geometry=[shapely.union_all(df.geometry[:2].values)], crs=df.crs)
    path = tmp_path / "multi.gpkg"
    merged.to_file(path)
    b = evaluate(str(mask_path), str(path))["classes"]["building"]
    assert (b["objects_true"], b["object_tp"]) == (2, 2)  # each part is an object


def test_match_objects_is_one_to_one() -> None:
    a = shapely.box(0, 0, 10, 10)
    assert match_objects([a, a], [a]) == (1, 1, 0)
    assert match_objects([shapely.box(0, 0, 10, 10)], [shapely.box(6, 0, 16, 10)]) == (0, 1, 1)  # IoU 0.25


def test_cli_and_errors(case, tmp_path: Path) -> None:
    mask_path, labels, _ = case
    out = tmp_path / "scores.json"
    cmd = [sys.executable, "-m", "geoseg", "evaluate", str(mask_path), "--labels", str(labels), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "building" in proc.stdout and "obj F1" in proc.stdout
    assert json.loads(out.read_text())["classes"]["building"]["object_tp"] == 2
    bad = tmp_path / "other.gpkg"
    gpd.read_file(labels).assign(**{"class": "tree"}).to_file(bad)
    with pytest.raises(InputError, match="no label has a class of"):
        evaluate(str(mask_path), str(bad))
    with pytest.raises(InputError, match="no 'kind' attribute"):
        evaluate(str(mask_path), str(labels), class_field="kind")
    with pytest.raises(InputError, match="has no class 'tree'"):
        evaluate(str(mask_path), str(labels), label_class="tree")


def test_bundled_index_models_on_the_sample_aoi(tmp_path: Path, monkeypatch) -> None:
    """forest and water on the generated sample scene: IoU >= 0.85 against its labels (issue 4's bar)."""
    import dask

    import geoseg
    from geoseg.sample import make_sample

    monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path / "cache"))
    paths = make_sample(tmp_path / "s", size=512, seed=3)
    for model in ("forest", "water"):
        with dask.config.set(scheduler="synchronous"):
            geoseg.write(geoseg.predict(paths["scene"], model), str(tmp_path / model))
        r = evaluate(str(tmp_path / model / "mask.tif"), paths["labels"], layer="truth")
        assert r["classes"][model]["iou"] >= 0.85, r["classes"]
        assert r["ignored_label_classes"]  # the other classes of the labels are left out, and said so


def test_objects_cut_by_the_valid_area_are_not_scored(tmp_path: Path) -> None:
    mask = np.zeros((60, 60), np.uint8)
    mask[:, 30:] = 255  # e.g. outside a held-out half
    mask[10:20, 24:30] = 1  # the valid part of a label that lies 60 % outside: not scored
    mask[40:50, 20:30] = 1  # a label 40 % outside: scored against its clipped part, a match
    labels = [("building", _world(10, 20, 24, 39)), ("building", _world(40, 50, 20, 34))]
    df = gpd.GeoDataFrame({"class": [c for c, _ in labels]}, geometry=[g for _, g in labels], crs="EPSG:32632")
    df.to_file(tmp_path / "l.gpkg")
    r = evaluate(str(write_mask(tmp_path / "m.tif", mask)), str(tmp_path / "l.gpkg"))["classes"]["building"]
    assert (r["objects_true"], r["objects_pred"], r["object_tp"]) == (1, 1, 1)
