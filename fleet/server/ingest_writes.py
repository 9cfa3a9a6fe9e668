"""What ingest writes for one batch, inside the caller's transaction.

States update the inventory (``devices``, ``device_groups``, ``device_models``,
``device_pipelines`` with their drift warnings), open and close ``version_history``
rows and record ``events`` on transitions; replies become ``replies`` rows and are
folded into their ``commands`` row; telemetry goes through ``telemetry_rollup``.
Nothing here commits: ingest owns the transaction, so a batch is written whole or not
at all.

Every string that reaches a bounded column is cut to fit, and NUL characters
(PostgreSQL refuses them in text) are replaced: a device's message must never make
a batch fail.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic_core
from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from agent.protocol import ModelState, PipelineState, Reply, ReplyCode, State

from .config import RetentionConfig
from .db.schema import (
    NAME,
    CommandRecord,
    Device,
    DeviceGroup,
    DeviceModel,
    DevicePipeline,
    Event,
    ReplyRecord,
    TelemetryMinute,
    VersionHistory,
)

DAY = 86400.0
# ``IN (...)`` lists are kept well under SQLite's bound on parameters.
CHUNK = 500
FINAL = frozenset({"done", "failed", "expired"})
# Reply status -> how far a command got; a reply never moves a command back.
_RANK = {"sent": 0, "accepted": 1, "progress": 2, "done": 3, "failed": 3, "expired": 3}


def text(value: str | None, limit: int | None = None) -> str | None:
    """A device-supplied string made storable: no NUL, at most ``limit`` characters."""
    if value is None:
        return None
    clean = value.replace("\x00", "\ufffd")
    return clean[:limit] if limit is not None else clean


def as_json(value: Any) -> Any:
    """A value for a JSON column, as plain JSON: a float that is not finite (which a
    device may send) becomes null, since PostgreSQL's json refuses NaN."""
    if isinstance(value, BaseModel):
        return json.loads(value.model_dump_json(exclude_none=True))
    return json.loads(pydantic_core.to_json(value, inf_nan_mode="null"))


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def device_status(state: State) -> str:
    if not state.online:
        return "offline"
    if (
        state.threads_down
        or any(m.status == "degraded" for m in state.models)
        or any(p.status == "degraded" for p in state.pipelines)
    ):
        return "degraded"
    return "ok"


@dataclass
class StateOutcome:
    applied: int = 0
    ignored_old: int = 0
    events: dict[str, int] = field(default_factory=lambda: defaultdict(int))


# -------------------------------------------------------------------- states


def write_states(session: Session, states: Sequence[tuple[State, float]]) -> StateOutcome:
    """Apply states (with their receive times) in arrival order."""
    outcome = StateOutcome()
    if not states:
        return outcome
    ids = sorted({s.device for s, _ in states})
    devices: dict[str, Device] = {}
    models: dict[str, dict[str, DeviceModel]] = defaultdict(dict)
    pipelines: dict[str, dict[str, DevicePipeline]] = defaultdict(dict)
    groups: dict[str, dict[str, DeviceGroup]] = defaultdict(dict)
    history: dict[tuple[str, str], VersionHistory] = {}
    for part in _chunks(ids):
        # Locked in id order: another server process applying the same retained
        # state waits here, then sees it applied (same state_ts) and skips it.
        query = select(Device).where(Device.id.in_(part)).order_by(Device.id).with_for_update()
        devices.update((d.id, d) for d in session.scalars(query))
        for m in session.scalars(select(DeviceModel).where(DeviceModel.device_id.in_(part))):
            models[m.device_id][m.model] = m
        query_pipes = select(DevicePipeline).where(DevicePipeline.device_id.in_(part))
        for p in session.scalars(query_pipes):
            pipelines[p.device_id][p.pipeline] = p
        for g in session.scalars(select(DeviceGroup).where(DeviceGroup.device_id.in_(part))):
            groups[g.device_id][g.group] = g
        open_rows = select(VersionHistory).where(
            VersionHistory.device_id.in_(part), VersionHistory.ended.is_(None)
        )
        for h in session.scalars(open_rows):
            history[(h.device_id, h.model)] = h
    for state, received in states:
        device = devices.get(state.device)
        if device is None:
            device = Device(id=state.device, first_seen=received, last_seen=received)
            device.online = False
            device.state = None
            device.state_ts = None
            session.add(device)
            devices[state.device] = device
        elif not _is_news(device, state):
            outcome.ignored_old += 1
            continue
        _apply_state(session, device, state, received, models, groups, history, outcome)
        _pipeline_rows(session, state, pipelines[state.device])
        outcome.applied += 1
    return outcome


def _is_news(device: Device, state: State) -> bool:
    """Newer than the stored state, or the last will of the stored online run.

    A last will carries the time of its connection, which is older than the online
    state published right after it; it still says the device went away, so it is
    applied when the device is stored online and it belongs to that agent run.
    """
    stored_ts = device.state_ts
    if stored_ts is None or state.ts > stored_ts:
        return True
    since = (device.state or {}).get("since")
    return (
        not state.online
        and device.online
        and isinstance(since, int | float)
        and state.since >= since
    )


def _apply_state(
    session: Session,
    device: Device,
    state: State,
    received: float,
    models: dict[str, dict[str, DeviceModel]],
    groups: dict[str, dict[str, DeviceGroup]],
    history: dict[tuple[str, str], VersionHistory],
    outcome: StateOutcome,
) -> None:
    dev = state.device
    ts = state.ts
    # A row made from telemetry is online with no state yet: its first state still
    # says "online" once; an offline state is a transition from any online row.
    came_online = state.online and not (device.online and device.state is not None)
    went_offline = not state.online and bool(device.online)
    previous_deaths = int((device.state or {}).get("thread_deaths", 0) or 0)

    def event(kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        session.add(Event(ts=ts, device_id=dev, kind=kind, message=text(message), data=data))
        outcome.events[kind] += 1

    if came_online:
        event("online", f"agent {text(state.agent_version, 64)} online")
    elif went_offline:
        event("offline", "offline")
    if state.thread_deaths > previous_deaths:
        event(
            "thread_died",
            f"{state.thread_deaths - previous_deaths} agent thread(s) died",
            as_json({"thread_deaths": state.thread_deaths, "threads_down": state.threads_down}),
        )

    device.online = state.online
    device.status = device_status(state)
    device.protocol = state.protocol
    device.agent_version = text(state.agent_version, 64)
    device.runtime = (
        text(f"{state.runtime.name} {state.runtime.version}", 128) if state.runtime else None
    )
    device.groups = list(state.groups)
    device.state = as_json(state)
    device.state_ts = max(ts, device.state_ts or ts)
    device.state_received_at = received
    if state.online:
        device.last_seen = max(device.last_seen or received, received)

    have_groups = groups[dev]
    for name in set(have_groups) - set(state.groups):
        session.delete(have_groups.pop(name))
    for name in state.groups:
        if name not in have_groups:
            have_groups[name] = DeviceGroup(device_id=dev, group=name)
            session.add(have_groups[name])

    have_models = models[dev]
    for name in set(have_models) - {m.name for m in state.models}:
        session.delete(have_models.pop(name))
        gone = history.pop((dev, name), None)
        if gone is not None:  # the model left the device: its version stopped serving
            gone.ended = ts
    for m in state.models:
        row = have_models.get(m.name)
        if row is None:
            row = have_models[m.name] = DeviceModel(device_id=dev, model=m.name)
            row.status = "absent"
            session.add(row)
        _model_events(m, row, event)
        _model_row(row, m)
        _version_history(session, dev, m, ts, history, event)


def _pipeline_rows(session: Session, state: State, have: dict[str, DevicePipeline]) -> None:
    """The device's pipelines as its state lists them (a name twice: the last wins)."""
    listed: dict[str, PipelineState] = {p.name[:NAME]: p for p in state.pipelines}
    for name in set(have) - set(listed):
        session.delete(have.pop(name))
    for name, p in listed.items():
        row = have.get(name)
        if row is None:
            row = have[name] = DevicePipeline(device_id=state.device, pipeline=name)
            session.add(row)
        row.model = text(p.model, NAME)
        row.status = p.status
        row.drift = text(p.drift) or None


def _model_row(row: DeviceModel, m: ModelState) -> None:
    row.active = text(m.active, NAME)
    row.last_known_good = text(m.last_known_good, NAME)
    row.status = m.status
    row.versions = [text(v, NAME) or "" for v in m.versions]
    row.message = text(m.message)


def _model_events(m: ModelState, row: DeviceModel, event: Any) -> None:
    message = m.message or ""
    if m.status == "degraded" and row.status != "degraded":
        event("model_degraded", f"{m.name}: {message or 'degraded'}", {"model": m.name})
    if "failed probation" in message and message != (row.message or ""):
        event("probation_failed", f"{m.name}: {message}", {"model": m.name})


def _version_history(
    session: Session,
    dev: str,
    m: ModelState,
    ts: float,
    history: dict[tuple[str, str], VersionHistory],
    event: Any,
) -> None:
    active = text(m.active, NAME)
    current = history.get((dev, m.name))
    if current is not None and current.version == active:
        return
    if current is None and active is None:
        return
    if current is not None:
        current.ended = ts
        event(
            "version_changed",
            f"{m.name} {current.version or '-'} -> {active or '-'}",
            {"model": m.name, "from": current.version, "to": active},
        )
        del history[(dev, m.name)]
    if active is not None:
        row = VersionHistory(device_id=dev, model=m.name, version=active, started=ts)
        session.add(row)
        history[(dev, m.name)] = row


# ------------------------------------------------------------------- replies


def write_replies(session: Session, replies: Sequence[tuple[Reply, float]]) -> int:
    """Record every reply and fold it into its command; returns the commands updated."""
    if not replies:
        return 0
    ids = sorted({r.id for r, _ in replies if r.id})
    commands: dict[str, CommandRecord] = {}
    for part in _chunks(ids):
        query = select(CommandRecord).where(CommandRecord.id.in_(part)).order_by(CommandRecord.id)
        commands.update((c.id, c) for c in session.scalars(query.with_for_update()))
    updated = 0
    for reply, received in replies:
        session.add(
            ReplyRecord(
                command_id=text(reply.id, 64) or "",
                device_id=reply.device,
                status=reply.status,
                code=reply.code.value,
                stage=text(reply.stage, 32),
                percent=reply.percent,
                message=text(reply.message) or "",
                data=as_json(reply.data) if reply.data is not None else None,
                ts=reply.ts,
                received_at=received,
            )
        )
        command = commands.get(reply.id)
        if command is not None and command.device_id == reply.device:
            updated += _fold(command, reply)
    return updated


def _fold(command: CommandRecord, reply: Reply) -> int:
    """One reply into its command: forward only, and the first final outcome stays."""
    status, code, message, data = reply.status, reply.code.value, reply.message, reply.data
    original = (data or {}).get("original") if reply.code is ReplyCode.DUPLICATE else None
    if reply.code is ReplyCode.DUPLICATE and not (
        isinstance(original, dict) and original.get("status") in ("done", "failed")
    ):
        # The device still runs the first copy (a copy published again after a server
        # restart): its own final reply will come; this one says nothing new.
        return 0
    if isinstance(original, dict):
        # The device ran this id before: its first outcome is the command's outcome.
        status = original["status"]
        code = str(original.get("code", code))[:32]
        message = str(original.get("message", ""))
        inner = original.get("data")
        data = inner if isinstance(inner, dict) else None
    if command.status in FINAL or _RANK[status] < _RANK.get(command.status, 0):
        return 0
    command.status = status
    command.code = code
    command.message = text(message) or ""
    if reply.stage is not None:
        command.stage = text(reply.stage, 32)
    if reply.percent is not None or status != "progress":
        command.percent = reply.percent
    if data is not None:
        command.data = as_json(data)
    if status in FINAL:
        command.finished_at = reply.ts
    return 1


# ----------------------------------------------------------------- retention


def purge(session: Session, retention: RetentionConfig, now: float) -> dict[str, int]:
    """Delete what retention no longer keeps; each delete uses an index."""
    telemetry_cut = now - retention.telemetry_days * DAY
    commands_cut = now - retention.commands_days * DAY
    events_cut = now - retention.events_days * DAY
    deletes = {
        "telemetry_minutes": delete(TelemetryMinute).where(
            TelemetryMinute.minute < int(telemetry_cut // 60)
        ),
        "replies": delete(ReplyRecord).where(ReplyRecord.received_at < commands_cut),
        "commands": delete(CommandRecord).where(
            CommandRecord.finished_at.is_not(None), CommandRecord.finished_at < commands_cut
        ),
        "events": delete(Event).where(Event.ts < events_cut),
    }
    counts: dict[str, int] = {}
    for name, stmt in deletes.items():
        result = session.execute(stmt.execution_options(synchronize_session=False))
        counts[name] = int(getattr(result, "rowcount", 0) or 0)
    return counts
