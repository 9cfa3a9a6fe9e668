"""The outbox: order, seq, PUBACK, bounds, and nothing lost uncounted through a failed
commit, a full database, a full filesystem (tmpfs), a stop and a SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import protocol as p
from agent.link.client import MqttLink
from agent.link.outbox import Outbox
from tests.link_support import FakeLink, SessionCollector, make_config, wait_until
from tests.mqtt_support import Broker


def result(frame: int) -> p.Result:
    return p.Result(
        device="pi-1",
        pipeline="cam",
        seq=0,
        ts=1.0,
        frame=frame,
        model="m",
        version="1",
        latency_ms=1.0,
    )


def telemetry() -> p.Telemetry:
    return p.Telemetry(device="pi-1", seq=0, ts=1.0, uptime_s=1.0)


def seqs(link: FakeLink) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in link.published]


def test_seq_continues_across_restarts_and_rows_leave_only_after_puback(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    link = FakeLink(auto_ack=False)
    outbox = Outbox(config, link)
    outbox.start()
    for i in range(5):
        outbox.enqueue_result(result(i))
    link.wait_for(lambda pub: len(pub) == 5)
    assert seqs(link) == [0, 1, 2, 3, 4]
    assert link.published[0].topic == "edge/pi-1/results/cam"
    assert link.published[0].qos == 1
    for m in link.published[:2]:
        assert m.on_ack is not None
        m.on_ack(True)
    wait_until(lambda: outbox.stats()["depth"] == 3, what="two rows deleted")
    outbox.stop()

    # Unacknowledged rows survive; new ones continue the seq.
    link2 = FakeLink()
    again = Outbox(config, link2)
    again.start()
    again.enqueue_telemetry(telemetry())
    link2.wait_for(lambda pub: len(pub) == 4)
    assert seqs(link2) == [2, 3, 4, 5]
    assert 0 <= json.loads(link2.published[3].payload)["outbox_depth"] <= 3
    wait_until(lambda: again.stats()["depth"] == 0, what="drained")
    assert again.stats()["published"] == 6  # counted across the restart
    again.stop()


def test_a_row_acknowledged_twice_at_once_counts_once_and_the_outbox_goes_on(
    tmp_path: Path,
) -> None:
    """A message sent again after an overdue PUBACK can be acknowledged twice (the
    original and the copy); when both acks arrive together the outbox must not fail."""
    link = FakeLink(auto_ack=False)
    outbox = Outbox(make_config(tmp_path), link)
    outbox.start()
    try:
        outbox.enqueue_result(result(1))
        link.wait_for(lambda pub: len(pub) == 1)
        ack = link.published[0].on_ack
        assert ack is not None
        ack(True)
        ack(True)  # within the outbox's batching window: the same batch
        wait_until(lambda: outbox.stats()["depth"] == 0, what="the row deleted")
        outbox.enqueue_result(result(2))
        link.wait_for(lambda pub: len(pub) == 2)
        second = link.published[1].on_ack
        assert second is not None
        second(True)
        wait_until(lambda: outbox.stats()["depth"] == 0, what="the next row deleted")
        assert outbox.stats()["published"] == 2
    finally:
        outbox.stop()


def test_nothing_is_sent_while_disconnected_and_order_is_kept_after(tmp_path: Path) -> None:
    link = FakeLink(connected=False)
    outbox = Outbox(make_config(tmp_path), link)
    outbox.start()
    try:
        for i in range(50):
            outbox.enqueue_result(result(i))
        wait_until(lambda: outbox.depth == 50, what="50 queued")
        assert link.published == []
        link.set_connected(True)
        link.wait_for(lambda pub: len(pub) == 50)
        assert seqs(link) == list(range(50))
    finally:
        outbox.stop()


def test_bounds_drop_oldest_telemetry_first_then_oldest_results(tmp_path: Path) -> None:
    link = FakeLink(connected=False)
    config = make_config(tmp_path, outbox={"max_messages": 10})
    outbox = Outbox(config, link)
    outbox.start()
    try:
        for i in range(6):
            outbox.enqueue_telemetry(telemetry())
            outbox.enqueue_result(result(i))
        for i in range(6, 10):
            outbox.enqueue_result(result(i))
        wait_until(lambda: outbox.stats()["next_seq"] == 16, what="all written")
        stats = outbox.stats()
        assert stats["depth"] == 10
        assert stats["dropped"]["telemetry"] == 6
        assert stats["dropped"]["results"] == 0
        for i in range(10, 13):
            outbox.enqueue_result(result(i))
        wait_until(lambda: outbox.stats()["next_seq"] == 19, what="3 more written")
        assert outbox.stats()["dropped"]["results"] == 3
        link.set_connected(True)
        link.wait_for(lambda pub: len(pub) == 10)
        frames = [json.loads(m.payload)["frame"] for m in link.published]
        assert frames == list(range(3, 13))
    finally:
        outbox.stop()


def test_old_messages_are_dropped_by_age(tmp_path: Path) -> None:
    now = [1000.0]
    link = FakeLink(connected=False)
    outbox = Outbox(make_config(tmp_path, outbox={"max_age_s": 60}), link, clock=lambda: now[0])
    outbox.start()
    outbox.enqueue_result(result(1))
    wait_until(lambda: outbox.depth == 1, what="queued")
    outbox.stop()
    now[0] += 120
    again = Outbox(make_config(tmp_path, outbox={"max_age_s": 60}), link, clock=lambda: now[0])
    again.start()
    try:
        wait_until(lambda: again.stats()["dropped"]["results"] == 1, what="aged out")
        assert again.depth == 0
    finally:
        again.stop()


# ------------------------------------------------------------- nothing lost uncounted


def assert_invariant(stats: dict[str, Any]) -> None:
    counted = stats["delivered"] + sum(stats["dropped"].values()) + stats["queued"]
    assert counted == stats["accepted"], stats


class Disk:
    """The outbox's write seam: the real SQLite connection, whose COMMITs can be made
    to fail and whose database can be capped (``PRAGMA max_page_count``: a genuinely
    full database, SQLITE_FULL). Changes apply at the writer's next transaction, on
    the writer's own thread."""

    def __init__(self) -> None:
        self.fail_commits = False
        self.fail_inserts = False
        self.max_pages: int | None = None
        self.failed_commits = 0
        self.full_errors = 0
        self.commits = 0

    def connect(self, path: Path) -> sqlite3.Connection:
        disk = self

        class Connection(sqlite3.Connection):
            def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
                if sql == "BEGIN" and disk.max_pages is not None:
                    super().execute(f"PRAGMA max_page_count={disk.max_pages}")
                if sql == "COMMIT" and disk.fail_commits:
                    disk.failed_commits += 1
                    raise sqlite3.OperationalError("database or disk is full")
                try:
                    cursor = super().execute(sql, *args)
                except sqlite3.OperationalError as exc:
                    disk.full_errors += "full" in str(exc)
                    raise
                disk.commits += sql == "COMMIT"
                return cursor

            def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:  # type: ignore[override]
                if disk.fail_inserts and sql.startswith("INSERT INTO messages"):
                    disk.full_errors += 1
                    raise sqlite3.OperationalError("database or disk is full")
                try:
                    return super().executemany(sql, rows)
                except sqlite3.OperationalError as exc:
                    disk.full_errors += "full" in str(exc)
                    raise

        return sqlite3.connect(path, isolation_level=None, factory=Connection)


def big_result(frame: int) -> p.Result:
    """About 1.5 KB on the wire, so that a small database fills quickly."""
    raw = [p.RawTensor(shape=[150], values=[0.123456] * 150)]
    return result(frame).model_copy(update={"raw": raw})


def test_a_failed_commit_loses_nothing_and_gives_out_no_seq(tmp_path: Path) -> None:
    """Today's bug: the COMMIT failed after seqs were given out and the batch was gone,
    uncounted. Now the batch stays in memory and is written when the disk is back."""
    disk = Disk()
    link = FakeLink(connected=False)
    outbox = Outbox(make_config(tmp_path), link, connect=disk.connect)
    outbox.start()
    try:
        disk.fail_commits = True
        accepted = sum(outbox.enqueue_result(result(i)) for i in range(100))
        assert accepted == 100
        wait_until(lambda: disk.failed_commits >= 1, what="a commit failing")
        disk.fail_commits = False
        accepted += outbox.enqueue_result(result(100))  # then one more, after the disk is back
        link.set_connected(True)
        link.wait_for(lambda pub: any(json.loads(m.payload)["frame"] == 100 for m in pub), 20)
        # In order, nothing missing, no seq lost or given twice.
        assert [json.loads(m.payload)["frame"] for m in link.published] == list(range(101))
        assert seqs(link) == list(range(101))
        wait_until(lambda: outbox.stats()["queued"] == 0, what="all acknowledged")
        stats = outbox.stats()
        assert stats["accepted"] == stats["delivered"] == accepted == 101
        assert stats["write_errors"] >= 1
        assert_invariant(stats)
    finally:
        outbox.stop()


def test_a_full_database_loses_nothing_uncounted(tmp_path: Path) -> None:
    """A genuine SQLITE_FULL (the database capped by max_page_count) while the broker is
    away: every accepted result arrives once room is back, or is counted as dropped."""
    disk = Disk()
    disk.max_pages = 40  # 160 KB: about a hundred of these results
    link = FakeLink(connected=False)
    outbox = Outbox(make_config(tmp_path), link, connect=disk.connect)
    outbox.start()
    try:
        accepted = 0
        for i in range(3000):
            accepted += outbox.enqueue_result(big_result(i))
        wait_until(lambda: outbox.depth > 0, timeout=20, what="what fits written")
        full = disk.full_errors
        wait_until(lambda: disk.full_errors >= full + 2, timeout=20, what="the database full")
        assert 0 < outbox.depth < accepted
        disk.max_pages = 1_000_000  # room again (an operator cleaned up)
        link.set_connected(True)
        link.wait_for(lambda pub: len({json.loads(m.payload)["seq"] for m in pub}) >= 3000, 60)
        wait_until(lambda: outbox.stats()["queued"] == 0, timeout=30, what="all acknowledged")
        stats = outbox.stats()
        got = {json.loads(m.payload)["seq"] for m in link.published}
        frames = {json.loads(m.payload)["frame"] for m in link.published}
        assert accepted == 3000
        assert len(got) + sum(stats["dropped"].values()) == accepted
        assert got == set(range(3000)) and frames == set(range(3000))
        assert stats["accepted"] == accepted
        assert_invariant(stats)
    finally:
        outbox.stop()


def test_stop_persists_the_whole_backlog(tmp_path: Path) -> None:
    """Today's bug: stop() wrote at most one batch of 2000; 14,001 of 20,000 were lost."""
    config = make_config(tmp_path)
    outbox = Outbox(config, FakeLink(connected=False))
    accepted = sum(outbox.enqueue_result(result(i)) for i in range(20_000))
    outbox.start()
    outbox.stop()
    assert accepted == 20_000
    again = Outbox(config, FakeLink(connected=False))
    again.start()
    try:
        stats = again.stats()
        assert stats["depth"] == accepted
        assert stats["on_disk"] == accepted and stats["next_seq"] == accepted
        assert stats["accepted"] == accepted
        assert_invariant(stats)
    finally:
        again.stop()


def test_a_message_handed_over_after_stop_is_refused_not_lost(tmp_path: Path) -> None:
    outbox = Outbox(make_config(tmp_path), FakeLink(connected=False))
    outbox.start()
    outbox.enqueue_result(result(1))
    outbox.stop()
    assert outbox.enqueue_result(result(2)) is False
    stats = outbox.stats()
    assert (stats["accepted"], stats["on_disk"], stats["refused"]) == (1, 1, 1)
    assert_invariant(stats)


@pytest.mark.parametrize("failing", ["inserts", "every commit"])
def test_what_a_stop_cannot_write_in_time_is_counted(tmp_path: Path, failing: str) -> None:
    """Writes keep failing through the stop: stop() returns within its timeout and
    counts the backlog as dropped (write_failed). A full database still takes the
    counters (existing rows change), so the next start agrees; when not even that can
    be written, the next start is consistent with the last counters that were."""
    disk = Disk()
    config = make_config(tmp_path)
    outbox = Outbox(config, FakeLink(connected=False), connect=disk.connect)
    outbox.start()
    outbox.enqueue_result(result(0))
    wait_until(lambda: outbox.depth == 1, what="one row written")
    disk.fail_inserts = True
    disk.fail_commits = failing == "every commit"
    for i in range(1, 501):
        outbox.enqueue_result(result(i))
    wait_until(lambda: disk.full_errors + disk.failed_commits >= 1, what="a write failed")
    outbox.stop(timeout=2.0)
    stats = outbox.stats()
    assert stats["dropped"]["write_failed"] == 500
    assert (stats["accepted"], stats["on_disk"], stats["queued"]) == (501, 1, 1)
    assert_invariant(stats)

    again = Outbox(config, FakeLink(connected=False))
    again.start()
    try:
        after = again.stats()
        assert after["on_disk"] == 1
        if failing == "inserts":
            assert after["accepted"] == 501 and after["dropped"]["write_failed"] == 500
        else:
            assert after["accepted"] == 1  # the documented limit: nothing could be written
        assert_invariant(after)
    finally:
        again.stop()


def test_the_outbox_full_warning_is_logged_once_with_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Today's bug: two lines per drop (one saying 0 telemetry were dropped)."""
    outbox = Outbox(make_config(tmp_path, outbox={"max_messages": 5}), FakeLink(connected=False))
    outbox.start()
    try:
        with caplog.at_level(logging.WARNING, logger="agent.link.outbox"):
            for i in range(30):
                outbox.enqueue_result(result(i))
                wait_until(lambda i=i: outbox.stats()["next_seq"] == i + 1, what="written")
        stats = outbox.stats()
        assert stats["dropped"]["results"] == 25
        full = [r.getMessage() for r in caplog.records if "outbox full" in r.getMessage()]
        assert len(full) == 1, full
        assert "0 oldest" not in full[0]
        assert_invariant(stats)
    finally:
        outbox.stop()


# ------------------------------------------------------- a real filesystem filling up


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs: a filesystem that really fills (ENOSPC), not a simulated one."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_filesystem_and_a_stop_lose_nothing_uncounted(small_tmpfs: Path) -> None:
    state = small_tmpfs / "state"
    config = make_config(state)
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * 1_200_000)  # leaves the outbox about 800 KB
    outbox = Outbox(config, FakeLink(connected=False))
    outbox.start()
    accepted = 0
    for i in range(2000):  # about 3 MB of results: more than the filesystem holds
        accepted += outbox.enqueue_result(big_result(i))
    wait_until(
        lambda: outbox.stats()["write_errors"] >= 2, timeout=30, what="writes failing (ENOSPC)"
    )
    assert outbox.stats()["on_disk"] < accepted
    outbox.stop(timeout=3.0)  # the disk is still full: what is left is counted
    stopped = outbox.stats()
    assert stopped["dropped"]["write_failed"] > 0
    assert_invariant(stopped)

    filler.unlink()  # room again
    link = FakeLink(connected=True)
    again = Outbox(config, link)
    again.start()
    try:
        wait_until(lambda: again.stats()["queued"] == 0, timeout=30, what="backlog sent")
        stats = again.stats()
        got = {json.loads(m.payload)["seq"] for m in link.published}
        assert stats["accepted"] == accepted
        assert len(got) == stats["delivered"] == stopped["on_disk"]
        assert got == set(range(len(got)))  # seqs contiguous: none given to a lost write
        assert len(got) + sum(stats["dropped"].values()) == accepted
        assert_invariant(stats)
    finally:
        again.stop()


def test_telemetry_and_metrics_carry_the_counters_and_they_add_up(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from agent.ops.metrics import MetricsExporter
    from agent.ops.telemetry import DeviceSampler, TelemetryReporter

    link = FakeLink(connected=False)
    outbox = Outbox(make_config(tmp_path, outbox={"max_messages": 5}), link)
    outbox.start()
    try:
        for i in range(8):
            outbox.enqueue_result(result(i))
        wait_until(lambda: outbox.stats()["next_seq"] == 8, what="all written")
        link.set_connected(True)
        outbox.enqueue_result(result(8))
        wait_until(lambda: outbox.stats()["queued"] == 0, what="all sent")
        reporter = TelemetryReporter(
            "pi-1",
            DeviceSampler(tmp_path, thermal_glob=str(tmp_path / "none")),
            lambda now: {},
            outbox.stats,
        )
        t = reporter.build()
        assert t.outbox_accepted == 9 and t.outbox_dropped >= 3  # over max_messages
        assert t.outbox_dropped == outbox.stats()["dropped"]["results"]
        assert t.outbox_delivered + t.outbox_dropped + t.outbox_depth == t.outbox_accepted
        assert t.outbox_refused == 0

        body, _ = MetricsExporter(reporter.build, outbox.stats).render()
        found = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }
        dropped = {
            dict(labels)["kind"]: v
            for (name, labels), v in found.items()
            if name == "edge_agent_outbox_dropped_total"
        }
        assert dropped == {
            "results": t.outbox_dropped, "telemetry": 0, "write_failed": 0, "unclean_stop": 0
        }  # fmt: skip
        accepted = found[("edge_agent_outbox_accepted_total", ())]
        published = found[("edge_agent_outbox_published_total", ())]
        depth = found[("edge_agent_outbox_depth", ())]
        assert accepted == published + sum(dropped.values()) + depth == 9
        assert found[("edge_agent_outbox_refused_total", ())] == 0
    finally:
        outbox.stop()


# ----------------------------------------------------------------------- SIGKILL


def test_a_sigkill_with_rows_unacknowledged_and_the_intake_full_loses_nothing_uncounted(
    private_broker: Broker, tmp_path: Path
) -> None:
    """A real Outbox and MqttLink in a child process (tests/outbox_crash_child.py):
    50 results delivered, the broker stopped, 200 on disk unacknowledged, the writer
    held by a slow disk with the intake full, then SIGKILL. Restarted with the broker
    back, every seq the outbox gave out arrives at a QoS 1 subscriber (deduplicated by
    seq) and every accepted message without one is counted (unclean_stop)."""
    collector = SessionCollector(private_broker, ["edge/pi-1/results/cam"])
    state = tmp_path / "state"
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.outbox_crash_child", str(state),
         private_broker.host, str(private_broker.port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )  # fmt: skip
    try:
        assert child.stdin is not None and child.stdout is not None
        delivered = json.loads(child.stdout.readline())
        assert delivered == {"phase": "delivered", "accepted": 50}
        private_broker.stop()
        child.stdin.write("broker-stopped\n")
        child.stdin.flush()
        ready = json.loads(child.stdout.readline())
        assert ready["phase"] == "ready", ready
        before = ready["stats"]
        assert before["in_memory"] > 1000 and ready["refused"] >= 1  # the intake full
        assert before["on_disk"] > 200 and before["delivered"] == 50
        child.send_signal(signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait(10)

    private_broker.start()
    config = make_config(state, private_broker)
    link = MqttLink(config)
    outbox = Outbox(config, link)
    outbox.start()
    link.start()
    try:
        after = outbox.stats()
        accepted = ready["accepted"]
        assert after["accepted"] == accepted
        assert after["refused"] == ready["refused"]  # counted, though never accepted
        assert after["on_disk"] == before["on_disk"]
        assert after["dropped"]["unclean_stop"] == before["in_memory"]
        assert_invariant(after)
        assert link.wait_connected(20), link.last_error
        wait_until(lambda: outbox.stats()["queued"] == 0, timeout=60, what="backlog sent")
        given = after["next_seq"]
        collector.wait_until(
            lambda msgs: len({json.loads(m.payload)["seq"] for m in msgs}) >= given, timeout=60
        )
        got = {json.loads(m.payload)["seq"] for m in collector.messages}
        assert got == set(range(given))  # every seq given out arrived; none twice given
        final = outbox.stats()
        assert final["delivered"] == given
        assert final["delivered"] + final["dropped"]["unclean_stop"] == accepted
        assert_invariant(final)
    finally:
        outbox.stop()
        link.stop()
        collector.close()
