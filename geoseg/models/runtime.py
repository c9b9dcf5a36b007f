"""Running models on a worker: load once per process, batch, move to the device, activate.

This is the only module that imports torch (and onnxruntime). A worker process keeps each
loaded model in a cache keyed by ``(sha256, activation, device, precision)``, so a model
is loaded once per worker however many chunks it segments.

Every forward pass of a process runs on one dedicated model thread. torch and onnxruntime
already spread one forward over every core; running forwards from several Dask threads
would only oversubscribe the CPU, and with OpenMP each calling thread brings its own team
of spinning threads (and its own thread-count setting, which Dask's workers start at 1).
Reads, stacking and writes of other chunks go on meanwhile in the worker's other threads.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from geoseg.errors import DeviceError, ModelError
from geoseg.models.spec import IN_MEMORY_MODELS, ModelSpec, Runtime

__all__ = ["ModelInfo", "Predictor", "get_predictor", "load_counts", "probe", "resample_batch", "resolve_device"]

_CACHE: dict[tuple[str, str, str, str], Predictor] = {}
#: test-time augmentation views (rot90 count, horizontal flip first): 2 = a flip, 4 = and a half turn, 8 = all
DIHEDRAL: tuple[tuple[int, bool], ...] = tuple((k, f) for k in (0, 2, 1, 3) for f in (False, True))
_CACHE_MAX = 4
_LOADS: dict[str, int] = {}  # model sha256 -> times loaded in this process
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelInfo:
    """What probing a model on a worker found."""

    n_outputs: int
    fixed_size: int | None
    device: str
    device_name: str
    backend: str
    versions: dict[str, str]


def resolve_device(device: str):
    """The torch device for ``device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``); CUDA missing is an error.

    Parameters
    ----------
    device : str
        The device asked for.

    Returns
    -------
    torch.device

    Raises
    ------
    DeviceError
        CUDA was asked for and this process has no usable GPU (or not that one).
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} was asked for but this worker has no usable CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu or auto"
            )
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} does not exist: this worker sees {torch.cuda.device_count()} GPU(s)")
        return dev
    return torch.device("cpu")


def _default_threads() -> int:
    """Cores this process may use. Dask workers start with OMP_NUM_THREADS=1, which would
    leave torch on one core; forward passes are serialised per process, so one forward
    may use them all.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _set_torch_threads(n: int) -> None:
    """Set torch's intra-op threads for the calling thread.

    With OpenMP the setting is per calling thread (and Dask workers start from
    ``OMP_NUM_THREADS=1``), so it is made on the model thread itself, where forwards run;
    checking on each forward costs nothing and survives a re-created model thread.
    """
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def load_state_dict_model(spec: ModelSpec):
    """Build the card's architecture and load a state dict into it with ``weights_only=True``.

    Only tensors and plain containers are unpickled; a file holding anything else (a whole
    pickled model, custom classes) is refused, never executed.
    """
    import json
    import pickle

    import torch

    if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
        raise ModelError(
            f"{spec.path}: loading a state dict safely needs torch >= 2.6 (weights_only could run code before "
            "CVE-2025-32434 was fixed); upgrade torch, or export the model as TorchScript/ONNX"
        )

    from geoseg.models.nets import build_architecture

    card = spec.card
    origin = spec.path or spec.id
    arch = json.loads(card.architecture_json)
    try:
        state = torch.load(spec.path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{origin}: refused: the file holds more than tensors (a pickled model or custom objects), which geoseg never "
            "unpickles; save model.state_dict() instead, or export TorchScript/ONNX"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # Lightning-style checkpoints
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{origin}: not a state dict of tensors; save model.state_dict() with torch.save")
    if not card.bands or not card.classes:
        raise ModelError(f"{origin}: a state-dict model's card must list its bands and classes (they size the network)")
    n_out = 1 if card.activation == "sigmoid" else len(card.classes)
    model = build_architecture(arch["name"], arch.get("args", {}), len(card.bands), n_out, origin)
    for prefix in ("model.", "module.", "net."):  # wrappers' prefixes (Lightning, DataParallel)
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise ModelError(
            f"{origin}: the state dict does not fit {arch['name']} {arch.get('args', {})} ({first}); fix the card's architecture"
        ) from exc
    return model


def _verify_unchanged(spec: ModelSpec) -> None:
    """Refuse a model file whose content changed since :func:`geoseg.models.spec.resolve_model` checked it."""
    from geoseg.models.spec import sha256_file

    try:
        now = sha256_file(spec.path)
    except OSError as exc:
        raise ModelError(f"{spec.path}: cannot read the model ({exc.strerror or exc}); check the file") from None
    if now != spec.sha256:
        raise ModelError(f"{spec.path}: the model file changed after it was checked; run the command again")


def _check_sample_inputs(path: str) -> None:
    """torch.export.load unpickles an archive's sample inputs without ``weights_only`` when the
    safe load fails: refuse such an archive before torch gets there.
    """
    import io
    import zipfile

    import torch

    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if "/data/sample_inputs/" in f"/{name}" and name.endswith(".pt"):
                try:
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)
                except Exception as exc:  # the restricted unpickler's own errors
                    raise ModelError(
                        f"{path}: refused: its sample inputs ({name}) hold more than tensors, and torch would unpickle them "
                        "unrestricted; export the model again with plain tensor inputs, or as ONNX"
                    ) from exc


_JIT_QUIET = False


def _quiet_jit_deprecation() -> None:
    """Silence torch's ``torch.jit.load is deprecated`` once per process (a process-wide filter:
    ``catch_warnings`` is not thread-safe).
    """
    global _JIT_QUIET
    if not _JIT_QUIET:
        import warnings

        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning)
        _JIT_QUIET = True


class Predictor:
    """A loaded model on one device: numpy batch in, numpy out.

    Call it with a float32 ``(N, bands, H, W)`` batch. ``want="logits"`` returns the raw
    output channels, ``"probs"`` the activated per-class probabilities ``(N, K, H, W)``,
    ``"classes"`` the argmax as uint8 ``(N, H, W)`` (computed on the device, so only bytes
    come back from a GPU).
    """

    def __init__(self, spec: ModelSpec, runtime: Runtime) -> None:
        self.spec = spec
        self.runtime = runtime
        self._onnx = spec.kind == "onnx"
        if self._onnx:
            self._load_onnx()
        else:
            self._load_torch()

    # -- loading -----------------------------------------------------------------------
    def _load_torch(self) -> None:
        import torch

        _tune_malloc()  # torch allocates activations through malloc; onnxruntime keeps its own arena
        self.threads = self.runtime.num_threads or _default_threads()
        self.device = resolve_device(self.runtime.device)
        if self.spec.path is not None:
            _verify_unchanged(self.spec)
        try:
            if self.spec.kind == "torchscript":
                _quiet_jit_deprecation()  # users' TorchScript files keep working; geoseg itself writes ONNX
                model = torch.jit.load(self.spec.path, map_location="cpu")
            elif self.spec.kind == "exported":
                _check_sample_inputs(self.spec.path)
                model = torch.export.load(self.spec.path).module()
            elif self.spec.kind == "statedict":
                model = load_state_dict_model(self.spec)
            elif self.spec.sha256 in IN_MEMORY_MODELS:
                import copy

                # a copy: moving to a device and eval() must not change the caller's module
                model = copy.deepcopy(IN_MEMORY_MODELS[self.spec.sha256])
            else:
                import cloudpickle

                model = cloudpickle.loads(self.spec.payload)
        except ModelError:
            raise
        except Exception as exc:  # torch raises RuntimeError for bad archives
            raise ModelError(
                f"{self.spec.path or self.spec.id}: could not load the model ({exc}); export it again (ONNX: torch.onnx.export)"
            ) from exc
        self.model = model.to(self.device)
        if self.spec.kind != "exported":  # exported programs are already in inference form
            self.model = self.model.eval()
        # input channels of the first convolution, for a clear message when the band count is wrong
        self._in_channels = None
        try:
            first = next((p for p in self.model.parameters() if p.dim() == 4), None)
            self._in_channels = int(first.shape[1]) if first is not None else None
        except (AttributeError, RuntimeError, TypeError):  # exported programs and odd modules
            pass
        self.backend = f"torch {torch.__version__}"
        self.fixed_size = None
        p = self.runtime.precision
        self._autocast = None if p == "fp32" else (torch.bfloat16 if p == "bf16" else torch.float16)
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def _load_onnx(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError(f"{self.spec.path}: ONNX models need onnxruntime; pip install 'geoseg[onnx]'") from exc
        providers = ["CPUExecutionProvider"]
        want_cuda = self.runtime.device.startswith("cuda")
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if want_cuda and not has_cuda:
            raise DeviceError(
                f"device {self.runtime.device!r} was asked for but onnxruntime has no CUDA provider here "
                "(install onnxruntime-gpu); use --device cpu"
            )
        if has_cuda and self.runtime.device != "cpu":
            idx = int(self.runtime.device.split(":")[1]) if ":" in self.runtime.device else 0
            providers = [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.runtime.num_threads or _default_threads()
        try:
            self.session = ort.InferenceSession(self.spec.path, sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph
            raise ModelError(
                f"{self.spec.path}: onnxruntime could not load the model ({exc}); check it is a valid ONNX file"
            ) from exc
        active = self.session.get_providers()[0]
        if want_cuda and active != "CUDAExecutionProvider":
            # onnxruntime quietly falls back to the CPU when its CUDA provider fails to start
            raise DeviceError(
                f"{self.spec.path}: device {self.runtime.device!r} was asked for but onnxruntime started on {active}; "
                "check the GPU driver and CUDA libraries, or use --device cpu"
            )
        inp = self.session.get_inputs()[0]
        self._input_name = inp.name
        h, w = inp.shape[2:4] if len(inp.shape) == 4 else (None, None)
        self.fixed_size = h if isinstance(h, int) and h == w else None
        self._in_channels = inp.shape[1] if len(inp.shape) == 4 and isinstance(inp.shape[1], int) else None
        self.device_name = "cuda" if active == "CUDAExecutionProvider" else "cpu"
        self.device = self.device_name
        self.backend = f"onnxruntime {ort.__version__}"

    # -- running -----------------------------------------------------------------------
    def _forward_torch(self, batch: np.ndarray, want: str) -> np.ndarray:
        import torch

        _set_torch_threads(self.threads)
        x = torch.from_numpy(batch)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            if self._autocast is not None:
                with torch.autocast(self.device.type, dtype=self._autocast):
                    y = self.model(x)
            else:
                y = self.model(x)
            if isinstance(y, dict):
                y = y.get("out", next(iter(y.values())))
            elif isinstance(y, (list, tuple)):
                y = y[0]
            self._check_output(tuple(y.shape), batch.shape)
            y = y.float()
            if want == "classes":
                if y.shape[1] == 1:  # one binary channel: a logit, or a probability with activation "none"
                    y = (y[:, 0] > self._binary_threshold()).to(torch.uint8)
                else:
                    y = y.argmax(1).to(torch.uint8)
            elif want == "probs":
                y = self._activate_torch(y)
            return y.cpu().numpy()

    def _binary_threshold(self) -> float:
        return 0.5 if self._activation(1) == "none" else 0.0

    def _activate_torch(self, y):
        import torch

        act = self._activation(y.shape[1])
        if act == "sigmoid":
            y = torch.sigmoid(y)
        elif act == "softmax":
            y = torch.softmax(y, dim=1)
        else:
            y = y.clamp(0.0, 1.0)
        return torch.cat([1 - y, y], dim=1) if y.shape[1] == 1 else y

    def _activation(self, channels: int) -> str:
        act = self.spec.card.activation
        if act == "auto":
            return "sigmoid" if channels == 1 else "softmax"
        return act

    def _check_output(self, out_shape: tuple, in_shape: tuple) -> None:
        if len(out_shape) != 4 or out_shape[0] != in_shape[0] or out_shape[2:] != in_shape[2:]:
            raise ModelError(
                f"{self.spec.path or self.spec.id}: output shape {out_shape} for input {in_shape}; geoseg needs a segmentation "
                "model whose output is (N, classes, H, W) with the input's height and width"
            )

    def _forward_onnx(self, batch: np.ndarray, want: str) -> np.ndarray:
        if self._in_channels is not None and batch.shape[1] != self._in_channels:
            raise ModelError(
                f"{self.spec.path}: the model takes {self._in_channels} bands but got {batch.shape[1]}; choose bands with --bands"
            )
        y = self.session.run(None, {self._input_name: batch})[0].astype(np.float32, copy=False)
        self._check_output(y.shape, batch.shape)
        return self._finish(y, want)

    def _finish(self, y: np.ndarray, want: str) -> np.ndarray:
        """Logits (numpy) to what was asked for."""
        if want == "classes":
            if y.shape[1] == 1:
                return (y[:, 0] > self._binary_threshold()).astype(np.uint8)
            return y.argmax(1).astype(np.uint8)
        if want == "probs":
            act = self._activation(y.shape[1])
            if act == "sigmoid":
                y = 1.0 / (1.0 + np.exp(-y))
            elif act == "softmax":
                e = np.exp(y - y.max(axis=1, keepdims=True))
                y = e / e.sum(axis=1, keepdims=True)
            else:
                y = np.clip(y, 0.0, 1.0)
            return np.concatenate([1 - y, y], axis=1) if y.shape[1] == 1 else y
        return y

    def __call__(
        self,
        batch: np.ndarray,
        want: str = "probs",
        timings: dict[str, float] | None = None,
        size: tuple[int, int] | None = None,
        tta: int = 1,
        _tta_view: bool = False,
    ) -> np.ndarray:
        """Run one batch; see the class docstring for ``want``.

        The forward pass runs on this process's single model thread (see the module
        docstring). ``timings``, when given, accumulates ``forward_s`` (time in the model)
        and ``wait_s`` (time queued behind other tasks' forward passes). ``size`` other
        than the batch's own resamples the batch to it first (the model's pixel size; see
        :func:`resample_batch`) and the logits back to the batch's grid. ``tta`` > 1 runs the
        batch in that many of the :data:`DIHEDRAL` views and averages the logits, turned back
        (a call's own setting: one cached predictor serves runs with and without it).
        """
        if tta > 1 and not _tta_view:
            acc = None
            for k, flip in DIHEDRAL[:tta]:
                view = np.rot90(batch[..., ::-1] if flip else batch, k, axes=(2, 3))
                y = self(np.ascontiguousarray(view), "logits", timings, size, _tta_view=True)
                y = np.rot90(y, -k, axes=(2, 3))
                y = y[..., ::-1] if flip else y
                acc = y.astype(np.float32) if acc is None else acc + y
            return self._finish(np.ascontiguousarray(acc / tta), want)
        if size is not None and tuple(size) != tuple(batch.shape[2:]):
            logits = self(resample_batch(batch, size), want="logits", timings=timings, _tta_view=True)
            return self._finish(resample_batch(logits, batch.shape[2:]), want)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        t0 = time.perf_counter()
        started: list[float] = []

        def run() -> np.ndarray:
            started.append(time.perf_counter())
            if self._onnx:
                return self._forward_onnx(batch, want)
            return self._forward_torch(batch, want)

        try:
            return _model_thread().submit(run).result()
        except (ModelError, DeviceError):
            raise
        except Exception as exc:
            if "out of memory" in str(exc).lower():
                raise DeviceError(
                    f"{self.spec.path or self.spec.id}: out of memory on {self.device_name} for a batch of shape "
                    f"{batch.shape}; lower --batch-size or --tile"
                ) from exc
            need = getattr(self, "_in_channels", None)
            if need is not None and need != batch.shape[1]:
                raise ModelError(
                    f"{self.spec.path or self.spec.id}: the model takes {need} bands but {batch.shape[1]} were selected; "
                    "choose them with --bands (or fix the card's bands)"
                ) from exc
            raise ModelError(
                f"{self.spec.path or self.spec.id}: the model failed on a batch of shape {batch.shape} ({exc}); "
                "check the band count (--bands) and tile size (--tile)"
            ) from exc
        finally:
            if timings is not None and started:
                t2 = time.perf_counter()
                timings["forward_s"] = timings.get("forward_s", 0.0) + t2 - started[0]
                timings["wait_s"] = timings.get("wait_s", 0.0) + started[0] - t0


def resample_batch(batch: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(N, C, h, w)`` to ``(N, C, *size)`` with pixel areas aligned (no half-pixel shift).

    Shrinking by a whole factor averages blocks (what ``torch`` ``area`` interpolation does,
    so training and inference agree); other shrinks box-filter with an odd width, then
    interpolate; growing is bilinear on pixel centres (``align_corners=False``).
    """
    from scipy import ndimage

    h, w = batch.shape[2:]
    big, bw = size
    x = batch.astype(np.float32, copy=False)
    if (big, bw) == (h, w):
        return x
    ky, kx = h / big, w / bw
    if ky >= 1 and kx >= 1 and ky.is_integer() and kx.is_integer():
        n, c = x.shape[:2]
        return x.reshape(n, c, big, int(ky), bw, int(kx)).mean(axis=(3, 5), dtype=np.float32)
    if ky > 1 or kx > 1:  # anti-alias before shrinking; odd widths keep the filter centred
        box = (1, 1, 2 * int(ky / 2) + 1 if ky > 1 else 1, 2 * int(kx / 2) + 1 if kx > 1 else 1)
        x = ndimage.uniform_filter(x, size=box, mode="nearest")
    return ndimage.zoom(x, (1, 1, big / h, bw / w), order=1, mode="nearest", grid_mode=True, prefilter=False).astype(np.float32)


_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """Let glibc keep large freed blocks for reuse in this process.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also freezes
    glibc's mmap threshold at 128 KiB: every activation tensor is then mapped and unmapped
    afresh, and page faults made a U-Net forward 2.5x slower on this machine (0.63 s against
    0.25 s per 512 px tile). Tensors up to 32 MiB come from the heap again, and up to 64 MiB
    of free heap is kept.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 64 << 20)
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        pass


_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_PID: int | None = None


def _model_thread() -> ThreadPoolExecutor:
    """The one model thread of the calling process (re-created after a fork)."""
    global _EXECUTOR, _EXECUTOR_PID
    if _EXECUTOR is None or _EXECUTOR_PID != os.getpid():
        with _CACHE_LOCK:
            if _EXECUTOR is None or _EXECUTOR_PID != os.getpid():
                _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geoseg-model")
                _EXECUTOR_PID = os.getpid()
    return _EXECUTOR


def get_predictor(spec: ModelSpec, runtime: Runtime) -> Predictor:
    """The cached predictor for ``spec`` in this process (loaded on first use).

    Parameters
    ----------
    spec : ModelSpec
        Which model.
    runtime : Runtime
        Device, precision and threads.

    Returns
    -------
    Predictor
    """
    key = (spec.sha256, spec.card.activation, runtime.device, runtime.precision)
    pred = _CACHE.get(key)
    if pred is None:
        with _CACHE_LOCK:
            pred = _CACHE.get(key)
            if pred is None:
                pred = Predictor(spec, runtime)
                while len(_CACHE) >= _CACHE_MAX:  # long-lived workers: drop the oldest model
                    _CACHE.pop(next(iter(_CACHE)))
                _CACHE[key] = pred
                _LOADS[spec.sha256] = _LOADS.get(spec.sha256, 0) + 1
    return pred


def load_counts() -> dict[str, int]:
    """How many times each model (by sha256) was loaded in this process (diagnostics, tests)."""
    return dict(_LOADS)


def probe(spec: ModelSpec, runtime: Runtime, bands: int, size: int) -> ModelInfo:
    """Load the model on this worker and run one zero tile to learn its output channels.

    Fails early, with a clear message, on a wrong band count, a missing GPU or a model
    that does not produce a per-pixel output.
    """
    pred = get_predictor(spec, runtime)
    s = pred.fixed_size or size
    out = pred(np.zeros((1, bands, s, s), dtype=np.float32), want="logits")
    versions: dict[str, Any] = {}
    if pred._onnx:  # an ONNX worker never imports torch (saves seconds and ~300 MiB per worker)
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    else:
        import torch

        versions["torch"] = str(torch.__version__)  # a plain str: unpickling TorchVersion would import torch in the client
    return ModelInfo(int(out.shape[1]), pred.fixed_size, str(pred.device), pred.device_name, pred.backend, versions)
