"""``geoseg schedule``: run a workflow on its cron ``schedule:``, one run at a time.

The scheduler is a plain long-running loop (no daemon, no database): it waits for the next
fire time of the workflow's cron expression, launches ``geoseg run WORKFLOW`` in a child
process, and records every run in ``<output folder>/schedule.log`` (one JSON object a line).
Cron times are read in the clock's time zone: UTC by default.

* Runs never overlap. Fire times that pass while a run is still going (or while the
  machine was asleep) are not caught up: they are logged as ``skipped`` with a count, and
  the next fire is computed from the clock once the run has ended.
* The clock is re-read at least once a minute while waiting, so a clock that is changed
  (NTP step, daylight saving in a local clock, suspend and resume) is noticed.
* One scheduler per output folder: an exclusive ``flock`` on
  ``<output folder>/.geoseg-schedule.lock`` is held for the whole loop and released by the
  OS if the process dies. A second scheduler on the same folder is refused at once.
* A failing run (non-zero exit code) is logged and the loop goes on; Ctrl-C stops it cleanly.
* Each run is a child process in its own process group: Ctrl-C in the terminal or a SIGTERM
  (``systemctl stop``; through the ``geoseg`` command) reaches the scheduler, which passes the
  signal on to the run, waits up to :data:`STOP_GRACE_S` for it to close its cluster, then
  kills whatever is left of the group, logs the run as ``interrupted`` and stops.
* The cron expression has the five standard fields (or ``@daily`` and the like) and must fire
  at some time: ``0 0 30 2 *`` (30 February) is refused before anything starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from geoseg.errors import InputError, OutputError
from geoseg.io.outdir import hold_lock_file
from geoseg.workflows.spec import Workflow, check_cron, load_workflow

__all__ = ["LOCK_NAME", "LOG_NAME", "next_fire", "run_child", "schedule", "schedule_lock"]

LOCK_NAME = ".geoseg-schedule.lock"
LOG_NAME = "schedule.log"
MAX_SLEEP_S = 60.0  # longest single sleep: the clock is re-read at least this often
STOP_GRACE_S = 60.0  # how long a stopped run may take to close its cluster before its process group is killed


def _cron_line(path: str) -> str:
    """``path:LINE`` of the top-level ``schedule:`` key of a workflow file (``path`` when not found)."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if re.match(r"schedule\s*:", line):
                    return f"{path}:{n}"
    except (OSError, UnicodeDecodeError):
        pass
    return path


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def next_fire(cron: str, after: datetime) -> datetime:
    """The first fire time of ``cron`` strictly after ``after``.

    Parameters
    ----------
    cron : str
        A cron expression (minute hour day month weekday), e.g. ``"0 6 * * 1"``.
    after : datetime
        The reference time; its time zone (or lack of one) is kept in the result.

    Returns
    -------
    datetime
        The next fire time, always later than ``after``.

    Raises
    ------
    InputError
        ``cron`` is not a five-field cron expression, or never fires.
    """
    from croniter import croniter

    try:
        check_cron(cron)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return croniter(cron, after).get_next(datetime)


def _fires_through(cron: str, after: datetime, until: datetime) -> tuple[int, datetime | None, datetime | None]:
    """How many fire times lie in ``(after, until]``, with the first and the last of them."""
    from croniter import croniter

    it = croniter(cron, after)
    count, first, last = 0, None, None
    while (t := it.get_next(datetime)) <= until:
        count, last = count + 1, t
        first = first or t
    return count, first, last


def _previous_fire(cron: str, before: datetime) -> datetime:
    """The last fire time of ``cron`` strictly before ``before``."""
    from croniter import croniter

    return croniter(cron, before).get_prev(datetime)


@contextmanager
def schedule_lock(folder: str) -> Iterator[str]:
    """Hold the exclusive scheduler lock of an output folder for the ``with`` block.

    Parameters
    ----------
    folder : str
        The output folder (created when missing).

    Yields
    ------
    str
        The lock file, ``<folder>/.geoseg-schedule.lock`` (left in place afterwards; the
        lock itself is released when the block ends or the process dies).

    Raises
    ------
    OutputError
        Another scheduler holds the lock, or the folder or lock file cannot be created.
    """
    import socket

    with hold_lock_file(
        folder,
        LOCK_NAME,
        "scheduler lock",
        f"pid {os.getpid()} on {socket.gethostname()}\n",
        lambda holder: (
            f"{folder}: another geoseg schedule is already running on this output folder"
            f"{f' ({holder})' if holder else ''}; stop it first or give this one another out="
        ),
    ) as path:
        yield path


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds")


def _append(log: str, record: dict[str, Any]) -> None:
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise OutputError(
            f"{log}: cannot append to the schedule log ({exc.strerror}); check free space and permissions"
        ) from None


def _signum(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt (the geoseg command raises one for SIGTERM too)."""
    return int(getattr(exc, "signum", signal.SIGINT))


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the child has exited, without reaping it where possible (its process group id stays reserved)."""
    if not hasattr(os, "waitid"):  # pragma: no cover (no waitid: reaps, so a group kill after it is best effort)
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_child(cmd: list[str], grace: float = STOP_GRACE_S) -> int:
    """Run ``cmd`` in its own process group and return its exit code; stop it with the signal that stops us.

    Parameters
    ----------
    cmd : list of str
        The command (``geoseg run WORKFLOW``).
    grace : float
        Seconds a stopped child may take to exit before its whole process group is killed.

    Returns
    -------
    int
        The child's exit code (negative: killed by that signal).

    Raises
    ------
    KeyboardInterrupt
        A stop signal arrived while the child ran: the child got the same signal (SIGINT
        or SIGTERM), then SIGKILL for its whole group after ``grace`` seconds. The
        exception carries the child's exit code as ``child_exit_code``.

    Notes
    -----
    In its own group the child (and the Dask workers it starts) does not receive a
    terminal's Ctrl-C directly; this process passes the signal on, once. Whatever is left of
    the group when the child has exited (workers of a child that was killed) is killed too.
    """
    proc = subprocess.Popen(cmd, start_new_session=os.name == "posix")
    try:
        try:
            if hasattr(os, "waitid"):
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # interrupted by a stop signal
            else:  # pragma: no cover (no waitid: macOS before Python 3.13)
                proc.wait()
        except KeyboardInterrupt as exc:
            signum = _signum(exc)
            try:
                proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace
            while not _exited(proc) and time.monotonic() < deadline:
                time.sleep(0.1)
            if os.name == "posix":
                _kill_group(proc.pid)
            exc.child_exit_code = proc.wait()  # type: ignore[attr-defined]
            raise
    finally:
        if os.name == "posix" and proc.returncode is None:
            _kill_group(proc.pid)  # the child is a zombie now: its group id cannot be reused yet
    return proc.wait()


def schedule(
    workflow: str,
    out: str | None = None,
    *,
    run: Callable[[], int] | None = None,
    now: Callable[[], datetime] = _utcnow,
    sleep: Callable[[float], None] = time.sleep,
    max_runs: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run a workflow on its cron ``schedule:`` until stopped (or for ``max_runs`` runs).

    Parameters
    ----------
    workflow : str
        The workflow YAML file; it must have a ``schedule:`` key.
    out : str, optional
        Output folder passed on to every run as ``--out`` [the workflow's
        ``outputs.folder``]. The lock and ``schedule.log`` are kept there.
    run : callable, optional
        Does one run and returns its exit code [``python -m geoseg run WORKFLOW [--out OUT]``
        in a child process].
    now : callable, optional
        The clock [UTC now]; cron times are read in its time zone.
    sleep : callable, optional
        Waits a number of seconds [``time.sleep``]; called with at most 60 s at a time.
    max_runs : int, optional
        Stop after this many runs [never].
    echo : callable, optional
        Receives one short line per event (start, run, skip, stop).

    Returns
    -------
    list of dict
        The records appended to ``schedule.log``: ``event`` (``"run"`` or ``"skipped"``),
        ``scheduled``, ``started``, ``finished`` (ISO times), ``exit_code``, ``seconds``;
        skipped records also have ``count`` and ``last`` (several missed fire times share
        one record), and ``reason``; a run stopped by a signal has ``interrupted`` and
        ``signal`` (``SIGINT``/``SIGTERM``), its ``exit_code`` that of the stopped child.

    Raises
    ------
    InputError
        The workflow is invalid, has no ``schedule:`` or one that is not five cron fields or
        never fires; ``max_runs`` is below 1.
    OutputError
        Another scheduler holds this output folder, or the folder or log is not writable.
    """
    wf = _scheduled_workflow(workflow, out, max_runs)
    cron = wf.schedule
    folder = os.path.abspath(out) if out else wf.outputs.folder
    cmd = [sys.executable, "-m", "geoseg", "run", wf.path] + (["--out", folder] if out else [])
    one_run = run or (lambda: run_child(cmd))
    log = _Log(os.path.join(folder, LOG_NAME), echo or (lambda _msg: None))

    runs = 0
    with schedule_lock(folder):
        due = next_fire(cron, now())
        log.say(f"scheduling {wf.name} ({cron}): first run {_iso(due)}; log {log.path}; Ctrl-C stops")
        try:
            while max_runs is None or runs < max_runs:
                due, t = _wait_for(cron, due, now, sleep)
                # woken late (suspend, clock stepped forward): run the latest missed fire, skip the older ones
                count, _, latest = _fires_through(cron, due, t)
                if count and latest is not None:
                    log.skipped(count, due, _previous_fire(cron, latest), "the scheduler was not running then")
                    due = latest
                finished = _run_once(one_run, due, runs + 1, max_runs, now, log)
                runs += 1
                count, first, last = _fires_through(cron, due, finished)
                if count and first is not None and last is not None:
                    log.skipped(count, first, last, "the previous run was still going")
                due = next_fire(cron, finished)
                if max_runs is None or runs < max_runs:
                    log.say(f"next run {_iso(due)}")
        except KeyboardInterrupt as exc:
            log.say(f"stopped by {signal.Signals(_signum(exc)).name} after {runs} finished run{'s' * (runs != 1)}")
    return log.records


def _scheduled_workflow(workflow: str, out: str | None, max_runs: int | None) -> Workflow:
    """The workflow, checked to have a cron ``schedule:`` that fires; ``max_runs`` checked too."""
    wf = load_workflow(workflow, out=out)
    if wf.schedule is None:
        raise InputError(
            f"{wf.path}: no 'schedule:' key; add a cron expression such as schedule: \"0 6 * * *\" (daily at 06:00), "
            "or use geoseg run for a single run"
        )
    try:
        check_cron(wf.schedule)
    except ValueError as exc:
        raise InputError(f"{_cron_line(workflow)}: schedule: {exc}") from None
    if max_runs is not None and max_runs < 1:
        raise InputError(f"max_runs is {max_runs}; give 1 or more, or leave it out to run until stopped")
    return wf


class _Log:
    """``schedule.log``, the records appended to it in this session, and the echo of each event."""

    def __init__(self, path: str, say: Callable[[str], None]) -> None:
        self.path = path
        self.say = say
        self.records: list[dict[str, Any]] = []

    def record(self, rec: dict[str, Any]) -> None:
        _append(self.path, rec)
        self.records.append(rec)

    def skipped(self, count: int, first: datetime, last: datetime, reason: str) -> None:
        rec = {"event": "skipped", "scheduled": _iso(first), "started": None, "finished": None, "exit_code": None}
        self.record({**rec, "seconds": None, "count": count, "last": _iso(last), "reason": reason})
        span = f"{_iso(first)} to {_iso(last)}" if count > 1 else _iso(first)
        self.say(f"skipped {count} run{'s' * (count > 1)} due {span} ({reason})")


def _wait_for(cron: str, due: datetime, now: Callable[[], datetime], sleep: Callable[[float], None]) -> tuple[datetime, datetime]:
    """Sleep until ``due`` (or an earlier fire, when the clock went back); the fire time and the clock's time then."""
    while (t := now()) < due:
        earlier = next_fire(cron, t)
        if earlier < due:  # the clock went back: an earlier fire is now the next one
            due = earlier
        sleep(min(MAX_SLEEP_S, (due - t).total_seconds()))
    return due, t


def _run_once(
    one_run: Callable[[], int],
    due: datetime,
    number: int,
    max_runs: int | None,
    now: Callable[[], datetime],
    log: _Log,
) -> datetime:
    """Do run ``number`` (due at ``due``), log it, and return when it finished; a stop signal is logged and re-raised."""
    started = now()
    rec: dict[str, Any] = {"event": "run", "scheduled": _iso(due), "started": _iso(started)}
    log.say(f"run {number}{f'/{max_runs}' if max_runs else ''} (due {_iso(due)}) started {_iso(started)}")
    try:
        code: int | None = one_run()
    except KeyboardInterrupt as exc:
        finished = now()
        code = getattr(exc, "child_exit_code", None)
        rec.update(finished=_iso(finished), exit_code=code, seconds=round((finished - started).total_seconds(), 3))
        log.record({**rec, "interrupted": True, "signal": signal.Signals(_signum(exc)).name})
        log.say(f"run {number} stopped by {signal.Signals(_signum(exc)).name} (exit code {code})")
        raise
    except Exception as exc:  # a launcher failure (e.g. no memory to fork) must not end the schedule
        code = None
        rec["error"] = f"{type(exc).__name__}: {exc}"
    finished = now()
    seconds = (finished - started).total_seconds()
    log.record({**rec, "finished": _iso(finished), "exit_code": code, "seconds": round(seconds, 3)})
    status = "ok" if code == 0 else f"FAILED ({rec.get('error') or f'exit code {code}'})"
    log.say(f"run {number} {status} in {seconds:.1f} s")
    return finished
