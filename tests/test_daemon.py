"""The agent as systemd runs it: READY, watchdog pings that stop when a pipeline or any
other thread hangs, SIGHUP reloads, SIGTERM stops within 10 s (a slow download too), a
thread that dies for good ends the process non-zero. A real process, a real notify
socket, a real broker."""

from __future__ import annotations

import hashlib
import http.server
import json
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
from agent.threads import EXIT_THREAD_DIED
from tests.mqtt_support import Broker, MessageCollector, publish

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
    broker: Broker

    def log_has(self, text: str) -> bool:
        return text in self.log.read_text()


def start_daemon(tmp_path: Path, broker: Broker, module: str) -> Iterator[Daemon]:
    private_broker = broker
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
            [sys.executable, "-m", module, "run", str(config)],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
    d = Daemon(proc, notify, config, data, fifo, log, collector, private_broker)
    try:
        yield d
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        collector.close()
        notify.close()


@pytest.fixture
def daemon(tmp_path: Path, private_broker: Broker) -> Iterator[Daemon]:
    yield from start_daemon(tmp_path, private_broker, "agent")


@pytest.fixture
def faulty_daemon(tmp_path: Path, private_broker: Broker) -> Iterator[Daemon]:
    """The agent with faults a test triggers over MQTT (tests/faulty_agent.py)."""
    yield from start_daemon(tmp_path, private_broker, "tests.faulty_agent")


def states(d: Daemon) -> list[State]:
    return [
        State.model_validate_json(m.payload)
        for m in list(d.collector.messages)
        if m.topic.endswith("/state")
    ]


def retained_state(d: Daemon) -> State:
    """The state the broker keeps for the device, as a console connecting now sees it."""
    collector = MessageCollector(d.broker, "edge/pi-daemon/state")
    try:
        [message] = collector.wait_for(1, timeout=10)
    finally:
        collector.close()
    assert message.retain
    return State.model_validate_json(message.payload)


def sigterm_and_wait(d: Daemon) -> tuple[int, float]:
    """Exit status and seconds from SIGTERM to the end of the process."""
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    code = d.proc.wait(20)
    return code, time.monotonic() - started


def test_ready_watchdog_hang_and_clean_stop(daemon: Daemon) -> None:
    daemon.notify.wait("READY=1")
    daemon.notify.wait("WATCHDOG=1", count=3)
    # The sensor starts delivering, then goes silent while its file stays open.
    writer = os.open(daemon.fifo, os.O_WRONLY)
    try:
        os.write(writer, b"".join(b"%d,%d\n" % (i, i) for i in range(10)))
        wait_until(lambda: daemon.log_has("source vibration open"), 10, "the source to open")
        # The read blocks from here on (the frames were read within moments of the open).
        quiet_since = time.monotonic()
        wait_until(lambda: daemon.log_has("hung pipeline(s) ['vibration']"), 30, "the hang")
        declared = time.monotonic()
        before = daemon.notify.times("WATCHDOG=1")
        time.sleep(2.5)  # five ping intervals: none may come
        assert daemon.notify.times("WATCHDOG=1") == before, "watchdog still pinged"
        # Pings went on while the source was merely quiet (the threshold is 5 s), and
        # none came once the pipeline was declared hung.
        last_ping = before[-1]
        assert last_ping - quiet_since > 3.0, "the watchdog stopped before the threshold"
        assert last_ping < declared
        # SIGTERM while the capture thread is stuck in a read: still a prompt, clean stop.
        code, took = sigterm_and_wait(daemon)
        assert code == 0
        assert took < 10
    finally:
        os.close(writer)
    daemon.notify.wait("STOPPING=1", timeout=1)
    # What a console connecting after the stop sees: the retained state says offline.
    assert retained_state(daemon).online is False


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


def test_a_stuck_thread_stops_the_watchdog_and_is_reported(faulty_daemon: Daemon) -> None:
    d = faulty_daemon
    d.notify.wait("READY=1")
    d.notify.wait("WATCHDOG=1", count=3)
    publish(d.broker, "edge/pi-daemon/cmd", b"stall-commands")  # the commands thread hangs
    wait_until(lambda: d.log_has("thread commands has made no progress"), 30, "the stall")
    assert d.log_has("in handle")  # the stall report shows where the thread is
    wait_until(lambda: d.log_has("not pinging the watchdog: thread(s) down ['commands']"), 10, "")
    before = d.notify.times("WATCHDOG=1")
    time.sleep(2.5)  # five ping intervals: none may come
    assert d.notify.times("WATCHDOG=1") == before, "watchdog still pinged"
    state = retained_state(d)
    assert state.threads_down == ["commands"] and state.online
    assert not d.log_has("hung pipeline")  # the pipelines are fine: it is the thread
    code, took = sigterm_and_wait(d)
    assert code == 0 and took < 10
    assert retained_state(d).online is False


def test_a_thread_that_dies_for_good_ends_the_process_non_zero(faulty_daemon: Daemon) -> None:
    d = faulty_daemon
    d.notify.wait("READY=1")
    wait_until(lambda: states(d), 10, "the first state")
    publish(d.broker, "edge/pi-daemon/cmd", b"kill-outbox")
    assert d.proc.wait(30) == EXIT_THREAD_DIED  # systemd restarts it (Restart=on-failure)
    log = d.log.read_text()
    assert "thread outbox died and it cannot be restarted; ending the process" in log
    assert "ThreadKill: outbox" in log  # with its traceback
    d.notify.wait("STOPPING=1", timeout=1)
    assert retained_state(d).online is False


def test_a_hang_in_the_interpreters_teardown_does_not_delay_the_stop(
    faulty_daemon: Daemon,
) -> None:
    d = faulty_daemon
    d.notify.wait("READY=1")
    wait_until(lambda: states(d), 10, "the first state")
    publish(d.broker, "edge/pi-daemon/cmd", b"hang-at-exit")
    # Commands are handled in order: once the ping is answered, the hang is armed.
    publish(d.broker, "edge/pi-daemon/cmd", b'{"id": "after-hang", "op": "ping"}')

    def answered() -> bool:
        return any(
            b'"after-hang"' in m.payload and b'"done"' in m.payload
            for m in list(d.collector.messages)
        )

    wait_until(answered, 20, "the ping's reply")
    code, took = sigterm_and_wait(d)
    assert (code, took < 10) == (0, True), (code, took)
    assert retained_state(d).online is False


class SlowModelServer:
    """Serves a model file one byte every 0.2 s: a download that outlasts any stop."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sending = threading.Event()
        self.closing = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                for i in range(len(outer.body)):
                    try:
                        self.wfile.write(outer.body[i : i + 1])
                        self.wfile.flush()
                    except OSError:
                        return
                    outer.sending.set()
                    if outer.closing.wait(0.2):
                        return

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/model.tflite"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


def raw_manifest(model: bytes) -> dict[str, object]:
    return {
        "format": 1, "name": "anomaly", "version": "2", "created_at": "2026-12-01T00:00:00Z",
        "task": "raw", "quantization": "int8",
        "model": {"file": "model.tflite", "sha256": hashlib.sha256(model).hexdigest(),
                  "size": len(model)},
        "inputs": [{"name": "x", "shape": [1, 2, 1], "dtype": "int8"}],
        "outputs": [{"name": "y", "shape": [1, 1], "dtype": "int8"}],
        "producer": {"converter": "test"},
    }  # fmt: skip


def test_sigterm_during_a_slow_download_ends_within_10_s(daemon: Daemon) -> None:
    daemon.notify.wait("READY=1")
    wait_until(lambda: states(daemon), 10, "the first state")
    model = bytes(range(256)) * 400
    server = SlowModelServer(model)
    try:
        command = {"id": "slow-deploy", "op": "deploy", "manifest": raw_manifest(model),
                   "artifact": {"kind": "http", "url": server.url}}  # fmt: skip
        publish(daemon.broker, "edge/pi-daemon/cmd", json.dumps(command).encode())
        assert server.sending.wait(30), "the download never started"
        code, took = sigterm_and_wait(daemon)
    finally:
        server.close()
    assert took < 10, f"SIGTERM took {took:.1f} s (systemd kills at 15)"
    # 0: the download itself stopped in time (the backstop's status would mean it overran).
    assert code == 0, f"exit {code}; the stop overran: {daemon.log_has('Still running:')}"
    assert retained_state(daemon).online is False
