"""A real Outbox and MqttLink in a process of its own, for the SIGKILL test in
tests/test_outbox.py. Driven over stdin/stdout, one JSON object per line:

1. publishes 50 results with the broker up and prints ``delivered``;
2. waits for ``broker-stopped`` on stdin, then queues 200 results on disk;
3. holds the writer at its next transaction (a slow disk, through the outbox's
   connection seam), fills the intake until the outbox refuses, lets exactly one
   transaction through (it records how many were accepted) and holds the next;
4. prints ``ready`` with its counts, and waits to be killed.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent import protocol as p
from agent.config import parse_config
from agent.link import outbox as outbox_module
from agent.link.client import MqttLink
from agent.link.outbox import Outbox

INTAKE = 5000


class Gate:
    """Lets ``allowed`` transactions begin, then holds the writer."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.allowed = 1 << 30
        self.waiting = 0

    def begin(self) -> None:
        with self.cond:
            self.waiting += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.allowed > 0)
            self.allowed -= 1
            self.waiting -= 1

    def connect(self, path: Path) -> sqlite3.Connection:
        gate = self

        class Connection(sqlite3.Connection):
            def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
                if sql == "BEGIN":
                    gate.begin()
                return super().execute(sql, *args)

        return sqlite3.connect(path, isolation_level=None, factory=Connection)


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def wait(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


def result(frame: int) -> p.Result:
    return p.Result(
        device="pi-1", pipeline="cam", seq=0, ts=1.0, frame=frame, model="m", version="1",
        latency_ms=1.0,
    )  # fmt: skip


def main(state_dir: str, host: str, port: int) -> None:
    outbox_module.MAX_INTAKE = INTAKE
    config = parse_config(
        {
            "device": {"id": "pi-1"},
            "state_dir": state_dir,
            "models": {"require_signature": False},
            "mqtt": {
                "host": host,
                "port": port,
                "reconnect": {"min_delay_s": 0.1, "max_delay_s": 0.5},
            },
        }
    )
    gate = Gate()
    link = MqttLink(config)
    outbox = Outbox(config, link, connect=gate.connect)
    outbox.start()
    link.start()
    if not link.wait_connected(20):
        raise RuntimeError(f"not connected: {link.last_error}")
    accepted = sum(outbox.enqueue_result(result(i)) for i in range(50))
    wait(lambda: outbox.stats()["delivered"] == 50, "50 delivered")
    say(phase="delivered", accepted=accepted)

    assert sys.stdin.readline().strip() == "broker-stopped"
    wait(lambda: not link.connected, "the disconnect noticed")
    accepted += sum(outbox.enqueue_result(result(50 + i)) for i in range(200))
    wait(lambda: outbox.stats()["on_disk"] == 200, "200 on disk")

    with gate.cond:
        gate.allowed = 0
    frame, refused = 250, 0
    while not refused:
        if outbox.enqueue_result(result(frame)):
            accepted += 1
            frame += 1
        else:
            refused += 1
        if frame == 250 + 10:
            wait(lambda: gate.waiting == 1, "the writer held")
    on_disk = outbox.stats()["on_disk"]
    with gate.cond:
        gate.allowed = 1
        gate.cond.notify_all()
    wait(lambda: outbox.stats()["on_disk"] > on_disk, "one transaction through")
    wait(lambda: gate.waiting == 1, "the writer held again")
    say(phase="ready", accepted=accepted, refused=refused, stats=outbox.stats())
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
