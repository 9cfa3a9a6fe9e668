"""Making a bundle's model file reachable by devices: a built-in HTTP server, or chunks over MQTT.

``offer_artifact`` is the one place that builds the ``artifact`` of a deploy
command, so a new artifact kind of the protocol is added here only.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO, Literal, Protocol
from urllib.parse import quote

from agent.models.manifest import Bundle
from agent.protocol import (
    MAX_COMMAND_BYTES,
    MIN_CHUNK_BYTES,
    Artifact,
    Chunk,
    ChunkRequest,
    MqttArtifact,
    ProtocolError,
    Topics,
    UrlArtifact,
    decode_message,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 64 * 1024
# Chunk requests that arrive within this window share one round of chunks.
CHUNK_SETTLE_S = 0.3


def parse_bind(text: str, default_host: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``:PORT``; port 0 picks a free one."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, "0"
    try:
        port = int(port_text or "0")
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ValueError(f"bind address {text!r}: expected HOST:PORT") from None
    return host.strip("[]") or default_host, port


# ------------------------------------------------------------------------- HTTP


class ArtifactServer:
    """Serves one file at ``/<name>/<version>/model.tflite`` until stopped."""

    def __init__(self, model_path: Path, url_path: str, bind: tuple[str, int], advertise: str):
        self.model_path = model_path
        self.url_path = url_path
        self.bind = bind
        self.advertise = advertise
        self.downloads = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Bind and serve in a thread; returns the URL devices are given."""
        server = ThreadingHTTPServer(self.bind, self._handler_class())
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="artifact-http"
        )
        self._thread.start()
        host = f"[{self.advertise}]" if ":" in self.advertise else self.advertise
        return f"http://{host}:{server.server_address[1]}{self.url_path}"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._serve(body=True)

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def _serve(self, body: bool) -> None:
                if self.path != owner.url_path:
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                size = owner.model_path.stat().st_size
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                if body:
                    with owner.model_path.open("rb") as f:
                        shutil.copyfileobj(f, self.wfile, 64 * 1024)
                    owner.downloads += 1

            def log_message(self, format: str, *args: object) -> None:
                log.debug("artifact http: %s", format % args)

        return Handler


# ------------------------------------------------------------------------- MQTT

# (topic, callback of each payload): how the publisher hears ChunkRequests. The
# subscription is confirmed by the broker when the call returns.
Subscribe = Callable[[str, Callable[[bytes], None]], None]


def chunk_count(size: int, chunk_size: int) -> int:
    return max(1, math.ceil(size / chunk_size))


def chunk_message(
    f: BinaryIO, topics: Topics, transfer_id: str, chunk_size: int, index: int, total: int
) -> tuple[str, bytes]:
    """(topic, payload) of chunk ``index`` of an open file: its bytes and their sha256."""
    f.seek(index * chunk_size)
    data = f.read(chunk_size)
    chunk = Chunk(
        transfer_id=transfer_id,
        index=index,
        total=total,
        data=base64.b64encode(data).decode("ascii"),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return topics.transfer(transfer_id), chunk.to_bytes()


def chunk_messages(
    path: Path, topics: Topics, transfer_id: str, chunk_size: int
) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) of every ``Chunk`` of a file, read one chunk at a time."""
    total = chunk_count(path.stat().st_size, chunk_size)
    with path.open("rb") as f:
        for index in range(total):
            yield chunk_message(f, topics, transfer_id, chunk_size, index, total)


class ChunkPublisher:
    """Sends a file's chunks whenever devices ask for them, from its own thread.

    Devices subscribe to the transfer topic when they start the transfer and at
    once publish a ``ChunkRequest`` listing what they lack (then again after a
    silence). Chunks are not retained, so a chunk published before a device
    listened is lost to it: chunks go out only in answer to requests, which come
    after the device's subscription, so no timing can lose one for good. Requests
    that arrive close together share one round (the union of what they list).
    """

    def __init__(
        self,
        publish_many: Callable[[list[tuple[str, bytes]]], None],
        subscribe: Subscribe,
        path: Path,
        topics: Topics,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        transfer_id: str | None = None,
    ) -> None:
        if not 0 < chunk_size <= MAX_COMMAND_BYTES:
            raise ValueError(f"chunk size must be 1..{MAX_COMMAND_BYTES} bytes")
        # Devices refuse smaller chunks of a file that takes more than one.
        chunk_size = max(chunk_size, MIN_CHUNK_BYTES)
        self._publish_many = publish_many
        self._subscribe = subscribe
        self.path = path
        self.topics = topics
        self.chunk_size = chunk_size
        self.transfer_id = transfer_id or f"t-{uuid.uuid4().hex[:12]}"
        self.chunks = chunk_count(path.stat().st_size, chunk_size)
        self.rounds = 0
        self.requests = 0
        self.sent = 0
        self.error: str | None = None
        self._lock = threading.Lock()
        self._wanted: set[int] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chunk-publisher", daemon=True)

    def artifact(self) -> MqttArtifact:
        return MqttArtifact(
            transfer_id=self.transfer_id, chunk_size=self.chunk_size, chunks=self.chunks
        )

    def start(self) -> None:
        """Listen for requests (confirmed by the broker), then serve them."""
        self._subscribe(self.topics.transfer_missing(self.transfer_id), self.on_request)
        self._thread.start()

    def on_request(self, payload: bytes) -> None:
        """A ``ChunkRequest`` arrived (called on the MQTT thread: never blocks)."""
        try:
            request = decode_message(payload, ChunkRequest, MAX_COMMAND_BYTES, from_device=True)
        except ProtocolError as err:
            log.warning("ignored an invalid chunk request: %s", err.message)
            return
        if request.transfer_id != self.transfer_id:
            return
        wanted = {i for i in request.missing if i < self.chunks}
        log.debug("%s asks for %d chunk(s)", request.device, len(wanted))
        self.request(wanted)

    def request(self, indexes: Iterable[int] | None = None) -> None:
        """Queue chunks for the next round (all of them by default)."""
        with self._lock:
            self._wanted.update(range(self.chunks) if indexes is None else indexes)
            self.requests += 1
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def publish(self, indexes: Iterable[int]) -> None:
        with self.path.open("rb") as f:
            messages = [
                chunk_message(f, self.topics, self.transfer_id, self.chunk_size, i, self.chunks)
                for i in sorted(indexes)
            ]
        self._publish_many(messages)
        self.rounds += 1
        self.sent += len(messages)
        log.info("published %d chunk(s) of transfer %s", len(messages), self.transfer_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(0.5) or self._stop.is_set():
                continue
            self._stop.wait(CHUNK_SETTLE_S)
            with self._lock:
                self._wake.clear()
                wanted, self._wanted = self._wanted, set()
            if not wanted:
                continue
            try:
                self.publish(wanted)
            except Exception as exc:  # the deploy shows the devices' timeouts; say why
                self.error = str(exc)
                log.warning("chunk transfer %s failed: %s", self.transfer_id, exc)


# ---------------------------------------------------------------------- offers


class ArtifactOffer(Protocol):
    """A model file made reachable for the length of a deploy."""

    artifact: Artifact

    def close(self) -> None: ...


class UrlOffer:
    """A URL the operator already serves (object storage, a CDN), or our HTTP server."""

    def __init__(self, url: str, server: ArtifactServer | None = None) -> None:
        self.artifact: Artifact = UrlArtifact(url=url)
        self.server = server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


class MqttOffer:
    def __init__(self, publisher: ChunkPublisher) -> None:
        self.publisher = publisher
        self.artifact: Artifact = publisher.artifact()
        publisher.start()

    def close(self) -> None:
        self.publisher.stop()


def offer_artifact(
    bundle: Bundle,
    via: Literal["http", "mqtt"],
    *,
    topics: Topics,
    publish_many: Callable[[list[tuple[str, bytes]]], None],
    subscribe: Subscribe,
    advertise: str,
    bind: tuple[str, int],
    url: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ArtifactOffer:
    """Start serving the bundle's model file the chosen way."""
    if via == "mqtt":
        return MqttOffer(
            ChunkPublisher(publish_many, subscribe, bundle.model_path, topics, chunk_size)
        )
    if url is not None:
        return UrlOffer(url)
    m = bundle.manifest
    path = f"/{quote(m.name)}/{quote(m.version)}/model.tflite"
    server = ArtifactServer(bundle.model_path, path, bind, advertise)
    return UrlOffer(server.start(), server)
