"""Inventory: the device list (paged, sorted, filtered), one device, its history and
telemetry series, and the groups.

The list stays one count and one page query at any fleet size: each filter is a
column of ``devices`` or an indexed lookup in ``device_groups`` / ``device_models``,
and the page's models come in one more query for its ids only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, load_only
from sqlalchemy.sql.elements import ColumnElement

from ..context import ServerContext
from ..db.schema import (
    CommandRecord,
    Device,
    DeviceGroup,
    DeviceModel,
    Event,
    Rollout,
    RolloutDevice,
    TelemetryMinute,
    VersionHistory,
)
from .deps import Ctx, Reader

router = APIRouter(prefix="/api", tags=["devices"])

# Rollouts still moving a device; a device's row in one of them is "pending" for it.
ACTIVE_ROLLOUTS = ("running", "waiting_approval", "paused")
Sort = Literal[
    "id",
    "-id",
    "last_seen",
    "-last_seen",
    "fps",
    "-fps",
    "invoke_p95_ms",
    "-invoke_p95_ms",
    "status",
    "-status",
    "online",
    "-online",
]
SORTS: tuple[str, ...] = get_args(Sort)
Status = Literal["ok", "degraded", "offline"]
STATUSES: tuple[str, ...] = get_args(Status)
MAX_POINTS = 10_000
# The list's columns only: the last state and telemetry (JSON of a few KB a device)
# are for one device's page, and decoding them for a page of 100 made the list slow.
LIST_COLUMNS = load_only(
    Device.id,
    Device.online,
    Device.status,
    Device.groups,
    Device.fps,
    Device.invoke_p95_ms,
    Device.last_seen,
    Device.agent_version,
)

Text = Annotated[str | None, Query(max_length=128)]


class DeviceRow(BaseModel):
    id: str
    online: bool
    status: str
    groups: list[str]
    models: dict[str, str | None]
    fps: float | None
    invoke_p95_ms: float | None
    last_seen: float
    agent_version: str | None


class DevicePage(BaseModel):
    total: int
    offset: int
    limit: int
    devices: list[DeviceRow]


class GroupRow(BaseModel):
    group: str
    devices: int
    online: int


@dataclass(frozen=True)
class DeviceFilter:
    """What the device list is narrowed and ordered by (the API's and the dashboard's)."""

    group: str | None = None
    model: str | None = None
    version: str | None = None
    status: str | None = None
    online: bool | None = None
    q: str | None = None
    sort: str = "id"


def device_page(ctx: ServerContext, f: DeviceFilter, limit: int, offset: int) -> DevicePage:
    """One page of the device list: one count and one page query at any fleet size."""
    conds: list[ColumnElement[bool]] = []
    if f.group is not None:
        conds.append(
            Device.id.in_(select(DeviceGroup.device_id).where(DeviceGroup.group == f.group))
        )
    if f.model is not None or f.version is not None:
        on_model = select(DeviceModel.device_id)
        if f.model is not None:
            on_model = on_model.where(DeviceModel.model == f.model)
        if f.version is not None:
            on_model = on_model.where(DeviceModel.active == f.version)
        conds.append(Device.id.in_(on_model))
    if f.status is not None:
        conds.append(Device.status == f.status)
    if f.online is not None:
        conds.append(Device.online.is_(f.online))
    if f.q:
        conds.append(Device.id.contains(f.q, autoescape=True))
    column = getattr(Device, f.sort.lstrip("-"))
    order = column.desc() if f.sort.startswith("-") else column.asc()
    with ctx.database.session() as s:
        total = s.scalar(select(func.count()).select_from(Device).where(*conds)) or 0
        page = s.scalars(
            select(Device)
            .options(LIST_COLUMNS)
            .where(*conds)
            .order_by(order.nulls_last(), Device.id)
            .limit(limit)
            .offset(offset)
        ).all()
        models = _models_of(s, [d.id for d in page])
    rows = [
        DeviceRow(
            id=d.id,
            online=d.online,
            status=d.status,
            groups=list(d.groups or []),
            models=models.get(d.id, {}),
            fps=d.fps,
            invoke_p95_ms=d.invoke_p95_ms,
            last_seen=d.last_seen,
            agent_version=d.agent_version,
        )
        for d in page
    ]
    return DevicePage(total=total, offset=offset, limit=limit, devices=rows)


@router.get("/devices", response_model=DevicePage)
def list_devices(
    ctx: Ctx,
    _actor: Reader,
    group: Text = None,
    model: Text = None,
    version: Text = None,
    status: Status | None = None,
    online: bool | None = None,
    q: Annotated[str | None, Query(max_length=64, description="part of the device id")] = None,
    sort: Sort = "id",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DevicePage:
    f = DeviceFilter(group, model, version, status, online, q, sort)
    return device_page(ctx, f, limit, offset)


def _models_of(s: Session, ids: list[str]) -> dict[str, dict[str, str | None]]:
    out: dict[str, dict[str, str | None]] = {}
    if not ids:
        return out
    for device_id, name, active in s.execute(
        select(DeviceModel.device_id, DeviceModel.model, DeviceModel.active).where(
            DeviceModel.device_id.in_(ids)
        )
    ):
        out.setdefault(device_id, {})[name] = active
    return out


def _device_or_404(s: Session, device_id: str) -> Device:
    device = s.get(Device, device_id)
    if device is None:
        raise HTTPException(404, f"unknown device {device_id[:80]!r}")
    return device


@router.get("/devices/{device_id}")
def get_device(device_id: str, ctx: Ctx, _actor: Reader) -> dict[str, Any]:
    with ctx.database.session() as s:
        d = _device_or_404(s, device_id)
        models = s.scalars(
            select(DeviceModel)
            .where(DeviceModel.device_id == device_id)
            .order_by(DeviceModel.model)
        ).all()
        pending = s.execute(
            select(RolloutDevice, Rollout)
            .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
            .where(
                RolloutDevice.device_id == device_id,
                Rollout.state.in_(ACTIVE_ROLLOUTS),
                RolloutDevice.status.not_in(("done", "skipped")),
            )
            .order_by(Rollout.created_at)
        ).all()
    return {
        "id": d.id,
        "online": d.online,
        "status": d.status,
        "first_seen": d.first_seen,
        "last_seen": d.last_seen,
        "protocol": d.protocol,
        "agent_version": d.agent_version,
        "runtime": d.runtime,
        "groups": list(d.groups or []),
        "fps": d.fps,
        "invoke_p95_ms": d.invoke_p95_ms,
        "models": [
            {
                "name": m.model,
                "active": m.active,
                "last_known_good": m.last_known_good,
                "status": m.status,
                "versions": m.versions,
                "message": m.message,
            }
            for m in models
        ],
        "pipelines": (d.state or {}).get("pipelines", []),
        "state": d.state,
        "state_ts": d.state_ts,
        "telemetry": d.telemetry,
        "telemetry_ts": d.telemetry_ts,
        "rollouts": [
            {
                "rollout_id": r.id,
                "rollout_state": r.state,
                "model": r.model,
                "version": r.version,
                "wave": rd.wave,
                "status": rd.status,
                "attempts": rd.attempts,
                "command_id": rd.command_id,
                "code": rd.code,
                "message": rd.message,
                "next_attempt_at": rd.next_attempt_at,
            }
            for rd, r in pending
        ],
    }


@router.get("/devices/{device_id}/history")
def device_history(
    device_id: str,
    ctx: Ctx,
    _actor: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    with ctx.database.session() as s:
        _device_or_404(s, device_id)
        versions = s.scalars(
            select(VersionHistory)
            .where(VersionHistory.device_id == device_id)
            .order_by(VersionHistory.started.desc())
            .limit(limit)
        ).all()
        commands = s.scalars(
            select(CommandRecord)
            .where(CommandRecord.device_id == device_id)
            .order_by(CommandRecord.created_at.desc())
            .limit(limit)
        ).all()
        events = s.scalars(
            select(Event).where(Event.device_id == device_id).order_by(Event.ts.desc()).limit(limit)
        ).all()
    return {
        "device": device_id,
        "versions": [
            {"model": v.model, "version": v.version, "started": v.started, "ended": v.ended}
            for v in versions
        ],
        "commands": [
            {
                "id": c.id,
                "op": c.op,
                "created_at": c.created_at,
                "created_by": c.created_by,
                "rollout_id": c.rollout_id,
                "status": c.status,
                "code": c.code,
                "message": c.message,
                "finished_at": c.finished_at,
            }
            for c in commands
        ],
        "events": [
            {"ts": e.ts, "kind": e.kind, "message": e.message, "data": e.data} for e in events
        ],
    }


@router.get("/devices/{device_id}/telemetry")
def device_telemetry(
    device_id: str,
    ctx: Ctx,
    _actor: Reader,
    since: float | None = None,
    until: float | None = None,
    pipeline: Annotated[str, Query(max_length=128, description="'' is device-wide")] = "",
    step: Annotated[int, Query(ge=60, le=86400, description="bucket, seconds")] = 60,
) -> dict[str, Any]:
    if step % 60:
        raise HTTPException(422, f"query.step: must be a multiple of 60 seconds, not {step}")
    until = ctx.clock() if until is None else until
    since = until - 3600 if since is None else since
    if since > until:
        raise HTTPException(422, "query.since: after until")
    if (until - since) / step > MAX_POINTS:
        raise HTTPException(422, f"query.step: more than {MAX_POINTS} points; use a coarser step")
    with ctx.database.session() as s:
        _device_or_404(s, device_id)
        minutes = s.scalars(
            select(TelemetryMinute)
            .where(
                TelemetryMinute.device_id == device_id,
                TelemetryMinute.pipeline == pipeline,
                TelemetryMinute.minute >= int(since // 60),
                TelemetryMinute.minute <= int(until // 60),
            )
            .order_by(TelemetryMinute.minute)
        ).all()
    return {
        "device": device_id,
        "pipeline": pipeline,
        "step": step,
        "since": since,
        "until": until,
        "points": telemetry_points(minutes, step, pipeline == ""),
    }


def telemetry_points(minutes: Any, step: int, device_wide: bool) -> list[dict[str, Any]]:
    """Minute rows folded into ``step``-second buckets: means of the sums, maxima of
    the maxima, and the largest value of the device's cumulative counters; the
    device-wide series (pipeline ``""``) adds CPU, memory, temperature and outbox."""
    per = step // 60
    buckets: dict[int, list[TelemetryMinute]] = {}
    for m in minutes:
        buckets.setdefault(m.minute // per, []).append(m)
    points = []
    for bucket, rows in sorted(buckets.items()):
        samples = sum(r.samples for r in rows)
        lat = sum(r.latency_samples for r in rows)
        maxima = [r.invoke_p95_max for r in rows if r.invoke_p95_max is not None]
        drifts = [r.drift_max for r in rows if r.drift_max is not None]

        def mean(attr: str, count: int, rows: list[TelemetryMinute] = rows) -> float | None:
            return round(sum(getattr(r, attr) for r in rows) / count, 3) if count else None

        points.append(
            {
                "ts": bucket * per * 60,
                "samples": samples,
                "fps": mean("fps_sum", samples),
                "invoke_p95_ms": mean("invoke_p95_sum", lat),
                "invoke_p95_max_ms": max(maxima) if maxima else None,
                "wait_p95_ms": mean("wait_p95_sum", lat),
                "preprocess_p95_ms": mean("preprocess_p95_sum", lat),
                "postprocess_p95_ms": mean("postprocess_p95_sum", lat),
                "errors": max(r.errors for r in rows),
                "dropped": max(r.dropped for r in rows),
                "source_state": rows[-1].source_state,
                "source_failures": max(r.source_failures for r in rows),
                # PSI, the largest in the bucket (the device-wide series: of any pipeline).
                "drift_max": max(drifts) if drifts else None,
            }
        )
        if device_wide:
            temps = [r.temperature_c_max for r in rows if r.temperature_c_max is not None]
            mems = [r.mem_rss_mb_max for r in rows if r.mem_rss_mb_max is not None]
            points[-1].update(
                cpu_percent=mean("cpu_sum", samples),
                mem_rss_mb_max=max(mems) if mems else None,
                temperature_c_max=max(temps) if temps else None,
                outbox_depth_max=max(r.outbox_depth_max for r in rows),
                outbox_dropped=max(r.outbox_dropped for r in rows),
            )
    return points


@router.get("/groups", response_model=list[GroupRow])
def list_groups(ctx: Ctx, _actor: Reader) -> list[GroupRow]:
    with ctx.database.session() as s:
        rows = s.execute(
            select(
                DeviceGroup.group,
                func.count(),
                func.sum(case((Device.online.is_(True), 1), else_=0)),
            )
            .join(Device, Device.id == DeviceGroup.device_id)
            .group_by(DeviceGroup.group)
            .order_by(DeviceGroup.group)
        ).all()
    return [GroupRow(group=g, devices=n, online=int(on or 0)) for g, n, on in rows]
