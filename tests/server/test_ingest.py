"""Ingest: the console's events into the database, on SQLite and PostgreSQL."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from agent.protocol import PingCommand, ReplyCode, Telemetry
from fleet.console import (
    BrokerOptions,
    Console,
    Event,
    InvalidEvent,
    StateEvent,
    TelemetryEvent,
)
from fleet.server.commands import issue
from fleet.server.config import RetentionConfig
from fleet.server.db import Database
from fleet.server.db.schema import (
    CommandRecord,
    Device,
    DeviceGroup,
    DeviceModel,
    DevicePipeline,
    ReplyRecord,
    TelemetryMinute,
    VersionHistory,
)
from fleet.server.db.schema import Event as EventRow
from fleet.server.ingest import Ingest
from fleet.sim import SimFleet
from tests.mqtt_support import Broker
from tests.server.ingest_support import (
    T0,
    FailingDatabase,
    count,
    reply,
    state,
    telemetry,
    total,
)

MINUTE = int(T0 // 60)


def make(database: Database, **kw: object) -> tuple[Ingest, queue.Queue[Event]]:
    events: queue.Queue[Event] = queue.Queue()
    ingest = Ingest(database, events, clock=lambda: T0 + 1000, retention=RetentionConfig(), **kw)  # type: ignore[arg-type]
    return ingest, events


def feed(ingest: Ingest, events: queue.Queue[Event], *items: Event) -> None:
    for item in items:
        events.put(item)
    assert ingest.flush()


def device(database: Database, device_id: str) -> Device:
    with database.session() as s:
        row = s.get(Device, device_id)
        assert row is not None
        return row


def event_kinds(database: Database, device_id: str) -> list[str]:
    with database.session() as s:
        rows = s.scalars(
            select(EventRow).where(EventRow.device_id == device_id).order_by(EventRow.id)
        )
        return [r.kind for r in rows]


# ------------------------------------------------------------------- states


def test_states_build_the_inventory_and_its_history(database: Database) -> None:
    ingest, events = make(database)
    feed(ingest, events, state("pi-1", T0, version="1"))
    row = device(database, "pi-1")
    assert (row.online, row.status, row.protocol, row.agent_version) == (True, "ok", 1, "0.9.0")
    assert row.runtime == "ai_edge_litert 2.3.0"
    assert row.groups == ["kitchen"] and row.state_ts == T0
    assert row.state_received_at == T0  # the event's receive time (server clock), here = ts
    assert row.state is not None and row.state["models"][0]["active"] == "1"
    assert count(database, DeviceGroup, DeviceGroup.device_id == "pi-1") == 1

    # A new version, a new group set: history closed and opened, rows replaced.
    feed(ingest, events, state("pi-1", T0 + 10, version="2", versions=["1", "2"], groups=("door",)))
    with database.session() as s:
        history = s.scalars(select(VersionHistory).order_by(VersionHistory.id)).all()
        assert [(h.version, h.started, h.ended) for h in history] == [
            ("1", T0, T0 + 10),
            ("2", T0 + 10, None),
        ]
        assert [g.group for g in s.scalars(select(DeviceGroup))] == ["door"]
        model = s.get(DeviceModel, ("pi-1", "digits"))
        assert model is not None and (model.active, model.versions) == ("2", ["1", "2"])
    assert event_kinds(database, "pi-1") == ["online", "version_changed"]

    # A model that leaves the device ends its history; an older state (a retained
    # replay) changes nothing.
    base = state("pi-1", T0 + 20, groups=("door",))
    feed(ingest, events, StateEvent("pi-1", base.state.model_copy(update={"models": []}), T0))
    with database.session() as s:
        last = s.scalars(select(VersionHistory).order_by(VersionHistory.id.desc())).first()
        assert last is not None and (last.version, last.ended) == ("2", T0 + 20)
    assert count(database, DeviceModel) == 0
    feed(ingest, events, state("pi-1", T0 + 5, version="1"))
    assert device(database, "pi-1").state_ts == T0 + 20
    assert count(database, VersionHistory) == 2
    assert ingest.figures()["stale_states"] == 1


def test_the_last_will_says_offline_despite_its_older_time(database: Database) -> None:
    ingest, events = make(database)
    feed(ingest, events, state("pi-1", T0 + 10))
    # The will carries the connect time, before the online state that followed it.
    feed(ingest, events, state("pi-1", T0 + 1, online=False))
    row = device(database, "pi-1")
    assert (row.online, row.status, row.state_ts) == (False, "offline", T0 + 10)
    # A will of an earlier agent run (started before the stored one) is stale.
    feed(
        ingest, events, state("pi-1", T0 + 20), state("pi-1", T0 + 2, online=False, since=T0 - 500)
    )
    assert device(database, "pi-1").online is True
    assert event_kinds(database, "pi-1") == ["online", "offline", "online"]


def test_degraded_models_probation_failures_and_thread_deaths_are_events(
    database: Database,
) -> None:
    ingest, events = make(database)
    feed(ingest, events, state("pi-1", T0))
    feed(
        ingest,
        events,
        state(
            "pi-1",
            T0 + 1,
            status="serving",
            message="version 2 failed probation (errors); rolled back",
        ),
        state("pi-1", T0 + 2, status="degraded", message="no version can serve", thread_deaths=2),
    )
    assert device(database, "pi-1").status == "degraded"
    assert event_kinds(database, "pi-1") == [
        "online",
        "probation_failed",
        "thread_died",
        "model_degraded",
    ]
    assert ingest.figures()["events_recorded"] == {
        "online": 1,
        "probation_failed": 1,
        "thread_died": 1,
        "model_degraded": 1,
    }


# ---------------------------------------------------------------- telemetry


def test_telemetry_is_summed_per_device_pipeline_and_minute(database: Database) -> None:
    ingest, events = make(database)
    # Before any state: the device row is made from telemetry.
    feed(ingest, events, *(telemetry("pi-1", seq, T0 + seq) for seq in range(1, 4)))
    # A second batch adds into the same rows (the upsert), a third minute row apart.
    feed(ingest, events, telemetry("pi-1", 4, T0 + 4, p95=9.0), telemetry("pi-1", 5, T0 + 61))
    with database.session() as s:
        wide = s.get(TelemetryMinute, ("pi-1", "", MINUTE))
        cam = s.get(TelemetryMinute, ("pi-1", "cam", MINUTE))
        door = s.get(TelemetryMinute, ("pi-1", "door", MINUTE))
        later = s.get(TelemetryMinute, ("pi-1", "", MINUTE + 1))
    assert wide is not None and cam is not None and door is not None and later is not None
    assert (wide.samples, later.samples) == (4, 1)
    assert wide.fps_sum == pytest.approx(4 * 11.0)
    assert wide.invoke_p95_max == 18.0  # the worst pipeline, door at 2 x 9
    assert wide.mem_rss_mb_max == 154.0 and wide.outbox_depth_max == 4
    assert wide.cpu_sum == pytest.approx(80.0)
    assert (cam.samples, cam.latency_samples) == (4, 4)
    assert cam.invoke_p95_sum == pytest.approx(4.0 * 3 + 9.0)
    assert cam.wait_p95_sum == pytest.approx(8.0)
    assert cam.errors == 4 and cam.source_state == "open"
    assert door.fps_sum == pytest.approx(4.0)
    row = device(database, "pi-1")
    assert row.telemetry_ts == T0 + 61 and row.fps == pytest.approx(11.0)
    assert row.invoke_p95_ms == 8.0 and row.telemetry is not None
    assert row.telemetry["seq"] == 5
    assert row.telemetry["pipelines"]["cam"]["drift"] == 0.05  # kept, not rolled up
    # An older message does not replace the device's last telemetry.
    feed(ingest, events, telemetry("pi-1", 6, T0 + 30))
    assert device(database, "pi-1").telemetry_ts == T0 + 61
    assert ingest.figures()["written"] == {"telemetry": 6}


def test_drift_is_kept_as_the_largest_of_each_minute_and_null_stays_null(
    database: Database,
) -> None:
    ingest, events = make(database)
    feed(ingest, events, telemetry("pi-1", 1, T0, drift=0.1), telemetry("pi-1", 2, T0 + 1))
    # Another batch into the same minute: the upsert keeps the larger figure.
    feed(ingest, events, telemetry("pi-1", 3, T0 + 2, drift=0.3), telemetry("pi-1", 4, T0 + 3))
    # A minute with no figure at all (no reference on the device).
    feed(ingest, events, telemetry("pi-1", 5, T0 + 61, drift=None))
    with database.session() as s:
        cam = s.get(TelemetryMinute, ("pi-1", "cam", MINUTE))
        door = s.get(TelemetryMinute, ("pi-1", "door", MINUTE))
        wide = s.get(TelemetryMinute, ("pi-1", "", MINUTE))
        later_cam = s.get(TelemetryMinute, ("pi-1", "cam", MINUTE + 1))
        later_wide = s.get(TelemetryMinute, ("pi-1", "", MINUTE + 1))
    assert cam is not None and door is not None and wide is not None
    assert later_cam is not None and later_wide is not None
    assert cam.drift_max == pytest.approx(0.3)
    assert wide.drift_max == pytest.approx(0.3)  # the most drifted pipeline
    assert door.drift_max is None  # door never reports drift
    assert later_cam.drift_max is None and later_wide.drift_max is None


def pipeline_drift(database: Database, device_id: str) -> dict[str, str | None]:
    with database.session() as s:
        rows = s.scalars(select(DevicePipeline).where(DevicePipeline.device_id == device_id))
        return {r.pipeline: r.drift for r in rows}


def test_the_drift_warning_of_each_pipeline_follows_the_state(database: Database) -> None:
    ingest, events = make(database)
    warning = "PSI 0.41 over 0.25 since 12:00:03 (classes 3, 8)"
    feed(ingest, events, state("pi-1", T0, pipelines={"cam": warning, "door": None}))
    assert pipeline_drift(database, "pi-1") == {"cam": warning, "door": None}
    with database.session() as s:
        row = s.get(DevicePipeline, ("pi-1", "cam"))
        assert row is not None and (row.model, row.status) == ("digits", "running")
    # The warning clears; a pipeline the state no longer lists goes.
    feed(ingest, events, state("pi-1", T0 + 10, pipelines={"cam": None}))
    assert pipeline_drift(database, "pi-1") == {"cam": None}
    # An older state (a retained replay) changes nothing.
    feed(ingest, events, state("pi-1", T0 + 5, pipelines={"door": "old"}))
    assert pipeline_drift(database, "pi-1") == {"cam": None}


# ------------------------------------------------------------------ replies


def _command(database: Database, cid: str, device_id: str = "pi-1") -> None:
    class NoSend:
        def send(self, device: str, command: object, timeout: float = 0) -> None:
            pass

    issue(database, NoSend(), device_id, PingCommand(id=cid), actor="test", clock=T0)


def test_replies_are_recorded_and_folded_forward_only(database: Database) -> None:
    _command(database, "c-1")
    _command(database, "c-2")
    ingest, events = make(database)
    feed(
        ingest,
        events,
        reply("pi-1", "c-1", "accepted", T0 + 1),
        reply("pi-1", "c-1", "progress", T0 + 2, stage="downloading"),
        reply("pi-1", "c-1", "done", T0 + 3, data={"pong": True}),
        # Late and repeated: neither moves the command back.
        reply("pi-1", "c-1", "progress", T0 + 2, stage="downloading"),
        reply("pi-1", "c-1", "done", T0 + 3, data={"pong": True}),
        # Another device answering with this id is not this command's reply.
        reply("pi-2", "c-2", "failed", T0 + 4),
        # The device ran c-2 before: its first outcome is the command's.
        reply(
            "pi-1",
            "c-2",
            "failed",
            T0 + 5,
            code=ReplyCode.DUPLICATE,
            data={"original": {"status": "done", "code": "ok", "message": "", "data": {"pong": 1}}},
        ),
        reply("pi-9", "unknown", "done", T0 + 6),
    )
    with database.session() as s:
        c1 = s.get(CommandRecord, "c-1")
        c2 = s.get(CommandRecord, "c-2")
        assert c1 is not None and c2 is not None
        assert (c1.status, c1.code, c1.stage, c1.data, c1.finished_at) == (
            "done",
            "ok",
            "downloading",
            {"pong": True},
            T0 + 3,
        )
        assert (c2.status, c2.code, c2.data) == ("done", "ok", {"pong": 1})
    assert count(database, ReplyRecord) == 8
    assert count(database, ReplyRecord, ReplyRecord.command_id == "c-1") == 5


def test_a_duplicate_of_a_command_still_running_does_not_end_it(database: Database) -> None:
    # A server that took over publishes the commands in flight again under their ids;
    # the device, still running the first copy, answers duplicate with a running original.
    _command(database, "c-1")
    ingest, events = make(database)
    running = {"original": {"status": "accepted", "code": "accepted", "message": "deploy"}}
    feed(
        ingest,
        events,
        reply("pi-1", "c-1", "accepted", T0 + 1),
        reply("pi-1", "c-1", "failed", T0 + 2, code=ReplyCode.DUPLICATE, data=running),
        reply("pi-1", "c-1", "failed", T0 + 2, code=ReplyCode.DUPLICATE, data={"x": 1}),
    )
    with database.session() as s:
        c1 = s.get(CommandRecord, "c-1")
        assert c1 is not None and (c1.status, c1.finished_at) == ("accepted", None)
    feed(ingest, events, reply("pi-1", "c-1", "done", T0 + 3))
    with database.session() as s:
        c1 = s.get(CommandRecord, "c-1")
        assert c1 is not None and (c1.status, c1.code) == ("done", "ok")


# ------------------------------------------------------ counting, retention


def test_every_event_is_counted_written_invalid_or_dropped(database: Database) -> None:
    ingest, events = make(database)
    feed(
        ingest,
        events,
        state("pi-1", T0),
        telemetry("pi-1", 1, T0),
        InvalidEvent("edge/pi-1/telemetry", "seq: required key missing", T0),
        InvalidEvent("edge/pi-1/state", "bad", T0),
        InvalidEvent("edge/pi-2/telemetry", "bad", T0),
    )
    f = ingest.figures()
    assert f["received"] == {"state": 1, "telemetry": 1, "invalid": 3}
    assert f["written"] == {"state": 1, "telemetry": 1}
    assert f["invalid"] == {"telemetry": 2, "state": 1}
    assert f["dropped"] == {} and f["held"] == 0 and f["queue_depth"] == 0
    assert f["batches"] >= 1


def test_purge_deletes_only_what_retention_no_longer_keeps(database: Database) -> None:
    ingest, events = make(database)
    day = 86400.0
    old, recent = T0 - 40 * day, T0 - 1 * day
    _command(database, "c-old")
    _command(database, "c-new")
    feed(
        ingest,
        events,
        telemetry("pi-1", 1, old),
        telemetry("pi-1", 2, recent),
        reply("pi-1", "c-old", "done", old),
        reply("pi-1", "c-new", "done", recent),
    )
    with database.session() as s:
        s.add(EventRow(ts=old, device_id="pi-1", kind="online", message=""))
        s.add(EventRow(ts=recent, device_id="pi-1", kind="online", message=""))
    retention = RetentionConfig(telemetry_days=30, commands_days=10, events_days=20)
    ingest.retention = retention
    counts = ingest.purge(T0)
    assert counts == {"telemetry_minutes": 3, "replies": 1, "commands": 1, "events": 1}
    assert count(database, TelemetryMinute) == 3
    assert count(database, CommandRecord) == 1 and count(database, EventRow) == 1
    with database.session() as s:
        assert s.get(CommandRecord, "c-new") is not None


# -------------------------------------------------------------------- faults


def test_hostile_values_are_stored_safely_or_dropped_counted(database: Database) -> None:
    ingest, events = make(database, batch_s=0.01)
    ingest.start()
    try:
        weird = Telemetry.model_validate_json(
            b'{"device": "pi-1", "seq": 1, "ts": %r, "uptime_s": NaN, "cpu_percent": Infinity,'
            b' "pipelines": {"cam": {"fps": NaN, "invoke_ms_p95": Infinity}}}' % T0
        )
        # Past the parser's checks (a bug upstream): cannot be rolled up at all.
        broken = Telemetry.model_construct(device="pi-1", seq=2, ts=T0, pipelines={"cam": "x"})
        feed(
            ingest,
            events,
            TelemetryEvent("pi-1", weird, T0),
            TelemetryEvent("pi-1", broken, T0),
            state("pi-2", float("inf")),
            reply("pi-1", "c-nul", "failed", T0, data={"ratio": float("nan")}),
            telemetry("pi-1", 3, T0 + 1),
        )
        assert ingest.running
        f = ingest.figures()
        assert f["dropped"] == {"refused_telemetry": 1, "bad_ts_state": 1}
        assert f["written"] == {"telemetry": 2, "reply": 1}
        assert sum(f["received"].values()) == 5
        with database.session() as s:
            wide = s.get(TelemetryMinute, ("pi-1", "", MINUTE))
            assert wide is not None and wide.samples == 2
            assert wide.fps_sum == pytest.approx(11.0) and wide.cpu_sum == pytest.approx(20.0)
            row = s.get(Device, "pi-1")
            assert row is not None and row.telemetry is not None
            stored = s.scalars(select(ReplyRecord)).one()
            assert stored.data == {"ratio": None}
    finally:
        ingest.stop()


def test_a_database_that_refuses_writes_loses_nothing(db_url: str) -> None:
    database = FailingDatabase(db_url)
    database.migrate()
    ingest, events = make(database, batch_s=0.01, backoff_max_s=0.2)
    ingest.start()
    try:
        database.set_failures(6)
        for seq in range(1, 201):
            events.put(telemetry(f"pi-{seq % 5}", seq, T0 + seq / 10))
        events.put(state("pi-1", T0))
        assert ingest.flush()
        assert database.refused == 6
        assert ingest.running
        f = ingest.figures()
        assert f["db_errors"] == 6 and f["dropped"] == {}
        assert f["written"] == {"telemetry": 200, "state": 1}
        assert total(database, TelemetryMinute.samples, TelemetryMinute.pipeline == "") == 200
        assert count(database, Device) == 5
    finally:
        ingest.stop()
        database.close()


def test_past_the_memory_bound_the_oldest_telemetry_is_dropped_and_counted(
    db_url: str,
) -> None:
    database = FailingDatabase(db_url, failures=10**6)
    database.migrate()
    ingest, events = make(database, max_held=5)
    events.put(state("pi-1", T0))
    for seq in range(1, 11):
        events.put(telemetry("pi-1", seq, T0 + seq))
    assert not ingest.flush(timeout=0.3)  # the database refuses: all held, bounded
    assert ingest.held == 5
    database.set_failures(0)
    assert ingest.flush()
    f = ingest.figures()
    assert f["dropped"] == {"memory_bound_telemetry": 6}
    assert f["written"] == {"state": 1, "telemetry": 4}
    with database.session() as s:
        row = s.get(Device, "pi-1")
        assert row is not None and row.telemetry is not None and row.telemetry["seq"] == 10
    database.close()


def test_stop_writes_what_it_holds(database: Database) -> None:
    ingest, events = make(database, batch_s=5.0)
    ingest.start()
    for seq in range(1, 51):
        events.put(telemetry("pi-1", seq, T0 + seq))
    started = time.monotonic()
    ingest.stop()
    assert time.monotonic() - started < 5.0  # prompt: not a full batch period
    assert ingest.figures()["written"] == {"telemetry": 50}
    assert total(database, TelemetryMinute.samples, TelemetryMinute.pipeline == "") == 50


def test_two_ingest_processes_share_one_database(db_url: str) -> None:
    """As two server processes: every retained state reaches both, telemetry is
    shared between them (one copy each) and adds into the same minute rows."""
    first, second = Database(db_url), Database(db_url)
    first.migrate()
    a, a_events = make(first, batch_s=0.01)
    b, b_events = make(second, batch_s=0.01)
    a.start()
    b.start()
    try:
        for n in range(40):
            a_events.put(state(f"pi-{n}", T0))
            b_events.put(state(f"pi-{n}", T0))
        for seq in range(400):
            (a_events if seq % 2 else b_events).put(telemetry(f"pi-{seq % 40}", seq, T0 + 1))
        assert a.flush() and b.flush()
        assert count(first, Device) == 40
        assert count(first, EventRow, EventRow.kind == "online") == 40
        assert count(first, VersionHistory) == 40
        assert total(first, TelemetryMinute.samples, TelemetryMinute.pipeline == "") == 400
        assert count(first, TelemetryMinute) == 40 * 3
        fa, fb = a.figures(), b.figures()
        assert fa["dropped"] == {} and fb["dropped"] == {}
        assert fa["stale_states"] + fb["stale_states"] == 40
    finally:
        a.stop()
        b.stop()
        first.close()
        second.close()


# ---------------------------------------------------------------- end to end


def test_a_simulated_fleet_over_mosquitto_lands_in_the_tables(
    database: Database, tmp_path: Path
) -> None:
    broker = Broker(tmp_path / "mosquitto")
    broker.start()
    console = Console(
        BrokerOptions(broker.host, broker.port, prefix="ing"), share_group="edge-fleet"
    )
    ingest = Ingest(database, console.events, retention=RetentionConfig(), batch_s=0.05)
    fleet = SimFleet(
        broker.host,
        broker.port,
        prefix="ing",
        devices=[f"sim-{i}" for i in range(6)],
        per_connection=4,
        interval_s=0.05,
        groups=["lab"],
    )
    try:
        console.connect()
        ingest.start()
        fleet.start()
        _wait(lambda: len(console.devices()) == 6, "six states")
        record = issue(database, console, "sim-3", PingCommand(id="ping-e2e"), actor="test")
        _wait(lambda: _status(database, record.id) == "done", "the ping's final reply")
        time.sleep(0.3)  # some telemetry
        fleet.stop()
        _wait(lambda: all(not v.online for v in console.devices().values()), "offline states")
        sent = fleet.sent_telemetry
        _wait(lambda: ingest.figures()["received"].get("telemetry", 0) >= sent, "all telemetry")
        assert ingest.flush()
        assert sent >= 6
        assert total(database, TelemetryMinute.samples, TelemetryMinute.pipeline == "") == sent
        assert count(database, Device) == 6
        assert count(database, Device, Device.online.is_(False), Device.status == "offline") == 6
        assert count(database, DeviceGroup, DeviceGroup.group == "lab") == 6
        assert count(database, ReplyRecord, ReplyRecord.command_id == "ping-e2e") == 2
        assert count(database, EventRow, EventRow.kind == "online") == 6
        assert count(database, EventRow, EventRow.kind == "offline") == 6
        f = ingest.figures()
        assert f["dropped"] == {} and f["invalid"] == {}
        assert f["written"]["telemetry"] == sent
    finally:
        fleet.stop()
        ingest.stop()
        console.close()
        broker.stop()


def _status(database: Database, cid: str) -> str | None:
    with database.session() as s:
        row = s.get(CommandRecord, cid)
        return row.status if row else None


def _wait(predicate: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
