"""Fault injection for crash tests: ``EDGE_AGENT_KILL_AT`` makes the agent SIGKILL itself
when a command reaches a stage, so tests and ``benchmarks.chaos`` can crash it at an
exact instant instead of racing a ``kill -9`` against a fast stage.

``EDGE_AGENT_KILL_AT=installing`` kills at the first report of that stage;
``EDGE_AGENT_KILL_AT=downloading@50`` once that stage reports 50 % or more. Several
points may be given, comma-separated. Unset (always, in production) it does nothing;
the variable is read once, at import.
"""

from __future__ import annotations

import os
import signal

ENV = "EDGE_AGENT_KILL_AT"


def _parse(text: str) -> dict[str, float]:
    points: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        stage, _, percent = item.partition("@")
        try:
            points[stage] = float(percent) if percent else 0.0
        except ValueError:
            points[stage] = 0.0
    return points


_KILL_AT = _parse(os.environ.get(ENV, ""))


def at_stage(stage: str, percent: float | None) -> None:
    """Called on every progress report of a command; kills the process at a chosen point."""
    if not _KILL_AT:
        return
    threshold = _KILL_AT.get(stage)
    if threshold is not None and (threshold == 0.0 or (percent or 0.0) >= threshold):
        os.kill(os.getpid(), signal.SIGKILL)
