"""Frames and the two hand-overs between a capture thread and an inference worker.

Live sources (cameras) go through a ``LatestFrameSlot``: the worker always gets the
newest frame, so a slow model never builds a backlog, and every frame overwritten
unseen is counted as dropped. File and sensor sources go through a ``FrameQueue``,
which blocks the producer instead of dropping anything.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Frame:
    """One unit of work: ``seq`` numbers the frames of one source, ``ts`` is the Unix
    time of capture. ``data`` is an image (H x W x C uint8, BGR as OpenCV gives it), a
    sensor window, or whatever the worker's prepare hook understands."""

    seq: int
    ts: float
    data: Any
    meta: dict[str, Any] = field(default_factory=dict)


class FrameInput(Protocol):
    def get(self, timeout: float) -> Frame | None:
        """The next frame, or None when none arrived within ``timeout`` seconds."""
        ...


class LatestFrameSlot:
    """Holds at most one frame; a newer frame replaces an unread one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self.dropped = 0
        self.put_count = 0

    def put(self, frame: Frame, stop: threading.Event | None = None) -> bool:
        with self._cond:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self.put_count += 1
            self._cond.notify()
        return True

    def get(self, timeout: float) -> Frame | None:
        with self._cond:
            if self._frame is None:
                self._cond.wait(timeout)
            frame, self._frame = self._frame, None
            return frame

    def __len__(self) -> int:
        return 0 if self._frame is None else 1


class FrameQueue:
    """A bounded FIFO. ``put`` with a ``stop`` event waits for room (checking ``stop``)
    rather than dropping; without one it refuses (returns False) when full."""

    def __init__(self, maxsize: int = 64) -> None:
        self._queue: queue.Queue[Frame] = queue.Queue(maxsize)
        self.dropped = 0
        self.put_count = 0

    def put(self, frame: Frame, stop: threading.Event | None = None) -> bool:
        while True:
            try:
                self._queue.put(
                    frame, timeout=0.1 if stop is not None else None, block=stop is not None
                )
                self.put_count += 1
                return True
            except queue.Full:
                if stop is None or stop.is_set():
                    self.dropped += 1
                    return False

    def get(self, timeout: float) -> Frame | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def qsize(self) -> int:
        return self._queue.qsize()

    def __len__(self) -> int:
        return self._queue.qsize()
