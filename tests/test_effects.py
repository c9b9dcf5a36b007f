"""geoseg effects portrait-blur: person pixels bit-exact, background blurred; real MediaPipe selfie model on the astronaut."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from geoseg.cli import main
from geoseg.effects import portrait_blur
from geoseg.errors import InputError, ModelError, OutputExistsError


def _laplacian_energy(img: np.ndarray, where: np.ndarray) -> float:
    """Mean absolute 4-neighbour Laplacian of the grey image over ``where`` (interior pixels)."""
    g = img.astype(np.float64)
    g = g.mean(axis=2) if g.ndim == 3 else g
    lap = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])
    return float(lap[where[1:-1, 1:-1]].mean())


def _portrait(h: int = 160, w: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy RGB image whose 'person' (a disc) is exactly the pixels with red >= 170; background red <= 90."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    person = (yy - 0.55 * h) ** 2 + (xx - 0.5 * w) ** 2 <= (0.3 * min(h, w)) ** 2
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[..., 0] = np.where(person, rng.integers(170, 256, (h, w)), rng.integers(0, 91, (h, w)))
    return img, person


@pytest.fixture(scope="module")
def red_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TorchScript person model: logit 40 * (red - 0.5), so the person is where red > 0.5."""
    torch = pytest.importorskip("torch")

    class RedPerson(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 40.0 * (x[:, :1] - 0.5)

    path = tmp_path_factory.mktemp("models") / "red_person.pt"
    torch.jit.save(torch.jit.script(RedPerson()), str(path))
    return path


@pytest.fixture(scope="module")
def red_model_probs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same person as two-channel probabilities (background, person)."""
    torch = pytest.importorskip("torch")

    class RedPersonProbs(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = (x[:, :1] > 0.5).float()
            return torch.cat([1 - p, p], dim=1)

    path = tmp_path_factory.mktemp("models") / "red_person_probs.pt"
    torch.jit.save(torch.jit.script(RedPersonProbs()), str(path))
    return path


def test_user_model_keeps_person_and_blurs_background(tmp_path: Path, red_model: Path) -> None:
    img, person = _portrait()
    src = tmp_path / "portrait.png"
    Image.fromarray(img).save(src)
    out, matte_path = tmp_path / "blur.png", tmp_path / "matte.png"
    r = portrait_blur(src, out, model=str(red_model), mask_out=matte_path)
    res = np.asarray(Image.open(out))
    assert Image.open(out).mode == "RGB" and res.shape == img.shape
    assert np.array_equal(res[person], img[person])  # the person, bit-exact
    matte = np.asarray(Image.open(matte_path))
    assert np.array_equal(matte == 255, person)
    assert r["person_fraction"] == pytest.approx(person.mean())
    bg = ~person
    assert (res[bg] != img[bg]).any(axis=-1).mean() > 0.95  # background changed
    before, after = _laplacian_energy(img, bg), _laplacian_energy(res, bg)
    assert before / after > 3, (before, after)
    assert set(r["timings"]) == {"read", "load", "model", "blur", "write"} and r["seconds"] > 0


def test_two_channel_probabilities_give_the_same_person(tmp_path: Path, red_model: Path, red_model_probs: Path) -> None:
    img, person = _portrait(120, 96, seed=1)
    src = tmp_path / "p.png"
    Image.fromarray(img).save(src)
    portrait_blur(src, tmp_path / "a.png", model=red_model, mask_out=tmp_path / "a_m.png")
    portrait_blur(src, tmp_path / "b.png", model=red_model_probs, mask_out=tmp_path / "b_m.png")
    for name in ("a_m.png", "b_m.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)) == 255, person)


def test_alpha_and_greyscale_kept(tmp_path: Path, red_model: Path) -> None:
    img, person = _portrait(100, 130, seed=2)
    alpha = np.random.default_rng(3).integers(0, 256, img.shape[:2], dtype=np.uint8)
    for mode, arr in (("RGBA", np.dstack([img, alpha])), ("LA", np.dstack([img[..., 0], alpha])), ("L", img[..., 0])):
        src, out = tmp_path / f"{mode}.png", tmp_path / f"{mode}_out.png"
        Image.fromarray(arr).save(src)
        assert Image.open(src).mode == mode
        portrait_blur(src, out, model=red_model, sigma=3)
        res = np.asarray(Image.open(out))
        assert Image.open(out).mode == mode and res.shape == arr.shape
        assert np.array_equal(res[person], arr[person])
        if mode != "L":
            assert np.array_equal(res[..., -1], alpha)  # alpha untouched
        assert (
            _laplacian_energy(arr[..., 0] if arr.ndim == 3 else arr, ~person)
            / _laplacian_energy(res[..., 0] if res.ndim == 3 else res, ~person)
            > 3
        )


def test_refusals_write_nothing(tmp_path: Path, red_model: Path) -> None:
    img, _ = _portrait(64, 64)
    src = tmp_path / "p.png"
    Image.fromarray(img).save(src)
    out = tmp_path / "out.png"
    out.write_bytes(b"keep")
    with pytest.raises(OutputExistsError, match="already exists"):
        portrait_blur(src, out, model=red_model)
    assert out.read_bytes() == b"keep"
    Image.fromarray(np.dstack([img, img[..., :1]])).save(tmp_path / "rgba.png")
    with pytest.raises(InputError, match="JPEG has no alpha"):
        portrait_blur(tmp_path / "rgba.png", tmp_path / "x.jpg", model=red_model)
    Image.fromarray(img).convert("P").save(tmp_path / "pal.png")
    with pytest.raises(InputError, match="mode P"):
        portrait_blur(tmp_path / "pal.png", tmp_path / "x.png", model=red_model)
    Image.fromarray(img[..., 0]).convert("I;16").save(tmp_path / "deep.png")
    with pytest.raises(InputError, match="8-bit RGB or greyscale"):
        portrait_blur(tmp_path / "deep.png", tmp_path / "x.png", model=red_model)
    with pytest.raises(InputError, match="threshold"):
        portrait_blur(src, tmp_path / "x.png", model=red_model, threshold=0)
    with pytest.raises(ModelError, match="model file not found"):
        portrait_blur(src, tmp_path / "x.png", model=tmp_path / "missing.pt")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.jpg").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_cli(tmp_path: Path, red_model: Path) -> None:
    img, _ = _portrait(80, 90, seed=4)
    src = tmp_path / "p.jpg"
    Image.fromarray(img).save(src, quality=100)
    out = tmp_path / "o.jpg"
    result = CliRunner().invoke(main, ["effects", "portrait-blur", str(src), "-o", str(out), "--model", str(red_model)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out}: person ") and result.output.count("\n") == 1
    assert Image.open(out).size == (90, 80)


@pytest.mark.parametrize("case", ["missing", "not_image", "exists"])
def test_cli_errors_one_line(tmp_path: Path, case: str) -> None:
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    if case == "not_image":
        src.write_text("not an image")
    elif case == "exists":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
        out.write_bytes(b"old")
    proc = subprocess.run(
        [sys.executable, "-m", "geoseg", "effects", "portrait-blur", str(src), "-o", str(out), "--model", "none.pt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("geoseg: error:"), proc.stderr
    assert {"missing": "image not found", "not_image": "not an image", "exists": "already exists"}[case] in lines[0]
    expected = {"missing": [], "not_image": ["in.png"], "exists": ["in.png", "out.png"]}[case]
    assert sorted(os.listdir(tmp_path)) == expected  # nothing written, no temporary file left
    if case == "exists":
        assert out.read_bytes() == b"old"


def test_no_torch_at_import() -> None:
    """The CLI, the effects module and the TFLite predictor import neither torch nor mediapipe."""
    code = (
        "import sys, geoseg.cli, geoseg.effects, geoseg.models.tflite; "
        "bad = [m for m in ('torch', 'mediapipe', 'rasterio', 'ai_edge_litert') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- the real model: MediaPipe's selfie segmentation read from the mediapipe wheel -------------------------


@pytest.fixture(scope="module")
def selfie_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The selfie-segmentation .tflite: an installed mediapipe, else $GEOSEG_MEDIAPIPE_WHEEL; skips without either."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert not installed (pip install 'geoseg[portrait]')")
    from geoseg.models.tflite import find_selfie_model

    if importlib.util.find_spec("mediapipe") is None and not os.environ.get("GEOSEG_MEDIAPIPE_WHEEL"):
        pytest.skip(
            "no MediaPipe selfie model: set GEOSEG_MEDIAPIPE_WHEEL to the wheel from "
            "`pip download --no-deps mediapipe==0.10.21 -d DIR` (.ci/run does)"
        )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEOSEG_CACHE", str(tmp_path_factory.mktemp("cache")))
        try:
            return find_selfie_model("mediapipe")
        except ModelError as exc:
            pytest.skip(f"no MediaPipe selfie model: {exc}")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_astronaut_real_selfie_model(tmp_path: Path, shared_data: Path, selfie_model: str) -> None:
    folder = shared_data / "plain" / "astronaut_portrait"
    src = folder / "astronaut.png"
    reference = np.asarray(Image.open(folder / "astronaut_person_mask_mediapipe.png")) > 127  # mediapipe's own output
    img = np.asarray(Image.open(src))
    out, matte_path = tmp_path / "astronaut_blur.png", tmp_path / "matte.png"
    r = portrait_blur(src, out, model=selfie_model, mask_out=matte_path)
    res = np.asarray(Image.open(out))
    person = np.asarray(Image.open(matte_path)) == 255
    assert res.shape == img.shape
    assert int((res[person] != img[person]).any(axis=-1).sum()) == 0
    iou = _iou(person, reference)
    assert iou > 0.95, iou
    assert r["person_fraction"] == pytest.approx(person.mean())
    bg = np.asarray(Image.open(matte_path)) == 0  # fully blurred background
    drop = _laplacian_energy(img, bg) / _laplacian_energy(res, bg)
    assert drop > 3, drop
    print(f"astronaut: IoU vs mediapipe {iou:.4f}, background high-frequency drop {drop:.1f}x, {r['seconds']:.2f} s")


def test_astronaut_exif_rotated_jpeg(tmp_path: Path, shared_data: Path, selfie_model: str) -> None:
    """A phone photo stored sideways with EXIF orientation 6: the model sees it upright, the output keeps the layout."""
    folder = shared_data / "plain" / "astronaut_portrait"
    upright = Image.open(folder / "astronaut.png")
    reference = np.asarray(Image.open(folder / "astronaut_person_mask_mediapipe.png").transpose(Image.Transpose.ROTATE_90)) > 127
    exif = Image.Exif()
    exif[0x0112] = 6  # display: rotate 90 degrees clockwise
    src = tmp_path / "sideways.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(src, quality=95, exif=exif.tobytes())
    out, matte_path = tmp_path / "sideways_blur.jpg", tmp_path / "matte.png"
    portrait_blur(src, out, model=selfie_model, mask_out=matte_path)
    assert Image.open(out).getexif().get(0x0112) == 6
    assert _iou(np.asarray(Image.open(matte_path)) == 255, reference) > 0.95


def test_selfie_model_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, selfie_model: str) -> None:
    from geoseg.models.tflite import TFLitePredictor, find_selfie_model

    monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path / "cache"))
    assert find_selfie_model(selfie_model) == selfie_model
    pred = TFLitePredictor(selfie_model)
    assert pred.input_shape == (1, 256, 256, 3) and pred.backend.startswith("ai-edge-litert")
    wheel = os.environ.get("GEOSEG_MEDIAPIPE_WHEEL")
    if wheel:
        cached = find_selfie_model(wheel)
        assert cached.startswith(str(tmp_path / "cache")) and Path(cached).read_bytes() == Path(selfie_model).read_bytes()
        assert find_selfie_model(wheel) == cached  # extracted once
        assert TFLitePredictor(find_selfie_model("mediapipe-landscape")).input_shape == (1, 144, 256, 3)
    bogus = tmp_path / "bogus.tflite"
    bogus.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="not a TensorFlow Lite model"):
        find_selfie_model(bogus)
    (tmp_path / "bogus.whl").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a wheel"):
        find_selfie_model(tmp_path / "bogus.whl")
    monkeypatch.delenv("GEOSEG_MEDIAPIPE_WHEEL", raising=False)
    if importlib.util.find_spec("mediapipe") is None:
        with pytest.raises(ModelError, match=r"pip download --no-deps mediapipe==0\.10\.21"):
            find_selfie_model("mediapipe")
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(ModelError, match=r"pip install 'geoseg\[portrait\]'"):
        TFLitePredictor(selfie_model)
