"""The link against real Mosquitto brokers: outages, restarts, offline commands, TLS, fuzzing."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import protocol as p
from agent.config import AgentConfig
from agent.link.client import MqttLink
from agent.link.commands import CommandDispatcher
from agent.link.outbox import Outbox
from agent.link.transfer import ArtifactFetcher
from tests.link_support import (
    FakeTarget,
    SessionCollector,
    make_config,
    make_pki,
    model_manifest,
    wait_until,
)
from tests.mqtt_support import Broker, MessageCollector, publish

RESULTS = "edge/pi-1/results/cam"
REPLY = "edge/pi-1/reply"


class Agent:
    """The link's parts wired together, as the service will do it."""

    def __init__(self, config: AgentConfig, target: FakeTarget | None = None) -> None:
        self.config = config
        self.link = MqttLink(config)
        self.outbox = Outbox(config, self.link)
        self.target = target or FakeTarget()
        self.fetcher = ArtifactFetcher(config, self.link)
        self.dispatcher = CommandDispatcher(
            config, self.link, self.target, self.fetcher, state_changed=self.link.publish_state
        )

    def start(self, wait: bool = True) -> Agent:
        self.outbox.start()
        self.dispatcher.start()
        self.link.start()
        if wait:
            assert self.link.wait_connected(10), self.link.last_error
        return self

    def stop(self) -> None:
        self.fetcher.stop()
        self.dispatcher.stop()
        self.outbox.stop()
        self.link.stop()


def result(frame: int) -> p.Result:
    return p.Result(
        device="pi-1", pipeline="cam", seq=0, ts=1.0, frame=frame, model="m", version="1",
        latency_ms=1.0,
    )  # fmt: skip


def distinct_seqs(collector: SessionCollector) -> set[int]:
    return {json.loads(m.payload)["seq"] for m in collector.messages if m.topic == RESULTS}


def test_state_is_retained_and_says_offline_after_a_stop(broker: Broker, tmp_path: Path) -> None:
    config = make_config(tmp_path, broker, device="pi-state", mqtt={"topic_prefix": "st"})
    agent = Agent(config).start()
    collector = MessageCollector(broker, "st/pi-state/state")
    try:
        first = p.State.model_validate_json(collector.wait_for(1)[0].payload)
        assert first.online and first.groups == ["kitchen"]
        agent.stop()
        last = p.State.model_validate_json(collector.wait_for(2)[1].payload)
        assert not last.online
    finally:
        collector.close()
        agent.stop()
    late = MessageCollector(broker, "st/pi-state/state")
    try:
        (msg,) = late.wait_for(1)
        assert msg.retain and not json.loads(msg.payload)["online"]
    finally:
        late.close()


def test_last_will_says_offline_when_the_agent_dies(broker: Broker, tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from agent.config import parse_config\n"
        "from agent.link.client import MqttLink\n"
        "import json\n"
        "link = MqttLink(parse_config(json.loads(sys.argv[1])))\n"
        "link.start()\n"
        "assert link.wait_connected(10)\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    data = {
        "device": {"id": "pi-will"},
        "state_dir": str(tmp_path),
        "models": {"require_signature": False},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive_s": 5},
    }
    collector = MessageCollector(broker, "edge/pi-will/state")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(data)], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
        assert json.loads(collector.wait_for(1)[0].payload)["online"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        assert not json.loads(collector.wait_for(2, timeout=15)[1].payload)["online"]
    finally:
        proc.kill()
        collector.close()


def test_results_survive_a_broker_restart(private_broker: Broker, tmp_path: Path) -> None:
    collector = SessionCollector(private_broker, [RESULTS])
    agent = Agent(make_config(tmp_path, private_broker)).start()
    produced = 0
    stop = threading.Event()

    def produce() -> None:
        nonlocal produced
        while not stop.is_set():
            agent.outbox.enqueue_result(result(produced))
            produced += 1
            time.sleep(0.002)

    producer = threading.Thread(target=produce, name="test-producer")
    producer.start()
    try:
        wait_until(lambda: len(distinct_seqs(collector)) > 100, what="results flowing")
        private_broker.stop()
        time.sleep(1.0)
        private_broker.start()
        assert agent.link.wait_connected(15), agent.link.last_error
        time.sleep(0.5)
        stop.set()
        producer.join()
        collector.wait_until(lambda _m: len(distinct_seqs(collector)) >= produced, timeout=30)
        assert distinct_seqs(collector) == set(range(produced))
        assert sum(agent.outbox.stats()["dropped"].values()) == agent.outbox.stats()["refused"] == 0
        assert agent.link.connects >= 2
    finally:
        stop.set()
        agent.stop()
        collector.close()


def test_queue_survives_an_agent_restart_while_the_broker_is_down(
    private_broker: Broker, tmp_path: Path
) -> None:
    collector = SessionCollector(private_broker, [RESULTS])
    config = make_config(tmp_path, private_broker)
    agent = Agent(config).start()
    for i in range(10):
        agent.outbox.enqueue_result(result(i))
    collector.wait_until(lambda _m: len(distinct_seqs(collector)) == 10)
    private_broker.stop()
    wait_until(lambda: not agent.link.connected, what="disconnect noticed")
    for i in range(10, 210):
        agent.outbox.enqueue_result(result(i))
    agent.stop()  # nothing reaches the broker; all 200 are on disk
    again = Agent(config).start(wait=False)
    try:
        assert again.outbox.stats()["depth"] == 200
        private_broker.start()
        assert again.link.wait_connected(15)
        # The broker kept the collector's session across its restart, so everything the
        # outbox sends from now on is queued for it: wait for that, not for a while.
        collector.wait_until(lambda _m: len(distinct_seqs(collector)) == 210, timeout=30)
        assert distinct_seqs(collector) == set(range(210))
        wait_until(lambda: again.outbox.stats()["depth"] == 0, what="outbox drained")
    finally:
        again.stop()
        collector.close()


def test_a_command_sent_while_the_agent_was_offline_runs_on_reconnect(
    broker: Broker, tmp_path: Path
) -> None:
    config = make_config(tmp_path, broker, device="pi-off")
    Agent(config).start().stop()  # leaves a persistent session with the subscriptions
    collector = MessageCollector(broker, "edge/pi-off/reply")
    command = p.RollbackCommand(id="while-away", model="digits", expires_at=time.time() + 60)
    publish(broker, "edge/pi-off/cmd", command.to_bytes())
    agent = Agent(config).start()
    try:
        replies = [json.loads(m.payload) for m in collector.wait_for(2, topic="edge/pi-off/reply")]
        assert [(r["id"], r["status"]) for r in replies] == [
            ("while-away", "accepted"),
            ("while-away", "done"),
        ]
        assert agent.target.calls == [("rollback", "digits")]
    finally:
        agent.stop()
        collector.close()


class Console:
    """A v5 console client that sends commands with a response topic and waits for replies
    by correlation data."""

    def __init__(self, broker: Broker, reply_topic: str) -> None:
        self.reply_topic = reply_topic
        self.finals: dict[bytes, dict[str, Any]] = {}
        self._cond = threading.Condition()
        ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"console-{uuid.uuid4().hex[:6]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(reply_topic, 1)
        assert ready.wait(10)

    def _on_message(self, client, userdata, msg):  # type: ignore[no-untyped-def]
        reply = json.loads(msg.payload)
        corr = getattr(msg.properties, "CorrelationData", None)
        if reply["status"] in ("done", "failed") and corr is not None:
            with self._cond:
                self.finals[corr] = reply
                self._cond.notify_all()

    def send(self, topic: str, payload: bytes, corr: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = corr
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)

    def final(self, corr: bytes, timeout: float = 15.0) -> dict[str, Any]:
        with self._cond:
            assert self._cond.wait_for(lambda: corr in self.finals, timeout), corr
            return self.finals[corr]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def fuzz_agent(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Any:
    config = make_config(tmp_path_factory.mktemp("fuzz"), broker, device="pi-fuzz")
    agent = Agent(config).start()
    console = Console(broker, "edge/replies/fuzz")
    yield agent, console
    console.close()
    agent.stop()


_values = (
    st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.floats(allow_nan=False)
)
_payloads = (
    st.binary(max_size=300)
    | st.dictionaries(
        st.sampled_from(["id", "op", "model", "changes", "expires_at", "x"]),
        _values | st.sampled_from(p.COMMAND_OPS),
        max_size=5,
    ).map(lambda d: json.dumps(d).encode())
    | st.builds(
        lambda op, i: json.dumps({"id": i, "op": op}).encode(),
        st.sampled_from(p.COMMAND_OPS),
        st.text(max_size=8),
    )
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=_payloads)
def test_fuzzed_commands_over_the_broker_all_get_answers(fuzz_agent: Any, payload: bytes) -> None:
    agent, console = fuzz_agent
    corr = uuid.uuid4().bytes
    topic = "edge/pi-fuzz/cmd" if corr[0] % 2 else "edge/group/kitchen/cmd"
    refused_before = sum(agent.dispatcher.refused.values())
    console.send(topic, payload, corr)
    ping = uuid.uuid4().bytes
    console.send(
        "edge/pi-fuzz/cmd", json.dumps({"id": ping.hex()[:16], "op": "ping"}).encode(), ping
    )
    assert console.final(ping)["status"] == "done"
    assert agent.link.connected
    # Answered, or (no usable id) counted: one of the two, never neither.
    if sum(agent.dispatcher.refused.values()) == refused_before:
        reply = console.final(corr)
        assert reply["device"] == "pi-fuzz"
        assert p.Reply.model_validate(reply).code in set(p.ReplyCode)
    else:
        assert corr not in console.finals


def test_mqtt_311_works_too(broker: Broker, tmp_path: Path) -> None:
    config = make_config(tmp_path, broker, device="pi-311", mqtt={"protocol": "3.1.1"})
    agent = Agent(config).start()
    collector = MessageCollector(broker, "edge/pi-311/reply")
    try:
        publish(broker, "edge/pi-311/cmd", b'{"id": "p", "op": "ping"}')
        assert json.loads(collector.wait_for(2)[1].payload)["status"] == "done"
    finally:
        agent.stop()
        collector.close()


def test_chunked_deploy_over_the_broker(broker: Broker, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    size = 64 * 1024
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    config = make_config(tmp_path, broker, device="pi-chunk", transfer={"chunk_wait_s": 1})
    agent = Agent(config).start()
    sent: list[list[int]] = []

    def answer(client, userdata, msg):  # type: ignore[no-untyped-def]
        request = p.ChunkRequest.model_validate_json(msg.payload)
        sent.append(request.missing)
        for i in request.missing:
            if len(sent) == 1 and i == 1:
                continue  # lose one chunk the first time round
            chunk = p.Chunk(
                transfer_id="t-9", index=i, total=len(pieces),
                data=base64.b64encode(pieces[i]).decode(),
                sha256=hashlib.sha256(pieces[i]).hexdigest(),
            )  # fmt: skip
            client.publish("edge/transfer/t-9", chunk.to_bytes(), qos=1)

    sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    sender.on_message = answer
    sender.connect(broker.host, broker.port)
    sender.subscribe("edge/transfer/t-9/missing", 1)
    sender.loop_start()
    collector = MessageCollector(broker, "edge/pi-chunk/reply")
    try:
        time.sleep(0.3)
        command = {
            "id": "dep-chunks",
            "op": "deploy",
            "manifest": model_manifest(data, version="4"),
            "artifact": {"kind": "mqtt", "transfer_id": "t-9", "chunk_size": size, "chunks": 4},
        }
        publish(broker, "edge/pi-chunk/cmd", json.dumps(command).encode())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            finals = [
                json.loads(m.payload)
                for m in collector.messages
                if json.loads(m.payload)["status"] in ("done", "failed")
            ]
            if finals:
                break
            time.sleep(0.05)
        assert finals and finals[0]["status"] == "done", finals
        assert agent.target.model_bytes == [data]
        assert sent == [[0, 1, 2, 3], [1]]
    finally:
        sender.loop_stop()
        sender.disconnect()
        collector.close()
        agent.stop()


# ------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("tls")
    pki = make_pki(workdir / "pki")
    broker = Broker(
        workdir / "mosquitto",
        listener_conf=(
            f"cafile {pki.ca_cert}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
            "require_certificate true\ntls_version tlsv1.2\n"
        ),
    )
    broker.start()
    yield broker, pki
    broker.stop()


def tls_config(tmp_path: Path, broker: Broker, ca: Path, cert: Path, key: Path) -> AgentConfig:
    tls = {"enabled": True, "ca_file": str(ca), "cert_file": str(cert), "key_file": str(key)}
    return make_config(tmp_path, broker, device="pi-tls", mqtt={"tls": tls})


def test_mutual_tls_connects_with_the_right_certificates(tls_broker: Any, tmp_path: Path) -> None:
    broker, pki = tls_broker
    agent = Agent(tls_config(tmp_path, broker, pki.ca_cert, pki.client_cert, pki.client_key))
    try:
        agent.start()
        assert agent.link.connected and agent.link.last_error is None
    finally:
        agent.stop()


@pytest.mark.parametrize("wrong", ["client certificate", "broker CA"])
def test_a_wrong_certificate_is_refused_and_reported(
    tls_broker: Any, tmp_path: Path, wrong: str
) -> None:
    broker, pki = tls_broker
    if wrong == "client certificate":
        config = tls_config(tmp_path, broker, pki.ca_cert, pki.rogue_cert, pki.rogue_key)
    else:
        config = tls_config(tmp_path, broker, pki.rogue_cert, pki.client_cert, pki.client_key)
    agent = Agent(config).start(wait=False)
    try:
        wait_until(lambda: agent.link.last_error is not None, timeout=10, what="an error")
        time.sleep(0.5)
        assert not agent.link.connected
        error = agent.link.last_error or ""
        assert f"{broker.host}:{broker.port}" in error
        if wrong == "broker CA":
            assert "CERTIFICATE_VERIFY_FAILED" in error
        else:
            assert "SSL" in error or "certificate" in error
    finally:
        agent.stop()
