"""The run ledger: one SQLite file beside a workflow's outputs recording every unit of work.

A unit is a scene x model segmentation or a date pair x model change detection. Its id is
its output folder (deterministic), its ``params`` hash covers everything the outputs
depend on (input fingerprints, model hash, parameters). A unit is skipped when the ledger
has it ``done`` with the same hash and its outputs are all in place; it is only marked
``done`` after its outputs were renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["LEDGER_NAME", "Ledger", "params_hash"]

LEDGER_NAME = "ledger.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS units (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, scene TEXT, model TEXT, params TEXT NOT NULL, hash TEXT NOT NULL,
    outputs TEXT, status TEXT NOT NULL, started TEXT, finished TEXT, seconds REAL, error TEXT, run INTEGER
);
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY AUTOINCREMENT, started TEXT NOT NULL, finished TEXT, status TEXT,
    done INTEGER DEFAULT 0, skipped INTEGER DEFAULT 0, failed INTEGER DEFAULT 0, pid INTEGER
);
"""


def params_hash(params: dict[str, Any]) -> str:
    """A stable hash of JSON-able parameters."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Ledger:
    """Units and runs of one output folder (``OUT/ledger.sqlite``)."""

    def __init__(self, folder: str) -> None:
        from geoseg.errors import OutputError

        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, LEDGER_NAME)
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise OutputError(
                f"{self.path}: not a usable run ledger ({exc}); move it away to start a fresh ledger (every unit is redone)"
            ) from None
        self.run: int | None = None

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def start_run(self) -> int:
        """Record a new run; returns its number."""
        with self._tx() as db:
            # a run whose process died (SIGKILL) never finished: say so
            db.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")
            db.execute("UPDATE units SET status = 'interrupted' WHERE status = 'running'")
            cur = db.execute("INSERT INTO runs (started, status, pid) VALUES (?, 'running', ?)", (_now(), os.getpid()))
        self.run = int(cur.lastrowid)
        return self.run

    def finish_run(self, status: str, done: int, skipped: int, failed: int) -> None:
        """Close the current run's record."""
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET finished = ?, status = ?, done = ?, skipped = ?, failed = ? WHERE run = ?",
                (_now(), status, done, skipped, failed, self.run),
            )

    def is_done(self, unit_id: str, digest: str, folder: str) -> bool:
        """True when ``unit_id`` is done with ``digest`` and every output it listed exists."""
        row = self.db.execute("SELECT hash, status, outputs FROM units WHERE id = ?", (unit_id,)).fetchone()
        if not row or row[0] != digest or row[1] != "done":
            return False
        outputs = json.loads(row[2] or "[]")
        return bool(outputs) and all(os.path.exists(os.path.join(folder, p)) for p in outputs)

    def begin(self, unit_id: str, kind: str, scene: str, model: str, params: dict[str, Any], digest: str) -> None:
        """Mark a unit running (its outputs are not trustworthy until :meth:`done`)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO units (id, kind, scene, model, params, hash, status, started, run) "
                "VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?) ON CONFLICT(id) DO UPDATE SET kind = excluded.kind, "
                "scene = excluded.scene, model = excluded.model, params = excluded.params, hash = excluded.hash, "
                "status = 'running', started = excluded.started, finished = NULL, seconds = NULL, error = NULL, "
                "run = excluded.run",
                (unit_id, kind, scene, model, json.dumps(params, sort_keys=True, default=str), digest, _now(), self.run),
            )

    def done(self, unit_id: str, outputs: list[str], seconds: float) -> None:
        """Mark a unit done, with its outputs (paths relative to the ledger's folder)."""
        with self._tx() as db:
            db.execute(
                "UPDATE units SET status = 'done', outputs = ?, finished = ?, seconds = ? WHERE id = ?",
                (json.dumps(sorted(outputs)), _now(), round(seconds, 3), unit_id),
            )

    def failed(self, unit_id: str, error: str, seconds: float) -> None:
        """Mark a unit failed, with its one-line error."""
        with self._tx() as db:
            db.execute(
                "UPDATE units SET status = 'failed', error = ?, finished = ?, seconds = ? WHERE id = ?",
                (error, _now(), round(seconds, 3), unit_id),
            )

    def units(self) -> list[dict[str, Any]]:
        """Every unit, in id order."""
        cur = self.db.execute(
            "SELECT id, kind, scene, model, hash, status, started, finished, seconds, error, run FROM units ORDER BY id"
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first."""
        cur = self.db.execute("SELECT run, started, finished, status, done, skipped, failed FROM runs ORDER BY run")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
