"""A link whose connection is cut before CONNACK (a broker restarting, a proxy in the
way) keeps retrying and connects once a real broker answers on that address."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.link.client import MqttLink
from tests.link_support import make_config
from tests.mqtt_support import Broker, MessageCollector, free_port


def test_link_recovers_after_connections_closed_before_connack(tmp_path: Path) -> None:
    port = free_port()
    rude = socket.socket()
    rude.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    rude.bind(("127.0.0.1", port))
    rude.listen(8)
    rude.settimeout(0.1)
    stop = threading.Event()
    closed = []

    def close_everything() -> None:
        while not stop.is_set():
            try:
                conn, _ = rude.accept()
            except OSError:
                continue
            conn.recv(100)  # the CONNECT
            conn.close()  # ...and no CONNACK
            closed.append(time.monotonic())

    server = threading.Thread(target=close_everything, daemon=True)
    server.start()
    config = parse_config(
        {
            "device": {"id": "pi-flaky"},
            "state_dir": str(tmp_path / "state"),
            "models": {"require_signature": False},
            "mqtt": {
                "host": "127.0.0.1",
                "port": port,
                "reconnect": {"min_delay_s": 0.2, "max_delay_s": 0.5},
            },
        }
    )
    link = MqttLink(config)
    link.start()
    broker: Broker | None = None
    try:
        deadline = time.monotonic() + 10
        while len(closed) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(closed) >= 2, "the link did not retry"
        assert not link.connected
        assert "closed before the broker accepted it" in (link.last_error or "")
        stop.set()
        server.join(5)
        rude.close()
        broker = Broker(tmp_path / "mosquitto", port=port)
        broker.start()
        assert link.wait_connected(15), link.last_error
        assert link.connects == 1
    finally:
        link.stop(1)
        if broker is not None:
            broker.stop()


def test_link_works_on_file_descriptors_past_1024(tmp_path: Path, broker: Broker) -> None:
    """select() cannot watch a descriptor of 1024 or more; a process holding many
    files gets such descriptors, and the link must still connect and publish."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 1400
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard limit on open files is {hard}")
    collector = MessageCollector(broker, "fdtest/#")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    link = MqttLink(make_config(tmp_path, broker, device="pi-fd"))
    try:
        assert fillers[-1] >= 1024  # every descriptor the link opens is above it
        link.start()
        assert link.wait_connected(10), link.last_error
        assert link.publish("fdtest/x", b"hello", qos=1)
        assert collector.wait_for(1, topic="fdtest/x")[0].payload == b"hello"
    finally:
        link.stop(1)
        collector.close()
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
