"""HTTP routes for desired state and rollouts: ``/api/desired`` and ``/api/rollouts``.

Every write runs in one transaction with its audit entry, so a refused or failed
request leaves nothing behind. ``RolloutError`` becomes a 409 or 422 whose detail
names the field (``"canary: ..."``), ``NotFound`` a 404.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.protocol import DeviceId, GroupId, Name

from ..auth import Actor, audit
from ..context import ServerContext
from ..db.schema import Desired, Rollout
from ..rollouts import (
    STATES,
    NotFound,
    RolloutError,
    abort,
    approve,
    create_rollout,
    desired_view,
    pause,
    remove_desired,
    resume,
    retry_device,
    rollout_summary,
    rollout_view,
    status_counts,
)
from .deps import Ctx, Operator, Reader

router = APIRouter(tags=["rollouts"])


class RolloutRequest(BaseModel):
    """A change of desired state for a group or one device, and how to roll it out."""

    model_config = ConfigDict(extra="forbid")

    model: Name
    version: Name
    pipeline: Name | None = None
    group: GroupId | None = None
    device: DeviceId | None = None
    canary: str | None = Field(default=None, description="N devices or P% first")
    waves: Annotated[int, Field(ge=1, le=100)] = Field(
        default=1, description="Waves the rest (after the canary) is split into"
    )
    max_failures: Annotated[int, Field(ge=0)] = 0
    approval: bool = Field(default=False, description="Wait for an operator between waves")
    shadow: bool | None = Field(
        default=None,
        description="Sent in each deploy: false swaps without shadow evaluation; "
        "null: each device's config (models.probation.shadow)",
    )
    min_agreement: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = Field(
        default=None,
        description="Sent in each deploy: least shadow agreement with the serving version, "
        "0..1; null: each device's config (models.probation.min_agreement)",
    )

    @model_validator(mode="after")
    def _one_target(self) -> RolloutRequest:
        if (self.group is None) == (self.device is None):
            raise ValueError("give exactly one of group and device")
        return self


def _fail(exc: RolloutError | NotFound) -> HTTPException:
    if isinstance(exc, NotFound):
        return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))
    return HTTPException(exc.status, f"{exc.field}: {exc.message}")


@router.get("/api/desired")
def list_desired(ctx: Ctx, _actor: Reader, model: str | None = None) -> dict[str, Any]:
    with ctx.database.session() as s:
        query = select(Desired).order_by(Desired.model, Desired.target_kind, Desired.target)
        if model is not None:
            query = query.where(Desired.model == model)
        return {"desired": [desired_view(row) for row in s.scalars(query)]}


@router.delete("/api/desired")
def delete_desired(
    ctx: Ctx,
    actor: Operator,
    model: Name,
    group: GroupId | None = None,
    device: DeviceId | None = None,
) -> dict[str, Any]:
    """Remove a declaration (``?model=M&group=G`` or ``&device=D``): a device pin removed
    makes the device follow its groups again; devices are not changed by the removal."""
    if (group is None) == (device is None):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "query: give exactly one of group and device"
        )
    kind, target = ("group", group) if group is not None else ("device", device)
    assert target is not None
    now = ctx.clock()
    try:
        with ctx.database.session() as s:
            row = remove_desired(
                s, target_kind=kind, target=target, model=model, actor=actor.name, now=now
            )
            view = desired_view(row)
            audit(s, actor, "desired.remove", f"{kind}/{target}", {"model": model}, now)
    except NotFound as exc:
        raise _fail(exc) from None
    return view


@router.post("/api/rollouts", status_code=status.HTTP_201_CREATED)
def post_rollout(body: RolloutRequest, ctx: Ctx, actor: Operator) -> dict[str, Any]:
    return create(ctx, actor, body)


def create(ctx: ServerContext, actor: Actor, body: RolloutRequest) -> dict[str, Any]:
    """Create the rollout with its audit entry in one transaction (the API's and the
    dashboard's); refusals are ``HTTPException`` naming the field."""
    kind, target = ("group", body.group) if body.group is not None else ("device", body.device)
    assert target is not None  # one of the two, by the model's validator
    now = ctx.clock()
    try:
        with ctx.database.session() as s:
            rollout = create_rollout(
                s,
                model=body.model,
                version=body.version,
                pipeline=body.pipeline,
                target_kind=kind,
                target=target,
                canary=body.canary,
                waves=body.waves,
                max_failures=body.max_failures,
                approval=body.approval,
                shadow=body.shadow,
                min_agreement=body.min_agreement,
                actor=actor.name,
                now=now,
            )
            audit(s, actor, "rollout.create", rollout.id, body.model_dump(), now)
            return rollout_view(s, rollout.id)
    except RolloutError as exc:
        raise _fail(exc) from None


@router.get("/api/rollouts")
def list_rollouts(
    ctx: Ctx,
    _actor: Reader,
    state: str | None = None,
    model: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    if state is not None and state not in STATES:
        raise HTTPException(422, f"state: one of {', '.join(STATES)}, not {state!r}")
    with ctx.database.session() as s:
        query = select(Rollout)
        if state is not None:
            query = query.where(Rollout.state == state)
        if model is not None:
            query = query.where(Rollout.model == model)
        total = s.scalar(select(func.count()).select_from(query.subquery()))
        page = list(
            s.scalars(query.order_by(Rollout.created_at.desc()).limit(limit).offset(offset))
        )
        counts = status_counts(s, [r.id for r in page])
        return {
            "total": total,
            "rollouts": [{**rollout_summary(r), "counts": counts[r.id]} for r in page],
        }


@router.get("/api/rollouts/{rollout_id}")
def get_rollout(rollout_id: str, ctx: Ctx, _actor: Reader) -> dict[str, Any]:
    try:
        with ctx.database.session() as s:
            return rollout_view(s, rollout_id)
    except NotFound as exc:
        raise _fail(exc) from None


# Operator actions on one rollout: name -> the change, given (session, id, actor, now).
ACTIONS: dict[str, Callable[[Session, str, Actor, float], object]] = {
    "approve": lambda s, rid, _actor, now: approve(s, rid, now=now),
    "pause": lambda s, rid, _actor, now: pause(s, rid, now=now),
    "resume": lambda s, rid, _actor, now: resume(s, rid, now=now),
    "abort": lambda s, rid, actor, now: abort(s, rid, actor=actor.name, now=now),
}


def act(ctx: ServerContext, actor: Actor, rollout_id: str, action: str) -> dict[str, Any]:
    """Approve, pause, resume or abort, with its audit entry (the API's and the
    dashboard's); returns the rollout's view."""
    change = ACTIONS[action]
    return _write(
        ctx, actor, f"rollout.{action}", rollout_id, rollout_id,
        lambda s, now: change(s, rollout_id, actor, now),
    )  # fmt: skip


def _write(
    ctx: ServerContext,
    actor: Actor,
    action: str,
    target: str,
    rollout_id: str,
    change: Callable[[Session, float], object],
) -> dict[str, Any]:
    now = ctx.clock()
    try:
        with ctx.database.session() as s:
            change(s, now)
            audit(s, actor, action, target, None, now)
            return rollout_view(s, rollout_id)
    except (RolloutError, NotFound) as exc:
        raise _fail(exc) from None


@router.post("/api/rollouts/{rollout_id}/approve")
def post_approve(rollout_id: str, ctx: Ctx, actor: Operator) -> dict[str, Any]:
    return act(ctx, actor, rollout_id, "approve")


@router.post("/api/rollouts/{rollout_id}/pause")
def post_pause(rollout_id: str, ctx: Ctx, actor: Operator) -> dict[str, Any]:
    return act(ctx, actor, rollout_id, "pause")


@router.post("/api/rollouts/{rollout_id}/resume")
def post_resume(rollout_id: str, ctx: Ctx, actor: Operator) -> dict[str, Any]:
    return act(ctx, actor, rollout_id, "resume")


@router.post("/api/rollouts/{rollout_id}/abort")
def post_abort(rollout_id: str, ctx: Ctx, actor: Operator) -> dict[str, Any]:
    return act(ctx, actor, rollout_id, "abort")


@router.post("/api/rollouts/{rollout_id}/devices/{device}/retry")
def post_retry(rollout_id: str, device: str, ctx: Ctx, actor: Operator) -> dict[str, Any]:
    return _write(
        ctx, actor, "rollout.retry", f"{rollout_id}/{device}", rollout_id,
        lambda s, now: retry_device(s, rollout_id, device, now=now),
    )  # fmt: skip
