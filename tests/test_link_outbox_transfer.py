"""Outbox and artifact transfer over the in-memory link; HTTP against a real local server."""

from __future__ import annotations

import json
from pathlib import Path

from agent import protocol as p
from agent.link.outbox import Outbox
from tests.link_support import FakeLink, make_config, wait_until


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
