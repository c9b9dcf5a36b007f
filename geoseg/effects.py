"""Photo effects driven by a segmentation model: portrait blur (``geoseg effects portrait-blur``).

:func:`portrait_blur` keeps the person of a portrait sharp and blurs what lies behind. The
person probability comes from MediaPipe's selfie-segmentation model (a ``.tflite`` file read
out of the ``mediapipe==0.10.21`` wheel and run with LiteRT, see
:mod:`geoseg.models.tflite`) or from any TorchScript / ONNX person model.

Plain images (PNG, JPEG, ... read with Pillow) in pixel coordinates; no raster I/O.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from geoseg.errors import InputError, ModelError, OutputError, OutputExistsError
from geoseg.io.outdir import atomic_path, existing_outputs, fsync_replace
from geoseg.models import Runtime, resolve_model
from geoseg.models.runtime import get_predictor
from geoseg.models.tflite import SELFIE_MODELS, TFLitePredictor, find_selfie_model

__all__ = ["portrait_blur"]

_MODES = {"RGB": 3, "RGBA": 3, "L": 1, "LA": 1}  # accepted modes -> colour channels (alpha, if any, follows)
# EXIF orientation -> the transpose that makes the image upright (as PIL.ImageOps.exif_transpose) and its inverse
_UPRIGHT = {2: ("FLIP_LEFT_RIGHT",) * 2, 3: ("ROTATE_180",) * 2, 4: ("FLIP_TOP_BOTTOM",) * 2, 5: ("TRANSPOSE",) * 2,
            6: ("ROTATE_270", "ROTATE_90"), 7: ("TRANSVERSE",) * 2, 8: ("ROTATE_90", "ROTATE_270")}  # fmt: skip


def _read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise InputError(f"{path}: image not found; give a PNG or JPEG file")
    try:
        im = Image.open(path)
        im.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise InputError(f"{path}: not an image Pillow can read ({exc}); give a PNG or JPEG file") from exc
    if im.mode not in _MODES:
        raise InputError(
            f"{path}: image mode {im.mode}; portrait blur takes 8-bit RGB or greyscale images (RGBA/LA too): "
            "convert it first, e.g. PIL Image.open(path).convert('RGB').save(new_path)"
        )
    return im


def _save_format(path: str, what: str, alpha: bool) -> str:
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(f"{path}: cannot tell the {what} format from the extension {ext or '(none)'!r}; use .png or .jpg")
    if alpha and fmt == "JPEG":
        raise InputError(f"{path}: JPEG has no alpha channel and the image has one; write a .png instead")
    return fmt


def _check_out(path: str, overwrite: bool) -> None:
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder; give an output file name such as portrait_blur.png")
    folder, name = os.path.split(os.fspath(path))
    if existing_outputs(folder, [name]) and not overwrite:
        raise OutputExistsError(f"{path}: already exists; pass overwrite=True to replace it")


def _write(im, path: str, fmt: str, params: dict[str, Any]) -> None:
    """Save through a temporary sibling and an atomic rename (a reader never sees half a file)."""
    full = os.path.abspath(path)
    tmp = atomic_path(full)
    try:
        os.makedirs(os.path.dirname(full), exist_ok=True)
        im.save(tmp, format=fmt, **params)
        fsync_replace(tmp, full)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OutputError(f"{path}: could not write the image ({exc}); check the folder is writable and has space") from exc


def _selfie_person(model: str) -> tuple[Callable[[np.ndarray], np.ndarray], str, str]:
    """Person probability from a MediaPipe selfie-segmentation ``.tflite`` model (whole image resized to its input)."""
    from PIL import Image

    path = find_selfie_model(model)
    pred = TFLitePredictor(path)
    h, w = pred.size
    if pred.input_shape[3] != 3:
        raise ModelError(f"{path}: the model takes {pred.input_shape[3]} channels; a selfie-segmentation model takes RGB")

    def person(rgb: np.ndarray) -> np.ndarray:
        small = Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR)
        y = pred(np.asarray(small, dtype=np.float32)[None] / np.float32(255.0))
        if y.ndim != 4 or y.shape[:3] != (1, h, w) or y.shape[3] not in (1, 2):
            raise ModelError(f"{path}: output shape {y.shape}; a selfie-segmentation model gives (1, {h}, {w}, 1) probabilities")
        prob = Image.fromarray(np.ascontiguousarray(y[0, :, :, -1]))
        return np.asarray(prob.resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)

    return person, path, pred.backend


def _to_probability(y: np.ndarray, activation: str, origin: str) -> np.ndarray:
    """``(1, C, H, W)`` model output (C = 1: person; C = 2: background, person) to person probability ``(H, W)``."""
    c = y.shape[1]
    if c not in (1, 2):
        raise ModelError(
            f"{origin}: {c} output channels; a person model for portrait blur gives 1 (person) or 2 (background, person)"
        )
    if activation == "auto":  # probabilities when they look like probabilities, else logits
        probs = float(y.min()) >= 0.0 and float(y.max()) <= 1.0 and (c == 1 or np.allclose(y.sum(axis=1), 1.0, atol=1e-3))
        activation = "none" if probs else ("sigmoid" if c == 1 else "softmax")
    if activation == "none":
        p = y[0, -1]
    elif activation == "softmax" and c == 2:
        p = 1.0 / (1.0 + np.exp(np.clip(y[0, 0] - y[0, 1], -80.0, 80.0)))
    else:  # sigmoid, or softmax over a single channel (read as one logit)
        p = 1.0 / (1.0 + np.exp(-np.clip(y[0, -1], -80.0, 80.0)))
    return np.clip(p, 0.0, 1.0).astype(np.float32)


def _user_person(model: Any, device: str) -> tuple[Callable[[np.ndarray], np.ndarray], str, str]:
    """Person probability from a TorchScript / ONNX model taking ``(1, 3, H, W)`` RGB in [0, 1]."""
    spec = resolve_model(model)
    pred = get_predictor(spec, Runtime(device=device))
    origin = spec.path or spec.id
    multiple = max(1, int(spec.card.size_multiple or 1))

    def person(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        x = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32) / np.float32(255.0)
        if pred.fixed_size:  # a fixed-size model: the whole image resampled to its input and back
            y = pred(x, want="logits", size=(pred.fixed_size, pred.fixed_size))
        else:  # pad to the model's size multiple (edge values), crop the output back
            ph, pw = -h % multiple, -w % multiple
            y = pred(np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge"), want="logits")[:, :, :h, :w]
        return _to_probability(np.asarray(y, dtype=np.float32), spec.card.activation, origin)

    return person, origin, pred.backend


def _is_selfie(model: Any) -> bool:

    if not isinstance(model, (str, os.PathLike)):
        return False
    s = os.fspath(model)
    return s in SELFIE_MODELS or s.lower().endswith((".tflite", ".whl"))


def _matte(prob: np.ndarray, threshold: float, feather: float) -> tuple[np.ndarray, np.ndarray]:
    """The person core (``prob >= threshold``) and the compositing weight of the original image.

    The weight is exactly 1 on the core; outside it, it is the larger of the probability and
    a smooth ramp falling from 1 at the core's edge to 0 at ``feather`` pixels away, so the
    edge is softened on the background side only.
    """
    core = prob >= threshold
    alpha = prob.astype(np.float32, copy=True)
    if feather > 0 and core.any() and not core.all():
        from scipy import ndimage

        dist = ndimage.distance_transform_edt(~core)
        r = np.clip(1.0 - dist / feather, 0.0, 1.0).astype(np.float32)
        np.maximum(alpha, r * r * (3.0 - 2.0 * r), out=alpha)
    alpha[core] = 1.0
    return core, alpha


def _background_blur(color: np.ndarray, core: np.ndarray, sigma: float) -> np.ndarray:
    """The image blurred with a Gaussian of ``sigma`` pixels, from background pixels only.

    Normalised convolution (blur of background-only pixels over blur of the background
    share) keeps the person's colours from bleeding into the blurred background as a halo.
    """
    from PIL import Image, ImageFilter

    blur = ImageFilter.GaussianBlur(sigma)
    squeeze = color.shape[2] == 1
    as_image = (lambda a: Image.fromarray(a[..., 0])) if squeeze else Image.fromarray

    def blurred(a: np.ndarray) -> np.ndarray:
        out = np.asarray(as_image(np.ascontiguousarray(a)).filter(blur), dtype=np.float32)
        return out[..., None] if squeeze else out

    if not core.any():
        return blurred(color)
    bg = ~core
    num = blurred(np.where(bg[..., None], color, 0).astype(np.uint8))
    den = np.asarray(Image.fromarray(bg.astype(np.uint8) * np.uint8(255)).filter(blur), dtype=np.float32)[..., None] / 255.0
    out = num / np.maximum(den, 1e-6)
    thin = (den[..., 0] < 0.05) & bg  # background pixels all but enclosed by the person: plain blur there
    if thin.any():
        out[thin] = blurred(color)[thin]
    return out


def portrait_blur(
    image: str | os.PathLike,
    out: str | os.PathLike,
    model: Any = "mediapipe",
    *,
    sigma: float | None = None,
    threshold: float = 0.5,
    feather: float | None = None,
    mask_out: str | os.PathLike | None = None,
    overwrite: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Blur the background of a portrait, keeping the person sharp (a "portrait mode" photo).

    Parameters
    ----------
    image : str or os.PathLike
        An 8-bit RGB or greyscale image (with or without alpha) Pillow reads: PNG, JPEG, ...
    out : str or os.PathLike
        The image to write; its extension picks the format. Same size and mode as ``image``
        (an alpha channel is copied unchanged).
    model : str, os.PathLike or torch.nn.Module
        ``mediapipe`` (MediaPipe's selfie-segmentation model; see
        :func:`geoseg.models.tflite.find_selfie_model`), ``mediapipe-landscape``, a mediapipe
        wheel (``.whl``), a selfie-segmentation ``.tflite`` file, or any TorchScript ``.pt``
        / ONNX ``.onnx`` model taking ``(1, 3, H, W)`` RGB in [0, 1] and giving person logits
        or probabilities with 1 channel (person) or 2 (background, person).
    sigma : float, optional
        Background blur: the Gaussian's standard deviation in pixels [1.5 % of the longer
        image side, at least 2].
    threshold : float
        Pixels whose person probability is at least this are the person: left bit-exact.
    feather : float, optional
        Width in pixels of the soft edge, on the background side only [``sigma / 3``].
    mask_out : str or os.PathLike, optional
        Also write the matte used to this image file: 8-bit greyscale, 255 exactly on the
        person (pixels left bit-exact), 0 on fully blurred background, between on the soft edge.
    overwrite : bool
        Replace existing outputs (otherwise :class:`~geoseg.errors.OutputExistsError`).
    device : str
        ``auto``, ``cpu`` or ``cuda[:N]`` for TorchScript / ONNX models (the selfie model runs on the CPU).

    Returns
    -------
    dict
        ``image``, ``out``, ``mask``, ``model``, ``backend``, ``width``, ``height``, ``mode``,
        ``person_fraction`` (share of pixels at or above ``threshold``), ``sigma``,
        ``feather``, ``threshold``, ``timings`` (seconds: ``read``, ``load``, ``model``,
        ``blur``, ``write``) and ``seconds`` (total).

    Raises
    ------
    InputError
        The image is missing, unreadable, not RGB/greyscale, or an option is out of range.
    OutputExistsError
        An output exists and ``overwrite`` is False (nothing is written).
    ModelError
        The model cannot be found or loaded, or does not give a person map.

    Examples
    --------
    >>> portrait_blur("me.jpg", "me_blur.jpg")  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    image, out = os.fspath(image), os.fspath(out)
    mask_path = os.fspath(mask_out) if mask_out is not None else None
    mask_fmt = _check_options(out, mask_path, threshold, sigma, feather, overwrite)
    im, fmt, color, extra = _load_image(image, out)
    t_read = time.perf_counter()

    if _is_selfie(model):
        person, model_name, backend = _selfie_person(os.fspath(model))
    else:
        person, model_name, backend = _user_person(model, device)
    t_load = time.perf_counter()

    exif = im.getexif()
    prob = _person_probability(person, color, exif, model_name)
    t_model = time.perf_counter()

    h, w = color.shape[:2]
    sigma = float(sigma) if sigma is not None else max(2.0, 0.015 * max(h, w))
    feather = float(feather) if feather is not None else sigma / 3.0
    core, alpha = _matte(prob, threshold, feather)
    result = _composite(color, core, alpha, sigma)
    merged = np.concatenate([result, extra], axis=2) if extra.shape[2] else result
    t_blur = time.perf_counter()

    _write(_as_image(merged), out, fmt, _save_params(im, exif, fmt))
    if mask_path is not None:
        _write(_as_image(_matte_image(core, alpha)), mask_path, mask_fmt, {})
    t_end = time.perf_counter()

    return {
        "image": image,
        "out": out,
        "mask": mask_path,
        "model": model_name,
        "backend": backend,
        "width": w,
        "height": h,
        "mode": im.mode,
        "person_fraction": float(core.mean()),
        "sigma": sigma,
        "feather": feather,
        "threshold": float(threshold),
        "timings": {
            "read": t_read - t0,
            "load": t_load - t_read,
            "model": t_model - t_load,
            "blur": t_blur - t_model,
            "write": t_end - t_blur,
        },
        "seconds": t_end - t0,
    }


def _check_options(
    out: str, mask_path: str | None, threshold: float, sigma: float | None, feather: float | None, overwrite: bool
) -> str | None:
    """Refuse options out of range and outputs that exist (or clash) before anything is read; the mask's format."""
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"threshold {threshold}: must be in (0, 1]; 0.5 is the usual person cut")
    if sigma is not None and not sigma > 0:
        raise InputError(f"sigma {sigma}: the blur's standard deviation must be > 0 pixels")
    if feather is not None and not feather >= 0:
        raise InputError(f"feather {feather}: the soft edge width must be >= 0 pixels")
    if mask_path is not None and os.path.abspath(mask_path) == os.path.abspath(out):
        raise InputError(f"{out}: the mask and the image would overwrite each other; give mask_out another name")
    _check_out(out, overwrite)
    if mask_path is None:
        return None
    _check_out(mask_path, overwrite)
    return _save_format(mask_path, "mask", alpha=False)


def _load_image(image: str, out: str) -> tuple[Any, str, np.ndarray, np.ndarray]:
    """The image, the output's format, and its pixels as colour channels and the rest (alpha), ``(H, W, C)`` each."""
    im = _read_image(image)
    n_color = _MODES[im.mode]
    fmt = _save_format(out, "output", alpha=im.mode in ("RGBA", "LA"))
    arr = np.asarray(im)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return im, fmt, arr[..., :n_color], arr[..., n_color:]


def _person_probability(person: Callable[[np.ndarray], np.ndarray], color: np.ndarray, exif: Any, model_name: str) -> np.ndarray:
    """The person probability of every pixel; the model sees the photo upright, the result keeps the stored layout."""
    from PIL import Image

    rgb = np.ascontiguousarray(color if color.shape[2] == 3 else np.repeat(color, 3, axis=2))
    upright = _UPRIGHT.get(int(exif.get(0x0112, 1) or 1))
    if upright:
        turned = np.asarray(Image.fromarray(rgb).transpose(getattr(Image.Transpose, upright[0])))
        prob = np.asarray(Image.fromarray(person(np.ascontiguousarray(turned))).transpose(getattr(Image.Transpose, upright[1])))
    else:
        prob = person(rgb)
    if prob.shape != color.shape[:2]:  # pragma: no cover - guarded by the model wrappers
        raise ModelError(f"{model_name}: person map of shape {prob.shape} for an image of {color.shape[:2]}")
    return prob


def _composite(color: np.ndarray, core: np.ndarray, alpha: np.ndarray, sigma: float) -> np.ndarray:
    """The original weighted by ``alpha`` over the blurred background; the person core bit-exact."""
    if core.all():
        return color.copy()
    blurred = _background_blur(color, core, sigma)
    a = alpha[..., None]
    result = np.clip(np.rint(a * color + (1.0 - a) * blurred), 0, 255).astype(np.uint8)
    result[core] = color[core]  # the person, bit-exact
    return result


def _save_params(im: Any, exif: Any, fmt: str) -> dict[str, Any]:
    """Pillow save options that carry the input's colour profile and EXIF over (JPEG at quality 95)."""
    params: dict[str, Any] = {}
    if im.info.get("icc_profile"):
        params["icc_profile"] = im.info["icc_profile"]
    if len(exif) and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        params["exif"] = exif.tobytes()
    if fmt == "JPEG":
        params["quality"] = 95
    return params


def _matte_image(core: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The matte as 8-bit: 255 exactly on the person pixels (left bit-exact), 0 to 254 elsewhere."""
    matte = np.clip(np.rint(alpha * 255.0), 0, 254).astype(np.uint8)
    matte[core] = 255
    return matte


def _as_image(arr: np.ndarray):
    """A Pillow image of ``(H, W)`` or ``(H, W, C)`` pixels (a single channel as greyscale)."""
    from PIL import Image

    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
