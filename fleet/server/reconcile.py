"""The reconciler: brings devices to their desired state, rollout by rollout.

One process of the fleet runs it at a time, holding the ``reconciler`` lease; every
tick it renews the lease first and does nothing without it. All progress is in the
database (``RolloutDevice`` rows, ``CommandRecord`` rows), so a reconciler that
starts after another died carries on from there: a command in flight is followed to
its end, never sent again under a new id.

Effective desired state, per (device, model): a device's own (pinned) desired row
overrides its groups'; among several of its groups' rows for one model, the most
recently set wins (``progress.effective_desired``).

A tick, for each desired row's rollout: add late joiners of the group (last wave),
fold the outcome of each command in flight (a final ``done`` reply: done; ``failed``
or no final reply within ``command_timeout_s``: a failed try, retried after a backoff
that doubles, given up after ``max_attempts``), check devices against their state
(on the version: done; a done device that left the version: pending again), halt
past ``max_failures``, open the next wave or wait for approval when a wave is
complete (``progress.RolloutProgress`` decides all that), and send to each device
that is online, due, in an open wave and has no command in flight: ``rollback``
when it keeps the version already (a device refuses to deploy a version it stores),
else ``deploy``. Sends go out after the transaction commits, through
``fleet.server.commands.issue_many`` (recorded, then published, a batch at a time).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.protocol import Command, DeployCommand, RollbackCommand

from .commands import BatchSender, issue_many
from .config import ReconcileConfig
from .db import Database
from .db.schema import (
    BundleRecord,
    CommandRecord,
    Desired,
    Device,
    DeviceModel,
    Rollout,
    RolloutDevice,
)
from .delivery import ArtifactDelivery
from .lease import Lease
from .progress import (
    ON_VERSION,
    FleetView,
    RolloutProgress,
    Send,
    effective_desired,
)
from .rollouts import ENDED, PENDING, SETTLED

log = logging.getLogger(__name__)

LEASE_NAME = "reconciler"
ACTOR = "reconciler"
ACTIVE = ("sent", "accepted", "progress")  # a command's statuses while in flight
# Commands recorded in one transaction and published before one wait for the acks.
SEND_BATCH = 500

_commands: TypeAdapter[Command] = TypeAdapter(Command)


class Reconciler:
    """Carries out rollouts; ``start``/``stop`` its thread, or call ``tick`` (tests)."""

    def __init__(
        self,
        database: Database,
        sender: BatchSender,
        delivery: ArtifactDelivery,
        config: ReconcileConfig,
        *,
        instance: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.database = database
        self.sender = sender
        self.delivery = delivery
        self.config = config
        self.clock = clock
        self.progress = RolloutProgress(config)
        self.lease = Lease(database, LEASE_NAME, instance, config.lease_s, clock=clock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Figures (written by the reconciler thread only).
        self.active = False
        self.ticks = 0
        self.errors = 0
        self.sent = 0
        self.send_errors = 0
        self.last_tick_at: float | None = None
        self.last_tick_s = 0.0
        self._warned: set[tuple[str, str, str, str]] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self.delivery.retain(())
        try:
            self.lease.release()
        except Exception:
            log.exception("could not release the reconciler lease")

    def alive(self) -> bool:
        """Whether the thread runs (a stopped reconciler counts as alive: not a death)."""
        return self._thread is None or self._thread.is_alive() or self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a database outage must not end the thread
                self.errors += 1
                log.exception("reconcile tick failed")
            self._stop.wait(self.config.interval_s)

    def figures(self) -> dict[str, Any]:
        lag = None if self.last_tick_at is None else max(0.0, self.clock() - self.last_tick_at)
        return {
            "reconciler_active": int(self.active),
            "reconcile_ticks_total": self.ticks,
            "reconcile_errors_total": self.errors,
            "reconcile_commands_total": self.sent,
            "reconcile_send_errors_total": self.send_errors,
            "reconcile_lag_s": lag,
            "reconcile_tick_s": self.last_tick_s,
            "reconciler_takeovers_total": self.lease.takeovers,
            "artifact_transfers": self.delivery.publishing,
        }

    # ------------------------------------------------------------------ one tick

    def tick(self) -> bool:
        """One pass over every desired state; False when another process holds the lease."""
        started = time.monotonic()
        if not self.lease.acquire():
            if self.active:
                log.warning("reconciler lease lost: another server reconciles now")
            self.active = False
            self.delivery.retain(())
            return False
        # A process that just took the lease (started, or took over from a dead one)
        # publishes every command in flight once more under its id: replies sent while
        # no server listened are lost, and a device answers a repeated id with how the
        # first copy ended (``duplicate``) without running it again.
        fresh, self.active = not self.active, True
        now = self.clock()
        with self.database.session() as s:
            sends, republish, needed = self._reconcile(s, now, fresh)
        # Fencing: a process whose lease was taken over while it worked sends nothing.
        if not self.lease.held():
            self.active = False
            return False
        for record in republish:
            self._republish(record)
        for start in range(0, len(sends), SEND_BATCH):
            self._send(sends[start : start + SEND_BATCH], now)
        for bundle in needed.values():
            # Chunk publishers for every bundle still needed, so a command sent before a
            # restart (or by a reconciler that died) finds its transfer served.
            self._offer(bundle)
        self.delivery.retain(needed)
        self.ticks += 1
        self.last_tick_at = now
        self.last_tick_s = time.monotonic() - started
        return True

    def _reconcile(
        self, s: Session, now: float, fresh: bool = False
    ) -> tuple[list[Send], list[CommandRecord], dict[str, BundleRecord]]:
        desired = list(s.scalars(select(Desired).order_by(Desired.set_at, Desired.id)))
        effective = effective_desired(s, desired)
        in_flight = self._in_flight(s, {d.rollout_id for d in desired if d.rollout_id}, now)
        fleet = self._read_fleet(s, {d.model for d in desired}, in_flight, now)
        republish = self._follow_commands(in_flight, fleet, now, fresh)
        sends: list[Send] = []
        needed: dict[str, BundleRecord] = {}
        for row in desired:
            rollout = (
                s.get(Rollout, row.rollout_id, with_for_update=True) if row.rollout_id else None
            )
            bundle = s.scalar(
                select(BundleRecord).where(
                    BundleRecord.name == row.model, BundleRecord.version == row.version
                )
            )
            if rollout is None or bundle is None or rollout.state in ENDED:
                self._warn_once(row, "its rollout or bundle is missing: nothing is sent for it")
                continue
            needed[bundle.sha256] = bundle
            devices = {d for (d, _model), winner in effective.items() if winner is row}
            sends += self.progress.step(s, rollout, devices, fleet, bundle, now)
        return sends, republish, needed

    def _in_flight(self, s: Session, current: set[str], now: float) -> list[RolloutDevice]:
        """Rows with a command in flight, of the desired rows' rollouts and of those
        aborted or replaced recently (their commands end, or time out, within that window)."""
        window = now - 2 * self.config.command_timeout_s
        ended = s.scalars(select(Rollout.id).where(Rollout.updated_at >= window))
        rollouts = current | set(ended)
        if not rollouts:
            return []
        return list(
            s.scalars(
                select(RolloutDevice).where(
                    RolloutDevice.rollout_id.in_(rollouts), RolloutDevice.status.not_in(SETTLED)
                )
            )
        )

    def _read_fleet(
        self, s: Session, models: set[str], in_flight: list[RolloutDevice], now: float
    ) -> FleetView:
        online: dict[str, bool] = {}
        received: dict[str, float] = {}
        for device, is_online, at in s.execute(
            select(Device.id, Device.online, Device.state_received_at)
        ):
            online[device] = bool(is_online)
            if at is not None:
                received[device] = at
        dm = list(s.scalars(select(DeviceModel).where(DeviceModel.model.in_(models))))
        active = list(s.scalars(select(CommandRecord).where(CommandRecord.status.in_(ACTIVE))))
        commands = {c.id: c for c in active}
        missing = [r.command_id for r in in_flight if r.command_id and r.command_id not in commands]
        if missing:
            commands.update(
                (c.id, c)
                for c in s.scalars(select(CommandRecord).where(CommandRecord.id.in_(missing)))
            )
        return FleetView(
            online=online,
            state_received=received,
            models={(m.device_id, m.model): m for m in dm},
            # A command nobody expires (an API ping never answered) stops blocking the
            # device after the command timeout.
            busy={
                c.device_id
                for c in active
                if c.rollout_id is not None or now - c.created_at < self.config.command_timeout_s
            },
            commands=commands,
        )

    def _warn_once(self, row: Desired, problem: str) -> None:
        key = (row.target_kind, row.target, row.model, row.version)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("desired %s %s for %s %s: %s", row.model, row.version, *key[:2], problem)

    # ------------------------------------------------------------------ outcomes

    def _follow_commands(
        self, rows: list[RolloutDevice], fleet: FleetView, now: float, fresh: bool = False
    ) -> list[CommandRecord]:
        """Fold each in-flight row's command into the row. Returns the commands to
        publish again: recorded but never acknowledged by the broker, and, when this
        process has just taken the lease (``fresh``), every command in flight."""
        republish: list[CommandRecord] = []
        for row in rows:
            command = fleet.commands.get(row.command_id or "")
            if command is None:  # died between marking the row and recording the command
                row.status, row.command_id, row.updated_at = PENDING, None, now
                continue
            if command.status in ACTIVE and _confirmed_by_state(command, fleet):
                # The device's state says the command's version serves: its final reply
                # was lost (sent while no server listened); the state is the truth.
                command.status, command.code, command.finished_at = "done", "ok", now
                command.message = "confirmed by the device's state (no final reply received)"
            if command.status in ACTIVE:
                if fresh and command.published_at is not None:
                    republish.append(command)
                if now - command.created_at >= self.config.command_timeout_s:
                    command.status, command.code, command.finished_at = "expired", "timeout", now
                    command.message = f"no final reply within {self.config.command_timeout_s:g}s"
                    fleet.busy.discard(command.device_id)
                elif command.published_at is None:
                    republish.append(command)
                    continue
                else:
                    status = command.stage if command.status == "progress" else command.status
                    status = status or command.status
                    if row.status != status:
                        # Moved: a live page watching the row's updated_at shows the stage
                        # (the reply's own event may have come before this tick).
                        row.status, row.updated_at = status, now
                    continue
            self.progress.finish(row, command, now)
        return republish

    # ------------------------------------------------------------------ sending

    def _send(self, sends: list[Send], now: float) -> None:
        """Record and publish a batch of commands in one go (``issue_many``)."""
        made: list[tuple[Send, Command]] = []
        for send in sends:
            try:
                made.append((send, self._command(send, now)))
            except Exception as exc:  # no record: the next tick finds the row pending again
                self.send_errors += 1
                log.warning("could not make %s for %s: %s", send.command_id, send.device, exc)
        if not made:
            return
        batch = [(send.device, command, send.rollout_id) for send, command in made]
        try:
            issue_many(self.database, self.sender, batch, actor=ACTOR, clock=now)
        except Exception as exc:  # the next tick publishes the recorded commands, or resends
            self.send_errors += len(made)
            log.warning("could not send %d command(s): %s", len(made), exc)
            return
        self.sent += len(made)
        for send, command in made:
            log.info("sent %s %s to %s (%s)", command.op, send.version, send.device, command.id)

    def _command(self, send: Send, now: float) -> Command:
        expires = now + self.config.command_expires_s
        if send.rollback:
            return RollbackCommand(
                id=send.command_id,
                issued_at=now,
                expires_at=expires,
                model=send.model,
                to_version=send.version,
            )
        return DeployCommand(
            id=send.command_id,
            issued_at=now,
            expires_at=expires,
            manifest=send.bundle.manifest,
            signature=send.bundle.signature,
            artifact=self.delivery.artifact(send.bundle),
            pipeline=send.pipeline,
            # Only what the operator chose: None is left out of the message, and the
            # device's own config decides.
            shadow=send.shadow,
            min_agreement=send.min_agreement,
        )

    def _republish(self, record: CommandRecord) -> None:
        try:
            command = _commands.validate_python(record.body)
            self.sender.send(record.device_id, command)
            with self.database.session() as s:
                row = s.get(CommandRecord, record.id)
                if row is not None:
                    row.published_at = time.time()
            log.info("published %s to %s again", record.id, record.device_id)
        except Exception as exc:
            self.send_errors += 1
            log.warning("could not publish %s again: %s", record.id, exc)

    def _offer(self, bundle: BundleRecord) -> None:
        try:
            self.delivery.artifact(bundle)
        except Exception as exc:
            log.warning("cannot offer %s %s: %s", bundle.name, bundle.version, exc)


def _confirmed_by_state(command: CommandRecord, fleet: FleetView) -> bool:
    """Whether the device reports the deploy's or rollback's version active and settled
    (serving, or stored where no pipeline uses the model)."""
    body = command.body or {}
    if command.op == "deploy":
        manifest = body.get("manifest") or {}
        model, version = manifest.get("name"), manifest.get("version")
    elif command.op == "rollback":
        model, version = body.get("model"), body.get("to_version")
    else:
        return False
    if not isinstance(model, str) or not isinstance(version, str):
        return False
    state = fleet.models.get((command.device_id, model))
    return state is not None and state.active == version and state.status in ON_VERSION
