"""The audit log: who did what, when; filtered by actor and action."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from ..api.deps import Ctx
from ..db.schema import AuditEntry
from .auth import PageActor
from .render import render

router = APIRouter()

LIMIT = 200


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    ctx: Ctx,
    actor: PageActor,
    actor_name: Annotated[str, Query(alias="actor", max_length=64)] = "",
    action: Annotated[str, Query(max_length=48)] = "",
) -> HTMLResponse:
    query = select(AuditEntry).order_by(AuditEntry.ts.desc(), AuditEntry.id.desc()).limit(LIMIT)
    if actor_name.strip():
        query = query.where(AuditEntry.actor == actor_name.strip())
    if action.strip():
        # "rollout" finds rollout.create, rollout.abort, ...
        query = query.where(AuditEntry.action.startswith(action.strip(), autoescape=True))
    with ctx.database.session() as s:
        entries = [
            {"ts": e.ts, "actor": e.actor, "action": e.action, "target": e.target,
             "detail": e.detail}
            for e in s.scalars(query)
        ]  # fmt: skip
    return render(
        request,
        "audit.html",
        actor,
        entries=entries,
        filter_actor=actor_name.strip(),
        filter_action=action.strip(),
        limit=LIMIT,
    )
