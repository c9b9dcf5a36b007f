"""TensorFlow Lite models run with LiteRT, and the MediaPipe selfie-segmentation model.

MediaPipe's selfie (person) segmentation model ships inside the ``mediapipe==0.10.21``
wheel (Apache-2.0) as ``mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite``:
input ``(1, 256, 256, 3)`` float32 RGB in [0, 1], output ``(1, 256, 256, 1)`` person
probability (the ``_landscape`` variant takes 144 x 256). mediapipe itself needs
``numpy<2``, so geoseg never imports it: :func:`find_selfie_model` reads the ``.tflite``
file out of the wheel (or out of an installed mediapipe package, found without importing
it) and :class:`TFLitePredictor` runs it with Google's LiteRT interpreter
(``pip install 'geoseg[portrait]'``). Nothing is ever downloaded.

This module never imports torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from geoseg.errors import InputError, ModelError

__all__ = ["SELFIE_MODELS", "TFLitePredictor", "find_selfie_model"]

SELFIE_MEMBER = "mediapipe/modules/selfie_segmentation/{}.tflite"
#: names :func:`find_selfie_model` accepts, and the model file each stands for
SELFIE_MODELS = {"mediapipe": "selfie_segmentation", "mediapipe-landscape": "selfie_segmentation_landscape"}
WHEEL_ENV = "GEOSEG_MEDIAPIPE_WHEEL"
_HOW_TO_GET = (
    "pip download --no-deps mediapipe==0.10.21 -d DIR, then give model=DIR/mediapipe-0.10.21-*.whl "
    f"or set {WHEEL_ENV} to that file (installing mediapipe itself needs numpy<2)"
)
_WHEEL_KEYS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, so a wheel is hashed once


def _cache_dir() -> str:
    """Where extracted models are kept (``$GEOSEG_CACHE/models``, default ``~/.cache/geoseg/models``)."""
    root = os.environ.get("GEOSEG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "geoseg")
    return os.path.join(root, "models")


def _check_tflite(path: str) -> str:
    """``path`` if it is a TensorFlow Lite flatbuffer (identifier ``TFL3``), else a clear error."""
    if not os.path.isfile(path):
        raise ModelError(f"{path}: model file not found; give a .tflite file, a mediapipe wheel (.whl) or 'mediapipe'")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] != b"TFL3":
        raise ModelError(f"{path}: not a TensorFlow Lite model (no TFL3 identifier); give a .tflite file or a mediapipe wheel")
    return path


def _wheel_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _WHEEL_KEYS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _WHEEL_KEYS[key] = h.hexdigest()
    return _WHEEL_KEYS[key]


def _from_wheel(wheel: str, stem: str) -> str:
    """Extract ``stem``.tflite from a mediapipe wheel into the cache (once per wheel content); its path."""
    if not os.path.isfile(wheel):
        raise ModelError(f"{wheel}: mediapipe wheel not found; {_HOW_TO_GET}")
    member = SELFIE_MEMBER.format(stem)
    try:
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise ModelError(
                    f"{wheel}: the wheel holds no {member} (mediapipe 0.10.21 has it, later releases may not); "
                    "use the mediapipe==0.10.21 wheel: " + _HOW_TO_GET
                )
            key = _wheel_sha256(wheel)[:16]
            name = f"{stem}-{key}.tflite"
            for folder in (_cache_dir(), os.path.join(_tmp_dir(), f"geoseg-models-{_uid()}")):
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    return path
                try:
                    os.makedirs(folder, exist_ok=True)
                    tmp = f"{path}.{os.getpid()}.tmp"
                    with open(tmp, "wb") as f:
                        f.write(z.read(member))
                    os.chmod(tmp, 0o644)  # a shared cache stays readable for others
                    os.replace(tmp, path)
                    return path
                except OSError:
                    continue  # an unwritable cache: try the temporary folder
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel}: not a wheel (zip) file ({exc}); {_HOW_TO_GET}") from exc
    raise ModelError(f"{wheel}: could not write the extracted model to {_cache_dir()} or the temporary folder; set GEOSEG_CACHE")


def _tmp_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


def _uid() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else "user"


def _installed_mediapipe(stem: str) -> str | None:
    """The model file inside an installed mediapipe package, found without importing mediapipe."""
    try:
        spec = importlib.util.find_spec("mediapipe")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "modules", "selfie_segmentation", f"{stem}.tflite")
        if os.path.isfile(path):
            return path
    return None


def find_selfie_model(spec: str | os.PathLike = "mediapipe") -> str:
    """The path of a MediaPipe selfie-segmentation ``.tflite`` file (never downloads).

    Parameters
    ----------
    spec : str or os.PathLike
        ``mediapipe`` (or ``mediapipe-landscape``, the 144 x 256 variant): the file of an
        installed mediapipe package, else of the wheel named by ``$GEOSEG_MEDIAPIPE_WHEEL``.
        A ``.whl`` path: the model read out of that mediapipe wheel, cached under
        ``$GEOSEG_CACHE/models`` (default ``~/.cache/geoseg/models``) by the wheel's hash.
        A ``.tflite`` path: that file.

    Returns
    -------
    str
        Path of the ``.tflite`` file.

    Raises
    ------
    ModelError
        The file is missing, is not a TensorFlow Lite model, or the wheel holds no model;
        or ``mediapipe`` was asked for and neither mediapipe nor the wheel is available.
    """
    s = os.fspath(spec)
    if s in SELFIE_MODELS:
        stem = SELFIE_MODELS[s]
        installed = _installed_mediapipe(stem)
        if installed:
            return installed
        wheel = os.environ.get(WHEEL_ENV)
        if wheel:
            return _from_wheel(wheel, stem)
        raise ModelError(f"{s}: the selfie-segmentation model comes from the mediapipe wheel, which was not found; {_HOW_TO_GET}")
    if s.lower().endswith(".whl"):
        return _from_wheel(s, SELFIE_MODELS["mediapipe"])
    return _check_tflite(s)


def _litert_interpreter(path: str):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ModelError(f"{path}: TensorFlow Lite models need LiteRT; pip install 'geoseg[portrait]' (ai-edge-litert)") from exc
    return Interpreter


def _litert_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-edge-litert")
    except PackageNotFoundError:  # pragma: no cover - an unusual install
        return "?"


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Hide what native code prints on file descriptor 2 (LiteRT's "INFO: Created ... delegate" line)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class TFLitePredictor:
    """A TensorFlow Lite model run with LiteRT: one float32 NHWC batch in, its first output out.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.tflite`` file.
    num_threads : int, optional
        CPU threads for the interpreter [the cores this process may use].

    Attributes
    ----------
    input_shape : tuple of int
        The model's input shape, e.g. ``(1, 256, 256, 3)``.
    backend : str
        ``ai-edge-litert`` and its version.

    Notes
    -----
    One predictor must not be called from two threads at once (LiteRT interpreters are
    not thread-safe).
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        self.path = _check_tflite(os.fspath(path))
        interpreter = _litert_interpreter(self.path)
        if num_threads is None:
            try:
                num_threads = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - macOS, Windows
                num_threads = os.cpu_count() or 1
        try:
            self._it = interpreter(model_path=self.path, num_threads=num_threads)
            # the default XNNPACK delegate also runs MediaPipe's custom transposed convolution
            with _native_stderr_silenced():
                self._it.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            first = (str(exc).splitlines() or ["unknown error"])[0]
            raise ModelError(
                f"{self.path}: LiteRT could not load the model ({first}); give a valid TensorFlow Lite file"
            ) from exc
        inp = self._it.get_input_details()[0]
        self._in_index = int(inp["index"])
        self._out_index = int(self._it.get_output_details()[0]["index"])
        self.input_shape = tuple(int(v) for v in inp["shape"])
        if len(self.input_shape) != 4 or np.dtype(inp["dtype"]) != np.float32:
            raise ModelError(
                f"{self.path}: input {self.input_shape} {np.dtype(inp['dtype'])}; geoseg runs TensorFlow Lite models "
                "that take one float32 (1, H, W, C) image"
            )
        self.backend = f"ai-edge-litert {_litert_version()}"

    @property
    def size(self) -> tuple[int, int]:
        """The model's input height and width."""
        return self.input_shape[1], self.input_shape[2]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Run ``batch`` (float32, exactly :attr:`input_shape`) and return the first output as float32."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape != self.input_shape:
            raise InputError(f"{self.path}: input of shape {batch.shape}, the model takes {self.input_shape}; resize first")
        self._it.set_tensor(self._in_index, batch)
        self._it.invoke()
        return np.array(self._it.get_tensor(self._out_index), dtype=np.float32)
