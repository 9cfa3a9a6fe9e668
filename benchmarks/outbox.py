"""Outbox throughput, hand-over cost and outage recovery against a real Mosquitto.

    python -m benchmarks.outbox [--quick] --json

Prints one JSON object:
- published_per_s: results through the outbox to the broker, acknowledged (PUBACK);
- enqueue_us_p50 / enqueue_us_p99: time the producer (the inference loop) spends
  handing over one result, measured while the outbox publishes at full speed;
- outage_s, queued_during_outage: the broker is stopped for outage_s while results
  keep coming at a steady rate;
- drain_per_s: how fast the backlog empties once the broker is back;
- drain_vs_live: drain_per_s / published_per_s;
- lost: results produced minus distinct seqs a persistent-session subscriber got.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import protocol as p
from agent.config import parse_config
from agent.link.client import MqttLink
from agent.link.outbox import Outbox
from tests.mqtt_support import Broker

TOPIC = "edge/bench-1/results/cam"


class Subscriber:
    """Counts distinct seqs with a persistent session, so it misses nothing across an outage."""

    def __init__(self, broker: Broker) -> None:
        self.seqs: set[int] = set()
        self.received = 0
        ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-sub-{uuid.uuid4().hex[:6]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        # paho types these as whole seconds; fractions work and keep the outage short.
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self.client.on_connect = lambda c, *a: c.subscribe(TOPIC, 1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("subscriber could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.received += 1
        self.seqs.add(json.loads(msg.payload)["seq"])

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait(predicate: Any, timeout: float, what: str) -> float:
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(quick: bool) -> dict[str, Any]:
    n_live = 20_000 if quick else 100_000
    outage_s = 3.0 if quick else 10.0
    outage_rate = 2_000.0
    work = Path(tempfile.mkdtemp(prefix="bench-outbox-"))
    broker = Broker(work / "mosquitto")
    broker.start()
    config = parse_config(
        {
            "device": {"id": "bench-1"},
            "state_dir": str(work / "state"),
            "models": {"require_signature": False},
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "reconnect": {"min_delay_s": 0.1, "max_delay_s": 0.5},
            },
        }
    )
    subscriber = Subscriber(broker)
    link = MqttLink(config)
    outbox = Outbox(config, link)
    outbox.start()
    link.start()
    try:
        if not link.wait_connected(10):
            raise RuntimeError(f"link did not connect: {link.last_error}")
        result = p.Result(
            device="bench-1", pipeline="cam", seq=0, ts=time.time(), frame=0,
            model="digits", version="1", latency_ms=3.2,
            classes=[p.ClassScore(index=7, label="7", score=0.94)],
        )  # fmt: skip

        # Live: hand over as fast as the producer can; time each hand-over.
        clock = time.perf_counter_ns
        enqueue_ns: list[int] = []
        start = time.perf_counter()
        for _ in range(n_live):
            t0 = clock()
            outbox.enqueue_result(result)
            enqueue_ns.append(clock() - t0)
        wait(lambda: outbox.stats()["published"] >= n_live, 120, "live results acknowledged")
        live_s = time.perf_counter() - start
        published_per_s = n_live / live_s

        # Outage: the broker goes away while results keep coming at a steady rate.
        broker.stop()
        wait(lambda: not link.connected, 10, "disconnect noticed")
        queued = 0
        period = 1.0 / outage_rate
        next_at = time.perf_counter()
        end = next_at + outage_s
        while time.perf_counter() < end:
            outbox.enqueue_result(result)
            queued += 1
            next_at += period
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        produced = n_live + queued
        wait(lambda: outbox.stats()["depth"] >= queued, 30, "outage backlog on disk")
        broker.start()
        wait(lambda: link.connected, 30, "reconnect")
        drain_s = wait(lambda: outbox.stats()["depth"] == 0, 120, "backlog drained")
        wait(lambda: len(subscriber.seqs) >= produced, 30, "subscriber caught up")
        lost = produced - len(subscriber.seqs & set(range(produced)))
        drain_per_s = queued / max(drain_s, 1e-9)
        stats = outbox.stats()
        return {
            "benchmark": "outbox",
            "quick": quick,
            "live_results": n_live,
            "published_per_s": round(published_per_s, 1),
            "enqueue_us_p50": round(percentile([float(v) for v in enqueue_ns], 0.50) / 1000, 2),
            "enqueue_us_p99": round(percentile([float(v) for v in enqueue_ns], 0.99) / 1000, 2),
            "outage_s": outage_s,
            "queued_during_outage": queued,
            "drain_per_s": round(drain_per_s, 1),
            "drain_vs_live": round(drain_per_s / published_per_s, 3),
            "lost": lost,
            "duplicates_received": subscriber.received - len(subscriber.seqs),
            "dropped": stats["dropped"],
        }
    finally:
        outbox.stop()
        link.stop()
        subscriber.close()
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.outbox", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small run, under 60 s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    report = run(args.quick)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
