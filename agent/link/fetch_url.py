"""The URL transport: a model file fetched from ``https``, ``http`` or ``file`` URLs.

Schemes are allowed by ``transfer.allowed_schemes`` and hosts by
``transfer.allowed_hosts``, redirects included. The body is streamed to disk and
never read past the manifest's size; an interrupted HTTP download is resumed with a
``Range`` request (``transfer.resume_attempts`` times).

Every blocking step gives way to a stop within about a second: connecting polls the
socket in short slices, each read's timeout ends at the deadline, and
``interrupt()`` shuts down the live sockets so a read that waits on a silent server
returns at once.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import select
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

from agent import protocol as p
from agent.config import DownloadConfig, TransferConfig
from agent.link.delivery import POLL_S, Delivery, fail, storage_failed

log = logging.getLogger(__name__)

_READ = 64 * 1024
_COPY = 1 << 20


def _shown(text: object, limit: int = 200) -> str:
    """Untrusted text (a URL, a server's reason) quoted and cut, for messages and logs."""
    return repr(str(text)[:limit])


class _Sockets:
    """The sockets of one fetch, so another thread can shut them down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: list[socket.socket] = []
        self.interrupted = False

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._live.append(sock)
            interrupted = self.interrupted
        if interrupted:
            self._shutdown(sock)

    def latest(self) -> socket.socket | None:
        with self._lock:
            return self._live[-1] if self._live else None

    def clear(self) -> None:
        with self._lock:
            self._live.clear()

    def interrupt(self) -> None:
        with self._lock:
            self.interrupted = True
            live = list(self._live)
        for sock in live:
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            # The plain socket's shutdown, also for an SSLSocket: a blocked read
            # returns at once (EOF) and the TLS object is left for its owner to close.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed, or never connected


class UrlFetcher:
    """Fetches ``UrlArtifact`` files; see the module docstring."""

    def __init__(self, transfer: TransferConfig, download: DownloadConfig) -> None:
        self._transfer = transfer
        self._timeout_s = download.timeout_s
        self._lock = threading.Lock()
        self._running: set[_Sockets] = set()

    def interrupt(self) -> None:
        with self._lock:
            running = list(self._running)
        for sockets in running:
            sockets.interrupt()

    def check_url(self, url: str) -> urllib.parse.SplitResult:
        parsed = urllib.parse.urlsplit(url)
        scheme = parsed.scheme.lower()
        allowed = self._transfer.allowed_schemes
        if scheme not in allowed:
            raise fail(
                f"URL scheme {scheme!r} is not allowed here (transfer.allowed_schemes: "
                f"{', '.join(allowed)})"
            )
        hosts = self._transfer.allowed_hosts
        if scheme != "file" and hosts and (parsed.hostname or "") not in hosts:
            raise fail(f"host {_shown(parsed.hostname)} is not in transfer.allowed_hosts")
        return parsed

    def precheck(self, artifact: p.UrlArtifact, size: int) -> None:
        self.check_url(artifact.url)

    def receive(self, artifact: p.UrlArtifact, delivery: Delivery) -> None:
        parsed = self.check_url(artifact.url)
        delivery.progress("downloading", 0.0)
        if parsed.scheme.lower() == "file":
            self._copy_file(Path(urllib.request.url2pathname(parsed.path)), delivery)
            return
        sockets = _Sockets()
        with self._lock:
            self._running.add(sockets)
        try:
            if delivery.stop.is_set():
                sockets.interrupt()
            self._http_get(artifact.url, delivery, sockets)
        finally:
            with self._lock:
                self._running.discard(sockets)

    # --------------------------------------------------------------------- file://

    def _copy_file(self, source: Path, delivery: Delivery) -> None:
        size = delivery.size
        try:
            total = source.stat().st_size
            if total != size:
                raise fail(
                    f"{_shown(source)} is {total} bytes, the manifest says {size}",
                    p.ReplyCode.CHECKSUM_MISMATCH,
                )
            with source.open("rb") as src, delivery.part.open("wb") as dst:
                done = 0
                while block := src.read(min(_COPY, size + 1 - done)):
                    delivery.check()
                    done += len(block)
                    if done > size:
                        raise fail(
                            f"{_shown(source)} grew past the manifest's {size} bytes",
                            p.ReplyCode.CHECKSUM_MISMATCH,
                        )
                    _write(dst, block)
                    delivery.progress("downloading", 100.0 * done / size)
        except OSError as exc:
            raise fail(f"cannot read {_shown(source)}: {exc.strerror or exc}") from None

    # ------------------------------------------------------------------ http(s)://

    def _http_get(self, url: str, delivery: Delivery, sockets: _Sockets) -> None:
        opener = self._opener(delivery, sockets)
        size = delivery.size
        failures = 0
        while True:
            delivery.check()
            # What is on disk is where a resume starts, however the last attempt ended.
            have = _size_of(delivery.part)
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with opener.open(
                    urllib.request.Request(url, headers=headers), timeout=self._timeout(delivery)
                ) as resp:
                    if have and resp.status != 206:
                        log.info("server ignored the Range request; downloading from the start")
                        have = 0
                    total = self._total(resp, have)
                    if total is not None and total != size:
                        raise fail(
                            f"the server offers {total} bytes, the manifest says {size}",
                            p.ReplyCode.CHECKSUM_MISMATCH,
                        )
                    with delivery.part.open("ab" if have else "wb") as out:
                        have = self._read_body(resp, out, have, delivery, sockets)
                    if have < size:
                        raise http.client.IncompleteRead(b"", size - have)
                    return
            except urllib.error.HTTPError as exc:
                delivery.check()
                if exc.code == 416 and have == size:
                    return
                raise fail(
                    f"download of {_shown(url)} failed: HTTP {exc.code} {_shown(exc.reason, 80)}"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                # A stop or the deadline shows up here as a closed or timed-out socket.
                delivery.check()
                failures += 1
                if failures > self._transfer.resume_attempts:
                    raise fail(
                        f"download of {_shown(url)} failed after {failures} attempt(s): "
                        f"{_shown(exc, 120)}"
                    ) from None
                log.warning(
                    "download of %r interrupted at %d bytes (%r); resuming", url[:200], have, exc
                )
                delivery.wait(min(5.0, 0.2 * failures))
            finally:
                sockets.clear()

    def _read_body(
        self,
        resp: http.client.HTTPResponse,
        out: BinaryIO,
        have: int,
        delivery: Delivery,
        sockets: _Sockets,
    ) -> int:
        size = delivery.size
        while True:
            delivery.check()
            sock = sockets.latest()
            # Python 3.13 closes the connection (and the socket) as soon as Content-Length
            # bytes are read: then the next read1 returns b"" and the socket is no more.
            if sock is not None and not resp.isclosed():
                # One read never outlasts the deadline (nor the stall timeout).
                sock.settimeout(self._timeout(delivery))
            block = resp.read1(_READ)
            if not block:
                return have
            have += len(block)
            if have > size:
                raise fail(
                    f"the server sent more than the manifest's {size} bytes",
                    p.ReplyCode.CHECKSUM_MISMATCH,
                )
            _write(out, block)
            delivery.progress("downloading", min(100.0, 100.0 * have / size))

    def _timeout(self, delivery: Delivery) -> float:
        return max(0.05, min(self._timeout_s, delivery.remaining()))

    def _opener(self, delivery: Delivery, sockets: _Sockets) -> urllib.request.OpenerDirector:
        fetcher = self

        def create_connection(
            address: tuple[str, int], timeout: Any = None, source_address: Any = None
        ) -> socket.socket:
            return _connect(address, fetcher._timeout(delivery), source_address, delivery)

        class Connection(http.client.HTTPConnection):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._create_connection = create_connection

            def connect(self) -> None:
                super().connect()
                sockets.add(self.sock)

        class TlsConnection(http.client.HTTPSConnection):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._create_connection = create_connection

            def connect(self) -> None:
                # HTTPSConnection.connect, with the handshake after the TLS socket is
                # watched: a server that stalls the handshake cannot delay a stop.
                http.client.HTTPConnection.connect(self)
                host = self._tunnel_host or self.host  # type: ignore[attr-defined]
                context: ssl.SSLContext = self._context  # type: ignore[attr-defined]
                self.sock = context.wrap_socket(
                    self.sock, server_hostname=host, do_handshake_on_connect=False
                )
                sockets.add(self.sock)
                self.sock.do_handshake()

        class Http(urllib.request.HTTPHandler):
            def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
                return self.do_open(Connection, req)

        class Https(urllib.request.HTTPSHandler):
            def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
                return self.do_open(TlsConnection, req, context=self._context)  # type: ignore[attr-defined]

        class CheckedRedirects(urllib.request.HTTPRedirectHandler):
            def redirect_request(  # type: ignore[no-untyped-def]
                self, req, fp, code, msg, headers, newurl
            ):
                fetcher.check_url(newurl)
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        return urllib.request.build_opener(Http(), Https(), CheckedRedirects())

    @staticmethod
    def _total(resp: Any, have: int) -> int | None:
        content_range = resp.headers.get("Content-Range")
        if content_range and "/" in content_range:
            tail = content_range.rsplit("/", 1)[1].strip()
            if tail.isdigit() and len(tail) < 20:
                return int(tail)
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and len(length) < 20:
            return int(length) + have
        return None


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _write(out: BinaryIO, block: bytes) -> None:
    try:
        out.write(block)
    except OSError as exc:
        raise storage_failed(exc) from None


def _connect(
    address: tuple[str, int], timeout: float, source_address: Any, delivery: Delivery
) -> socket.socket:
    """``socket.create_connection`` in short slices, so a stop ends a connect too."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _name, target in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            if source_address:
                sock.bind(source_address)
            sock.setblocking(False)
            code = sock.connect_ex(target)
            give_up = time.monotonic() + timeout
            while code in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
                delivery.check()
                left = give_up - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"connecting to {host}:{port} timed out")
                _, writable, _ = select.select([], [sock], [], min(POLL_S, left))
                if writable:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
            sock.settimeout(timeout)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"no address for {host}")
