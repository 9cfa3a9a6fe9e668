"""Artifact delivery: a deploy's model file, fetched to ``<state_dir>/tmp/``.

Two ways in, both ending in a file whose size and sha256 match the manifest:

- a URL (``https``, ``http``, ``file``; each allowed by ``transfer.allowed_schemes``,
  hosts by ``transfer.allowed_hosts``), streamed to disk under a size cap, resumed
  with HTTP Range after an interruption;
- chunks over MQTT on ``<prefix>/transfer/<transfer_id>``, written at their offsets,
  with the set of received chunks kept beside the file so a transfer survives a
  reconnect or a restart; missing chunks are asked for again with ``ChunkRequest``.

``fetch`` blocks: it runs on the command plane's executor thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent import protocol as p
from agent.config import AgentConfig
from agent.link.base import Incoming, Link

log = logging.getLogger(__name__)

_READ = 64 * 1024
_MAX_QUEUED_CHUNKS = 256
_SAVE_EVERY_S = 1.0


def _fail(message: str, code: p.ReplyCode = p.ReplyCode.DOWNLOAD_FAILED) -> p.CommandFailed:
    return p.CommandFailed(code, message)


def expected_file(manifest: dict[str, Any]) -> tuple[int | None, str | None]:
    """(size, sha256) of the model file from ``manifest["model"]``, when well formed."""
    model = manifest.get("model")
    if not isinstance(model, dict):
        return None, None
    size = model.get("size")
    digest = model.get("sha256")
    good_size = size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None
    good_digest = (
        digest
        if isinstance(digest, str)
        and len(digest) == 64
        and all(c in "0123456789abcdef" for c in digest)
        else None
    )
    return good_size, good_digest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class ArtifactFetcher:
    def __init__(self, config: AgentConfig, link: Link) -> None:
        self.tmp_dir = config.state_dir / "tmp"
        self.device = config.device.id
        self._download = config.models.download
        self._transfer = config.transfer
        self._topics = p.Topics(config.mqtt.topic_prefix)
        self._link = link
        self._stop = threading.Event()

    def stop(self) -> None:
        """Abort a running fetch (it fails with download_failed)."""
        self._stop.set()

    def fetch(
        self,
        command_id: str,
        artifact: p.HttpArtifact | p.UrlArtifact | p.MqttArtifact,
        manifest: dict[str, Any],
        progress: p.Progress,
    ) -> Path:
        """Fetch the model file; raises ``CommandFailed`` (download_failed,
        checksum_mismatch)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        size, digest = expected_file(manifest)
        target = self.tmp_dir / f"{command_id}.model"
        if isinstance(artifact, p.MqttArtifact):
            part = self._receive_chunks(artifact, size, progress)
        else:
            part = self._download_url(command_id, artifact.url, size, progress)
        try:
            self._verify(part, size, digest)
        except p.CommandFailed:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, target)
        return target

    def _verify(self, path: Path, size: int | None, digest: str | None) -> None:
        actual = path.stat().st_size
        if size is not None and actual != size:
            raise _fail(
                f"model file is {actual} bytes, the manifest says {size}",
                p.ReplyCode.CHECKSUM_MISMATCH,
            )
        if digest is not None:
            got = sha256_of(path)
            if got != digest:
                raise _fail(
                    f"model file sha256 {got[:12]}... does not match the manifest's "
                    f"{digest[:12]}...",
                    p.ReplyCode.CHECKSUM_MISMATCH,
                )

    def _cap(self, size: int | None) -> int:
        cap = self._download.max_bytes
        if size is not None and size > cap:
            raise _fail(f"the model file ({size} bytes) exceeds models.download.max_bytes ({cap})")
        return cap

    # ----------------------------------------------------------------------- URLs

    def check_url(self, url: str) -> urllib.parse.SplitResult:
        parsed = urllib.parse.urlsplit(url)
        scheme = parsed.scheme.lower()
        allowed = self._transfer.allowed_schemes
        if scheme not in allowed:
            raise _fail(
                f"URL scheme {scheme!r} is not allowed here (transfer.allowed_schemes: "
                f"{', '.join(allowed)})"
            )
        hosts = self._transfer.allowed_hosts
        if scheme != "file" and hosts and (parsed.hostname or "") not in hosts:
            raise _fail(f"host {parsed.hostname!r} is not in transfer.allowed_hosts")
        return parsed

    def _download_url(
        self, command_id: str, url: str, size: int | None, progress: p.Progress
    ) -> Path:
        parsed = self.check_url(url)
        cap = self._cap(size)
        part = self.tmp_dir / f"{command_id}.part"
        part.unlink(missing_ok=True)
        progress("downloading", 0.0)
        if parsed.scheme.lower() == "file":
            self._copy_file(
                Path(urllib.request.url2pathname(parsed.path)), part, cap, size, progress
            )
        else:
            self._http_get(url, part, cap, size, progress)
        return part

    def _copy_file(
        self, source: Path, part: Path, cap: int, size: int | None, progress: p.Progress
    ) -> None:
        try:
            total = source.stat().st_size
            if total > cap:
                raise _fail(f"{source} is {total} bytes, over the {cap}-byte cap")
            with source.open("rb") as src, part.open("wb") as dst:
                done = 0
                while block := src.read(_READ * 16):
                    dst.write(block)
                    done += len(block)
                    progress("downloading", 100.0 * done / max(total, 1))
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise _fail(f"cannot read {source}: {exc.strerror or exc}") from None

    def _opener(self) -> urllib.request.OpenerDirector:
        fetcher = self

        class CheckedRedirects(urllib.request.HTTPRedirectHandler):
            def redirect_request(  # type: ignore[no-untyped-def]
                self, req, fp, code, msg, headers, newurl
            ):
                fetcher.check_url(newurl)
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        return urllib.request.build_opener(CheckedRedirects())

    def _http_get(
        self, url: str, part: Path, cap: int, size: int | None, progress: p.Progress
    ) -> None:
        opener = self._opener()
        have = 0
        failures = 0
        while True:
            if self._stop.is_set():
                raise _fail("download aborted: the agent is stopping")
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with opener.open(
                    urllib.request.Request(url, headers=headers), timeout=self._download.timeout_s
                ) as resp:
                    if have and resp.status != 206:
                        log.info("server ignored the Range request; downloading from the start")
                        have = 0
                    total = self._total(resp, have) or size
                    if total is not None and total > cap:
                        raise _fail(f"the model file is {total} bytes, over the {cap}-byte cap")
                    with part.open("ab" if have else "wb") as out:
                        while block := resp.read(_READ):
                            if self._stop.is_set():
                                raise _fail("download aborted: the agent is stopping")
                            have += len(block)
                            if have > cap:
                                raise _fail(f"download exceeds the {cap}-byte cap")
                            out.write(block)
                            if total:
                                progress("downloading", min(100.0, 100.0 * have / total))
                    if total is not None and have < total:
                        raise http.client.IncompleteRead(b"", total - have)
                    return
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and size is not None and have == size:
                    return
                raise _fail(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
            except (OSError, http.client.HTTPException) as exc:
                failures += 1
                if failures > self._transfer.resume_attempts:
                    raise _fail(
                        f"download of {url} failed after {failures} attempt(s): {exc}"
                    ) from None
                log.warning("download of %s interrupted at %d bytes (%s); resuming", url, have, exc)
                self._stop.wait(min(5.0, 0.2 * failures))

    @staticmethod
    def _total(resp: Any, have: int) -> int | None:
        content_range = resp.headers.get("Content-Range")
        if content_range and "/" in content_range:
            tail = content_range.rsplit("/", 1)[1].strip()
            if tail.isdigit():
                return int(tail)
        length = resp.headers.get("Content-Length")
        if length and length.isdigit():
            return int(length) + have
        return None

    # ------------------------------------------------------------- chunks over MQTT

    def _receive_chunks(
        self, artifact: p.MqttArtifact, size: int | None, progress: p.Progress
    ) -> Path:
        cap = self._cap(size)
        total, chunk_size = artifact.chunks, artifact.chunk_size
        if (total - 1) * chunk_size >= cap:
            raise _fail(f"{total} chunks of {chunk_size} bytes exceed the {cap}-byte cap")
        if size is not None and (size + chunk_size - 1) // chunk_size != total:
            raise _fail(
                f"{total} chunks of {chunk_size} bytes cannot hold the manifest's {size} bytes"
            )
        part = self.tmp_dir / f"transfer-{artifact.transfer_id}.part"
        ledger = self.tmp_dir / f"transfer-{artifact.transfer_id}.json"
        received = self._load_ledger(ledger, artifact)
        if not part.exists():
            received = set()
        inbox: queue.Queue[Incoming] = queue.Queue(_MAX_QUEUED_CHUNKS)

        def on_chunk(incoming: Incoming) -> None:
            try:
                inbox.put_nowait(incoming)
            except queue.Full:
                pass  # dropped here, asked for again later

        topic = self._topics.transfer(artifact.transfer_id)
        self._link.subscribe(topic, on_chunk, qos=1)
        try:
            fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                self._collect(fd, artifact, received, inbox, ledger, progress)
            finally:
                os.close(fd)
        finally:
            self._link.unsubscribe(topic)
        ledger.unlink(missing_ok=True)
        return part

    def _collect(
        self,
        fd: int,
        artifact: p.MqttArtifact,
        received: set[int],
        inbox: queue.Queue[Incoming],
        ledger: Path,
        progress: p.Progress,
    ) -> None:
        total = artifact.chunks
        wait_s = self._transfer.chunk_wait_s
        requests = 0
        self._request_missing(artifact, received)
        quiet_since = time.monotonic()
        saved_at = time.monotonic()
        progress("receiving", 100.0 * len(received) / total)
        while len(received) < total:
            if self._stop.is_set():
                self._save_ledger(ledger, artifact, received)
                raise _fail("transfer aborted: the agent is stopping")
            try:
                incoming = inbox.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() - quiet_since >= wait_s:
                    requests += 1
                    if requests >= self._transfer.chunk_requests:
                        self._save_ledger(ledger, artifact, received)
                        raise _fail(
                            f"transfer {artifact.transfer_id}: {total - len(received)} of "
                            f"{total} chunks did not arrive after {requests} requests"
                        ) from None
                    self._request_missing(artifact, received)
                    quiet_since = time.monotonic()
                continue
            index, data = self._chunk_bytes(incoming.payload, artifact)
            if index is None or index in received:
                continue
            os.pwrite(fd, data, index * artifact.chunk_size)
            received.add(index)
            requests = 0
            quiet_since = time.monotonic()
            progress("receiving", 100.0 * len(received) / total)
            if quiet_since - saved_at >= _SAVE_EVERY_S:
                self._save_ledger(ledger, artifact, received)
                saved_at = quiet_since

    @staticmethod
    def _chunk_bytes(payload: bytes, artifact: p.MqttArtifact) -> tuple[int | None, bytes]:
        try:
            chunk = p.Chunk.model_validate_json(payload)
            data = base64.b64decode(chunk.data, validate=True)
        except (ValidationError, ValueError, binascii.Error):
            log.debug("ignored a malformed chunk for %s", artifact.transfer_id)
            return None, b""
        if (
            chunk.transfer_id != artifact.transfer_id
            or chunk.total != artifact.chunks
            or chunk.index >= artifact.chunks
        ):
            return None, b""
        full = chunk.index < artifact.chunks - 1
        if len(data) > artifact.chunk_size or (full and len(data) != artifact.chunk_size):
            return None, b""
        if chunk.sha256 is not None and hashlib.sha256(data).hexdigest() != chunk.sha256:
            log.warning("chunk %d of %s fails its sha256; dropped", chunk.index, chunk.transfer_id)
            return None, b""
        return chunk.index, data

    def _request_missing(self, artifact: p.MqttArtifact, received: set[int]) -> None:
        missing = [i for i in range(artifact.chunks) if i not in received]
        request = p.ChunkRequest(
            transfer_id=artifact.transfer_id,
            device=self.device,
            missing=missing[: p.MAX_MISSING_LISTED],
            ts=time.time(),
        )
        self._link.publish(self._topics.transfer_missing(artifact.transfer_id), request.to_bytes())

    @staticmethod
    def _load_ledger(ledger: Path, artifact: p.MqttArtifact) -> set[int]:
        try:
            data = json.loads(ledger.read_text())
        except (OSError, ValueError):
            return set()
        if (
            not isinstance(data, dict)
            or data.get("chunks") != artifact.chunks
            or data.get("chunk_size") != artifact.chunk_size
        ):
            return set()
        return {
            i for i in data.get("received", []) if isinstance(i, int) and 0 <= i < artifact.chunks
        }

    @staticmethod
    def _save_ledger(ledger: Path, artifact: p.MqttArtifact, received: set[int]) -> None:
        tmp = ledger.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "chunks": artifact.chunks,
                    "chunk_size": artifact.chunk_size,
                    "received": sorted(received),
                }
            )
        )
        os.replace(tmp, ledger)
