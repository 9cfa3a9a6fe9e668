"""A live agent under a few hundred hostile payloads (issue 14, item 7).

`edge-agent run` as a process with a real broker, serving a converter-built digits
model; mutated payloads (random bytes, truncated JSON, deep nesting, huge numbers,
lone surrogates, long ids, reused ids) go to its device and group topics. Then a
ping is answered, the commands plane reports what it refused, inference never
stopped and the process's RSS stayed bounded.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.models.manifest import generate_keypair
from tests.converter_support import build_digits_bundle
from tests.mqtt_support import Broker, MessageCollector

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
DEVICE = "pi-fz"
REPLIES = "edge/replies/fuzz-console"
PAYLOADS = 400

pytestmark = pytest.mark.slow


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Console:
    """Publishes with a response topic and correlation data; keeps final replies."""

    def __init__(self, broker: Broker) -> None:
        self.finals: dict[bytes, dict[str, Any]] = {}
        self._cond = threading.Condition()
        ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fz-{uuid.uuid4().hex[:6]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )  # fmt: skip
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(REPLIES, 1)
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
        props.ResponseTopic = REPLIES
        props.CorrelationData = corr
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)

    def final(self, corr: bytes, timeout: float = 60.0) -> dict[str, Any]:
        with self._cond:
            assert self._cond.wait_for(lambda: corr in self.finals, timeout), corr
            return self.finals[corr]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def hostile_payloads(rng: random.Random, n: int) -> list[bytes]:
    """Mutations of harmless valid commands and the shapes issue 14 lists."""
    seeds = [
        json.dumps({"id": "p0", "op": "ping"}).encode(),
        json.dumps({"id": "s0", "op": "status"}).encode(),
        json.dumps({"id": "c0", "op": "config", "changes": {"telemetry.interval_s": 2}}).encode(),
        json.dumps({"id": "d0", "op": "deploy", "manifest": {"name": "digits"},
                    "artifact": {"kind": "url", "url": "https://127.0.0.1:1/m"}}).encode(),
    ]  # fmt: skip
    fixed = [
        b"[" * 2000,
        b"{" * 100_000,
        b'{"id": "n1", "op": "ping", "x": ' + b"9" * 20_000 + b"}",
        b'{"id": "n2", "op": "ping", "x": 1e99999}',
        b'{"id": "\\ud800", "op": "ping"}',
        b'{"id": "u1", "op": "config", "changes": {"a\\ud800": 1}}',
        json.dumps({"id": "L" * 5000, "op": "ping"}).encode(),
        json.dumps({"id": "reused", "op": "ping"}).encode(),
        json.dumps({"id": "reused", "op": "ping"}).encode(),
        b'{"id": "t1", "op": "ping"',
        b"\xff\xfe" * 300,
        b"x" * (300 * 1024),
    ]
    out = list(fixed)
    while len(out) < n:
        data = bytearray(rng.choice(seeds))
        # Half keep the leading {"id": "..", intact, so the device can answer them.
        low = 14 if rng.random() < 0.5 else 0
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(low, len(data)) if len(data) > low else len(data)
            op = rng.choice(["flip", "insert", "truncate", "nest", "value"])
            if op == "flip" and at < len(data):
                data[at] = rng.randrange(256)
            elif op == "insert":
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
            elif op == "truncate":
                del data[at:]
            elif op == "nest":
                data[at:at] = b"[" * rng.randint(20, 3000)
            else:  # a field's value replaced, the JSON still valid
                obj = json.loads(rng.choice(seeds))
                obj[rng.choice(sorted(obj))] = rng.choice(
                    [None, -(10**30), 1e308, "\ud800", "x" * 3000, [[[]]], {"op": "ping"}, True]
                )
                data = bytearray(json.dumps(obj).encode())
        out.append(bytes(data) if rng.random() < 0.8 else rng.randbytes(rng.randint(0, 400)))
    rng.shuffle(out)
    return out


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    wd = tmp_path_factory.mktemp("fuzz-live")
    private, public = generate_keypair()
    (wd / "fleet.key").write_bytes(private)
    (wd / "fleet.pub").write_bytes(public)
    bundle = build_digits_bundle(wd / "digits-1", "1", sign_key=wd / "fleet.key")
    broker = Broker(wd / "mosquitto")
    broker.start()
    config = {
        "device": {"id": DEVICE, "groups": ["lab"]},
        "state_dir": str(wd / "state"),
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "models": {"trusted_keys": [str(wd / "fleet.pub")],
                   "probation": {"duration_s": 1.0, "min_inferences": 5}},
        "pipelines": [{"name": "digits-cam", "model": "digits",
                       "source": {"type": "synthetic", "kind": "digits", "width": 32,
                                  "height": 32, "channels": 1, "fps": 20}}],
    }  # fmt: skip
    (wd / "agent.yaml").write_text(yaml.safe_dump(config))
    results = MessageCollector(broker, [f"edge/{DEVICE}/results/#"])
    log = (wd / "agent.log").open("w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", str(wd / "agent.yaml")],
        stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=wd,
    )  # fmt: skip
    console = Console(broker)
    try:
        deploy = subprocess.run(
            [sys.executable, "-m", "fleet", "deploy", str(bundle), "--host", "127.0.0.1",
             "--port", str(broker.port), "--device", DEVICE, "--pub", str(wd / "fleet.pub"),
             "--via", "mqtt"],
            capture_output=True, text=True, timeout=180, env=ENV, cwd=wd,
        )  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        wait_for(lambda: len(results.messages) >= 20, what="results from the deployed model")
        yield {"agent": agent, "broker": broker, "results": results, "console": console, "wd": wd}
    finally:
        console.close()
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        results.close()
        broker.stop()
        log.close()


def test_hostile_payloads_do_not_silence_or_stop_a_live_agent(live: dict[str, Any]) -> None:
    agent, console, results = live["agent"], live["console"], live["results"]
    rss_before = rss_mb(agent.pid)
    results_before = len(results.messages)
    rng = random.Random(14)
    payloads = hostile_payloads(rng, PAYLOADS)
    started = time.time()
    for i, payload in enumerate(payloads):
        topic = f"edge/{DEVICE}/cmd" if i % 2 else "edge/group/lab/cmd"
        console.send(topic, payload, f"fz-{i}".encode())
    # The commands plane still answers, after everything before it was handled.
    console.send(f"edge/{DEVICE}/cmd", json.dumps({"id": "alive", "op": "ping"}).encode(), b"p")
    assert console.final(b"p", timeout=120)["status"] == "done"
    console.send(f"edge/{DEVICE}/cmd", json.dumps({"id": "st-fz", "op": "status"}).encode(), b"s")
    status = console.final(b"s")
    assert status["status"] == "done", status
    refused = status["data"]["commands"]["refused"]

    def answered() -> int:
        return sum(1 for i in range(len(payloads)) if f"fz-{i}".encode() in console.finals)

    # Every payload was answered or counted, none both, none neither (long commands
    # answer from their lane, possibly after the ping).
    wait_for(lambda: answered() + sum(refused.values()) >= len(payloads), what="every answer")
    assert answered() + sum(refused.values()) == len(payloads), (answered(), refused)
    assert refused.get("schema", 0) >= 1 and refused.get("bad_json", 0) >= 1
    # The reused id ran once; the second time it was a duplicate.
    reused = [
        console.finals[f"fz-{i}".encode()]["code"]
        for i, payload in enumerate(payloads)
        if payload == json.dumps({"id": "reused", "op": "ping"}).encode()
    ]
    assert sorted(reused) == ["duplicate", "ok"], reused
    assert agent.poll() is None
    # Inference went on through the flood: results kept arriving, with no long gap.
    ended = time.time()

    def stamps_now() -> list[float]:
        return sorted(json.loads(m.payload)["ts"] for m in list(results.messages)[results_before:])

    wait_for(lambda: stamps_now() and stamps_now()[-1] >= ended, what="results after the fuzz")
    stamps = stamps_now()
    assert stamps[0] <= started + 10 and stamps[-1] >= ended
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) < 10, max(gaps)
    rss_after = rss_mb(agent.pid)
    assert rss_after - rss_before < 150, (rss_before, rss_after)
    print(f"answered {answered()}, refused {refused}, rss {rss_before:.0f} -> {rss_after:.0f} MB")
