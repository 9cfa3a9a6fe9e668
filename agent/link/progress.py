"""Progress replies of a long command, throttled so a fast download cannot flood
the broker with one reply per chunk."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.ops import faults

PROGRESS_INTERVAL_S = 0.5


class SendProgress(Protocol):
    """Sends one progress reply: (stage, percent clamped to 0..100 or None[, data]).
    Called with two arguments when there is no data, so a two-argument sender works."""

    def __call__(
        self, stage: str, percent: float | None, data: dict[str, Any] | None = None, /
    ) -> None: ...


class ProgressReporter:
    """A ``p.Progress`` callable for one command.

    A new stage is always reported; within a stage, at most one report per
    ``interval_s`` and none that repeats the last percent, except 100 %.
    """

    def __init__(
        self,
        send: SendProgress,
        interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        on_new_stage: Callable[[str], None] | None = None,
    ) -> None:
        self._send = send
        self._on_new_stage = on_new_stage
        self._interval_s = interval_s
        self._clock = clock
        self._stage: str | None = None
        self._percent: float | None = None
        self._data: dict[str, Any] | None = None
        self._at = 0.0

    def __call__(
        self, stage: str, percent: float | None, data: dict[str, Any] | None = None
    ) -> None:
        if stage != self._stage and self._on_new_stage is not None:
            # Before the seam below, so a crash in this stage is known to be in it.
            self._on_new_stage(stage)
        # The crash-test seam: EDGE_AGENT_KILL_AT=<stage>[@percent] dies here.
        faults.at_stage(stage, percent)
        now = self._clock()
        if stage == self._stage and percent != 100.0:
            if now - self._at < self._interval_s or (
                percent == self._percent and data == self._data
            ):
                return
        self._stage, self._percent, self._data, self._at = stage, percent, data, now
        if data is None:
            self._send(stage, _clamped(percent))
        else:
            self._send(stage, _clamped(percent), data)


def _clamped(percent: float | None) -> float | None:
    if percent is None:
        return None
    value = float(percent)
    if math.isnan(value):
        return None
    return min(100.0, max(0.0, value))
