"""The console's MQTT client on a real broker: the fleet view and bad messages."""

from __future__ import annotations

import queue
import time
import uuid

from agent.protocol import State, Telemetry, Topics
from fleet.console import BrokerOptions, Console, Event, InvalidEvent, StateEvent, TelemetryEvent
from tests.mqtt_support import Broker, publish


def next_event(console: Console, kind: type[Event], timeout: float = 5.0) -> Event:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            event = console.events.get(timeout=0.2)
        except queue.Empty:
            continue
        if isinstance(event, kind):
            return event
    raise AssertionError(f"no {kind.__name__} within {timeout}s")


def test_view_follows_states_and_telemetry_and_reports_bad_messages(broker: Broker) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    state = State(device="pi-1", online=True, agent_version="1", groups=["g"], since=1.0, ts=2.0)
    publish(broker, topics.state("pi-1"), state.to_bytes(), retain=True)
    console = Console(BrokerOptions(host=broker.host, port=broker.port, prefix=prefix))
    console.connect()
    try:
        console.wait_for_retained()
        assert console.view("pi-1").state == state and console.view("pi-1").online

        telemetry = Telemetry(device="pi-1", seq=1, ts=5.0, uptime_s=3.0, outbox_depth=7)
        console.publish(topics.telemetry("pi-1"), telemetry.to_bytes(), qos=0)
        assert next_event(console, TelemetryEvent).telemetry == telemetry  # type: ignore[union-attr]
        assert console.view("pi-1").telemetry == telemetry
        assert console.view("pi-1").last_seen == 5.0

        console.publish(topics.state("pi-1"), b'{"device": "pi-1", "onlin": true}')
        bad = next_event(console, InvalidEvent)
        assert isinstance(bad, InvalidEvent) and bad.topic == topics.state("pi-1")
        assert "onlin: unknown key" in bad.problem
        other = state.model_copy(update={"device": "pi-2"})
        console.publish(topics.state("pi-1"), other.to_bytes())
        bad = next_event(console, InvalidEvent)
        assert isinstance(bad, InvalidEvent) and "'pi-2'" in bad.problem
        # The view keeps the last good state.
        assert console.view("pi-1").state == state

        offline = state.model_copy(update={"online": False, "ts": 9.0})
        console.publish(topics.state("pi-1"), offline.to_bytes())
        assert next_event(console, StateEvent).state == offline  # type: ignore[union-attr]
        assert not console.view("pi-1").online
    finally:
        console.close()
