"""Progress people can read: tiles (or chunk windows) done of a total, with MP/s and an ETA.

``progress=`` of :func:`geoseg.write`, :func:`geoseg.segment`, :func:`geoseg.vectorize` and
:func:`geoseg.change.change` takes ``True`` (a live bar on a terminal, plain lines otherwise:
logs and CI), ``False``, a callable receiving ``(done, total, unit)`` or a :class:`Progress`.

Where the counts come from (:func:`compute_tasks`):

- predict's chunk tasks report each tile as they finish it (:class:`TileReport`): in-process
  (``threads``, ``synchronous``) straight to the listening :class:`Counter`, in a Dask worker
  process as a distributed event on :data:`TOPIC` that the client subscribes to while it
  computes; so a one-chunk raster moves tile by tile;
- any other task list (vectorize's chunk windows, a change map's chunks) counts each task as
  it finishes.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["TOPIC", "Counter", "Progress", "TileReport", "as_progress", "compute_tasks", "counter"]

#: the distributed event topic that workers report finished tiles on (message: ``[channel, tiles]``)
TOPIC = "geoseg-progress"
#: plain-line mode: a line at each further tenth of the total, else at most every this many seconds
LINE_EVERY_S = 10.0
#: a worker sends its finished tiles at most this often (and when its chunk ends)
EVENT_EVERY_S = 0.5

Callback = Callable[[int, int, str], None]

_LISTENERS: dict[str, Counter] = {}  # channel -> the counter listening in this process
_SUBSCRIBED: dict[int, int] = {}  # id(client) -> listeners using its subscription
_LOCK = threading.Lock()


class Progress:
    """Where progress goes: a callable, or a live bar on a terminal and plain lines elsewhere.

    Parameters
    ----------
    callback : callable, optional
        Receives ``(done, total, unit)`` at every change (possibly from another thread);
        nothing is shown then.
    prefix : str
        Put before every label (e.g. the workflow unit, ``[2/6] scene/buildings``).
    stream : file, optional
        Where bars and lines go [``sys.stderr``].
    live : bool, optional
        A live bar (tqdm) rather than plain lines [when ``stream`` is a terminal].
    """

    def __init__(
        self, callback: Callback | None = None, *, prefix: str = "", stream: TextIO | None = None, live: bool | None = None
    ) -> None:
        self.callback, self.prefix = callback, prefix
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty()) if live is None else live

    def counter(self, total: int, unit: str, label: str, pixels: int = 0) -> Counter:
        """A count of ``total`` ``unit`` (``pixels`` in all, for MP/s) shown under ``label``."""
        return Counter(self, total, unit, label, pixels)

    def line(self, text: str) -> None:
        """One plain line (above a live bar); nothing with a callback."""
        if self.callback is not None:
            return
        text = f"{self.prefix}: {text}" if self.prefix else text
        if self.live:
            try:
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)
                return
            except ImportError:
                pass
        self.stream.write(text + "\n")
        self.stream.flush()


def as_progress(progress: bool | Callback | Progress | None) -> Progress | None:
    """``progress=`` as a :class:`Progress` (None for no progress)."""
    if progress is None or progress is False:
        return None
    if isinstance(progress, Progress):
        return progress
    if progress is True:
        return Progress()
    if callable(progress):
        return Progress(progress)
    raise TypeError(f"progress must be True, False, a callable (done, total, unit) or a Progress, not {progress!r}")


def counter(progress: bool | Callback | Progress | None, total: int, unit: str, label: str, pixels: int = 0) -> Counter | None:
    """A :class:`Counter` for ``progress=`` (None when no progress is asked for)."""
    shown = as_progress(progress)
    return shown.counter(total, unit, label, pixels) if shown is not None else None


class Counter:
    """One count towards a total: thread safe, never backwards, never past the total.

    Shown as the :class:`Progress` it came from says: the callback at every change, a tqdm
    bar (live), or plain lines: one at each further tenth of the total, otherwise at most one
    every :data:`LINE_EVERY_S` seconds, and the last one at the total.
    """

    def __init__(self, progress: Progress, total: int, unit: str, label: str, pixels: int) -> None:
        self.progress, self.total, self.unit, self.label, self.pixels = progress, max(int(total), 0), unit, label, pixels
        self.done, self.closed = 0, False
        self.t0 = self.last_line = time.monotonic()
        self.tenth = 0
        self.bar = self._bar() if progress.live and progress.callback is None and self.total else None
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        """``n`` more done."""
        with self._lock:
            if self.closed or n <= 0 or self.done >= self.total:
                return
            before, self.done = self.done, min(self.total, self.done + int(n))
            self._show(before)

    def close(self, finished: bool = True) -> None:
        """The end: at the total when ``finished`` (the last events may still be on their way), else as it stands."""
        with self._lock:
            if self.closed:
                return
            if finished and self.done < self.total:
                before, self.done = self.done, self.total
                self._show(before)
            self.closed = True
            if self.bar is not None:
                self.bar.close()

    def rate(self) -> tuple[float, float | None]:
        """Megapixels per second so far and the seconds left (None before anything is done)."""
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        frac = self.done / self.total if self.total else 1.0
        mps = frac * self.pixels / 1e6 / elapsed
        eta = elapsed * (1 - frac) / frac if frac > 0 else None
        return mps, eta

    def text(self) -> str:
        """The plain line: ``label: done/total unit (pct %), MP/s, ETA`` (time taken at the end)."""
        mps, eta = self.rate()
        speed = f", {mps:.2f} MP/s" if self.pixels else ""
        if self.done >= self.total:
            return f"{self.label}: {self.done}/{self.total} {self.unit} in {time.monotonic() - self.t0:.1f} s{speed}"
        pct = 100 * self.done // max(self.total, 1)
        left = f", ETA {eta:.0f} s" if eta is not None else ""
        return f"{self.label}: {self.done}/{self.total} {self.unit} ({pct} %){speed}{left}"

    def _show(self, before: int) -> None:
        if self.progress.callback is not None:
            self.progress.callback(self.done, self.total, self.unit)
        elif self.bar is not None:
            self.bar.update(self.done - before)
            if self.pixels:
                self.bar.set_postfix_str(f"{self.rate()[0]:.2f} MP/s", refresh=False)
        else:
            tenth = 10 * self.done // max(self.total, 1)
            if tenth > self.tenth or time.monotonic() - self.last_line >= LINE_EVERY_S:
                self.tenth = max(self.tenth, tenth)
                self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        self.progress.line(self.text())

    def _bar(self) -> Any:
        try:
            from tqdm import tqdm
        except ImportError:  # plain lines then
            return None
        return tqdm(
            total=self.total,
            desc=f"{self.progress.prefix}: {self.label}" if self.progress.prefix else self.label,
            unit=f" {self.unit}",
            file=self.progress.stream,
            dynamic_ncols=True,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}{postfix}]",
        )


class TileReport:
    """Inside a chunk task: finished tiles to whoever listens on ``channel``.

    In the listening process (``threads``, ``synchronous``, an in-process cluster) each call
    goes straight to its :class:`Counter`; in a Dask worker, tiles are sent as an event on
    :data:`TOPIC` at most every :data:`EVENT_EVERY_S` seconds and at :meth:`flush`. Without a
    channel, or outside both, nothing happens.
    """

    def __init__(self, channel: str | None) -> None:
        self.channel, self.pending, self.last = channel, 0, time.monotonic()

    def add(self, n: int) -> None:
        """``n`` more tiles finished."""
        if self.channel is None or n <= 0:
            return
        local = _LISTENERS.get(self.channel)
        if local is not None:
            local.add(n)
            return
        self.pending += n
        if time.monotonic() - self.last >= EVENT_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Send what is pending (at the end of the chunk)."""
        if not self.pending:
            return
        n, self.pending, self.last = self.pending, 0, time.monotonic()
        if "distributed" not in sys.modules:
            return  # not in a Dask worker, and nobody here listens
        from distributed import get_worker

        try:
            get_worker().log_event(TOPIC, [self.channel, n])
        except ValueError:
            pass  # not in a worker


def _dispatch(event: tuple[float, Any]) -> None:
    """The client's handler of :data:`TOPIC`: tiles to the counter listening on their channel."""
    channel, n = event[1]
    local = _LISTENERS.get(channel)
    if local is not None:
        local.add(n)


@contextmanager
def _listening(channel: str, count: Counter, client: Any) -> Iterator[None]:
    """``count`` receives the tiles reported on ``channel``, in-process and (with a client) from workers."""
    with _LOCK:
        _LISTENERS[channel] = count
        if client is not None:
            if not _SUBSCRIBED.get(id(client)):
                client.subscribe_topic(TOPIC, _dispatch)
            _SUBSCRIBED[id(client)] = _SUBSCRIBED.get(id(client), 0) + 1
    try:
        yield
    finally:
        with _LOCK:
            _LISTENERS.pop(channel, None)
            if client is not None:
                _SUBSCRIBED[id(client)] -= 1
                if not _SUBSCRIBED[id(client)]:
                    del _SUBSCRIBED[id(client)]
                    try:
                        client.unsubscribe_topic(TOPIC)
                    except Exception:  # a closing client: nothing more will come
                        pass


def _active_client() -> Any:
    if "distributed" not in sys.modules:  # no client can exist: spare a threaded run the import (0.2 s, 30 MiB)
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def compute_tasks(
    tasks: list, count: Counter | None = None, *, weights: Sequence[int] | None = None, channel: str | None = None
) -> list:
    """Compute delayed tasks on the active Dask client (else the current Dask scheduler), counting them.

    Parameters
    ----------
    tasks : list of dask.delayed.Delayed
        The tasks; their results come back in this order.
    count : Counter, optional
        What finishes is counted here; it is closed at the end (at its total when all went well).
    weights : sequence of int, optional
        How much each finished task counts [1 each].
    channel : str, optional
        The tasks report their own progress on this channel (:class:`TileReport`); then
        finished tasks are not counted.

    Returns
    -------
    list
        The tasks' results.
    """
    if count is None:
        return _compute(tasks, _active_client(), None)
    client = _active_client()
    ok = False
    try:
        if channel is not None:
            with _listening(channel, count, client):
                out = _compute(tasks, client, None)
        else:
            out = _compute(tasks, client, (count, list(weights) if weights is not None else [1] * len(tasks)))
        ok = True
        return out
    finally:
        count.close(finished=ok)


def _compute(tasks: list, client: Any, counting: tuple[Counter, list[int]] | None) -> list:
    import dask

    if client is not None:
        futures = client.compute(tasks)
        if counting is not None:
            from distributed import as_completed

            count, weights = counting
            by_key: dict[Any, int] = {}
            for f, w in zip(futures, weights, strict=True):
                by_key[f.key] = by_key.get(f.key, 0) + w
            for f in as_completed(futures):
                if f.status != "finished":
                    break  # gather raises its error now, as it would without counting
                count.add(by_key.pop(f.key, 0))
        return client.gather(futures)
    if counting is None:
        return list(dask.compute(*tasks))
    from dask.callbacks import Callback

    count, weights = counting
    by_key = {}
    for t, w in zip(tasks, weights, strict=True):
        by_key[t.key] = by_key.get(t.key, 0) + w

    def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        count.add(by_key.pop(key, 0))

    with Callback(posttask=posttask):
        return list(dask.compute(*tasks))
