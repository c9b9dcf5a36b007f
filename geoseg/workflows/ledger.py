"""The run ledger: one SQLite file beside a workflow's outputs recording every unit of work.

A unit is a scene x model segmentation or a date pair x model change detection. Its id is
its output folder (deterministic), its ``params`` hash covers everything the outputs
depend on (input fingerprints, model hash, parameters). A unit is skipped when the ledger
has it ``done`` with the same hash and its outputs are all in place; it is only marked
``done`` after its outputs were renamed into place.

Every failure of the database is one line naming the ledger and the fix: a file of another
program or another schema version, a read-only ledger (still readable by ``geoseg runs``),
a ledger locked by another program (after a short wait, never a long hang), a full disk.
A run whose process died is shown as ``interrupted``, not ``running``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from geoseg.errors import OutputError
from geoseg.io.outdir import disk_full_error, disk_full_now
from geoseg.io.remote import redact

__all__ = ["LEDGER_NAME", "LEDGER_VERSION", "Ledger", "params_hash", "process_alive"]

LEDGER_NAME = "ledger.sqlite"
#: Schema version stored in ``PRAGMA user_version`` (0: an older geoseg's ledger, migrated).
LEDGER_VERSION = 1
#: How long a write waits for another program's lock on the ledger before giving up (seconds).
BUSY_TIMEOUT_S = 2.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS units (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, scene TEXT, model TEXT, params TEXT NOT NULL, hash TEXT NOT NULL,
    outputs TEXT, status TEXT NOT NULL, started TEXT, finished TEXT, seconds REAL, error TEXT, run INTEGER
);
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY AUTOINCREMENT, started TEXT NOT NULL, finished TEXT, status TEXT,
    done INTEGER DEFAULT 0, skipped INTEGER DEFAULT 0, failed INTEGER DEFAULT 0, pid INTEGER, host TEXT
);
"""
_COLUMNS = {
    "units": {"id", "kind", "scene", "model", "params", "hash", "outputs", "status", "started", "finished", "seconds",
              "error", "run"},
    "runs": {"run", "started", "finished", "status", "done", "skipped", "failed", "pid"},
}  # fmt: skip
_OWN_TABLES = {"units", "runs", "sqlite_sequence"}


def params_hash(params: dict[str, Any]) -> str:
    """A stable hash of JSON-able parameters."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _epoch(iso: str | None) -> float | None:
    import calendar

    try:
        return float(calendar.timegm(time.strptime(str(iso), "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


def process_alive(pid: Any, started: str | None = None) -> bool:
    """Whether process ``pid`` of this host runs and (on Linux) started no later than ``started``.

    A pid reused by a later process does not count as alive.
    """
    try:
        pid = int(pid)
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    except (TypeError, ValueError, OverflowError, OSError):
        return False
    since = _epoch(started)
    if since is None:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK") <= since + 2.0
    except (OSError, ValueError, IndexError, StopIteration):
        return True


class Ledger:
    """Units and runs of one output folder (``OUT/ledger.sqlite``).

    Parameters
    ----------
    folder : str
        The output folder (created when missing).

    Raises
    ------
    OutputError
        The ledger is a link or not a regular file, belongs to another program or another
        schema version, is locked by another program, or cannot be written
        (:class:`~geoseg.errors.DiskFullError` when the disk is full). A read-only ledger
        opens read-only (:attr:`readonly`); writing to it raises.
    """

    def __init__(self, folder: str) -> None:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror}); choose a writable out=") from None
        self.path = os.path.join(folder, LEDGER_NAME)
        self.readonly = False
        self.run: int | None = None
        if os.path.islink(self.path) or (os.path.exists(self.path) and not stat.S_ISREG(os.stat(self.path).st_mode)):
            raise OutputError(
                f"{self.path}: the run ledger is a link or not a regular file; move it away (geoseg creates the file itself)"
            )
        self.db: sqlite3.Connection | None = None
        try:
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self._check_foreign()
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.Error as exc:
            if self._is_readonly(exc) and os.path.exists(self.path):
                self._open_readonly()
            else:
                self._close_quietly()
                raise self._error(exc, "opening") from None
        except OutputError:
            self._close_quietly()
            raise

    # -- opening ---------------------------------------------------------------------
    @staticmethod
    def _is_readonly(exc: sqlite3.Error) -> bool:
        text = str(exc).lower()
        return "readonly" in text or "read-only" in text or "unable to open database" in text

    def _open_readonly(self) -> None:
        from urllib.parse import quote

        self._close_quietly()
        uri = f"file:{quote(os.path.abspath(self.path))}?mode=ro"
        # a WAL ledger in a folder this user cannot write has no -shm to share: read it as immutable
        for suffix in ("", "&immutable=1"):
            try:
                self.db = sqlite3.connect(uri + suffix, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
                self._check_foreign()
                self._check_columns()
                break
            except sqlite3.Error as exc:
                self._close_quietly()
                if suffix:
                    raise self._error(exc, "opening") from None
        self.readonly = True

    def _close_quietly(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
            self.db = None

    def _check_foreign(self) -> None:
        """Refuse a database of another program or of a newer schema (before changing anything in it)."""
        assert self.db is not None
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if (tables and not {"units", "runs"} <= tables) or tables - _OWN_TABLES:
            raise OutputError(
                f"{self.path}: not a geoseg run ledger (it holds tables {', '.join(sorted(tables))}); "
                "move it away to start a fresh ledger (every unit is redone)"
            )
        if version > LEDGER_VERSION:
            raise OutputError(
                f"{self.path}: a run ledger of a newer geoseg (schema {version}, this one reads {LEDGER_VERSION}); "
                "upgrade geoseg, or move it away to start a fresh ledger (every unit is redone)"
            )
        if tables:
            self._check_columns()

    def _check_columns(self) -> None:
        assert self.db is not None
        for table, want in _COLUMNS.items():
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            missing = sorted(want - have)
            if missing:
                raise OutputError(
                    f"{self.path}: a run ledger of another schema (table {table} has no column {missing[0]}); "
                    "move it away to start a fresh ledger (every unit is redone)"
                )

    def _migrate(self) -> None:
        assert self.db is not None
        self._check_columns()
        have = {r[1] for r in self.db.execute("PRAGMA table_info(runs)")}
        if "host" not in have:  # ledgers of geoseg before schema 1
            self.db.execute("ALTER TABLE runs ADD COLUMN host TEXT")
        self.db.execute(f"PRAGMA user_version = {LEDGER_VERSION}")

    def _error(self, exc: sqlite3.Error, doing: str) -> OutputError:
        """One line for a database failure."""
        text = str(exc)
        low = text.lower()
        if "locked" in low or "busy" in low:
            return OutputError(
                f"{self.path}: the run ledger is locked by another program ({text}); close that program "
                "(or wait for it) and run again"
            )
        if self._is_readonly(exc):
            return OutputError(
                f"{self.path}: the run ledger is read-only ({text}); make it and its folder writable, or choose another out="
            )
        if "full" in low or "quota" in low:
            return disk_full_error(self.path, text)
        if "not a database" in low or "malformed" in low or "corrupt" in low:
            return OutputError(
                f"{self.path}: not a usable run ledger ({text}); move it away to start a fresh ledger (every unit is redone)"
            )
        if "disk i/o" in low:  # SQLite reports a file size limit (EFBIG) this way
            reason = disk_full_now(self.path, self.path)
            if reason:
                return disk_full_error(self.path, reason)
            return OutputError(f"{self.path}: the run ledger could not be written ({text}); check free space and the disk")
        return OutputError(f"{self.path}: {doing} the run ledger failed ({text}); check the file, or move it away")

    # -- writing ---------------------------------------------------------------------
    def close(self) -> None:
        """Close the database."""
        self._close_quietly()

    @contextmanager
    def _tx(self, doing: str) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise OutputError(
                f"{self.path}: the run ledger is read-only; make it and its folder writable, or choose another out="
            )
        assert self.db is not None
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(exc, doing) from None
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException as exc:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc, doing) from None
            raise

    def start_run(self) -> int:
        """Record a new run; returns its number."""
        with self._tx("starting a run in") as db:
            # a run whose process died (SIGKILL) never finished: say so
            db.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")
            db.execute("UPDATE units SET status = 'interrupted' WHERE status = 'running'")
            cur = db.execute(
                "INSERT INTO runs (started, status, pid, host) VALUES (?, 'running', ?, ?)",
                (_now(), os.getpid(), socket.gethostname()),
            )
        self.run = int(cur.lastrowid)
        return self.run

    def finish_run(self, status: str, done: int, skipped: int, failed: int) -> None:
        """Close the current run's record."""
        with self._tx("finishing the run in") as db:
            db.execute(
                "UPDATE runs SET finished = ?, status = ?, done = ?, skipped = ?, failed = ? WHERE run = ?",
                (_now(), status, done, skipped, failed, self.run),
            )

    def is_done(self, unit_id: str, digest: str, folder: str) -> bool:
        """True when ``unit_id`` is done with ``digest`` and every output it listed exists."""
        row = self._query("SELECT hash, status, outputs FROM units WHERE id = ?", (unit_id,))
        row = row[0] if row else None
        if not row or row[0] != digest or row[1] != "done":
            return False
        try:
            outputs = json.loads(row[2] or "[]")
        except ValueError:
            return False
        if not isinstance(outputs, list) or not all(isinstance(p, str) for p in outputs):
            return False
        return bool(outputs) and all(os.path.exists(os.path.join(folder, p)) for p in outputs)

    def begin(self, unit_id: str, kind: str, scene: str, model: str, params: dict[str, Any], digest: str) -> None:
        """Mark a unit running (its outputs are not trustworthy until :meth:`done`)."""
        with self._tx("recording a unit in") as db:
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
        with self._tx("recording a unit in") as db:
            db.execute(
                "UPDATE units SET status = 'done', outputs = ?, finished = ?, seconds = ? WHERE id = ?",
                (json.dumps(sorted(outputs)), _now(), round(seconds, 3), unit_id),
            )

    def failed(self, unit_id: str, error: str, seconds: float) -> None:
        """Mark a unit failed, with its one-line error (any URL's token redacted)."""
        with self._tx("recording a unit in") as db:
            db.execute(
                "UPDATE units SET status = 'failed', error = ?, finished = ?, seconds = ? WHERE id = ?",
                (redact(error), _now(), round(seconds, 3), unit_id),
            )

    # -- reading ---------------------------------------------------------------------
    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        assert self.db is not None
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc, "reading") from None

    def _dead_runs(self) -> set[int]:
        """Runs recorded as running whose process (on this host) is gone."""
        host = socket.gethostname()
        rows = self._query("SELECT run, pid, host, started FROM runs WHERE status = 'running'")
        return {
            int(run)
            for run, pid, h, started in rows
            if (h in (None, host)) and not (pid == os.getpid() and run == self.run) and not process_alive(pid, started)
        }

    def units(self) -> list[dict[str, Any]]:
        """Every unit, in id order (a unit of a run whose process died shows as ``interrupted``)."""
        rows = self._select(
            "SELECT id, kind, scene, model, hash, status, started, finished, seconds, error, run FROM units ORDER BY id"
        )
        dead = self._dead_runs()
        for r in rows:
            if r["status"] == "running" and (r["run"] in dead or r["run"] is None):
                r["status"] = "interrupted"
        return rows

    def _select(self, sql: str) -> list[dict[str, Any]]:
        """Rows of a query as dictionaries; a database error becomes one line."""
        assert self.db is not None
        try:
            cur = self.db.execute(sql)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        except sqlite3.Error as exc:
            raise self._error(exc, "reading") from None

    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first (one whose process died shows as ``interrupted``)."""
        rows = self._select("SELECT run, started, finished, status, done, skipped, failed FROM runs ORDER BY run")
        dead = self._dead_runs()
        for r in rows:
            if r["status"] == "running" and r["run"] in dead:
                r["status"] = "interrupted"
        return rows
