"""geoseg run: workflow files validated with line numbers, the whole job, summary and quicklook."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geoseg.errors import InputError
from geoseg.workflows.spec import load_workflow

GOOD = """name: t
sample: data
aoi: data/aoi.geojson
imagery: [data/scene.tif]
models:
  - forest
  - {model: water, min_area_m2: 8}
outputs:
  folder: out
  formats: [gpkg, geojson]
scheduler: synchronous
"""


def test_workflow_paths_resolve_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "wf").mkdir()
    f = tmp_path / "wf" / "a.yaml"
    f.write_text(GOOD)
    wf = load_workflow(f)
    assert wf.imagery == [str(tmp_path / "wf" / "data" / "scene.tif")]
    assert wf.outputs.folder == str(tmp_path / "wf" / "out") and wf.sample == str(tmp_path / "wf" / "data")
    assert [r.model for r in wf.runs()] == ["forest", "water"] and wf.runs()[1].min_area_m2 == 8


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD.replace("scheduler: synchronous", "schedular: local"), r"a.yaml:11: schedular: unknown key"),
        (GOOD.replace("formats: [gpkg, geojson]", "formats: [gpkg, shp]"), r"a.yaml:10: outputs.formats.1: Input should be"),
        (GOOD.replace("min_area_m2: 8", "min_area_m2: -1"), r"a.yaml:7: models.1.min_area_m2: Input should be greater"),
        (GOOD.replace("imagery: [data/scene.tif]", "imagery: []"), r"a.yaml:4: imagery: List should have at least 1"),
        (GOOD.replace("  - forest\n", "  - water\n"), r"models: Value error, model 'water' is listed twice"),
        (GOOD.replace("name: t\n", ""), r"a.yaml: name: Field required"),
        ("name: [unclosed\n", r"a.yaml:2: not valid YAML"),
        ("- a\n- b\n", r"a workflow is a mapping"),
    ],
)
def test_workflow_errors_name_the_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "a.yaml"
    f.write_text(text)
    with pytest.raises(InputError, match=message):
        load_workflow(f)


def test_missing_workflow_and_imagery(tmp_path: Path) -> None:
    from geoseg.workflows.run import run_workflow

    with pytest.raises(InputError, match="workflow file not found"):
        load_workflow(tmp_path / "nope.yaml")
    f = tmp_path / "a.yaml"
    f.write_text(GOOD.replace("sample: data\n", ""))
    with pytest.raises(InputError, match=r"imagery .*scene.tif does not exist; fix the path"):
        run_workflow(f)
    assert not (tmp_path / "out").exists()


def test_run_generates_the_sample_and_writes_everything(tmp_path: Path) -> None:
    """The whole job on a small generated scene: masks, polygons, summary areas from the pixels, a quicklook."""
    import pyogrio

    f = tmp_path / "a.yaml"
    f.write_text(GOOD)
    # a small scene keeps the test fast (the workflow would generate the full 2048 px one)
    from geoseg.sample import make_sample

    make_sample(tmp_path / "data", size=512)
    out = tmp_path / "elsewhere"
    proc = subprocess.run(
        [sys.executable, "-m", "geoseg", "run", str(f), "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "forest" in proc.stdout and "quicklook:" in proc.stdout and "summary:" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert not (tmp_path / "out").exists()  # --out overrides the workflow's folder
    models = summary["images"][0]["models"]
    for name, cls in (("forest", "forest"), ("water", "water")):
        with rasterio.open(out / name / "mask.tif") as ds:
            mask = ds.read(1)
            px_area = abs(ds.transform.a * ds.transform.e)
        # exact pixel polygons: area = pixels x pixel area (water drops parts under 8 m2 = 2 px)
        gdf = pyogrio.read_dataframe(out / name / "geoseg.gpkg", layer=cls)
        assert models[name]["classes"][cls]["objects"] == len(gdf)
        assert models[name]["classes"][cls]["area_ha"] == pytest.approx(gdf["area_m2"].sum() / 1e4, abs=1e-3)
        class_id = 1
        assert gdf["area_m2"].sum() == pytest.approx((mask == class_id).sum() * px_area, rel=0.002 if name == "water" else 1e-9)
        assert (out / name / "vectors" / f"{cls}.geojson").exists() and (out / name / "project.qgz").exists()
    from PIL import Image

    img = np.asarray(Image.open(out / "quicklook.png").convert("RGB"))
    assert img.shape == (512, 512, 3)
    # the legend box holds the forest and water swatches in their class colours
    legend = img[:60, :200].reshape(-1, 3)
    for model, cls in (("forest", "forest"), ("water", "water")):
        with rasterio.open(out / model / "mask.tif") as ds:
            meta = json.loads(ds.tags()["GEOSEG_CLASSES"])
        color = next(c["color"] for c in meta if c["name"] == cls)
        assert (np.abs(legend.astype(int) - color).sum(axis=1) == 0).sum() >= 50, cls
