"""Where the graph runs: a local Dask cluster, an existing scheduler, or in-process.

:func:`scheduler` sets one up for the block it opens and says what it set up
(:class:`Scheduling`); ``auto`` sizes it to the job (:func:`auto_kind`: in-process threads
for a few chunks, a local cluster beyond). Who may connect to it, and how, is
:mod:`geoseg.engine.security`'s. Dask's own log lines go to the file named by
:data:`DASK_LOG_ENV` when it is set (the command line sets it unless ``-v``), in this
process and in the local cluster's worker processes (:func:`route_dask_logs`). A little over
400 lines: every kind of scheduler, how it is chosen, started (signals held, TLS, GPUs) and heard from, in one place.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any

from geoseg.engine.security import DASHBOARD_ENV, connect, dashboard_address, local_security
from geoseg.errors import GeosegError, InputError
from geoseg.io.remote import RedactFilter

__all__ = [
    "AUTO_MAX_CHUNKS",
    "DASK_LOG_ENV",
    "Scheduling",
    "WorkerLostError",
    "active_scheduling",
    "auto_kind",
    "route_dask_logs",
    "scheduler",
    "visible_gpus",
]

log = logging.getLogger(__name__)

_ACTIVE: contextvars.ContextVar[Scheduling | None] = contextvars.ContextVar("geoseg_scheduling", default=None)

#: most worker processes a local cluster may start per core (or one per GPU, when there are more GPUs)
WORKERS_PER_CORE = 4
#: ``auto``: jobs of at most this many chunks (of 2048 px a side by default: about 8 MP) run in-process, on
#: threads; starting a process cluster takes seconds, more than such a job's work
AUTO_MAX_CHUNKS = 2
#: Dask settings of the in-process cluster. Its scheduler and worker run on this process's event loop beside the
#: model's thread: the worker's profiler (a stack sample of every thread each 10 ms), the 20 ms event-loop tick and
#: the 100-500 ms monitors took GIL time from it, and work stealing has no second worker to steal for. Measured at
#: 4096² (OpenVINO, 3 interleaved runs): 9.5-10.2 s with Dask's defaults, 9.2-9.3 s with these (DESIGN.md).
INPROC_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.scheduler.work-stealing": False,
}
#: environment variable naming the file that Dask's own log lines (worker errors with their tracebacks,
#: nanny warnings) go to instead of stderr; inherited by the local cluster's worker processes
DASK_LOG_ENV = "GEOSEG_DASK_LOG"


class WorkerLostError(GeosegError, RuntimeError):
    """A Dask worker died every time it ran a task (usually out of memory)."""


@dataclass(frozen=True)
class Scheduling:
    """What :func:`scheduler` set up, for the engine and run.json."""

    kind: str
    address: str | None
    workers: int
    num_threads: int | None
    resources: dict[str, float] | None
    gpus: tuple[str, ...] = ()
    dashboard: str | None = None
    auto: bool = False  # chosen by ``auto`` from the job's size
    processes: bool = True  # a local cluster's workers are processes (False: threads of this process)

    def record(self) -> dict[str, Any]:
        """The ``scheduler`` entry of run.json: kind, address, workers, GPUs, whether ``auto`` chose it and, for a
        local cluster, whether its workers are processes.
        """
        out = {"kind": self.kind, "address": self.address, "workers": self.workers, "gpus": list(self.gpus), "auto": self.auto}
        if self.kind == "local":
            out["processes"] = self.processes
        return out

    def predict_options(self, device: str = "auto", num_threads: int | None = None) -> dict[str, Any]:
        """The keywords of :func:`geoseg.predict` that this scheduler decides.

        Parameters
        ----------
        device : str
            The device asked for: ``auto`` becomes ``cuda`` when the workers hold GPUs.
        num_threads : int, optional
            Model threads per worker asked for [the threads each worker was started with].

        Returns
        -------
        dict
            ``device``, ``num_threads`` and ``resources`` (the workers' ``GPU`` resource
            that predict tasks are annotated with, or None).
        """
        return {
            "device": "cuda" if self.gpus and device == "auto" else device,
            "num_threads": num_threads or self.num_threads,
            "resources": self.resources,
        }


def active_scheduling() -> Scheduling | None:
    """The :class:`Scheduling` of the innermost :func:`scheduler` block, if any."""
    return _ACTIVE.get()


def visible_gpus() -> tuple[str, ...]:
    """GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (indexes or UUIDs),
    found without importing torch: the variable itself, else ``nvidia-smi -L``.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        entries = []
        for x in (e.strip() for e in env.split(",")):
            if not x or x == "-1":
                break  # CUDA ignores everything after an invalid entry
            entries.append(x)
        return tuple(entries)
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ()
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(str(i) for i, _ in enumerate(x for x in out.splitlines() if x.startswith("GPU ")))


def dask_setup(worker: Any) -> None:
    """Preload of the local cluster's worker processes: Ctrl-C is for the geoseg process, not its workers.

    A terminal sends SIGINT to every process of the foreground group; the workers would
    abort their tasks with tracebacks while geoseg closes the cluster in order anyway, and
    tasks cancelled by that close would each log a warning.

    Parameters
    ----------
    worker : distributed.Worker
        The worker being started (unused).
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    route_dask_logs()  # a task's error is geoseg's one line; Dask's "Compute Failed" traceback goes to the file
    # tasks cancelled because the cluster closes (a stopped command) are not warnings
    logging.getLogger("distributed.worker.state_machine").addFilter(
        lambda record: "ended with CancelledError" not in record.getMessage()
    )


def route_dask_logs() -> str | None:
    """Send this process's ``distributed`` log records to the file :data:`DASK_LOG_ENV` names, not to stderr.

    Called where Dask runs: the local cluster's client (its scheduler and nannies live in
    this process) and each worker process (from :func:`dask_setup`). The file is created at
    the first record, so a run that logs nothing leaves none.

    Returns
    -------
    str or None
        The file, or None when the variable is not set (logs stay where Dask puts them).
    """
    path = os.environ.get(DASK_LOG_ENV)
    if not path:
        return None
    logger = logging.getLogger("distributed")
    if not any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in logger.handlers):
        for h in list(logger.handlers):
            if type(h) is logging.StreamHandler:  # Dask's own, to stderr
                logger.removeHandler(h)
        handler = logging.FileHandler(path, delay=True)
        handler.setLevel(logging.WARNING)  # what went wrong, not the start-up chatter
        handler.setFormatter(logging.Formatter("%(asctime)s pid %(process)d %(name)s %(levelname)s: %(message)s"))
        handler.addFilter(RedactFilter())  # a task's error may quote a signed URL: its token never reaches the file
        logger.addHandler(handler)
        logger.propagate = False
    return path


def auto_kind(chunks: int | None, gpus: tuple[str, ...] = (), workers: int | None = None) -> str:
    """What ``auto`` runs a job of ``chunks`` chunks on.

    ``threads`` (in-process, no cluster) up to :data:`AUTO_MAX_CHUNKS`; with GPUs or more than one
    worker asked for, ``local`` (worker processes: one per GPU, each seeing only its own); else
    ``inproc``: a local cluster whose one worker runs in this process. On one machine's CPU a
    worker process only adds costs (measured in DESIGN.md: its start, a second copy of the
    imports, every chunk's result crossing a socket), and forward passes are serialised per
    process anyway.

    Parameters
    ----------
    chunks : int or None
        The job's chunks (an estimate from the input's size and the chunk size); None when unknown.
    gpus : tuple of str
        GPUs the workers would use.
    workers : int, optional
        Workers asked for.

    Returns
    -------
    str
        ``threads``, ``inproc`` or ``local``.
    """
    if gpus or (workers or 1) > 1:
        return "local"
    return "threads" if chunks is not None and chunks <= AUTO_MAX_CHUNKS else "inproc"


def _killed_worker(exc: BaseException) -> WorkerLostError:
    key = getattr(exc, "task", "?")
    name = key[0] if isinstance(key, tuple) and key else key
    stage = re.sub(r"-[0-9a-f]{32}.*$", "", str(name))  # geoseg-predict-<token>-i-j -> geoseg-predict
    tries = getattr(exc, "allowed_failures", 0) + 1
    return WorkerLostError(
        f"a Dask worker died {tries} time{'s' * (tries > 1)} running {stage} (usually out of memory); "
        "lower chunk= or tile= (or batch_size=, workers=), or give the workers more memory"
    )


@contextmanager
def scheduler(
    kind: str = "local", workers: int | None = None, device: str = "auto", chunks: int | None = None
) -> Iterator[Scheduling]:
    """Run the enclosed Dask work on the chosen scheduler.

    Parameters
    ----------
    kind : str
        ``local`` (a local cluster of worker processes, only usable by this process; the
        default here, as a caller may not know the job's size yet), ``auto`` (in-process
        threads for a job of at most :data:`AUTO_MAX_CHUNKS` chunks, else ``local``; the
        commands' default), ``threads`` or ``synchronous`` (in-process), or the address
        ``tcp://HOST:PORT`` of a running cluster (``tls://HOST:PORT`` with certificates from
        the Dask config).
    workers : int, optional
        Worker processes for ``local``. On CPU the default is one worker that uses every
        core (forward passes are serialised per process, so more workers only split the
        cores); with CUDA, one worker per visible GPU. At most 4 per core (or one per GPU).
    device : str
        The device asked for; ``cuda``/``auto`` with GPUs present starts one worker per GPU,
        each seeing only its own GPU and holding a ``GPU`` resource of 1.
    chunks : int, optional
        The job's size in chunks, for ``auto`` (see :func:`auto_kind`; unknown: ``local``).
        The choice is logged at INFO and recorded in :class:`Scheduling` (``auto``).

    Yields
    ------
    Scheduling

    Raises
    ------
    InputError
        An unknown kind, a malformed address, no scheduler or worker answering, more
        workers than the machine can hold.
    WorkerLostError
        Inside the block: a task killed its worker every time it ran (Dask's ``KilledWorker``).

    Notes
    -----
    The local cluster talks TLS with a key pair made in memory for it, so other users of
    the machine cannot connect to it; everything listens on 127.0.0.1, and the Dask
    dashboard is off unless ``GEOSEG_DASHBOARD`` is ``on`` or a port.
    """
    import dask

    cores = os.cpu_count() or 1
    auto = kind == "auto"
    gpus = _check_workers(workers, device, cores) if kind in ("auto", "local") else ()
    if auto:
        kind = auto_kind(chunks, gpus, workers)
    size = f"{chunks} chunk{'s' * (chunks != 1)}" if chunks is not None else "job size unknown"
    if kind in ("threads", "synchronous"):
        if auto:
            log.info("%s, running in-process (threads; kind='local' starts a cluster)", size)
        import dask.local
        import dask.threaded

        # the scheduler's function, not its name: dask imports distributed to look up a name (0.2 s, 30 MiB)
        with dask.config.set(scheduler=dask.threaded.get if kind == "threads" else dask.local.get_sync):
            yield from _activate(Scheduling(kind, None, 1, None, None, auto=auto))
        return
    if "://" in kind:
        yield from _remote(kind)
        return
    if kind not in ("local", "inproc") or (kind == "inproc" and not auto):
        shown = kind if len(kind) <= 80 else kind[:77] + "..."
        raise InputError(f"unknown scheduler {shown!r}; use auto, local, threads, synchronous or tcp://HOST:PORT")
    yield from _local(workers, gpus, cores, size if auto else None, processes=not (auto and kind == "inproc"))


def _check_workers(workers: int | None, device: str, cores: int) -> tuple[str, ...]:
    """The GPUs a local cluster would use, after refusing a ``--workers`` this machine cannot hold."""
    gpus = visible_gpus() if device in ("auto", "cuda") else ()
    limit = max(WORKERS_PER_CORE * cores, len(gpus))
    if workers is not None and not 1 <= workers <= limit:
        raise InputError(
            f"workers={workers}: give 1 to {limit} ({WORKERS_PER_CORE} per core on this machine of {cores} core(s)"
            f"{', or one per GPU' if gpus else ''}); each worker is a process holding its own copy of the model"
        )
    return gpus


def _remote(kind: str) -> Iterator[Scheduling]:
    import distributed  # noqa: F401  (its import sets up its loggers: route them after)

    route_dask_logs()
    with connect(kind) as client:
        if not client.scheduler_info().get("workers"):
            try:
                client.wait_for_workers(1, timeout=60)
            except (TimeoutError, OSError) as exc:
                raise InputError(f"no Dask worker joined {kind} within 60 s; start one with `dask worker {kind}`") from exc
        n = len(client.scheduler_info()["workers"])
        yield from _guarded(Scheduling(kind, kind, n, None, None))


def _local(
    workers: int | None, gpus: tuple[str, ...], cores: int, auto_size: str | None, processes: bool = True
) -> Iterator[Scheduling]:
    """A local cluster for the block; ``auto_size`` is the job's size when ``auto`` chose it (for the log).

    ``processes=False``: one worker in this process, reached in memory (no TLS: no comm listens; Dask's HTTP servers
    serve no routes on 127.0.0.1).
    """
    from distributed import Client

    route_dask_logs()
    security = local_security() if processes else None
    dashboard = dashboard_address()
    with ExitStack() as stack:
        held = stack.enter_context(_held_signals())
        cluster, sched = _start_local(workers, gpus, cores, security, dashboard, processes)
        stack.enter_context(cluster)
        client = stack.enter_context(Client(cluster))
        held.release()  # a stop signal that came while the cluster started is acted on now, inside the `with`
        link, where = _dashboard_link(client, dashboard)
        sched = replace(sched, address=client.scheduler.address, dashboard=link, auto=auto_size is not None)
        doing = f"{auto_size}, running" if auto_size else "running"
        if processes:
            how = f"of {sched.workers} worker(s) at {sched.address} (TLS, this process only)"
        else:
            how = "in this process (one worker, reached in memory; kind='local' starts worker processes)"
        log.info("%s on a local cluster %s; %s", doing, how, where)
        yield from _guarded(sched)


def _start_local(
    workers: int | None, gpus: tuple[str, ...], cores: int, security: Any, dashboard: str | None, processes: bool = True
) -> tuple[Any, Scheduling]:
    """Start the local cluster: one worker per GPU (each seeing only its own), else ``workers`` CPU workers."""
    import dask

    # Dask starts an HTTP server on every scheduler and worker even without a dashboard; with
    # no routes it serves nothing (not the scheduler's logs, not metrics)
    quiet_http = {} if dashboard else {"distributed.scheduler.http.routes": [], "distributed.worker.http.routes": []}
    http = {"dashboard": dashboard is not None, "dashboard_address": dashboard or "127.0.0.1:0"}
    worker_opts: dict[str, Any] = {"silence_logs": logging.WARNING, "preload": [__name__]}  # see dask_setup
    with dask.config.set(quiet_http):
        if gpus:
            return _gpu_cluster(workers or len(gpus), gpus, cores, security, http, worker_opts)
        if not processes:
            return _inproc_cluster(cores, dashboard, http)
        return _cpu_cluster(workers or 1, cores, security, dashboard, http, worker_opts)


def _gpu_cluster(
    n: int, gpus: tuple[str, ...], cores: int, security: Any, http: dict, worker_opts: dict
) -> tuple[Any, Scheduling]:
    """One worker per GPU, each seeing only its own (``CUDA_VISIBLE_DEVICES``) and holding a ``GPU`` resource."""
    from distributed import Nanny, Scheduler, SpecCluster

    per_gpu = max(1, cores // n)
    specs = {
        f"gpu-{k}": {
            "cls": Nanny,
            "options": {
                "nthreads": 2,
                "resources": {"GPU": 1},
                "env": {"CUDA_VISIBLE_DEVICES": gpus[k % len(gpus)], "OMP_NUM_THREADS": str(per_gpu)},
                "host": "127.0.0.1",
                "protocol": "tls://",
                "security": security,
                "dashboard": False,
                **worker_opts,
            },
        }
        for k in range(n)
    }
    scheduler_opts = {"host": "127.0.0.1", "protocol": "tls://", "security": security, **http}
    cluster = SpecCluster(
        workers=specs,
        scheduler={"cls": Scheduler, "options": scheduler_opts},
        security=security,
        silence_logs=logging.WARNING,
    )
    return cluster, Scheduling("local", None, n, per_gpu, {"GPU": 1}, gpus)


def _cpu_cluster(
    n: int, cores: int, security: Any, dashboard: str | None, http: dict, worker_opts: dict
) -> tuple[Any, Scheduling]:
    """``n`` CPU workers sharing the cores (at least two threads each: reads and writes go on beside the model's)."""
    from distributed import LocalCluster

    per_worker = max(1, cores // n)
    cluster = LocalCluster(
        n_workers=n,
        threads_per_worker=max(2, per_worker),
        processes=True,
        host="127.0.0.1",
        protocol="tls://",
        security=security,
        dashboard_address=dashboard,
        scheduler_kwargs=http,  # a free port: never 8787, which another cluster may hold
        **worker_opts,
    )
    return cluster, Scheduling("local", None, n, per_worker, None)


def _inproc_cluster(cores: int, dashboard: str | None, http: dict) -> tuple[Any, Scheduling]:
    """One worker thread pool in this process, on Dask's in-memory transport (``inproc://``).

    Dask still starts an HTTP server for the scheduler and the worker: on 127.0.0.1, with no
    routes unless the dashboard was asked for. Its housekeeping shares the process (and the GIL)
    with the model's thread, so it is quietened (:data:`INPROC_CONFIG`).
    """
    import dask
    from distributed import LocalCluster

    with dask.config.set(INPROC_CONFIG):
        cluster = LocalCluster(
            n_workers=1,
            threads_per_worker=max(2, cores),
            processes=False,
            dashboard_address=dashboard,
            worker_dashboard_address="127.0.0.1:0",
            scheduler_kwargs=http,
            silence_logs=logging.WARNING,
        )
    return cluster, Scheduling("local", None, 1, cores, None, processes=False)


def _dashboard_link(client: Any, dashboard: str | None) -> tuple[str | None, str]:
    """The dashboard's URL (None when there is none) and a few words on it for the log."""
    import importlib.util

    if dashboard is None:
        return None, f"no dashboard ({DASHBOARD_ENV}=on for one on 127.0.0.1)"
    if importlib.util.find_spec("bokeh") is None:
        return None, "no dashboard (it needs bokeh: pip install bokeh)"
    port = client.scheduler_info().get("services", {}).get("dashboard")
    link = f"http://127.0.0.1:{port}/status" if port else None
    return link, f"dashboard {link} (any local user can view it)" if link else "no dashboard (it did not start)"


class _HeldSignals:
    """Stop signals held back while a local cluster starts; see :func:`_held_signals`."""

    HELD = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.held: list[int] = []
        self.previous: dict[int, Any] = {}

    def hold(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, *self.HELD):
            handler = signal.getsignal(s)
            if handler in (signal.SIG_IGN, None):  # ignored (nohup) or not Python's to change
                continue
            if s == signal.SIGINT:
                # ignored, not caught: the worker processes started now inherit SIG_IGN, so a terminal's Ctrl-C
                # (sent to the whole foreground group) reaches only this process, which closes them in order
                self.previous[s] = signal.signal(s, signal.SIG_IGN)
            else:
                self.previous[s] = signal.signal(s, lambda signum, _frame: self.held.append(signum))

    def release(self, act: bool = True) -> None:
        previous, self.previous = self.previous, {}
        for s, handler in previous.items():
            signal.signal(s, handler)
        if act and self.held:
            signal.raise_signal(self.held[0])


@contextmanager
def _held_signals() -> Iterator[_HeldSignals]:
    """Hold stop signals back while the block starts a local cluster; ``release()`` acts on them.

    A signal in the middle of ``LocalCluster()`` leaves a half-started cluster that Dask
    cannot close (an ``AssertionError`` traceback at exit) and workers interrupted while
    importing. SIGTERM and SIGHUP are held and raised again once the cluster and its client
    are entered (they then close in order); Ctrl-C is ignored for the second or so the
    workers take to start (so that they ignore it too). Only in the main thread.
    """
    held = _HeldSignals()
    held.hold()
    try:
        yield held
    finally:
        held.release(act=False)


def _guarded(sched: Scheduling) -> Iterator[Scheduling]:
    """:func:`_activate`, with Dask's ``KilledWorker`` from the block turned into a one-line :class:`WorkerLostError`."""
    from distributed.scheduler import KilledWorker

    try:
        yield from _activate(sched)
    except KilledWorker as exc:
        raise _killed_worker(exc) from None


def _activate(sched: Scheduling) -> Iterator[Scheduling]:
    token = _ACTIVE.set(sched)
    try:
        yield sched
    finally:
        _ACTIVE.reset(token)
