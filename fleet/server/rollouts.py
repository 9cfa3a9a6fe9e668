"""Operator operations on desired state and rollouts, each in the caller's transaction.

A rollout is created with the desired state it sets, so a half-made rollout cannot
exist: the API runs each operation in one session with its audit entry. The
reconciler carries rollouts out (``reconcile.py``); these functions only change what
an operator may change: the plan's gates (approve, pause, resume), abort, and a
device's retries. Wave planning is ``fleet.rollout``'s, shared with the CLI.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.protocol import validate_device_id, validate_group_id, validate_name
from fleet.rollout import Canary, Target, parse_canary, plan_waves

from .db.schema import BundleRecord, Desired, Device, DeviceGroup, Rollout, RolloutDevice

# Rollout states.
RUNNING = "running"
WAITING_APPROVAL = "waiting_approval"
PAUSED = "paused"
HALTED = "halted"
DONE = "done"
ABORTED = "aborted"
SUPERSEDED = "superseded"
STATES = (RUNNING, WAITING_APPROVAL, PAUSED, HALTED, DONE, ABORTED, SUPERSEDED)
# A rollout in these states no longer acts: its desired row is gone or belongs to another.
ENDED = frozenset({ABORTED, SUPERSEDED})
# Reconciled wave by wave; DONE ones still bring joiners and returners to the version.
UNFINISHED = frozenset({RUNNING, WAITING_APPROVAL, PAUSED, HALTED})

# RolloutDevice statuses the reconciler and these operations set (a command in flight
# shows its reply stage instead: sent, accepted, downloading, ...).
WAITING = "waiting"
PENDING = "pending"
SENT = "sent"
FAILED = "failed"
GIVEN_UP = "given_up"
SKIPPED = "skipped"
DEVICE_DONE = "done"
SETTLED = frozenset({WAITING, PENDING, FAILED, GIVEN_UP, SKIPPED, DEVICE_DONE})


class RolloutError(Exception):
    """An operation refused: ``field`` names the input at fault, ``status`` the HTTP code
    (422: a bad value; 409: not possible in the present state)."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


class NotFound(Exception):
    """No such rollout (or device in it); one line."""


def new_rollout_id() -> str:
    return f"r-{uuid.uuid4().hex[:12]}"


def wave_count(rollout: Rollout) -> int:
    return int(rollout.plan.get("wave_count", 1))


def failures_allowed(rollout: Rollout) -> int:
    """Failures beyond which the rollout halts: ``max_failures``, plus the failures an
    operator already accepted by resuming a halted rollout."""
    return int(rollout.plan.get("max_failures", 0)) + int(rollout.plan.get("accepted_failures", 0))


# ------------------------------------------------------------------- create


def create_rollout(
    session: Session,
    *,
    model: str,
    version: str,
    pipeline: str | None,
    target_kind: str,
    target: str,
    canary: str | None,
    waves: int,
    max_failures: int,
    approval: bool,
    actor: str,
    now: float,
    shadow: bool | None = None,
    min_agreement: float | None = None,
) -> Rollout:
    """Set the desired state of (target, model) and plan the rollout that carries it out.

    ``shadow`` and ``min_agreement`` are the deploy's model-health checks, sent to the
    devices as given; None leaves them to each device's config.
    """
    _check(validate_name, "model", model)
    _check(validate_name, "version", version)
    if pipeline is not None:
        _check(validate_name, "pipeline", pipeline)
    if target_kind == "group":
        _check(validate_group_id, "group", target)
    elif target_kind == "device":
        _check(validate_device_id, "device", target)
    else:
        raise RolloutError("target_kind", f"must be group or device, not {target_kind!r}")
    plan_canary: Canary | None = None
    if canary is not None:
        try:
            plan_canary = parse_canary(canary)
        except ValueError:
            raise RolloutError(
                "canary", f"{canary!r}: a number of devices (>= 1) or a percentage like 10%"
            ) from None
    if waves < 1:
        raise RolloutError("waves", f"must be at least 1, not {waves}")
    if max_failures < 0:
        raise RolloutError("max_failures", f"must be 0 or more, not {max_failures}")
    if min_agreement is not None and not (
        math.isfinite(min_agreement) and 0.0 <= min_agreement <= 1.0
    ):
        raise RolloutError("min_agreement", f"must be 0..1, not {min_agreement}")
    bundle = session.scalar(
        select(BundleRecord).where(BundleRecord.name == model, BundleRecord.version == version)
    )
    if bundle is None:
        raise RolloutError(
            "version", f"no bundle {model} {version} is stored: upload it first", status=409
        )

    rollout_id = new_rollout_id()
    desired = session.scalar(
        select(Desired)
        .where(Desired.target_kind == target_kind, Desired.target == target, Desired.model == model)
        .with_for_update()
    )
    previous: dict[str, Any] | None = None
    if desired is None:
        desired = Desired(target_kind=target_kind, target=target, model=model)
        session.add(desired)
    else:
        previous = {
            "version": desired.version,
            "pipeline": desired.pipeline,
            "rollout_id": desired.rollout_id,
            "shadow": desired.shadow,
            "min_agreement": desired.min_agreement,
        }
        _supersede(session, desired.rollout_id, rollout_id, now)
    desired.version, desired.pipeline, desired.rollout_id = version, pipeline, rollout_id
    desired.shadow, desired.min_agreement = shadow, min_agreement
    desired.set_at, desired.set_by = now, actor

    members = _target_devices(session, target_kind, target)
    pinned = _pins(session, model, members) if target_kind == "group" else {}
    planned = plan_waves(
        [_as_target(session, d) for d in members if d not in pinned], plan_canary, waves
    )
    rollout = Rollout(
        id=rollout_id,
        model=model,
        version=version,
        pipeline=pipeline,
        shadow=shadow,
        min_agreement=min_agreement,
        target_kind=target_kind,
        target=target,
        state=RUNNING,
        plan={
            "canary": canary,
            "waves": waves,
            "max_failures": max_failures,
            "approval": approval,
            # Waves as planned from the devices in the target at creation (at least one,
            # which late joiners of an empty group join).
            "wave_count": max(1, len(planned)),
        },
        current_wave=0,
        previous=previous,
        message="",
        created_at=now,
        created_by=actor,
        updated_at=now,
    )
    session.add(rollout)
    session.flush()  # the rollout row exists before its devices reference it
    for wave, targets in enumerate(planned):
        for t in targets:
            session.add(_row(rollout_id, t.device, wave, PENDING if wave == 0 else WAITING, now))
    for device, pin in pinned.items():
        row = _row(rollout_id, device, 0, SKIPPED, now)
        row.message = f"pinned to {model} {pin} by the device's own desired state"
        session.add(row)
    session.flush()
    return rollout


def _check(validator: Any, field: str, value: str) -> None:
    try:
        validator(value)
    except ValueError as exc:
        raise RolloutError(field, str(exc)) from None


def _supersede(session: Session, old_id: str | None, new_id: str, now: float) -> None:
    old = session.get(Rollout, old_id, with_for_update=True) if old_id else None
    if old is None:
        return
    # A done one keeps its state; its commands still in flight are followed to their end.
    old.message, old.updated_at = f"replaced by {new_id}", now
    if old.state in UNFINISHED:
        old.state, old.message, old.finished_at = SUPERSEDED, f"superseded by {new_id}", now


def _target_devices(session: Session, kind: str, target: str) -> list[str]:
    if kind == "device":
        return [target]
    return list(
        session.scalars(
            select(DeviceGroup.device_id)
            .where(DeviceGroup.group == target)
            .order_by(DeviceGroup.device_id)
        )
    )


def _pins(session: Session, model: str, devices: list[str]) -> dict[str, str]:
    """device -> pinned version, for the devices with a device-kind desired row."""
    if not devices:
        return {}
    rows = session.execute(
        select(Desired.target, Desired.version).where(
            Desired.target_kind == "device",
            Desired.model == model,
            Desired.target.in_(devices),
        )
    )
    return {target: version for target, version in rows}


def _as_target(session: Session, device: str) -> Target:
    row = session.get(Device, device)
    return Target(device, bool(row and row.online), row is not None)


def _row(rollout_id: str, device: str, wave: int, status: str, now: float) -> RolloutDevice:
    return RolloutDevice(
        rollout_id=rollout_id,
        device_id=device,
        wave=wave,
        status=status,
        attempts=0,
        message="",
        next_attempt_at=0.0,
        updated_at=now,
    )


# ------------------------------------------------------------------- operator gates


def _get(session: Session, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id, with_for_update=True)
    if rollout is None:
        raise NotFound(f"no rollout {rollout_id!r}")
    return rollout


def _refuse(rollout: Rollout, action: str, wanted: str) -> RolloutError:
    return RolloutError(
        "state", f"cannot {action} rollout {rollout.id}: it is {rollout.state}, not {wanted}", 409
    )


def open_wave(session: Session, rollout: Rollout, wave: int, now: float) -> None:
    """Make ``wave`` the current one: its waiting devices become pending."""
    rollout.current_wave = wave
    rollout.updated_at = now
    for row in session.scalars(
        select(RolloutDevice).where(
            RolloutDevice.rollout_id == rollout.id,
            RolloutDevice.wave <= wave,
            RolloutDevice.status == WAITING,
        )
    ):
        row.status, row.updated_at = PENDING, now


def approve(session: Session, rollout_id: str, *, now: float) -> Rollout:
    """Open the next wave of a rollout waiting for approval."""
    rollout = _get(session, rollout_id)
    if rollout.state != WAITING_APPROVAL:
        raise _refuse(rollout, "approve", WAITING_APPROVAL)
    rollout.state = RUNNING
    rollout.message = ""
    open_wave(session, rollout, rollout.current_wave + 1, now)
    return rollout


def pause(session: Session, rollout_id: str, *, now: float) -> Rollout:
    """Stop sending (commands in flight still finish and are recorded)."""
    rollout = _get(session, rollout_id)
    if rollout.state not in (RUNNING, WAITING_APPROVAL):
        raise _refuse(rollout, "pause", "running or waiting_approval")
    rollout.state, rollout.message, rollout.updated_at = PAUSED, "paused by an operator", now
    return rollout


def resume(session: Session, rollout_id: str, *, now: float) -> Rollout:
    """Carry on a paused or halted rollout. Resuming a halted one accepts the failures
    so far: it halts again only on failures beyond them."""
    rollout = _get(session, rollout_id)
    if rollout.state not in (PAUSED, HALTED):
        raise _refuse(rollout, "resume", "paused or halted")
    if rollout.state == HALTED:
        failures = session.scalar(
            select(func.count()).where(
                RolloutDevice.rollout_id == rollout.id,
                RolloutDevice.status.in_((FAILED, GIVEN_UP)),
            )
        )
        accepted = max(0, int(failures or 0) - int(rollout.plan.get("max_failures", 0)))
        rollout.plan = {**rollout.plan, "accepted_failures": accepted}
    # The reconciler decides again whether the current wave waits for approval.
    rollout.state, rollout.message, rollout.updated_at = RUNNING, "", now
    return rollout


def abort(session: Session, rollout_id: str, *, actor: str, now: float) -> Rollout:
    """Stop the rollout and restore the desired state it replaced.

    The replaced rollout takes over again with every wave open (a revert is not staged
    again): the reconciler brings the devices that already moved back to its version.
    Without a previous desired state the desired row is deleted and devices stay as
    they are.
    """
    rollout = _get(session, rollout_id)
    if rollout.state in ENDED:
        raise _refuse(rollout, "abort", "running, waiting, paused, halted or done")
    desired = session.scalar(
        select(Desired)
        .where(
            Desired.target_kind == rollout.target_kind,
            Desired.target == rollout.target,
            Desired.model == rollout.model,
        )
        .with_for_update()
    )
    if desired is not None and desired.rollout_id == rollout.id:
        previous = rollout.previous
        if previous is None:
            session.delete(desired)
        else:
            desired.version = previous["version"]
            desired.pipeline = previous.get("pipeline")
            desired.rollout_id = previous.get("rollout_id")
            # The previous declaration's own checks (absent from a rollout made before
            # they existed: the devices' config, as then).
            desired.shadow = previous.get("shadow")
            desired.min_agreement = previous.get("min_agreement")
            desired.set_at, desired.set_by = now, actor
            _reinstate(session, desired.rollout_id, rollout.id, now)
    rollout.state = ABORTED
    rollout.message = f"aborted by {actor}"
    rollout.updated_at = rollout.finished_at = now
    return rollout


def _reinstate(session: Session, rollout_id: str | None, aborted: str, now: float) -> None:
    old = session.get(Rollout, rollout_id, with_for_update=True) if rollout_id else None
    if old is None:
        return
    old.state = DONE
    old.message = f"reinstated: {aborted} was aborted"
    old.finished_at = old.finished_at or now
    open_wave(session, old, wave_count(old) - 1, now)


def remove_desired(
    session: Session, *, target_kind: str, target: str, model: str, actor: str, now: float
) -> Desired:
    """Drop a declaration: its devices stay on what they run, and no longer follow it.

    A device pin removed makes the device follow its groups' declaration again (the
    reconciler brings it there); a group's removed leaves its devices alone. An
    unfinished rollout of it ends as ``superseded``.
    """
    desired = session.scalar(
        select(Desired)
        .where(
            Desired.target_kind == target_kind,
            Desired.target == target,
            Desired.model == model,
        )
        .with_for_update()
    )
    if desired is None:
        raise NotFound(f"no desired state of {model} for {target_kind} {target}")
    rollout = session.get(Rollout, desired.rollout_id, with_for_update=True)
    if rollout is not None and rollout.state not in (*ENDED, DONE):
        rollout.state, rollout.updated_at = SUPERSEDED, now
        rollout.message = f"its desired state was removed by {actor}"
        rollout.finished_at = now
    session.delete(desired)
    return desired


def retry_device(session: Session, rollout_id: str, device: str, *, now: float) -> RolloutDevice:
    """Give a device that gave up its tries again."""
    rollout = _get(session, rollout_id)
    if rollout.state in ENDED:
        raise _refuse(rollout, "retry a device of", "an active rollout")
    row = session.get(RolloutDevice, (rollout_id, device), with_for_update=True)
    if row is None:
        raise NotFound(f"device {device!r} is not in rollout {rollout_id}")
    if row.status != GIVEN_UP:
        raise RolloutError(
            "device", f"{device} has not given up (it is {row.status}): nothing to retry", 409
        )
    opened = rollout.state == DONE or row.wave <= rollout.current_wave
    row.status = PENDING if opened else WAITING
    row.attempts, row.next_attempt_at = 0, 0.0
    row.code, row.message, row.updated_at, row.finished_at = (
        None,
        "retried by an operator",
        now,
        None,
    )
    return row


# ------------------------------------------------------------------- views


def rollout_summary(rollout: Rollout) -> dict[str, Any]:
    return {
        "id": rollout.id,
        "model": rollout.model,
        "version": rollout.version,
        "pipeline": rollout.pipeline,
        "shadow": rollout.shadow,
        "min_agreement": rollout.min_agreement,
        "target_kind": rollout.target_kind,
        "target": rollout.target,
        "state": rollout.state,
        "plan": rollout.plan,
        "current_wave": rollout.current_wave,
        "previous": rollout.previous,
        "message": rollout.message,
        "created_at": rollout.created_at,
        "created_by": rollout.created_by,
        "updated_at": rollout.updated_at,
        "finished_at": rollout.finished_at,
    }


def status_counts(session: Session, rollout_ids: list[str]) -> dict[str, dict[str, int]]:
    """rollout id -> {device status: count}."""
    counts: dict[str, dict[str, int]] = {rid: {} for rid in rollout_ids}
    if rollout_ids:
        rows = session.execute(
            select(RolloutDevice.rollout_id, RolloutDevice.status, func.count())
            .where(RolloutDevice.rollout_id.in_(rollout_ids))
            .group_by(RolloutDevice.rollout_id, RolloutDevice.status)
        )
        for rid, status, n in rows:
            counts[rid][status] = int(n)
    return counts


def rollout_view(session: Session, rollout_id: str) -> dict[str, Any]:
    """The rollout, its waves with a count per device status, and every device."""
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"no rollout {rollout_id!r}")
    rows = list(
        session.scalars(
            select(RolloutDevice)
            .where(RolloutDevice.rollout_id == rollout_id)
            .order_by(RolloutDevice.wave, RolloutDevice.device_id)
        )
    )
    waves: list[dict[str, Any]] = []
    for wave in range(max([wave_count(rollout), *(r.wave + 1 for r in rows)])):
        counts: dict[str, int] = {}
        for r in rows:
            if r.wave == wave:
                counts[r.status] = counts.get(r.status, 0) + 1
        opened = rollout.state == DONE or wave <= rollout.current_wave
        waves.append({"wave": wave, "open": opened, "counts": counts})
    return {
        **rollout_summary(rollout),
        "counts": status_counts(session, [rollout_id])[rollout_id],
        "waves": waves,
        "devices": [
            {
                "device": r.device_id,
                "wave": r.wave,
                "status": r.status,
                "attempts": r.attempts,
                "code": r.code,
                "message": r.message,
                "command_id": r.command_id,
                "next_attempt_at": r.next_attempt_at or None,
                "finished_at": r.finished_at,
            }
            for r in rows
        ],
    }


def rollouts_by_state(session: Session) -> dict[str, int]:
    """Every rollout state with its count (zeros included), for /metrics."""
    counts = dict.fromkeys(STATES, 0)
    for state, n in session.execute(select(Rollout.state, func.count()).group_by(Rollout.state)):
        counts[state] = int(n)
    return counts


def desired_view(row: Desired) -> dict[str, Any]:
    return {
        "target_kind": row.target_kind,
        "target": row.target,
        "model": row.model,
        "version": row.version,
        "pipeline": row.pipeline,
        "shadow": row.shadow,
        "min_agreement": row.min_agreement,
        "rollout_id": row.rollout_id,
        "set_at": row.set_at,
        "set_by": row.set_by,
    }
