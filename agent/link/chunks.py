"""The MQTT transport: a model file received as ``Chunk`` messages.

Chunks arrive on ``<prefix>/transfer/<transfer_id>`` and are written at their
offsets. The ledger of received chunks is one byte per chunk, in memory: a
transfer survives a reconnect (the subscription belongs to the persistent
session), not a restart (``tmp/`` is emptied at start). Missing chunks are asked
for with ``ChunkRequest`` (at most ``MAX_MISSING_LISTED`` per request, found
lazily) at the start, as soon as everything asked for has come, and after
``transfer.chunk_wait_s`` of silence; ``transfer.chunk_requests`` silences in a row
end the transfer, and so does the deploy's deadline, however slowly chunks trickle.

The geometry is checked before anything that grows with ``chunks`` is built:
``chunk_size`` at least ``MIN_CHUNK_BYTES`` (unless one chunk holds the file) and
``chunks == ceil(size / chunk_size)`` for the manifest's verified size.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import queue
import time

from agent import protocol as p
from agent.config import TransferConfig
from agent.link.base import Incoming, Link
from agent.link.delivery import POLL_S, Delivery, fail, storage_failed

log = logging.getLogger(__name__)

_MAX_QUEUED_CHUNKS = 256


def missing_indexes(received: bytearray, limit: int) -> list[int]:
    """The first ``limit`` indexes whose ledger byte is 0, without scanning the rest."""
    missing: list[int] = []
    i = received.find(0)
    while i != -1 and len(missing) < limit:
        missing.append(i)
        i = received.find(0, i + 1)
    return missing


class ChunkReceiver:
    """Receives ``MqttArtifact`` files; see the module docstring."""

    def __init__(self, link: Link, topics: p.Topics, device: str, transfer: TransferConfig) -> None:
        self._link = link
        self._topics = topics
        self.device = device
        self._transfer = transfer

    def interrupt(self) -> None:
        """Nothing to wake: the receive loop polls the stop event."""

    def precheck(self, artifact: p.MqttArtifact, size: int) -> None:
        chunk_size, chunks = artifact.chunk_size, artifact.chunks
        if chunks > 1 and chunk_size < p.MIN_CHUNK_BYTES:
            raise fail(
                f"chunk_size {chunk_size} is under the {p.MIN_CHUNK_BYTES}-byte minimum "
                "for a file of more than one chunk"
            )
        needed = -(-size // chunk_size)
        if chunks != needed:
            raise fail(
                f"{chunks} chunks of {chunk_size} bytes do not fit the manifest's {size} bytes "
                f"(that takes {needed})"
            )

    def receive(self, artifact: p.MqttArtifact, delivery: Delivery) -> None:
        self.precheck(artifact, delivery.size)
        inbox: queue.Queue[Incoming] = queue.Queue(_MAX_QUEUED_CHUNKS)

        def on_chunk(incoming: Incoming) -> None:
            try:
                inbox.put_nowait(incoming)
            except queue.Full:
                pass  # dropped here, asked for again later

        topic = self._topics.transfer(artifact.transfer_id)
        self._link.subscribe(topic, on_chunk, qos=1)
        try:
            try:
                fd = os.open(delivery.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            except OSError as exc:
                raise storage_failed(exc) from None
            dropped = [0]
            try:
                self._collect(fd, artifact, inbox, delivery, dropped)
            finally:
                os.close(fd)
                if dropped[0]:
                    # Once per transfer, not per chunk: a flood must not flood the log.
                    log.warning(
                        "transfer %s: dropped %d malformed, misfit or corrupt chunk(s)",
                        artifact.transfer_id,
                        dropped[0],
                    )
        finally:
            self._link.unsubscribe(topic)

    def _collect(
        self,
        fd: int,
        artifact: p.MqttArtifact,
        inbox: queue.Queue[Incoming],
        delivery: Delivery,
        dropped: list[int],
    ) -> None:
        total = artifact.chunks
        received = bytearray(total)  # the ledger: 1 = written
        count = 0
        wait_s = self._transfer.chunk_wait_s
        silences = 0
        asked = self._request_missing(artifact, received)
        quiet_since = time.monotonic()
        delivery.progress("receiving", 0.0)
        while count < total:
            delivery.check()
            try:
                incoming = inbox.get(timeout=POLL_S)
            except queue.Empty:
                if time.monotonic() - quiet_since >= wait_s:
                    silences += 1
                    if silences >= self._transfer.chunk_requests:
                        raise fail(
                            f"transfer {artifact.transfer_id}: {total - count} of {total} "
                            f"chunks did not arrive after {silences} requests"
                        ) from None
                    asked = self._request_missing(artifact, received)
                    quiet_since = time.monotonic()
                continue
            index, data = self._chunk_bytes(incoming.payload, artifact, delivery.size)
            if index is None:
                dropped[0] += 1
                continue
            if received[index]:
                continue
            try:
                os.pwrite(fd, data, index * artifact.chunk_size)
            except OSError as exc:
                raise storage_failed(exc) from None
            received[index] = 1
            count += 1
            silences = 0
            quiet_since = time.monotonic()
            delivery.progress("receiving", 100.0 * count / total)
            asked.discard(index)
            if not asked and count < total:
                # Everything asked for came: ask for the next batch without waiting.
                asked = self._request_missing(artifact, received)

    def _chunk_bytes(
        self, payload: bytes, artifact: p.MqttArtifact, size: int
    ) -> tuple[int | None, bytes]:
        try:
            chunk = p.decode_message(
                payload, p.Chunk, p.max_chunk_message_bytes(artifact.chunk_size)
            )
            data = base64.b64decode(chunk.data, validate=True)
        except (p.ProtocolError, ValueError, binascii.Error):
            log.debug("ignored a malformed chunk for %s", artifact.transfer_id)
            return None, b""
        if (
            chunk.transfer_id != artifact.transfer_id
            or chunk.total != artifact.chunks
            or chunk.index >= artifact.chunks
        ):
            return None, b""
        last = artifact.chunks - 1
        expected = artifact.chunk_size if chunk.index < last else size - last * artifact.chunk_size
        if len(data) != expected:
            return None, b""
        if chunk.sha256 is not None and hashlib.sha256(data).hexdigest() != chunk.sha256:
            log.debug("chunk %d of %s fails its sha256", chunk.index, chunk.transfer_id)
            return None, b""
        return chunk.index, data

    def _request_missing(self, artifact: p.MqttArtifact, received: bytearray) -> set[int]:
        missing = missing_indexes(received, p.MAX_MISSING_LISTED)
        request = p.ChunkRequest(
            transfer_id=artifact.transfer_id, device=self.device, missing=missing, ts=time.time()
        )
        self._link.publish(self._topics.transfer_missing(artifact.transfer_id), request.to_bytes())
        return set(missing)
