"""Artifact delivery: verify first, bounded, interruptible, and nothing left in tmp/.

HTTP runs against real local servers (http.server in a thread); the chunk path runs
over the in-memory link for the protocol details and over a real Mosquitto for the
deadline and the stop.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import protocol as p
from agent.config import AgentConfig, ConfigError
from agent.link.client import MqttLink
from agent.link.commands import CommandDispatcher
from agent.link.transfer import ArtifactFetcher
from agent.models.manifest import generate_keypair, load_private_key, sign_manifest
from fleet.serve import ChunkPublisher
from tests.link_support import (
    FakeLink,
    FakeTarget,
    make_config,
    make_pki,
    model_manifest,
    wait_until,
)
from tests.mqtt_support import Broker

Progress = Callable[[str, float | None], None]


def no_progress(stage: str, percent: float | None) -> None:
    pass


def tmp_files(config: AgentConfig) -> list[str]:
    tmp = config.state_dir / "tmp"
    return sorted(f.name for f in tmp.iterdir()) if tmp.exists() else []


# ------------------------------------------------------------------ HTTP servers


class Served(http.server.BaseHTTPRequestHandler):
    """Base of the test handlers: records each request's Range header."""

    data = b""
    requests: list[str | None] = []

    def log_message(self, *args: Any) -> None:
        pass


class FlakyHandler(Served):
    """Serves ``data``; the first response stops half-way, later ones honour Range."""

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = self.data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header(
                "Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"
            )
        self.end_headers()
        if len(type(self).requests) == 1:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


class ResetHandler(Served):
    """Honours Range; the first response ends early (EOF), the second is reset (RST)
    part-way through, the third completes."""

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = self.data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header(
                "Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"
            )
        self.end_headers()
        attempt = len(type(self).requests)
        if attempt < 3:
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            if attempt == 2:
                # Linger 0: close with RST, so the client's read fails mid-body.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                time.sleep(0.2)  # let the bytes reach the client before the reset
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(body)


class PlainHandler(Served):
    def do_GET(self) -> None:
        type(self).requests.append(self.headers.get("Range"))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        self.wfile.write(self.data)


class ErrorHandler(Served):
    def do_GET(self) -> None:
        type(self).requests.append(None)
        self.send_error(500, "broken")


class OversendHandler(Served):
    """Sends ``data`` without a Content-Length, closing the connection at the end."""

    def do_GET(self) -> None:
        type(self).requests.append(None)
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(self.data)
        self.close_connection = True


class RedirectHandler(Served):
    """Redirects every request to ``data`` (a URL)."""

    def do_GET(self) -> None:
        type(self).requests.append(None)
        self.send_response(302)
        self.send_header("Location", self.data.decode())
        self.send_header("Content-Length", "0")
        self.end_headers()


class StallHandler(Served):
    """Sends headers and a first block, then nothing until ``release`` is set."""

    release = threading.Event()
    headers_first = True

    def do_GET(self) -> None:
        type(self).requests.append(None)
        if not type(self).headers_first:
            type(self).release.wait(60)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        self.wfile.write(self.data[:1000])
        self.wfile.flush()
        type(self).release.wait(60)


class TrickleHandler(Served):
    """Sends one byte every 50 ms, forever if the client lets it."""

    release = threading.Event()

    def do_GET(self) -> None:
        type(self).requests.append(None)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        for byte in self.data:
            if type(self).release.wait(0.05):
                return
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return


def serve(handler: type[Served], data: bytes) -> Iterator[str]:
    handler.data = data
    handler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/model.tflite"
    finally:
        for event in (getattr(handler, "release", None),):
            if event is not None:
                event.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, bytes]]:
    data = os.urandom(300_000)
    for url in serve(FlakyHandler, data):
        yield url, data


@pytest.fixture
def plain_server() -> Iterator[tuple[str, bytes]]:
    data = os.urandom(50_000)
    for url in serve(PlainHandler, data):
        yield url, data


@pytest.fixture
def stall_server() -> Iterator[tuple[str, bytes]]:
    data = os.urandom(100_000)
    StallHandler.release = threading.Event()
    StallHandler.headers_first = True
    for url in serve(StallHandler, data):
        yield url, data


# ----------------------------------------------------------------------- URLs


def test_interrupted_http_download_resumes_with_range(tmp_path: Path, flaky_server: Any) -> None:
    url, data = flaky_server
    fetcher = ArtifactFetcher(make_config(tmp_path), FakeLink())
    stages: list[tuple[str, float | None]] = []
    path = fetcher.fetch(
        "d1", p.UrlArtifact(url=url), model_manifest(data), lambda s, v: stages.append((s, v))
    )
    assert path.read_bytes() == data
    assert path.parent == tmp_path / "tmp"
    assert FlakyHandler.requests[0] is None
    assert FlakyHandler.requests[1] is not None and FlakyHandler.requests[1] != "bytes=0-"
    assert stages[-1] == ("downloading", 100.0)


def read1_closing_at_the_length(
    original: Callable[[http.client.HTTPResponse, int], bytes],
) -> Callable[[http.client.HTTPResponse, int], bytes]:
    """HTTPResponse.read1 as Python 3.13 has it: the connection closes once Content-Length
    bytes are read (3.11's keeps it open until a read returns b"")."""

    def read1(self: http.client.HTTPResponse, n: int = -1) -> bytes:
        block = original(self, n)
        if self.length == 0 and not self.isclosed():
            self._close_conn()  # type: ignore[attr-defined]
        return block

    return read1


def test_a_download_completes_when_the_last_read_closes_the_connection(
    tmp_path: Path, plain_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Python 3.13 (Raspberry Pi OS Trixie) every download failed with EBADF: the agent
    set a timeout on the socket the response had just closed (found by pi-check trixie)."""
    url, data = plain_server
    monkeypatch.setattr(
        http.client.HTTPResponse,
        "read1",
        read1_closing_at_the_length(http.client.HTTPResponse.read1),
    )
    fetcher = ArtifactFetcher(make_config(tmp_path), FakeLink())
    path = fetcher.fetch("d1", p.UrlArtifact(url=url), model_manifest(data), no_progress)
    assert path.read_bytes() == data
    assert PlainHandler.requests == [None]  # one request: nothing was resumed


def test_a_resume_starts_where_the_file_ends_after_a_reset(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    fetcher = ArtifactFetcher(make_config(tmp_path), FakeLink())
    for url in serve(ResetHandler, data):
        path = fetcher.fetch("d1", p.UrlArtifact(url=url), model_manifest(data), no_progress)
        assert path.read_bytes() == data
        assert len(ResetHandler.requests) == 3, ResetHandler.requests


@pytest.mark.parametrize(
    ("transfer", "url", "words"),
    [
        ({"allowed_schemes": ["https"]}, "http://127.0.0.1:1/m", "scheme 'http' is not allowed"),
        ({"allowed_hosts": ["fleet.example"]}, "http://127.0.0.1:1/m", "not in transfer.allowed"),
        ({}, "file:///etc/hostname", "scheme 'file' is not allowed"),
        ({"resume_attempts": 0}, "http://127.0.0.1:1/m", "failed after 1 attempt"),
    ],
)
def test_refused_and_failed_urls(
    tmp_path: Path, transfer: dict[str, Any], url: str, words: str
) -> None:
    config = make_config(tmp_path, transfer=transfer)
    fetcher = ArtifactFetcher(config, FakeLink())
    with pytest.raises(p.CommandFailed) as err:
        fetcher.fetch("d1", p.UrlArtifact(url=url), model_manifest(b"x" * 10), no_progress)
    assert err.value.code == p.ReplyCode.DOWNLOAD_FAILED
    assert words in err.value.message
    assert tmp_files(config) == []


def test_a_redirect_to_a_host_not_allowed_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, transfer={"allowed_hosts": ["127.0.0.1"]})
    fetcher = ArtifactFetcher(config, FakeLink())
    for url in serve(RedirectHandler, b"http://fleet.example/model.tflite"):
        with pytest.raises(p.CommandFailed) as err:
            fetcher.fetch("d1", p.UrlArtifact(url=url), model_manifest(b"x" * 10), no_progress)
        assert err.value.code == p.ReplyCode.DOWNLOAD_FAILED
        assert "'fleet.example' is not in transfer.allowed_hosts" in err.value.message
        assert RedirectHandler.requests == [None]
    assert tmp_files(config) == []


def test_the_old_http_kind_is_read_as_url() -> None:
    command = p.decode_command(
        b'{"id": "d", "op": "deploy", "manifest": {}, '
        b'"artifact": {"kind": "http", "url": "http://192.0.2.1/m"}}'
    )
    assert isinstance(command, p.DeployCommand)
    assert isinstance(command.artifact, p.UrlArtifact) and command.artifact.kind == "url"


# ------------------------------------------------------------ verify before fetch


@pytest.fixture
def signing(tmp_path: Path) -> tuple[Any, Path]:
    private, public = generate_keypair()
    (tmp_path / "fleet.pem").write_bytes(private)
    (tmp_path / "fleet.pub").write_bytes(public)
    return load_private_key(tmp_path / "fleet.pem"), tmp_path / "fleet.pub"


def signed_config(tmp_path: Path, pub: Path, **sections: Any) -> AgentConfig:
    return make_config(
        tmp_path / "state",
        models={"require_signature": True, "trusted_keys": [str(pub)]},
        **sections,
    )


def test_unsigned_and_badly_signed_deploys_are_refused_before_any_request(
    tmp_path: Path, plain_server: Any, signing: Any
) -> None:
    url, data = plain_server
    key, pub = signing
    config = signed_config(tmp_path, pub)
    fetcher = ArtifactFetcher(config, FakeLink())
    manifest = model_manifest(data)
    other_key, _ = generate_keypair()
    (tmp_path / "other.pem").write_bytes(other_key)
    wrong = sign_manifest(manifest, load_private_key(tmp_path / "other.pem"))
    with pytest.raises(p.CommandFailed) as err:
        fetcher.fetch("d1", p.UrlArtifact(url=url), manifest, no_progress)
    assert (err.value.code, err.value.message) == (
        p.ReplyCode.BAD_SIGNATURE,
        "bundle is not signed (no manifest.sig)",
    )
    with pytest.raises(p.CommandFailed) as err:
        fetcher.fetch("d1", p.UrlArtifact(url=url), manifest, no_progress, signature=wrong)
    assert err.value.code == p.ReplyCode.BAD_SIGNATURE
    assert "does not verify" in err.value.message
    assert PlainHandler.requests == []
    assert tmp_files(config) == []
    # Signed with the trusted key, the same deploy is fetched.
    path = fetcher.fetch(
        "d2",
        p.UrlArtifact(url=url),
        manifest,
        no_progress,
        signature=sign_manifest(manifest, key),
    )
    assert path.read_bytes() == data and len(PlainHandler.requests) == 1


@pytest.mark.parametrize(
    ("manifest", "code", "words"),
    [
        ({"name": "m", "model": {"size": 10}}, p.ReplyCode.BAD_MANIFEST, "invalid manifest"),
        (
            model_manifest(b"x") | {"model": {"sha256": "0" * 64, "size": 10**9}},
            p.ReplyCode.DOWNLOAD_FAILED,
            "too large: 1000000000 bytes, over models.download.max_bytes (100000)",
        ),
    ],
)
def test_bad_or_too_large_manifests_are_refused_before_any_request(
    tmp_path: Path, plain_server: Any, manifest: dict[str, Any], code: p.ReplyCode, words: str
) -> None:
    url, _data = plain_server
    config = make_config(tmp_path, models={"download": {"max_bytes": 100_000}})
    link = FakeLink()
    fetcher = ArtifactFetcher(config, link)
    artifacts: list[p.UrlArtifact | p.MqttArtifact] = [
        p.UrlArtifact(url=url),
        p.MqttArtifact(transfer_id="t1", chunk_size=1024, chunks=10),
    ]
    for artifact in artifacts:
        with pytest.raises(p.CommandFailed) as err:
            fetcher.fetch("d1", artifact, manifest, no_progress)
        assert err.value.code == code and words in err.value.message
    assert PlainHandler.requests == [] and link.published == [] and link.handlers == {}
    assert tmp_files(config) == []


def test_the_dispatcher_hands_the_signature_to_the_fetcher(tmp_path: Path, signing: Any) -> None:
    key, pub = signing
    config = signed_config(tmp_path, pub, transfer={"allowed_schemes": ["file"]})
    model = tmp_path / "model.tflite"
    model.write_bytes(b"TFL3" * 500)
    manifest = model_manifest(model.read_bytes())
    link = FakeLink()
    target = FakeTarget()
    dispatcher = CommandDispatcher(config, link, target, ArtifactFetcher(config, link))
    dispatcher.start()

    def replies(command_id: str) -> list[dict[str, Any]]:
        return [
            r
            for r in (json.loads(m.payload) for m in link.published if m.topic.endswith("reply"))
            if r["id"] == command_id
        ]

    def final(command_id: str) -> dict[str, Any]:
        link.wait_for(lambda _: any(r["status"] in ("done", "failed") for r in replies(command_id)))
        return next(r for r in replies(command_id) if r["status"] in ("done", "failed"))

    try:
        for command_id, signature in (("unsigned", None), ("signed", sign_manifest(manifest, key))):
            command = {
                "id": command_id,
                "op": "deploy",
                "manifest": manifest,
                "artifact": {"kind": "url", "url": model.as_uri()},
            }
            if signature is not None:
                command["signature"] = signature
            link.deliver("edge/pi-1/cmd", json.dumps(command).encode())
            final(command_id)
        refused = final("unsigned")
        assert refused["code"] == "bad_signature", refused
        assert not any(r.get("stage") == "downloading" for r in replies("unsigned"))
        assert final("signed")["status"] == "done"
        assert target.model_bytes == [model.read_bytes()]
    finally:
        dispatcher.stop()


# --------------------------------------------------------------- nothing left over


def test_tmp_is_emptied_when_the_fetcher_is_built(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    tmp = tmp_path / "tmp"
    (tmp / "old-dir").mkdir(parents=True)
    for name in ("d1.part", "d2.model", "transfer-t1.json", "old-dir/x"):
        (tmp / name).write_bytes(b"left by a killed agent")
    ArtifactFetcher(config, FakeLink())
    assert tmp_files(config) == []


def test_failed_downloads_leave_no_file(tmp_path: Path) -> None:
    data = os.urandom(20_000)
    config = make_config(tmp_path, models={"download": {"max_bytes": 30_000}})
    fetcher = ArtifactFetcher(config, FakeLink())
    manifest = model_manifest(data)
    cases: list[tuple[type[Served], bytes, p.ReplyCode, str]] = [
        (PlainHandler, os.urandom(len(data)), p.ReplyCode.CHECKSUM_MISMATCH, "sha256"),
        # More than the manifest says (and than the cap), with no length to refuse early.
        (OversendHandler, data + os.urandom(20_000), p.ReplyCode.CHECKSUM_MISMATCH, "more than"),
        (PlainHandler, data[:-1] + data[:2], p.ReplyCode.CHECKSUM_MISMATCH, "offers 20001"),
        (ErrorHandler, b"", p.ReplyCode.DOWNLOAD_FAILED, "HTTP 500"),
    ]
    for handler, served, code, words in cases:
        for url in serve(handler, served):
            with pytest.raises(p.CommandFailed) as err:
                fetcher.fetch("d1", p.UrlArtifact(url=url), manifest, no_progress)
            assert (err.value.code, handler) == (code, handler), err.value.message
            assert words in err.value.message
            assert handler.requests, "the server was asked"
            assert tmp_files(config) == [], handler


# ------------------------------------------------------------ prompt stop, deadline


def fetch_in_thread(
    fetcher: ArtifactFetcher, artifact: Any, manifest: dict[str, Any]
) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["path"] = fetcher.fetch("d1", artifact, manifest, no_progress)
        except p.CommandFailed as err:
            outcome["error"] = err

    thread = threading.Thread(target=run, name="test-fetch", daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("headers_first", [True, False], ids=["mid-body", "before-headers"])
def test_stop_ends_a_download_the_server_stalls(
    tmp_path: Path, stall_server: Any, headers_first: bool
) -> None:
    url, data = stall_server
    StallHandler.headers_first = headers_first
    # The stall timeout is a minute: only the stop can end this fetch in time.
    config = make_config(tmp_path, models={"download": {"timeout_s": 60}})
    fetcher = ArtifactFetcher(config, FakeLink())
    thread, outcome = fetch_in_thread(fetcher, p.UrlArtifact(url=url), model_manifest(data))
    wait_until(lambda: StallHandler.requests != [], what="the server was asked")
    if headers_first:
        wait_until(lambda: tmp_files(config) == ["d1.part"], what="the first bytes arrived")
    fetcher.stop()
    thread.join(5)  # generous for a loaded machine; without the fix this takes 60 s
    assert not thread.is_alive(), "fetch did not end after stop()"
    assert "stopping" in outcome["error"].message
    assert tmp_files(config) == []


def test_https_downloads_and_stops_in_the_handshake_and_the_body(
    tmp_path: Path, stall_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _url, data = stall_server
    pki = make_pki(tmp_path / "pki")
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    config = make_config(tmp_path / "state", models={"download": {"timeout_s": 60}})
    fetcher = ArtifactFetcher(config, FakeLink())
    manifest = model_manifest(data)
    PlainHandler.data, PlainHandler.requests = data, []
    servers = []
    for handler in (PlainHandler, StallHandler):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="test-https", daemon=True).start()
        servers.append(server)
    # A listener that never accepts: the TCP connection opens, the TLS handshake stalls.
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        plain, stalled = (f"https://127.0.0.1:{s.server_address[1]}/m" for s in servers)
        fetched = fetcher.fetch("d0", p.UrlArtifact(url=plain), manifest, no_progress)
        assert fetched.read_bytes() == data
        fetched.unlink()
        handshake = f"https://127.0.0.1:{silent.getsockname()[1]}/m"
        for url in (handshake, stalled):
            fetcher = ArtifactFetcher(config, FakeLink())
            thread, outcome = fetch_in_thread(fetcher, p.UrlArtifact(url=url), manifest)
            if url == stalled:
                wait_until(lambda: tmp_files(config) == ["d1.part"], what="the first bytes")
            else:
                thread.join(0.5)  # let it reach the handshake; the stop must end it either way
            fetcher.stop()
            thread.join(5)  # without the fix: the 60 s stall timeout
            assert not thread.is_alive(), url
            assert "stopping" in outcome["error"].message
            assert tmp_files(config) == []
    finally:
        StallHandler.release.set()
        silent.close()
        for server in servers:
            server.shutdown()
            server.server_close()


def test_a_trickling_download_ends_at_the_deadline(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    TrickleHandler.release = threading.Event()
    config = make_config(tmp_path, transfer={"deadline_s": 1.5})
    fetcher = ArtifactFetcher(config, FakeLink())
    for url in serve(TrickleHandler, data):
        thread, outcome = fetch_in_thread(fetcher, p.UrlArtifact(url=url), model_manifest(data))
        thread.join(30)
        assert not thread.is_alive()
        assert "transfer.deadline_s (1.5 s)" in outcome["error"].message
        assert tmp_files(config) == []


# ---------------------------------------------------------------- chunks over MQTT


def chunks_of(data: bytes, transfer_id: str, size: int) -> list[bytes]:
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return [
        p.Chunk(
            transfer_id=transfer_id,
            index=i,
            total=len(pieces),
            data=base64.b64encode(piece).decode(),
            sha256=hashlib.sha256(piece).hexdigest(),
        ).to_bytes()
        for i, piece in enumerate(pieces)
    ]


def test_chunked_transfer_asks_again_for_missing_and_corrupt_chunks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(10_000)
    link = FakeLink()
    config = make_config(tmp_path, transfer={"chunk_wait_s": 0.3})
    fetcher = ArtifactFetcher(config, link)
    chunks = chunks_of(data, "t1", 1024)
    artifact = p.MqttArtifact(transfer_id="t1", chunk_size=1024, chunks=len(chunks))
    topic = "edge/transfer/t1"
    requests: list[list[int]] = []

    def console() -> None:
        # Answer the first request with everything but chunk 3, and chunk 5 corrupted.
        link.wait_for(lambda pub: any(m.topic == f"{topic}/missing" for m in pub))
        requests.append(json.loads(link.published[-1].payload)["missing"])
        for i, raw in enumerate(chunks):
            if i == 3:
                continue
            if i == 5:
                bad = json.loads(raw)
                bad["data"] = base64.b64encode(b"x" * 1024).decode()
                raw = json.dumps(bad).encode()
            link.deliver(topic, raw)
        link.deliver(topic, b"garbage")
        link.wait_for(lambda pub: sum(m.topic == f"{topic}/missing" for m in pub) == 2)
        again = json.loads([m for m in link.published if m.topic.endswith("/missing")][-1].payload)
        requests.append(again["missing"])
        for i in again["missing"]:
            link.deliver(topic, chunks[i])

    sender = threading.Thread(target=console, name="test-console", daemon=True)
    sender.start()
    path = fetcher.fetch("d1", artifact, model_manifest(data), no_progress)
    sender.join(5)
    assert path.read_bytes() == data
    assert requests == [list(range(len(chunks))), [3, 5]]
    assert topic not in link.handlers
    # The corrupt chunk and the garbage, counted in one line.
    assert [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()] == [
        "transfer t1: dropped 2 malformed, misfit or corrupt chunk(s)"
    ]


def test_an_unanswered_chunked_transfer_gives_up_and_leaves_no_file(tmp_path: Path) -> None:
    data = os.urandom(5000)
    chunks = chunks_of(data, "t2", 1024)
    artifact = p.MqttArtifact(transfer_id="t2", chunk_size=1024, chunks=5)
    config = make_config(tmp_path, transfer={"chunk_wait_s": 0.2, "chunk_requests": 2})
    link = FakeLink()

    def send_first_three() -> None:
        link.wait_for(lambda pub: len(pub) >= 1)
        for raw in chunks[:3]:
            link.deliver("edge/transfer/t2", raw)

    threading.Thread(target=send_first_three, name="test-console", daemon=True).start()
    with pytest.raises(p.CommandFailed, match="2 of 5 chunks did not arrive"):
        ArtifactFetcher(config, link).fetch("d1", artifact, model_manifest(data), no_progress)
    assert tmp_files(config) == []


@pytest.mark.parametrize(
    ("size", "chunk_size", "chunks", "words"),
    [
        # What made the old receiver list 2 million indexes before asking for any.
        (2_000_000, 1, 2_000_000, "under the 1024-byte minimum"),
        (5000, 1024, 10**12, "do not fit the manifest's 5000 bytes (that takes 5)"),
        (5000, 1024, 4, "that takes 5"),
        (5000, 2048, 1, "that takes 3"),
    ],
)
def test_chunk_geometry_is_checked_before_anything_is_built(
    tmp_path: Path, size: int, chunk_size: int, chunks: int, words: str
) -> None:
    config = make_config(tmp_path, transfer={"chunk_wait_s": 0.2, "chunk_requests": 1})
    link = FakeLink()
    artifact = p.MqttArtifact(transfer_id="t3", chunk_size=chunk_size, chunks=chunks)
    manifest = model_manifest(b"x") | {"model": {"sha256": "0" * 64, "size": size}}
    with pytest.raises(p.CommandFailed) as err:
        ArtifactFetcher(config, link).fetch("d1", artifact, manifest, no_progress)
    assert err.value.code == p.ReplyCode.DOWNLOAD_FAILED
    assert words in err.value.message
    assert link.published == [] and link.handlers == {}
    assert tmp_files(config) == []


def test_a_file_smaller_than_one_chunk_may_use_a_small_chunk(tmp_path: Path) -> None:
    data = b"tiny"
    link = FakeLink()
    artifact = p.MqttArtifact(transfer_id="t4", chunk_size=100, chunks=1)
    fetcher = ArtifactFetcher(make_config(tmp_path), link)

    def console() -> None:
        link.wait_for(lambda pub: len(pub) >= 1)
        link.deliver("edge/transfer/t4", chunks_of(data, "t4", 100)[0])

    threading.Thread(target=console, name="test-console", daemon=True).start()
    assert fetcher.fetch("d1", artifact, model_manifest(data), no_progress).read_bytes() == data


def test_missing_chunks_are_listed_lazily() -> None:
    from agent.link.chunks import missing_indexes

    ledger = bytearray(500_000)
    ledger[:10] = b"\x01" * 10
    ledger[12] = 1
    missing = missing_indexes(ledger, p.MAX_MISSING_LISTED)
    assert len(missing) == p.MAX_MISSING_LISTED
    assert missing[:3] == [10, 11, 13] and missing[-1] == p.MAX_MISSING_LISTED + 10
    assert missing_indexes(bytearray(b"\x01" * 5), 10) == []


def test_the_fleet_raises_a_too_small_chunk_size_to_the_floor(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(b"x" * 5000)
    publisher = ChunkPublisher(lambda m: None, lambda t, h: None, path, p.Topics(), chunk_size=100)
    artifact = publisher.artifact()
    assert (artifact.chunk_size, artifact.chunks) == (p.MIN_CHUNK_BYTES, 5)


class Trickler:
    """A console on the real broker that, once asked, sends one chunk every ``every_s``
    whatever the device asks for (``every_s=0``: it answers nothing)."""

    def __init__(
        self, broker: Broker, transfer_id: str, chunks: list[bytes], every_s: float
    ) -> None:
        self.requests = 0
        self._chunks = chunks
        self._topic = f"edge/transfer/{transfer_id}"
        self._every_s = every_s
        self._stop = threading.Event()
        self._asked = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self._client.on_message = self._on_request
        self._client.connect(broker.host, broker.port)
        self._client.subscribe(f"{self._topic}/missing", 1)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._trickle, name="test-trickle", daemon=True)
        self._thread.start()

    def _on_request(self, client: Any, userdata: Any, msg: Any) -> None:
        self.requests += 1
        self._asked.set()

    def _trickle(self) -> None:
        self._asked.wait(30)
        for raw in self._chunks:
            if self._every_s <= 0 or self._stop.wait(self._every_s):
                return
            self._client.publish(self._topic, raw, qos=1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.loop_stop()
        self._client.disconnect()


@pytest.fixture
def broker_fetcher(broker: Broker, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    made: list[tuple[MqttLink, ArtifactFetcher]] = []

    def make(**transfer: Any) -> tuple[AgentConfig, ArtifactFetcher]:
        config = make_config(tmp_path, broker, device="pi-transfer", transfer=transfer)
        link = MqttLink(config)
        link.start()
        assert link.wait_connected(10), link.last_error
        fetcher = ArtifactFetcher(config, link)
        made.append((link, fetcher))
        return config, fetcher

    yield make
    for link, fetcher in made:
        fetcher.stop()
        link.stop()


def test_a_trickling_chunked_transfer_ends_at_the_deadline(
    broker: Broker, broker_fetcher: Any
) -> None:
    data = os.urandom(200 * 1024)
    chunks = chunks_of(data, "t-trickle", 1024)
    config, fetcher = broker_fetcher(chunk_wait_s=1.0, chunk_requests=2, deadline_s=2.0)
    console = Trickler(broker, "t-trickle", chunks, every_s=0.2)
    try:
        artifact = p.MqttArtifact(transfer_id="t-trickle", chunk_size=1024, chunks=len(chunks))
        thread, outcome = fetch_in_thread(fetcher, artifact, model_manifest(data))
        thread.join(30)
        assert not thread.is_alive()
        assert "transfer.deadline_s (2 s)" in outcome["error"].message
        assert console.requests >= 1
        assert tmp_files(config) == []
    finally:
        console.close()


def test_stop_ends_a_chunked_transfer_promptly(broker: Broker, broker_fetcher: Any) -> None:
    data = os.urandom(20 * 1024)
    chunks = chunks_of(data, "t-stall", 1024)
    config, fetcher = broker_fetcher(chunk_wait_s=60.0)
    console = Trickler(broker, "t-stall", chunks, every_s=0)
    try:
        artifact = p.MqttArtifact(transfer_id="t-stall", chunk_size=1024, chunks=len(chunks))
        thread, outcome = fetch_in_thread(fetcher, artifact, model_manifest(data))
        wait_until(lambda: console.requests >= 1, what="the device asked for chunks")
        fetcher.stop()
        thread.join(5)
        assert not thread.is_alive()
        assert "stopping" in outcome["error"].message
        assert tmp_files(config) == []
    finally:
        console.close()


def test_deadline_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="deadline_s"):
        make_config(tmp_path, transfer={"deadline_s": 1e9})
    assert make_config(tmp_path).transfer.deadline_s == 1800.0
