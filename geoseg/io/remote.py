"""Rasters behind a URL: GDAL paths, the GDAL configuration of remote reads, retries, redaction, fingerprints.

``https://``, ``http://`` and ``ftp://`` URLs become GDAL's ``/vsicurl/`` paths, ``s3://``
``/vsis3/``, ``gs://`` ``/vsigs/`` and ``az://`` ``/vsiaz/``; ``/vsi...`` paths pass through.
Nothing is downloaded whole: every read task opens the path under :func:`remote_gdal_options`
and GDAL fetches the byte ranges of the blocks it needs (a COG's header, then its tiles).

Credentials come only from the environment GDAL itself reads: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` / ``AWS_PROFILE`` / ``AWS_REGION`` (or
``AWS_NO_SIGN_REQUEST=YES`` for public buckets), ``GOOGLE_APPLICATION_CREDENTIALS`` or
``GS_ACCESS_KEY_ID``/``GS_SECRET_ACCESS_KEY``, ``AZURE_STORAGE_CONNECTION_STRING`` or
``AZURE_STORAGE_ACCOUNT`` with ``AZURE_STORAGE_ACCESS_KEY``/``AZURE_STORAGE_SAS_TOKEN``;
proxies from ``HTTP_PROXY``/``HTTPS_PROXY``. geoseg never records them.

A URL's query string (a signed URL's ``X-Amz-Signature``, an Azure SAS ``sig``, any token) and
any ``user:password@`` are secrets: :func:`redact` takes them out of every path and message
geoseg shows or writes (run.json, the ledger, summaries, logs, errors). The full URL travels
only inside the :class:`~geoseg.io.raster.RasterSource` that tasks read with.

Transient failures (HTTP 429 and 5xx, timeouts, dropped connections) are retried by GDAL
(``GDAL_HTTP_MAX_RETRY``) and then again by :func:`retrying` with exponential back-off, each
retry bypassing GDAL's cache of the failed request; permanent ones (404, 401/403) fail at once
with one line naming the (redacted) URL and the fix.

Depends on :mod:`geoseg.errors` only; rasterio is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import TypeVar

from geoseg.errors import RasterReadError

__all__ = [
    "REMOTE_GDAL_OPTIONS",
    "failure_kind",
    "gdal_path",
    "is_redacted",
    "is_remote",
    "is_url",
    "permanent_error",
    "redact",
    "remote_env",
    "remote_fingerprint",
    "remote_gdal_options",
    "remote_name",
    "remote_stat",
    "retrying",
]

T = TypeVar("T")

#: URL schemes geoseg maps onto GDAL's network file systems.
SCHEMES = {"http": "/vsicurl/", "https": "/vsicurl/", "ftp": "/vsicurl/", "s3": "/vsis3/", "gs": "/vsigs/", "az": "/vsiaz/"}
#: GDAL file systems that reach the network (a path holding one, even nested in /vsizip/, is remote).
_NETWORK_VSI = re.compile(
    r"/vsi(curl|curl_streaming|s3|s3_streaming|gs|gs_streaming|az|az_streaming|adls|oss|oss_streaming|swift|"
    r"swift_streaming|webhdfs|hdfs)(/|\?)"
)
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.+)$")
# a URL or network /vsi path inside free text (an error message, a log line)
_IN_TEXT = re.compile(r"(?:\b(?:https?|ftp|s3|gs|az)://|/vsi[a-z0-9_]+[/?])[^\s'\"<>]*")
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
#: What a URL's query becomes in everything geoseg shows or writes.
REDACTED = "<redacted>"

#: GDAL configuration of every remote read (the environment wins where it sets a key itself).
REMOTE_GDAL_OPTIONS: dict[str, str | int] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # never list the "folder" of a URL (one request per sidecar guess)
    "GDAL_HTTP_MAX_RETRY": 4,  # GDAL's own retries of 429/5xx, back-off doubling from GDAL_HTTP_RETRY_DELAY
    "GDAL_HTTP_RETRY_DELAY": 0.5,
    "GDAL_HTTP_TIMEOUT": 60,
    "GDAL_HTTP_CONNECTTIMEOUT": 15,
    # the ranges of a read one after another, through GDAL's cache: a parallel multi-range read bypasses it, and
    # the masks read next (a nodata mask per band) fetched every block again (3x the bytes for a window of 2 bands)
    "GDAL_HTTP_MULTIRANGE": "SERIAL",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_INGESTED_BYTES_AT_OPEN": 65536,  # a COG's header and tile index in the first request
    "CPL_VSIL_CURL_CACHE_SIZE": 64 * 1024 * 1024,
    "VSI_CACHE": "TRUE",
    "GDAL_HTTP_USERAGENT": "geoseg",
}

#: Attempts of :func:`retrying` (each after GDAL's own retries); ``GEOSEG_REMOTE_ATTEMPTS`` changes it.
ATTEMPTS = 5
#: First back-off in seconds, doubled at each attempt (with jitter); ``GEOSEG_REMOTE_RETRY_DELAY`` changes it.
RETRY_DELAY = 1.0

_PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 416}
_CREDENTIALS = (
    "credentials come from the environment GDAL reads: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
    "(AWS_NO_SIGN_REQUEST=YES for public buckets), GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_CONNECTION_STRING"
)


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL geoseg reads remotely (``http(s)://``, ``ftp://``, ``s3://``, ``gs://``, ``az://``)."""
    m = _URL.match(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
    return bool(m) and m.group("scheme").lower() in SCHEMES


def is_remote(path: object) -> bool:
    """Whether reading ``path`` reaches the network: a URL, or a GDAL path through a network file system."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    text = os.fspath(path)
    return is_url(text) or bool(_NETWORK_VSI.search(text))


def gdal_path(path: str) -> str:
    """What GDAL opens for ``path``: a URL mapped onto its ``/vsi...`` file system; anything else as given.

    Parameters
    ----------
    path : str
        ``https://host/a.tif?sig=...``, ``s3://bucket/key.tif``, ``gs://...``, ``az://container/blob``,
        a ``/vsi...`` path or a local path.

    Returns
    -------
    str
        E.g. ``/vsicurl/https://host/a.tif?sig=...``, ``/vsis3/bucket/key.tif``.
    """
    m = _URL.match(path)
    if not m or m.group("scheme").lower() not in SCHEMES:
        return path
    scheme = m.group("scheme").lower()
    prefix = SCHEMES[scheme]
    return f"{prefix}{path}" if prefix == "/vsicurl/" else f"{prefix}{m.group('rest')}"


def _redact_one(match: re.Match) -> str:
    url = _USERINFO.sub("***@", match.group(0))
    head, sep, _ = url.partition("?")
    return f"{head}?{REDACTED}" if sep else head


def redact(text: str) -> str:
    """``text`` with the query string and ``user:password@`` of every URL in it taken out.

    Signed URLs carry their token in the query (``X-Amz-Signature``, SAS ``sig``, ``token``):
    every path or message geoseg records or shows goes through this.

    Parameters
    ----------
    text : str
        A path, a URL or any message that may hold some.

    Returns
    -------
    str
        The same text, each query replaced by ``?<redacted>``.
    """
    return _IN_TEXT.sub(_redact_one, text)


def is_redacted(path: str) -> bool:
    """Whether ``path`` had a secret taken out by :func:`redact` (it cannot be opened as it stands)."""
    return f"?{REDACTED}" in path


def remote_name(path: str) -> str:
    """The file name at the end of a URL or remote path (query left out), e.g. ``scene.tif``; a local path's basename."""
    if not is_remote(path):
        return os.path.basename(path)
    head = redact(path).split("?", 1)[0].rstrip("/")
    return head.rsplit("/", 1)[-1]


def remote_gdal_options(path: str = "") -> dict[str, str | int]:
    """:data:`REMOTE_GDAL_OPTIONS` less any key the environment sets itself (the user's settings win).

    A ``/vsicurl/`` URL with a query string (a signed URL) is asked for its size with a ranged
    GET rather than a HEAD: an S3 URL presigned for GET answers 403 to HEAD.
    """
    options = dict(REMOTE_GDAL_OPTIONS)
    if "?" in path and _http_url(path) is not None:
        options["CPL_VSIL_CURL_USE_HEAD"] = "NO"
    return {k: v for k, v in options.items() if k not in os.environ}


def remote_env(path: str):
    """A :class:`rasterio.Env` with the remote read options for a remote ``path``; a no-op context otherwise."""
    if not is_remote(path):
        return contextlib.nullcontext()
    import rasterio

    return rasterio.Env(**remote_gdal_options(path))


def _number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


def _http_status(text: str) -> int | None:
    m = re.search(r"HTTP (?:response )?(?:code|error|status)[: ]+(\d{3})", text, re.IGNORECASE)
    return int(m.group(1)) if m else None


def failure_kind(text: str) -> str:
    """``permanent`` (not found, access denied, a bad request), else ``transient`` (retried)."""
    status = _http_status(text)
    if status is not None:
        return "permanent" if status in _PERMANENT_HTTP else "transient"
    lowered = text.lower()
    if any(w in lowered for w in ("does not exist", "no such file", "nosuchkey", "nosuchbucket", "not recognized as")):
        return "permanent"
    if any(w in lowered for w in ("accessdenied", "access denied", "invalidaccesskeyid", "signaturedoesnotmatch")):
        return "permanent"
    return "transient"


def permanent_error(path: str, text: str) -> RasterReadError:
    """One line for a request that will not succeed by retrying: the redacted URL, what happened, the fix."""
    shown, status = redact(path), _http_status(text)
    lowered = text.lower()
    if status in (401, 403) or "denied" in lowered or "signature" in lowered or "accesskey" in lowered:
        code = f"HTTP {status}" if status else "access denied"
        return RasterReadError(
            f"{shown}: access denied ({code}); a signed URL may have expired (sign it again), otherwise {_CREDENTIALS}"
        )
    if status is None and "not recognized as" in lowered and "exist" not in lowered:
        return RasterReadError(
            f"{shown}: not a raster GDAL can open ({redact(text)}); check the URL names the file itself (a COG or GeoTIFF)"
        )
    if status in (404, 410) or "exist" in lowered or "nosuch" in lowered:
        code = f"HTTP {status}" if status else "not found"
        return RasterReadError(f"{shown}: not found ({code}); check the URL (bucket, key, spelling)")
    return RasterReadError(f"{shown}: the server refused the request ({redact(text)}); check the URL")


def retrying(path: str, what: str, op: Callable[[], T]) -> T:
    """Run ``op`` (a read or an open of the remote ``path``), retrying transient failures with back-off.

    Each retry runs with ``CPL_VSIL_CURL_NON_CACHED`` set for the path, so GDAL asks the server
    again instead of answering from its cache of the failed request. A permanent failure (404,
    401/403) is raised at once.

    Parameters
    ----------
    path : str
        The GDAL path read (for the cache bypass and, redacted, the message).
    what : str
        What is being done, for the message (``reading rows 0:512, cols 0:512``).
    op : callable
        Does the work; raises :class:`rasterio.errors.RasterioError` on failure.

    Returns
    -------
    The value of ``op``.

    Raises
    ------
    RasterReadError
        A permanent failure, or a transient one that outlasted every attempt.
    """
    import rasterio
    from rasterio.errors import RasterioError

    attempts = max(1, int(_number("GEOSEG_REMOTE_ATTEMPTS", ATTEMPTS)))
    delay = _number("GEOSEG_REMOTE_RETRY_DELAY", RETRY_DELAY)
    last = ""
    for attempt in range(attempts):
        try:
            with _fresh(path, rasterio) if attempt else contextlib.nullcontext():
                return op()
        except RasterioError as exc:
            last = str(exc)
            if failure_kind(last) == "permanent":
                raise permanent_error(path, last) from None
            if attempt + 1 < attempts:
                time.sleep(delay * 2**attempt * random.uniform(0.75, 1.25))
    raise RasterReadError(
        f"{redact(path)}: {what} failed after {attempts} attempts ({redact(last)}); the server or the network kept "
        "failing: try again later, or raise GEOSEG_REMOTE_ATTEMPTS"
    )


@contextlib.contextmanager
def _fresh(path: str, rasterio) -> Iterator[None]:
    """GDAL's cache of ``path`` bypassed (a cached failure would fail the retry without asking the server)."""
    with rasterio.Env(CPL_VSIL_CURL_NON_CACHED=path.split("?", 1)[0]):
        yield


def _http_url(path: str) -> str | None:
    """The http(s) URL behind a ``/vsicurl/`` path or URL; None for other file systems."""
    if is_url(path) and path.lower().startswith(("http://", "https://")):
        return path
    if path.startswith("/vsicurl/") and path[9:].lower().startswith(("http://", "https://")):
        return path[9:]
    return None


def _head(url: str, timeout: float = 30.0) -> dict[str, str]:
    """Size, ETag and Last-Modified of ``url`` from a one-byte ranged GET (a signed URL is signed for GET, not HEAD)."""
    request = urllib.request.Request(url, headers={"Range": "bytes=0-0", "User-Agent": "geoseg"})
    attempts = max(1, int(_number("GEOSEG_REMOTE_ATTEMPTS", ATTEMPTS)))
    delay = _number("GEOSEG_REMOTE_RETRY_DELAY", RETRY_DELAY)
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:  # proxies from the environment
                headers = {k.lower(): v for k, v in resp.headers.items()}
                resp.read(1)
            total = headers.get("content-range", "").rpartition("/")[2]
            size = total if total.isdigit() else headers.get("content-length", "")
            return {"size": size, "etag": headers.get("etag", ""), "modified": headers.get("last-modified", "")}
        except urllib.error.HTTPError as exc:
            if exc.code in _PERMANENT_HTTP or attempt + 1 == attempts:
                return {}
        except (urllib.error.URLError, OSError):
            if attempt + 1 == attempts:
                return {}
        time.sleep(delay * 2**attempt)
    return {}


def remote_stat(path: str) -> dict[str, str]:
    """``size``, ``etag`` and ``modified`` of the http(s) file behind ``path`` (empty for other file systems,
    or when the server does not answer); one small request, never the file.
    """
    url = _http_url(path)
    return _head(url) if url else {}


def remote_fingerprint(path: str, header: str = "", stat: dict[str, str] | None = None) -> str:
    """What identifies the content of a remote raster without downloading it, secrets left out.

    For http(s): ``size`` plus the ``ETag`` and ``Last-Modified`` the server gives for a
    one-byte ranged request. Other file systems (``/vsis3/``, ``/vsigs/``, ``/vsiaz/``) and
    servers that give neither: a digest of ``header`` (the caller's summary of the dataset's
    header: size, grid, types) and of the full path, so a different object never shares a
    fingerprint (the digest holds no readable token).

    Parameters
    ----------
    path : str
        The GDAL path.
    header : str
        The dataset header's summary, when the caller has it.
    stat : dict, optional
        :func:`remote_stat` of ``path`` when the caller already asked.

    Returns
    -------
    str
        ``<redacted path>:<size>:<etag or last-modified>`` or ``<redacted path>:gdal:<digest>``.
    """
    meta = remote_stat(path) if stat is None else stat
    stamp = meta.get("etag") or meta.get("modified")
    if meta.get("size") and stamp:
        return f"{redact(path)}:{meta['size']}:{stamp}"
    digest = hashlib.sha256(f"{path}\n{header}\n{meta.get('size', '')}".encode(errors="surrogateescape")).hexdigest()
    return f"{redact(path)}:gdal:{digest[:16]}"
