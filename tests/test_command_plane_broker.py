"""The command plane against a real Mosquitto: packet limit, will, interrupted commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent import protocol as p
from agent.config import AgentConfig
from agent.link.client import MqttLink, max_incoming_packet_bytes
from agent.link.command_record import CommandRecord, Route
from agent.link.commands import INTERRUPTED_MESSAGE, CommandDispatcher
from agent.link.transfer import ArtifactFetcher
from tests.link_support import FakeTarget, SessionCollector, make_config, wait_until
from tests.mqtt_support import Broker, MessageCollector, publish

CMD = "edge/pi-1/cmd"
REPLY = "edge/pi-1/reply"


class LinkedPlane:
    """A real link and a dispatcher with a fake target."""

    def __init__(self, config: AgentConfig) -> None:
        self.link = MqttLink(config)
        self.fetcher = ArtifactFetcher(config, self.link)
        self.dispatcher = CommandDispatcher(config, self.link, FakeTarget(), self.fetcher)

    def start(self) -> LinkedPlane:
        self.dispatcher.start()
        self.link.start()
        assert self.link.wait_connected(10), self.link.last_error
        return self

    def stop(self) -> None:
        self.fetcher.stop()
        self.dispatcher.stop()
        self.link.stop()


def test_maximum_packet_size_covers_the_largest_chunk_and_command() -> None:
    limit = max_incoming_packet_bytes()
    assert limit >= p.max_chunk_message_bytes(p.MAX_COMMAND_BYTES) > p.MAX_COMMAND_BYTES
    assert limit < 1024 * 1024


def test_a_publish_over_the_packet_limit_never_reaches_the_agent(
    broker: Broker, tmp_path: Path
) -> None:
    plane = LinkedPlane(make_config(tmp_path / "state", broker)).start()
    replies = MessageCollector(broker, REPLY)
    try:
        publish(broker, CMD, b"x" * (4 * max_incoming_packet_bytes()))
        # Under the packet limit but over the command limit: it arrives, and is refused.
        publish(broker, CMD, b"y" * (p.MAX_COMMAND_BYTES + 1))
        publish(broker, CMD, json.dumps({"id": "after-big", "op": "ping"}).encode())
        wait_until(
            lambda: any(
                json.loads(m.payload)["status"] == "done" for m in replies.wait_for(2, timeout=20)
            ),
            timeout=20,
            what="ping answered after the oversized publishes",
        )
        # Only the second reached the dispatcher (messages on one topic keep their order).
        assert plane.dispatcher.refused == {"too_large": 1}
        assert plane.link.connected and plane.link.connects == 1
    finally:
        replies.close()
        plane.stop()


def test_the_will_carries_the_time_of_the_latest_connect(
    private_broker: Broker, tmp_path: Path
) -> None:
    link = MqttLink(make_config(tmp_path / "state", private_broker))
    link.start()
    try:
        assert link.wait_connected(10)
        first = json.loads(bytes(link._client.will_payload or b""))  # type: ignore[union-attr]
        assert first["online"] is False
        time.sleep(0.05)  # so the next connect's clock reading differs
        private_broker.stop()
        private_broker.start()
        wait_until(lambda: link.connects == 2, timeout=30, what="reconnect")
        again = json.loads(bytes(link._client.will_payload or b""))  # type: ignore[union-attr]
        assert again["ts"] > first["ts"]
        assert again["since"] == first["since"]
    finally:
        link.stop()


def test_a_command_interrupted_by_a_restart_gets_its_final_reply_over_the_broker(
    broker: Broker, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    record = CommandRecord(state / "commands.sqlite3")
    record.open()
    record.accept("dep-int", "deploy", Route("edge/replies/console-int", b"corr-int"))
    record.close()
    console = SessionCollector(broker, ["edge/replies/console-int"])
    plane = LinkedPlane(make_config(state, broker))
    plane.dispatcher.start()
    plane.link.start()  # the dispatcher is up before the link, as in the service
    try:
        console.wait_until(lambda msgs: len(msgs) >= 1)
        reply = json.loads(console.messages[0].payload)
        assert (reply["id"], reply["status"], reply["code"]) == ("dep-int", "failed", "interrupted")
        assert reply["message"] == INTERRUPTED_MESSAGE
        assert console.correlations[0] == b"corr-int"
        # Marked answered once the broker acknowledged it (read beside the agent's own).
        record.open()
        wait_until(lambda: record.unfinished() == [], timeout=20, what="record updated")
        answered = record.get("dep-int")
        assert answered is not None and answered["code"] == "interrupted"
    finally:
        record.close()
        plane.stop()
        console.close()
