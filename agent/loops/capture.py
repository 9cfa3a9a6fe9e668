"""Frames worth labelling: a pipeline keeps, within a disk budget, the frames its model
was least sure of (and, later, those where a shadow candidate disagreed), each with a
sidecar JSON of its result, for a person to label for the next training round.

The results thread only ``offer``s a frame: a reference into a 1-deep slot, which a
lower-ranked offer replaces, and nothing else; it never waits on the disk and never
sees an error. The writer thread (``captures-<pipeline>``, at background priority)
takes the slot at most once per ``min_interval_s``, so the frame it keeps is the least
confident one offered in that interval, encodes it (JPEG through OpenCV, or .npy) and
writes it atomically (agent.loops.capture_files). At start it rebuilds the index from
the directory, where only complete pairs of image and sidecar survive.

Rank is the confidence (lower is kept first; an offer without one ranks as 0). When
the budget (``max_frames``, ``max_mb``) is full, a new frame replaces the kept frames
of highest rank only if its own is lower. Write errors (a full disk, a vanished or
read-only directory) are counted and logged once per burst.

The index is the writer's, shared with the local API (list, serve, delete) under a
lock held only to read or change the dict: no I/O happens under it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.config import CaptureConfig
from agent.loops.capture_files import (
    EXTENSION,
    FILE_RE,
    CaptureFolder,
    Kept,
    encode_frame,
    json_default,
    plan_keep,
)
from agent.loops.frames import Frame
from agent.loops.postprocess import Output
from agent.protocol import Result, validate_name
from agent.threads import BACKGROUND_NICE, lower_priority

logger = logging.getLogger(__name__)

Reason = Literal["low_confidence", "shadow_disagreed"]
LOW_CONFIDENCE: Reason = "low_confidence"
SHADOW_DISAGREED: Reason = "shadow_disagreed"

_POLL_S = 0.5


def top_confidence(output: Output) -> float | None:
    """What ranks a frame: classify, the top-1 probability; detect, the best score
    (0 when nothing was detected); raw outputs have none (never a low-confidence frame)."""
    if output.top1 is not None:
        return float(output.top1[1])
    if output.scores is not None:
        return float(output.scores.max()) if output.scores.size else 0.0
    return None


@dataclass(frozen=True, slots=True)
class _Offer:
    frame: Frame
    result: Result
    confidence: float | None
    reason: Reason
    details: Mapping[str, Any] | None
    rank: float


class FrameCapture:
    """One pipeline's kept frames under ``directory``. ``offer`` belongs to the results
    thread (or the shadow evaluator's); ``entries``, ``path_of`` and ``delete`` to the
    local API; the rest to the writer thread."""

    def __init__(
        self,
        pipeline: str,
        config: CaptureConfig,
        directory: Path,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pipeline = pipeline
        self.config = config
        self.folder = CaptureFolder(directory)
        self._clock = clock
        self._max_bytes = int(config.max_mb * 1024 * 1024)
        self._cond = threading.Condition()
        self._pending: _Offer | None = None  # the 1-deep hand-over
        self._lock = threading.Lock()  # the index: held for dict work only
        self._index: dict[str, Kept] = {}
        #: Set once the index has been rebuilt from the directory (the writer's first job).
        self.indexed = threading.Event()
        # Offers at or above this rank cannot be kept (the budget is full of lower
        # ones); read by the results thread so that it need not hand them over.
        self._ceiling = float("inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writing = False
        self._failing = 0  # errors in the current burst
        self._last_size = 0
        self.heartbeat_at = time.monotonic()
        self.errors = 0
        self.written = 0

    # --------------------------------------------------------------- offering

    def wants(self, confidence: float | None) -> bool:
        """Whether a frame of this confidence is a low-confidence candidate that could
        be kept now (cheap: the results thread asks before it builds the result)."""
        if confidence is None or confidence >= self.config.below:
            return False
        pending = self._pending
        return confidence < self._ceiling and (pending is None or confidence < pending.rank)

    def consider(self, frame: Frame, output: Output, result: Callable[[], Result]) -> None:
        """The results thread's one call per frame: offer it when its top confidence
        is below ``below``. Never raises; ``result`` is called only for a candidate."""
        try:
            confidence = top_confidence(output)
            if self.wants(confidence):
                self.offer(frame, result(), confidence, LOW_CONFIDENCE)
        except Exception:  # capture must never be in the pipeline's way
            logger.debug("pipeline %s: capture offer failed", self.pipeline, exc_info=True)

    def offer(
        self,
        frame: Frame,
        result: Result,
        confidence: float | None,
        reason: Reason,
        details: Mapping[str, Any] | None = None,
    ) -> bool:
        """Hand a frame (a reference, not a copy) to the writer; True when it now waits
        in the slot. Never blocks on I/O and never raises: an offer ranked no lower
        than the one waiting is dropped."""
        try:
            rank = 0.0 if confidence is None else float(confidence)
            if rank >= self._ceiling:
                return False
            with self._cond:
                pending = self._pending
                if pending is not None and pending.rank <= rank:
                    return False
                self._pending = _Offer(frame, result, confidence, reason, details, rank)
                self._cond.notify()
            return True
        except Exception:
            return False

    def offer_disagreement(
        self,
        frame: Frame,
        result: Result,
        confidence: float | None,
        details: Mapping[str, Any] | None = None,
    ) -> bool:
        """For the shadow evaluator: a frame where the candidate disagreed with the
        serving version (``result`` is the serving version's; ``details``, JSON-able,
        go into the sidecar as ``details``, e.g. the candidate's version and output).
        Ranked by the serving version's ``confidence`` like any other frame, whatever
        ``below`` says."""
        return self.offer(frame, result, confidence, SHADOW_DISAGREED, details)

    # --------------------------------------------------------------- the index

    @property
    def captured(self) -> int:
        return len(self._index)

    @property
    def waiting(self) -> bool:
        """A frame waits in the slot for the writer."""
        return self._pending is not None

    def entries(self) -> list[Kept]:
        with self._lock:
            return sorted(self._index.values(), key=lambda k: k.stem)

    def path_of(self, name: str) -> Path | None:
        """The path of a kept frame's image or sidecar by file name, None if not kept."""
        match = FILE_RE.match(name)
        if match is None:
            return None
        with self._lock:
            kept = self._index.get(match["stem"])
        if kept is None or name not in (kept.image, kept.sidecar):
            return None
        return self.folder.path / name

    def delete(self, name: str) -> list[str]:
        """Remove a kept frame (its image and sidecar) named by either file; the names
        removed, none when it was not kept."""
        match = FILE_RE.match(name)
        if match is None:
            return []
        with self._lock:
            kept = self._index.get(match["stem"])
            if kept is None or name not in (kept.image, kept.sidecar):
                return []
            del self._index[kept.stem]
            self._ceiling = float("inf")  # room again
        self.folder.remove(kept)
        return [kept.image, kept.sidecar]

    # --------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._stop.clear()
        self._start_thread()

    def _start_thread(self) -> None:
        self.heartbeat_at = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, name=f"captures-{self.pipeline}", daemon=True
        )
        self._thread.start()

    def thread(self) -> threading.Thread | None:
        """The writer thread while it should be running (for the supervisor)."""
        return None if self._stop.is_set() else self._thread

    def heartbeat(self) -> float | None:
        # A write blocked on a slow or failing disk is not a hung loop: the pipeline
        # must never notice capture, and a watchdog restart would be noticed.
        return None if self._writing else self.heartbeat_at

    def restart_thread(self) -> None:
        """A fresh writer after the last one died; index and slot are kept."""
        if not self._stop.is_set():
            self._start_thread()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the writer; a frame still waiting in the slot is not written."""
        self._stop.set()
        with self._cond:
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # --------------------------------------------------------------- writer thread

    def _run(self) -> None:
        lower_priority(BACKGROUND_NICE)
        if not self.indexed.is_set():
            self._writing = True  # reading a slow disk is no hung loop either
            try:
                self._rebuild()
            finally:
                self._writing = False
            self.indexed.set()
        next_at = 0.0
        while not self._stop.is_set():
            self.heartbeat_at = time.monotonic()
            wait = next_at - self._clock()
            if wait > 0:
                # Meanwhile offers keep the least confident frame in the slot.
                self._stop.wait(min(wait, _POLL_S))
                continue
            offer = self._take(_POLL_S)
            if offer is None:
                continue
            self._writing = True
            try:
                if self._keep(offer):
                    next_at = self._clock() + self.config.min_interval_s
            finally:
                self._writing = False

    def _take(self, timeout: float) -> _Offer | None:
        with self._cond:
            if self._pending is None and not self._stop.is_set():
                self._cond.wait(timeout)
            offer, self._pending = self._pending, None
        return offer

    def _keep(self, offer: _Offer) -> bool:
        """Write the offered frame if it fits the budget; True when it was kept."""
        try:
            if offer.rank >= self._ceiling:
                return False
            data, fmt = encode_frame(offer.frame.data, self.config.format)
            stem = f"{int(offer.frame.ts * 1000):013d}-{offer.frame.seq}"
            image = f"{stem}.{EXTENSION[fmt]}"
            sha = hashlib.sha256(data).hexdigest()
            sidecar = self._sidecar(offer, image, fmt, data, sha)
            kept = Kept(
                stem=stem,
                image=image,
                format=fmt,
                rank=offer.rank,
                confidence=offer.confidence,
                reason=offer.reason,
                version=offer.result.version,
                ts=offer.frame.ts,
                sha256=sha,
                image_bytes=len(data),
                size=len(data) + len(sidecar),
            )
            with self._lock:
                evict = plan_keep(
                    (k for k in self._index.values() if k.stem != stem),
                    kept.rank,
                    kept.size,
                    self.config.max_frames,
                    self._max_bytes,
                )
            if evict is None:
                return False
            self._ensure_folder()
            self.folder.write_pair(kept, data, sidecar)
        except Exception as exc:
            self._failed(exc)
            return False
        with self._lock:
            for old in evict:
                self._index.pop(old.stem, None)
            self._index[stem] = kept
        for old in evict:
            self.folder.remove(old)
        self._last_size = kept.size
        self._update_ceiling()
        self.written += 1
        if self._failing:
            logger.info(
                "pipeline %s: writing captures again after %d errors", self.pipeline, self._failing
            )
            self._failing = 0
        return True

    def _sidecar(self, offer: _Offer, image: str, fmt: str, data: bytes, sha: str) -> bytes:
        array = np.asarray(offer.frame.data)
        body: dict[str, Any] = {
            "file": image,
            "format": fmt,
            "bytes": len(data),
            "sha256": sha,
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "pipeline": self.pipeline,
            "reason": offer.reason,
            "confidence": offer.confidence,
            "model": offer.result.model,
            "version": offer.result.version,
            "ts": offer.frame.ts,
            "frame": offer.frame.seq,
            "captured_at": time.time(),
            "meta": dict(offer.frame.meta),
            "result": offer.result.model_dump(mode="json", exclude_none=True),
        }
        if offer.details is not None:
            body["details"] = dict(offer.details)
        return json.dumps(body, default=json_default, indent=1).encode()

    def _ensure_folder(self) -> None:
        if self.folder.exists():
            return
        with self._lock:
            lost = len(self._index)
            self._index.clear()
        if lost:
            logger.warning(
                "pipeline %s: the captures directory %s is gone, and its %d frames with it",
                self.pipeline,
                self.folder.path,
                lost,
            )
        self._update_ceiling()
        self.folder.make()

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self._failing += 1
        if self._failing == 1:
            logger.warning(
                "pipeline %s: cannot keep a frame in %s (%s); counting further errors "
                "silently until a write succeeds",
                self.pipeline,
                self.folder.path,
                exc,
            )

    def _update_ceiling(self) -> None:
        with self._lock:
            kept = list(self._index.values())
        full = len(kept) >= self.config.max_frames or (
            sum(k.size for k in kept) + self._last_size > self._max_bytes
        )
        self._ceiling = max(k.rank for k in kept) if full and kept else float("inf")

    def _rebuild(self) -> None:
        """The index from the directory: complete pairs are kept, half writes removed,
        and frames over a budget made smaller since are removed, highest rank first."""
        try:
            found, half = self.folder.scan()
        except OSError as exc:
            self._failed(exc)
            return
        keep: dict[str, Kept] = {}
        total = 0
        for kept in sorted(found, key=lambda k: k.rank):
            if len(keep) < self.config.max_frames and total + kept.size <= self._max_bytes:
                keep[kept.stem] = kept
                total += kept.size
            else:
                self.folder.remove(kept)
        with self._lock:
            self._index = keep
        self._update_ceiling()
        if half or len(keep) < len(found):
            logger.info(
                "pipeline %s: %d captures kept, %d files of half writes and %d frames over "
                "the budget removed",
                self.pipeline,
                len(keep),
                half,
                len(found) - len(keep),
            )


class CaptureShelf:
    """Every pipeline's kept frames, for the local API. Names are checked strictly:
    a pipeline name as the config allows it, a file name as this module writes it."""

    def __init__(self, captures: Mapping[str, FrameCapture]) -> None:
        self._captures = dict(captures)

    def listing(self) -> list[dict[str, Any]]:
        return [
            kept.listing(name)
            for name, capture in sorted(self._captures.items())
            for kept in capture.entries()
        ]

    def _capture(self, pipeline: str, name: str) -> FrameCapture:
        try:
            validate_name(pipeline)
        except ValueError as exc:
            raise ValueError(f"bad pipeline name: {exc}") from None
        if FILE_RE.match(name) is None:
            raise ValueError(f"bad capture file name {name[:80]!r}")
        capture = self._captures.get(pipeline)
        if capture is None:
            raise LookupError(f"no pipeline {pipeline!r} with capture on")
        return capture

    def path(self, pipeline: str, name: str) -> Path:
        """The file to serve; ValueError for a bad name, LookupError when not kept."""
        path = self._capture(pipeline, name).path_of(name)
        if path is None:
            raise LookupError(f"no capture {name!r} in pipeline {pipeline!r}")
        return path

    def delete(self, pipeline: str, name: str) -> list[str]:
        removed = self._capture(pipeline, name).delete(name)
        if not removed:
            raise LookupError(f"no capture {name!r} in pipeline {pipeline!r}")
        return removed
