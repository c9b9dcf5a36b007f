"""The output folder's chores: exists-checks, locks, staging, atomic writes and a full disk.

Everything that writes into an output folder goes through here, so each chore is written
once: :func:`existing_outputs` (does the folder already hold these outputs?),
:func:`output_lock` / :func:`hold_lock_file` (one writer per folder), the private staging
folders of a run (:func:`make_staging`, :func:`adopt_staging`, :func:`sweep_staging`),
atomic publishing (:func:`atomic_path`, :func:`fsync_replace`, :func:`write_text_atomic`,
:func:`write_json_atomic`) and disk-full detection (:func:`disk_full_reason`,
:func:`disk_full_now`, :func:`disk_full_error`), and no empty folder left by a failed
command (:func:`removed_if_failed`). A little over 400 lines, most of them
docstrings: one room for one chore (the output folder), not worth splitting.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from geoseg.errors import DiskFullError, OutputError

__all__ = [
    "adopt_staging",
    "atomic_path",
    "check_is_folder",
    "disk_full_error",
    "disk_full_now",
    "disk_full_reason",
    "existing_outputs",
    "fsync_dir",
    "fsync_replace",
    "hold_lock_file",
    "make_staging",
    "open_lock_file",
    "output_lock",
    "removed_if_failed",
    "sweep_staging",
    "write_json_atomic",
    "write_text_atomic",
]


def existing_outputs(folder: str, names: Iterable[str]) -> list[str]:
    """The names among ``names`` that already exist in ``folder``, in the order given.

    Parameters
    ----------
    folder : str
        The output folder (it may not exist yet).
    names : iterable of str
        Output paths relative to ``folder``.

    Returns
    -------
    list of str
        Those that exist (files, folders or links).
    """
    if isinstance(names, str):
        raise TypeError("existing_outputs takes a list of names, not one string")
    return [n for n in names if os.path.exists(os.path.join(folder, n))]


def check_is_folder(out_dir: str) -> None:
    """Refuse an output folder path that exists as something else (a file).

    Raises
    ------
    OutputError
        ``out_dir`` exists and is not a folder.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"{out_dir}: exists and is not a folder; give out_dir= a folder path")


_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded", "Free disk space available", "disk is full")


_CANONICAL = {"disk is full": "No space left on device"}  # SQLite's "database or disk is full"


def disk_full_reason(exc: BaseException | None, text: str = "") -> str | None:
    """Why ``exc`` (or its causes, or GDAL's ``text`` on stderr) means the disk is full; None otherwise."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return os.strerror(exc.errno)
        for needle in _FULL_TEXT:
            if needle in str(exc):
                return _CANONICAL.get(needle, needle)
        exc = exc.__cause__ or exc.__context__
    for needle in _FULL_TEXT:
        if needle in text:
            return _CANONICAL.get(needle, needle)
    return None


def disk_full_now(path: str, written: str | None = None) -> str | None:
    """Why writing under ``path`` fails for lack of room right now, or None.

    For libraries that report a failed write without its cause (GDAL's "Cannot write
    feature"): the filesystem has (almost) no free space left, or ``written`` has reached
    the process's file size limit (``RLIMIT_FSIZE``).
    """
    import resource

    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    try:
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        for p in [written, f"{written}-journal", f"{written}-wal"] if written else []:
            try:
                if os.path.getsize(p) >= soft - (1 << 16):
                    return os.strerror(errno.EFBIG)
            except OSError:
                pass
    return None


def disk_full_error(path: str, reason: str) -> DiskFullError:
    """The one-line :class:`~geoseg.errors.DiskFullError` for ``path`` (``reason`` from :func:`disk_full_reason`)."""
    err = DiskFullError(f"{path}: the disk is full ({reason}); free space or choose another out_dir=")
    err.reason = reason
    return err


def atomic_path(path: str) -> str:
    """A temporary sibling name for ``path`` (same folder, so ``os.replace`` is atomic)."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.{os.getpid()}.{time.monotonic_ns()}.tmp")


def fsync_replace(tmp: str, path: str) -> None:
    """Flush ``tmp`` to disk and rename it to ``path`` atomically."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary sibling, fsync, rename).

    Nothing is left behind on failure; a full disk (or file size limit or quota) is a
    :class:`DiskFullError` naming ``path``, any other failure an :class:`OutputError`.
    """
    tmp = atomic_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        fsync_replace(tmp, path)
    except OSError as exc:
        with _suppress_oserror():
            os.remove(tmp)
        reason = disk_full_reason(exc)
        if reason:
            raise disk_full_error(path, reason) from None
        raise OutputError(f"{path}: could not write it ({exc.strerror or exc}); check the folder and its permissions") from None


@contextmanager
def _suppress_oserror() -> Iterator[None]:
    try:
        yield
    except OSError:
        pass


def open_lock_file(path: str, what: str = "lock file") -> int:
    """Open (create) a lock file for reading and writing, never through a symbolic link.

    ``O_NOFOLLOW``: a link planted under the lock's name (to a file the user can write) is
    refused instead of being truncated; anything but a regular file is refused too.

    Returns
    -------
    int
        The file descriptor (the caller locks and closes it).

    Raises
    ------
    OutputError
        The lock is a link or not a regular file, or cannot be created.
    """
    import stat

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(
                f"{path}: the {what} is a symbolic link; remove the link (geoseg creates the file itself)"
            ) from None
        raise OutputError(f"{path}: cannot create the {what} ({exc.strerror}); choose a folder you can write to") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{path}: the {what} is not a regular file; remove it (geoseg creates the file itself)")
    return fd


@contextmanager
def output_lock(out_dir: str) -> Iterator[None]:
    """Hold an exclusive lock on an output folder; a second writer is refused at once.

    Uses ``flock`` on the folder itself (no lock file is left behind; the OS releases the
    lock if the process dies).
    """
    import fcntl

    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(out_dir):
            raise OutputError(
                f"{out_dir}: the output folder is a symbolic link; give the folder it points to "
                f"({os.path.realpath(out_dir)}) instead"
            ) from None
        raise OutputError(
            f"{out_dir}: cannot create or open the output folder ({exc.strerror}); choose a folder you can write to"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"{out_dir}: another geoseg process is writing to this folder; wait for it or choose another out_dir="
            ) from None
        yield
    finally:
        os.close(fd)


@contextmanager
def removed_if_failed(folder: str | os.PathLike | None) -> Iterator[None]:
    """Remove ``folder`` (and the parents made for it) when the block fails and leaves it empty.

    Only folders that did not exist when the block began are removed, deepest first, and only
    while empty: a folder that existed, or holds anything (a failed run's ledger, a killed
    run's chunk parts kept for resuming), stays.

    Parameters
    ----------
    folder : str, os.PathLike or None
        The output folder (None: nothing to do).
    """
    new: list[str] = []
    path = os.path.abspath(os.fspath(folder)) if folder is not None else None
    while path and not os.path.lexists(path):
        new.append(path)
        path = os.path.dirname(path)
    try:
        yield
    except BaseException:
        for path in new:  # deepest first
            try:
                os.rmdir(path)
            except OSError:
                break  # not empty (or not ours to remove): its parents are not empty either
        raise


_OWNER = "owner.json"


def make_staging(out_dir: str, prefix: str, token: str) -> str:
    """Create a private staging folder in ``out_dir``, marked with this host and process.

    Two runs into one folder never share (or sweep) each other's staging folder.
    """
    import json
    import socket
    import uuid

    path = os.path.join(out_dir, f"{prefix}{token}-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    with open(os.path.join(path, _OWNER), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
    return path


def adopt_staging(out_dir: str, prefix: str, token: str) -> str | None:
    """Take over the staging folder a killed run of the same job left (same token, this host,
    its process gone), so its finished parts are reused; None when there is none.
    """
    import glob
    import json
    import socket

    host = socket.gethostname()
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), glob.escape(f"{prefix}{token}-") + "*"))):
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, _OWNER)) as f:
                owner = json.load(f)
            if owner.get("host") != host:
                continue
            os.kill(int(owner["pid"]), 0)
            continue  # alive: not ours to take
        except ProcessLookupError:
            pass
        except (OSError, ValueError, KeyError, TypeError):
            continue
        tmp = os.path.join(path, f".{_OWNER}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"host": host, "pid": os.getpid()}, f)
        os.replace(tmp, os.path.join(path, _OWNER))
        return path
    return None


def sweep_staging(out_dir: str, prefix: str, max_age_s: float = 86400.0) -> None:
    """Remove staging folders left by killed runs: their process is gone (same host) or they are old."""
    import glob
    import json
    import shutil
    import socket
    import time

    host = socket.gethostname()
    for path in glob.glob(os.path.join(glob.escape(out_dir), glob.escape(prefix) + "*")):
        if os.path.islink(path) or not os.path.isdir(path):
            continue  # only geoseg's own staging folders, never through a link
        try:
            with open(os.path.join(path, _OWNER)) as f:
                owner = json.load(f)
            age = time.time() - os.path.getmtime(path)
        except (OSError, ValueError):
            owner, age = {}, float("inf")
        if owner.get("host") == host:
            try:
                os.kill(int(owner["pid"]), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except (PermissionError, KeyError, ValueError, TypeError):
                continue
        elif age < max_age_s:
            continue  # another host's run, maybe live
        shutil.rmtree(path, ignore_errors=True)


def write_json_atomic(path: str, obj: Any, **dumps: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`write_text_atomic`).

    Parameters
    ----------
    path : str
        The file to write.
    obj : Any
        A JSON-serialisable object.
    **dumps
        Passed to :func:`json.dumps` (``indent``, ``separators``, ...).

    Raises
    ------
    DiskFullError
        The disk, the file size limit or the quota is full.
    OutputError
        Any other failure to write it.
    """
    write_text_atomic(path, json.dumps(obj, **dumps))


@contextmanager
def hold_lock_file(folder: str, name: str, what: str, stamp: str, busy: Callable[[str], str]) -> Iterator[str]:
    """Hold an exclusive ``flock`` on the lock file ``folder/name`` for the ``with`` block.

    The folder is created when missing; the lock file is opened with :func:`open_lock_file`
    (never through a link) and left in place afterwards, holding ``stamp`` (who holds it).

    Parameters
    ----------
    folder : str
        The output folder.
    name : str
        The lock file's name in ``folder``.
    what : str
        What the lock is, for messages (``run lock``).
    stamp : str
        Written into the lock file once held (best effort).
    busy : callable
        ``busy(holder)`` gives the message when another process holds the lock; ``holder``
        is the stamp that process wrote ("" when none).

    Yields
    ------
    str
        The lock file's path.

    Raises
    ------
    OutputError
        Another process holds the lock, or the folder or lock file cannot be created.
    """
    import fcntl

    path = os.path.join(folder, name)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror}); choose a writable out_dir=") from None
    fd = open_lock_file(path, what)  # O_NOFOLLOW: a planted link is refused, never truncated
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            raise OutputError(busy(holder)) from None
        try:  # who holds the lock, for the message of a second process (a full disk must not stop here)
            os.ftruncate(fd, 0)
            os.pwrite(fd, stamp.encode(), 0)
        except OSError:
            pass
        yield path
    finally:
        os.close(fd)
