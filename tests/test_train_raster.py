"""Raster labels: train on plain images with a label PNG, chips like vector labels, Dice from geoseg evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from click.testing import CliRunner

from geoseg.cli import main
from geoseg.errors import InputError
from geoseg.evaluate import evaluate
from geoseg.grid import Window
from geoseg.io.labels import is_raster_labels, open_raster_labels, parse_label_values
from geoseg.io.raster import open_source
from geoseg.models.card import card_from_dict
from geoseg.models.card_sources import onnx_metadata
from geoseg.train import TrainConfig, train
from geoseg.train.chips import IGNORE, ChipImage, assign_split, load_labels
from tests.test_train import T, _scene
from tests.test_vector import write_mask

CARD = {
    "name": "discs",
    "version": "1",
    "task": "objects",
    "classes": [{"id": 0, "name": "background"}, {"id": 1, "name": "disc"}],
    "bands": ["grey"],
    "scaling": {"method": "divide", "value": 255},
    "architecture": {"name": "geoseg.unet", "args": {"width": 8, "depth": 2}},
    "tile": 64,
    "halo": 8,
}


def _png(path: Path, data: np.ndarray) -> Path:
    with rasterio.open(path, "w", driver="PNG", width=data.shape[1], height=data.shape[0], count=1, dtype="uint8") as ds:
        ds.write(data, 1)
    return path


def _discs(tmp: Path, size: int = 192, seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    """A plain greyscale PNG of bright discs on noise, and its label PNG (255 = disc, 0 = background)."""
    rng = np.random.default_rng(seed)
    img = 70 + 25 * rng.standard_normal((size, size))
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((size, size), bool)
    for _ in range(size * size // 700):
        r, c, rad = rng.integers(0, size), rng.integers(0, size), rng.integers(4, 10)
        truth |= (yy - r) ** 2 + (xx - c) ** 2 <= rad**2
    img[truth] += 110
    image = _png(tmp / f"discs{seed}.png", np.clip(img, 0, 255).astype(np.uint8))
    label = _png(tmp / f"discs{seed}_label.png", np.where(truth, 255, 0).astype(np.uint8))
    return image, label, truth


def test_parse_label_values() -> None:
    assert parse_label_values("0=membrane, 255=cell") == {0: "membrane", 255: "cell"}
    assert parse_label_values("1.5=a,2.0=ignore") == {1.5: "a", 2: "ignore"}
    assert parse_label_values(None) == {} and parse_label_values("") == {}
    assert parse_label_values({"0": "a"}) == {0: "a"}
    for bad, why in (
        ("0=membrane,255", "has no '='"),
        ("x=cell", "not a pixel value"),
        ("nan=cell", "not a pixel value"),
        ("0=a,0.0=b", "given twice"),
        ("0=", "has no class"),
    ):
        with pytest.raises(InputError, match=why) as err:
            parse_label_values(bad)
        assert "\n" not in str(err.value) and "label_values=" in str(err.value)
    assert is_raster_labels("a/L.PNG") and is_raster_labels("l.tif") and not is_raster_labels("l.gpkg")


def test_train_on_a_plain_png_with_a_label_png_then_predict_and_evaluate_dice(tmp_path: Path) -> None:
    """The CLI end to end: train (values mapped by --label-values), predict an unseen image, Dice via evaluate."""
    image, label, _ = _discs(tmp_path, seed=0)
    card = tmp_path / "card.json"
    card.write_text(json.dumps(CARD))
    model = tmp_path / "discs.onnx"
    runner = CliRunner()
    args = ["-i", str(image), "-l", str(label), "--label-values", "0=background,255=disc", "--card", str(card),
            "-o", str(model), "--epochs", "5", "--steps", "12", "--batch", "8", "--chip", "64", "--block", "64",
            "--val-chips", "16", "--lr", "1e-2", "--seed", "1", "--threads", "1", "--device", "cpu"]  # fmt: skip
    res = runner.invoke(main, ["train", *args])
    assert res.exit_code == 0, res.output
    embedded = json.loads(onnx_metadata(str(model))["geoseg_card"])
    val = embedded["metrics"]["validation"]
    assert val["split"] == "blocks" and val["iou"][1] > 0.8, (val, res.output)
    assert embedded["training"]["label_values"] == {"0": "background", "255": "disc"}
    assert embedded["training"]["labels"] == [label.name]
    # an unseen image through the engine, scored against its label PNG
    image2, label2, truth2 = _discs(tmp_path, 160, seed=7)
    out = tmp_path / "pred"
    pred = ["predict", str(image2), "-m", str(model), "-o", str(out), "--scheduler", "synchronous", "--threads", "1"]
    res = runner.invoke(main, pred)
    assert res.exit_code == 0, res.output
    scores = tmp_path / "scores.json"
    ev = ["evaluate", str(out / "mask.tif"), "--labels", str(label2), "--label-values", "0=background,255=disc"]
    res = runner.invoke(main, [*ev, "--json", str(scores)])
    assert res.exit_code == 0, res.output
    r = json.loads(scores.read_text())
    assert set(r["classes"]) == {"background", "disc"} and r["valid_pixels"] == 160 * 160
    disc = r["classes"]["disc"]
    assert disc["f1"] > 0.8 and disc["pixels_true"] == int(truth2.sum()), r
    assert r["classes"]["background"]["f1"] > 0.95 and "object_f1" not in disc


def test_raster_labels_feed_the_sampler_like_vector_labels(tmp_path: Path) -> None:
    """Pixel-aligned squares as polygons and as a label raster give the same chips (split, edges, AOI)."""
    path, labels, boxes = _scene(tmp_path)
    src = open_source(str(path))
    classes = {"background": 0, "building": 1}
    truth = np.zeros((256, 256), np.uint8)
    for r, c, h, w in boxes:
        truth[r : r + h, c : c + w] = 1
    prof = dict(driver="GTiff", width=256, height=256, count=1, dtype="uint8", crs="EPSG:32633", transform=T)
    with rasterio.open(tmp_path / "truth.tif", "w", **prof) as ds:
        ds.write(truth, 1)
    vec = ChipImage(src, load_labels(str(labels), src.geobox.crs, classes), block=64)
    lab = open_raster_labels(tmp_path / "truth.tif", src.geobox, classes)  # values are class ids: no mapping
    ras = ChipImage(src, lab, block=64)
    assert lab.counts == {"background": int((truth == 0).sum()), "building": int(truth.sum())}
    keys = assign_split([vec], 0.25, seed=3)
    ras.set_split(keys)
    assert len(ras.centres["train"]) and len(ras.centres["val"])
    assert truth[tuple(ras.centres["train"].astype(int).T)].all()  # centres lie on labelled objects
    wins = [Window(r - 8, c - 8, 32, 32) for r, c, _, _ in boxes[:6]] + [Window(-20, -10, 64, 64), Window(230, 200, 64, 64)]
    for win in wins:
        for split in ("train", "val"):
            xv, yv, _ = vec.read(win, 32 if win.height == 32 else 64, split)
            xr, yr, _ = ras.read(win, 32 if win.height == 32 else 64, split)
            np.testing.assert_array_equal(xr, xv)
            np.testing.assert_array_equal(yr, yv)
    _, y_edge, _ = ras.read(Window(-20, -10, 64, 64), 64, "train")
    assert (y_edge[:20] == IGNORE).all() and (y_edge[:, :10] == IGNORE).all()  # mirrored image, labels ignored outside
    # a 2x coarser chip: labels sampled at the chip's pixel centres, nearly as the rasterised polygons
    r, c, _, _ = boxes[0]
    _, y2v, _ = vec.read(Window(r - 32, c - 32, 64, 64), 32, "train")
    _, y2r, _ = ras.read(Window(r - 32, c - 32, 64, 64), 32, "train")
    assert (y2v == y2r).mean() > 0.95
    # a plain label PNG of the image's size lines up pixel to pixel; one on part of the grid is aligned (rest ignored)
    plain = open_raster_labels(_png(tmp_path / "truth.png", truth), src.geobox, classes)
    np.testing.assert_array_equal(plain.read(Window(0, 0, 256, 256)), truth)
    with rasterio.open(tmp_path / "top.tif", "w", **{**prof, "height": 128}) as ds:
        ds.write(truth[:128], 1)
    top = open_raster_labels(tmp_path / "top.tif", src.geobox, classes).read(Window(0, 0, 256, 256))
    np.testing.assert_array_equal(top[:128], truth[:128])
    assert (top[128:] == IGNORE).all()
    # a training AOI limits centres and labels as it does for polygons
    aoi = np.array([shapely.box(*(T @ (0, 128)), *(T @ (256, 0)))])
    ras_aoi, vec_aoi = ChipImage(src, lab, allowed=aoi, block=64), ChipImage(src, vec.labels, allowed=aoi, block=64)
    assign_split([ras_aoi, vec_aoi], 0.0, seed=0)
    assert (ras_aoi.centres["train"][:, 0] < 128).all()
    np.testing.assert_array_equal(
        ras_aoi.read(Window(96, 0, 64, 64), 64, "train")[1], vec_aoi.read(Window(96, 0, 64, 64), 64, "train")[1]
    )


def test_raster_label_errors(tmp_path: Path) -> None:
    image = _png(tmp_path / "img.png", np.full((128, 128), 100, np.uint8))
    src = open_source(str(image), require_crs=False)
    classes = {"background": 0, "disc": 1}
    small = _png(tmp_path / "small_label.png", np.zeros((100, 100), np.uint8))
    with pytest.raises(InputError, match=r"small_label\.png: the label raster is 100x100 px but .*img\.png is 128x128") as err:
        open_raster_labels(small, src.geobox, classes, image=str(image))
    assert "\n" not in str(err.value) and "give labels of the image's size" in str(err.value)
    lab = np.zeros((128, 128), np.uint8)
    lab[10:20, 10:20] = 255
    lab[0, 0] = 7
    label = _png(tmp_path / "label.png", lab)
    with pytest.raises(InputError, match=r"label\.png: pixel values 7, 255 are not class ids .*label_values=\{7: 'disc'\}"):
        open_raster_labels(label, src.geobox, classes)
    with pytest.raises(InputError, match=r"label_values= maps 255 to 'ship', not a class \(background, disc\)"):
        open_raster_labels(label, src.geobox, classes, {255: "ship", 7: "ignore"})
    ok = open_raster_labels(label, src.geobox, classes, {255: "disc", 7: "ignore"})
    y = ok.read(Window(0, 0, 128, 128))
    assert y[0, 0] == IGNORE and (y[10:20, 10:20] == 1).all() and ok.counts == {"background": 128 * 128 - 101, "disc": 100}
    with pytest.raises(InputError, match="no pixel has a class other than background"):
        open_raster_labels(label, src.geobox, classes, {255: "background", 7: "background"})
    rgb = tmp_path / "rgb.png"
    with rasterio.open(rgb, "w", driver="PNG", width=128, height=128, count=3, dtype="uint8") as ds:
        ds.write(np.zeros((3, 128, 128), np.uint8))
    with pytest.raises(InputError, match="has 3; give a single-band raster"):
        open_raster_labels(rgb, src.geobox, classes)
    # through train() and the CLI: one line naming the file and the fix
    card = card_from_dict(CARD, "c")
    cfg = dict(images=[str(image)], out=str(tmp_path / "m.onnx"), chip=64, block=64, epochs=1, steps=1)
    with pytest.raises(InputError, match=r"small_label\.png: the label raster is 100x100"):
        train(TrainConfig(labels=[str(small)], **cfg), card)
    ok_labels = dict(labels=[str(label)], label_values={255: "disc", 7: "ignore"})
    with pytest.raises(InputError, match=r"leaves no validation block: the images cover 1 block\(s\) of block=128 px"):
        train(TrainConfig(**{**cfg, "block": 128}, **ok_labels), card)  # one image, one block: nothing to validate on
    _, vector_labels, _ = _scene(tmp_path, 64)
    with pytest.raises(InputError, match="label_values= applies to label rasters"):
        train(TrainConfig(labels=[str(vector_labels)], label_values={255: "disc"}, **cfg), card)
    (tmp_path / "card.json").write_text(json.dumps(CARD))
    base = ["train", "-i", str(image), "--card", str(tmp_path / "card.json"), "-o", str(tmp_path / "m.onnx")]
    res = CliRunner().invoke(main, [*base, "-l", str(small)])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "small_label.png: the label raster is 100x100" in res.output
    res = CliRunner().invoke(main, [*base, "-l", str(label), "--label-values", "255:disc"])
    assert res.exit_code == 1 and res.output.startswith("geoseg: error: --label-values '255:disc': '255:disc' has no '='")


def test_evaluate_raster_labels_scores_every_class(tmp_path: Path) -> None:
    mask = np.zeros((60, 80), np.uint8)
    mask[10:30, 10:30] = 1
    mask[50:, :] = 255  # nodata: not scored
    truth = np.full((60, 80), 200, np.uint8)  # 200 = background in this encoding
    truth[15:30, 10:30] = 9  # 9 = building
    truth[0:5, :] = 17  # 17 = ignore
    path = write_mask(tmp_path / "mask.tif", mask, classes=[{"id": 0, "name": "background"}, {"id": 1, "name": "building"}])
    label = _png(tmp_path / "truth.png", truth)  # no CRS, the mask's size
    r = evaluate(str(path), str(label), label_values={200: "background", 9: "building", 17: "ignore"})
    valid = (mask != 255) & (truth != 17)
    b = r["classes"]["building"]
    assert r["valid_pixels"] == int(valid.sum()) and b["pixels_true"] == 300 and b["pixels_pred"] == 400
    assert b["f1"] == pytest.approx(2 * 300 / 700) and b["iou"] == pytest.approx(300 / 400)
    assert b["precision"] == pytest.approx(0.75) and b["recall"] == pytest.approx(1.0)
    bg = r["classes"]["background"]
    tp_bg = bg["pixels_true"] - 100  # 100 background pixels predicted as building
    assert bg["pixels_true"] == int(valid.sum()) - 300 and bg["f1"] == pytest.approx(2 * tp_bg / (2 * tp_bg + 100))
    assert r["label_values"] == {"200": "background", "9": "building", "17": "ignore"} and "object_f1" not in b
    # unmapped values are class ids (classes the mask does not name are class_<id>); 255 is no class id
    assert set(evaluate(str(path), str(label))["classes"]) == {"background", "building", "class_9", "class_17", "class_200"}
    with pytest.raises(InputError, match=r"pixel values 255 are not class ids \(0=background, 1=building, 2=class_2"):
        evaluate(str(path), str(_png(tmp_path / "t255.png", np.where(truth == 9, 255, 0).astype(np.uint8))))
    with pytest.raises(InputError, match="the label raster is 40x40 px"):
        evaluate(str(path), str(_png(tmp_path / "small.png", np.zeros((40, 40), np.uint8))))


def test_em_membrane_short_training_scores_on_the_other_slice(shared_data: Path, tmp_path: Path) -> None:
    """ISBI 2012 EM: a short training on train_0, Dice on train_1 (the workflow script trains longer)."""
    import geoseg
    from geoseg.models.card_sources import load_text

    data = shared_data / "plain" / "isbi2012_em_membrane"
    if not data.is_dir():
        pytest.skip(f"{data} is absent")
    card_path = Path(__file__).resolve().parents[1] / "workflows" / "em_membrane.card.yaml"
    card_d = load_text(card_path.read_text(), str(card_path))
    cfg = TrainConfig(
        images=[str(data / "train_0.png")],
        labels=[str(data / "train_0_label.png")],
        label_values=parse_label_values("0=membrane,255=cell"),
        out=str(tmp_path / "em.onnx"),
        epochs=5,
        steps=10,
        batch=8,
        chip=96,
        block=128,
        val_chips=16,
        lr=5e-3,
        seed=0,
        threads=1,
        device="cpu",
    )
    res = train(cfg, card_from_dict(card_d, str(card_path)))
    out = tmp_path / "pred"
    geoseg.write(geoseg.predict(str(data / "train_1.png"), res["model"], num_threads=1), str(out))
    r = evaluate(str(out / "mask.tif"), str(data / "train_1_label.png"), label_values={0: "membrane", 255: "cell"})
    assert r["valid_pixels"] == 512 * 512
    # measured (seeds 0, 1, 2): membrane 0.71, 0.64, 0.74; cell 0.88, 0.81, 0.92 (the workflow: see README)
    assert r["classes"]["membrane"]["f1"] > 0.55 and r["classes"]["cell"]["f1"] > 0.75, r["classes"]
