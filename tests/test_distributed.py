"""A real Dask cluster: `dask scheduler` + two `dask worker` processes on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import read
from tests.servers import free_port
from tests.test_cli import run_cli


def _start_cluster(tmp_path, scheme: str = "tcp", tls: list[str] | None = None, workers: int = 2):
    """`dask scheduler` and `dask worker` processes on 127.0.0.1; yields the address, stops them after."""
    port = free_port()
    address = f"{scheme}://127.0.0.1:{port}"
    tls = tls or []
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
            + (["--protocol", scheme] if scheme != "tcp" else [])
            + tls,
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
        for k in range(workers):
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
                        *tls,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=open(tmp_path / f"worker{k}.log", "w"),
                )
            )
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def cluster(tmp_path):
    for address in _start_cluster(tmp_path):
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address


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


def test_tls_scheduler_with_certificates_from_the_dask_config(make_raster, torchscript_model, tmp_path) -> None:
    """A user's tls:// cluster: geoseg takes the client certificate from the Dask config (here its environment
    variables); without it, one line that names them."""
    from distributed.security import Security

    sec = Security.temporary()
    files = {}
    for name, pem in (("ca", sec.tls_ca_file), ("cert", sec.tls_client_cert), ("key", sec.tls_client_key)):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text(pem)
        files[name].chmod(0o600)
    tls = ["--tls-ca-file", str(files["ca"]), "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])]
    env = {
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(files["ca"]),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(files["cert"]),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(files["key"]),
    }
    src = make_raster(120, 100, seed=32)
    common = ["-m", str(torchscript_model), "--tile", "64", "--halo", "8", "--chunk", "56"]
    for address in _start_cluster(tmp_path, "tls", tls, workers=1):
        bare = run_cli("predict", str(src), *common, "-o", str(tmp_path / "bare"), "--scheduler", address, check=False)
        lines = [ln for ln in bare.stderr.splitlines() if ln.strip()]
        assert bare.returncode == 1 and len(lines) == 1 and "DASK_DISTRIBUTED__COMM__TLS__CA_FILE" in lines[0], bare.stderr
        proc = subprocess.run(
            [sys.executable, "-m", "geoseg", "-q", "predict", str(src), *common, "-o", str(tmp_path / "tls"),
             "--scheduler", address],
            capture_output=True, text=True, timeout=300, env={**os.environ, **env},
        )  # fmt: skip
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    run_cli("-q", "predict", str(src), *common, "-o", str(tmp_path / "local"), "--scheduler", "threads")
    np.testing.assert_array_equal(read(tmp_path / "tls" / "mask.tif"), read(tmp_path / "local" / "mask.tif"))
