"""How a deploy command tells a device where the model file is, the way the server is set up.

``http``: this server's API serves ``/artifacts/<sha256>/model.tflite`` (with Range)
for as long as the bundle is stored. ``url``: an object store mirrors the artifact
directory at ``artifacts.base_url``. ``mqtt``: a ``fleet.serve.ChunkPublisher`` per
bundle answers devices' chunk requests through the server's MQTT link; its transfer
id is derived from the file's sha256, so a command sent before a restart (or by a
reconciler that has since died) names a transfer the next publisher serves. The
reconciler (the only caller) keeps publishers for the bundles still needed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Protocol

from agent.models.manifest import MODEL_FILE
from agent.protocol import Artifact, Topics, UrlArtifact
from fleet.serve import ChunkPublisher

from .artifacts import ArtifactStore
from .config import ArtifactsConfig
from .db.schema import BundleRecord

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """A bundle cannot be offered the configured way; one line."""


class ChunkLink(Protocol):
    """What chunks need of the MQTT link (``fleet.console.Console``)."""

    def publish_many(
        self, messages: Iterable[tuple[str, bytes]], *, qos: int = ..., timeout: float = ...
    ) -> None: ...

    def subscribe(
        self, topic: str, handler: Callable[[bytes], None], timeout: float = ...
    ) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...


def transfer_id(sha256: str) -> str:
    return f"b-{sha256[:16]}"


class ArtifactDelivery:
    """Builds the ``artifact`` of deploy commands; owns the chunk publishers."""

    def __init__(
        self,
        config: ArtifactsConfig,
        store: ArtifactStore,
        *,
        public_url: str,
        link: ChunkLink | None = None,
        topics: Topics | None = None,
    ) -> None:
        if config.delivery == "url" and not config.base_url:
            raise DeliveryError("artifacts.base_url: required when artifacts.delivery is url")
        if config.delivery == "mqtt" and (link is None or topics is None):
            raise DeliveryError("artifacts.delivery mqtt needs the server's MQTT link")
        self.config = config
        self.store = store
        self.public_url = public_url.rstrip("/")
        self.link = link
        self.topics = topics
        self._lock = threading.Lock()
        self._publishers: dict[str, ChunkPublisher] = {}

    @property
    def publishing(self) -> int:
        """Bundles offered as chunks now (a figure for /metrics)."""
        with self._lock:
            return len(self._publishers)

    def artifact(self, bundle: BundleRecord) -> Artifact:
        sha = bundle.sha256
        if self.config.delivery == "http":
            return UrlArtifact(url=f"{self.public_url}/artifacts/{sha}/{MODEL_FILE}")
        if self.config.delivery == "url":
            base = (self.config.base_url or "").rstrip("/")
            return UrlArtifact(url=f"{base}/{sha}/{MODEL_FILE}")
        return self._publisher(bundle).artifact()

    def _publisher(self, bundle: BundleRecord) -> ChunkPublisher:
        sha = bundle.sha256
        with self._lock:
            running = self._publishers.get(sha)
        if running is not None:
            return running
        path = self.store.model_path(sha)
        if not path.is_file():
            raise DeliveryError(f"bundle {bundle.name} {bundle.version}: {path} is missing")
        assert self.link is not None and self.topics is not None  # checked in __init__
        publisher = ChunkPublisher(
            self.link.publish_many,
            self.link.subscribe,
            path,
            self.topics,
            self.config.chunk_size,
            transfer_id=transfer_id(sha),
        )
        publisher.start()  # subscribes: network I/O, outside the lock
        with self._lock:
            self._publishers[sha] = publisher
        log.info(
            "offering %s %s as chunks (%s)", bundle.name, bundle.version, publisher.transfer_id
        )
        return publisher

    def retain(self, needed_sha256s: Iterable[str]) -> None:
        """Stop the chunk publishers of bundles no desired state or rollout needs."""
        needed = set(needed_sha256s)
        with self._lock:
            stale = [sha for sha in self._publishers if sha not in needed]
            stopping = [self._publishers.pop(sha) for sha in stale]
        for publisher in stopping:
            log.info("no longer offering transfer %s", publisher.transfer_id)
            publisher.stop()
            # Chunk requests are a shared subscription: leave it, so they reach the
            # server that serves the transfer now.
            assert self.link is not None  # publishers exist only with a link
            try:
                self.link.unsubscribe(publisher.topics.transfer_missing(publisher.transfer_id))
            except Exception as exc:
                log.warning("could not unsubscribe from %s: %s", publisher.transfer_id, exc)

    def close(self) -> None:
        self.retain(())
