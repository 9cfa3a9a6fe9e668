"""``GET /ui/events``: what changed in the database, as named server-sent events.

Each stream checks the database every ``POLL_S`` for rows newer than it has seen
(devices' ``last_seen`` and ``state_ts``, device events, commands created and replies
received, rollouts' and rollout devices' ``updated_at``) and sends ``devices`` and
``rollouts``, and ``device-<id>`` and ``rollout-<id>`` for the ids the page watches
(``/ui/events?device=<id>``); page parts re-fetch their fragment on them. The
database is the only shared state, so the stream works whichever server process
wrote the change.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..api.deps import Ctx
from ..context import ServerContext
from ..db.schema import CommandRecord, Device, Event, ReplyRecord, Rollout, RolloutDevice
from .auth import PageActor

log = logging.getLogger(__name__)

router = APIRouter()

POLL_S = 0.5
# A comment now and then, so a proxy keeps the stream open and a gone client is noticed.
KEEPALIVE_S = 15.0
# Ids one stream may watch (a page watches one device or one rollout).
MAX_WATCHED = 10

# What is looked at: (table's time or id column, the id it is about, device or rollout).
# A device's last will may carry an older time than its stored state (state_ts does
# not move then), but it adds an "offline" event row: events are looked at by id.
COLUMNS: tuple[tuple[Any, Any, str], ...] = (
    (Device.last_seen, Device.id, "device"),
    (Device.state_ts, Device.id, "device"),
    (Event.id, Event.device_id, "device"),
    (CommandRecord.created_at, CommandRecord.device_id, "device"),
    (ReplyRecord.received_at, ReplyRecord.device_id, "device"),
    (Rollout.updated_at, Rollout.id, "rollout"),
    (RolloutDevice.updated_at, RolloutDevice.rollout_id, "rollout"),
)


def _newest(s: Session, column: Any) -> float:
    return float(s.scalar(select(func.max(column))) or 0.0)


def start_marks(s: Session) -> list[float]:
    """The newest value of each column: the next poll looks past them."""
    return [_newest(s, column) for column, _, _ in COLUMNS]


def poll(s: Session, marks: list[float], watched: dict[str, list[str]]) -> list[str]:
    """The events for what changed since ``marks`` (which it moves forward): ``devices``
    and ``rollouts`` for any change, ``device-<id>`` and ``rollout-<id>`` for the
    ``watched`` ids only (a busy fleet changes thousands of devices a second)."""
    changed: dict[str, set[str]] = {"device": set(), "rollout": set()}
    for i, (column, about, kind) in enumerate(COLUMNS):
        newest = _newest(s, column)
        if newest <= marks[i]:
            continue
        changed[kind].add("")
        if watched.get(kind):
            rows = s.scalars(
                select(about).where(about.in_(watched[kind]), column > marks[i]).distinct()
            )
            changed[kind].update(str(r) for r in rows)
        if column is ReplyRecord.received_at:
            # A reply moves a rollout's device through its stages (downloading,
            # validating, probation) before its row's updated_at moves at the end.
            rollouts = _rollouts_replied(s, marks[i], watched.get("rollout") or [])
            if rollouts:
                changed["rollout"].update({"", *rollouts})
        marks[i] = newest
    events: list[str] = []
    for kind in ("device", "rollout"):
        if changed[kind]:
            events.append(f"{kind}s")
            events.extend(f"{kind}-{i}" for i in sorted(changed[kind]) if i)
    return events


def _rollouts_replied(s: Session, since: float, watched: list[str]) -> set[str]:
    """Watched rollouts whose commands got a reply received after ``since``."""
    if not watched:
        return set()
    rows = s.scalars(
        select(CommandRecord.rollout_id)
        .join(ReplyRecord, ReplyRecord.command_id == CommandRecord.id)
        .where(CommandRecord.rollout_id.in_(watched), ReplyRecord.received_at > since)
        .distinct()
    )
    return {str(r) for r in rows if r}


def opening_events(watched: dict[str, list[str]]) -> list[str]:
    """Sent once when a stream opens: the page was rendered before the stream's marks
    were taken, so whatever changed in between is fetched again."""
    return ["devices", "rollouts"] + [
        f"{kind}-{i}" for kind in ("device", "rollout") for i in watched.get(kind, [])
    ]


def _poll(
    ctx: ServerContext, marks: list[float] | None, watched: dict[str, list[str]]
) -> tuple[list[float], list[str]]:
    with ctx.database.session() as s:
        if marks is None:
            return start_marks(s), []
        return marks, poll(s, marks, watched)


async def stream(
    request: Request, ctx: ServerContext, watched: dict[str, list[str]]
) -> AsyncIterator[str]:
    marks: list[float] | None = None
    try:  # the marks first: a change after the stream opened is then always sent
        marks, _ = await asyncio.to_thread(_poll, ctx, None, watched)
    except Exception as exc:
        log.warning("live events: %s", exc)
    # Sent at once: the browser's EventSource opens (the page shows "live") on it.
    yield "retry: 1000\n: connected\n\n"
    for name in opening_events(watched):
        yield f"event: {name}\ndata: {name}\n\n"
    quiet = 0.0
    stopping: threading.Event = request.app.state.stopping
    while not stopping.is_set() and not await request.is_disconnected():
        await asyncio.sleep(POLL_S)
        try:
            marks, events = await asyncio.to_thread(_poll, ctx, marks, watched)
        except Exception as exc:  # the database may be away for a while: say so, go on
            log.warning("live events: %s", exc)
            events = []
        for name in events:
            yield f"event: {name}\ndata: {name}\n\n"
        quiet = 0.0 if events else quiet + POLL_S
        if quiet >= KEEPALIVE_S:
            quiet = 0.0
            yield ": keepalive\n\n"


Ids = Annotated[list[str] | None, Query()]


@router.get("/ui/events")
def events(
    request: Request, ctx: Ctx, _actor: PageActor, device: Ids = None, rollout: Ids = None
) -> StreamingResponse:
    """``?device=<id>`` and ``?rollout=<id>`` (repeatable) name the ids to send
    ``device-<id>`` and ``rollout-<id>`` for."""
    watched = {
        "device": [d[:64] for d in (device or [])[:MAX_WATCHED]],
        "rollout": [r[:64] for r in (rollout or [])[:MAX_WATCHED]],
    }
    return StreamingResponse(
        stream(request, ctx, watched),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
