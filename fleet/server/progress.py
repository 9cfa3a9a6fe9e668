"""How one rollout's device rows move, given what the fleet reports.

Decisions only, on the rows of the reconciler's transaction (no sending, no lease):
late joiners, each row against the device's state and the effective desired state,
the outcome of a finished command and its backoff, halting, waves, and which devices
are sent what. ``reconcile.Reconciler`` reads the fleet, calls these, and sends.

Effective desired state, per (device, model): a device's own (pinned) desired row
overrides its groups'; among several of its groups' rows for one model, the most
recently set wins. Only the rollout of the effective row sends to a device; a row of
another rollout for it is ``skipped`` until that changes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from .commands import new_command_id
from .config import ReconcileConfig
from .db.schema import (
    BundleRecord,
    CommandRecord,
    Desired,
    DeviceGroup,
    DeviceModel,
    Rollout,
    RolloutDevice,
)
from .rollouts import (
    DEVICE_DONE,
    DONE,
    FAILED,
    GIVEN_UP,
    HALTED,
    PENDING,
    RUNNING,
    SENT,
    SETTLED,
    SKIPPED,
    WAITING,
    WAITING_APPROVAL,
    failures_allowed,
    open_wave,
    wave_count,
)

log = logging.getLogger(__name__)

# Rollout states in which devices are sent commands (DONE: joiners and returners).
SENDING = frozenset({RUNNING, WAITING_APPROVAL, DONE})
# A model's state that says its active version is settled on the device: ``stored`` is
# a version active and validated that no pipeline of the device uses (nothing to serve).
ON_VERSION = frozenset({"serving", "stored"})
# Failures that say nothing about the model (the device or the network had a moment):
# retried with backoff, and counted against a rollout's max_failures only once the
# device gives up. Any other code is a refusal of the model itself (validation, shadow,
# probation, signature, checksum, incompatible, downgrade): not retried, and counted at
# once: that is what a canary is for.
TRANSIENT_CODES = frozenset(
    {"download_failed", "busy", "interrupted", "timeout", "expired", "storage_failed", "internal"}
)


@dataclass(frozen=True)
class Send:
    device: str
    rollout_id: str
    command_id: str
    model: str
    version: str
    pipeline: str | None
    shadow: bool | None  # the rollout's model-health checks; None: the device's config
    min_agreement: float | None
    rollback: bool  # the device keeps the version: roll back to it instead of deploying
    bundle: BundleRecord


@dataclass
class FleetView:
    """What one tick read about the devices, once."""

    online: dict[str, bool]
    # When the server received each device's latest state (server clock).
    state_received: dict[str, float]
    models: dict[tuple[str, str], DeviceModel]
    busy: set[str]  # devices with a command in flight
    commands: dict[str, CommandRecord]  # commands of rows in flight, by id


class RolloutProgress:
    """Moves the rows of a rollout on; one per reconciler (it holds only settings)."""

    def __init__(self, config: ReconcileConfig) -> None:
        self.config = config

    def step(
        self,
        s: Session,
        rollout: Rollout,
        devices: set[str],
        fleet: FleetView,
        bundle: BundleRecord,
        now: float,
    ) -> list[Send]:
        """One tick of ``rollout``, whose desired row applies to ``devices``: returns
        what to send (those rows are marked sent, with the new command's id)."""
        rows = {
            r.device_id: r
            for r in s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id))
        }
        last = wave_count(rollout) - 1
        for device in devices - rows.keys():  # late joiners
            status = PENDING if _opened(rollout, last) else WAITING
            rows[device] = RolloutDevice(
                rollout_id=rollout.id,
                device_id=device,
                wave=last,
                status=status,
                attempts=0,
                message="joined the target",
                next_attempt_at=0.0,
                updated_at=now,
            )
            s.add(rows[device])
        for row in rows.values():
            self._check_state(rollout, row, row.device_id in devices, fleet, now)
        if rollout.state in (RUNNING, WAITING_APPROVAL):
            failures = sum(1 for r in rows.values() if _counts_as_failure(r))
            if failures > failures_allowed(rollout):
                rollout.state, rollout.updated_at = HALTED, now
                rollout.message = f"halted: {failures} device(s) failed"
                log.warning("rollout %s halted: %d failure(s)", rollout.id, failures)
        if rollout.state == RUNNING:
            self._advance(s, rollout, rows.values(), fleet, now)
        if rollout.state not in SENDING:
            return []
        return self._sends(rollout, rows.values(), fleet, bundle, now)

    def _check_state(
        self, rollout: Rollout, row: RolloutDevice, effective: bool, fleet: FleetView, now: float
    ) -> None:
        """Settle a row against the device's reported state and the effective desired."""
        if row.status not in SETTLED:
            return  # a command in flight decides
        if not effective:
            if row.status in (WAITING, PENDING, FAILED):
                row.status, row.updated_at = SKIPPED, now
                row.message = "another desired state applies to this device"
            return
        if row.status == SKIPPED:
            row.status = PENDING if _opened(rollout, row.wave) else WAITING
            row.message, row.updated_at = "", now
        on_version = _on_version(fleet, row.device_id, rollout)
        if row.status in (PENDING, FAILED, GIVEN_UP) and on_version:
            row.status, row.updated_at, row.finished_at = DEVICE_DONE, now, now
            row.message = row.message or "on the version"
        elif row.status == DEVICE_DONE and _left_version(fleet, row, rollout):
            # Counted as a try, so a device that keeps leaving the version is given up
            # like one that fails, instead of being sent the version for ever.
            row.attempts += 1
            row.code, row.finished_at, row.updated_at = None, None, now
            row.message = f"no longer on {rollout.version}"
            row.status, row.next_attempt_at = PENDING, 0.0
            if row.attempts >= self.config.max_attempts:
                row.status, row.finished_at = GIVEN_UP, now
                row.message += f" after {row.attempts} tries: left alone"

    def _advance(
        self,
        s: Session,
        rollout: Rollout,
        rows: Iterable[RolloutDevice],
        fleet: FleetView,
        now: float,
    ) -> None:
        wave = rollout.current_wave
        if not all(
            r.status in (DEVICE_DONE, GIVEN_UP, SKIPPED)
            or (r.status in (PENDING, FAILED) and not fleet.online.get(r.device_id, False))
            for r in rows
            if r.wave == wave
        ):
            return
        rollout.updated_at = now
        if wave >= wave_count(rollout) - 1:
            rollout.state, rollout.finished_at, rollout.message = DONE, now, ""
            log.info("rollout %s done", rollout.id)
        elif rollout.plan.get("approval"):
            rollout.state = WAITING_APPROVAL
            rollout.message = f"wave {wave} complete: waiting for approval"
        else:
            open_wave(s, rollout, wave + 1, now)
            log.info("rollout %s: wave %d open", rollout.id, wave + 1)

    def _sends(
        self,
        rollout: Rollout,
        rows: Iterable[RolloutDevice],
        fleet: FleetView,
        bundle: BundleRecord,
        now: float,
    ) -> list[Send]:
        sends = []
        for row in rows:
            device = row.device_id
            if (
                row.status not in (PENDING, FAILED)
                or not _opened(rollout, row.wave)
                or not fleet.online.get(device, False)
                or row.next_attempt_at > now
                or device in fleet.busy
            ):
                continue
            model = fleet.models.get((device, rollout.model))
            if model is not None and model.active == rollout.version:
                continue  # there but not serving yet (probation, degraded): its state decides
            command_id = new_command_id("rollback" if _keeps(model, rollout) else "deploy")
            row.status, row.command_id, row.updated_at = SENT, command_id, now
            fleet.busy.add(device)
            sends.append(
                Send(
                    device,
                    rollout.id,
                    command_id,
                    rollout.model,
                    rollout.version,
                    rollout.pipeline,
                    rollout.shadow,
                    rollout.min_agreement,
                    _keeps(model, rollout),
                    bundle,
                )
            )
        return sends

    def finish(self, row: RolloutDevice, command: CommandRecord, now: float) -> None:
        """Fold a command that ended (done, failed, expired) into its row."""
        row.updated_at = now
        if command.status == "done":
            row.status, row.code, row.message = DEVICE_DONE, command.code or "ok", command.message
            row.finished_at = now
            return
        row.attempts += 1
        row.code, row.message = command.code or "failed", command.message
        # A refusal of the model itself (validation, probation, signature, downgrade...)
        # is the device's verdict: not tried again on its own. Trying it again would be
        # worse than useless: the device keeps a version that failed, so the next try
        # would be a `rollback` to it, which the device takes as the operator vouching
        # for it. `retry_device` is the operator's way to ask again.
        if row.attempts >= self.config.max_attempts or row.code not in TRANSIENT_CODES:
            row.status, row.finished_at = GIVEN_UP, now
            return
        backoff = self.config.backoff_s * 2 ** (row.attempts - 1)
        row.status = FAILED
        row.next_attempt_at = now + min(self.config.backoff_max_s, backoff)


def effective_desired(s: Session, desired: list[Desired]) -> dict[tuple[str, str], Desired]:
    """(device, model) -> the desired row that applies (``desired`` oldest first)."""
    groups = {d.target for d in desired if d.target_kind == "group"}
    members: dict[str, list[str]] = {}
    if groups:
        for device, group in s.execute(
            select(DeviceGroup.device_id, DeviceGroup.group).where(DeviceGroup.group.in_(groups))
        ):
            members.setdefault(group, []).append(device)
    effective: dict[tuple[str, str], Desired] = {}
    for row in desired:  # later rows overwrite earlier ones
        if row.target_kind == "group":
            for device in members.get(row.target, []):
                effective[(device, row.model)] = row
    for row in desired:  # pins last: they override every group
        if row.target_kind == "device":
            effective[(row.target, row.model)] = row
    return effective


def _left_version(fleet: FleetView, row: RolloutDevice, rollout: Rollout) -> bool:
    """A done device whose state, received after it was counted done, names another
    active version: it rolled back on its own (or was rolled back). A state still on
    probation, or one that arrived late from before the done reply, is no such news."""
    model = fleet.models.get((row.device_id, rollout.model))
    active = model.active if model is not None else None
    received = fleet.state_received.get(row.device_id)
    return (
        active != rollout.version and received is not None and received > (row.finished_at or 0.0)
    )


def _counts_as_failure(row: RolloutDevice) -> bool:
    return row.status == GIVEN_UP or (row.status == FAILED and row.code not in TRANSIENT_CODES)


def _opened(rollout: Rollout, wave: int) -> bool:
    return rollout.state == DONE or wave <= rollout.current_wave


def _on_version(fleet: FleetView, device: str, rollout: Rollout) -> bool:
    model = fleet.models.get((device, rollout.model))
    return model is not None and model.active == rollout.version and model.status in ON_VERSION


def _keeps(model: DeviceModel | None, rollout: Rollout) -> bool:
    return model is not None and rollout.version in (model.versions or [])
