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

Files that must hold a secret (a VRT naming signed URLs, which GDAL reads by its full URL) are
written only to a private cache folder (:func:`write_private`: mode 0700, files 0600, under
``$GEOSEG_CACHE`` or the user's cache folder), never into an output folder.

Depends on :mod:`geoseg.errors` only; rasterio is imported inside the functions that need it.
Over 400 lines: the one home of URL logic (paths, redaction, retries and their policy, fingerprints,
private files), most of it docstrings.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from geoseg.errors import OutputError, RasterReadError

__all__ = [
    "PERMANENT_HTTP",
    "REMOTE_GDAL_OPTIONS",
    "RedactFilter",
    "cache_root",
    "env_number",
    "failure_kind",
    "gdal_path",
    "has_secret",
    "is_http_url",
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
    "retry_attempts",
    "retrying",
    "shown_path",
    "with_backoff",
    "write_private",
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
# (an already redacted query, ``?<redacted>``, is matched whole: redacting twice changes nothing)
_IN_TEXT = re.compile(
    r"(?:\b(?:https?|ftp|s3|gs|az)://|/vsi[a-z0-9_]+(?=[/?]))[^\s'\"<>?]*(?:\?(?:<redacted>|[^\s'\"<>]*))?", re.IGNORECASE
)
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
#: The environment variable naming geoseg's cache folder (pulled models, private files).
CACHE_ENV = "GEOSEG_CACHE"
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

#: HTTP statuses no retry will change (a bad request, access denied, not found, gone, a range past the end).
PERMANENT_HTTP = frozenset({400, 401, 403, 404, 405, 410, 416})
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


def is_http_url(path: object) -> bool:
    """Whether ``path`` is an ``http(s)://`` URL (a STAC API, a catalog or a file served over HTTP)."""
    return is_url(path) and os.fspath(path).lower().startswith(("http://", "https://"))  # type: ignore[arg-type]


def has_secret(text: str) -> bool:
    """Whether ``text`` holds a URL with a query or a ``user:password@`` (what :func:`redact` takes out)."""
    return redact(text) != text


def shown_path(path: str | os.PathLike) -> str:
    """How a path is recorded: a local one absolute, a remote one as GDAL reads it with its secrets redacted."""
    text = os.fspath(path)
    return redact(gdal_path(text)) if is_remote(text) else os.path.abspath(text)


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


def remote_gdal_options(*paths: str) -> dict[str, str | int]:
    """:data:`REMOTE_GDAL_OPTIONS` less any key the environment sets itself (the user's settings win).

    When any of ``paths`` (the remote files a read reaches: a URL, or a VRT's sources) is a
    ``/vsicurl/`` URL with a query string (a signed URL), sizes are asked for with a ranged GET
    rather than a HEAD: an S3 URL presigned for GET answers 403 to HEAD.
    """
    options = dict(REMOTE_GDAL_OPTIONS)
    if any("?" in p and _http_url(p) is not None for p in paths):
        options["CPL_VSIL_CURL_USE_HEAD"] = "NO"
    return {k: v for k, v in options.items() if k not in os.environ}


def remote_env(path: str):
    """A :class:`rasterio.Env` with the remote read options for a remote ``path``; a no-op context otherwise."""
    if not is_remote(path):
        return contextlib.nullcontext()
    import rasterio

    return rasterio.Env(**remote_gdal_options(path))


def env_number(name: str, default: float) -> float:
    """The number in environment variable ``name``; ``default`` when it is unset, empty or not a number."""
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


def retry_attempts() -> int:
    """Attempts of a remote request (``GEOSEG_REMOTE_ATTEMPTS``, default :data:`ATTEMPTS`)."""
    return max(1, int(env_number("GEOSEG_REMOTE_ATTEMPTS", ATTEMPTS)))


def with_backoff(
    op: Callable[[], T],
    transient: Callable[[Exception], bool],
    *,
    attempts: int | None = None,
    delay: float | None = None,
    before_retry: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> T:
    """``op()``, tried again after each failure ``transient`` accepts, with exponential back-off and jitter.

    The one retry loop of geoseg's remote requests (GDAL reads, ranged GETs, model downloads) and of
    local reads. A failure ``transient`` refuses, or the last attempt's, is raised as it is: the
    caller words it.

    Parameters
    ----------
    op : callable
        The request.
    transient : callable
        Whether an exception is worth another attempt.
    attempts : int, optional
        Tries in all; default :func:`retry_attempts`.
    delay : float, optional
        First pause in seconds, doubled at each attempt; default ``GEOSEG_REMOTE_RETRY_DELAY`` (1 s).
    before_retry : callable, optional
        A context every attempt after the first runs inside (e.g. GDAL's cache of the failure bypassed).
    """
    attempts = retry_attempts() if attempts is None else max(1, attempts)
    delay = env_number("GEOSEG_REMOTE_RETRY_DELAY", RETRY_DELAY) if delay is None else delay
    for attempt in range(attempts):
        try:
            with before_retry() if attempt and before_retry else contextlib.nullcontext():
                return op()
        except Exception as exc:
            if attempt + 1 >= attempts or not transient(exc):
                raise
        time.sleep(delay * 2**attempt * random.uniform(0.75, 1.25))
    raise AssertionError("unreachable")  # pragma: no cover


def _http_status(text: str) -> int | None:
    m = re.search(r"HTTP (?:response )?(?:code|error|status)[: ]+(\d{3})", text, re.IGNORECASE)
    return int(m.group(1)) if m else None


def failure_kind(text: str) -> str:
    """``permanent`` (not found, access denied, a bad request), else ``transient`` (retried)."""
    status = _http_status(text)
    if status is not None:
        return "permanent" if status in PERMANENT_HTTP else "transient"
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


def retrying(path: str, what: str, op: Callable[[], T], files: Iterable[str] = ()) -> T:
    """Run ``op`` (a read or an open of the remote ``path``), retrying transient failures with back-off.

    Each retry first drops GDAL's cache of the remote files read (``files``, default ``path``),
    so GDAL asks the server again instead of answering from its cache of the failed request. A
    permanent failure (404, 401/403) is raised at once.

    Parameters
    ----------
    path : str
        The GDAL path read (named, redacted, in the message).
    what : str
        What is being done, for the message (``reading rows 0:512, cols 0:512``).
    op : callable
        Does the work; raises :class:`rasterio.errors.RasterioError` on failure.
    files : iterable of str, optional
        The remote GDAL paths ``op`` reads (a VRT's sources); default ``path`` itself.

    Returns
    -------
    The value of ``op``.

    Raises
    ------
    RasterReadError
        A permanent failure, or a transient one that outlasted every attempt.
    """
    from rasterio.errors import RasterioError

    def transient(exc: Exception) -> bool:
        return isinstance(exc, RasterioError) and failure_kind(str(exc)) == "transient"

    fresh = tuple(files) or (path,)
    try:
        return with_backoff(op, transient, before_retry=lambda: _fresh(fresh))
    except RasterioError as exc:
        last = str(exc)
    if failure_kind(last) == "permanent":
        raise permanent_error(path, last) from None
    raise RasterReadError(
        f"{redact(path)}: {what} failed after {retry_attempts()} attempts ({redact(last)}); the server or the network "
        "kept failing: try again later, or raise GEOSEG_REMOTE_ATTEMPTS"
    ) from None


@contextlib.contextmanager
def _fresh(paths: Iterable[str]) -> Iterator[None]:
    """GDAL's cache of each of ``paths`` (a failure it would answer the retry with) bypassed for the retry.

    Exactly these files. ``CPL_VSIL_CURL_NON_CACHED`` names those it can: GDAL splits its value on
    ``:``, so ``/vsicurl/https://host:8080/a.tif`` would become the prefix ``/vsicurl/https`` (no
    caching of any https file); the cache of such a path is dropped instead by GDAL's
    ``VSICurlPartialClearCache``, which takes the path whole (where rasterio's GDAL library cannot
    be reached, the part before the first ``:`` is all GDAL can be given).
    """
    import rasterio

    prefixes = sorted({_vsi_prefix(p) for p in paths if is_remote(p)})
    exact = [p for p in prefixes if ":" not in p]  # /vsis3/bucket/key: GDAL takes it as it is
    unsayable = [p for p in prefixes if ":" in p]  # /vsicurl/https://...: dropped from the cache instead
    clear = _gdal_clear_cache() if unsayable else None
    for p in unsayable if clear is not None else ():
        clear(os.fsencode(p))
    if unsayable and clear is None:
        exact = sorted({p.split(":", 1)[0] for p in prefixes})
    with rasterio.Env(CPL_VSIL_CURL_NON_CACHED=":".join(exact)) if exact else contextlib.nullcontext():
        yield


def _vsi_prefix(path: str) -> str:
    """``path`` as GDAL's cache keys it: the ``/vsi...`` path, query left out (every token of one file)."""
    return gdal_path(path).split("?", 1)[0]


_CLEAR_CACHE: list = []


def _gdal_clear_cache() -> Callable[[bytes], None] | None:
    """GDAL's ``VSICurlPartialClearCache`` in the GDAL library rasterio loaded (None where it cannot be found)."""
    if _CLEAR_CACHE:
        return _CLEAR_CACHE[0]
    fn = None
    try:
        import ctypes
        import glob

        import rasterio

        base = os.path.dirname(rasterio.__file__)
        found = sorted(glob.glob(os.path.join(base + ".libs", "libgdal*.so*")))  # manylinux wheels
        found += sorted(glob.glob(os.path.join(base, ".dylibs", "libgdal*.dylib")))  # macOS wheels
        if not found and sys.platform.startswith("linux"):  # a GDAL of the system or conda: the one mapped here
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
                found = sorted({ln.split()[-1] for ln in maps if "/libgdal" in ln})
        if found:
            fn = ctypes.CDLL(found[0]).VSICurlPartialClearCache
            fn.argtypes, fn.restype = [ctypes.c_char_p], None
    except (OSError, AttributeError, ImportError):
        fn = None
    _CLEAR_CACHE.append(fn)
    return fn


def _http_url(path: str) -> str | None:
    """The http(s) URL behind a ``/vsicurl/`` path or URL; None for other file systems."""
    if is_http_url(path):
        return path
    if path.startswith("/vsicurl/") and path[9:].lower().startswith(("http://", "https://")):
        return path[9:]
    return None


def _transient_http(exc: Exception) -> bool:
    """A failed HTTP request worth another try: 429 and 5xx, timeouts, dropped connections."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code not in PERMANENT_HTTP
    return isinstance(exc, (urllib.error.URLError, OSError))


def _head(url: str, timeout: float = 30.0) -> dict[str, str]:
    """Size, ETag and Last-Modified of ``url`` from a one-byte ranged GET (a signed URL is signed for GET, not HEAD)."""
    request = urllib.request.Request(url, headers={"Range": "bytes=0-0", "User-Agent": "geoseg"})

    def ask() -> dict[str, str]:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # proxies from the environment
            headers = {k.lower(): v for k, v in resp.headers.items()}
            resp.read(1)
        return headers

    try:
        headers = with_backoff(ask, _transient_http)
    except OSError:  # urllib's errors: the fingerprint falls back to the header's digest
        return {}
    total = headers.get("content-range", "").rpartition("/")[2]
    size = total if total.isdigit() else headers.get("content-length", "")
    return {"size": size, "etag": headers.get("etag", ""), "modified": headers.get("last-modified", "")}


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
    header: size, grid, types) and of the redacted path (a token changes nothing).

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
    # the path redacted: a re-signed URL of the same object keeps its fingerprint, and no token is hashed
    digest = hashlib.sha256(f"{redact(path)}\n{header}\n{meta.get('size', '')}".encode(errors="surrogateescape")).hexdigest()
    return f"{redact(path)}:gdal:{digest[:16]}"


def cache_root() -> str:
    """The cache folder: ``$GEOSEG_CACHE``, else the user's cache folder's ``geoseg`` (pulled models, private files)."""
    root = os.environ.get(CACHE_ENV, "").strip()
    if not root:
        if sys.platform == "darwin":
            root = os.path.expanduser("~/Library/Caches/geoseg")
        elif os.name == "nt":
            root = os.path.join(os.environ.get("LOCALAPPDATA", os.path.expanduser("~")), "geoseg", "Cache")
        else:
            root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "geoseg")
    return os.path.abspath(os.path.expanduser(root))


def private_folder() -> str:
    """``<cache>/private``: mode 0700, owned by this user; files holding secrets (signed URLs) live only here."""
    folder = os.path.join(cache_root(), "private")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
        if os.path.islink(folder) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            raise OutputError(f"{folder}: not a folder of this user; remove it (geoseg keeps signed URLs there)")
        if st.st_mode & 0o077:
            os.chmod(folder, 0o700)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot make the private cache folder ({exc.strerror or exc}); set {CACHE_ENV}") from None
    return folder


def write_private(name: str, text: str) -> str:
    """Write ``text`` (it holds secrets) as ``name`` in :func:`private_folder`, mode 0600, atomically.

    An unchanged file is left as it is. Returns its path.
    """
    path = os.path.join(private_folder(), name)
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text and not os.path.islink(path):
                return path
    except (OSError, UnicodeDecodeError):
        pass
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OutputError(f"{path}: could not write it ({exc.strerror or exc}); check {CACHE_ENV}") from None
    return path


class RedactFilter(logging.Filter):
    """A logging filter that takes every URL's query and ``user:password@`` out of a record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record``'s message (its arguments merged in) and exception text with secrets redacted."""
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:
            import traceback

            text = "".join(traceback.format_exception(*record.exc_info))
            if has_secret(text):
                record.exc_text, record.exc_info = redact(text).rstrip("\n"), None
        return True
