"""The source interface, the registry keyed by the config's ``type``, and the capture thread.

A source module registers its class with ``@register("type")``. Driver imports
(OpenCV, picamera2, pyserial) happen inside ``open()``, so the agent imports on a
machine that has none of them; a missing driver is a ``SourceError`` naming it.
"""

from __future__ import annotations

import importlib
import logging
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import numpy as np

from agent.config import SourceConfig
from agent.loops.frames import Frame
from agent.threads import SUPPORT_NICE, lower_priority

logger = logging.getLogger(__name__)


class SourceError(Exception):
    """The source cannot deliver (device gone, stream dropped, driver missing)."""


class EndOfStream(Exception):
    """A finite source (a file played once) has no more frames."""


class Source(ABC):
    """Something that yields frames. Used by one capture thread only."""

    type: ClassVar[str]
    #: True for live sources (cameras): a latest-frame slot, not a queue, should follow.
    live: ClassVar[bool] = False
    #: The smallest (width, height) the consumer needs, set by the pipeline from the
    #: model's input. A source that can deliver smaller frames cheaply (an MJPG
    #: stream, decoded reduced) may, down to this size both ways; such a frame's
    #: ``meta["source_size"]`` is then the full (width, height). None: full frames.
    target_size: tuple[int, int] | None = None

    @property
    def fps(self) -> float | None:
        """The rate to pace reads at, or None when ``read`` itself waits (a device)."""
        return None

    @abstractmethod
    def open(self) -> None:
        """Acquire the device or file; raises SourceError."""

    @abstractmethod
    def read(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The next frame and its metadata; None when nothing is ready yet.

        Raises SourceError when broken (the capture thread reopens it) and EndOfStream
        when a finite source is done.
        """

    def close(self) -> None:  # noqa: B027 - most sources have nothing to release
        """Release the device; safe to call twice."""


_REGISTRY: dict[str, type[Source]] = {}
# Modules that register source types; imported on first use so that the registry is
# complete without importing any driver.
_MODULES = (
    "agent.loops.sources.synthetic",
    "agent.loops.sources.camera",
    "agent.loops.sources.picamera",
    "agent.loops.sources.files",
    "agent.loops.sources.sensor",
    "agent.loops.sources.audio",
)


def register(type_name: str) -> Callable[[type[Source]], type[Source]]:
    def decorate(cls: type[Source]) -> type[Source]:
        cls.type = type_name
        _REGISTRY[type_name] = cls
        return cls

    return decorate


def source_types() -> dict[str, type[Source]]:
    for module in _MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)


def create_source(config: SourceConfig) -> Source:
    """Build (not open) the source a pipeline's config describes."""
    types = source_types()
    cls = types.get(config.type)
    if cls is None:
        raise SourceError(f"unknown source type {config.type!r}")
    return cls(config)  # type: ignore[call-arg]


class FrameSink(Protocol):
    def put(self, frame: Frame, stop: threading.Event | None = None) -> bool: ...


class CaptureThread:
    """Reads a source into a sink; reopens it with backoff when it fails; never exits early.

    ``state`` is one of opening, open, reconnecting, ended, stopped, for telemetry.
    """

    def __init__(
        self,
        name: str,
        source: Source,
        sink: FrameSink,
        *,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.source = source
        self.sink = sink
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state = "stopped"
        self.last_error: str | None = None
        self.frames = 0
        self.failures = 0
        self.heartbeat = time.monotonic()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # Stuck in a driver read: closing the source under it could block on the
                # reader's own lock. Leave the daemon thread to end with the process.
                logger.warning(
                    "source %s did not stop within %.0f s (hung read)", self.name, timeout
                )
                self.state = "stopped"
                return
        self.source.close()
        self.state = "stopped"

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread | None:
        """The thread while it should be running (for the supervisor): None once asked
        to stop or when a finite source has ended."""
        return None if self._stop.is_set() or self.state == "ended" else self._thread

    def _run(self) -> None:
        lower_priority(SUPPORT_NICE)
        backoff = self.min_backoff_s
        while not self._stop.is_set():
            self.state = "opening" if self.failures == 0 else "reconnecting"
            try:
                self.source.open()
            except Exception as exc:  # a driver's own exception type too: retry, don't die
                text = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
                self._failed(text)
                self._stop.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            self.state = "open"
            logger.info("source %s open (%s)", self.name, self.source.type)
            try:
                self._pump()
                backoff = self.min_backoff_s
            except EndOfStream:
                self.state = "ended"
                logger.info("source %s reached its end", self.name)
                self.source.close()
                return
            except SourceError as exc:
                self._failed(str(exc))
                self._stop.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self.max_backoff_s)
            except Exception as exc:  # a driver bug must not end capture for good
                logger.exception("source %s crashed", self.name)
                self._failed(f"{type(exc).__name__}: {exc}")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            finally:
                self.source.close()

    def _failed(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        self.state = "reconnecting"
        self.heartbeat = time.monotonic()
        logger.warning("source %s failed: %s", self.name, reason)

    def _pump(self) -> None:
        fps = self.source.fps
        period = 1.0 / fps if fps else 0.0
        due = time.monotonic()
        while not self._stop.is_set():
            if period:
                delay = due - time.monotonic()
                while delay > 0:
                    # In steps, so a slow pace never looks like a hung capture.
                    if self._stop.wait(min(delay, 1.0)):
                        return
                    self.heartbeat = time.monotonic()
                    delay = due - time.monotonic()
                # Late by more than a period (a stall): restart the schedule, don't burst.
                due = max(due + period, time.monotonic() - period)
            item = self.source.read()
            self.heartbeat = time.monotonic()
            if item is None:
                if not period:
                    self._stop.wait(0.005)
                continue
            data, meta = item
            self.frames += 1
            self.sink.put(Frame(self.frames, self._clock(), data, meta), self._stop)
