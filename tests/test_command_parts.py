"""The command plane's small parts: progress throttling, lanes, reply routes, the record."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from agent import protocol as p
from agent.link import progress as progress_module
from agent.link.command_record import CommandRecord, RecordError, Route
from agent.link.lanes import Lane
from agent.link.progress import ProgressReporter
from agent.link.reply_routes import ReplyRoutes, topic_matches


def test_progress_is_throttled_within_a_stage_but_never_across_stages() -> None:
    now = [0.0]
    sent: list[tuple[str, float | None]] = []
    report = ProgressReporter(lambda s, pct: sent.append((s, pct)), 0.5, lambda: now[0])
    report("downloading", 1.0)
    report("downloading", 2.0)  # too soon
    now[0] = 1.0
    report("downloading", 2.0)
    report("downloading", 2.0)  # same percent
    report("downloading", 100.0)  # always
    report("validating", None)  # a new stage, always
    report("validating", float("nan"))
    now[0] = 2.0
    report("validating", 250.0)
    assert sent == [
        ("downloading", 1.0), ("downloading", 2.0), ("downloading", 100.0),
        ("validating", None), ("validating", 100.0),
    ]  # fmt: skip


def test_progress_calls_the_fault_seam_on_every_report(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, float | None]] = []
    monkeypatch.setattr(progress_module.faults, "at_stage", lambda s, pct: seen.append((s, pct)))
    report = ProgressReporter(lambda s, pct: None)
    report("downloading", 1.0)
    report("downloading", 1.5)  # throttled, but the seam still sees it
    assert seen == [("downloading", 1.0), ("downloading", 1.5)]


def test_a_lane_runs_jobs_in_order_and_refuses_past_its_bound() -> None:
    lane = Lane("test-lane", max_pending=2)
    lane.start()
    gate, started, finished = threading.Event(), threading.Event(), threading.Event()
    ran: list[int] = []

    def first() -> None:
        started.set()
        gate.wait(10)

    assert lane.submit(first) and started.wait(10)
    assert lane.submit(lambda: ran.append(1)) and lane.submit(lambda: ran.append(2))
    assert not lane.submit(lambda: ran.append(3))  # two already wait
    assert lane.submit(finished.set) is False
    gate.set()
    for _ in range(200):
        if ran == [1, 2]:
            break
        finished.wait(0.05)
    assert ran == [1, 2]
    assert lane.stop(timeout=10) and not lane.alive
    assert not lane.submit(lambda: ran.append(4))  # a stopped lane takes nothing


def test_a_failing_job_does_not_end_the_lane() -> None:
    lane = Lane("test-lane-2", max_pending=4)
    lane.start()
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("bug in a job")

    assert lane.submit(boom) and lane.submit(done.set)
    assert done.wait(10) and lane.alive
    assert lane.stop(timeout=10)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("edge/replies/#", "edge/replies/a", True),
        ("edge/replies/#", "edge/replies/a/b", True),
        ("edge/replies/#", "edge/replies", True),
        ("edge/+/reply", "edge/pi-1/reply", True),
        ("edge/+/reply", "edge/pi-1/state", False),
        ("edge/replies/x", "edge/replies/x/y", False),
        ("#", "$SYS/broker", False),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


def test_reply_routes_fall_back_to_the_device_reply_topic() -> None:
    routes = ReplyRoutes(p.Topics("site/a"), "pi-1")
    assert routes.route("site/a/replies/c1", b"k") == Route("site/a/replies/c1", b"k")
    assert routes.route("site/a/pi-1/state", b"k") == Route("site/a/pi-1/reply", b"k")
    assert routes.route("x" * 600, None).topic == "site/a/pi-1/reply"
    assert routes.route(None, None).topic == "site/a/pi-1/reply"


def test_the_record_adds_route_columns_to_an_old_file(tmp_path: Path) -> None:
    path = tmp_path / "commands.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE recent (id TEXT PRIMARY KEY, status TEXT NOT NULL, code TEXT NOT NULL, "
        "message TEXT NOT NULL, data TEXT, ts REAL NOT NULL)"
    )
    db.execute(
        "INSERT INTO recent VALUES ('old-1', 'accepted', 'accepted', 'interrupted', NULL, 1)"
    )
    db.commit()
    db.close()
    record = CommandRecord(path)
    record.open()
    try:
        [old] = record.unfinished()
        assert (old.command_id, old.route) == ("old-1", None)
        record.accept("new-1", "deploy", Route("edge/replies/c", b"\x00\xff"))
        routes = [u.route for u in record.unfinished()]
        assert routes == [None, Route("edge/replies/c", b"\x00\xff")]
        record.record("new-1", "done", p.ReplyCode.OK, "", {"x": 1})
        done = record.get("new-1")
        assert done == {"status": "done", "code": "ok", "message": "", "data": {"x": 1}}
    finally:
        record.close()
    with pytest.raises(RecordError):
        record.record("new-2", "done", p.ReplyCode.OK)


def test_progress_carries_a_stages_figures_and_reports_when_they_change() -> None:
    now = [0.0]
    sent: list[tuple[Any, ...]] = []
    report = ProgressReporter(lambda *args: sent.append(args), 0.5, lambda: now[0])
    report("shadow", 0.0, {"frames": 0, "agreement": None})
    now[0] = 1.0
    report("shadow", 0.0, {"frames": 0, "agreement": None})  # nothing new
    report("shadow", 0.0, {"frames": 3, "agreement": 1.0})  # the figures moved
    report("swapping", None)  # without data: the two-argument call, as before
    assert sent == [
        ("shadow", 0.0, {"frames": 0, "agreement": None}),
        ("shadow", 0.0, {"frames": 3, "agreement": 1.0}),
        ("swapping", None),
    ]
