"""Builders of the console's events for the ingest tests, and a database that fails."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from agent.protocol import (
    ModelState,
    PipelineState,
    PipelineTelemetry,
    Reply,
    ReplyCode,
    RuntimeInfo,
    StageLatency,
    State,
    Telemetry,
)
from fleet.console import ReplyEvent, StateEvent, TelemetryEvent
from fleet.server.db import Database

T0 = 1_800_000_000.0  # a minute boundary: T0 // 60 is whole


def state(
    device: str,
    ts: float,
    *,
    online: bool = True,
    version: str | None = "1",
    versions: list[str] | None = None,
    groups: tuple[str, ...] = ("kitchen",),
    status: str = "serving",
    message: str | None = None,
    since: float = T0 - 100,
    thread_deaths: int = 0,
    pipelines: dict[str, str | None] | None = None,
) -> StateEvent:
    """``pipelines``: name -> drift warning (default: ``cam``, no warning)."""
    model = ModelState(
        name="digits",
        active=version,
        last_known_good=version,
        status=status,  # type: ignore[arg-type]
        versions=versions if versions is not None else ([version] if version else []),
        message=message,
    )
    return StateEvent(
        device,
        State(
            device=device,
            online=online,
            agent_version="0.9.0",
            runtime=RuntimeInfo(name="ai_edge_litert", version="2.3.0"),
            models=[model],
            pipelines=[
                PipelineState(name=name, model="digits", status="running", drift=drift)
                for name, drift in (pipelines if pipelines is not None else {"cam": None}).items()
            ],
            groups=list(groups),
            thread_deaths=thread_deaths,
            since=since,
            ts=ts,
        ),
        ts,
    )


def telemetry(
    device: str,
    seq: int,
    ts: float,
    *,
    fps: float = 10.0,
    p95: float = 4.0,
    drift: float | None = 0.05,
) -> TelemetryEvent:
    return TelemetryEvent(
        device,
        Telemetry(
            device=device,
            seq=seq,
            ts=ts,
            uptime_s=100.0,
            cpu_percent=20.0,
            mem_rss_mb=150.0 + seq,
            temperature_c=50.0,
            outbox_depth=seq,
            pipelines={
                "cam": PipelineTelemetry(
                    model="digits",
                    version="1",
                    fps=fps,
                    invoke_ms_p95=p95,
                    errors=seq,
                    source_state="open",
                    stages={"wait": StageLatency(p50=1.0, p95=2.0)},
                    drift=drift,
                    confidence=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
                ),
                "door": PipelineTelemetry(fps=1.0, invoke_ms_p95=p95 * 2, source_state="open"),
            },
        ),
        ts,
    )


def reply(
    device: str,
    cid: str,
    status: str,
    ts: float,
    *,
    code: ReplyCode | None = None,
    stage: str | None = None,
    data: dict[str, Any] | None = None,
) -> ReplyEvent:
    default = {
        "accepted": ReplyCode.ACCEPTED,
        "progress": ReplyCode.IN_PROGRESS,
        "done": ReplyCode.OK,
        "failed": ReplyCode.INTERNAL,
    }[status]
    return ReplyEvent(
        device,
        Reply(
            id=cid,
            device=device,
            status=status,  # type: ignore[arg-type]
            code=code or default,
            ts=ts,
            stage=stage,
            data=data,
        ),
        ts,
    )


def count(database: Database, table: Any, *where: Any) -> int:
    with database.session() as s:
        return int(s.scalar(select(func.count()).select_from(table).where(*where)) or 0)


def total(database: Database, column: Any, *where: Any) -> int:
    with database.session() as s:
        return int(s.scalar(select(func.coalesce(func.sum(column), 0)).where(*where)) or 0)


class FailingDatabase(Database):
    """The project's ``Database``, whose sessions refuse to write while ``failures``
    is above zero (one failure used per session), as a database that is down does."""

    def __init__(self, url: str, failures: int = 0) -> None:
        super().__init__(url)
        self._lock = threading.Lock()
        self.failures = failures
        self.refused = 0

    def set_failures(self, n: int) -> None:
        with self._lock:
            self.failures = n

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._lock:
            failing = self.failures > 0
            if failing:
                self.failures -= 1
                self.refused += 1
        if failing:
            raise OperationalError("INSERT ...", {}, ConnectionRefusedError("database is down"))
        with super().session() as s:
            yield s
