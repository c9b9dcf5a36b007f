"""Real servers on the loopback address for tests: static files over HTTP with byte ranges.

:func:`range_server` serves a folder at ``http://127.0.0.1:PORT/`` from a thread of the test
process, honouring ``Range: bytes=a-b`` (what GDAL's ``/vsicurl/`` sends for each block), and
records every request so a test can count the bytes it served. Failures can be injected: the
next ``fail_next`` requests for a path answer ``503 Service Unavailable`` (a transient error a
client must retry), paths can answer a redirect (``redirects["/x.onnx"] = "http://..."``), and
with ``tokens`` it acts as a server of signed URLs: a request whose query carries none of them (a URL
whose token was redacted, or an expired one) is answered ``403`` and logged in ``refused``. With ``tls=``
(a :func:`local_tls` pair) it serves ``https://``; clients trust it through ``SSL_CERT_FILE`` naming the
pair's CA. Nothing listens beyond 127.0.0.1; the server stops when the block ends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import re
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass
class Served:
    """What a :func:`range_server` did: its base URL, each request, bytes sent, failures to inject."""

    url: str
    root: Path
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, bytes sent)
    fail_next: dict[str, int] = field(default_factory=dict)  # path -> how many 503s still to answer
    redirects: dict[str, str] = field(default_factory=dict)  # path -> where a 302 sends the client
    tokens: set[str] | None = None  # when set: a request must carry one of them in its query, else 403
    refused: list[str] = field(default_factory=list)  # the request lines answered 403 for want of a token
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bytes_sent(self, path: str | None = None) -> int:
        """Body bytes sent (for ``path``, e.g. ``"/scene.tif"``, or for all paths)."""
        with self.lock:
            return sum(n for _, p, n in self.requests if path is None or p == path)

    def count(self, path: str | None = None) -> int:
        """Requests answered (for ``path`` or all)."""
        with self.lock:
            return sum(1 for _, p, _ in self.requests if path is None or p == path)


def _handler(served: Served) -> type[SimpleHTTPRequestHandler]:
    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(served.root), **kwargs)

        def log_message(self, format: str, *args) -> None:  # quiet test output
            pass

        def _record(self, n: int) -> None:
            with served.lock:
                served.requests.append((self.command, self.path.split("?")[0], n))

        def _injected_failure(self) -> bool:
            path = self.path.split("?")[0]
            with served.lock:
                left = served.fail_next.get(path, 0)
                if left <= 0:
                    return False
                served.fail_next[path] = left - 1
            self.send_response(HTTPStatus.SERVICE_UNAVAILABLE)
            self.send_header("Content-Length", "0")
            self.send_header("Retry-After", "0")
            self.end_headers()
            self._record(0)
            return True

        def _redirected(self) -> bool:
            with served.lock:
                target = served.redirects.get(self.path.split("?")[0])
            if target is None:
                return False
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._record(0)
            return True

        def _unsigned(self) -> bool:
            """Answer 403 (and log it) when tokens are required and the query carries none of them."""
            with served.lock:
                tokens = None if served.tokens is None else set(served.tokens)
            if tokens is None:
                return False
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            if any(v in tokens for values in query.values() for v in values):
                return False
            with served.lock:
                served.refused.append(f"{self.command} {self.path}")
            self.send_response(HTTPStatus.FORBIDDEN)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._record(0)
            return True

        def do_HEAD(self) -> None:
            if not self._unsigned() and not self._injected_failure() and not self._redirected():
                super().do_HEAD()
                self._record(0)

        def do_GET(self) -> None:
            if self._unsigned() or self._injected_failure() or self._redirected():
                return
            target = Path(self.translate_path(self.path))
            m = _RANGE.match(self.headers.get("Range", "").strip())
            if not target.is_file() or m is None:
                f = self.send_head()
                if f:
                    with f:
                        data = f.read()
                    self.wfile.write(data)
                    self._record(len(data))
                return
            size = target.stat().st_size
            first, last = m.group(1), m.group(2)
            if first == "":  # suffix range: the last N bytes
                start, end = max(0, size - int(last or 0)), size - 1
            else:
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
            if start >= size or start > end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self._record(0)
                return
            with target.open("rb") as fh:
                fh.seek(start)
                data = fh.read(end - start + 1)
            st = target.stat()
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-Type", self.guess_type(str(target)))
            self.send_header("ETag", f'"{st.st_size:x}-{st.st_mtime_ns:x}"')  # as static servers and object stores do
            self.send_header("Last-Modified", self.date_time_string(int(st.st_mtime)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self._record(len(data))

    return Handler


@dataclass(frozen=True)
class LocalTLS:
    """A certificate for 127.0.0.1 and its key, signed by a CA made with them (``ca``: what clients trust)."""

    ca: Path
    cert: Path
    key: Path


def local_tls(folder: str | Path) -> LocalTLS:
    """Make a CA and a server certificate for 127.0.0.1 (valid for a day) in ``folder``, with ``cryptography``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    now = dt.datetime.now(dt.timezone.utc)

    def build(subject: str, issuer: str, public, signer, ca: bool, san: bool):
        b = x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        b = b.issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(public)
        b = b.serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        b = b.not_valid_after(now + dt.timedelta(days=1))
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("geoseg test CA", "geoseg test CA", ca_key.public_key(), ca_key, True, False)
    cert = build("127.0.0.1", "geoseg test CA", key.public_key(), ca_key, False, True)
    out = LocalTLS(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    out.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = serialization.PrivateFormat.PKCS8
    out.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, pem, serialization.NoEncryption()))
    return out


@contextlib.contextmanager
def range_server(root: str | Path, tls: LocalTLS | None = None, tokens: Iterable[str] | None = None) -> Iterator[Served]:
    """Serve ``root`` over HTTP (HTTPS with ``tls``) with byte ranges on ``127.0.0.1`` (a free port) for the block.

    Parameters
    ----------
    root : str or Path
        The folder served.
    tokens : iterable of str, optional
        Signed-URL mode: every request must carry one of these as a query value (``?token=T``,
        ``?sig=T``), else it is answered ``403 Forbidden``; ``Served.tokens`` may be changed later
        (a token expires, a new one is issued).

    Yields
    ------
    Served
        ``.url`` (no trailing slash), the request log and the failure injector.
    """
    served = Served(url="", root=Path(root), tokens=None if tokens is None else set(tokens))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    server.daemon_threads = True
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert, tls.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    scheme = "https" if tls is not None else "http"
    served.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test starts as a separate process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
