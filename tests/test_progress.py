"""Progress people can read: tiles (not Dask chunks) counted to the total, bars on a terminal, plain lines in logs."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading

import pytest

import geoseg
from geoseg.engine.job import job_from
from geoseg.engine.progress import Progress, compute_tasks, counter
from geoseg.vector import vectorize


def _calls() -> tuple[list[tuple[int, int, str]], object]:
    calls: list[tuple[int, int, str]] = []
    lock = threading.Lock()

    def record(done: int, total: int, unit: str) -> None:
        with lock:
            calls.append((done, total, unit))

    return calls, record


def _check_counts(calls: list[tuple[int, int, str]], unit: str, total: int) -> None:
    seen = [c for c in calls if c[2] == unit]
    assert seen, calls
    done = [d for d, _, _ in seen]
    assert all(t == total for _, t, _ in seen), seen
    assert done == sorted(done) and len(set(done)) == len(done), done  # increasing, never repeated
    assert done[-1] == total


@pytest.mark.parametrize("where", ["threads", "local"])
def test_callable_gets_tiles_to_the_total(where, make_raster, torchscript_model, tmp_path) -> None:
    """48 tiles of 32 px cores in 4 chunks of 96 px: every tile counted, increasing, ending at 48, on both schedulers."""
    src = make_raster(192, 256)
    calls, record = _calls()
    with geoseg.scheduler(where, workers=2) as sched:
        mask = geoseg.predict(src, torchscript_model, tile=40, halo=4, chunk=96, **sched.predict_options("cpu"))
        geoseg.write(mask, tmp_path / "out", progress=record)
    assert job_from(mask).plan.n_tiles() == 48 and mask.data.numblocks == (2, 3)
    _check_counts(calls, "tiles", 48)
    if where == "threads":  # in-process: each tile as it finishes, not a chunk at a time
        assert len(calls) == 48


def test_one_chunk_moves_tile_by_tile(make_raster, torchscript_model, tmp_path) -> None:
    """A one-chunk raster never looks stuck: its tiles are counted from inside the task."""
    src = make_raster(128, 128)
    calls, record = _calls()
    with geoseg.scheduler("synchronous"):
        mask = geoseg.predict(src, torchscript_model, tile=40, halo=4, chunk=512)
        assert mask.data.numblocks == (1, 1)
        geoseg.write(mask, tmp_path / "out", progress=record)
    assert [d for d, _, _ in calls] == list(range(1, 17))


def test_vectorize_counts_chunk_windows(make_raster, torchscript_model, tmp_path) -> None:
    """One count per chunk window of the mask (its 512 px COG blocks: 2 x 2 here)."""
    src = make_raster(640, 640)
    calls, record = _calls()
    with geoseg.scheduler("threads"):
        done = geoseg.segment(src, torchscript_model, tmp_path / "out", tile=128, halo=8)
        vectorize(done.mask, str(tmp_path / "vec"), chunk=512, progress=record)
    _check_counts(calls, "chunk windows", 4)


def test_plain_lines_and_bar() -> None:
    """Plain lines: one per tenth at most (and the last at the total); live: a tqdm bar; a callable: every step."""
    out = io.StringIO()
    c = Progress(stream=out).counter(100, "tiles", "predict x.tif", pixels=10**6)
    for _ in range(100):
        c.add(1)
    c.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("predict x.tif: 100/100 tiles in ") and "MP/s" in lines[-1]
    assert re.match(r"predict x\.tif: 10/100 tiles \(10 %\), [0-9.]+ MP/s, ETA \d+ s$", lines[0]), lines[0]
    live = io.StringIO()
    c = Progress(stream=live, live=True).counter(3, "tiles", "predict x.tif")
    c.add(2)
    c.close()
    assert "3/3 tiles" in live.getvalue()
    calls, record = _calls()
    c = counter(record, 3, "tiles", "x")
    c.add(1)
    c.add(5)  # never past the total
    c.close()
    c.add(1)  # nothing after the end
    assert calls == [(1, 3, "tiles"), (3, 3, "tiles")]
    assert counter(False, 3, "tiles", "x") is None


def test_failed_compute_leaves_the_count_open() -> None:
    import dask

    def boom() -> None:
        raise ValueError("boom")

    calls, record = _calls()
    with dask.config.set(scheduler="synchronous"), pytest.raises(ValueError):
        compute_tasks([dask.delayed(boom)()], counter(record, 1, "chunks", "x"))
    assert calls == []


def test_cli_plain_lines_count_tiles_to_the_total(make_raster, torchscript_model, tmp_path) -> None:
    """Not a terminal (CI, logs): plain lines of tile counts on stderr, the last at the total; -q: none."""
    src = make_raster(192, 256)
    args = [str(src), "-m", str(torchscript_model), "-o", str(tmp_path / "o"), "--tile", "40", "--halo", "4"]
    args += ["--chunk", "96", "--scheduler", "threads", "--vectorize"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(geoseg.__file__))])}
    proc = subprocess.run([sys.executable, "-m", "geoseg", "predict", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    tiles = [ln for ln in proc.stderr.splitlines() if " tiles" in ln]
    assert tiles and all(ln.startswith(f"predict {src.name}: ") for ln in tiles), proc.stderr
    counts = [int(m.group(1)) for ln in tiles if (m := re.search(r": (\d+)/48 tiles", ln))]
    assert len(counts) == len(tiles) and counts == sorted(counts) and counts[-1] == 48, proc.stderr
    assert len(tiles) <= 11
    assert re.search(r": \d+/\d+ chunk windows in [0-9.]+ s", proc.stderr), proc.stderr
    quiet = subprocess.run(
        [sys.executable, "-m", "geoseg", "-q", "predict", *args, "--overwrite"], capture_output=True, text=True, env=env
    )
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_workflow_units_are_numbered_and_say_start_and_end() -> None:
    """``geoseg run``: every unit numbered of the total (skipped ones too), a running one's lines under its number."""
    from geoseg.workflows.progress import Units

    out = io.StringIO()
    units = Units(3, Progress(stream=out, live=False))
    units.unit("scene/water", lambda progress: None)  # skipped: never run, keeps its number

    def work(progress):
        c = progress.counter(2, "tiles", "predict scene.tif")
        c.add(2)
        c.close()
        return "made"

    assert units.unit("scene/forest", work)() == "made"
    lines = out.getvalue().splitlines()
    assert lines[0] == "[2/3] scene/forest: started"
    assert lines[1].startswith("[2/3] scene/forest: predict scene.tif: 2/2 tiles in ")
    assert re.fullmatch(r"\[2/3\] scene/forest: finished in [0-9.]+ s", lines[2]) and len(lines) == 3
    quiet = Units(1, False)
    assert quiet.unit("x", lambda progress: progress)() is False
