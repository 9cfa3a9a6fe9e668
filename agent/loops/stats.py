"""Cheap running statistics for the hot path: counters and a latency window."""

from __future__ import annotations

import threading

import numpy as np


class LatencyWindow:
    """The last ``size`` durations (ms) in a ring buffer; percentiles on demand.

    ``add`` is one store and an increment: cheap enough for every frame. Readers take
    a copy, so a telemetry thread never blocks the worker.
    """

    def __init__(self, size: int = 512) -> None:
        self._buf = np.zeros(size, np.float64)
        self._n = 0

    def add(self, ms: float) -> None:
        self._buf[self._n % len(self._buf)] = ms
        self._n += 1

    @property
    def count(self) -> int:
        return self._n

    def values(self) -> np.ndarray:
        return self._buf[: min(self._n, len(self._buf))].copy()

    def percentiles(self, *qs: float) -> list[float | None]:
        values = self.values()
        if values.size == 0:
            return [None for _ in qs]
        return [round(float(v), 3) for v in np.percentile(values, qs)]


class RateMeter:
    """Events per second between two reads (for fps in telemetry)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_count = 0
        self._last_time: float | None = None

    def rate(self, count: int, now: float) -> float:
        with self._lock:
            if self._last_time is None or now <= self._last_time:
                self._last_count, self._last_time = count, now
                return 0.0
            value = (count - self._last_count) / (now - self._last_time)
            self._last_count, self._last_time = count, now
            return round(value, 2)
