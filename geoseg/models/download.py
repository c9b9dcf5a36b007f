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
from typing import Any

from geoseg.errors import ModelError
from geoseg.io.remote import PERMANENT_HTTP, env_number, redact, retry_attempts, with_backoff

__all__ = ["Fetched", "fetch", "insecure_text", "sha256_file"]

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


def insecure_text(url: str) -> str:
    """The one-line refusal of a download over plain ``http://`` with no checksum known beforehand."""
    return (
        f"{redact(url)}: plain http:// with no checksum to check the file against; use an https:// URL, or give "
        "--sha256 HEX (a pinned checksum makes the transport irrelevant)"
    )


def fetch(
    url: str, folder: str, stem: str, *, timeout: float = 60.0, attempts: int | None = None, pinned: bool = False
) -> Fetched:
    """Download ``url`` into ``folder`` under a hidden temporary name, hashing it as it streams.

    Parameters
    ----------
    url : str
        An ``https://`` URL (redirects followed, to https only); ``http://`` too when ``pinned``.
    folder : str
        Where the temporary file goes (the destination's folder, so a rename is atomic).
    stem : str
        For the temporary name (``.STEM.part-XXXX``).
    timeout : float
        Seconds a connection or a read may stall.
    attempts : int, optional
        Tries for a transient failure; default as every remote request (``GEOSEG_REMOTE_ATTEMPTS``, 5),
        the back-off doubling from ``GEOSEG_REMOTE_RETRY_DELAY`` (1 s).
    pinned : bool
        The caller checks the file against a SHA-256 it knew before the download: plain ``http://``
        (and redirects to it) are allowed.

    Returns
    -------
    Fetched

    Raises
    ------
    ModelError
        A permanent HTTP error, a transient one past every attempt, a file over
        ``GEOSEG_MAX_MODEL_BYTES``, or plain ``http://`` (or a redirect off https) when not
        ``pinned``; the partial file is removed.
    """
    if not url.lower().startswith(("http://", "https://")):
        raise ModelError(f"{redact(url)}: models are downloaded over http(s) only; give an https:// URL")
    if not pinned and not url.lower().startswith("https://"):
        raise ModelError(insecure_text(url))
    tmp = os.path.join(folder, f".{stem}.part-{secrets.token_hex(4)}")

    def attempt() -> Fetched:
        try:
            return _stream(url, tmp, timeout, pinned)
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


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Redirects followed to ``https://`` only (to ``http://`` too when the download is pinned by a checksum)."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if not (newurl.lower().startswith("https://") or (self.pinned and newurl.lower().startswith("http://"))):
            raise ModelError(
                f"{redact(req.full_url)}: redirected to {redact(newurl)}, off https://; a download with no checksum "
                "known beforehand stays on https (give --sha256 HEX to pin the file)"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _stream(url: str, tmp: str, timeout: float, pinned: bool) -> Fetched:
    """One GET of ``url`` into ``tmp``: the body hashed as it is written, its length checked against the limit."""
    limit = env_number("GEOSEG_MAX_MODEL_BYTES", MAX_BYTES)
    request = urllib.request.Request(url, headers={"User-Agent": "geoseg"})
    opener = urllib.request.build_opener(_Redirects(pinned))
    h, size = hashlib.sha256(), 0
    with opener.open(request, timeout=timeout) as resp, open(tmp, "xb") as out:
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
