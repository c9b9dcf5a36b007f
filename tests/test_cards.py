"""Model cards: validation, where cards come from, band matching, scaling, bundled index models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import rasterio
import torch

from geoseg.errors import InputError, ModelError
from geoseg.models.bands import match_bands, parse_band_option
from geoseg.models.card import card_from_dict, card_to_dict
from geoseg.models.runtime import get_predictor
from geoseg.models.spec import Runtime, resolve_model
from tests.conftest import conv_net, read, whole_image_reference, write_raster

CARD = {
    "name": "convnet",
    "version": "2",
    "task": "area",
    "classes": [
        {"id": 0, "name": "background", "color": [0, 0, 0]},
        {"id": 1, "name": "building", "color": "#e6194b"},
        {"id": 2, "name": "water", "color": [0, 130, 200]},
        {"id": 3, "name": "forest"},
    ],
    "bands": ["red", "green", "blue"],
    "scaling": {"method": "divide", "value": 10},
    "tile": 64,
    "halo": 8,
    "metrics": {"iou": 0.9},
}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"colour": 1}, "unknown card key(s) 'colour'"),
        ({"task": "boxes"}, "task must be 'area' or 'objects'"),
        ({"classes": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}, "class id 1 appears twice"),
        ({"classes": [{"id": 1, "name": "a", "color": [300, 0, 0]}]}, "is not [r, g, b]"),
        ({"classes": [{"id": 255, "name": "a"}]}, "0-254 (255 is nodata)"),
        ({"bands": ["red", "red"]}, "listed twice"),
        ({"scaling": {"method": "zscore"}}, "scaling method 'zscore' is unknown"),
        ({"scaling": {"method": "meanstd", "mean": [1, 2], "std": [1, 1]}}, "mean has 2 values for 3 bands"),
        ({"scaling": {"method": "divide"}}, "needs 'value'"),
        ({"scaling": {"method": "percentile", "low": 98, "high": 2}}, "high > low for every band"),
        ({"scaling": {"method": "percentile", "low": 2, "high": 120}}, "0 <= low < high <= 100"),
        ({"scaling": {"value": 10000}}, "scaling needs a method"),
        ({"scaling": {"method": "minmax", "low": 0, "high": 0}}, "high > low"),
        ({"scaling": {"method": "divide", "value": 10, "mean": [1]}}, "does not use mean"),
        ({"classes": [{"id": 1, "name": "a", "color": None}]}, "quote hex colours"),
        ({"activation": "relu"}, "activation must be one of"),
        ({"tile": 0}, "tile must be an integer >= 8"),
        ({"classes": [{"id": 1, "name": "a", "kind": "ship"}]}, "class 'a' kind must be 'object' or 'area'"),
    ],
)
def test_bad_cards_are_clear_errors(change: dict, needle: str) -> None:
    with pytest.raises(ModelError) as err:
        card_from_dict({**CARD, **change}, "model.card.json")
    assert needle in str(err.value) and str(err.value).startswith("model.card.json:")


def test_card_round_trip() -> None:
    card = card_from_dict(CARD, "x")
    assert card.classes[1].color == (230, 25, 75) and card.bands == ("red", "green", "blue")
    assert card_from_dict(card_to_dict(card), "y") == card
    kinds = [{"id": 0, "name": "other"}, {"id": 1, "name": "panel", "kind": "object"}]
    card = card_from_dict({**CARD, "classes": kinds}, "x")
    assert [c.kind for c in card.classes] == [None, "object"]
    assert card_from_dict(card_to_dict(card), "y") == card


def test_band_matching() -> None:
    assert match_bands(["nir", "red"], ["B02", "B03", "B04", "B08"]) == (4, 3)
    assert match_bands(["red", "nir"], ["", "", "", ""], {"nir": 4, "red": 3}) == (3, 4)
    assert match_bands(["blue", "green"], [None, None]) == (1, 2)  # undescribed, same count: file order
    with pytest.raises(ModelError, match=r"needs band 'nir'.*map it with band_map=\{'nir': N\}"):
        match_bands(["red", "nir"], ["red", "green", "blue"], origin="s.tif")
    assert parse_band_option("nir=4, red=3") == (None, {"nir": 4, "red": 3})
    assert parse_band_option("3,2,1") == ((3, 2, 1), {})
    with pytest.raises(ModelError, match="not a mix"):
        parse_band_option("3,nir=2")


def test_assumed_band_order_is_announced_once(caplog: pytest.LogCaptureFixture) -> None:
    """Undescribed bands taken in the model's order: one warning line naming the order and how to set it."""
    import logging

    with caplog.at_level(logging.WARNING, logger="geoseg"):
        for _ in range(3):
            assert match_bands(["nir", "red"], [None, ""], origin="undescribed.tif") == (1, 2)
        match_bands(["nir", "red"], ["nir", "red"], origin="described.tif")  # described: nothing to say
        match_bands(["red", "nir"], ["", ""], {"nir": 2, "red": 1}, origin="mapped.tif")  # mapped: nothing assumed
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    assert "\n" not in message and message.startswith("undescribed.tif: no band descriptions")
    assert "1=nir, 2=red" in message and "bands=" in message and "band_map={'nir': N, 'red': N}" in message


def _described_raster(path: Path, descriptions: tuple[str, ...], seed: int = 4) -> Path:
    write_raster(path, 150, 170, bands=len(descriptions), seed=seed)
    with rasterio.open(path, "r+") as ds:
        ds.descriptions = descriptions
    return path


@pytest.fixture
def carded_model(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    net = conv_net()
    path = tmp_path / "convnet.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    (tmp_path / "convnet.card.json").write_text(json.dumps(CARD))
    return path, net


def test_sidecar_card_picks_bands_by_name_and_scales(carded_model, tmp_path: Path) -> None:
    import geoseg

    model, net = carded_model
    src = _described_raster(tmp_path / "s.tif", ("blue", "green", "red"))
    spec = resolve_model(str(model))
    assert spec.card.name == "convnet" and spec.card.tile == 64 and spec.card.classes[2].name == "water"
    with dask.config.set(scheduler="synchronous"):
        mask = geoseg.predict(str(src), str(model)).compute()
    data = read(src, None)[::-1].astype(np.float32) / 10  # card: red, green, blue; divide by 10
    np.testing.assert_array_equal(mask.values, whole_image_reference(net, data, 8))
    with dask.config.set(scheduler="synchronous"):
        out = tmp_path / "o"
        geoseg.write(geoseg.predict(str(src), str(model)), str(out))
    assert [c["name"] for c in json.loads((out / "run.json").read_text())["model"]["classes"]][1] == "building"


def test_embedded_torchscript_card(tmp_path: Path) -> None:
    net = conv_net()
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(net), str(path), _extra_files={"geoseg_card.json": json.dumps({**CARD, "name": "emb"})})
    card = resolve_model(str(path)).card
    assert card.name == "emb" and card.scaling.value == 10 and card.bands == ("red", "green", "blue")


def test_deepness_style_onnx_metadata(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    net = conv_net()
    path = tmp_path / "deep.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 64, 64), str(path), input_names=["x"], dynamo=False)
    m = onnx.load(str(path))
    for k, v in {
        "model_type": "Segmentor",
        "class_names": json.dumps({"0": "background", "1": "field", "2": "road", "3": "roof"}),
        "resolution": "50",
        "tiles_size": "256",
        "tiles_overlap": "25",
    }.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(path))
    card = resolve_model(str(path)).card
    assert [c.name for c in card.classes] == ["background", "field", "road", "roof"]
    assert card.gsd_m == 0.5 and card.tile == 256 and card.halo == 32
    assert card.scaling.method == "divide" and card.scaling.value == 255


def test_cards_that_lie_fail_before_reading(carded_model, tmp_path: Path) -> None:
    import geoseg

    model, _ = carded_model
    src = write_raster(tmp_path / "plain.tif", 64, 64, bands=4)  # 4 undescribed bands, the card wants 3 named ones
    with pytest.raises(ModelError, match=r"needs band 'red'.*band_map=\{'red': N\}"):
        geoseg.predict(str(src), str(model))
    with pytest.raises(InputError, match="takes 3 bands"):
        geoseg.predict(str(src), str(model), bands=[1, 2])
    (tmp_path / "convnet.card.json").write_text(json.dumps({**CARD, "classess": []}))
    with pytest.raises(ModelError, match=r"convnet\.card\.json: unknown card key"):
        resolve_model(str(model))
    # a name mapping works where descriptions are missing
    (tmp_path / "convnet.card.json").write_text(json.dumps(CARD))
    mask = geoseg.predict(str(src), str(model), band_map={"red": 3, "green": 2, "blue": 1})
    assert mask.shape == (64, 64)


def test_percentile_scaling_is_global_so_tiles_stay_seamless(tmp_path: Path) -> None:
    import geoseg
    from geoseg.io.raster import band_percentiles, open_source

    net = conv_net()
    path = tmp_path / "p.pt"
    card = {**CARD, "bands": ["blue", "green", "red"], "scaling": {"method": "percentile", "low": 2, "high": 98}}
    torch.jit.save(torch.jit.script(net), str(path), _extra_files={"geoseg_card.json": json.dumps(card)})
    src = _described_raster(tmp_path / "s.tif", ("blue", "green", "red"))
    with dask.config.set(scheduler="synchronous"):
        mask = geoseg.predict(str(src), str(path), tile=48, halo=8, chunk=96).compute()
    lo, hi = band_percentiles(open_source(str(src)), (2,), (98,))
    data = read(src, None).astype(np.float32)
    scaled = np.clip((data - lo[:, None, None]) / (hi - lo)[:, None, None], 0, 1).astype(np.float32)
    np.testing.assert_array_equal(mask.values, whole_image_reference(net, scaled, 8))


def test_bundled_water_model_is_ndwi(tmp_path: Path, monkeypatch) -> None:
    import geoseg

    monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path / "cache"))
    src = _described_raster(tmp_path / "s.tif", ("blue", "green", "red", "nir"), seed=9)
    with dask.config.set(scheduler="synchronous"):
        mask = geoseg.predict(str(src), "water").compute().values
    d = read(src, None).astype(np.float64)
    ndwi = (d[1] - d[3]) / (d[1] + d[3] + 1e-6)
    sure = np.abs(ndwi) > 1e-3  # away from the threshold, where float32 rounding cannot flip it
    np.testing.assert_array_equal(mask[sure], (ndwi > 0)[sure].astype(np.uint8))
    assert 0 < mask.mean() < 1
    out = subprocess.run([sys.executable, "-m", "geoseg", "models"], capture_output=True, text=True, check=True).stdout
    assert "forest" in out and "water" in out and "McFeeters" in out


def test_bundled_clouds_model_matches_onnxruntime_on_real_data(shared_data: Path, tmp_path: Path) -> None:
    """The ukis-csmask ONNX model run by geoseg equals running it directly in onnxruntime (1e-4)."""
    pytest.importorskip("ukis_csmask", reason="the clouds model needs the optional extra: pip install 'geoseg[clouds]'")
    import importlib.resources

    import onnxruntime as ort

    import geoseg
    from geoseg.models.bundled import bundled_card

    src = shared_data / "geo" / "spacenet6_rotterdam_ms" / "ms1.tif"  # blue, green, red, nir (SpaceNet 6, CC BY-SA 4.0)
    with rasterio.open(src) as ds:
        data = ds.read(window=rasterio.windows.Window(0, 0, 256, 256)).astype(np.float32)
        profile = ds.profile | {
            "width": 256,
            "height": 256,
            "dtype": "float32",
            "transform": ds.window_transform(((0, 256), (0, 256))),
        }
    crop = tmp_path / "crop.tif"
    with rasterio.open(crop, "w", **profile) as ds:
        ds.write(data)
    with dask.config.set(scheduler="synchronous"):
        res = geoseg.predict(str(crop), "clouds", tile=256, halo=0, probabilities=True).compute()
    card = bundled_card("clouds")
    mean = np.asarray(card["scaling"]["mean"], np.float32)[:, None, None]
    std = np.asarray(card["scaling"]["std"], np.float32)[:, None, None]
    onnx_file = str(importlib.resources.files("ukis_csmask") / "model_4b_l2a.onnx")
    sess = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": ((data - mean) / std)[None]})[0][0]
    direct = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    np.testing.assert_allclose(res["probabilities"].values, direct, atol=1e-4)
    assert [str(c) for c in res["probabilities"]["class"].values] == ["clear", "cloud", "cloud_shadow"]


class _Evil:
    """Unpickling this would create a file: proof that geoseg never unpickles model files."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_models_are_refused_unopened(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _Evil(str(marker))}, str(evil))
    state = tmp_path / "state.pt"
    torch.save(conv_net().state_dict(), str(state))
    full = tmp_path / "full.pt"
    torch.save(conv_net(), str(full))
    for path in (evil, state, full):  # without a card naming an architecture, nothing is loaded
        with pytest.raises(ModelError, match="names its architecture"):
            resolve_model(str(path))
    # with one, only tensors are unpickled (weights_only): the payload and whole models are refused
    card = {**CARD, "bands": ["blue", "green", "red"], "architecture": {"name": "geoseg.unet", "args": {"width": 4}}}
    for path in (evil, full):
        path.with_suffix(".card.json").write_text(json.dumps(card))
        spec = resolve_model(str(path))
        assert spec.kind == "statedict"
        with pytest.raises(ModelError, match="refused: the file holds more than tensors"):
            get_predictor(spec, Runtime(device="cpu"))
    assert not marker.exists()
    legacy = tmp_path / "legacy.pt"
    torch.save(conv_net().state_dict(), str(legacy), _use_new_zipfile_serialization=False)
    with pytest.raises(ModelError, match=r"not an ONNX model .* or a TorchScript archive"):
        resolve_model(str(legacy))
    assert not marker.exists()


def test_state_dicts_load_into_the_named_architecture(tmp_path: Path, make_raster) -> None:
    import geoseg
    from geoseg.models.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 4, width=4, depth=2).eval()
    for p in net.parameters():  # non-trivial weights
        torch.nn.init.normal_(p, 0, 0.3)
    path = tmp_path / "unet.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, str(path))  # Lightning style
    card = {**CARD, "bands": ["blue", "green", "red"], "architecture": {"name": "geoseg.unet", "args": {"width": 4, "depth": 2}}}
    path.with_suffix(".card.yaml").write_text(json.dumps(card))  # JSON is YAML
    src = _described_raster(tmp_path / "s.tif", ("blue", "green", "red"))
    with dask.config.set(scheduler="synchronous"):
        a = geoseg.predict(str(src), str(path), probabilities=True)["probabilities"].values
        b = geoseg.predict(str(src), net, probabilities=True, card=card_from_dict(card, "c"))["probabilities"].values
    np.testing.assert_allclose(a, b, atol=1e-5)
    wrong = {**card, "architecture": {"name": "geoseg.unet", "args": {"width": 8, "depth": 2}}}
    path.with_suffix(".card.yaml").write_text(json.dumps(wrong))
    with pytest.raises(ModelError, match=r"does not fit geoseg\.unet"):
        get_predictor(resolve_model(str(path)), Runtime(device="cpu"))
    for arch, msg in (({"name": "os.system"}, "unknown architecture"), ({"name": "smp.Unet"}, "segmentation_models_pytorch")):
        path.with_suffix(".card.yaml").write_text(json.dumps({**card, "architecture": arch}))
        try:
            import segmentation_models_pytorch  # noqa: F401

            if arch["name"].startswith("smp"):
                continue
        except ImportError:
            pass
        with pytest.raises(ModelError, match=msg):
            get_predictor(resolve_model(str(path)), Runtime(device="cpu"))


def test_gsd_within_4x_is_resampled_on_the_fly(tmp_path: Path) -> None:
    """A model made for 4 m on a 2 m raster: tiles are averaged down 2x, logits brought back."""
    import geoseg
    from geoseg.models.runtime import resample_batch

    net = conv_net()
    path = tmp_path / "g.pt"
    card = {**CARD, "bands": ["blue", "green", "red"], "scaling": {"method": "none"}, "gsd_m": 4.0, "halo": 8}
    torch.jit.save(torch.jit.script(net), str(path), _extra_files={"geoseg_card.json": json.dumps(card)})
    src = _described_raster(tmp_path / "s.tif", ("blue", "green", "red"))  # 2 m pixels
    with dask.config.set(scheduler="synchronous"):
        res = geoseg.predict(str(src), str(path), probabilities=True, tile=64)
        probs = res["probabilities"].values
        off = geoseg.predict(str(src), str(path), probabilities=True, tile=64, resample=False)["probabilities"].values
    with rasterio.open(src) as ds:
        data = ds.read().astype(np.float32)
    # the whole raster resampled to 4 m, run once, logits back to 2 m
    small = resample_batch(data[None], (data.shape[1] // 2, data.shape[2] // 2))
    with torch.no_grad():
        logits = net(torch.from_numpy(small)).numpy()
    ref = torch.softmax(torch.from_numpy(resample_batch(logits, data.shape[1:])), 1).numpy()[0]
    inner = (slice(None), slice(16, -16), slice(16, -16))  # away from the raster edge (mirroring differs)
    assert np.abs(probs[inner] - ref[inner]).mean() < 0.02
    assert np.abs(off[inner] - ref[inner]).mean() > 2 * np.abs(probs[inner] - ref[inner]).mean()


def test_gsd_far_from_the_card_is_flagged(tmp_path: Path) -> None:
    import geoseg
    from geoseg.io.raster import open_source, raster_gsd_m

    net = conv_net()
    path = tmp_path / "g.pt"
    for gsd, flagged in ((10.0, True), (2.2, False)):
        card = {**CARD, "bands": ["blue", "green", "red"], "scaling": {"method": "none"}, "gsd_m": gsd}
        torch.jit.save(torch.jit.script(net), str(path), _extra_files={"geoseg_card.json": json.dumps(card)})
        src = _described_raster(tmp_path / "s.tif", ("blue", "green", "red"))  # 2 m pixels
        out = tmp_path / f"o{gsd}"
        with dask.config.set(scheduler="synchronous"):
            geoseg.write(geoseg.predict(str(src), str(path)), str(out))
        warned = [w for w in json.loads((out / "run.json").read_text())["warnings"] if "was made for" in w]
        assert bool(warned) is flagged
    assert raster_gsd_m(open_source(str(src))) == pytest.approx(2.0, rel=2e-3)  # UTM scale factor removed
