"""Model files' bytes: fetched over HTTP(S) (streamed to a temporary name beside the destination, hashed on the
way), and hashed on disk (:func:`sha256_file`, the content hash every model is known by).

Standard library only (:mod:`urllib`): proxies come from the environment (``HTTPS_PROXY``,
``HTTP_PROXY``, ``NO_PROXY``), every request has a timeout, and transient failures (HTTP 429
and 5xx, timeouts, dropped connections) are retried with exponential back-off. Nothing is
renamed into place here: the caller checks the hash and renames, or removes the temporary
file (:func:`fetch` removes it itself on any failure).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass

from geoseg.errors import ModelError
from geoseg.io.remote import PERMANENT_HTTP, redact, retry_attempts, with_backoff

__all__ = ["Fetched", "fetch", "sha256_file"]

#: Largest model file geoseg downloads; ``GEOSEG_MAX_MODEL_BYTES`` changes it.
MAX_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class Fetched:
    """A downloaded file under its temporary name, with its SHA-256 and size."""

    path: str
    sha256: str
    size: int


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks.

    Parameters
    ----------
    path : str
        The file.

    Returns
    -------
    str
        64 hex digits.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _setting(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


def fetch(url: str, folder: str, stem: str, *, timeout: float = 60.0, attempts: int | None = None) -> Fetched:
    """Download ``url`` into ``folder`` under a hidden temporary name, hashing it as it streams.

    Parameters
    ----------
    url : str
        An ``http(s)://`` URL (redirects followed, to http(s) only).
    folder : str
        Where the temporary file goes (the destination's folder, so a rename is atomic).
    stem : str
        For the temporary name (``.STEM.part-XXXX``).
    timeout : float
        Seconds a connection or a read may stall.
    attempts : int, optional
        Tries for a transient failure; default as every remote request (``GEOSEG_REMOTE_ATTEMPTS``, 5),
        the back-off doubling from ``GEOSEG_REMOTE_RETRY_DELAY`` (1 s).

    Returns
    -------
    Fetched

    Raises
    ------
    ModelError
        A permanent HTTP error, a transient one past every attempt, or a file over
        ``GEOSEG_MAX_MODEL_BYTES``; the partial file is removed.
    """
    if not url.lower().startswith(("http://", "https://")):
        raise ModelError(f"{redact(url)}: models are downloaded over http(s) only; give an https:// URL")
    tmp = os.path.join(folder, f".{stem}.part-{secrets.token_hex(4)}")

    def attempt() -> Fetched:
        try:
            return _stream(url, tmp, timeout)
        except BaseException:
            _discard(tmp)
            raise

    tries = retry_attempts() if attempts is None else max(1, attempts)
    try:
        return with_backoff(attempt, _transient, attempts=tries)
    except urllib.error.HTTPError as exc:
        if exc.code in PERMANENT_HTTP:
            refused = f"download refused (HTTP {exc.code}); check the URL (or the catalogue entry)"
            raise ModelError(f"{redact(url)}: {refused}") from None
        last = f"HTTP {exc.code}"
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        last = redact(str(getattr(exc, "reason", exc)))
    raise ModelError(
        f"{redact(url)}: download failed after {tries} attempts ({last}); check the network (proxies come from "
        "HTTPS_PROXY) and try again"
    )


def _transient(exc: Exception) -> bool:
    """A failed download worth another try: HTTP 429 and 5xx, timeouts, dropped connections."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code not in PERMANENT_HTTP
    return isinstance(exc, (urllib.error.URLError, TimeoutError, ConnectionError))


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _stream(url: str, tmp: str, timeout: float) -> Fetched:
    """One GET of ``url`` into ``tmp``: the body hashed as it is written, its length checked against the limit."""
    limit = _setting("GEOSEG_MAX_MODEL_BYTES", MAX_BYTES)
    request = urllib.request.Request(url, headers={"User-Agent": "geoseg"})
    h, size = hashlib.sha256(), 0
    with urllib.request.urlopen(request, timeout=timeout) as resp, open(tmp, "xb") as out:
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ModelError(f"{redact(url)}: {int(declared) / 1e6:.0f} MB is more than GEOSEG_MAX_MODEL_BYTES allows")
        for block in iter(lambda: resp.read(1 << 20), b""):
            size += len(block)
            if size > limit:
                raise ModelError(f"{redact(url)}: the download passed GEOSEG_MAX_MODEL_BYTES ({limit:.0f} bytes); raise it")
            h.update(block)
            out.write(block)
        if declared and declared.isdigit() and size != int(declared):
            raise urllib.error.URLError(f"connection closed after {size} of {declared} bytes")
        out.flush()
        os.fsync(out.fileno())
    return Fetched(tmp, h.hexdigest(), size)
