"""Outbox and artifact transfer over the in-memory link; HTTP against a real local server."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import protocol as p
from agent.link.transfer import ArtifactFetcher
from tests.link_support import FakeLink, make_config

# --------------------------------------------------------------------------- transfer


def manifest_for(data: bytes) -> dict[str, Any]:
    return {"name": "m", "model": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``data``; the first response stops half-way, later ones honour Range."""

    data = b""
    requests: list[str | None] = []

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

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, bytes]]:
    data = os.urandom(300_000)
    FlakyHandler.data = data
    FlakyHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/model.tflite", data
    server.shutdown()
    server.server_close()


def test_interrupted_http_download_resumes_with_range(tmp_path: Path, flaky_server: Any) -> None:
    url, data = flaky_server
    fetcher = ArtifactFetcher(make_config(tmp_path), FakeLink())
    stages: list[tuple[str, float | None]] = []
    path = fetcher.fetch(
        "d1", p.UrlArtifact(url=url), manifest_for(data), lambda s, v: stages.append((s, v))
    )
    assert path.read_bytes() == data
    assert path.parent == tmp_path / "tmp"
    assert FlakyHandler.requests[0] is None
    assert FlakyHandler.requests[1] is not None and FlakyHandler.requests[1] != "bytes=0-"
    assert stages[-1] == ("downloading", 100.0)


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
    fetcher = ArtifactFetcher(make_config(tmp_path, transfer=transfer), FakeLink())
    with pytest.raises(p.CommandFailed) as err:
        fetcher.fetch("d1", p.UrlArtifact(url=url), {}, lambda s, v: None)
    assert err.value.code == p.ReplyCode.DOWNLOAD_FAILED
    assert words in err.value.message


def test_size_cap_is_enforced(tmp_path: Path, flaky_server: Any) -> None:
    url, _data = flaky_server
    config = make_config(
        tmp_path, models={"require_signature": False, "download": {"max_bytes": 1000}}
    )
    with pytest.raises(p.CommandFailed, match="cap"):
        ArtifactFetcher(config, FakeLink()).fetch(
            "d1", p.UrlArtifact(url=url), {}, lambda s, v: None
        )


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


def test_chunked_transfer_asks_again_for_missing_and_corrupt_chunks(tmp_path: Path) -> None:
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
    path = fetcher.fetch("d1", artifact, manifest_for(data), lambda s, v: None)
    sender.join(5)
    assert path.read_bytes() == data
    assert requests == [list(range(len(chunks))), [3, 5]]
    assert topic not in link.handlers


def test_chunked_transfer_resumes_after_a_restart_and_gives_up_when_unanswered(
    tmp_path: Path,
) -> None:
    data = os.urandom(5000)
    chunks = chunks_of(data, "t2", 1000)
    artifact = p.MqttArtifact(transfer_id="t2", chunk_size=1000, chunks=5)
    config = make_config(tmp_path, transfer={"chunk_wait_s": 0.2, "chunk_requests": 2})
    link = FakeLink()

    def send_first_three() -> None:
        link.wait_for(lambda pub: len(pub) >= 1)
        for raw in chunks[:3]:
            link.deliver("edge/transfer/t2", raw)

    threading.Thread(target=send_first_three, name="test-console", daemon=True).start()
    with pytest.raises(p.CommandFailed, match="2 of 5 chunks did not arrive"):
        ArtifactFetcher(config, link).fetch("d1", artifact, manifest_for(data), lambda s, v: None)

    link2 = FakeLink()

    def send_rest() -> None:
        link2.wait_for(lambda pub: len(pub) >= 1)
        for i in json.loads(link2.published[0].payload)["missing"]:
            link2.deliver("edge/transfer/t2", chunks[i])

    threading.Thread(target=send_rest, name="test-console", daemon=True).start()
    path = ArtifactFetcher(config, link2).fetch(
        "d2", artifact, manifest_for(data), lambda s, v: None
    )
    assert json.loads(link2.published[0].payload)["missing"] == [3, 4]
    assert path.read_bytes() == data
