"""Sending a command to a device on the server's behalf: recorded first, then published.

The row is written before the publish, so every command a device may ever answer
has a row for ingest to fold its replies into, and a server that dies between the
two leaves a row a later reconciler can publish again under the same id (a device
never runs an id twice). Used by the reconciler and by the API's commands.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Protocol

from sqlalchemy import update

from agent.protocol import Command

from .db import Database
from .db.schema import CommandRecord

log = logging.getLogger(__name__)


class Sender(Protocol):
    """What sending needs of the MQTT link (``fleet.console.Console``: it signs)."""

    def send(self, device: str, command: Command, timeout: float = ...) -> None: ...


class BatchSender(Sender, Protocol):
    """A link that publishes many commands, then waits for all the broker's acks."""

    def send_many(self, commands: Iterable[tuple[str, Command]], timeout: float = ...) -> None: ...


def new_command_id(op: str) -> str:
    return f"{op[:3]}-{uuid.uuid4().hex[:16]}"


def issue(
    database: Database,
    sender: Sender,
    device: str,
    command: Command,
    *,
    actor: str,
    rollout_id: str | None = None,
    clock: float | None = None,
) -> CommandRecord:
    """Record ``command`` for ``device``, publish it, and note when the broker took it.

    Raises what the sender raises (``ConsoleError``) after recording: the row stays
    ``sent`` with no ``published_at``, which says the broker never acknowledged it.
    """
    now = time.time() if clock is None else clock
    record = _record(device, command, actor, rollout_id, now)
    with database.session() as s:
        s.add(record)
    sender.send(device, command)
    _published(database, [record])
    return record


def issue_many(
    database: Database,
    sender: BatchSender,
    commands: Sequence[tuple[str, Command, str | None]],
    *,
    actor: str,
    clock: float | None = None,
) -> list[CommandRecord]:
    """``issue`` for many (device, command, rollout id): one transaction records them all,
    one publish waits for every ack, one transaction notes it. Under load a transaction
    and an ack wait per command cost tens of ms each, which for a rollout to thousands of
    devices came to minutes. A failed publish leaves every row of the batch without
    ``published_at`` (published again under its id; a device answers an id it already
    ran ``duplicate``, never running it twice)."""
    now = time.time() if clock is None else clock
    records = [_record(d, c, actor, rollout_id, now) for d, c, rollout_id in commands]
    with database.session() as s:
        s.add_all(records)
    sender.send_many([(d, c) for d, c, _ in commands])
    _published(database, records)
    return records


def _record(
    device: str, command: Command, actor: str, rollout_id: str | None, now: float
) -> CommandRecord:
    return CommandRecord(
        id=command.id,
        device_id=device,
        op=command.op,
        body=command.model_dump(mode="json", exclude_none=True),
        rollout_id=rollout_id,
        created_at=now,
        created_by=actor,
        expires_at=command.expires_at,
        status="sent",
        message="",
    )


def _published(database: Database, records: list[CommandRecord]) -> None:
    published = time.time()
    with database.session() as s:
        s.execute(
            update(CommandRecord)
            .where(CommandRecord.id.in_([r.id for r in records]))
            .values(published_at=published)
        )
    for record in records:
        record.published_at = published
