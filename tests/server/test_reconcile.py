"""The reconciler against both databases, with a fake sender and clock; ingest's rows
are written directly (tests.server.rollout_support). The last test runs it for real:
Console, Mosquitto, simulated devices, chunks over MQTT."""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from agent.protocol import DeployCommand, MqttArtifact, RollbackCommand, UrlArtifact
from fleet.console import BrokerOptions, Console, ReplyEvent, StateEvent
from fleet.server.artifacts import ArtifactStore
from fleet.server.config import ArtifactsConfig
from fleet.server.db import Database
from fleet.server.db.schema import (
    BundleRecord,
    CommandRecord,
    Desired,
    Device,
    DeviceGroup,
    DeviceModel,
)
from fleet.server.db.schema import Lease as LeaseRow
from fleet.server.delivery import ArtifactDelivery
from fleet.server.reconcile import Reconciler
from fleet.server.rollouts import (
    NotFound,
    abort,
    approve,
    pause,
    remove_desired,
    resume,
    retry_device,
)
from tests.fleet_support import SimDevice, make_bundle
from tests.mqtt_support import Broker

from .rollout_support import (
    CONFIG,
    PUBLIC_URL,
    Clock,
    FakeSender,
    add_bundle,
    add_device,
    complete,
    reconciler,
    reply,
    row_of,
    set_model,
    set_online,
    start_rollout,
    state_of,
    statuses,
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sender() -> FakeSender:
    return FakeSender()


def devices_of(sent: list[tuple[str, object]]) -> list[str]:
    return sorted(d for d, _ in sent)


def test_canary_then_the_rest(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    bundle = add_bundle(database, "2")
    for d in ("a", "b", "c"):
        add_device(database, d)
    add_device(database, "z", online=False)  # the canary goes to an online device
    rid = start_rollout(database, clock, "2", canary="1")
    r = reconciler(database, sender, clock, tmp_path)

    assert r.tick()
    [(first, command)] = sender.take()
    assert first in ("a", "b", "c")
    assert isinstance(command, DeployCommand)
    assert command.manifest == bundle.manifest and command.signature == bundle.signature
    assert command.artifact == UrlArtifact(
        url=f"{PUBLIC_URL}/artifacts/{bundle.sha256}/model.tflite"
    )
    assert command.pipeline == "door"
    assert statuses(database, rid)[first] == "sent"
    r.tick()
    assert sender.take() == []  # in flight: nothing else until the canary ends
    reply(database, command.id, "progress")
    complete(database, first, command)
    r.tick()
    rest = sender.take()
    assert devices_of(rest) == sorted({"a", "b", "c"} - {first})  # z is offline
    for device, c in rest:
        complete(database, device, c)
    r.tick()
    assert state_of(database, rid) == "done"
    assert statuses(database, rid) == {"a": "done", "b": "done", "c": "done", "z": "pending"}
    with database.session() as s:
        records = s.scalars(select(CommandRecord)).all()
        assert {c.rollout_id for c in records} == {rid}
        assert {c.created_by for c in records} == {"reconciler"}


def test_halts_at_the_failure_threshold_and_resume_carries_on(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    for d in ("a", "b", "c", "d"):
        add_device(database, d)
    rid = start_rollout(database, clock, "2", canary="2", max_failures=0)
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    (d1, c1), (d2, c2) = sorted(sender.take(), key=lambda x: x[0])
    complete(database, d1, c1)
    reply(database, c2.id, "failed", "validation_failed", "NaN outputs")
    r.tick()
    assert state_of(database, rid) == "halted"
    row = row_of(database, rid, d2)
    # The device refused the model: not tried again on its own (a retry would be a
    # rollback to the version it keeps as failed, which it would take as vouched for).
    assert (row.status, row.code, row.message, row.attempts) == (
        "given_up",
        "validation_failed",
        "NaN outputs",
        1,
    )
    clock.advance(600)
    r.tick()
    assert sender.take() == []  # no retry, and the next wave stays closed
    assert set(statuses(database, rid).values()) >= {"waiting"}

    with database.session() as s:
        resume(s, rid, now=clock())
    r.tick()
    # The accepted failure does not halt again: the next wave opens; d2 stays given up.
    assert state_of(database, rid) == "running"
    assert devices_of(sender.take()) == sorted({"a", "b", "c", "d"} - {d1, d2})
    with database.session() as s:
        retry_device(s, rid, d2, now=clock())  # the operator asks again
    r.tick()
    [(device, retry)] = sender.take()
    assert device == d2 and retry.id != c2.id


def test_a_transient_failure_is_retried_before_it_counts_against_the_rollout(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    for d in ("a", "b"):
        add_device(database, d)
    rid = start_rollout(database, clock, "2", canary="1", max_failures=0)
    r = reconciler(database, sender, clock, tmp_path)  # max_attempts 3, backoff 10 s
    r.tick()
    [(canary, c1)] = sender.take()
    # The server (or the network) was away while the canary downloaded.
    reply(database, c1.id, "failed", "download_failed", "connection refused")
    r.tick()
    assert state_of(database, rid) == "running" and sender.take() == []
    clock.advance(11)
    r.tick()
    [(again, c2)] = sender.take()
    assert again == canary and c2.id != c1.id
    reply(database, c2.id, "failed", "download_failed", "connection refused")
    r.tick()
    assert state_of(database, rid) == "running" and sender.take() == []
    clock.advance(30)
    r.tick()
    [(_, c3)] = sender.take()
    reply(database, c3.id, "failed", "download_failed", "connection refused")
    r.tick()
    # Given up after max_attempts: now it counts, and the rollout halts before wave 1.
    assert row_of(database, rid, canary).status == "given_up"
    assert state_of(database, rid) == "halted"
    assert sender.take() == []


def test_the_shadow_stage_shows_and_a_shadow_refusal_is_not_retried(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    rid = start_rollout(database, clock, "2")
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    [(_, command)] = sender.take()
    with database.session() as s:
        record = s.get(CommandRecord, command.id)
        assert record is not None
        record.status, record.code, record.stage = "progress", "in_progress", "shadow"
    before = row_of(database, rid, "a").updated_at
    clock.advance(1)
    r.tick()
    assert statuses(database, rid) == {"a": "shadow"}  # the row shows the device's stage
    # ...and its updated_at moves, so a live page watching rows sees the stage.
    assert row_of(database, rid, "a").updated_at > before
    reply(database, command.id, "failed", "shadow_rejected", "agreement 0.120 < 0.95")
    r.tick()
    # A refusal of the model by the device, like validation or probation: not retried.
    row = row_of(database, rid, "a")
    assert (row.status, row.code, row.attempts) == ("given_up", "shadow_rejected", 1)
    clock.advance(600)
    r.tick()
    assert sender.take() == []


def test_approval_gate_between_waves(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    for d in ("a", "b", "c"):
        add_device(database, d)
    rid = start_rollout(database, clock, "2", canary="1", approval=True)
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    [(d, c)] = sender.take()
    complete(database, d, c)
    r.tick()
    r.tick()
    assert state_of(database, rid) == "waiting_approval"
    assert sender.take() == []
    with database.session() as s:
        approve(s, rid, now=clock())
    r.tick()
    assert len(sender.take()) == 2


def test_pause_stops_sending_and_resume_starts_again(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    rid = start_rollout(database, clock, "2")
    with database.session() as s:
        pause(s, rid, now=clock())
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    assert sender.take() == [] and statuses(database, rid) == {"a": "pending"}
    with database.session() as s:
        resume(s, rid, now=clock())
    r.tick()
    assert devices_of(sender.take()) == ["a"]


def test_abort_restores_the_previous_version_with_rollback(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "1")
    add_bundle(database, "2")
    for d in ("a", "b"):
        add_device(database, d)
    first = start_rollout(database, clock, "1")
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    assert sender.take() == [] and state_of(database, first) == "done"  # already there
    clock.advance(100)
    second = start_rollout(database, clock, "2", canary="1")
    r.tick()
    [(moved, c)] = sender.take()
    complete(database, moved, c, received=clock())
    r.tick()
    [(still, deploying)] = sender.take()
    reply(database, deploying.id, "accepted")  # still deploying when the operator aborts
    with database.session() as s:
        abort(s, second, actor="alice", now=clock())
    with database.session() as s:
        desired = s.scalar(select(Desired))
        assert desired is not None
        assert (desired.version, desired.rollout_id) == ("1", first)
    assert state_of(database, second) == "aborted"
    clock.advance(30)
    r.tick()
    [(device, back)] = sender.take()
    assert device == moved
    assert isinstance(back, RollbackCommand)
    assert (back.model, back.to_version) == ("digits", "1")
    complete(database, moved, back)
    # The aborted rollout's command in flight is followed to its end, then undone too.
    complete(database, still, deploying, received=clock())
    r.tick()
    assert statuses(database, second) == {moved: "done", still: "done"}
    clock.advance(30)
    r.tick()
    [(device, back)] = sender.take()
    assert device == still and isinstance(back, RollbackCommand)
    complete(database, still, back)
    r.tick()
    assert statuses(database, first) == {"a": "done", "b": "done"}


def test_abort_without_a_previous_state_deletes_the_desired_row(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    rid = start_rollout(database, clock, "2")
    with database.session() as s:
        abort(s, rid, actor="alice", now=clock())
    with database.session() as s:
        assert s.scalars(select(Desired)).all() == []
    reconciler(database, sender, clock, tmp_path).tick()
    assert sender.take() == []


def test_retries_back_off_then_give_up_until_the_operator_retries(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    rid = start_rollout(database, clock, "2", max_failures=10)
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    [(_, c)] = sender.take()
    reply(database, c.id, "failed", "download_failed", "timed out")
    r.tick()  # attempt 1 failed: next at +10 s
    assert row_of(database, rid, "a").next_attempt_at == clock() + 10
    clock.advance(9)
    r.tick()
    assert sender.take() == []
    clock.advance(1)
    r.tick()
    [(_, c)] = sender.take()
    # No final reply within command_timeout_s: a failed try (attempt 2, next at +15 s, capped).
    clock.advance(100)
    r.tick()
    row = row_of(database, rid, "a")
    assert (row.status, row.code, row.attempts) == ("failed", "timeout", 2)
    assert row.next_attempt_at == clock() + 15
    with database.session() as s:
        expired = s.get(CommandRecord, c.id)
        assert expired is not None and expired.status == "expired"
    clock.advance(15)
    r.tick()
    [(_, c)] = sender.take()
    reply(database, c.id, "failed", "download_failed", "timed out")
    r.tick()
    assert row_of(database, rid, "a").status == "given_up"
    clock.advance(1000)
    r.tick()
    assert sender.take() == []
    with database.session() as s:
        retry_device(s, rid, "a", now=clock())
    r.tick()
    assert devices_of(sender.take()) == ["a"]


def test_a_device_offline_through_the_rollout_is_sent_it_when_back(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    add_device(database, "away", online=False)
    rid = start_rollout(database, clock, "2", canary="1")
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    [(d, c)] = sender.take()
    assert d == "a"
    complete(database, d, c)
    r.tick()
    r.tick()
    assert state_of(database, rid) == "done"
    assert sender.take() == []
    clock.advance(3600)
    set_online(database, "away", True)
    r.tick()
    [(d, c)] = sender.take()
    assert d == "away" and isinstance(c, DeployCommand)
    complete(database, d, c)
    r.tick()
    assert statuses(database, rid) == {"a": "done", "away": "done"}


def test_a_device_that_left_the_version_on_its_own_is_brought_back(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    rid = start_rollout(database, clock, "2")
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    [(_, c)] = sender.take()
    reply(database, c.id, "done")  # the state that confirms it has not arrived yet
    r.tick()
    clock.advance(5)
    r.tick()
    assert sender.take() == [] and statuses(database, rid) == {"a": "done"}
    set_model(database, "a", "2", ["1", "2"], received=clock())
    r.tick()
    # A state from before the done reply, written late (ingest behind under load): the
    # device did not leave the version, so nothing is sent.
    set_model(database, "a", "1", ["1"], received=clock() - 60)
    clock.advance(3600)
    r.tick()
    assert sender.take() == [] and statuses(database, rid) == {"a": "done"}
    set_model(database, "a", "1", ["1", "2"], received=clock())  # it rolled back by itself
    r.tick()
    [(_, back)] = sender.take()
    assert isinstance(back, RollbackCommand) and back.to_version == "2"
    assert row_of(database, rid, "a").message == "no longer on 2"


def test_a_device_that_joins_the_group_later_gets_its_version(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    rid = start_rollout(database, clock, "2", canary="1", waves=2)
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    [(d, c)] = sender.take()
    complete(database, d, c)
    r.tick()
    assert state_of(database, rid) == "done"
    add_device(database, "new")
    add_device(database, "there", active="2")
    r.tick()
    [(d, c)] = sender.take()
    assert d == "new" and isinstance(c, DeployCommand)
    assert statuses(database, rid)["there"] == "done"  # on the version already: nothing sent
    complete(database, d, c)
    r.tick()
    assert statuses(database, rid)["new"] == "done"


def test_a_pinned_device_keeps_its_pin(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "1")
    add_bundle(database, "2")
    add_device(database, "a")
    add_device(database, "pinned")
    start_rollout(database, clock, "1", target_kind="device", target="pinned")
    rid = start_rollout(database, clock, "2")
    row = row_of(database, rid, "pinned")
    assert row.status == "skipped" and "pinned" in row.message
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    assert devices_of(sender.take()) == ["a"]
    # A device joining the group later is pinned too: the pin still wins.
    add_device(database, "late")
    start_rollout(database, clock, "1", target_kind="device", target="late")
    r.tick()
    assert [d for d, _ in sender.take()] == []
    assert row_of(database, rid, "pinned").status == "skipped"


def test_a_removed_pin_hands_the_device_back_to_its_group(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "1")
    add_bundle(database, "2")
    add_device(database, "pinned")
    start_rollout(database, clock, "1", target_kind="device", target="pinned")
    rid = start_rollout(database, clock, "2")
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    assert sender.take() == []  # on 1, as pinned
    with database.session() as s:
        remove_desired(
            s, target_kind="device", target="pinned", model="digits", actor="op", now=clock()
        )
        with pytest.raises(NotFound):
            remove_desired(
                s, target_kind="device", target="pinned", model="digits", actor="op", now=1
            )
    r.tick()
    [(device, command)] = sender.take()
    assert device == "pinned" and command.manifest["version"] == "2"  # type: ignore[union-attr]
    assert row_of(database, rid, "pinned").status == "sent"


def test_of_two_groups_the_most_recently_set_desired_state_wins(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_bundle(database, "3")
    add_device(database, "both", groups=("kitchen", "door"))
    add_device(database, "k", groups=("kitchen",))
    kitchen = start_rollout(database, clock, "2", target="kitchen")
    clock.advance(1)
    door = start_rollout(database, clock, "3", target="door")
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    sent = {d: c.manifest["version"] for d, c in sender.take() if isinstance(c, DeployCommand)}
    assert sent == {"both": "3", "k": "2"}
    row = row_of(database, kitchen, "both")
    assert (row.status, row.message) == ("skipped", "another desired state applies to this device")
    assert statuses(database, door) == {"both": "sent"}


def test_a_restarted_reconciler_resumes_and_sends_no_device_twice(
    database: Database, clock: Clock, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    for d in ("a", "b", "c", "d"):
        add_device(database, d)
    rid = start_rollout(database, clock, "2", canary="2")
    first, second = FakeSender(), FakeSender()
    old = reconciler(database, first, clock, tmp_path / "a", instance="server-a")
    old.tick()
    sent = first.take()
    complete(database, *sent[0])
    old.stop()  # releases the lease; the commands of the first wave stay in flight
    new = reconciler(database, second, clock, tmp_path / "b", instance="server-b")
    new.tick()
    # Followed, never sent under a new id: the one still in flight is published once
    # more under its own id (its replies may have been lost while no server listened).
    assert [(d, c.id) for d, c in second.take()] == [(sent[1][0], sent[1][1].id)]
    new.tick()
    assert second.take() == []  # once, not at every tick
    complete(database, *sent[1])
    new.tick()
    rest = second.take()
    assert devices_of(rest) == sorted({"a", "b", "c", "d"} - {d for d, _ in sent})
    for device, c in rest:
        complete(database, device, c)
    new.tick()
    assert state_of(database, rid) == "done"


def test_a_lost_final_reply_is_confirmed_by_the_devices_state(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    rid = start_rollout(database, clock, "2")
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    [(_d, command)] = sender.take()
    set_model(database, "a", "2", ["1", "2"], status="probation")
    clock.advance(1)
    r.tick()
    assert row_of(database, rid, "a").status != "done"  # on probation: not yet
    set_model(database, "a", "2", ["1", "2"])  # the state after probation; no reply came
    r.tick()
    assert row_of(database, rid, "a").status == "done"
    assert state_of(database, rid) == "done"
    with database.session() as s:
        record = s.get(CommandRecord, command.id)
        assert record is not None and (record.status, record.code) == ("done", "ok")
        assert "confirmed by the device's state" in record.message
    assert sender.take() == []


def test_stored_where_no_pipeline_uses_the_model_counts_as_on_the_version(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    """A device with no pipeline for the model reports it ``stored``, never ``serving``."""
    add_bundle(database, "2")
    add_device(database, "a")
    add_device(database, "b")
    rid = start_rollout(database, clock, "2")
    r = reconciler(database, sender, clock, tmp_path)
    r.tick()
    assert devices_of(sender.take()) == ["a", "b"]
    set_model(database, "a", "2", ["1", "2"], status="stored")  # its final reply was lost
    set_model(database, "b", "2", ["1", "2"], status="degraded")
    clock.advance(1)
    r.tick()
    assert statuses(database, rid) == {"a": "done", "b": "sent"}


def test_a_command_recorded_but_not_published_is_published_again_under_its_id(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    rid = start_rollout(database, clock, "2")
    r = reconciler(database, sender, clock, tmp_path)
    sender.fail = 1
    r.tick()
    assert sender.take() == [] and r.send_errors == 1
    command_id = row_of(database, rid, "a").command_id
    r.tick()
    [(d, c)] = sender.take()
    assert (d, c.id) == ("a", command_id)
    with database.session() as s:
        record = s.get(CommandRecord, c.id)
        assert record is not None and record.published_at is not None


def test_the_old_holder_does_nothing_once_its_lease_is_taken_over(
    database: Database, clock: Clock, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    first, second = FakeSender(), FakeSender()
    old = reconciler(database, first, clock, tmp_path / "a", instance="server-a")
    new = reconciler(database, second, clock, tmp_path / "b", instance="server-b")
    assert old.tick()
    assert not new.tick()  # held by server-a
    clock.advance(11)  # server-a stalled past its lease
    assert new.tick()
    start_rollout(database, clock, "2")
    assert not old.tick()
    assert first.take() == [] and not old.active
    new.tick()
    assert devices_of(second.take()) == ["a"]


# ------------------------------------------------------------------- for real


def ingest(database: Database, console: Console) -> None:
    """A tiny test-only ingest: states into the inventory, replies into the commands."""
    while True:
        try:
            event = console.events.get_nowait()
        except queue.Empty:
            return
        with database.session() as s:
            if isinstance(event, StateEvent):
                st = event.state
                device = s.get(Device, st.device) or Device(id=st.device, first_seen=event.received)
                device.last_seen, device.online, device.groups = (
                    event.received,
                    st.online,
                    st.groups,
                )
                s.merge(device)
                s.execute(delete(DeviceGroup).where(DeviceGroup.device_id == st.device))
                s.execute(delete(DeviceModel).where(DeviceModel.device_id == st.device))
                s.flush()
                s.add_all(DeviceGroup(device_id=st.device, group=g) for g in st.groups)
                s.add_all(
                    DeviceModel(
                        device_id=st.device, model=m.name, active=m.active,
                        status=m.status, versions=m.versions,
                    )
                    for m in st.models
                )  # fmt: skip
            elif isinstance(event, ReplyEvent):
                command = s.get(CommandRecord, event.reply.id)
                if command is not None and command.status not in ("done", "failed", "expired"):
                    r = event.reply
                    command.status, command.stage, command.code = r.status, r.stage, r.code.value
                    command.message = r.message
                    if r.status in ("done", "failed"):
                        command.finished_at = event.received


def test_a_rollout_reaches_done_over_mqtt_with_chunks(
    database: Database, broker: Broker, tmp_path: Path
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    store = ArtifactStore(tmp_path / "artifacts")
    store.open()
    upload = make_bundle(store.incoming() / "b", os.urandom(5000), version="2", keys=None)
    stored, _ = store.add(upload, [], require_signature=False)
    with database.session() as s:
        s.add(
            BundleRecord(
                name="digits", version="2", sha256=stored.manifest.model.sha256,
                size=stored.manifest.model.size, manifest=stored.manifest_data,
                signature=None, signer=None, created_at=stored.manifest.created_at,
                uploaded_at=time.time(), uploaded_by="tests",
            )
        )  # fmt: skip
    console = Console(BrokerOptions(broker.host, broker.port, prefix=prefix), share_group="fleet")
    console.connect()
    devices = [SimDevice(broker, d, prefix=prefix, groups=["kitchen"]) for d in ("pi-1", "pi-2")]
    for sim in devices:
        sim.start()
    delivery = ArtifactDelivery(
        ArtifactsConfig(delivery="mqtt", chunk_size=1024),
        store, public_url="http://unused", link=console, topics=console.topics,
    )  # fmt: skip
    r = Reconciler(database, console, delivery, CONFIG, instance="real")
    try:
        deadline = time.monotonic() + 30
        while len(statuses_online(database)) < 2:
            assert time.monotonic() < deadline, "the devices' states never arrived"
            ingest(database, console)
            time.sleep(0.05)
        rid = start_rollout(database, Clock(time.time()), "2", canary="1")
        while state_of(database, rid) != "done":
            assert time.monotonic() < deadline, statuses(database, rid)
            ingest(database, console)
            r.tick()
            time.sleep(0.05)
    finally:
        r.stop()
        for sim in devices:
            sim.stop()
        console.close()
    assert statuses(database, rid) == {"pi-1": "done", "pi-2": "done"}
    for sim in devices:
        assert sim.active() == "2" and sim.invalid == []
        [command] = sim.received
        assert isinstance(command, DeployCommand)
        assert command.artifact == MqttArtifact(
            transfer_id=f"b-{stored.manifest.model.sha256[:16]}", chunk_size=1024, chunks=5
        )
    assert delivery.publishing == 0  # stopped with the reconciler


def statuses_online(database: Database) -> list[str]:
    with database.session() as s:
        return list(s.scalars(select(Device.id).where(Device.online)))


def test_the_thread_reconciles_until_stopped_and_then_lets_the_lease_go(
    database: Database, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_device(database, "a")
    start_rollout(database, Clock(time.time()), "2")
    r = reconciler(database, sender, time.time, tmp_path, interval_s=0.05)
    r.start()
    try:
        deadline = time.monotonic() + 10
        while not sender.sent:
            assert time.monotonic() < deadline, r.figures()
            time.sleep(0.02)
    finally:
        r.stop()
    assert [t.name for t in threading.enumerate() if t.name == "reconciler"] == []
    figures = r.figures()
    assert figures["reconciler_active"] == 1 and figures["reconcile_commands_total"] == 1
    with database.session() as s:
        lease = s.get(LeaseRow, "reconciler")
        assert lease is not None and lease.expires_at == 0.0  # released


def test_deploys_carry_the_rollouts_health_checks_only_when_set(
    database: Database, clock: Clock, sender: FakeSender, tmp_path: Path
) -> None:
    add_bundle(database, "2")
    add_bundle(database, "3")
    add_device(database, "a")
    add_device(database, "b", groups=("lab",))
    checked = start_rollout(database, clock, "2", shadow=False, min_agreement=0.8)
    plain = start_rollout(database, clock, "3", target="lab")
    reconciler(database, sender, clock, tmp_path).tick()
    sent = dict(sender.take())
    assert isinstance(sent["a"], DeployCommand) and isinstance(sent["b"], DeployCommand)
    assert (sent["a"].shadow, sent["a"].min_agreement) == (False, 0.8)
    assert (sent["b"].shadow, sent["b"].min_agreement) == (None, None)
    with database.session() as s:
        bodies = {c.rollout_id: c.body for c in s.scalars(select(CommandRecord))}
    # As recorded (and so published again after a restart): exactly what was chosen,
    # nothing at all where the device's config is to decide.
    assert (bodies[checked]["shadow"], bodies[checked]["min_agreement"]) == (False, 0.8)
    assert "shadow" not in bodies[plain] and "min_agreement" not in bodies[plain]
    assert b'"shadow"' not in sent["b"].to_bytes()
