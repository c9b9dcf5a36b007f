"""geoseg schedule: cron fire times, no overlapping runs, skipped fires logged, one scheduler per folder."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from geoseg.cli import main
from geoseg.errors import InputError, OutputError
from geoseg.workflows.schedule import LOCK_NAME, LOG_NAME, next_fire, schedule, schedule_lock
from geoseg.workflows.spec import check_cron

WORKFLOW = """name: t
imagery: [scene.tif]
models: [forest]
outputs: {folder: out}
schedule: "* * * * *"
"""

T0 = datetime(2024, 5, 1, 12, 0, 30, tzinfo=timezone.utc)


class FakeClock:
    """A clock that only moves when slept on (or when a fake run takes time)."""

    def __init__(self, start: datetime) -> None:
        self.t = start
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert 0 < seconds <= 60, seconds
        self.sleeps.append(seconds)
        self.t += timedelta(seconds=seconds)


class FakeRun:
    """Records when it was called and advances the clock by each run's duration."""

    def __init__(self, clock: FakeClock, seconds: float | list[float] = 5.0, codes: list[int] | None = None) -> None:
        self.clock, self.seconds, self.codes = clock, seconds, codes
        self.calls: list[tuple[datetime, datetime]] = []

    def __call__(self) -> int:
        i = len(self.calls)
        start = self.clock.t
        took = self.seconds[i] if isinstance(self.seconds, list) else self.seconds
        self.clock.t += timedelta(seconds=took)
        self.calls.append((start, self.clock.t))
        return self.codes[i] if self.codes else 0


def _workflow(tmp_path: Path, text: str = WORKFLOW) -> Path:
    f = tmp_path / "wf.yaml"
    f.write_text(text)
    return f


def _log(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / LOG_NAME).read_text().splitlines()]


def _at(minute: int, second: int = 0) -> datetime:
    return datetime(2024, 5, 1, 12, minute, second, tzinfo=timezone.utc)


def test_next_fire_is_strictly_after() -> None:
    assert next_fire("* * * * *", T0) == _at(1)
    assert next_fire("* * * * *", _at(1)) == _at(2)  # exactly on a fire time: the next one
    assert next_fire("0 6 * * 1", T0) == datetime(2024, 5, 6, 6, 0, tzinfo=timezone.utc)  # a Monday
    with pytest.raises(InputError, match="not a cron expression"):
        next_fire("every minute", T0)


def test_runs_fire_on_the_whole_minute(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    run = FakeRun(clock, seconds=5)
    lines: list[str] = []
    records = schedule(str(_workflow(tmp_path)), run=run, now=clock.now, sleep=clock.sleep, max_runs=3, echo=lines.append)
    assert [start for start, _ in run.calls] == [_at(1), _at(2), _at(3)]
    assert [r["event"] for r in records] == ["run"] * 3
    assert [r["scheduled"] for r in records] == [_at(m).isoformat() for m in (1, 2, 3)]
    assert records[0]["started"] == _at(1).isoformat() and records[0]["finished"] == _at(1, 5).isoformat()
    assert all(r["exit_code"] == 0 and r["seconds"] == 5 for r in records)
    assert _log(tmp_path) == records  # every record is in schedule.log, one JSON object a line
    assert max(clock.sleeps) <= 60 and lines and all("\n" not in line for line in lines)
    assert (tmp_path / "out" / LOCK_NAME).exists()


def test_long_run_skips_the_fires_it_overlaps(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    run = FakeRun(clock, seconds=[150, 5])
    records = schedule(str(_workflow(tmp_path)), run=run, now=clock.now, sleep=clock.sleep, max_runs=2)
    # the first run goes 12:01:00 -> 12:03:30; 12:02 and 12:03 pass meanwhile and are not run
    assert [start for start, _ in run.calls] == [_at(1), _at(4)]
    assert all(prev_end <= start for (_, prev_end), (start, _) in zip(run.calls, run.calls[1:], strict=False))  # no overlap
    assert [r["event"] for r in records] == ["run", "skipped", "run"]
    skip = records[1]
    assert skip["count"] == 2 and skip["scheduled"] == _at(2).isoformat() and skip["last"] == _at(3).isoformat()
    assert skip["exit_code"] is None and skip["started"] is None
    assert _log(tmp_path) == records


def test_long_wait_is_slept_in_steps_and_clock_changes_are_noticed(tmp_path: Path) -> None:
    wf = _workflow(tmp_path, WORKFLOW.replace("* * * * *", "0 13 * * *"))
    clock = FakeClock(T0)
    run = FakeRun(clock)
    schedule(str(wf), run=run, now=clock.now, sleep=clock.sleep, max_runs=1)
    assert run.calls[0][0] == datetime(2024, 5, 1, 13, tzinfo=timezone.utc)
    assert len(clock.sleeps) == 60 and max(clock.sleeps) == 60  # 59.5 min in steps of at most 60 s

    # the clock jumps two days forward while waiting: the latest missed fire runs at once, the older one is skipped
    clock = FakeClock(T0)
    jumps = [timedelta(days=2)]

    def sleep(s: float) -> None:
        clock.t += jumps.pop() if jumps else timedelta(seconds=s)

    run = FakeRun(clock)
    records = schedule(str(wf), run=run, now=clock.now, sleep=sleep, max_runs=1)
    assert run.calls[0][0] == T0 + timedelta(days=2)  # at once, not at the next 13:00
    assert [r["event"] for r in records] == ["skipped", "run"]
    assert records[1]["scheduled"] == datetime(2024, 5, 2, 13, tzinfo=timezone.utc).isoformat()
    assert records[0]["count"] == 1 and records[0]["scheduled"] == datetime(2024, 5, 1, 13, tzinfo=timezone.utc).isoformat()

    # the clock is set back an hour while waiting: an hourly fire that is now sooner is not waited past
    hourly = _workflow(tmp_path, WORKFLOW.replace("* * * * *", "0 * * * *"))
    clock = FakeClock(_at(30))
    jumps = [-timedelta(hours=1)]
    run = FakeRun(clock)
    schedule(str(hourly), run=run, now=clock.now, sleep=sleep, max_runs=1)
    assert run.calls[0][0] == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)  # 11:30 -> 12:00, not 13:00


def test_failed_run_is_logged_and_the_loop_goes_on(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    run = FakeRun(clock, seconds=2, codes=[3, 0])
    lines: list[str] = []
    records = schedule(str(_workflow(tmp_path)), run=run, now=clock.now, sleep=clock.sleep, max_runs=2, echo=lines.append)
    assert [r["exit_code"] for r in records] == [3, 0] and len(run.calls) == 2
    assert [r["exit_code"] for r in _log(tmp_path)] == [3, 0]
    assert any("exit code 3" in line for line in lines)


def test_keyboard_interrupt_stops_cleanly(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    run = FakeRun(clock)

    def sleep(s: float) -> None:
        if len(run.calls) == 1:
            raise KeyboardInterrupt
        clock.sleep(s)

    records = schedule(str(_workflow(tmp_path)), run=run, now=clock.now, sleep=sleep)
    assert len(records) == 1 and records[0]["exit_code"] == 0
    with schedule_lock(str(tmp_path / "out")):  # the lock was released
        pass


def test_second_scheduler_on_the_folder_is_refused(tmp_path: Path) -> None:
    wf = str(_workflow(tmp_path))
    held, release = threading.Event(), threading.Event()

    def first() -> None:
        with schedule_lock(str(tmp_path / "out")):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert held.wait(5)
        clock = FakeClock(T0)
        run = FakeRun(clock)
        with pytest.raises(OutputError) as err:
            schedule(wf, run=run, now=clock.now, sleep=clock.sleep, max_runs=1)
        msg = str(err.value)
        assert "\n" not in msg and str(tmp_path / "out") in msg and "another geoseg schedule" in msg and "out=" in msg
        assert not run.calls
        # through the CLI: one line on stderr, exit status 1
        result = CliRunner().invoke(main, ["schedule", wf, "--max-runs", "1"])
        assert result.exit_code == 1 and "another geoseg schedule" in result.output
    finally:
        release.set()
        thread.join()
    # another output folder is fine while the first is held; the same folder is free once released
    clock = FakeClock(T0)
    assert schedule(wf, str(tmp_path / "other"), run=FakeRun(clock), now=clock.now, sleep=clock.sleep, max_runs=1)
    assert (tmp_path / "other" / LOG_NAME).exists()
    with schedule_lock(str(tmp_path / "out")):
        pass


def test_workflow_without_schedule_is_refused(tmp_path: Path) -> None:
    wf = _workflow(tmp_path, WORKFLOW.replace('schedule: "* * * * *"\n', ""))
    with pytest.raises(InputError, match="schedule") as err:
        schedule(str(wf), run=lambda: 0, max_runs=1)
    assert str(wf) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before any lock or log is made


def test_invalid_cron_names_the_line(tmp_path: Path) -> None:
    wf = _workflow(tmp_path, WORKFLOW.replace("* * * * *", "61 * * * *"))
    with pytest.raises(InputError) as err:
        schedule(str(wf), run=lambda: 0, max_runs=1)
    msg = str(err.value)
    assert f"{wf}:5:" in msg and "schedule" in msg and "\n" not in msg


def test_max_runs_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="max_runs"):
        schedule(str(_workflow(tmp_path)), run=lambda: 0, max_runs=0)


def test_default_clock_and_sleep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real UTC clock and time.sleep (about 0.6 s): cron's finest step is a minute, so fires are 0.3 s apart here."""
    import geoseg.workflows.schedule as sched

    monkeypatch.setattr(sched, "next_fire", lambda cron, after: after + timedelta(seconds=0.3))
    monkeypatch.setattr(sched, "_fires_through", lambda cron, after, until: (0, None, None))
    calls: list[datetime] = []
    records = schedule(str(_workflow(tmp_path)), run=lambda: calls.append(datetime.now(timezone.utc)) or 0, max_runs=2)
    assert len(calls) == 2 and calls[1] - calls[0] >= timedelta(seconds=0.29)
    assert [r["event"] for r in records] == ["run", "run"] and records[0]["started"].endswith("+00:00")


# ------------------------------------------------------------------- cron that cannot work (issue 14)


@pytest.mark.parametrize(
    ("cron", "needle"),
    [
        ("0 0 30 2 *", "never fires"),  # 30 February
        ("0 0 31 4,6 *", "never fires"),
        ("* * * * * *", "five fields (it has 6)"),  # croniter would read the sixth as seconds
        ("0 6 * * 1 2030", "not a cron expression"),
        ("@reboot", "not a cron expression"),
    ],
)
def test_cron_that_cannot_work_is_refused_at_validation(cron: str, needle: str, tmp_path: Path) -> None:
    wf = _workflow(tmp_path, WORKFLOW.replace("* * * * *", cron))
    with pytest.raises(InputError) as err:
        schedule(str(wf), run=lambda: 0, max_runs=1)
    msg = str(err.value)
    assert msg.startswith(f"{wf}:5: schedule: ") and needle in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()  # refused before any lock or log
    result = CliRunner().invoke(main, ["schedule", str(wf), "--max-runs", "1"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and needle in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_rare_but_real_cron_is_accepted(tmp_path: Path) -> None:
    assert check_cron("0 0 29 2 *") == "0 0 29 2 *"  # leap days
    assert check_cron("@daily") == "@daily" and check_cron(" 0 6 * * 1 ") == " 0 6 * * 1 "
    assert next_fire("0 0 29 2 *", T0) == datetime(2028, 2, 29, tzinfo=timezone.utc)


# ------------------------------------------------------------------- stopping the child run (issue 14)

CHILD = """
import os, signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # a Dask worker stand-in
mode = sys.argv[2]
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
else:
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: sys.exit(128 + signum))  # leaves its worker behind
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {worker.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(0 if mode == "quick" else 300)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _signal_main_when(ready: Path, signum: int) -> threading.Thread:
    """Send ``signum`` to the main thread (where Python runs handlers) once ``ready`` exists."""
    import signal

    main_id = threading.main_thread().ident

    def fire() -> None:
        for _ in range(300):
            if ready.exists():
                signal.pthread_kill(main_id, signum)
                return
            time.sleep(0.05)

    t = threading.Thread(target=fire, daemon=True)
    t.start()
    return t


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize(("mode", "signum_name", "code"), [("polite", "SIGINT", 130), ("stubborn", "SIGTERM", -9)])
def test_run_child_passes_the_stop_on_and_leaves_nothing(mode: str, signum_name: str, code: int, tmp_path: Path) -> None:
    import signal
    import sys

    import geoseg.cli as cli
    from geoseg.workflows.schedule import run_child

    signum = getattr(signal, signum_name)
    ready = tmp_path / "pids"
    t0 = time.monotonic()
    with cli._stop_signals(), pytest.raises(KeyboardInterrupt) as err:  # as the geoseg command does: SIGTERM raises too
        _signal_main_when(ready, signum)
        run_child([sys.executable, "-c", CHILD, str(ready), mode], grace=1.0)
    child, worker = map(int, ready.read_text().split())
    assert getattr(err.value, "signum", signal.SIGINT) == signum
    assert err.value.child_exit_code == code  # stopped by the same signal, or killed after the grace time
    time.sleep(0.3)
    assert _gone(child) and _gone(worker)  # the child's whole process group is gone
    assert time.monotonic() - t0 < 30
    _restore_logging()


def _restore_logging() -> None:
    import logging

    for name in ("distributed", "tornado", "asyncio"):  # the geoseg command quiets them on a stop signal
        logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")
def test_run_child_kills_what_a_finished_run_left(tmp_path: Path) -> None:
    import os
    import sys

    from geoseg.workflows.schedule import run_child

    ready = tmp_path / "pids"
    assert run_child([sys.executable, "-c", CHILD, str(ready), "quick"]) == 0
    child, worker = map(int, ready.read_text().split())
    time.sleep(0.3)
    assert _gone(worker) and child != os.getpid()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")
def test_sigterm_stops_the_real_geoseg_run_and_logs_it(make_raster, tmp_path: Path) -> None:
    """The scheduler's own child, ``geoseg run`` on a local cluster, stopped mid-compute like ``systemctl stop`` does."""
    import signal

    import torch

    import geoseg.cli as cli
    from tests.conftest import conv_net

    src = make_raster(2000, 2000, seed=9)
    torch.jit.save(torch.jit.script(conv_net(depth=12)), str(tmp_path / "deep.pt"))
    wf = _workflow(
        tmp_path,
        f"name: t\nimagery: [{src.name}]\nmodels: [{{model: deep.pt, tile: 128, halo: 8}}]\n"
        'outputs: {folder: out, formats: [gpkg], quicklook: false}\nchunk: 256\nschedule: "* * * * *"\n',
    )
    before = set(_children())
    clock = FakeClock(T0)
    started = threading.Event()

    def watch() -> None:  # once the run computes (a chunk part is staged), stop the scheduler with SIGTERM
        for _ in range(1800):
            if any((tmp_path / "out").glob("**/.geoseg-staging-*/**/*.tif")):
                started.set()
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
                return
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    lines: list[str] = []
    try:
        with cli._stop_signals():
            records = schedule(str(wf), now=clock.now, sleep=clock.sleep, max_runs=1, echo=lines.append)
    finally:
        _restore_logging()
    assert started.is_set(), lines
    (rec,) = records
    assert rec["event"] == "run" and rec["interrupted"] is True and rec["signal"] == "SIGTERM", rec
    assert rec["exit_code"] == 143, rec  # the child stopped on the SIGTERM it was passed (and said so in one line)
    assert _log(tmp_path) == records
    assert any("stopped by SIGTERM" in line for line in lines), lines
    time.sleep(0.5)
    assert not [p for p in set(_children()) - before if not _gone(p)]  # geoseg run and its Dask worker are gone
    assert not list((tmp_path / "out").glob("**/mask.tif"))


def _children() -> list[int]:
    import os

    out = []
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out
