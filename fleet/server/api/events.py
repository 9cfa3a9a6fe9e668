"""The events feed (devices' online/offline, version changes, failures) and the audit log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select

from ..db.schema import AuditEntry, Event
from .deps import Ctx, Reader

router = APIRouter(prefix="/api", tags=["events"])

Limit = Annotated[int, Query(ge=1, le=1000)]
Text = Annotated[str | None, Query(max_length=128)]


@router.get("/events")
def list_events(
    ctx: Ctx,
    _actor: Reader,
    device: Text = None,
    kind: Text = None,
    since: float | None = None,
    limit: Limit = 100,
) -> list[dict[str, Any]]:
    """Newest first."""
    query = select(Event).order_by(Event.ts.desc(), Event.id.desc()).limit(limit)
    if device is not None:
        query = query.where(Event.device_id == device)
    if kind is not None:
        query = query.where(Event.kind == kind)
    if since is not None:
        query = query.where(Event.ts >= since)
    with ctx.database.session() as s:
        return [
            {
                "id": e.id,
                "ts": e.ts,
                "device": e.device_id,
                "kind": e.kind,
                "message": e.message,
                "data": e.data,
            }
            for e in s.scalars(query)
        ]


@router.get("/audit")
def list_audit(
    ctx: Ctx,
    _actor: Reader,
    actor: Text = None,
    action: Text = None,
    since: float | None = None,
    limit: Limit = 100,
) -> list[dict[str, Any]]:
    """Newest first."""
    query = select(AuditEntry).order_by(AuditEntry.ts.desc(), AuditEntry.id.desc()).limit(limit)
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    if since is not None:
        query = query.where(AuditEntry.ts >= since)
    with ctx.database.session() as s:
        return [
            {
                "id": a.id,
                "ts": a.ts,
                "actor": a.actor,
                "action": a.action,
                "target": a.target,
                "detail": a.detail,
            }
            for a in s.scalars(query)
        ]
