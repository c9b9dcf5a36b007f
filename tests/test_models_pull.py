"""Models by name: `geoseg models pull` from a catalogue served on 127.0.0.1, the cache, and --model NAME offline.

The shipped catalogue's real URLs are checked for form only, never fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geoseg.errors import ModelError
from geoseg.models.bundled import BUNDLED, bundled_path
from geoseg.models.spec import resolve_model
from geoseg.models.zoo import cache_dir, load_catalogue, pull
from tests.servers import local_tls, range_server
from tests.test_detector import DET_META, detector_onnx
from tests.test_detector import scene as squares_scene
from tests.test_remote import write_cog

SECRET = "t0k3n-S3CR3T"
WATER = bundled_path("water")
WATER_SHA = hashlib.sha256(Path(WATER).read_bytes()).hexdigest()


@pytest.fixture
def zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A server with a model (and a pickle), a test catalogue pointing at it, and an empty cache; all via the environment."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(WATER, served / "wet.onnx")
    shutil.copy(WATER, served / "wet.pt")
    cars = detector_onnx(served / "cars.onnx", "yolov5", {**DET_META, "det_type": "YOLO_v5_or_v7_default"})
    cars_sha = hashlib.sha256(cars.read_bytes()).hexdigest()
    with range_server(served) as server:
        catalogue = tmp_path / "zoo.yaml"
        catalogue.write_text(
            f"wet:\n  url: {server.url}/wet.onnx\n  sha256: '{WATER_SHA}'\n  classes: [land, water]\n  licence: test\n"
            f"wet-unknown:\n  url: {server.url}/wet.onnx?token={SECRET}\n  sha256: null\n"
            f"wet-wrong:\n  url: {server.url}/wet.onnx\n  sha256: '{'0' * 64}'\n"
            f"cars:\n  url: {server.url}/cars.onnx\n  sha256: '{cars_sha}'\n  task: detection\n"
            f"trees:\n  url: {server.url}/trees.onnx\n  sha256: null\n  task: detection\n  det_type: retinanet\n"
        )
        monkeypatch.setenv("GEOSEG_ZOO", str(catalogue))
        monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("GEOSEG_REMOTE_RETRY_DELAY", "0.05")
        yield server


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geoseg", *args], capture_output=True, text=True, timeout=300)


def _cache_files() -> list[str]:
    folder = cache_dir()
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_the_shipped_catalogue_lists_public_onnx_models_with_their_cards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked for form only: https URLs of ONNX files, names apart from the bundled ones, a licence and source each."""
    monkeypatch.delenv("GEOSEG_ZOO", raising=False)
    entries = load_catalogue()
    assert {"geodeep-buildings", "geodeep-roads", "geodeep-cars", "deepness-landcover"} <= set(entries)
    for name, e in entries.items():
        assert name not in BUNDLED and e.url.startswith("https://")
        assert e.licence and e.source and e.description
        assert e.sha256 is None or len(e.sha256) == 64
    seg = [e for e in entries.values() if e.task == "segmentation"]
    assert seg and all(e.classes and e.resolution_cm and e.tile for e in seg)
    assert entries["geodeep-roads"].url.endswith("/road_segmentation_model_with_metadata_26_10_22.onnx")


def test_pull_once_then_a_second_pull_is_a_no_op(zoo) -> None:
    first = _cli("models", "pull", "wet")
    assert first.returncode == 0, first.stderr
    assert f"pulled wet (0.0 MB, sha256 {WATER_SHA})" in first.stdout and "--model wet" in first.stdout
    requests = zoo.count()
    second = _cli("models", "pull", "wet")
    assert second.returncode == 0 and "wet is already pulled" in second.stdout
    assert zoo.count() == requests  # nothing asked of the server
    assert _cache_files() == ["wet.json", "wet.onnx"]
    record = json.loads(Path(cache_dir(), "wet.json").read_text())
    assert record["sha256"] == WATER_SHA and record["checksum"] == "checked" and record["licence"] == "test"
    listing = _cli("models", "zoo")
    assert "wet [pulled]" in listing.stdout and "wet-wrong [not pulled]" in listing.stdout
    assert "cars [detection, not pulled]" in listing.stdout and "trees [detection (retinanet): listed only]" in listing.stdout


def test_a_checksum_mismatch_is_refused_and_leaves_the_cache_clean(zoo) -> None:
    proc = _cli("models", "pull", "wet-wrong")
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line and f"expected {'0' * 64}, got {WATER_SHA}" in line
    assert _cache_files() == []
    given = _cli("models", "pull", f"{zoo.url}/wet.onnx", "--name", "wet2", "--sha256", "ab" * 32)
    assert given.returncode == 1 and "sha256 mismatch" in given.stderr and _cache_files() == []


@pytest.fixture
def tls_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The zoo's files over https:// (a CA made here, trusted through SSL_CERT_FILE), with its catalogue."""
    served = tmp_path / "tls-served"
    served.mkdir()
    shutil.copy(WATER, served / "wet.onnx")
    tls = local_tls(tmp_path)
    with range_server(served, tls=tls) as server:
        catalogue = tmp_path / "tls-zoo.yaml"
        catalogue.write_text(f"wet-unknown:\n  url: {server.url}/wet.onnx?token={SECRET}\n  sha256: null\n")
        monkeypatch.setenv("GEOSEG_ZOO", str(catalogue))
        monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("GEOSEG_REMOTE_RETRY_DELAY", "0.05")
        monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
        yield server


def test_unknown_checksums_are_trusted_on_first_use_and_checked_after(tls_zoo, tmp_path: Path) -> None:
    assert tls_zoo.url.startswith("https://")
    proc = _cli("models", "pull", "wet-unknown")
    assert proc.returncode == 0, proc.stderr
    assert "trust on first use" in proc.stdout
    record = Path(cache_dir(), "wet-unknown.json").read_text()
    assert SECRET not in record + proc.stdout + proc.stderr and json.loads(record)["sha256"] == WATER_SHA
    assert resolve_model("wet-unknown").sha256 == WATER_SHA
    with open(Path(cache_dir(), "wet-unknown.onnx"), "ab") as f:  # the cached file altered afterwards
        f.write(b"\0")
    with pytest.raises(ModelError, match=r"changed since it was pulled.*geoseg models pull wet-unknown --force"):
        resolve_model("wet-unknown")


def test_pickles_and_undecoded_detectors_are_refused_before_any_download(zoo) -> None:
    before = zoo.count()
    proc = _cli("models", "pull", f"{zoo.url}/wet.pt", "--sha256", WATER_SHA)
    assert proc.returncode == 1 and "ONNX models only" in proc.stderr
    proc = _cli("models", "pull", "trees")
    line = proc.stderr.strip()
    assert proc.returncode == 1 and "\n" not in line
    assert "trees is a retinanet detector; geoseg decodes the YOLO layouts" in line
    assert zoo.count() == before and _cache_files() == []


def test_a_yolo_detector_is_pulled_and_runs_by_name(zoo, tmp_path: Path) -> None:
    proc = _cli("models", "pull", "cars")
    assert proc.returncode == 0, proc.stderr
    assert resolve_model("cars").card.detector.layout == "yolov5"
    src = squares_scene(tmp_path / "squares.tif")
    out = tmp_path / "boxes"
    proc = _cli("predict", str(src), "--model", "cars", "-o", str(out), "--chunk", "64", "--scheduler", "synchronous")
    assert proc.returncode == 0, proc.stderr
    assert "found 4 objects (car 2, tree 2)" in proc.stdout and not (out / "mask.tif").exists()
    # a detector whose file names a layout geoseg does not decode: refused after the download, nothing kept
    detector_onnx(zoo.root / "odd.onnx", "yolov5", {**DET_META, "det_type": "retinanet"})
    odd_sha = hashlib.sha256((zoo.root / "odd.onnx").read_bytes()).hexdigest()
    proc = _cli("models", "pull", f"{zoo.url}/odd.onnx", "--sha256", odd_sha)
    line = proc.stderr.strip()
    assert proc.returncode == 1 and "\n" not in line and "det_type 'retinanet'" in line and "refused" in line
    assert str(cache_dir()) not in line and _cache_files() == ["cars.json", "cars.onnx"]


def test_plain_http_needs_a_pinned_checksum(zoo) -> None:
    """http:// with no checksum known beforehand is refused before any request; --sha256 (or the catalogue's) allows it."""
    before = zoo.count()
    for args in ([f"{zoo.url}/wet.onnx", "--name", "plain"], ["wet-unknown"]):
        proc = _cli("models", "pull", *args)
        line = proc.stderr.strip()
        assert proc.returncode == 1 and "\n" not in line, proc.stderr
        assert "plain http://" in line and "use an https:// URL, or give --sha256 HEX" in line and SECRET not in line
    assert zoo.count() == before and _cache_files() == []
    proc = _cli("models", "pull", f"{zoo.url}/wet.onnx", "--name", "plain", "--sha256", WATER_SHA)
    assert proc.returncode == 0, proc.stderr
    assert "pulled plain" in proc.stdout and "trust on first use" not in proc.stdout


def test_a_redirect_off_https_is_refused_unless_pinned(tls_zoo, zoo) -> None:
    """https -> http: refused for a trust-on-first-use download; followed when a checksum pins the file."""
    tls_zoo.redirects["/moved.onnx"] = f"{zoo.url}/wet.onnx"
    proc = _cli("models", "pull", f"{tls_zoo.url}/moved.onnx")
    line = proc.stderr.strip()
    assert proc.returncode == 1 and "\n" not in line, proc.stderr
    assert f"redirected to {zoo.url}/wet.onnx, off https://" in line and "--sha256" in line
    assert zoo.count("/wet.onnx") == 0 and _cache_files() == []
    proc = _cli("models", "pull", f"{tls_zoo.url}/moved.onnx", "--sha256", WATER_SHA)
    assert proc.returncode == 0, proc.stderr
    assert zoo.count("/wet.onnx") == 1 and _cache_files() == ["moved.json", "moved.onnx"]


def test_external_data_and_invalid_graphs_are_refused(zoo) -> None:
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(WATER)
    onnx.save_model(model, str(zoo.root / "ext.onnx"), save_as_external_data=True, location="ext.bin", size_threshold=0)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["nowhere"], ["y"])],  # an input nothing defines
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    broken = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    broken.ir_version = 8
    onnx.save(broken, str(zoo.root / "broken.onnx"))
    for stem, needle in (("ext", "external data"), ("broken", "fails the ONNX checker")):
        sha = hashlib.sha256((zoo.root / f"{stem}.onnx").read_bytes()).hexdigest()
        proc = _cli("models", "pull", f"{zoo.url}/{stem}.onnx", "--sha256", sha)
        line = proc.stderr.strip()
        assert proc.returncode == 1 and "\n" not in line and needle in line and "refused" in line, proc.stderr
    assert zoo.count("/ext.bin") == 0 and _cache_files() == []


def test_a_missing_file_fails_at_once_and_503s_are_retried(zoo) -> None:
    proc = _cli("models", "pull", f"{zoo.url}/gone.onnx", "--sha256", WATER_SHA)
    assert proc.returncode == 1 and "HTTP 404" in proc.stderr and _cache_files() == []
    zoo.fail_next["/wet.onnx"] = 2
    assert pull("wet").downloaded and zoo.fail_next["/wet.onnx"] == 0


def test_unpulled_names_say_how_to_pull_them(zoo) -> None:
    with pytest.raises(ModelError, match=r"not pulled yet; run: geoseg models pull wet$"):
        resolve_model("wet")
    with pytest.raises(ModelError, match="geoseg models pull URL"):
        resolve_model(f"{zoo.url}/wet.onnx")


def test_predict_with_a_pulled_name_runs_offline_and_equals_the_same_file(zoo, tmp_path: Path) -> None:
    scene = write_cog(tmp_path / "scene.tif", 256, 128)
    assert _cli("models", "pull", "wet").returncode == 0
    zoo.fail_next["/wet.onnx"] = 10**6  # the server answers nothing from now on: the run is offline
    before = zoo.count()
    proc = _cli("predict", str(scene), "--model", "wet", "-o", str(tmp_path / "named"), "--scheduler", "synchronous")
    assert proc.returncode == 0, proc.stderr
    assert zoo.count() == before
    assert _cli("predict", str(scene), "--model", WATER, "-o", str(tmp_path / "file")).returncode == 0
    with rasterio.open(tmp_path / "named" / "mask.tif") as a, rasterio.open(tmp_path / "file" / "mask.tif") as b:
        assert np.array_equal(a.read(), b.read()) and a.transform == b.transform
    run = json.loads((tmp_path / "named" / "run.json").read_text())
    assert run["model"]["sha256"] == WATER_SHA and run["model"]["path"] == str(Path(cache_dir(), "wet.onnx"))
    missing = _cli("predict", str(scene), "--model", "wet-wrong", "-o", str(tmp_path / "no"))
    assert missing.returncode == 1 and "geoseg models pull wet-wrong" in missing.stderr
    assert not (tmp_path / "no").exists()
