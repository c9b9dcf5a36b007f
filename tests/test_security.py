"""Attack and fault cases (issue 14): a local cluster only its owner can use, clean stops, bounded compute options.

Each case asserts the exit code (or the exception), a one-line message, no traceback, and nothing written
outside the output folder. The cluster cases start the real default local cluster (TLS, one worker process).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geoseg.engine.cluster import WorkerLostError, scheduler
from geoseg.engine.security import check_address, dashboard_address
from geoseg.errors import GeosegError, InputError

# --------------------------------------------------------------------------------------------- helpers


def process_tree(root: int) -> set[int]:
    """``root`` and all its descendants (from /proc/PID/task/TID/children)."""
    pids, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in pids:
            continue
        pids.add(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return pids


def listening(pids: set[int]) -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket in LISTEN state that one of ``pids`` holds (what ``ss -ltnp`` shows)."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                host, port = local.split(":")
                raw = bytes.fromhex(host)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # /proc keeps 32-bit words host-endian
                out.append((str(ipaddress.ip_address(raw)), int(port, 16)))
    return out


def beyond_loopback(sockets: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(h, p) for h, p in sockets if not ipaddress.ip_address(h).is_loopback]


needs_proc = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


def _tls_without_certificate(port: int) -> bytes | None:
    """Open TLS to ``port`` without a client certificate and read; the bytes got, or None when refused."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(b"\x00" * 64)
            return tls.recv(64) or None
    except (ssl.SSLError, OSError):
        return None


def _identity(address: str, security=None) -> dict:
    """Ask a Dask server who it is, as any client would first (no Client object: nothing left to collect)."""
    import asyncio

    from distributed.comm import connect

    async def ask() -> dict:
        kwargs = security.get_connection_args("client") if security else {}
        comm = await connect(address, timeout=3, **kwargs)
        try:
            await comm.write({"op": "identity"})
            return await asyncio.wait_for(comm.read(), 5)
        finally:
            await comm.close()

    return asyncio.run(ask())


def _kind_of_port(port: int) -> str:
    """``http`` when the port answers a plain HTTP request, else ``tls`` (a Dask comm listener)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            return "http" if s.recv(5) == b"HTTP/" else "tls"
        except OSError:
            return "tls"


def _geoseg(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "geoseg", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _one_line_error(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --------------------------------------------------------------------------------------------- the local cluster


@needs_proc
def test_listening_check_sees_a_socket_open_to_the_network() -> None:
    """The ss-style check below can fail: a socket on 0.0.0.0 held by this process is reported."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        found = listening(process_tree(os.getpid()))
        assert ("0.0.0.0", port) in found and ("0.0.0.0", port) in beyond_loopback(found)
    assert ("0.0.0.0", port) not in listening(process_tree(os.getpid()))


class _Records(logging.Handler):
    """The records of one logger, kept for a test (independent of what earlier tests did to propagation)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


@pytest.fixture
def cluster_log():
    """What :mod:`geoseg.engine.cluster` logs at INFO and above during the test."""
    logger = logging.getLogger("geoseg.engine.cluster")
    keep = logger.level, logger.disabled
    handler = _Records()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.disabled = False
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(keep[0])
    logger.disabled = keep[1]


def _check_owner_only(sched, caplog, http_off: bool = True) -> None:
    from distributed import get_client
    from distributed.security import Security

    assert sched.address.startswith("tls://127.0.0.1:"), sched.address
    # the log line tells the true address
    assert any(sched.address in r.getMessage() and "TLS" in r.getMessage() for r in caplog.records), caplog.text
    sockets = listening(process_tree(os.getpid()))
    port = int(sched.address.rsplit(":", 1)[1])
    assert ("127.0.0.1", port) in sockets, sockets
    assert len(sockets) >= 3 and not beyond_loopback(sockets), sockets  # scheduler, nanny, worker and HTTP servers

    own = get_client().security
    # the owner's credentials work (the refusals below are not just a dead port)
    assert _identity(sched.address, own)["type"] == "Scheduler"
    for worker in get_client().scheduler_info()["workers"]:
        assert worker.startswith("tls://127.0.0.1:") and _identity(worker, own)["type"] == "Worker"
    # anyone else is refused: no credentials, plain TCP on the TLS port, another key pair
    for address, security in (
        (sched.address, None),
        (sched.address.replace("tls://", "tcp://"), None),
        (sched.address, Security.temporary()),
    ):
        with pytest.raises((OSError, TypeError, ValueError)):
            _identity(address, security)
    # every TLS port of the cluster (scheduler, nanny, worker) demands the cluster's certificate;
    # the HTTP servers Dask always starts serve nothing (no logs, task names or metrics) unless the dashboard is on
    import urllib.error
    import urllib.request

    kinds = {p: _kind_of_port(p) for _, p in sockets}
    assert "tls" in kinds.values() and "http" in kinds.values(), kinds
    for p, kind in kinds.items():
        if kind == "tls":
            assert _tls_without_certificate(p) is None, p
        elif http_off:
            for route in ("/info/main/workers.html", "/health", "/metrics", "/json/counts.json", "/status", "/"):
                with pytest.raises(urllib.error.HTTPError) as err:
                    urllib.request.urlopen(f"http://127.0.0.1:{p}{route}", timeout=5)
                assert err.value.code == 404, (p, route)
    # the private key travels by pipe, never on a command line other users can read
    for pid in process_tree(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"PRIVATE KEY" not in f.read()
        except FileNotFoundError:
            pass


@needs_proc
def test_local_cluster_is_tls_on_loopback_and_refuses_strangers(cluster_log, monkeypatch) -> None:
    monkeypatch.delenv("GEOSEG_DASHBOARD", raising=False)
    caplog = cluster_log
    t0 = time.monotonic()
    with scheduler("local", workers=1, device="cpu") as sched:
        assert sched.dashboard is None
        assert any("no dashboard" in r.getMessage() for r in caplog.records)
        _check_owner_only(sched, caplog)
    assert time.monotonic() - t0 < 90


@needs_proc
def test_gpu_style_cluster_is_tls_on_loopback_too(cluster_log, monkeypatch) -> None:
    """The one-worker-per-GPU branch (a SpecCluster), started here with a pretend GPU and the dashboard asked for."""
    import geoseg.engine.cluster as cluster

    monkeypatch.setattr(cluster, "visible_gpus", lambda: ("0",))
    monkeypatch.setenv("GEOSEG_DASHBOARD", "on")
    caplog = cluster_log
    with scheduler("local", device="auto") as sched:
        assert sched.gpus == ("0",) and sched.resources == {"GPU": 1}
        _check_owner_only(sched, caplog, http_off=False)
        if sched.dashboard:  # only with bokeh installed
            assert sched.dashboard.startswith("http://127.0.0.1:")


def test_dashboard_is_off_unless_asked_and_never_beyond_loopback() -> None:
    assert dashboard_address("") is None and dashboard_address("off") is None and dashboard_address("0") is None
    assert dashboard_address("on") == "127.0.0.1:0"
    assert dashboard_address("8788") == "127.0.0.1:8788"
    for bad in (":8787", "0.0.0.0:8787", "80", "70000", "yes please"):
        with pytest.raises(InputError, match="GEOSEG_DASHBOARD") as err:
            dashboard_address(bad)
        assert "\n" not in str(err.value)


def test_killed_worker_becomes_one_line_with_the_fix() -> None:
    import dask

    with pytest.raises(WorkerLostError) as err:  # raised where the block ends: Dask's KilledWorker, turned
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}), scheduler("local", workers=1, device="cpu"):
            dask.delayed(os._exit)(1, dask_key_name="geoseg-predict-" + "0" * 32 + "-0-0").compute()
    msg = str(err.value)
    assert isinstance(err.value, GeosegError) and isinstance(err.value, RuntimeError)
    assert "\n" not in msg and "chunk=" in msg and "tile=" in msg and "geoseg-predict" in msg and "0000" not in msg


def test_local_cli_cluster_records_a_tls_loopback_address(make_raster, torchscript_model, tmp_path) -> None:
    import json

    src = make_raster(40, 40, seed=3)
    out = tmp_path / "o"
    args = ("-o", str(out), "--tile", "32", "--halo", "4", "--scheduler", "local")
    proc = _geoseg("-v", "predict", str(src), "-m", str(torchscript_model), *args)
    assert proc.returncode == 0, proc.stderr
    address = json.loads((out / "run.json").read_text())["scheduler"]["address"]
    assert address.startswith("tls://127.0.0.1:")
    assert f"running on a local cluster of 1 worker(s) at {address} (TLS" in proc.stderr and "no dashboard" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------- scheduler addresses


@pytest.mark.parametrize(
    ("address", "needle"),
    [
        ("tcp://", "not a scheduler address"),
        ("inproc://x", "inproc:// is not supported"),
        ("tcp://[::1", "not a scheduler address"),
        ("tcp://127.0.0.1:99999", "port 1-65535"),
        ("tcp://host:http", "not a scheduler address"),
        ("ucx://10.0.0.1:8786", "ucx:// is not supported"),
        ("tls://127.0.0.1:8786", "DASK_DISTRIBUTED__COMM__TLS__CA_FILE"),
        ("tcp://a b:1", "not a scheduler address"),
        ("Local", "unknown scheduler"),
    ],
)
def test_malformed_scheduler_is_one_line(address, needle, make_raster, torchscript_model, tmp_path) -> None:
    src = make_raster(40, 40, seed=4)
    out = tmp_path / "o"
    proc = _geoseg("predict", str(src), "-m", str(torchscript_model), "-o", str(out), "--scheduler", address, timeout=60)
    line = _one_line_error(proc)
    assert line.startswith("geoseg: error:") and needle in line, line
    assert not out.exists() or not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, *(["o"] if out.exists() else [])])


def test_check_address_accepts_tcp_and_tls_forms() -> None:
    assert check_address("tcp://10.0.0.5:8786") == ("tcp", "10.0.0.5", 8786)
    assert check_address("tls://[::1]:9000") == ("tls", "::1", 9000)
    assert check_address("tcp://scheduler.local") == ("tcp", "scheduler.local", 8786)
    long = "tcp://" + "x" * 5000 + ":"
    with pytest.raises(InputError) as err:
        check_address(long)
    assert len(str(err.value)) < 400


# --------------------------------------------------------------------------------------------- clean stops


@pytest.fixture(scope="module")
def slow_job(tmp_path_factory) -> tuple[Path, Path]:
    """A raster and a deep net that take a minute or more on a small machine: always stopped mid-compute."""
    import torch

    from tests.conftest import conv_net, write_raster

    d = tmp_path_factory.mktemp("slow")
    src = write_raster(d / "big.tif", 2000, 2000, seed=1)
    model = d / "deep.pt"
    torch.jit.save(torch.jit.script(conv_net(depth=12)), str(model))
    return src, model


def _stop_mid_compute(slow_job, out: Path, signum: int, group: bool, scheduler: str = "local") -> subprocess.CompletedProcess:
    src, model = slow_job
    cmd = [sys.executable, "-m", "geoseg", "predict", str(src), "-m", str(model), "-o", str(out)]
    cmd += ["--tile", "128", "--chunk", "256", "--scheduler", scheduler]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        # compute has started once a chunk part is staged
        while not any(out.glob(".geoseg-*/**/*.tif")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        group_members = process_tree(proc.pid)
        assert len(group_members) >= (2 if scheduler == "local" else 1)  # geoseg (and its worker process)
        (os.killpg if group else os.kill)(proc.pid, signum)  # a terminal's Ctrl-C reaches the whole group
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.5)
    alive = [p for p in group_members if os.path.exists(f"/proc/{p}") and "Z" not in _state(p)]
    assert not alive, alive  # the workers are gone too
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@needs_proc
@pytest.mark.parametrize("scheduler", ["local", "auto"])  # worker processes; the default, a cluster in-process
def test_ctrl_c_during_compute_exits_130_with_one_line(slow_job, tmp_path, scheduler) -> None:
    out = tmp_path / "o"
    proc = _stop_mid_compute(slow_job, out, signal.SIGINT, group=True, scheduler=scheduler)
    assert _one_line_error(proc, 130) == "geoseg: interrupted (Ctrl-C)"
    assert "AllExit" not in proc.stderr and not (out / "mask.tif").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@needs_proc
def test_sigterm_during_compute_exits_143_with_one_line(slow_job, tmp_path) -> None:
    out = tmp_path / "o"
    proc = _stop_mid_compute(slow_job, out, signal.SIGTERM, group=False)
    assert _one_line_error(proc, 143) == "geoseg: stopped by SIGTERM"
    assert not (out / "mask.tif").exists()


# --------------------------------------------------------------------------------------------- bounded compute options


def _peak_rss_mib(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run geoseg in a child and return it with the peak resident memory of that child, in MiB."""
    code = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run([sys.executable, '-m', 'geoseg', *sys.argv[1:]], capture_output=True, text=True)\n"
        "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr)\n"
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(p.returncode)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    peak = int(proc.stdout.rsplit("PEAK", 1)[1]) / 1024
    proc.stdout = proc.stdout.rsplit("PEAK", 1)[0]
    return proc, peak


@pytest.mark.parametrize("tile", ["8192", "100000"])
def test_huge_tile_on_a_small_image_costs_little(tile, make_raster, torchscript_model, tmp_path) -> None:
    src = make_raster(40, 40, seed=5)
    out = tmp_path / "o"
    proc, peak = _peak_rss_mib("predict", str(src), "-m", str(torchscript_model), "-o", str(out), "--tile", tile,
                               "--scheduler", "threads")  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert (out / "mask.tif").exists()
    assert peak < 1500, peak  # the probe tile was 8192² (8 GiB) before


@pytest.mark.parametrize("threads", ["100000", "65"])
def test_absurd_thread_counts_are_one_line(threads, make_raster, torchscript_model, tmp_path, monkeypatch) -> None:
    src = make_raster(40, 40, seed=6)
    out = tmp_path / "o"
    if threads == "65" and (os.cpu_count() or 1) * 8 > 64:
        pytest.skip("65 threads is within the limit on this machine")
    proc = _geoseg("predict", str(src), "-m", str(torchscript_model), "-o", str(out), "--threads", threads)
    line = _one_line_error(proc)
    assert "--threads" in line and f"{threads} is more than" in line
    assert not out.exists()


def test_too_many_workers_is_one_line(make_raster, torchscript_model, tmp_path) -> None:
    src = make_raster(40, 40, seed=7)
    proc = _geoseg("predict", str(src), "-m", str(torchscript_model), "-o", str(tmp_path / "o"), "--workers", "100000")
    line = _one_line_error(proc)
    assert "--workers 100000: give 1 to" in line


def test_sizes_past_the_machine_are_refused_before_work(make_raster, torchscript_model, monkeypatch) -> None:
    """With the machine's memory taken as 32 MiB: tile, batch, chunk and task count each get a one-line error."""
    import geoseg.engine.plan as plan
    from geoseg.engine import predict

    src = make_raster(700, 700, seed=8)
    monkeypatch.setattr(plan, "_machine_memory", lambda: 32 * 2**20)
    common = {"halo": 8, "device": "cpu"}
    with scheduler("synchronous"):
        predict(src, torchscript_model, tile=128, **common)  # fits
        cases = [
            ({"tile": 512}, "tile=512: a forward pass of one tile of 512x512 px", "lower tile="),
            # 128 px tiles (112 px cores): 7 x 7 tiles per chunk, so a batch of 64 is 49 tiles
            ({"tile": 128, "batch_size": 64}, "tile=128: a forward pass of 49 tiles of 128x128 px", "batch_size="),
        ]
        for kw, needle, fix in cases:
            with pytest.raises(InputError) as err:
                predict(src, torchscript_model, **{**common, **kw})
            msg = str(err.value)
            assert "\n" not in msg and needle in msg and fix in msg and "0.0312 GiB" in msg, msg
        monkeypatch.setattr(plan, "_machine_memory", lambda: 8 * 2**20)
        with pytest.raises(InputError) as err:
            predict(src, torchscript_model, tile=64, chunk=4096, **common)
        assert "chunk=4096: one task holds 716x716 px" in str(err.value) and "lower chunk=" in str(err.value)
        monkeypatch.setattr(plan, "MAX_CHUNKS", 100)
        monkeypatch.setattr(plan, "_machine_memory", lambda: None)
        with pytest.raises(InputError) as err:
            predict(src, torchscript_model, tile=24, halo=4, chunk=1)
        assert "would be 1,936 tasks (at most 100); raise chunk=" in str(err.value)
