"""Commands to a device or a group: ping, status, rollback, restart, config.

Each device gets its own ``agent.protocol`` command (its own id, so replies fold
into one row each), recorded and then published by ``fleet.server.commands.issue``.
Deploys are not sent here: they go through desired state and rollouts.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.protocol import (
    Command,
    ConfigCommand,
    DeviceId,
    GroupId,
    Name,
    PingCommand,
    RestartCommand,
    RollbackCommand,
    StatusCommand,
    format_validation_error,
)

from ..auth import Actor, audit
from ..commands import issue, new_command_id
from ..context import ServerContext
from ..db.schema import CommandRecord, Device, DeviceGroup, DeviceModel, ReplyRecord
from .deps import Ctx, Operator, Reader

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api", tags=["commands"])

MAX_EXPIRES_S = 7 * 86400


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    op: Literal["ping", "status", "rollback", "restart", "config"]
    device: DeviceId | None = None
    group: GroupId | None = None
    model: Name | None = Field(default=None, description="rollback: default the only model")
    to_version: Name | None = Field(default=None, description="rollback: default the previous")
    pipeline: Name | None = Field(default=None, description="restart: default every pipeline")
    changes: dict[str, Any] | None = Field(default=None, description="config: path -> value")
    expires_s: float | None = Field(
        default=None, gt=0, le=MAX_EXPIRES_S, description="default reconcile.command_expires_s"
    )

    @model_validator(mode="after")
    def _one_target(self) -> CommandRequest:
        if (self.device is None) == (self.group is None):
            raise ValueError("give exactly one of device or group")
        return self


class CommandRow(BaseModel):
    id: str
    device: str


class CommandsSent(BaseModel):
    op: str
    commands: list[CommandRow]


@router.post("/commands", response_model=CommandsSent, status_code=202)
def send_command(body: CommandRequest, ctx: Ctx, actor: Operator) -> CommandsSent:
    return send_commands(ctx, actor, body)


def send_commands(ctx: ServerContext, actor: Actor, body: CommandRequest) -> CommandsSent:
    """Audit, record and publish one command per target device (the API's and the
    dashboard's); refusals are ``HTTPException`` with a one-line detail."""
    sender = ctx.sender
    if sender is None:
        raise HTTPException(503, "this server has no MQTT link to send commands through")
    now = ctx.clock()
    expires = body.expires_s or ctx.config.reconcile.command_expires_s
    with ctx.database.session() as s:
        devices = _targets(s, body)
        model = body.model
        if body.op == "rollback" and model is None:
            model = _only_model(s, devices)
        commands = [(d, _build(body, model, now, now + expires)) for d in devices]
        # The audit row comes first, in its own transaction: a command that reaches a
        # device is never missing from the log, even if the server stops mid-group.
        target = f"device/{body.device}" if body.device else f"group/{body.group}"
        audit(
            s,
            actor,
            f"command.{body.op}",
            target,
            {"commands": {d: c.id for d, c in commands}, **body.model_dump(exclude_none=True)},
            now=now,
        )
    sent: list[CommandRow] = []
    for device, command in commands:
        try:
            issue(ctx.database, sender, device, command, actor=actor.name, clock=now)
        except Exception as exc:  # ConsoleError, or whatever the link raises
            log.warning("command %s to %s not published: %s", command.id, device, exc)
            raise HTTPException(
                503,
                f"the broker did not take the command for {device} "
                f"({len(sent)} of {len(commands)} sent): {exc}",
            ) from None
        sent.append(CommandRow(id=command.id, device=device))
    return CommandsSent(op=body.op, commands=sent)


def _targets(s: Session, body: CommandRequest) -> list[str]:
    if body.device is not None:
        if s.get(Device, body.device) is None:
            raise HTTPException(404, f"unknown device {body.device!r}")
        return [body.device]
    members = list(
        s.scalars(
            select(DeviceGroup.device_id)
            .where(DeviceGroup.group == body.group)
            .order_by(DeviceGroup.device_id)
        )
    )
    if not members:
        raise HTTPException(404, f"no device is in group {body.group!r}")
    return members


def _only_model(s: Session, devices: list[str]) -> str:
    names = set(
        s.scalars(select(DeviceModel.model).where(DeviceModel.device_id.in_(devices)).distinct())
    )
    if len(names) != 1:
        found = ", ".join(sorted(names)) or "none"
        raise HTTPException(
            422, f"body.model: give the model to roll back (on the targets: {found})"
        )
    return names.pop()


def _build(body: CommandRequest, model: str | None, issued: float, expires: float) -> Command:
    common: dict[str, Any] = {
        "id": new_command_id(body.op),
        "issued_at": issued,
        "expires_at": expires,
    }
    try:
        if body.op == "ping":
            return PingCommand(**common)
        if body.op == "status":
            return StatusCommand(**common)
        if body.op == "restart":
            return RestartCommand(**common, pipeline=body.pipeline)
        if body.op == "config":
            return ConfigCommand(**common, changes=body.changes or {})
        assert model is not None
        return RollbackCommand(**common, model=model, to_version=body.to_version)
    except ValidationError as err:
        # The protocol's own rule (config needs at least one change): name it as a body key.
        raise HTTPException(422, f"body.{format_validation_error(err)}") from None


@router.get("/commands")
def list_commands(
    ctx: Ctx,
    _actor: Reader,
    id: Annotated[list[str] | None, Query(max_length=200, description="repeatable")] = None,
    device: Annotated[str | None, Query(max_length=64)] = None,
    rollout: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Newest first; ``id`` picks given commands (what a CLI follows)."""
    query = select(CommandRecord).order_by(CommandRecord.created_at.desc()).limit(limit)
    if id:
        query = query.where(CommandRecord.id.in_(id))
    if device is not None:
        query = query.where(CommandRecord.device_id == device)
    if rollout is not None:
        query = query.where(CommandRecord.rollout_id == rollout)
    with ctx.database.session() as s:
        return [_command(c) for c in s.scalars(query)]


@router.get("/commands/{command_id}")
def get_command(command_id: str, ctx: Ctx, _actor: Reader) -> dict[str, Any]:
    with ctx.database.session() as s:
        c = s.get(CommandRecord, command_id)
        if c is None:
            raise HTTPException(404, f"no command {command_id[:80]!r}")
        replies = s.scalars(
            select(ReplyRecord)
            .where(ReplyRecord.command_id == command_id)
            .order_by(ReplyRecord.received_at, ReplyRecord.id)
        ).all()
    return {
        **_command(c),
        "body": c.body,
        "replies": [
            {
                "status": r.status,
                "code": r.code,
                "stage": r.stage,
                "percent": r.percent,
                "message": r.message,
                "data": r.data,
                "ts": r.ts,
                "received_at": r.received_at,
            }
            for r in replies
        ],
    }


def _command(c: CommandRecord) -> dict[str, Any]:
    return {
        "id": c.id,
        "device": c.device_id,
        "op": c.op,
        "rollout_id": c.rollout_id,
        "created_at": c.created_at,
        "created_by": c.created_by,
        "expires_at": c.expires_at,
        "published_at": c.published_at,
        "status": c.status,
        "stage": c.stage,
        "percent": c.percent,
        "code": c.code,
        "message": c.message,
        "data": c.data,
        "finished_at": c.finished_at,
    }
