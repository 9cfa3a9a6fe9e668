"""A private Mosquitto broker and a message collector for tests.

Every broker the tests use is a real ``mosquitto`` process on a free loopback port,
with its own config and persistence directory, stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )
    if not found:
        raise RuntimeError("mosquitto binary not found: run `make setup` (installs it)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One Mosquitto process; ``stop()`` and ``start()`` keep the port and persistence."""

    def __init__(self, workdir: Path, port: int | None = None, listener_conf: str = "") -> None:
        """``listener_conf``: extra lines for the listener (e.g. TLS: cafile, certfile,
        keyfile, require_certificate)."""
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        # As root, mosquitto drops to the `mosquitto` user, which cannot write the
        # persistence file in a root-owned test directory: stay root instead.
        run_as = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"listener {self.port} {self.host}\n"
            f"{run_as}"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "log_dest stdout\n"
            f"{listener_conf}"
        )

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """Die like a crashed broker: no clean session shutdown."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class MessageCollector:
    """A plain paho client that subscribes and lets a test wait for messages."""

    def __init__(self, broker: Broker, topics: str | Iterable[str], qos: int = 1) -> None:
        self._topics = [topics] if isinstance(topics, str) else list(topics)
        self._qos = qos
        self._cond = threading.Condition()
        self.messages: list[Received] = []
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"collector-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise TimeoutError(f"could not subscribe to {self._topics} on {broker.url}")

    def _on_connect(self, client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        if not reason_code.is_failure:
            client.subscribe([(t, self._qos) for t in self._topics])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):  # type: ignore[no-untyped-def]
        self._subscribed.set()

    def _on_message(self, client, userdata, msg):  # type: ignore[no-untyped-def]
        with self._cond:
            self.messages.append(Received(msg.topic, msg.payload, bool(msg.retain), msg.qos))
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0, topic: str | None = None) -> list[Received]:
        """The first ``n`` messages (on ``topic`` when given); AssertionError on timeout."""

        def matching() -> list[Received]:
            return [m for m in self.messages if topic is None or m.topic == topic]

        with self._cond:
            if not self._cond.wait_for(lambda: len(matching()) >= n, timeout):
                got = [(m.topic, m.payload[:80]) for m in matching()]
                raise AssertionError(f"expected {n} message(s) within {timeout}s, got {got}")
            return matching()[:n]

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def publish(broker: Broker, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
    """Publish one message and wait until the broker has acknowledged it."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"pub-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)
        if not info.is_published():
            raise TimeoutError(f"publish to {topic} not acknowledged")
    finally:
        client.loop_stop()
        client.disconnect()
