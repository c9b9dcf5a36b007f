"""geoseg train: chips on the fly, a block split, resumable checkpoints, an exported model that learns."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
from rasterio.transform import from_origin

from geoseg.errors import InputError, ModelError
from geoseg.grid import Window
from geoseg.io.raster import open_source
from geoseg.models.card import card_from_dict
from geoseg.train import TrainConfig, train
from geoseg.train.chips import IGNORE, ChipImage, ChipSampler, assign_split, load_labels

T = from_origin(499968.0, 4000000.0, 2.0, 2.0)  # on the 128 m block grid
CARD = {
    "name": "squares",
    "version": "1",
    "task": "objects",
    "classes": [{"id": 0, "name": "background"}, {"id": 1, "name": "building"}],
    "bands": ["red", "green", "blue"],
    "scaling": {"method": "divide", "value": 10000},
    "architecture": {"name": "geoseg.unet", "args": {"width": 8, "depth": 2}},
    "tile": 64,
    "halo": 8,
}


def _scene(tmp: Path, size: int = 256, seed: int = 0) -> tuple[Path, Path, list]:
    """Bright squares (buildings) and bright discs (not buildings) on a noisy dark ground."""
    rng = np.random.default_rng(seed)
    img = (1000 + 200 * rng.standard_normal((3, size, size))).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    boxes = []
    for _ in range(size * size // 900):
        r, c, h, w = rng.integers(4, size - 16), rng.integers(4, size - 16), rng.integers(5, 12), rng.integers(5, 12)
        if rng.random() < 0.7:
            img[:, r : r + h, c : c + w] = 4000
            boxes.append((r, c, h, w))
        else:
            img[:, (yy - r) ** 2 + (xx - c) ** 2 < 25] = 4000
    path = tmp / f"scene{seed}.tif"
    prof = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint16", crs="EPSG:32633", transform=T, nodata=0)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(np.clip(img, 1, 10000).astype(np.uint16))
        for b, name in enumerate(("red", "green", "blue"), start=1):
            dst.set_band_description(b, name)
    geoms = [shapely.box(*(T @ (c, r + h)), *(T @ (c + w, r))) for r, c, h, w in boxes]
    labels = tmp / f"labels{seed}.gpkg"
    gpd.GeoDataFrame({"class": ["building"] * len(geoms)}, geometry=geoms, crs="EPSG:32633").to_crs(4326).to_file(labels)
    return path, labels, boxes


def test_chips_rasterise_labels_on_the_window_and_respect_the_split(tmp_path: Path) -> None:
    path, labels, boxes = _scene(tmp_path)
    src = open_source(str(path))
    lab = load_labels(str(labels), src.geobox.crs, {"background": 0, "building": 1})
    assert lab.counts == {"building": len(boxes)}
    im = ChipImage(src, lab, block=64)
    keys = assign_split([im], 0.25, seed=3)
    assert 3 <= len(keys) <= 5 and len(im.usable_keys) == 16 and np.isin(keys, im.usable_keys).all()  # ~25 % per stratum

    def split_of(r: float, c: float) -> str:
        return "val" if im.split_mask(np.array([r]), np.array([c]), "val")[0] else "train"

    # the block grid is anchored in the CRS (the origin is on it): blocks are the 64 px squares here
    assert all(split_of(r, c) == split_of(r - r % 64 + 1, c - c % 64 + 1) for r, c in ((5, 70), (130, 200), (250, 3)))
    r, c, h, w = boxes[0]
    win = Window(r - 8, c - 8, 32, 32)
    x, y, valid = im.read(win, 32, split_of(r + h / 2, c + w / 2))
    assert x.shape == (3, 32, 32) and valid.all()
    inside = y[8 : 8 + h, 8 : 8 + w]
    assert ((inside == 1) | (inside == IGNORE)).all() and (inside == 1).sum() >= h * w / 2
    # the same window from the other split: those label pixels are ignored
    other = "train" if split_of(r + h / 2, c + w / 2) == "val" else "val"
    _, y2, _ = im.read(win, 32, other)
    assert ((y2 == IGNORE) | (y == IGNORE)).all()  # no pixel is labelled in both splits
    # a 2x coarser chip covers twice the ground: the box's pixel count drops about 4x
    _, y4, _ = im.read(Window(r - 16, c - 16, 64, 64), 32, split_of(r + h / 2, c + w / 2))
    box4 = y4[7 : 9 + (h + 1) // 2, 7 : 9 + (w + 1) // 2]  # the box on the coarse grid, with a pixel margin
    n1, n_ignored, quarter, slack = int((box4 == 1).sum()), int((box4 == IGNORE).sum()), h * w / 4, (h + w) / 2 + 2
    assert n1 <= quarter + slack and n1 + n_ignored >= quarter - slack  # ignored where the box crosses a block edge
    # object-centred draws are centred (give or take the jitter) on objects of their own split
    sampler = ChipSampler([im], 32, object_share=1.0)
    val_centres = im.centres["val"]
    assert len(val_centres) and len(im.centres["train"])
    assert all(split_of(r, c) == "val" for r, c in val_centres)
    for _, window, _ in sampler.windows(np.random.default_rng(0), 20, "val"):
        centre = np.array([window.row_off + 16, window.col_off + 16])
        assert np.abs(val_centres - centre).max(axis=1).min() <= 0.35 * 32 + 1
    # two images of one place share the split (a second date cannot leak validation blocks)
    im_b = ChipImage(open_source(str(path)), lab, block=64)
    assign_split([im, im_b], 0.25, seed=3)
    rr, cc = np.mgrid[0:256:7, 0:256:7]
    np.testing.assert_array_equal(im.split_mask(rr, cc, "val"), im_b.split_mask(rr, cc, "val"))
    # labels outside a training AOI are ignored, and blocks only touching it are not used
    aoi = shapely.box(*(T @ (0, 128)), *(T @ (256, 0)))  # the northern half
    im2 = ChipImage(src, lab, allowed=np.array([aoi]), block=64)
    assert len(im2.usable_keys) == 8
    assign_split([im2], 0.0, seed=0)
    _, ys, _ = im2.read(Window(96, 0, 64, 64), 64, "train")
    assert (ys[32:] == IGNORE).all() and (ys[:32] != IGNORE).all()


def test_labels_errors(tmp_path: Path) -> None:
    _, labels, _ = _scene(tmp_path)
    with pytest.raises(InputError, match="no label has a class of the model"):
        load_labels(str(labels), "EPSG:32633", {"background": 0, "ship": 1})
    with pytest.raises(InputError, match="labels file not found"):
        load_labels(str(tmp_path / "nope.gpkg"), "EPSG:32633", {"background": 0, "building": 1})


def _cfg(tmp: Path, path: Path, labels: Path, **kw) -> TrainConfig:
    base = dict(images=[str(path)], labels=[str(labels)], out=str(tmp / "m.onnx"), epochs=2, steps=6, batch=8, chip=64,
                block=64, val_chips=16, lr=1e-2, seed=1, threads=2)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_train_learns_exports_and_resumes_identically(tmp_path: Path) -> None:
    import geoseg

    path, labels, _ = _scene(tmp_path, 256, seed=0)
    card = card_from_dict(CARD, "test card")
    res = train(_cfg(tmp_path, path, labels, epochs=6, steps=15), card)
    assert len(res["history"]) == 6 and res["history"][-1]["iou"][1] > 0.8, res["history"]
    # the exported model runs through the engine with its embedded card, and finds the squares
    from geoseg.models.card_sources import onnx_metadata

    assert res["model"].endswith(".onnx")
    embedded = json.loads(onnx_metadata(res["model"])["geoseg_card"])
    assert embedded["training"]["epochs"] == 6 and embedded["metrics"]["validation"]["iou"][1] > 0.8
    assert embedded["training"]["architecture"]["name"] == "geoseg.unet" and "architecture" not in embedded
    path2, _, boxes2 = _scene(tmp_path, 192, seed=5)  # unseen scene
    mask = geoseg.predict(str(path2), res["model"]).compute().values
    truth = np.zeros_like(mask)
    for r, c, h, w in boxes2:
        truth[r : r + h, c : c + w] = 1
    iou = ((mask == 1) & (truth == 1)).sum() / ((mask == 1) | (truth == 1)).sum()
    assert iou > 0.7, iou

    # a run killed after its first epoch, resumed, ends where an uninterrupted run ends
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    train(_cfg(a, path, labels, epochs=2), card)

    def crash(record: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(b, path, labels, epochs=2), card, progress=crash)
    state1 = torch.load(str(b / "m.onnx.ckpt"), weights_only=True)
    assert len(json.loads(state1["history"])) == 1 and not (b / "m.onnx").exists()
    res_b = train(_cfg(b, path, labels, epochs=2), card, resume=True)
    assert [h["epoch"] for h in res_b["history"]] == [1, 2]
    sa = torch.load(str(a / "m.onnx.ckpt"), weights_only=True)["model"]
    sb = torch.load(str(b / "m.onnx.ckpt"), weights_only=True)["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)
    # a checkpoint from other settings is refused
    with pytest.raises(ModelError, match="another configuration"):
        train(_cfg(b, path, labels, epochs=3, lr=5e-3), card, resume=True)


def test_train_refuses_bad_cards_and_settings(tmp_path: Path) -> None:
    path, labels, _ = _scene(tmp_path, 128)
    bad = {**CARD, "classes": [{"id": 0, "name": "background"}, {"id": 2, "name": "building"}]}
    with pytest.raises(ModelError, match=r"ids 0\.\.K-1"):
        train(_cfg(tmp_path, path, labels), card_from_dict(bad, "c"))
    with pytest.raises(InputError, match=r"must end in \.onnx"):
        train(_cfg(tmp_path, path, labels, out=str(tmp_path / "m.pt")), card_from_dict(CARD, "c"))
    with pytest.raises(InputError, match="one per image"):
        cfg = _cfg(tmp_path, path, labels)
        cfg.images, cfg.labels = [str(path)] * 3, [str(labels)] * 2
        train(cfg, card_from_dict(CARD, "c"))
    nir = {**CARD, "bands": ["nir", "red"]}
    with pytest.raises(ModelError, match="needs band 'nir'"):
        train(_cfg(tmp_path, path, labels), card_from_dict(nir, "c"))
