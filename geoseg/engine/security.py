"""Who may connect to the cluster geoseg uses, and how.

The local cluster is its owner's alone: every connection (client, scheduler, workers,
nannies) is TLS with mutual certificate checks against a key pair made in memory for this
cluster (:func:`local_security`), every listener is on 127.0.0.1, and the HTTP server Dask
always starts serves nothing unless the dashboard is asked for (``GEOSEG_DASHBOARD``,
:func:`dashboard_address`), and then only on 127.0.0.1. Another local user who finds the
ports cannot connect: a client without the cluster's certificate is refused during the
handshake. A user's own scheduler is reached at a checked address (:func:`check_address`),
with TLS from the Dask config for ``tls://`` (:func:`connect`).
"""

from __future__ import annotations

import os
import re

from geoseg.errors import GeosegError, InputError

__all__ = ["DASHBOARD_ENV", "check_address", "connect", "dashboard_address", "local_security"]

#: environment variable that turns the Dask dashboard on (``on`` or a port); it only ever listens on 127.0.0.1
DASHBOARD_ENV = "GEOSEG_DASHBOARD"

_ADDRESS = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+))(?::(?P<port>\d{1,5}))?"
)


def check_address(address: str) -> tuple[str, str, int]:
    """Validate the address of a running Dask scheduler.

    Parameters
    ----------
    address : str
        ``tcp://HOST[:PORT]`` or ``tls://HOST[:PORT]`` (IPv6 hosts in brackets; port 8786 by default).

    Returns
    -------
    tuple of (str, str, int)
        Scheme, host and port.

    Raises
    ------
    InputError
        Another scheme, no host, a port outside 1-65535, unbalanced brackets.
    """
    shown = address if len(address) <= 80 else address[:77] + "..."
    scheme = address.partition("://")[0]
    if scheme not in ("tcp", "tls"):
        raise InputError(
            f"kind={shown!r}: {scheme or '(no scheme)'}:// is not supported; give tcp://HOST:PORT "
            "(or tls://HOST:PORT) of a running Dask scheduler, or local, threads or synchronous"
        )
    m = _ADDRESS.fullmatch(address)
    port = int(m["port"]) if m and m["port"] else 8786
    if not m or not 1 <= port <= 65535:
        raise InputError(
            f"kind={shown!r} is not a scheduler address; give {scheme}://HOST:PORT, e.g. {scheme}://10.0.0.5:8786 "
            f"or {scheme}://[::1]:8786 (port 1-65535)"
        )
    return scheme, m["v6"] or m["host"], port


def connect(address: str):
    """A client of the user's running Dask scheduler at ``address``.

    Parameters
    ----------
    address : str
        ``tcp://HOST[:PORT]``, or ``tls://HOST[:PORT]`` with the certificates in the Dask config.

    Returns
    -------
    distributed.Client

    Raises
    ------
    InputError
        A malformed address (:func:`check_address`), unusable TLS settings, no scheduler answering.
    """
    from distributed import Client

    scheme, _, _ = check_address(address)
    security = _remote_security(address, scheme)
    try:
        return Client(address, timeout="20s", security=security)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise InputError(
            f"no Dask scheduler answers at {address} ({_one_line(exc)}); start one with `dask scheduler` or use kind='local'"
        ) from None


def _remote_security(address: str, scheme: str):
    """TLS settings for a user's scheduler: ``tls://`` takes them from the Dask config (or its environment variables)."""
    from distributed.security import Security

    try:
        security = Security()
        if scheme == "tls" and security.get_connection_args("client").get("ssl_context") is None:
            raise InputError(
                f"kind={address}: tls:// needs the cluster's certificates in the Dask config: set "
                "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and "
                "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY (or distributed.comm.tls.* in ~/.config/dask)"
            )
    except (OSError, ValueError, TypeError) as exc:
        if isinstance(exc, GeosegError):
            raise
        raise InputError(
            f"kind={address}: the Dask TLS settings cannot be used ({_one_line(exc)}); fix distributed.comm.tls.*"
        ) from None
    return security


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def dashboard_address(value: str | None = None) -> str | None:
    """Where the Dask dashboard of a local cluster listens: ``None`` (off, the default) or ``127.0.0.1:PORT``.

    Parameters
    ----------
    value : str, optional
        ``off``/``0``/empty, ``on`` (a free port) or a port number 1024-65535 [the
        ``GEOSEG_DASHBOARD`` environment variable].

    Returns
    -------
    str or None

    Raises
    ------
    InputError
        Any other value (a host is not accepted: the dashboard is never reachable from other machines).
    """
    raw = os.environ.get(DASHBOARD_ENV, "") if value is None else value
    v = raw.strip().lower()
    if v in ("", "0", "off", "no", "false"):
        return None
    if v in ("on", "1", "yes", "true", "auto"):
        return "127.0.0.1:0"
    if v.isdigit() and 1024 <= int(v) <= 65535:
        return f"127.0.0.1:{int(v)}"
    raise InputError(
        f"{DASHBOARD_ENV}={raw[:40]!r}: give on, off or a port number 1024-65535 (the dashboard listens on 127.0.0.1 only)"
    )


def local_security():
    """A key pair made in memory for one local cluster (``distributed.Security.temporary()``)."""
    try:
        from distributed.security import Security

        return Security.temporary()
    except ImportError:
        raise InputError(
            "the local cluster needs the 'cryptography' package for its TLS credentials; "
            "pip install cryptography (or use kind='threads')"
        ) from None
