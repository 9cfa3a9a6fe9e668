"""A pipeline's watch on output drift: the served version's outputs over a sliding
window against that version's reference statistics, and the warning it raises.

The results thread adds each frame's summary (a few appends, see
``health.OutputWindow``); readers (the telemetry sampler, a Prometheus scrape, the
service's tick) bin the window when they ask. A new served version, or a new window
size, starts an empty window: the figures and the warning are always of one model
against its own reference.

The warning has hysteresis: it is raised when the distance goes over the threshold and
cleared only when it falls below ``CLEAR_RATIO`` of it (or the window restarts), so a
distance that hovers at the threshold does not flip the retained state at every read.
Its text is fixed when it is raised (distance at onset, since when), so the state
changes only when the warning comes or goes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.config import DriftConfig
from agent.loops.postprocess import Output, summarise
from agent.models.health import OutputWindow, Reference

logger = logging.getLogger(__name__)

CLEAR_RATIO = 0.8


@dataclass(frozen=True)
class DriftFigures:
    """What telemetry carries: the distance (None below ``min_frames``) and the live
    confidence quantiles (None when the task has none, e.g. raw outputs)."""

    frames: int
    distance: float | None
    confidence: list[float] | None


def _measured(reference: Reference) -> str:
    if reference.classify is not None:
        return "top-1 classes, confidence"
    if reference.detect is not None:
        return "boxes per frame, scores"
    if reference.segment is not None:
        return "foreground area, classes present"
    return "output means"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class DriftMonitor:
    """One pipeline's drift statistics. ``add`` belongs to the results thread;
    ``evaluate`` and ``warning`` may be called from any thread. The lock is held for
    an append or one binning of the window (no I/O), so the results thread waits at
    most that long, once per read."""

    def __init__(
        self, name: str, config: DriftConfig, clock: Callable[[], float] = time.time
    ) -> None:
        self.name = name
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._version: str | None = None
        self._reference: Reference | None = None
        self._window: OutputWindow | None = None
        self._warning: str | None = None

    @property
    def warning(self) -> str | None:
        return self._warning

    def configure(self, config: DriftConfig) -> None:
        """Take live changes; a new window size or minimum starts the window again."""
        with self._lock:
            old, self._config = self._config, config
            if (old.window, old.min_frames, old.enabled) != (
                config.window,
                config.min_frames,
                config.enabled,
            ):
                self._restart()

    def add(self, version: str, reference: Reference | None, output: Output) -> None:
        """One frame's outputs from ``version`` (results thread)."""
        if version != self._version:
            with self._lock:
                self._version, self._reference = version, reference
                self._restart()
        window = self._window
        if window is None:
            return
        with self._lock:
            try:
                summarise(window, output)
                return
            except Exception as exc:  # never in the way of the result itself
                self._window = None
                error = str(exc)
        logger.error("pipeline %s, version %s: no drift statistics: %s", self.name, version, error)

    def _restart(self) -> None:
        reference = self._reference
        config = self._config
        self._warning = None
        self._window = (
            OutputWindow(reference, config.window, config.min_frames)
            if config.enabled and reference is not None
            else None
        )

    def evaluate(self, serving: str | None) -> DriftFigures | None:
        """Bin the window; raise or clear the warning. None: no drift statistics (off,
        no reference, or the window is not of ``serving``, the version served now)."""
        failed: Exception | None = None
        with self._lock:
            before = self._warning
            window = self._window
            figures = None
            measured = ""
            if window is not None and serving == self._version:
                measured = _measured(window.reference)
                try:
                    figures = window.figures()
                except Exception as exc:  # a reference that does not fit the model's outputs
                    failed, self._window = exc, None
            distance = figures.distance if figures is not None else None
            threshold = self._config.threshold
            if figures is None:
                self._warning = None
            elif self._warning is None and distance is not None and distance > threshold:
                self._warning = (
                    f"output drift PSI {distance:.3f} over {threshold:g} "
                    f"({measured}) since {_when(self._clock())}"
                )
            elif self._warning is not None and (
                distance is None or distance < CLEAR_RATIO * threshold
            ):
                self._warning = None
            warning = self._warning
        if failed is not None:
            logger.error(
                "pipeline %s, version %s: no drift statistics, its reference does not fit "
                "its outputs: %s",
                self.name,
                serving,
                failed,
            )
        if warning != before:
            if warning is not None:
                logger.warning("pipeline %s, version %s: %s", self.name, serving, warning)
            else:
                logger.info("pipeline %s: output drift warning cleared", self.name)
        if figures is None:
            return None
        return DriftFigures(figures.frames, distance, figures.quantiles or None)
