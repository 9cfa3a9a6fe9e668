"""Telemetry downsampled per device, pipeline and minute: aggregated in memory, then
added into ``telemetry_minutes`` with one upsert per row.

A batch of telemetry messages becomes one ``Minute`` per (device, pipeline, minute)
before anything is written, so a device reporting every second costs one row write
per minute per batch, not one per message. The upsert adds sums and keeps maxima in
SQL (``samples = samples + excluded.samples``), so several server processes can add
into the same row without reading it first. Rows are written in key order, so two
processes upserting overlapping rows take their row locks in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from agent.protocol import PipelineTelemetry, Telemetry

from .db.schema import NAME, Device, TelemetryMinute
from .ingest_writes import as_json

DEVICE_WIDE = ""  # the pipeline of the device-wide row
SOURCE_STATE_LEN = 32

# Columns added on conflict; the rest of the non-key columns keep the larger value,
# except source_state (the newest wins).
_SUMS = (
    "samples",
    "fps_sum",
    "invoke_p95_sum",
    "wait_p95_sum",
    "preprocess_p95_sum",
    "postprocess_p95_sum",
    "latency_samples",
    "cpu_sum",
)
_MAXIMA = (
    "invoke_p95_max",
    "errors",
    "dropped",
    "source_failures",
    "mem_rss_mb_max",
    "temperature_c_max",
    "outbox_dropped",
    "outbox_depth_max",
    "drift_max",
)


def finite(value: float | None) -> float | None:
    """A device's figure, or None when it is not a finite number (NaN would poison a
    sum for good, and SQLite stores it as NULL)."""
    return value if value is not None and math.isfinite(value) else None


def _larger(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


@dataclass
class Minute:
    """One row's worth of telemetry, summed over the messages of a batch."""

    device_id: str
    pipeline: str
    minute: int
    samples: int = 0
    fps_sum: float = 0.0
    invoke_p95_sum: float = 0.0
    invoke_p95_max: float | None = None
    wait_p95_sum: float = 0.0
    preprocess_p95_sum: float = 0.0
    postprocess_p95_sum: float = 0.0
    latency_samples: int = 0
    errors: int = 0
    dropped: int = 0
    source_failures: int = 0
    source_state: str | None = None
    drift_max: float | None = None
    cpu_sum: float = 0.0
    mem_rss_mb_max: float | None = None
    temperature_c_max: float | None = None
    outbox_dropped: int = 0
    outbox_depth_max: int = 0

    def add_pipeline(self, figures: PipelineTelemetry) -> None:
        self.samples += 1
        self.fps_sum += finite(figures.fps) or 0.0
        p95 = finite(figures.invoke_ms_p95)
        if p95 is not None:
            self.latency_samples += 1
            self.invoke_p95_sum += p95
            self.invoke_p95_max = _larger(self.invoke_p95_max, p95)
            self.wait_p95_sum += _p95(figures, "wait")
            self.preprocess_p95_sum += _p95(figures, "preprocess")
            self.postprocess_p95_sum += _p95(figures, "postprocess")
        # Cumulative counters on the device: the largest value seen.
        self.errors = max(self.errors, figures.errors)
        self.dropped = max(self.dropped, figures.dropped)
        self.source_failures = max(self.source_failures, figures.source_failures)
        self.source_state = figures.source_state[:SOURCE_STATE_LEN]
        self.drift_max = _larger(self.drift_max, finite(figures.drift))

    def add_device(self, telemetry: Telemetry) -> None:
        pipes = list(telemetry.pipelines.values())
        self.samples += 1
        fps, worst = device_figures(telemetry)
        self.fps_sum += fps
        if worst is not None:
            self.latency_samples += 1
            self.invoke_p95_sum += worst
            self.invoke_p95_max = _larger(self.invoke_p95_max, worst)
        self.errors = max(self.errors, sum(p.errors for p in pipes))
        self.dropped = max(self.dropped, sum(p.dropped for p in pipes))
        self.source_failures = max(self.source_failures, sum(p.source_failures for p in pipes))
        # The device-wide row's drift is its most drifted pipeline's.
        for p in pipes:
            self.drift_max = _larger(self.drift_max, finite(p.drift))
        self.cpu_sum += finite(telemetry.cpu_percent) or 0.0
        self.mem_rss_mb_max = _larger(self.mem_rss_mb_max, finite(telemetry.mem_rss_mb))
        self.temperature_c_max = _larger(self.temperature_c_max, finite(telemetry.temperature_c))
        self.outbox_dropped = max(self.outbox_dropped, telemetry.outbox_dropped)
        self.outbox_depth_max = max(self.outbox_depth_max, telemetry.outbox_depth)

    def row(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _p95(figures: PipelineTelemetry, stage: str) -> float:
    latency = figures.stages.get(stage)
    if latency is None:
        return 0.0
    return finite(latency.p95 if latency.p95 is not None else latency.p50) or 0.0


def pipeline_key(name: str) -> str:
    """Pipeline names in telemetry are free keys on the wire: bounded to the column."""
    return name[:NAME] or "-"


def roll_up(messages: Iterable[Telemetry]) -> list[Minute]:
    """The batch as rows, one per (device, pipeline, minute), in key order."""
    rows: dict[tuple[str, str, int], Minute] = {}

    def minute_row(device: str, pipeline: str, minute: int) -> Minute:
        key = (device, pipeline, minute)
        row = rows.get(key)
        if row is None:
            row = rows[key] = Minute(device, pipeline, minute)
        return row

    for t in messages:
        minute = int(t.ts // 60)
        minute_row(t.device, DEVICE_WIDE, minute).add_device(t)
        for name, figures in t.pipelines.items():
            minute_row(t.device, pipeline_key(name), minute).add_pipeline(figures)
    return [rows[k] for k in sorted(rows)]


def device_figures(t: Telemetry) -> tuple[float, float | None]:
    """(fps summed over pipelines, worst invoke p95) for the device row."""
    pipes = t.pipelines.values()
    p95s = [v for p in pipes if (v := finite(p.invoke_ms_p95)) is not None]
    return sum(finite(p.fps) or 0.0 for p in pipes), (max(p95s) if p95s else None)


# ------------------------------------------------------------------- writing


def _insert(dialect: str, model: Any) -> Any:
    """The dialect's INSERT on the model's table: Core, not the ORM's bulk path, so
    the rows go in one executemany (the ORM splits rows by which keys are None)."""
    module = postgresql if dialect == "postgresql" else sqlite
    return module.insert(model.__table__)


def _greatest(dialect: str, current: Any, new: Any) -> ColumnElement[Any]:
    """The larger of two values, NULL only when both are (PostgreSQL's GREATEST
    ignores NULLs; SQLite's two-argument max() returns NULL if either is)."""
    if dialect == "postgresql":
        return func.greatest(current, new)
    return func.max(func.coalesce(current, new), func.coalesce(new, current))


def upsert_minutes(session: Session, dialect: str, rows: Sequence[Minute]) -> None:
    if not rows:
        return
    stmt = _insert(dialect, TelemetryMinute)
    table = TelemetryMinute.__table__.c
    new = stmt.excluded
    updates: dict[str, Any] = {name: table[name] + new[name] for name in _SUMS}
    updates.update({name: _greatest(dialect, table[name], new[name]) for name in _MAXIMA})
    updates["source_state"] = func.coalesce(new.source_state, table.source_state)
    stmt = stmt.on_conflict_do_update(
        index_elements=["device_id", "pipeline", "minute"], set_=updates
    )
    session.connection().execute(stmt, [r.row() for r in rows])


def upsert_device_telemetry(
    session: Session, dialect: str, latest: Sequence[tuple[Telemetry, float]]
) -> None:
    """The devices' last telemetry (one message per device, with its receive time):
    a row is made when telemetry comes before any state; an older message never
    replaces a newer one another process wrote."""
    if not latest:
        return
    stmt = _insert(dialect, Device)
    c = Device.__table__.c
    new = stmt.excluded
    newer = (c.telemetry_ts.is_(None)) | (new.telemetry_ts >= c.telemetry_ts)

    stmt = stmt.on_conflict_do_update(
        index_elements=["id"],
        set_={
            "last_seen": _greatest(dialect, c.last_seen, new.last_seen),
            "telemetry": _case(newer, new.telemetry, c.telemetry),
            "telemetry_ts": _greatest(dialect, c.telemetry_ts, new.telemetry_ts),
            "fps": _case(newer, new.fps, c.fps),
            "invoke_p95_ms": _case(newer, new.invoke_p95_ms, c.invoke_p95_ms),
        },
    )
    rows = []
    for t, received in sorted(latest, key=lambda pair: pair[0].device):
        fps, p95 = device_figures(t)
        rows.append(
            {
                "id": t.device,
                "first_seen": received,
                "last_seen": received,
                # Talking, but no state yet: the state sets online and status.
                "online": True,
                "status": "ok",
                "groups": [],
                "telemetry": as_json(t),
                "telemetry_ts": t.ts,
                "fps": fps,
                "invoke_p95_ms": p95,
            }
        )
    session.connection().execute(stmt, rows)


def _case(condition: ColumnElement[bool], then: Any, otherwise: Any) -> Any:
    """``then`` when the incoming message is newer, else the stored value."""
    return case((condition, then), else_=otherwise)
