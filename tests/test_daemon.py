"""The agent as systemd runs it: READY, watchdog pings that stop when a pipeline hangs,
SIGHUP reloads, SIGTERM stops. A real process, a real notify socket, a real broker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from agent.protocol import State, Telemetry
from tests.mqtt_support import Broker, MessageCollector

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class NotifySocket:
    """The systemd side of sd_notify: a datagram socket that records what arrives."""

    path: Path
    received: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.received.append((time.monotonic(), line))

    def times(self, message: str) -> list[float]:
        return [t for t, line in self.received if line == message]

    def wait(self, message: str, count: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.times(message)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{message} x{count} not received: {self.received[-10:]}")
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    notify: NotifySocket
    config: Path
    data: dict
    fifo: Path
    log: Path
    collector: MessageCollector


@pytest.fixture
def daemon(tmp_path: Path, private_broker: Broker) -> Iterator[Daemon]:
    fifo = tmp_path / "sensor.fifo"
    os.mkfifo(fifo)
    data = {
        "device": {"id": "pi-daemon"},
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": "127.0.0.1", "port": private_broker.port, "keepalive_s": 30},
        "models": {"require_signature": False},
        "telemetry": {"interval_s": 30},
        "pipelines": [
            {
                "name": "vibration",
                "model": "anomaly",
                "queue": "fifo",
                # A sensor replayed from a FIFO the test writes: when the test stops
                # writing, the read blocks like a hung driver.
                "source": {"type": "sensor", "input": "file", "path": str(fifo), "window": 2},
            }
        ],
    }
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump(data))
    notify = NotifySocket(tmp_path / "notify.sock")
    collector = MessageCollector(private_broker, ["edge/pi-daemon/#"])
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "1000000",  # ping every 0.5 s; a pipeline is hung after 5 s
    }
    env.pop("WATCHDOG_PID", None)
    log = tmp_path / "agent.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", str(config)],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
    d = Daemon(proc, notify, config, data, fifo, log, collector)
    try:
        yield d
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        collector.close()
        notify.close()


def states(d: Daemon) -> list[State]:
    return [
        State.model_validate_json(m.payload)
        for m in list(d.collector.messages)
        if m.topic.endswith("/state")
    ]


def test_ready_watchdog_hang_and_clean_stop(daemon: Daemon) -> None:
    daemon.notify.wait("READY=1")
    daemon.notify.wait("WATCHDOG=1", count=3)
    # The sensor starts delivering, then goes silent while its file stays open.
    writer = os.open(daemon.fifo, os.O_WRONLY)
    try:
        os.write(writer, b"".join(b"%d,%d\n" % (i, i) for i in range(10)))
        wait_until(lambda: "open" in daemon.log.read_text(), 10, "the source to open")
        hung_since = time.monotonic()
        # Hung after 5 s without progress; give it 7 s, then expect silence.
        time.sleep(7)
        before = len(daemon.notify.times("WATCHDOG=1"))
        time.sleep(2.5)
        assert len(daemon.notify.times("WATCHDOG=1")) == before, "watchdog still pinged"
        assert "hung pipeline(s) ['vibration']" in daemon.log.read_text()
        assert time.monotonic() - hung_since < 30
        # SIGTERM while the capture thread is stuck in a read: still a prompt, clean stop.
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(15) == 0
        assert time.monotonic() - started < 10
    finally:
        os.close(writer)
    daemon.notify.wait("STOPPING=1", timeout=1)
    wait_until(lambda: states(daemon) and not states(daemon)[-1].online, 5, "online: false")


def test_sighup_changes_live_keys_and_names_the_rest(daemon: Daemon) -> None:
    daemon.notify.wait("READY=1")
    data = {**daemon.data, "telemetry": {"interval_s": 1}}
    data["mqtt"] = {**data["mqtt"], "keepalive_s": 60}
    daemon.config.write_text(yaml.safe_dump(data))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.notify.wait("RELOADING=1")
    log_has = lambda text: text in daemon.log.read_text()  # noqa: E731
    wait_until(lambda: log_has("needs a restart to change: mqtt.keepalive_s"), 10, "reload log")
    assert log_has("changed live: telemetry.interval_s")

    def telemetry() -> list[Telemetry]:
        return [
            Telemetry.model_validate_json(m.payload)
            for m in list(daemon.collector.messages)
            if m.topic.endswith("/telemetry")
        ]

    wait_until(lambda: len(telemetry()) >= 3, 10, "telemetry every second")
    # The retained state names what waits for a restart.
    wait_until(lambda: states(daemon)[-1].restart_needed == ["mqtt.keepalive_s"], 5, "state")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0
