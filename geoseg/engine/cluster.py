"""Where the graph runs: a local Dask cluster, an existing scheduler, or in-process."""

from __future__ import annotations

import contextvars
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from geoseg.errors import InputError

__all__ = ["Scheduling", "scheduler", "visible_gpus"]

log = logging.getLogger(__name__)

_ACTIVE: contextvars.ContextVar[Scheduling | None] = contextvars.ContextVar("geoseg_scheduling", default=None)


def active_scheduling() -> Scheduling | None:
    """The :class:`Scheduling` of the innermost :func:`scheduler` block, if any."""
    return _ACTIVE.get()


@dataclass(frozen=True)
class Scheduling:
    """What :func:`scheduler` set up, for the engine and run.json."""

    kind: str
    address: str | None
    workers: int
    num_threads: int | None
    resources: dict[str, float] | None
    gpus: tuple[str, ...] = ()


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


@contextmanager
def scheduler(kind: str = "local", workers: int | None = None, device: str = "auto") -> Iterator[Scheduling]:
    """Run the enclosed Dask work on the chosen scheduler.

    Parameters
    ----------
    kind : str
        ``local`` (a local cluster of worker processes; the default), ``threads`` or
        ``synchronous`` (in-process, for debugging), or a scheduler address
        ``tcp://HOST:PORT`` of a running cluster.
    workers : int, optional
        Worker processes for ``local``. On CPU the default is one worker that uses every
        core (forward passes are serialised per process, so more workers only split the
        cores); with CUDA, one worker per visible GPU.
    device : str
        The device asked for; ``cuda``/``auto`` with GPUs present starts one worker per GPU,
        each seeing only its own GPU and holding a ``GPU`` resource of 1.

    Yields
    ------
    Scheduling
    """
    import dask

    cores = os.cpu_count() or 1
    if kind in ("threads", "synchronous"):
        with dask.config.set(scheduler=kind):
            yield from _activate(Scheduling(kind, None, 1, None, None))
        return
    if "://" in kind:
        from distributed import Client

        try:
            client = Client(kind, timeout="20s")
        except OSError as exc:
            raise InputError(
                f"no Dask scheduler answers at {kind} ({exc}); start one with `dask scheduler` or use --scheduler local"
            ) from exc
        with client:
            if not client.scheduler_info().get("workers"):
                try:
                    client.wait_for_workers(1, timeout=60)
                except (TimeoutError, OSError) as exc:
                    raise InputError(f"no Dask worker joined {kind} within 60 s; start one with `dask worker {kind}`") from exc
            yield from _activate(Scheduling(kind, kind, len(client.scheduler_info()["workers"]), None, None))
        return
    if kind != "local":
        raise InputError(f"unknown scheduler {kind!r}; use local, threads, synchronous or tcp://HOST:PORT")

    from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

    gpus = visible_gpus() if device in ("auto", "cuda") else ()
    worker_opts = {"silence_logs": logging.WARNING}
    if gpus:
        n = workers or len(gpus)
        per_gpu = max(1, cores // n)
        specs = {
            f"gpu-{k}": {
                "cls": Nanny,
                "options": {
                    "nthreads": 2,
                    "resources": {"GPU": 1},
                    "env": {"CUDA_VISIBLE_DEVICES": gpus[k % len(gpus)], "OMP_NUM_THREADS": str(per_gpu)},
                    **worker_opts,
                },
            }
            for k in range(n)
        }
        cluster = SpecCluster(
            workers=specs,
            scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0", "host": "127.0.0.1"}},
            silence_logs=logging.WARNING,
        )
        sched = Scheduling("local", None, n, per_gpu, {"GPU": 1}, gpus)
    else:
        n = workers or 1
        threads = max(1, cores // n)
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=max(2, threads),
            processes=True,
            dashboard_address=":0",  # a free port: never collides with another cluster's 8787
            host="127.0.0.1",
            silence_logs=logging.WARNING,
        )
        sched = Scheduling("local", None, n, threads, None)
    with cluster, Client(cluster) as client:
        sched = Scheduling(sched.kind, client.scheduler.address, sched.workers, sched.num_threads, sched.resources, sched.gpus)
        log.info("local Dask cluster at %s with %d worker(s)", sched.address, sched.workers)
        yield from _activate(sched)


def _activate(sched: Scheduling) -> Iterator[Scheduling]:
    token = _ACTIVE.set(sched)
    try:
        yield sched
    finally:
        _ACTIVE.reset(token)
