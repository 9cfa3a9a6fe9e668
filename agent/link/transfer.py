"""Artifact delivery: a deploy's model file, verified first, then fetched to ``<state_dir>/tmp/``.

Before a byte is downloaded or a chunk is asked for, the manifest is parsed (the one
parser, ``parse_manifest``), its signature checked as the model store will check it
(``models.require_signature``, ``models.trusted_keys``) and ``model.size`` held
against ``models.download.max_bytes``. Only then does the transport for the
artifact's kind run (``fetch_url.UrlFetcher`` or ``chunks.ChunkReceiver``, one
``delivery.Transport`` interface), under one deadline (``transfer.deadline_s``).
The result is a file whose size and sha256 match the manifest.

A failed or aborted fetch deletes its partial file, and ``tmp/`` is emptied when the
fetcher is built (agent start-up), so a crash leaves nothing behind either.
``fetch`` blocks: it runs on the command plane's executor thread; ``stop()`` makes a
running fetch fail within about a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import protocol as p
from agent.config import AgentConfig
from agent.link.base import Link
from agent.link.chunks import ChunkReceiver
from agent.link.delivery import Delivery, Transport, fail
from agent.link.fetch_url import UrlFetcher
from agent.models.manifest import (
    ChecksumError,
    Manifest,
    ManifestError,
    SignatureError,
    check_model_file,
    load_public_key,
    parse_manifest,
    verify_signature,
)

log = logging.getLogger(__name__)


class ArtifactFetcher:
    def __init__(self, config: AgentConfig, link: Link) -> None:
        self.tmp_dir = config.state_dir / "tmp"
        self._models = config.models
        self._deadline_s = config.transfer.deadline_s
        self._stop = threading.Event()
        self._keys: list[Ed25519PublicKey] | None = None
        self._url = UrlFetcher(config.transfer, config.models.download)
        self._chunks = ChunkReceiver(
            link, p.Topics(config.mqtt.topic_prefix), config.device.id, config.transfer
        )
        # Built once per agent start: whatever is in tmp/ now is left from before.
        self.clean_tmp()

    def clean_tmp(self) -> int:
        """Delete everything in ``tmp/`` (files of fetches a crash or kill interrupted)."""
        removed = 0
        try:
            entries = list(self.tmp_dir.iterdir())
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("cannot list %s: %s", self.tmp_dir, exc)
            return 0
        for entry in entries:
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
            except OSError as exc:
                log.warning("cannot remove %s: %s", entry, exc)
        if removed:
            log.info("removed %d leftover file(s) from %s", removed, self.tmp_dir)
        return removed

    def stop(self) -> None:
        """Abort a running fetch (it fails with download_failed) and refuse new ones."""
        self._stop.set()
        self._url.interrupt()
        self._chunks.interrupt()

    def verify(self, manifest: dict[str, Any], signature: str | None) -> Manifest:
        """The parsed manifest, once signature and size allow fetching its file.

        Raises ``CommandFailed``: bad_manifest, bad_signature, download_failed (too large).
        """
        try:
            parsed = parse_manifest(manifest)
        except ManifestError as exc:
            raise fail(str(exc), p.ReplyCode.BAD_MANIFEST) from None
        keys = self._trusted_keys()
        # The same rule as the model store's, so nothing is fetched that it would refuse.
        if self._models.require_signature or (signature is not None and keys):
            try:
                verify_signature(manifest, signature, keys)
            except SignatureError as exc:
                raise fail(str(exc), p.ReplyCode.BAD_SIGNATURE) from None
        size, cap = parsed.model.size, self._models.download.max_bytes
        if size > cap:
            raise fail(
                f"the model file is too large: {size} bytes, over models.download.max_bytes ({cap})"
            )
        return parsed

    def fetch(
        self,
        command_id: str,
        artifact: p.UrlArtifact | p.MqttArtifact,
        manifest: dict[str, Any],
        progress: p.Progress,
        *,
        signature: str | None = None,
        before_download: Callable[[Manifest], None] | None = None,
    ) -> Path:
        """Verify, then fetch the model file; raises ``CommandFailed`` (bad_manifest,
        bad_signature, download_failed, checksum_mismatch, storage_failed).
        ``before_download`` gets the verified manifest first and may refuse by raising."""
        parsed = self.verify(manifest, signature)
        if before_download is not None:
            before_download(parsed)
        transport = self._transport(artifact)
        transport.precheck(artifact, parsed.model.size)
        if self._stop.is_set():
            raise fail("download aborted: the agent is stopping")
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise fail(f"cannot create {self.tmp_dir}: {exc}", p.ReplyCode.STORAGE_FAILED) from None
        part = self.tmp_dir / f"{command_id}.part"
        target = self.tmp_dir / f"{command_id}.model"
        delivery = Delivery(
            part=part,
            size=parsed.model.size,
            progress=progress,
            stop=self._stop,
            deadline=time.monotonic() + self._deadline_s,
            deadline_s=self._deadline_s,
        )
        try:
            transport.receive(artifact, delivery)
            try:
                check_model_file(part, parsed)
            except ChecksumError as exc:
                raise fail(str(exc), p.ReplyCode.CHECKSUM_MISMATCH) from None
            os.replace(part, target)
        except BaseException:
            with contextlib.suppress(OSError):
                part.unlink(missing_ok=True)
            raise
        return target

    def _transport(self, artifact: p.UrlArtifact | p.MqttArtifact) -> Transport[Any]:
        if isinstance(artifact, p.MqttArtifact):
            return self._chunks
        return self._url

    def _trusted_keys(self) -> list[Ed25519PublicKey]:
        if self._keys is None:
            try:
                self._keys = [load_public_key(path) for path in self._models.trusted_keys]
            except SignatureError as exc:
                raise fail(str(exc), p.ReplyCode.BAD_SIGNATURE) from None
        return self._keys
