"""Right-sized execution and errors in a second (issue 17, items 5 and 6): ``--scheduler auto`` runs small jobs
in-process, inputs are checked before torch and Dask start, failed commands leave no empty folder, and Dask's own
log lines stay out of the terminal (in a file the error names)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geoseg.engine.cluster import AUTO_MAX_CHUNKS, auto_kind
from geoseg.engine.preflight import count_chunks
from geoseg.grid import Window
from geoseg.io.outdir import removed_if_failed
from tests.conftest import PROGRESS_LINE, read, write_raster

TILE = ["--tile", "32", "--halo", "4"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geoseg", *args], capture_output=True, text=True, timeout=300)


def test_auto_runs_a_few_chunks_in_process_and_more_on_a_cluster() -> None:
    assert AUTO_MAX_CHUNKS == 2
    assert count_chunks(Window(0, 0, 718, 791)) == 1  # rasterio's RGB.byte.tif
    assert count_chunks(Window(0, 0, 2048, 4096)) == 2
    assert count_chunks(Window(0, 0, 2049, 4096)) == 4
    assert count_chunks(Window(0, 0, 300, 420), chunk=160) == 6
    assert [auto_kind(n) for n in (1, 2, 3, None)] == ["threads", "threads", "inproc", "inproc"]
    # worker processes only where they pay: one per GPU, or as many as asked for
    assert auto_kind(1, gpus=("0",)) == auto_kind(40, gpus=("0", "1")) == "local"
    assert auto_kind(1, workers=2) == "local" and auto_kind(40, workers=1) == "inproc"


def test_larger_predict_runs_on_a_local_cluster_inside_this_process(make_raster, torchscript_model, tmp_path) -> None:
    """More than 2 chunks on one CPU machine: Dask distributed's scheduler and one worker in the geoseg process."""
    src = make_raster(96, 80, seed=6)
    out = tmp_path / "o"
    proc = run_cli("-v", "predict", str(src), "-m", str(torchscript_model), "-o", str(out), "--chunk", "32", *TILE)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\d+ chunks, running on a local cluster in this process", proc.stderr), proc.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["scheduler"] == {
        "kind": "local",
        "address": run["scheduler"]["address"],
        "workers": 1,
        "gpus": [],
        "auto": True,
        "processes": False,
    }
    assert run["scheduler"]["address"].startswith("inproc://")
    # a model that fails on its tiles fails there too: one line, non-zero, nothing left behind
    bad = tmp_path / "bad"
    proc = run_cli("predict", str(src), "-m", str(torchscript_model), "-o", str(bad), "--chunk", "32", "--bands", "1,2", *TILE)
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("geoseg: error: "), proc.stderr
    assert not bad.exists()


def test_small_predict_runs_in_process_and_says_so(make_raster, torchscript_model, tmp_path) -> None:
    src = make_raster(40, 40, seed=3)
    out = tmp_path / "o"
    proc = run_cli("-v", "predict", str(src), "-m", str(torchscript_model), "-o", str(out), *TILE)
    assert proc.returncode == 0, proc.stderr
    assert "1 chunk, running in-process (threads" in proc.stderr
    sched = json.loads((out / "run.json").read_text())["scheduler"]
    assert sched == {"kind": "threads", "address": None, "workers": 1, "gpus": [], "auto": True}


@pytest.mark.parametrize("case", ["missing_input", "unknown_model"])
def test_bad_input_fails_before_torch_and_dask(case, make_raster, tmp_path) -> None:
    src = str(tmp_path / "missing.tif") if case == "missing_input" else str(make_raster(40, 40, seed=4))
    model = "buildings" if case == "missing_input" else "no_such_model"
    out = tmp_path / "new" / "out"
    code = (
        "import sys\n"
        "from geoseg.cli import main\n"
        f"rc = main(['predict', {src!r}, '--model', {model!r}, '-o', {str(out)!r}], standalone_mode=False)\n"
        "heavy = [m for m in ('torch', 'distributed', 'onnxruntime') if m in sys.modules]\n"
        "print(rc, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "1 []", proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geoseg: error: "), proc.stderr
    assert (src if case == "missing_input" else model) in lines[0]
    assert not (tmp_path / "new").exists()  # no folder left, not even the parent made for it


def test_failed_commands_leave_no_new_folder(make_raster, torchscript_model, tmp_path) -> None:
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    out = tmp_path / "a" / "b" / "out"
    proc = run_cli("predict", str(empty), "-m", str(torchscript_model), "-o", str(out), *TILE)
    assert proc.returncode == 1 and "not a raster GDAL can open" in proc.stderr, proc.stderr
    assert not (tmp_path / "a").exists()
    # not a class mask (three uint16 bands): vectorize refuses it and leaves nothing
    proc = run_cli("vectorize", str(make_raster(40, 40, seed=5)), "-o", str(out))
    assert proc.returncode == 1 and "a class mask must be one uint8 band" in proc.stderr, proc.stderr
    assert not (tmp_path / "a").exists()
    # a folder that existed stays, empty or not
    kept = tmp_path / "kept"
    kept.mkdir()
    proc = run_cli("predict", str(empty), "-m", str(torchscript_model), "-o", str(kept), *TILE)
    assert proc.returncode == 1 and kept.is_dir()


def test_removed_if_failed_keeps_what_existed_or_holds_files(tmp_path) -> None:
    with pytest.raises(RuntimeError), removed_if_failed(tmp_path / "x" / "y"):
        (tmp_path / "x" / "y").mkdir(parents=True)
        raise RuntimeError("boom")
    assert not (tmp_path / "x").exists()
    with pytest.raises(RuntimeError), removed_if_failed(tmp_path / "p" / "q"):
        (tmp_path / "p" / "q").mkdir(parents=True)
        (tmp_path / "p" / "q" / "ledger.sqlite").write_text("kept: it records the failure")
        raise RuntimeError("boom")
    assert (tmp_path / "p" / "q" / "ledger.sqlite").exists()
    with removed_if_failed(tmp_path / "ok"):
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir()


def test_worker_error_on_the_local_cluster_is_one_line_naming_the_log(torchscript_model, tmp_path) -> None:
    src = write_raster(tmp_path / "truncated.tif", 128, 128, blocksize=32, seed=32)
    raw = src.read_bytes()
    src.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "out"
    proc = run_cli("predict", str(src), "-m", str(torchscript_model), "-o", str(out), "--scheduler", "local", *TILE)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("geoseg: error: "), proc.stderr
    assert "distributed" not in proc.stderr and "Traceback" not in proc.stderr
    assert "failed after 3 attempts" in lines[0] and str(src) in lines[0]
    found = re.search(r"\(details in (\S+geoseg-\d+\.log)\)$", lines[0])
    assert found, lines[0]
    log = Path(found.group(1))
    try:
        text = log.read_text()
        assert "Compute Failed" in text and "RasterReadError" in text
    finally:
        log.unlink(missing_ok=True)
    assert not out.exists()


def test_a_successful_run_leaves_no_log_file(make_raster, torchscript_model, tmp_path) -> None:
    src = make_raster(40, 40, seed=6)
    proc = subprocess.Popen(
        [sys.executable, "-m", "geoseg", "predict", str(src), "-m", str(torchscript_model), "-o", str(tmp_path / "o"),
         "--scheduler", "local", *TILE],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    noise = [ln for ln in err.splitlines() if not PROGRESS_LINE.fullmatch(ln)]  # the tile counts are geoseg's own
    assert noise == [], err  # no nanny warnings, no Dask lines
    import tempfile

    assert not os.path.exists(os.path.join(tempfile.gettempdir(), f"geoseg-{proc.pid}.log"))


def test_a_failed_workflow_unit_leaves_no_empty_folder(torchscript_model, tmp_path) -> None:
    import shutil

    src = write_raster(tmp_path / "truncated.tif", 128, 128, blocksize=32, seed=32)
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    shutil.copy(torchscript_model, tmp_path / "net.pt")
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        "name: t\nimagery: [truncated.tif]\nmodels: [{model: net.pt, tile: 32, halo: 4}]\n"
        "outputs: {folder: out, formats: [gpkg], quicklook: false}\n"
    )
    proc = run_cli("run", str(wf))
    assert proc.returncode == 1 and "1 unit(s) failed" in proc.stderr, proc.stderr
    assert (tmp_path / "out" / "ledger.sqlite").exists()  # the run's record of the failure stays
    assert not (tmp_path / "out" / "net").exists()


@pytest.mark.parametrize("probabilities", [False, True])
def test_a_command_line_run_writes_the_graph_as_it_is(probabilities, make_raster, torchscript_model, tmp_path) -> None:
    """``geoseg predict`` writes predict's graph without wrapping it in xarray (``engine.graph.Prediction``):
    dask.array, which imports xarray, pandas and pyarrow, is never imported (0.7 s and ~110 MiB before the
    first tile), and the files are those of ``geoseg.predict`` + ``geoseg.write``."""
    import geoseg

    src = str(make_raster(150, 170, crs="EPSG:32633", seed=9))
    extra = ["--chunk", "64", *(["--probabilities"] if probabilities else [])]
    cli, api = tmp_path / "cli", tmp_path / "api"
    code = (
        "import sys\n"
        "from geoseg.cli import main\n"
        f"rc = main(['predict', {src!r}, '-m', {str(torchscript_model)!r}, '-o', {str(cli)!r}, *{TILE + extra!r}], "
        "standalone_mode=False)\n"
        "print(rc, [m for m in ('dask.array', 'xarray', 'pandas', 'pyarrow', 'rioxarray') if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "None []", proc.stdout + proc.stderr  # no error, nothing heavy
    with geoseg.scheduler("threads"):
        geoseg.write(geoseg.predict(src, torchscript_model, tile=32, halo=4, chunk=64, probabilities=probabilities), api)
    names = ["mask.tif", *(["probabilities.tif"] if probabilities else [])]
    for name in names:
        for band in (1, 2, 3, 4) if name == "probabilities.tif" else (1,):
            np.testing.assert_array_equal(read(cli / name, band), read(api / name, band))
        with rasterio.open(cli / name) as a, rasterio.open(api / name) as b:
            assert (a.crs, a.transform, a.nodata, a.descriptions) == (b.crs, b.transform, b.nodata, b.descriptions)
            assert a.tags() == b.tags() and a.overviews(1) == b.overviews(1)
    run_cli_, run_api = (json.loads((d / "run.json").read_text()) for d in (cli, api))
    run_cli_["parameters"].pop("num_threads"), run_api["parameters"].pop("num_threads")  # the CLI gives the cores
    for key in ("output_grid", "parameters", "input", "outputs", "pixels", "tiles", "model", "device", "warnings"):
        assert run_cli_[key] == run_api[key], key


def test_the_in_process_cluster_keeps_its_housekeeping_quiet() -> None:
    """Its scheduler and worker share the model's process: no stack sampling profiler, no work stealing, and ticks and
    monitors once a second (``cluster.INPROC_CONFIG``; 0.3-0.9 s of a 4096² run with Dask's defaults)."""
    from distributed import get_client

    import geoseg

    with geoseg.scheduler("auto", device="cpu", chunks=AUTO_MAX_CHUNKS + 1) as sched:
        assert sched.processes is False
        client = get_client()
        worker = next(iter(client.cluster.workers.values()))
        assert "profile" not in worker.periodic_callbacks and "stealing" not in client.cluster.scheduler.extensions
        assert worker.periodic_callbacks["memory_monitor"].callback_time == 1000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_the_free_heap_kept_for_tiles_goes_back_before_the_cog_is_assembled() -> None:
    """Under ``tune_malloc`` glibc keeps up to 64 MiB of freed heap per arena for the next tiles; ``write`` hands it
    back (``trim_heap``) before GDAL builds the COG's overviews, which would otherwise add to it (the run's peak)."""
    from geoseg.models.loading import trim_heap, tune_malloc

    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    tune_malloc()
    blocks = [np.ones((1 << 20) // 8) for _ in range(48)]  # 48 x 1 MiB, each under the 32 MiB mmap threshold
    del blocks
    kept = rss_mib()
    trim_heap()
    assert kept - rss_mib() > 32, "the freed heap stayed with the process"


def test_a_run_in_process_on_threads_never_imports_distributed(make_raster, torchscript_model, tmp_path) -> None:
    """``auto`` runs a small job on Dask's threads: neither the scheduler lookup (a name makes dask import distributed
    to look for a client) nor progress or run.json's versions import distributed (0.2 s, 30 MiB)."""
    src, out = str(make_raster(40, 40, seed=3)), str(tmp_path / "o")
    code = (
        "import json, sys\n"
        "from geoseg.cli import main\n"
        f"rc = main(['predict', {src!r}, '-m', {str(torchscript_model)!r}, '-o', {out!r}, *{TILE!r}], standalone_mode=False)\n"
        f"run = json.load(open({out!r} + '/run.json'))\n"
        "print(rc, run['scheduler']['kind'], 'distributed' in sys.modules, run['versions']['distributed'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    import distributed

    assert proc.stdout.strip().splitlines()[-1] == f"None threads False {distributed.__version__}", proc.stdout + proc.stderr


def test_onnxruntime_on_the_cpu_keeps_no_memory_plan_per_tile_shape_and_does_not_spin() -> None:
    """A tile plan forwards four input shapes (full tiles, edge strips, a corner); onnxruntime's memory pattern keeps
    a plan for each (a 4096² run peaked at 438-446 MiB with it, 360-385 without, at the same speed)."""
    from geoseg.models.loading import onnx_session
    from geoseg.models.spec import Runtime, resolve_model

    session = onnx_session(resolve_model("water"), Runtime(device="cpu", num_threads=1))
    assert session.get_session_options().enable_mem_pattern is False
    # nor do its threads spin between operators on the cores the reads and writes need
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 12])
@pytest.mark.parametrize("axis", [0, 1])
def test_class_ids_are_argmax_ties_to_the_first_class(n: int, axis: int) -> None:
    """The per-tile class map (2 classes: one comparison, 3.3 ms of argmax per 512² tile saved) equals argmax,
    ties included."""
    from geoseg.models.runtime import binary_classes, class_ids

    rng = np.random.default_rng(n)
    scores = rng.integers(0, 3, size=(n, 4, 37, 29)).astype(np.float32)  # small integers: ties everywhere
    scores = np.moveaxis(scores, 0, axis)
    want = scores.argmax(axis).astype(np.uint8)
    got = class_ids(scores, axis)
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(binary_classes(scores, None, axis), want)
    if n > 1:
        assert (scores == scores.max(axis, keepdims=True)).sum(axis).max() > 1  # the ties were there


def test_a_two_class_torch_model_gives_argmax_classes(tmp_path) -> None:
    """Classes taken on the model's device (``want="classes"``) equal the logits' argmax, ties to class 0."""
    import torch

    from geoseg.models.runtime import Predictor
    from geoseg.models.spec import Runtime, resolve_model

    class TwoClass(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, :1], x[:, 1:2]], dim=1)

    path = tmp_path / "two.pt"
    torch.jit.save(torch.jit.script(TwoClass()), str(path))
    pred = Predictor(resolve_model(str(path)), Runtime(device="cpu", num_threads=1))
    x = np.random.default_rng(0).integers(0, 3, size=(2, 3, 16, 16)).astype(np.float32)
    got = pred(x, want="classes")
    np.testing.assert_array_equal(got, x[:, :2].argmax(1).astype(np.uint8))
    assert (x[:, 0] == x[:, 1]).any()


def test_the_cog_is_assembled_from_parts_read_in_its_own_blocks(tmp_path) -> None:
    """GDAL's overview pass reads the parts' VRT a block at a time: at the VRT's default 128 px each read walked
    every part (an 8192² mask from 49 parts took 1.2 s to assemble, 0.8 s in 512 px blocks, byte-identical)."""
    from geoseg.grid import GeoBox, Window
    from geoseg.io.cog import _vrt_xml, assemble_cog, write_part

    box = GeoBox(1100, 700, crs="EPSG:32633")
    mask = np.random.default_rng(3).integers(0, 3, size=(700, 1100)).astype(np.uint8)
    mask[:40, :90] = 255
    parts = [
        write_part(str(tmp_path / f"p{r}_{c}.tif"), mask[r : r + h, c : c + w], box, Window(r, c, h, w), nodata=255)
        for r, h in ((0, 448), (448, 252))
        for c, w in ((0, 448), (448, 448), (896, 204))
    ]
    vrt = tmp_path / "parts.vrt"
    vrt.write_text(_vrt_xml(parts, box, "uint8", 1, 255.0, None, None, False, blocksize=256))
    with rasterio.open(vrt) as ds:
        assert ds.block_shapes == [(256, 256)]
        np.testing.assert_array_equal(ds.read(1), mask)
    out = assemble_cog(parts, str(tmp_path / "mask.tif"), box, dtype="uint8", nodata=255, blocksize=256)
    with rasterio.open(out) as ds:
        assert ds.block_shapes == [(256, 256)] and ds.overviews(1)[0] == 2
        np.testing.assert_array_equal(ds.read(1), mask)


@pytest.mark.parametrize("values", [(0, 1), (0, 1, 255), (2, 5, 7), (0, 3, 9, 200), tuple(range(256))])
def test_value_counts_are_bincount(values: tuple[int, ...]) -> None:
    """A mask's class counts (run.json's pixels) by one comparison per value, bincount past eight values."""
    from geoseg.engine.parts import value_counts

    rng = np.random.default_rng(len(values))
    block = rng.choice(np.array(values, dtype=np.uint8), size=(61, 47))
    np.testing.assert_array_equal(value_counts(block), np.bincount(block.ravel(), minlength=256))
    np.testing.assert_array_equal(value_counts(block[:0]), np.zeros(256))


@pytest.mark.parametrize("nodata", [None, 0])
def test_a_raster_gdal_calls_all_valid_is_read_without_its_masks(nodata, tmp_path, monkeypatch) -> None:
    """GDAL declares every pixel valid (no nodata, mask or alpha): no mask is read, every pixel is valid; a
    window mirrored past one edge or two (or none) equals the mirrored reference, and a nodata raster still
    reads its masks."""
    from rasterio.io import DatasetReader

    from geoseg.grid import reflect_index
    from geoseg.io.raster import open_source, read_window

    box = None if nodata is None else (0, 10, 0, 10)
    path = write_raster(tmp_path / "r.tif", 90, 70, bands=3, dtype="uint8", nodata=nodata, nodata_box=box)
    src = open_source(str(path))
    with rasterio.open(path) as ds:
        full = ds.read()
    reads = {"masks": 0}
    real = DatasetReader.read_masks

    def counted(self, *a, **kw):
        reads["masks"] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(DatasetReader, "read_masks", counted)
    for win in (Window(20, 15, 40, 30), Window(-8, 30, 40, 30), Window(60, -5, 40, 30), Window(-8, -5, 110, 90)):
        data, valid, _ = read_window(src, win)
        rows = reflect_index(np.arange(win.row_off, win.row_stop), 90)
        cols = reflect_index(np.arange(win.col_off, win.col_stop), 70)
        want = full[:, rows[:, None], cols]
        want_valid = np.ones(win.shape, bool) if nodata is None else (want != nodata).any(axis=0)
        np.testing.assert_array_equal(valid, want_valid)
        np.testing.assert_array_equal(data, np.where(want_valid, want, 0))
    assert reads["masks"] == (0 if nodata is None else 4)


def test_a_stac_item_names_an_epsg_grid_without_pyproj() -> None:
    """The item written at the end of every run: a grid recorded as ``EPSG:n`` is that code, without pyproj's
    import and its authority search (about 60 ms after the last tile); other CRSs are still looked up."""
    code = (
        "import sys; from geoseg.vector.stac import _proj\n"
        "g = {'crs': 'EPSG:32633', 'height': 3, 'width': 4, 'transform': [2.0, 0, 5.0, 0, -2.0, 9.0, 0, 0, 1]}\n"
        "assert _proj(g) == {'proj:code': 'EPSG:32633', 'proj:shape': [3, 4], 'proj:transform': [2.0, 0, 5.0, 0, -2.0, 9.0]}\n"
        "assert 'pyproj' not in sys.modules, 'pyproj imported'\n"
        'wkt = \'PROJCS["x",GEOGCS["y",DATUM["z",SPHEROID["s",6378000,300]],PRIMEM["G",0],'
        'UNIT["degree",0.0174532925199433]],'
        'PROJECTION["Transverse_Mercator"],PARAMETER["central_meridian",11.5],UNIT["metre",1]]\'\n'
        "got = _proj({**g, 'crs': wkt})\n"
        "assert got['proj:code'] is None and 'Transverse Mercator' in got['proj:wkt2'], got\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
