"""Loading a model in a worker process: the device, the threads, and the model file made safe to run.

A :class:`geoseg.models.runtime.Predictor` calls these once per model and process:
:func:`resolve_device` (CUDA asked for and missing is an error, never a silent CPU),
:func:`load_torch_module` (TorchScript, ``torch.export``, a state dict loaded with
``weights_only``, or an in-memory module), :func:`onnx_session` (onnxruntime on the device asked
for) or :func:`openvino_model` (an ONNX file on OpenVINO's CPU runtime, the optional ``fast`` extra:
fp32, or bf16 on CPUs with AVX-512 BF16/AMX; see :func:`onnx_backend`). The file is checked again
against the hash :func:`geoseg.models.spec.resolve_model` took.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from geoseg.errors import DeviceError, ModelError
from geoseg.models.download import sha256_file
from geoseg.models.spec import IN_MEMORY_MODELS, ModelSpec, Runtime

__all__ = [
    "cpu_has_bf16",
    "default_threads",
    "first_conv_channels",
    "load_state_dict_model",
    "load_torch_module",
    "onnx_backend",
    "onnx_session",
    "openvino_core",
    "openvino_model",
    "resolve_device",
    "trim_heap",
    "tune_malloc",
]

#: environment variable choosing the CPU runtime of ONNX models: ``openvino`` or ``onnxruntime``
#: (default: OpenVINO when it is installed, else onnxruntime)
ONNX_BACKEND_ENV = "GEOSEG_ONNX_BACKEND"


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
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use device='cpu' or device='auto'"
            )
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} does not exist: this worker sees {torch.cuda.device_count()} GPU(s)")
        return dev
    return torch.device("cpu")


def default_threads() -> int:
    """Cores this process may use. Dask workers start with OMP_NUM_THREADS=1, which would
    leave torch on one core; forward passes are serialised per process, so one forward
    may use them all.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


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

    from geoseg.models.nets import build_architecture  # lazy: torch

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


_MALLOC_KEEP = 0  # MiB of free heap glibc keeps per arena, as tune_malloc set it (0: untouched)


def tune_malloc(keep_mib: int = 64) -> None:
    """Let glibc keep large freed blocks for reuse in this process.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also freezes
    glibc's mmap threshold at 128 KiB: every activation tensor is then mapped and unmapped
    afresh, and page faults made a U-Net forward 2.5x slower on this machine (0.63 s against
    0.25 s per 512 px tile). Tensors (and tiles, logits) up to 32 MiB come from the heap again,
    up to ``keep_mib`` of free heap is kept per arena, and threads share at most two heap arenas
    per core. torch allocates its activations through malloc (64 MiB kept); onnxruntime and
    OpenVINO keep their own, so only numpy's tiles and logits use it (16 MiB kept: peak 397-410 MiB
    at 4096² against 419-442 with 64, same speed). The largest ``keep_mib`` asked for stays.
    """
    global _MALLOC_KEEP
    libc = _glibc()
    if keep_mib <= _MALLOC_KEEP or libc is None:
        return
    _MALLOC_KEEP = keep_mib
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, keep_mib << 20)
    # each thread arena would keep its own free heap: a few arenas are plenty for
    # a worker's threads (measured: 30 MiB less peak in-process at 4096², same speed)
    libc.mallopt(m_arena_max, 2 * (os.cpu_count() or 1))


def trim_heap() -> None:
    """Hand the free heap that glibc keeps (up to 64 MiB per arena under :func:`tune_malloc`) back to the system.

    Called once the chunks are computed, before the COG is assembled: GDAL's overviews then grow a heap
    that no longer holds the tiles' freed memory (measured at 4096²: peak 396-427 MiB against 460-473).
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    """The C library through ctypes where it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def load_torch_module(spec: ModelSpec, device):
    """The model of ``spec`` as a torch module on ``device``, in inference mode.

    Raises
    ------
    ModelError
        The file changed since it was checked, is refused as unsafe, or torch cannot load it.
    """
    import torch

    if spec.path is not None:
        _verify_unchanged(spec)
    try:
        if spec.kind == "torchscript":
            _quiet_jit_deprecation()  # users' TorchScript files keep working; geoseg itself writes ONNX
            model = torch.jit.load(spec.path, map_location="cpu")
        elif spec.kind == "exported":
            _check_sample_inputs(spec.path)
            model = torch.export.load(spec.path).module()
        elif spec.kind == "statedict":
            model = load_state_dict_model(spec)
        elif spec.sha256 in IN_MEMORY_MODELS:
            import copy

            # a copy: moving to a device and eval() must not change the caller's module
            model = copy.deepcopy(IN_MEMORY_MODELS[spec.sha256])
        else:
            import cloudpickle

            model = cloudpickle.loads(spec.payload)
    except ModelError:
        raise
    except Exception as exc:  # torch raises RuntimeError for bad archives
        raise ModelError(
            f"{spec.path or spec.id}: could not load the model ({exc}); export it again (ONNX: torch.onnx.export)"
        ) from exc
    model = model.to(device)
    return model if spec.kind == "exported" else model.eval()  # exported programs are already in inference form


def first_conv_channels(model) -> int | None:
    """Input channels of a module's first convolution (for a clear message when the band count is wrong)."""
    try:
        first = next((p for p in model.parameters() if p.dim() == 4), None)
        return int(first.shape[1]) if first is not None else None
    except (AttributeError, RuntimeError, TypeError):  # exported programs and odd modules
        return None


def onnx_session(spec: ModelSpec, runtime: Runtime):
    """An onnxruntime session for ``spec`` on the device ``runtime`` asks for.

    Raises
    ------
    ModelError
        onnxruntime is missing or cannot load the file.
    DeviceError
        CUDA was asked for and onnxruntime has no CUDA provider, or started on the CPU instead.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError(f"{spec.path}: ONNX models need onnxruntime; pip install 'geoseg[onnx]'") from exc
    providers = ["CPUExecutionProvider"]
    want_cuda = runtime.device.startswith("cuda")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if want_cuda and not has_cuda:
        raise DeviceError(
            f"device {runtime.device!r} was asked for but onnxruntime has no CUDA provider here "
            "(install onnxruntime-gpu); use device='cpu'"
        )
    if has_cuda and runtime.device != "cpu":
        idx = int(runtime.device.split(":")[1]) if ":" in runtime.device else 0
        providers = [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = runtime.num_threads or default_threads()
    if len(providers) == 1:
        # onnxruntime keeps a memory plan per input shape it has seen, and a tile plan has four (full, edge
        # strips, corner): without them a 4096² run peaked at 360-385 MiB against 438-446, at the same speed
        opts.enable_mem_pattern = False
        # its intra-op threads spin between operators by default, on cores the tile reads and writes need: without
        # spinning a 4096² run used 14.5-15.1 CPU seconds against 15.5-16.6 (8192²: 55.9-56.3 against 60.6-60.9)
        # and finished 0.0-0.3 s (0.5-0.7 s) sooner
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(spec.path, sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph
        raise ModelError(f"{spec.path}: onnxruntime could not load the model ({exc}); check it is a valid ONNX file") from exc
    active = session.get_providers()[0]
    if want_cuda and active != "CUDAExecutionProvider":
        # onnxruntime quietly falls back to the CPU when its CUDA provider fails to start
        raise DeviceError(
            f"{spec.path}: device {runtime.device!r} was asked for but onnxruntime started on {active}; "
            "check the GPU driver and CUDA libraries, or use device='cpu'"
        )
    return session


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX), read from ``/proc/cpuinfo``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:  # not Linux: no claim
        pass
    return False


def onnx_backend(runtime: Runtime) -> str:
    """The runtime an ONNX model runs on here: ``onnxruntime`` or ``openvino``.

    On a GPU it is onnxruntime (its CUDA provider). On the CPU it is OpenVINO when installed
    (``pip install 'geoseg[fast]'``: measured 1.3x onnxruntime's fp32 speed on this project's
    U-Nets, masks agreeing) unless :data:`ONNX_BACKEND_ENV` says ``onnxruntime``;
    ``precision="fast"``/``"bf16"`` needs OpenVINO and says so when it is missing.

    Raises
    ------
    ModelError
        The variable names an unknown runtime, or a reduced precision was asked for without OpenVINO.
    """
    import importlib.util

    asked = os.environ.get(ONNX_BACKEND_ENV, "").strip().lower()
    if asked not in ("", "openvino", "onnxruntime"):
        raise ModelError(f"{ONNX_BACKEND_ENV}={asked!r}: use openvino or onnxruntime (or unset it)")
    if runtime.device.startswith("cuda"):
        return "onnxruntime"
    have_ov = importlib.util.find_spec("openvino") is not None
    if runtime.precision in ("fast", "bf16"):
        if not have_ov or asked == "onnxruntime":
            why = "OpenVINO is not installed" if not have_ov else f"{ONNX_BACKEND_ENV}=onnxruntime"
            raise ModelError(
                f"precision={runtime.precision!r} runs ONNX models on OpenVINO and {why}; "
                "pip install 'geoseg[fast]' (and unset the variable), or use precision='fp32'"
            )
        return "openvino"
    if runtime.precision == "fp16":
        raise ModelError("precision='fp16' is for GPUs; on the CPU use precision='fast' (bf16) or 'fp32'")
    return "openvino" if have_ov and asked != "onnxruntime" else "onnxruntime"


_OV_CORES: dict[int, object] = {}  # pid -> Core
_OV_CORE_LOCK = threading.Lock()


def openvino_core() -> object:
    """The process's one OpenVINO ``Core``, made on first use and never released.

    OpenVINO's CPU plugin gives the thread that first compiles on a ``Core`` an alternate
    signal stack of its own, and puts the thread's previous one back when that ``Core`` is
    destroyed. Cores destroyed in another order than made (models dropped from a cache, a
    workflow's several models) leave the thread's alternate stack pointing at freed memory;
    the next signal handled on that thread (Python runs its handlers, Ctrl-C and SIGTERM
    included, on the alternate stack) then overwrites whatever was mapped there since, or
    kills the process with a segmentation fault. One ``Core`` per process installs one stack,
    once, and it stays valid (the parent's is kept, not destroyed, in a forked child).
    """
    with _OV_CORE_LOCK:
        if os.getpid() not in _OV_CORES:  # a forked child makes its own
            import openvino as ov

            _OV_CORES[os.getpid()] = ov.Core()
        return _OV_CORES[os.getpid()]


def _openvino_shared_cores(core) -> dict[str, Any]:
    """OpenVINO's settings for fp32 forwards that share their cores with the tiles' reads and writes.

    By default its threads are pinned to cores and split each operator's work evenly up front, so a thread
    that a reader displaces holds the others at the next barrier. Unpinned, with TBB balancing the work as it
    goes, a 4096² run took 7.09-7.22 s against 7.29-7.48 (5 interleaved pairs; 8192²: 26.2-26.8 against
    26.9-27.2), the model alone as fast as before (67-69 ms a tile). bf16 forwards are short enough that the
    balancing costs more than it saves (2.96-3.14 s against 2.84-2.90): they keep the defaults.
    """
    supported = core.get_property("CPU", "SUPPORTED_PROPERTIES")
    wanted = {"ENABLE_CPU_PINNING": False, "TBB_PARTITIONER": "AUTO"}
    return {k: v for k, v in wanted.items() if k in supported}


def openvino_model(spec: ModelSpec, runtime: Runtime) -> tuple:
    """An ONNX model compiled by OpenVINO for this CPU (its dynamic dimensions kept dynamic).

    ``precision`` ``fp32`` keeps fp32 arithmetic (OpenVINO would pick bf16 by itself on AMX
    CPUs); ``fast``/``bf16`` computes in bf16 where the CPU has it (AVX-512 BF16, AMX), else in
    fp32 (``fast`` only; ``bf16`` asked for on such a CPU is an error). Returns the compiled
    model and the arithmetic used (``fp32`` or ``bf16``).

    Raises
    ------
    ModelError
        OpenVINO cannot read or compile the file, or bf16 was asked for on a CPU without it.
    """
    _verify_unchanged(spec)
    bf16 = runtime.precision in ("fast", "bf16") and cpu_has_bf16()
    if runtime.precision == "bf16" and not bf16:
        raise ModelError("precision='bf16': this CPU has no AVX-512 BF16 or AMX; use precision='fast' or 'fp32'")
    core = openvino_core()
    try:
        model = core.read_model(spec.path)  # dynamic dims stay dynamic, fixed ones fixed
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
            "INFERENCE_NUM_THREADS": runtime.num_threads or default_threads(),
            "PERFORMANCE_HINT": "LATENCY",
        }
        if not bf16:
            config.update(_openvino_shared_cores(core))
        compiled = core.compile_model(model, "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        raise ModelError(
            f"{spec.path}: OpenVINO could not compile the model ({reason}); "
            f"set {ONNX_BACKEND_ENV}=onnxruntime to run it on onnxruntime"
        ) from exc
    return compiled, "bf16" if bf16 else "fp32"
