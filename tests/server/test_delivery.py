"""Artifact delivery: the URL kinds, and chunk publishers kept while a bundle is needed.

The publishers' link here is a recording double; test_reconcile's last test sends
chunks over a real Mosquitto to simulated devices."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from agent.protocol import Chunk, ChunkRequest, MqttArtifact, Topics, UrlArtifact
from fleet.server.artifacts import ArtifactStore
from fleet.server.config import ArtifactsConfig
from fleet.server.db.schema import BundleRecord
from fleet.server.delivery import ArtifactDelivery, DeliveryError

PUBLIC = "http://fleet.example:8400/"


class RecordingLink:
    def __init__(self) -> None:
        self.subscribed: dict[str, Callable[[bytes], None]] = {}
        self.published: list[tuple[str, bytes]] = []
        self.got = threading.Event()

    def publish_many(
        self, messages: Iterable[tuple[str, bytes]], *, qos: int = 1, timeout: float = 30.0
    ) -> None:
        self.published += list(messages)
        self.got.set()

    def subscribe(
        self, topic: str, handler: Callable[[bytes], None], timeout: float = 10.0
    ) -> None:
        self.subscribed[topic] = handler

    def unsubscribe(self, topic: str) -> None:
        del self.subscribed[topic]


def put(store: ArtifactStore, body: bytes, version: str = "2") -> BundleRecord:
    sha = hashlib.sha256(body).hexdigest()
    store.bundle_dir(sha).mkdir()
    store.model_path(sha).write_bytes(body)
    return BundleRecord(name="digits", version=version, sha256=sha, size=len(body))


def stored(tmp_path: Path, body: bytes) -> tuple[ArtifactStore, BundleRecord]:
    store = ArtifactStore(tmp_path / "artifacts")
    store.open()
    return store, put(store, body)


def test_http_and_url_delivery_name_the_file_by_its_sha256(tmp_path: Path) -> None:
    store, bundle = stored(tmp_path, b"model")
    http = ArtifactDelivery(ArtifactsConfig(), store, public_url=PUBLIC)
    assert http.artifact(bundle) == UrlArtifact(
        url=f"http://fleet.example:8400/artifacts/{bundle.sha256}/model.tflite"
    )
    url = ArtifactDelivery(
        ArtifactsConfig(delivery="url", base_url="https://s3.example/fleet/"),
        store,
        public_url=PUBLIC,
    )
    assert url.artifact(bundle) == UrlArtifact(
        url=f"https://s3.example/fleet/{bundle.sha256}/model.tflite"
    )


def test_misconfigured_delivery_is_one_clear_error(tmp_path: Path) -> None:
    store, _ = stored(tmp_path, b"model")
    with pytest.raises(DeliveryError, match="artifacts.base_url"):
        ArtifactDelivery(ArtifactsConfig(delivery="url"), store, public_url=PUBLIC)
    with pytest.raises(DeliveryError, match="MQTT link"):
        ArtifactDelivery(ArtifactsConfig(delivery="mqtt"), store, public_url=PUBLIC)


def test_chunks_are_offered_per_bundle_until_no_longer_needed(tmp_path: Path) -> None:
    body = bytes(range(256)) * 20  # 5 chunks of 1 KiB
    store, bundle = stored(tmp_path, body)
    other = put(store, b"other", version="3")
    link, topics = RecordingLink(), Topics("fleet")
    delivery = ArtifactDelivery(
        ArtifactsConfig(delivery="mqtt", chunk_size=1024),
        store,
        public_url=PUBLIC,
        link=link,
        topics=topics,
    )
    try:
        artifact = delivery.artifact(bundle)
        assert artifact == MqttArtifact(
            transfer_id=f"b-{bundle.sha256[:16]}", chunk_size=1024, chunks=5
        )
        assert delivery.artifact(bundle) == artifact  # the same publisher, one subscription
        assert list(link.subscribed) == [f"fleet/transfer/b-{bundle.sha256[:16]}/missing"]
        delivery.artifact(other)
        assert delivery.publishing == 2

        # A device asks for two chunks: they go out, each with its sha256.
        request = ChunkRequest(transfer_id=artifact.transfer_id, device="a", missing=[1, 3], ts=1.0)
        link.subscribed[topics.transfer_missing(artifact.transfer_id)](request.to_bytes())
        assert link.got.wait(10)
        chunks = [Chunk.model_validate_json(p) for _, p in link.published]
        assert [c.index for c in chunks] == [1, 3]
        assert base64.b64decode(chunks[0].data) == body[1024:2048]

        delivery.retain({other.sha256})
        assert delivery.publishing == 1
        assert list(link.subscribed) == [topics.transfer_missing(f"b-{other.sha256[:16]}")]
        delivery.artifact(bundle)  # needed again: offered again under the same transfer id
        assert delivery.publishing == 2
    finally:
        delivery.close()
    assert delivery.publishing == 0


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    store, bundle = stored(tmp_path, b"model")
    store.model_path(bundle.sha256).unlink()
    delivery = ArtifactDelivery(
        ArtifactsConfig(delivery="mqtt"),
        store,
        public_url=PUBLIC,
        link=RecordingLink(),
        topics=Topics("fleet"),
    )
    with pytest.raises(DeliveryError, match="missing"):
        delivery.artifact(bundle)
