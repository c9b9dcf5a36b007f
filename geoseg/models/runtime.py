"""Running models on a worker: load once per process, batch, move to the device, activate.

torch and onnxruntime are imported inside functions, on workers only; the device and the model
file made safe to run are :mod:`geoseg.models.loading`'s. A worker process keeps each
loaded model in a cache keyed by ``(sha256, activation, device, precision, ONNX runtime asked for)``, so a model
is loaded once per worker however many chunks it segments.

Every forward pass of a process runs on one dedicated model thread. torch and onnxruntime
already spread one forward over every core; running forwards from several Dask threads
would only oversubscribe the CPU, and with OpenMP each calling thread brings its own team
of spinning threads (and its own thread-count setting, which Dask's workers start at 1).
Reads, stacking and writes of other chunks go on meanwhile in the worker's other threads.

Over 400 lines because the Predictor holds every runtime a worker may run (torch, onnxruntime, OpenVINO) with
their shared batching, activation, TTA and resampling: one object per loaded model.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from geoseg.errors import DeviceError, ModelError
from geoseg.models.detector import class_count
from geoseg.models.loading import (
    ONNX_BACKEND_ENV,
    cpu_has_bf16,
    default_threads,
    first_conv_channels,
    load_torch_module,
    onnx_backend,
    onnx_session,
    openvino_model,
    resolve_device,
    tune_malloc,
)
from geoseg.models.spec import ModelSpec, Runtime

__all__ = ["ModelInfo", "Predictor", "binary_classes", "class_ids", "get_predictor", "load_counts", "probe", "resample_batch"]

_CACHE: dict[tuple[str, ...], Predictor] = {}
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
    precision: str = "fp32"  # the arithmetic the forwards use (precision="fast" resolves to bf16, fp16 or fp32)
    fixed_batch: int | None = None  # the batch size the model's input is fixed to (zoo exports: 1), None when free


def _set_torch_threads(n: int) -> None:
    """Set torch's intra-op threads for the calling thread.

    With OpenMP the setting is per calling thread (and Dask workers start from
    ``OMP_NUM_THREADS=1``), so it is made on the model thread itself, where forwards run;
    checking on each forward costs nothing and survives a re-created model thread.
    """
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


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

        tune_malloc()  # torch allocates activations through malloc; onnxruntime keeps its own arena
        self.threads = self.runtime.num_threads or default_threads()
        self.device = resolve_device(self.runtime.device)
        self.model = load_torch_module(self.spec, self.device)
        self._in_channels = first_conv_channels(self.model)
        self.backend = f"torch {torch.__version__}"
        self.fixed_size = None
        self.fixed_batch: int | None = None
        self._autocast = _torch_autocast(self.runtime.precision, self.device.type)
        self.precision_used = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self._autocast]
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def _load_onnx(self) -> None:
        tune_malloc(keep_mib=16)  # tiles and logits are numpy arrays of megabytes: keep them off mmap (see tune_malloc)
        if onnx_backend(self.runtime) == "openvino":
            self._load_openvino()
            return
        self.session = onnx_session(self.spec, self.runtime)
        import onnxruntime as ort  # present: onnx_session imported it

        inp = self.session.get_inputs()[0]
        self._input_name = inp.name
        self._set_input_shape(list(inp.shape))
        self.device_name = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.device = self.device_name
        self.precision_used = "fp32"
        self.backend = f"onnxruntime {ort.__version__}"
        self._run_onnx = lambda batch: self.session.run(None, {self._input_name: batch})[0]

    def _load_openvino(self) -> None:
        import openvino as ov

        compiled, self.precision_used = openvino_model(self.spec, self.runtime)
        shape = compiled.inputs[0].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static else []
        self._set_input_shape(dims)
        request = compiled.create_infer_request()  # one: every forward runs on the model thread

        def run(batch: np.ndarray) -> np.ndarray:
            request.infer({0: batch})
            return request.get_output_tensor(0).data.copy()  # the request reuses its buffer

        self._run_onnx = run
        self.device_name = self.device = "cpu"
        self.backend = f"openvino {ov.__version__.split('-')[0]} ({self.precision_used})"

    def _set_input_shape(self, dims: list) -> None:
        """Fixed tile size, band count and batch size from the model's input dimensions (None where dynamic)."""
        h, w = dims[2:4] if len(dims) == 4 else (None, None)
        self.fixed_batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
        self.fixed_size = h if isinstance(h, int) and h == w else None
        self._in_channels = dims[1] if len(dims) == 4 and isinstance(dims[1], int) else None

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
                elif y.shape[1] == 2:  # one comparison: torch's argmax over dim 1 took 50 ms for a 512² CPU tile
                    y = (y[:, 1] > y[:, 0]).to(torch.uint8)
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
        if self.spec.card.detector is not None:  # boxes, checked against the layout by the probe
            return
        if len(out_shape) != 4 or out_shape[0] != in_shape[0] or out_shape[2:] != in_shape[2:]:
            raise ModelError(
                f"{self.spec.path or self.spec.id}: output shape {out_shape} for input {in_shape}; geoseg needs a segmentation "
                "model whose output is (N, classes, H, W) with the input's height and width"
            )

    def _forward_onnx(self, batch: np.ndarray, want: str) -> np.ndarray:
        if self._in_channels is not None and batch.shape[1] != self._in_channels:
            raise ModelError(
                f"{self.spec.path}: the model takes {self._in_channels} bands but got {batch.shape[1]}; "
                "choose bands with bands= or band_map="
            )
        y = self._run_onnx(batch).astype(np.float32, copy=False)
        self._check_output(y.shape, batch.shape)
        return self._finish(y, want)

    def _finish(self, y: np.ndarray, want: str, threshold: float | None = None) -> np.ndarray:
        """Logits (numpy) to what was asked for; ``threshold`` cuts a binary model's class 1 (see :func:`binary_classes`)."""
        if want == "classes":
            if threshold is not None:
                return binary_classes(self._finish(y, "probs"), threshold)
            if y.shape[1] == 1:
                return (y[:, 0] > self._binary_threshold()).astype(np.uint8)
            return class_ids(y, 1)
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
                    f"{batch.shape}; lower batch_size= or tile="
                ) from exc
            need = getattr(self, "_in_channels", None)
            if need is not None and need != batch.shape[1]:
                raise ModelError(
                    f"{self.spec.path or self.spec.id}: the model takes {need} bands but {batch.shape[1]} were selected; "
                    "choose them with bands= or band_map= (or fix the card's bands)"
                ) from exc
            raise ModelError(
                f"{self.spec.path or self.spec.id}: the model failed on a batch of shape {batch.shape} ({exc}); "
                "check the band count (bands=, band_map=) and tile size (tile=)"
            ) from exc
        finally:
            if timings is not None and started:
                t2 = time.perf_counter()
                timings["forward_s"] = timings.get("forward_s", 0.0) + t2 - started[0]
                timings["wait_s"] = timings.get("wait_s", 0.0) + started[0] - t0


def _torch_autocast(precision: str, device_type: str):
    """The autocast dtype for ``precision`` on this device (None: fp32).

    ``fast`` is fp16 on a GPU, bf16 on a CPU with AVX-512 BF16/AMX, else fp32 (a CPU without
    bf16 arithmetic would emulate it, slower than fp32).
    """
    import torch

    if precision == "fast":
        if device_type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def binary_classes(probs: np.ndarray, threshold: float | None, axis: int = 1) -> np.ndarray:
    """Class ids of per-class probabilities (finite where it matters): the larger class, or with
    ``threshold`` (a binary model's two classes) class 1 where its probability is at least ``threshold``.
    """
    if threshold is None:
        return class_ids(probs, axis)
    return (np.take(probs, 1, axis=axis) >= threshold).astype(np.uint8)


def class_ids(scores: np.ndarray, axis: int = 1) -> np.ndarray:
    """The index of the largest of finite ``scores`` along ``axis``, as uint8: ``argmax``'s answer
    (the first class on ties), faster.

    NumPy's argmax over a leading axis walks the array with a stride per class: 3.3 ms for a
    two-class 512² tile here, against 0.05 ms for one comparison (a 4096² run forwards 100
    tiles). Up to 8 classes a running maximum is still faster; beyond, argmax is used.

    Parameters
    ----------
    scores : numpy.ndarray
        Finite logits or probabilities, one entry per class along ``axis`` (at most 255 classes).
    axis : int
        The class axis.

    Returns
    -------
    numpy.ndarray
        uint8 class ids, ``scores``'s shape without ``axis``.
    """
    n = scores.shape[axis]

    def score(c: int) -> np.ndarray:
        index: list[Any] = [slice(None)] * scores.ndim
        index[axis] = c
        return scores[tuple(index)]

    if n == 2:
        return (score(1) > score(0)).view(np.uint8)
    if n == 1 or n > 8:
        return scores.argmax(axis).astype(np.uint8)
    best = score(0).copy()
    ids = np.zeros(best.shape, dtype=np.uint8)
    for c in range(1, n):
        s = score(c)
        np.copyto(ids, c, where=s > best)
        np.maximum(best, s, out=best)
    return ids


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
    key = (spec.sha256, spec.card.activation, runtime.device, runtime.precision, os.environ.get(ONNX_BACKEND_ENV, ""))
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
    det, known = spec.card.detector, len(spec.card.classes) if spec.card.classes else None
    n_outputs = class_count(out.shape, det, known) if det is not None else int(out.shape[1])
    versions: dict[str, Any] = {}
    if pred._onnx:  # an ONNX worker never imports torch (saves seconds and ~300 MiB per worker)
        name, version = pred.backend.split()[:2]
        versions[name] = version
    else:
        import torch

        versions["torch"] = str(torch.__version__)  # a plain str: unpickling TorchVersion would import torch in the client
    return ModelInfo(
        n_outputs, pred.fixed_size, str(pred.device), pred.device_name, pred.backend, versions, pred.precision_used,
        pred.fixed_batch,
    )  # fmt: skip
