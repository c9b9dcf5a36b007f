"""STAC over HTTP with bounded waits: static catalogs read by pystac and STAC APIs opened with pystac-client.

Every request has a timeout (to connect, and between bytes of the answer). An answer of 429 or
5xx, a dropped connection or a timeout is retried with exponential back-off (a server's
``Retry-After`` is honoured up to :data:`RETRY_AFTER_MAX_S`), so a busy API's 503 does not fail
a search; searches are read-only, so POSTed ones are retried too. What still fails after the
last attempt reaches the caller as one error naming the (redacted) URL.
"""

from __future__ import annotations

import functools
from typing import Any

from geoseg.errors import InputError
from geoseg.io.remote import redact

__all__ = ["API_TIMEOUT_S", "CATALOG_TIMEOUT_S", "catalog_io", "http_retry", "open_client", "read_catalog"]

#: Seconds a STAC API may take to connect, or to send the next bytes of one answer.
API_TIMEOUT_S = 60.0
#: Seconds a static catalog's file over HTTP may take to connect, or to send its next bytes.
CATALOG_TIMEOUT_S = 60.0
#: Retries of one request after a 429/5xx answer, a dropped connection or a timeout.
RETRIES = 5
#: Back-off factor in seconds: retries wait 0, 2x, 4x, ... this (at most :data:`BACKOFF_MAX_S`).
BACKOFF_S = 0.5
BACKOFF_MAX_S = 20.0
#: The longest wait a server's ``Retry-After`` may ask for before a retry.
RETRY_AFTER_MAX_S = 30.0
#: Answers that are worth another try: too many requests, and the server's own failures.
RETRY_STATUS = (429, 500, 502, 503, 504)


@functools.cache
def _retry_class() -> type:
    from urllib3.util import Retry

    class CappedRetry(Retry):
        """urllib3's Retry, with a server's ``Retry-After`` capped at :data:`RETRY_AFTER_MAX_S`."""

        def get_retry_after(self, response: Any) -> float | None:
            after = super().get_retry_after(response)
            return None if after is None else min(after, RETRY_AFTER_MAX_S)

    return CappedRetry


def http_retry() -> Any:
    """The retry policy of STAC requests: a ``urllib3.util.Retry`` (429/5xx, connection errors, timeouts, back-off)."""
    return _retry_class()(
        total=RETRIES, backoff_factor=BACKOFF_S, backoff_max=BACKOFF_MAX_S, status_forcelist=RETRY_STATUS,
        allowed_methods=None, respect_retry_after_header=True, raise_on_status=True,
    )  # fmt: skip


def catalog_io() -> Any:
    """A pystac ``StacIO`` for static catalogs: local files as pystac reads them, HTTP(S) with a timeout and retries."""
    import urllib3
    from pystac.stac_io import DefaultStacIO

    pool = urllib3.PoolManager(
        retries=http_retry(), timeout=urllib3.Timeout(connect=CATALOG_TIMEOUT_S, read=CATALOG_TIMEOUT_S),
        headers={"User-Agent": "geoseg"},
    )  # fmt: skip

    class BoundedStacIO(DefaultStacIO):
        def read_text_from_href(self, href: str) -> str:
            if not href.lower().startswith(("http://", "https://")):
                return super().read_text_from_href(href)
            response = pool.request("GET", href, headers=self.headers or None)
            if response.status >= 400:
                raise OSError(f"HTTP {response.status} from {redact(href)}")
            return response.data.decode("utf-8")

    return BoundedStacIO()


def read_catalog(href: str) -> Any:
    """The STAC catalog, collection or item at ``href`` (a file or URL), its children and items read through :func:`catalog_io`.

    Raises whatever pystac, urllib3 or the file system raise; the caller words the error.
    """
    import pystac

    io = catalog_io()
    obj = pystac.read_file(href, stac_io=io)
    if isinstance(obj, pystac.Catalog):  # read again by its class: from_file keeps the StacIO for the links it follows
        obj = type(obj).from_file(href, stac_io=io)
    return obj


def open_client(url: str) -> Any:
    """The STAC API at ``url`` (its landing page read), every request bounded and retried; one-line errors."""
    from pystac_client import Client
    from pystac_client.stac_api_io import StacApiIO

    io = StacApiIO(timeout=API_TIMEOUT_S, max_retries=http_retry())
    try:
        return Client.open(url, stac_io=io, timeout=API_TIMEOUT_S)
    except Exception as exc:  # requests' and pystac-client's errors: unreachable, not JSON, not STAC
        reason = redact(" ".join(str(exc).split()))[:200]
        raise InputError(
            f"{redact(url)}: not a STAC API geoseg can open ({reason}); check the URL and that the server is up"
        ) from None
