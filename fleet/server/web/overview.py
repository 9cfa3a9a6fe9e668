"""The overview page: device counts, versions per model, rollouts in progress, and the
devices with problems, each a fragment that re-renders on the live stream's events."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from ..api.deps import Ctx
from ..db.schema import (
    Device,
    DeviceModel,
    DevicePipeline,
    Rollout,
    RolloutDevice,
    TelemetryMinute,
)
from ..rollouts import SETTLED, UNFINISHED, status_counts
from .auth import PageActor
from .render import ago, render

router = APIRouter()

MAX_PROBLEMS = 25
# A drift warning is device-sent text (up to 500 characters): the list shows its start.
DRIFT_TEXT = 120
# Telemetry looked at for problems: failures and drops that grew in the last
# WINDOW_MIN minutes; p95 "rising" when the last RECENT_MIN minutes' mean is RISE
# times the mean of the minutes before them.
WINDOW_MIN = 15
RECENT_MIN = 3
RISE = 1.5
# How long the telemetry part of the problems is reused (it moves by the minute).
TELEMETRY_TTL_S = 10.0


@dataclass(frozen=True)
class Problem:
    device: str
    kind: str  # offline | probation | drift | source | outbox | latency
    text: str


def counts(s: Session) -> dict[str, int]:
    online, offline, degraded = s.execute(
        select(
            func.sum(case((Device.online.is_(True), 1), else_=0)),
            func.sum(case((Device.online.is_(True), 0), else_=1)),
            func.sum(case((Device.status == "degraded", 1), else_=0)),
        )
    ).one()
    updating = s.scalar(
        select(func.count(func.distinct(RolloutDevice.device_id)))
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .where(Rollout.state.in_(UNFINISHED), RolloutDevice.status.not_in(SETTLED))
    )
    return {
        "online": int(online or 0),
        "offline": int(offline or 0),
        "degraded": int(degraded or 0),
        "updating": int(updating or 0),
    }


def versions(s: Session) -> list[tuple[str, str | None, int]]:
    """(model, active version, devices) for every model a device reports."""
    rows = s.execute(
        select(DeviceModel.model, DeviceModel.active, func.count())
        .group_by(DeviceModel.model, DeviceModel.active)
        .order_by(DeviceModel.model, DeviceModel.active)
    ).all()
    return [(m, v, int(n)) for m, v, n in rows]


def active_rollouts(s: Session) -> list[dict[str, Any]]:
    rollouts = list(
        s.scalars(select(Rollout).where(Rollout.state.in_(UNFINISHED)).order_by(Rollout.created_at))
    )
    per = status_counts(s, [r.id for r in rollouts])
    return [
        {
            "id": r.id,
            "model": r.model,
            "version": r.version,
            "target": f"{r.target_kind} {r.target}",
            "state": r.state,
            "done": per[r.id].get("done", 0),
            "total": sum(per[r.id].values()),
        }
        for r in rollouts
    ]


class Recent:
    """The telemetry problems last found, kept for ``ttl_s``: they come from per-minute
    rows, and the overview re-renders on every live event (twice a second on a busy
    fleet), so one scan serves many renders."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._value: list[tuple[str, str, str]] = []
        self._at = -math.inf

    def get(self, now: float, compute: Callable[[], list[tuple[str, str, str]]]) -> list[Any]:
        with self._lock:
            if 0 <= now - self._at < self.ttl_s:
                return self._value
        value = compute()  # outside the lock: a database query
        with self._lock:
            self._value, self._at = value, now
        return value


def problems(s: Session, now: float, recent: Recent | None = None) -> list[Problem]:
    """Offline longest first, then probation failures, drift warnings, source failures,
    outbox drops, rising p95; each device once, at most MAX_PROBLEMS."""
    found: dict[str, Problem] = {}

    def add(device: str, kind: str, text: str) -> None:
        if device not in found and len(found) < MAX_PROBLEMS:
            found[device] = Problem(device, kind, text)

    for device, last_seen in s.execute(
        select(Device.id, Device.last_seen)
        .where(Device.online.is_(False))
        .order_by(Device.last_seen)
        .limit(MAX_PROBLEMS)
    ):
        add(device, "offline", f"offline, last seen {ago(last_seen, now)}")
    for device, model, message in s.execute(
        select(DeviceModel.device_id, DeviceModel.model, DeviceModel.message)
        .where(DeviceModel.message.contains("failed probation"))
        .order_by(DeviceModel.device_id)
        .limit(MAX_PROBLEMS)
    ):
        add(device, "probation", f"{model}: {message}")
    for device, text in drift_problems(s):
        add(device, "drift", text)

    def scan() -> list[tuple[str, str, str]]:
        return telemetry_problems(s, now)

    for device, kind, text in scan() if recent is None else recent.get(now, scan):
        add(device, kind, text)
    return list(found.values())


def drift_problems(s: Session) -> list[tuple[str, str]]:
    """(device, "drift: <pipeline>[, <pipeline>]: <first warning>") for each device
    whose retained state carries a drift warning, by device id."""
    rows = s.execute(
        select(DevicePipeline.device_id, DevicePipeline.pipeline, DevicePipeline.drift)
        .where(DevicePipeline.drift.is_not(None))
        .order_by(DevicePipeline.device_id, DevicePipeline.pipeline)
        .limit(4 * MAX_PROBLEMS)
    ).all()
    per: dict[str, list[tuple[str, str]]] = {}
    for device, pipeline, warning in rows:
        per.setdefault(device, []).append((pipeline, warning or ""))
    out = []
    for device, found in per.items():
        names = ", ".join(p for p, _ in found)
        warning = found[0][1]
        cut = warning if len(warning) <= DRIFT_TEXT else warning[: DRIFT_TEXT - 1] + "…"
        out.append((device, f"drift: {names}: {cut}"))
    return out


def telemetry_problems(s: Session, now: float) -> list[tuple[str, str, str]]:
    """(device, kind, text) from the device-wide telemetry minutes of the window, in one
    scan: source failures first, then outbox drops, then rising p95 invoke."""
    T = TelemetryMinute
    is_recent = T.minute > int(now // 60) - RECENT_MIN
    failures = func.max(T.source_failures) - func.min(T.source_failures)
    drops = func.max(T.outbox_dropped) - func.min(T.outbox_dropped)
    new_sum = func.sum(case((is_recent, T.invoke_p95_sum), else_=0.0))
    new_n = func.sum(case((is_recent, T.latency_samples), else_=0))
    old_sum = func.sum(case((is_recent, 0.0), else_=T.invoke_p95_sum))
    old_n = func.sum(case((is_recent, 0), else_=T.latency_samples))
    rising = and_(new_n > 0, old_n > 0, new_sum * old_n > RISE * old_sum * new_n)
    rows = s.execute(
        select(T.device_id, failures, drops, new_sum, new_n, old_sum, old_n)
        .where(T.minute >= int(now // 60) - WINDOW_MIN, T.pipeline == "")
        .group_by(T.device_id)
        .having(or_(failures > 0, drops > 0, rising))
        .order_by(T.device_id)
        .limit(3 * MAX_PROBLEMS)
    ).all()
    out = [(r[0], "source", f"{r[1]} source failure(s) in {WINDOW_MIN} min") for r in rows if r[1]]
    out += [(r[0], "outbox", f"{r[2]} outbox message(s) dropped in {WINDOW_MIN} min")
            for r in rows if r[2]]  # fmt: skip
    for device, _, _, a, an, b, bn in rows:
        if an and bn and a * bn > RISE * b * an:
            out.append((device, "latency", f"p95 invoke rose from {b / bn:.1f} to {a / an:.1f} ms"))
    return out


def overview_data(request: Request, ctx: Ctx) -> dict[str, Any]:
    now = ctx.clock()
    recent = getattr(request.app.state, "telemetry_problems", None)
    if recent is None:
        recent = request.app.state.telemetry_problems = Recent(TELEMETRY_TTL_S)
    with ctx.database.session() as s:
        return {
            "counts": counts(s),
            "versions": versions(s),
            "rollouts": active_rollouts(s),
            "problems": problems(s, now, recent),
        }


@router.get("/", response_class=HTMLResponse)
def overview_page(request: Request, ctx: Ctx, actor: PageActor) -> HTMLResponse:
    return render(request, "overview.html", actor, **overview_data(request, ctx))


@router.get("/ui/fragments/overview", response_class=HTMLResponse)
def overview_fragment(request: Request, ctx: Ctx, actor: PageActor) -> HTMLResponse:
    return render(request, "fragments/overview.html", actor, **overview_data(request, ctx))
