"""Thread priorities: supporting threads run nicer than the inference worker."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from agent.link.client import MqttLink
from agent.link.outbox import Outbox
from agent.threads import lower_priority
from tests.link_support import make_config
from tests.mqtt_support import Broker


def niceness_in_thread(*levels: int) -> tuple[int, int]:
    """Runs lower_priority(level) for each level in a new thread; that thread's niceness
    and the calling thread's afterwards."""
    seen: list[int] = []

    def run() -> None:
        for level in levels:
            lower_priority(level)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen[0], os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_lowering_is_per_thread_and_never_raises_priority() -> None:
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert niceness_in_thread(base + 5) == (base + 5, base)
    # Already nicer than asked: left as it is (an unprivileged thread cannot go back).
    assert niceness_in_thread(base + 7, base + 3) == (base + 7, base)


def test_outbox_and_mqtt_threads_run_nicer(tmp_path: Path, broker: Broker) -> None:
    config = make_config(tmp_path, broker)
    link = MqttLink(config)
    outbox = Outbox(config, link)
    outbox.start()
    link.start()
    try:
        assert link.wait_connected(10)
        nice = {
            t.name: os.getpriority(os.PRIO_PROCESS, t.native_id)
            for t in threading.enumerate()
            if t.name in ("outbox", "mqtt-link") and t.native_id
        }
    finally:
        outbox.stop()
        link.stop()
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert nice == {"outbox": base + 5, "mqtt-link": base + 5}
