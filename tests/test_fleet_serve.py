"""The artifact HTTP server and chunked MQTT transfer."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent.models.manifest import read_bundle
from agent.protocol import Chunk, ChunkRequest, Topics
from fleet.serve import (
    ArtifactServer,
    ChunkPublisher,
    chunk_messages,
    offer_artifact,
    parse_bind,
)
from tests.fleet_support import make_bundle


def test_parse_bind() -> None:
    assert parse_bind("", "10.0.0.5") == ("10.0.0.5", 0)
    assert parse_bind("0.0.0.0:8765", "x") == ("0.0.0.0", 8765)
    assert parse_bind(":9000", "10.0.0.5") == ("10.0.0.5", 9000)
    assert parse_bind("[::1]:80", "x") == ("::1", 80)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_bind("host:http", "x")


def test_server_serves_only_the_model_and_stops(tmp_path: Path) -> None:
    model = tmp_path / "model.tflite"
    model.write_bytes(b"TFL3" * 50_000)
    server = ArtifactServer(model, "/digits/2/model.tflite", ("127.0.0.1", 0), "127.0.0.1")
    url = server.start()
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/digits/2/model.tflite")
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.read() == model.read_bytes()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url.replace("model.tflite", "manifest.json"), timeout=5)
        assert err.value.code == 404
        # Counted by the server's handler thread once the body is sent, which may be
        # a moment after the client has read it.
        deadline = time.monotonic() + 5
        while server.downloads < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.downloads == 1
    finally:
        server.stop()
    assert not any(t.name == "artifact-http" for t in threading.enumerate())
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


@pytest.mark.parametrize("size", [1, 1000, 3000, 3001])
def test_chunks_reassemble_to_the_file(tmp_path: Path, size: int) -> None:
    path = tmp_path / "m"
    data = bytes(i % 251 for i in range(size))
    path.write_bytes(data)
    msgs = list(chunk_messages(path, Topics("acme/site"), "t-1", 1000))
    chunks = [Chunk.model_validate_json(payload) for _, payload in msgs]
    assert {topic for topic, _ in msgs} == {"acme/site/transfer/t-1"}
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.total == len(chunks) == -(-size // 1000) for c in chunks)
    assert b"".join(base64.b64decode(c.data) for c in chunks) == data
    assert all(c.sha256 == hashlib.sha256(base64.b64decode(c.data)).hexdigest() for c in chunks)


def test_chunk_publisher_answers_chunk_requests(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(b"x" * 2500)
    published: list[list[tuple[str, bytes]]] = []
    subscribed: list[str] = []
    done = threading.Event()

    def publish_many(msgs: list[tuple[str, bytes]]) -> None:
        published.append(msgs)
        done.set()

    pub = ChunkPublisher(
        publish_many, lambda topic, _h: subscribed.append(topic), path, Topics(), chunk_size=1000
    )
    assert pub.artifact().chunks == 3
    pub.start()
    try:
        # It listens for requests before any device could ask, and sends nothing unasked.
        assert subscribed == [f"edge/transfer/{pub.transfer_id}/missing"]
        assert not done.wait(0.6)
        # Three devices ask at once: one round with the union of what they lack.
        for device, missing in (("a", [0]), ("b", [2]), ("c", [2, 7])):
            request = ChunkRequest(
                transfer_id=pub.transfer_id, device=device, missing=missing, ts=0.0
            )
            pub.on_request(request.to_bytes())
        pub.on_request(b"{not json")  # ignored, logged
        other = ChunkRequest(transfer_id="t-other", device="d", missing=[1], ts=0.0)
        pub.on_request(other.to_bytes())  # another transfer: ignored
        assert done.wait(5)
        time.sleep(0.5)
    finally:
        pub.stop()
    assert pub.rounds == 1 and len(published) == 1
    assert [Chunk.model_validate_json(m).index for _, m in published[0]] == [0, 2]
    with pytest.raises(ValueError, match="chunk size"):
        ChunkPublisher(publish_many, lambda t, h: None, path, Topics(), chunk_size=10**6)


def test_offer_artifact_with_an_external_url(tmp_path: Path) -> None:
    bundle = read_bundle(make_bundle(tmp_path / "b", b"abc", version="2", keys=None))
    offer = offer_artifact(
        bundle,
        "http",
        topics=Topics(),
        publish_many=lambda m: None,
        subscribe=lambda t, h: None,
        advertise="x",
        bind=("127.0.0.1", 0),
        url="https://cdn.example.com/digits/2/model.tflite",
    )
    assert offer.artifact.model_dump() == {
        "kind": "url",
        "url": "https://cdn.example.com/digits/2/model.tflite",
    }
    offer.close()
