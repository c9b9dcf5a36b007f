"""Plain images beyond one file: multi-page and pyramidal TIFF, folders of frames, videos; COCO out.

Every frame goes through the same engine as a raster; each mask must equal whole-image
inference on that frame, and COCO instances read back with pycocotools must cover exactly
the mask's connected regions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import conv_net, whole_image_reference
from tests.test_cli import run_cli

pycocotools = pytest.importorskip("pycocotools", reason="pycocotools (the test extra) reads COCO files back")


def _bright_model(path: Path) -> Path:
    """TorchScript: class 1 where the pixel's mean band value is over 128 (receptive field: one pixel)."""
    import torch

    class Bright(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = (x.mean(dim=1, keepdim=True) - 128.0) / 8.0
            return torch.cat([-s, s], dim=1)

    torch.jit.save(torch.jit.script(Bright()), str(path))
    return path


def _script(net, path: Path) -> Path:
    import torch

    torch.jit.save(torch.jit.script(net), str(path))
    return path


def _components(mask: np.ndarray, value: int) -> list[int]:
    from scipy import ndimage

    lab, _ = ndimage.label(mask == value)
    return sorted(np.bincount(lab.ravel())[1:].tolist())


def test_multipage_tiff_stack_runs_page_by_page(tmp_path) -> None:
    """A 3-page TIFF stack: one mask per page, each equal to whole-image inference on that page."""
    import rasterio

    rng = np.random.default_rng(1)
    pages = [(rng.random((50, 70, 3)) * 255).astype(np.uint8) for _ in range(3)]
    src = tmp_path / "stack.tif"
    imgs = [Image.fromarray(p) for p in pages]
    imgs[0].save(src, save_all=True, append_images=imgs[1:])
    net = conv_net(3, 3, depth=2, seed=3)
    model = _script(net, tmp_path / "m.pt")
    out = tmp_path / "o"
    proc = run_cli("predict", str(src), "-m", str(model), "-o", str(out), "--tile", "32", "--halo", "4", "--scheduler", "threads")
    assert "wrote 3 frames" in proc.stdout, proc.stdout
    report = json.loads((out / "frames.json").read_text())
    assert [f["name"] for f in report["frames"]] == ["page_0000", "page_0001", "page_0002"]
    for page, row in zip(pages, report["frames"], strict=True):
        with rasterio.open(out / row["mask"]) as ds:
            mask = ds.read(1)
        ref = whole_image_reference(net, np.moveaxis(page, 2, 0).astype(np.float32), 4)
        np.testing.assert_array_equal(mask, ref)
        png = np.asarray(Image.open(out / row["name"] / "mask.png"))
        np.testing.assert_array_equal(png, mask)
    # a second run finds every page done and computes nothing
    again = run_cli(
        "predict", str(src), "-m", str(model), "-o", str(out), "--tile", "32", "--halo", "4", "--scheduler", "threads"
    )
    assert "(3 already done)" in again.stdout, again.stdout


def test_pyramidal_tiff_reads_its_full_resolution_page(tmp_path) -> None:
    """Pages shrinking by level are a pyramid: one image, the full-resolution page."""
    import rasterio

    from geoseg.io.frames import list_frames

    rng = np.random.default_rng(2)
    base = (rng.random((64, 96, 3)) * 255).astype(np.uint8)
    levels = [Image.fromarray(base)] + [Image.fromarray(base).resize((96 // f, 64 // f)) for f in (2, 4)]
    src = tmp_path / "pyramid.tif"
    levels[0].save(src, save_all=True, append_images=levels[1:])
    assert list_frames(src) is None
    net = conv_net(3, 2, depth=2, seed=4)
    out = tmp_path / "o"
    model = _script(net, tmp_path / "m.pt")
    run_cli("predict", str(src), "-m", str(model), "-o", str(out), "--tile", "32", "--halo", "4", "--scheduler", "synchronous")
    with rasterio.open(out / "mask.tif") as ds:
        assert (ds.width, ds.height) == (96, 64)
        np.testing.assert_array_equal(ds.read(1), whole_image_reference(net, np.moveaxis(base, 2, 0).astype(np.float32), 4))


def _squares(n: int, h: int = 96, w: int = 128) -> list[np.ndarray]:
    """Frames with two bright squares moving 3 px a frame on a dark, slightly noisy background."""
    rng = np.random.default_rng(0)
    frames = []
    for t in range(n):
        f = (rng.random((h, w, 3)) * 40).astype(np.uint8)
        f[20:44, 10 + 3 * t : 34 + 3 * t] = 230
        f[56:80, 90 - 3 * t : 114 - 3 * t] = 230
        frames.append(f)
    return frames


def test_folder_of_frames_with_coco_tracks(tmp_path) -> None:
    """A folder of PNG frames: masks, per-frame and sequence COCO, objects tracked across frames."""
    from pycocotools.coco import COCO

    folder = tmp_path / "frames"
    folder.mkdir()
    frames = _squares(5)
    for k, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"f{k:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    model = _bright_model(tmp_path / "bright.pt")
    out = tmp_path / "o"
    proc = run_cli("predict", str(folder), "-m", str(model), "-o", str(out), "--vectorize", "--scheduler", "threads")
    assert "10 objects in 2 tracks" in proc.stdout, proc.stdout
    coco = COCO(str(out / "coco.json"))
    assert len(coco.getImgIds()) == 5
    tracks: dict[int, list[int]] = {}
    for ann in coco.loadAnns(coco.getAnnIds()):
        tracks.setdefault(ann["track_id"], []).append(ann["image_id"])
        assert int(coco.annToMask(ann).sum()) == ann["area"] == 24 * 24
    assert sorted(sorted(v) for v in tracks.values()) == [[1, 2, 3, 4, 5]] * 2
    # each frame's own COCO file and mask agree: instance areas are the mask's connected regions
    for k in range(5):
        mask = np.asarray(Image.open(out / f"f{k:02d}" / "mask.png"))
        doc = COCO(str(out / f"f{k:02d}" / "coco.json"))
        areas = sorted(int(doc.annToMask(a).sum()) for a in doc.loadAnns(doc.getAnnIds()))
        assert areas == _components(mask, 1)


def test_video_frames_through_the_engine(tmp_path) -> None:
    """A video: every frame decoded inside its read task; masks equal inference on the decoded frame."""
    iio = pytest.importorskip("imageio.v3", reason="imageio + PyAV (the video extra) read videos")
    pytest.importorskip("av", reason="PyAV (the video extra) decodes videos")
    import rasterio

    from geoseg.io.frames import list_frames, read_video_frame

    video = tmp_path / "clip.mp4"
    iio.imwrite(video, np.stack(_squares(6)), plugin="pyav", codec="libx264", fps=5)
    frames = list_frames(video)
    assert [f.name for f in frames] == [f"frame_{k:06d}" for k in range(6)]
    net = conv_net(3, 2, depth=2, seed=5)
    with __import__("torch").no_grad():
        net[0].weight.mul_(10)  # uint8 values: give the logits some contrast
    model = _script(net, tmp_path / "m.pt")
    out = tmp_path / "o"
    run_cli("predict", str(video), "-m", str(model), "-o", str(out), "--tile", "32", "--halo", "4", "--scheduler", "local")
    for f in frames:
        with rasterio.open(out / f.name / "mask.tif") as ds:
            mask = ds.read(1)
        decoded = np.moveaxis(read_video_frame(str(video), f.index), 2, 0).astype(np.float32)
        np.testing.assert_array_equal(mask, whole_image_reference(net, decoded, 4))


def test_video_that_does_not_decode_is_one_clear_error(tmp_path) -> None:
    pytest.importorskip("av", reason="PyAV (the video extra) decodes videos")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    model = _bright_model(tmp_path / "bright.pt")
    proc = run_cli("predict", str(bad), "-m", str(model), "-o", str(tmp_path / "o"), check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geoseg: error:") and "broken.mp4" in lines[0], proc.stderr
    assert not (tmp_path / "o" / "frames.json").exists()


def test_coco_instances_equal_the_mask_regions_holes_included(tmp_path) -> None:
    """Rings (objects with holes) and blobs cut by chunk seams: COCO areas = the mask's regions, pixel for pixel."""
    from pycocotools.coco import COCO

    h, w = 150, 170
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 20, np.uint8)
    for cy, cx, r_out, r_in in [(40, 40, 30, 12), (100, 120, 35, 0), (64, 64, 6, 0), (120, 30, 20, 8)]:
        d = np.hypot(yy - cy, xx - cx)
        img[(d <= r_out) & (d >= r_in)] = 220
    src = tmp_path / "rings.png"
    Image.fromarray(img).save(src)
    model = _bright_model(tmp_path / "bright.pt")
    out = tmp_path / "o"
    args = ["-m", str(model), "-o", str(out), "--vectorize", "--chunk", "64", "--tile", "32", "--halo", "0"]
    run_cli("predict", str(src), *args, "--scheduler", "threads")
    mask = np.asarray(Image.open(out / "mask.png"))
    assert mask.shape == (h, w)
    coco = COCO(str(out / "coco.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    assert sorted(a["area"] for a in anns) == _components(mask, 1)
    union = np.zeros((h, w), int)
    for a in anns:
        m = coco.annToMask(a)
        assert int(m.sum()) == a["area"]
        x, y, bw, bh = a["bbox"]
        rows, cols = np.nonzero(m)
        assert (cols.min(), rows.min(), cols.max() + 1 - x, rows.max() + 1 - y) == (x, y, bw, bh)
        union += m
    np.testing.assert_array_equal(union, (mask == 1).astype(int))  # disjoint, and nothing missing
    gj = json.loads(next((out / "vectors").glob("*.geojson")).read_text())
    assert gj["geoseg:coordinate_space"] == "pixel" and "crs" not in gj


def test_rle_matches_pycocotools() -> None:
    from pycocotools import mask as cmask

    from geoseg.vector.coco import rle_from_window

    rng = np.random.default_rng(9)
    for _ in range(20):
        h, w = rng.integers(5, 40, 2)
        r0, c0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        inst = rng.random((rng.integers(1, h - r0 + 1), rng.integers(1, w - c0 + 1))) > 0.5
        full = np.zeros((h, w), np.uint8)
        full[r0 : r0 + inst.shape[0], c0 : c0 + inst.shape[1]] = inst
        counts = rle_from_window(inst, int(r0), int(c0), int(h), int(w))
        assert sum(counts) == h * w
        rle = cmask.frPyObjects({"size": [int(h), int(w)], "counts": counts}, int(h), int(w))
        np.testing.assert_array_equal(cmask.decode(rle), full)


def test_own_onnx_model_with_card_on_frames(tmp_path) -> None:
    """Bring your own model (driving, surveillance): an ONNX file + card beside it, run on a folder of frames."""
    pytest.importorskip("onnxruntime", reason="onnxruntime (the onnx extra) runs ONNX models")
    import torch
    from pycocotools.coco import COCO

    class Bright(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = (x.mean(dim=1, keepdim=True) - 128.0) / 8.0
            return torch.cat([-s, s], dim=1)

    model = tmp_path / "car_detector.onnx"
    dyn = {"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}}
    torch.onnx.export(Bright(), torch.zeros(1, 3, 32, 32), str(model), input_names=["x"], output_names=["y"],
                      dynamic_axes=dyn, dynamo=False)  # fmt: skip
    card = {
        "name": "car_detector",
        "task": "objects",
        "classes": [{"id": 0, "name": "background", "color": [0, 0, 0]}, {"id": 1, "name": "car", "color": [255, 200, 0]}],
        "bands": ["red", "green", "blue"],
        "scaling": {"method": "none"},
        "tile": 64,
        "halo": 0,
    }
    (tmp_path / "car_detector.card.json").write_text(json.dumps(card))
    folder = tmp_path / "frames"
    folder.mkdir()
    for k, f in enumerate(_squares(3)):
        Image.fromarray(f).save(folder / f"cam_{k}.jpg", quality=95)
    out = tmp_path / "o"
    proc = run_cli("predict", str(folder), "-m", str(model), "-o", str(out), "--vectorize", "--scheduler", "threads")
    assert "6 objects in 2 tracks" in proc.stdout, proc.stdout
    coco = COCO(str(out / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["car"]
    assert (out / "cam_0" / "vectors" / "car.geojson").exists()


@pytest.mark.parametrize("command", ["change", "run", "vectorize-crs"])
def test_geo_commands_refuse_plain_images(tmp_path, command) -> None:
    """Where a CRS is required, a plain image is one clear error line, exit 1, and nothing written."""
    img = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(img)
    out = tmp_path / "out"
    if command == "change":
        bands = ["--bands-before", "nir=1,red=2", "--bands-after", "nir=1,red=2"]
        args = ["change", str(img), str(img), "--model", "forest", *bands, "--out", str(out)]
    elif command == "run":
        wf = tmp_path / "wf.yaml"
        wf.write_text(f"name: plain\nimagery: [{img}]\nmodels: [buildings]\noutputs: {{folder: out}}\n")
        args = ["run", str(wf)]
    else:
        model = _bright_model(tmp_path / "bright.pt")
        run_cli("predict", str(img), "-m", str(model), "-o", str(tmp_path / "m"), "--scheduler", "synchronous")
        args = ["vectorize", str(tmp_path / "m" / "mask.tif"), "--out", str(out), "--crs", "EPSG:4326"]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("geoseg: error:")]
    assert len(errors) == 1 and ("CRS" in errors[0] or "georeference" in errors[0]), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.rglob("*.tif"))
