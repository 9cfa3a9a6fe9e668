"""The protocol over a real broker."""

from __future__ import annotations

from agent import protocol as p
from tests.mqtt_support import Broker, MessageCollector, publish


def test_command_travels_through_the_broker_and_parses_back(broker: Broker) -> None:
    topics = p.Topics()
    sent = p.DeployCommand(
        id="deploy-1",
        manifest={"name": "digits", "version": "3"},
        artifact=p.MqttArtifact(transfer_id="t-1", chunk_size=1024, chunks=4),
        expires_at=4e9,
    )
    collector = MessageCollector(broker, topics.cmd("pi-7"))
    try:
        publish(broker, topics.cmd("pi-7"), sent.to_bytes())
        (msg,) = collector.wait_for(1)
    finally:
        collector.close()
    assert msg.topic == "edge/pi-7/cmd"
    assert msg.qos == 1
    assert p.decode_command(msg.payload) == sent


def test_retained_state_reaches_a_late_subscriber(broker: Broker) -> None:
    topics = p.Topics("test-retained")
    state = p.State(device="pi-8", online=False, agent_version="0.1.0", since=1.0, ts=2.0)
    publish(broker, topics.state("pi-8"), state.to_bytes(), retain=True)
    collector = MessageCollector(broker, topics.all_states())
    try:
        (msg,) = collector.wait_for(1)
    finally:
        collector.close()
    assert msg.retain
    assert p.State.model_validate_json(msg.payload) == state


def test_private_broker_restarts_on_the_same_port(private_broker: Broker) -> None:
    port = private_broker.port
    private_broker.stop()
    assert not private_broker.running
    private_broker.start()
    assert private_broker.port == port
    collector = MessageCollector(private_broker, "edge/+/telemetry")
    try:
        publish(private_broker, "edge/pi-9/telemetry", b"{}", qos=0)
        assert collector.wait_for(1)[0].payload == b"{}"
    finally:
        collector.close()
