"""``geoseg run``'s progress: units done of the total, and the current unit's tiles.

Each unit is numbered when the run reaches it (skipped units keep their number, so the
count reads ``[k/N]`` of every unit); a unit that runs says when it starts and ends, and its
tiles (then chunk windows) are counted under its number: a live bar on a terminal, plain
lines in logs and CI (:mod:`geoseg.engine.progress`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from geoseg.engine.progress import Progress

__all__ = ["Units"]


class Units:
    """Numbers the units of one run and shows the ones that run.

    Parameters
    ----------
    total : int
        Units in the run (scenes x models, plus every change pair).
    progress : bool or Progress
        Show progress (True: a bar on a terminal, plain lines otherwise); False shows nothing.
    """

    def __init__(self, total: int, progress: bool | Progress = False) -> None:
        self.total, self.seen = total, 0
        self.shown = progress if isinstance(progress, Progress) else (Progress() if progress else None)

    def unit(self, label: str, work: Callable[[Any], Any]) -> Callable[[], Any]:
        """The next unit, ``label``: a callable that runs ``work(progress)`` between a start and an end line."""
        self.seen += 1
        prefix = f"[{self.seen}/{self.total}] {label}"

        def run() -> Any:
            if self.shown is None:
                return work(False)
            shown = Progress(self.shown.callback, prefix=prefix, stream=self.shown.stream, live=self.shown.live)
            shown.line("started")
            t0 = time.monotonic()
            out = work(shown)
            shown.line(f"finished in {time.monotonic() - t0:.1f} s")
            return out

        return run
