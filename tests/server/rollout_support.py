"""Test support for rollouts and the reconciler: a fake clock and sender, and rows
written as ingest writes them (devices, their models, command replies)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from agent.protocol import Command
from fleet.console import ConsoleError
from fleet.server.artifacts import ArtifactStore
from fleet.server.config import ArtifactsConfig, ReconcileConfig
from fleet.server.db import Database
from fleet.server.db.schema import (
    BundleRecord,
    CommandRecord,
    Device,
    DeviceGroup,
    DeviceModel,
    Rollout,
    RolloutDevice,
)
from fleet.server.delivery import ArtifactDelivery
from fleet.server.reconcile import Reconciler
from fleet.server.rollouts import create_rollout

START = 1_800_000_000.0
PUBLIC_URL = "http://fleet.example:8400"
CONFIG = ReconcileConfig(
    max_attempts=3, backoff_s=10.0, backoff_max_s=15.0, command_timeout_s=100.0, lease_s=10.0
)


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSender:
    """Records every command; ``fail`` makes the next sends raise as a lost broker does."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Command]] = []
        self.fail = 0

    def send(self, device: str, command: Command, timeout: float = 10.0) -> None:
        if self.fail:
            self.fail -= 1
            raise ConsoleError("the broker did not acknowledge a publish within 10s")
        self.sent.append((device, command))

    def send_many(self, commands: Iterable[tuple[str, Command]], timeout: float = 30.0) -> None:
        for device, command in commands:
            self.send(device, command, timeout)

    def take(self) -> list[tuple[str, Command]]:
        sent, self.sent = self.sent, []
        return sent


def delivery(tmp_path: Path) -> ArtifactDelivery:
    return ArtifactDelivery(ArtifactsConfig(), ArtifactStore(tmp_path), public_url=PUBLIC_URL)


def reconciler(
    database: Database,
    sender: FakeSender,
    clock: Callable[[], float],
    tmp_path: Path,
    instance: str = "server-a",
    **config: Any,
) -> Reconciler:
    return Reconciler(
        database,
        sender,
        delivery(tmp_path),
        CONFIG.model_copy(update=config),
        instance=instance,
        clock=clock,
    )


# ------------------------------------------------------------- rows, as ingest


def add_device(
    database: Database,
    device: str,
    *,
    groups: tuple[str, ...] = ("kitchen",),
    online: bool = True,
    active: str | None = "1",
    versions: list[str] | None = None,
    now: float = START,
) -> None:
    with database.session() as s:
        s.add(
            Device(
                id=device,
                first_seen=now,
                last_seen=now,
                online=online,
                status="ok" if online else "offline",
                groups=list(groups),
            )
        )
        s.flush()
        for group in groups:
            s.add(DeviceGroup(device_id=device, group=group))
        if active is not None:
            s.add(
                DeviceModel(
                    device_id=device,
                    model="digits",
                    active=active,
                    status="serving",
                    versions=versions if versions is not None else [active],
                )
            )


def set_online(database: Database, device: str, online: bool) -> None:
    with database.session() as s:
        row = s.get(Device, device)
        assert row is not None
        row.online = online


def set_model(
    database: Database,
    device: str,
    active: str,
    versions: list[str],
    status: str = "serving",
    received: float | None = None,
) -> None:
    """The device's model as its latest state says, ``received`` by the server then."""
    with database.session() as s:
        if received is not None:
            row = s.get(Device, device)
            assert row is not None
            row.state_received_at = received
        s.execute(delete(DeviceModel).where(DeviceModel.device_id == device))
        s.add(
            DeviceModel(
                device_id=device, model="digits", active=active, status=status, versions=versions
            )
        )


def model_of(database: Database, device: str) -> DeviceModel:
    with database.session() as s:
        row = s.get(DeviceModel, (device, "digits"))
        assert row is not None
        return row


def reply(
    database: Database, command_id: str, status: str, code: str = "ok", message: str = ""
) -> None:
    """A reply folded into the command, as ingest does."""
    with database.session() as s:
        row = s.get(CommandRecord, command_id)
        assert row is not None, command_id
        row.status, row.code, row.message = status, code, message
        if status in ("done", "failed"):
            row.finished_at = START


def complete(
    database: Database, device: str, command: Command, received: float | None = None
) -> None:
    """The device carried the command out: a done reply and its new state (``received``
    by the server then, when given)."""
    reply(database, command.id, "done")
    kept = model_of(database, device).versions
    version = getattr(command, "to_version", None) or command.manifest["version"]  # type: ignore[union-attr]
    set_model(database, device, version, list(dict.fromkeys([*kept, version])), received=received)


def add_bundle(database: Database, version: str, model: str = "digits") -> BundleRecord:
    sha = hashlib.sha256(f"{model}-{version}".encode()).hexdigest()
    record = BundleRecord(
        name=model,
        version=version,
        sha256=sha,
        size=100,
        manifest={"name": model, "version": version, "format": 1},
        signature="c2lnbmF0dXJl",
        signer=None,
        created_at="2025-01-01T00:00:00Z",
        uploaded_at=START,
        uploaded_by="tests",
    )
    with database.session() as s:
        s.add(record)
    return record


def start_rollout(database: Database, clock: Clock, version: str, **kw: Any) -> str:
    args: dict[str, Any] = {
        "model": "digits",
        "pipeline": "door",
        "target_kind": "group",
        "target": "kitchen",
        "canary": None,
        "waves": 1,
        "max_failures": 0,
        "approval": False,
        "actor": "alice",
    }
    args.update(kw)
    with database.session() as s:
        return create_rollout(s, version=version, now=clock(), **args).id


def statuses(database: Database, rollout_id: str) -> dict[str, str]:
    with database.session() as s:
        return {
            r.device_id: r.status
            for r in s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id))
        }


def row_of(database: Database, rollout_id: str, device: str) -> RolloutDevice:
    with database.session() as s:
        row = s.get(RolloutDevice, (rollout_id, device))
        assert row is not None
        return row


def state_of(database: Database, rollout_id: str) -> str:
    with database.session() as s:
        row = s.get(Rollout, rollout_id)
        assert row is not None
        return row.state
