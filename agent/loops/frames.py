"""What flows from a source to the inference worker: frames, and where they wait.

A source (camera, sensor, synthetic, ...) produces ``Frame`` objects into something
the worker reads through ``FrameInput``: a latest-frame slot for cameras, a bounded
FIFO for sensors. ``FrameQueue`` is the simple bounded FIFO.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Frame:
    """One unit of work: ``seq`` numbers frames of one source, ``ts`` is Unix time of capture.

    ``data`` is what the worker's prepare hook understands; the default hook takes a
    ready input tensor (or a list of them, one per model input).
    """

    seq: int
    ts: float
    data: Any


class FrameInput(Protocol):
    def get(self, timeout: float) -> Frame | None:
        """The next frame, or None when none arrived within ``timeout`` seconds."""
        ...


class FrameQueue:
    """A bounded FIFO of frames; ``put`` refuses (returns False) when full."""

    def __init__(self, maxsize: int = 64) -> None:
        self._queue: queue.Queue[Frame] = queue.Queue(maxsize)

    def put(self, frame: Frame) -> bool:
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            return False
        return True

    def get(self, timeout: float) -> Frame | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def qsize(self) -> int:
        return self._queue.qsize()
