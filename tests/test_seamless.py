"""Tiled, chunked inference equals running the model once on the whole raster."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import geoseg
from tests.conftest import conv_net, read, whole_image_reference

# (height, width, tile, halo, chunk): not multiples of tile, chunk or 32; smaller than one
# tile; one-pixel strips; chunks of one tile; many chunks.
CASES = [
    (333, 517, 64, 8, 100),
    (333, 517, 96, 16, 250),
    (1, 700, 64, 8, 128),
    (700, 1, 64, 8, 128),
    (20, 23, 64, 8, 64),
    (64, 64, 64, 8, 48),
    (129, 257, 40, 4, 31),
]


@pytest.mark.parametrize(("height", "width", "tile", "halo", "chunk"), CASES)
def test_crop_equals_whole_image(make_raster, height, width, tile, halo, chunk) -> None:
    path = make_raster(height, width, bands=3, seed=height * 1000 + width)
    net = conv_net(depth=3)  # receptive radius 3 <= halo
    with geoseg.scheduler("threads"):
        got = geoseg.predict(path, net, tile=tile, halo=halo, chunk=chunk).values
    expected = whole_image_reference(net, read(path, None), halo)
    assert got.shape == (height, width)
    np.testing.assert_array_equal(got, expected)


def test_receptive_field_must_fit_halo(make_raster) -> None:
    """The guarantee has teeth: a halo smaller than the receptive field does show seams."""
    path = make_raster(200, 200, seed=3)
    net = conv_net(depth=6)  # receptive radius 6
    data = read(path, None)
    with geoseg.scheduler("synchronous"):
        small = geoseg.predict(path, net, tile=32, halo=2, chunk=64, probabilities=True)["probabilities"].values
        enough = geoseg.predict(path, net, tile=32, halo=6, chunk=64, probabilities=True)["probabilities"].values
    np.testing.assert_allclose(enough, whole_image_reference(net, data, 6, probabilities=True), atol=2e-6)
    assert np.abs(small - whole_image_reference(net, data, 2, probabilities=True)).max() > 1e-4


def test_probabilities_equal_whole_image(make_raster) -> None:
    path = make_raster(150, 211, seed=5)
    net = conv_net(depth=2)
    with geoseg.scheduler("threads"):
        ds = geoseg.predict(path, net, tile=64, halo=4, chunk=80, probabilities=True)
        probs, mask = ds["probabilities"].values, ds["mask"].values
    ref = whole_image_reference(net, read(path, None), 4, probabilities=True)
    np.testing.assert_allclose(probs, ref, atol=2e-6)
    np.testing.assert_array_equal(mask, ref.argmax(0))
    assert list(ds["probabilities"]["class"].values) == ["class_0", "class_1", "class_2", "class_3"]


def test_cosine_blend_is_normalised(make_raster) -> None:
    """A per-pixel model predicts the same value in every overlapping tile, so a blend
    whose weights sum to one everywhere (edges included) reproduces it exactly."""
    path = make_raster(190, 260, seed=7)
    torch.manual_seed(1)
    net = torch.nn.Conv2d(3, 3, 1).eval()
    with torch.no_grad():
        net.weight.mul_(1e-3)
    with geoseg.scheduler("threads"):
        ds = geoseg.predict(path, net, tile=64, halo=12, chunk=80, blend="cosine", probabilities=True)
        probs = ds["probabilities"].values
    ref = whole_image_reference(net, read(path, None), 0, probabilities=True)
    np.testing.assert_allclose(probs, ref, atol=1e-5)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize(("tile", "halo", "chunk"), [(48, 8, 32), (96, 40, 16), (40, 15, 10)])
def test_cosine_blend_is_seamless_across_chunks(make_raster, tile, halo, chunk) -> None:
    """Cosine output does not depend on how the raster is cut into Dask chunks, even when
    the requested chunk is smaller than the halo."""
    path = make_raster(230, 250, seed=8)
    net = conv_net(depth=4)
    kw = {"tile": tile, "halo": halo, "blend": "cosine", "probabilities": True}
    with geoseg.scheduler("threads"):
        one = geoseg.predict(path, net, chunk=10_000, **kw)["probabilities"].values
        many = geoseg.predict(path, net, chunk=chunk, **kw)["probabilities"].values
    np.testing.assert_allclose(one, many, atol=1e-5)


def test_schedulers_agree(make_raster, torchscript_model) -> None:
    path = make_raster(181, 203, seed=9)
    results = {}
    for kind in ("synchronous", "threads"):
        with geoseg.scheduler(kind):
            results[kind] = geoseg.predict(path, str(torchscript_model), tile=64, halo=8, chunk=64).values
    net = torch.jit.load(str(torchscript_model))
    np.testing.assert_array_equal(results["synchronous"], whole_image_reference(net, read(path, None), 8))
    np.testing.assert_array_equal(results["threads"], results["synchronous"])


def test_onnx_model_tiled_equals_whole_image(make_raster, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = make_raster(170, 190, seed=11)
    net = conv_net(depth=3)
    onnx_path = tmp_path / "net.onnx"
    torch.onnx.export(
        net,
        torch.zeros(1, 3, 64, 64),
        str(onnx_path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}},
        opset_version=17,
        dynamo=False,
    )
    with geoseg.scheduler("threads"):
        got = geoseg.predict(path, str(onnx_path), tile=64, halo=8, chunk=100).values
    # the reference runs the same ONNX graph once on the mirrored whole raster
    from geoseg.grid import reflect_index

    data = read(path, None).astype(np.float32)
    rows = reflect_index(np.arange(-8, 170 + 8), 170)
    cols = reflect_index(np.arange(-8, 190 + 8), 190)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.ascontiguousarray(data[:, rows[:, None], cols[None, :]])[None]})[0][0]
    expected = y[:, 8:-8, 8:-8].argmax(0)
    np.testing.assert_array_equal(got, expected)


def test_torch_export_archive(make_raster, tmp_path) -> None:
    """A ``torch.export`` ``.pt2`` archive (TorchScript's successor) runs the same way."""
    path = make_raster(100, 130, seed=13)
    net = conv_net(depth=3)
    dims = {
        0: torch.export.Dim("n", min=1, max=64),
        2: torch.export.Dim("h", min=8, max=4096),
        3: torch.export.Dim("w", min=8, max=4096),
    }
    program = torch.export.export(net, (torch.zeros(2, 3, 64, 64),), dynamic_shapes={"input": dims})
    model = tmp_path / "net.pt2"
    torch.export.save(program, str(model))
    with geoseg.scheduler("threads"):
        got = geoseg.predict(path, str(model), tile=64, halo=8).values
    np.testing.assert_array_equal(got, whole_image_reference(net, read(path, None), 8))


class _OneChannel(torch.nn.Module):
    """One output channel: P(class 1) itself, or its logit."""

    def __init__(self, logit: bool) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x[:, :1] - 1500.0) / 300.0
        return z if self.logit else torch.sigmoid(z)


@pytest.mark.parametrize("activation", ["none", "auto"])
def test_single_channel_outputs_agree_across_modes(make_raster, activation) -> None:
    """One channel means a binary model: a probability with activation "none", else a logit."""
    from geoseg.models import ModelCard

    path = make_raster(120, 130, seed=14)
    card = ModelCard(name="p", activation=activation)
    net = _OneChannel(logit=activation == "auto")
    with geoseg.scheduler("threads"):
        classes = geoseg.predict(path, net, tile=32, halo=4, card=card).values
        ds = geoseg.predict(path, net, tile=32, halo=4, card=card, probabilities=True)
        cosine = geoseg.predict(path, net, tile=32, halo=4, card=card, blend="cosine").values
    p = torch.sigmoid((torch.from_numpy(read(path, 1).astype(np.float32)) - 1500.0) / 300.0).numpy()
    expected = (p > 0.5).astype(np.uint8)
    assert 0.05 < expected.mean() < 0.95
    np.testing.assert_array_equal(classes, expected)
    np.testing.assert_array_equal(ds["mask"].values, expected)
    np.testing.assert_array_equal(cosine, expected)
    np.testing.assert_allclose(ds["probabilities"].values[1], p, atol=1e-6)
    np.testing.assert_allclose(ds["probabilities"].values[0], 1 - p, atol=1e-6)
