"""A real Dask cluster: `dask scheduler` + two `dask worker` processes on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import read
from tests.test_cli import run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "scheduler.log", "w"),
        )
    ]
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or procs[0].poll() is not None:
                    pytest.fail(f"dask scheduler did not start: {(tmp_path / 'scheduler.log').read_text()}")
                time.sleep(0.2)
        for k in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "dask",
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--name",
                        f"w{k}",
                        "--nworkers",
                        "1",
                        "--memory-limit",
                        "2GiB",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=open(tmp_path / f"worker{k}.log", "w"),
                )
            )
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_existing_cluster_equals_local_run(cluster, make_raster, torchscript_model, tmp_path) -> None:
    src = make_raster(400, 380, seed=31)
    common = ["-m", str(torchscript_model), "--tile", "64", "--halo", "8", "--chunk", "112"]
    run_cli("-q", "predict", str(src), *common, "-o", str(tmp_path / "remote"), "--scheduler", cluster)
    run_cli("-q", "predict", str(src), *common, "-o", str(tmp_path / "local"), "--scheduler", "threads")
    remote = read(tmp_path / "remote" / "mask.tif")
    np.testing.assert_array_equal(remote, read(tmp_path / "local" / "mask.tif"))
    assert (remote != 255).all()
    # vectorising on the running cluster gives the same polygons as in one process
    vec = ["vectorize", "--classes", "all", "--chunk", "64", "--format", "gpkg"]
    run_cli("-q", *vec, str(tmp_path / "remote" / "mask.tif"), "-o", str(tmp_path / "vr"), "--scheduler", cluster)
    run_cli("-q", *vec, str(tmp_path / "local" / "mask.tif"), "-o", str(tmp_path / "vl"), "--scheduler", "synchronous")
    import pyogrio
    import shapely

    for layer in ("class_0", "class_1", "class_2", "class_3"):
        r = pyogrio.read_dataframe(tmp_path / "vr" / "geoseg.gpkg", layer=layer).sort_values("id")
        s = pyogrio.read_dataframe(tmp_path / "vl" / "geoseg.gpkg", layer=layer).sort_values("id")
        assert list(r["id"]) == list(s["id"]) and shapely.equals(r.geometry.values, s.geometry.values).all()

    import json

    from distributed import Client

    from geoseg.models.runtime import load_counts

    sha = json.loads((tmp_path / "remote" / "run.json").read_text())["model"]["sha256"]
    with Client(cluster) as client:
        counts = client.run(load_counts)
        # 16 chunks ran on two workers; each worker loaded the model at most once
        assert all(c.get(sha, 0) <= 1 for c in counts.values()), counts
        assert sum(c.get(sha, 0) for c in counts.values()) >= 1
        # tasks were spread over both workers
        assert all(c.get(sha, 0) == 1 for c in counts.values()), counts
