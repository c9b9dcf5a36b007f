"""``precision="fast"`` and the ONNX runtimes: what runs, what run.json says, and how close the masks stay.

The fast mode computes in bf16 (OpenVINO for ONNX models, torch autocast for torch models) on CPUs
with AVX-512 BF16 or AMX; its masks must agree with fp32 on >= 99.5 % of the pixels of real
imagery and keep the bundled models' object F1 within 0.01 of fp32.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import geoseg
from geoseg.errors import ModelError
from geoseg.evaluate import evaluate
from geoseg.models.loading import ONNX_BACKEND_ENV, cpu_has_bf16, onnx_backend
from geoseg.models.spec import Runtime
from tests.conftest import read

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="OpenVINO is not installed (pip install 'geoseg[fast]')"
)


def _mask(path: Path) -> np.ndarray:
    return read(path / "mask.tif")


def _run(src: str, model: str, out: Path, **kw) -> dict:
    with geoseg.scheduler("threads"):
        geoseg.write(geoseg.predict(src, model, **kw), str(out))
    return json.loads((out / "run.json").read_text())


def test_onnx_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ONNX_BACKEND_ENV, "onnxruntime")
    assert onnx_backend(Runtime(device="cpu")) == "onnxruntime"
    with pytest.raises(ModelError, match=r"precision='fast' runs ONNX models on OpenVINO and .*=onnxruntime"):
        onnx_backend(Runtime(device="cpu", precision="fast"))
    monkeypatch.setenv(ONNX_BACKEND_ENV, "tensorrt")
    with pytest.raises(ModelError, match="use openvino or onnxruntime"):
        onnx_backend(Runtime(device="cpu"))
    monkeypatch.delenv(ONNX_BACKEND_ENV)
    assert onnx_backend(Runtime(device="cuda")) == "onnxruntime"  # onnxruntime's CUDA provider on a GPU
    with pytest.raises(ModelError, match="fp16' is for GPUs"):
        onnx_backend(Runtime(device="cpu", precision="fp16"))
    with pytest.raises(ModelError, match="precision must be one of fp32, fast, bf16, fp16"):
        Runtime(precision="int4")


def test_fast_without_openvino_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    monkeypatch.delenv(ONNX_BACKEND_ENV, raising=False)
    assert onnx_backend(Runtime(device="cpu")) == "onnxruntime"  # fp32 without OpenVINO: onnxruntime, the default
    with pytest.raises(ModelError, match=r"pip install 'geoseg\[fast\]'"):
        onnx_backend(Runtime(device="cpu", precision="fast"))


@needs_openvino
def test_openvino_fp32_equals_onnxruntime_and_run_json_says_which_ran(
    make_raster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = str(make_raster(300, 260, bands=3, dtype="uint8"))
    monkeypatch.setenv(ONNX_BACKEND_ENV, "onnxruntime")
    ort_run = _run(src, "buildings", tmp_path / "ort")
    monkeypatch.setenv(ONNX_BACKEND_ENV, "openvino")
    ov_run = _run(src, "buildings", tmp_path / "ov")
    assert ort_run["model"]["backend"].startswith("onnxruntime ")
    assert ov_run["model"]["backend"].startswith("openvino ") and ov_run["model"]["backend"].endswith("(fp32)")
    assert ov_run["model"]["precision"] == ort_run["model"]["precision"] == "fp32"
    assert "openvino" in ov_run["versions"]
    a, b = _mask(tmp_path / "ort"), _mask(tmp_path / "ov")
    assert (a == b).mean() >= 0.999, (a == b).mean()


@needs_openvino
def test_fast_is_recorded_with_the_arithmetic_it_used(make_raster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ONNX_BACKEND_ENV, raising=False)
    src = str(make_raster(200, 200, bands=3, dtype="uint8"))
    run = _run(src, "buildings", tmp_path / "fast", precision="fast")
    want = "bf16" if cpu_has_bf16() else "fp32"
    assert run["parameters"]["precision"] == "fast"
    assert run["model"]["precision"] == want
    assert run["model"]["backend"].endswith(f"({want})")


def _alternate_signal_stack_is_mapped() -> bool:
    """Whether this thread's alternate signal stack is disabled or lies in memory that is mapped now."""
    import ctypes

    class StackT(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    st = StackT()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(st)) == 0
    if st.ss_flags & 2 or not st.ss_sp:  # SS_DISABLE
        return True
    lo, hi = st.ss_sp, st.ss_sp + st.ss_size
    spans = [[int(v, 16) for v in line.split()[0].split("-")] for line in Path("/proc/self/maps").read_text().splitlines()]
    return any(a <= lo and hi <= b for a, b in spans) or all(any(a <= p < b for a, b in spans) for p in range(lo, hi, 4096))


@needs_openvino
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the alternate signal stack through Linux's /proc")
def test_openvino_models_dropped_in_any_order_leave_a_valid_signal_stack() -> None:
    """OpenVINO's CPU plugin swaps the compiling thread's alternate signal stack per ``Core`` and swaps it back when
    that ``Core`` goes: models dropped in another order than loaded left it pointing at freed memory, and the next
    signal Python handled on the thread killed the test run with a segmentation fault. geoseg keeps one ``Core``."""
    import gc
    import os
    import signal

    from geoseg.models.loading import openvino_model
    from geoseg.models.spec import resolve_model

    first = openvino_model(resolve_model("buildings"), Runtime(device="cpu"))
    second = openvino_model(resolve_model("ships"), Runtime(device="cpu"))
    del first
    gc.collect()
    del second
    gc.collect()
    assert _alternate_signal_stack_is_mapped()
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: got.append(signum))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # handled on the alternate stack
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert got == [signal.SIGUSR1]


def test_fast_torch_model_uses_autocast_on_a_bf16_cpu(torchscript_model: Path, make_raster, tmp_path: Path) -> None:
    src = str(make_raster(160, 160, bands=3))
    run = _run(src, str(torchscript_model), tmp_path / "t", precision="fast", tile=64, halo=8)
    assert run["model"]["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    ref = _run(src, str(torchscript_model), tmp_path / "r", tile=64, halo=8)
    assert ref["model"]["precision"] == "fp32"
    agree = (_mask(tmp_path / "t") == _mask(tmp_path / "r")).mean()
    assert agree >= 0.95, agree  # a random 4-class net: near-ties everywhere; real models are checked below


# ---- real imagery: ../shared/data -------------------------------------------------------------------------
def _agreement_and_f1(image: str, labels: str, model: str, cls: str, out: Path, iou: float) -> tuple[float, float, float]:
    _run(image, model, out / "fp32")
    _run(image, model, out / "fast", precision="fast")
    a, b = _mask(out / "fp32"), _mask(out / "fast")
    f1 = [
        evaluate(str(out / k / "mask.tif"), labels, label_class=cls, iou_threshold=iou)["classes"][cls]["object_f1"]
        for k in ("fp32", "fast")
    ]
    return float((a == b).mean()), f1[0], f1[1]


@needs_openvino
def test_fast_ships_on_casablanca_agree_with_fp32(shared_data: Path, tmp_path: Path) -> None:
    from geoseg.train.folds import casablanca

    place = casablanca(str(shared_data), str(tmp_path / "stack"))
    agree, f1_fp32, f1_fast = _agreement_and_f1(place.images[0], place.labels[0], "ships", "ship", tmp_path, 0.0)
    print(f"ships on Casablanca: agreement {agree:.5f}, object F1 fp32 {f1_fp32:.3f}, fast {f1_fast:.3f}")
    assert agree >= 0.995, agree
    assert abs(f1_fast - f1_fp32) <= 0.01, (f1_fp32, f1_fast)


@needs_openvino
def test_fast_buildings_on_kavre_agree_with_fp32(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "train" / "oam_buildings"
    img, labels = folder / "nepal_kavre_z19_1.tif", folder / "nepal_kavre_z19_1_buildings.geojson"
    agree, f1_fp32, f1_fast = _agreement_and_f1(str(img), str(labels), "buildings", "building", tmp_path, 0.5)
    print(f"buildings on Kavre 1: agreement {agree:.5f}, object F1 fp32 {f1_fp32:.3f}, fast {f1_fast:.3f}")
    assert agree >= 0.995, agree
    assert abs(f1_fast - f1_fp32) <= 0.01, (f1_fp32, f1_fast)


@needs_openvino
def test_openvino_fp32_shares_its_cores_and_bf16_keeps_the_defaults() -> None:
    """fp32 forwards run unpinned with TBB balancing the work (a reader that displaces one of its threads no longer
    holds the others at each barrier: 3 % faster end to end here); bf16's short forwards keep OpenVINO's defaults."""
    from geoseg.models.loading import cpu_has_bf16, openvino_model
    from geoseg.models.spec import resolve_model

    compiled, arithmetic = openvino_model(resolve_model("buildings"), Runtime(device="cpu"))
    assert arithmetic == "fp32"
    assert compiled.get_property("ENABLE_CPU_PINNING") is False
    assert str(compiled.get_property("TBB_PARTITIONER")).endswith("AUTO")
    if cpu_has_bf16():
        compiled, arithmetic = openvino_model(resolve_model("buildings"), Runtime(device="cpu", precision="fast"))
        assert arithmetic == "bf16"
        assert str(compiled.get_property("TBB_PARTITIONER")).endswith("STATIC")
