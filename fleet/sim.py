"""A protocol-level simulator of many devices in one process, for benchmarks and tests.

``SimFleet`` speaks the wire protocol of ``agent.protocol`` for thousands of devices
without running agents: devices share a few MQTT 5 connections (``per_connection``
each). A connection has paho's network thread and one worker thread that owns its
devices: it runs their telemetry timers and their commands, so nothing else
mutates a device (``start_device`` and ``stop_device`` are requests to it).

A device publishes its retained ``State`` (online) when started and ``online: false``
when stopped; ``Telemetry`` every ``interval_s`` (QoS 1, with a seq, counted in
``sent_telemetry``); and answers commands on ``<prefix>/<device>/cmd`` and
``<prefix>/group/<group>/cmd`` as the real agent does (``agent/link/commands.py``):
``accepted`` at once, then for a deploy the stages downloading (or receiving for
chunks), installing, validating, swapping, probation, and ``done`` after its new
retained state; a version stored and not active is refused with ``downgrade``; a
command id seen before is answered ``duplicate`` and never run again. Commands for
a stopped device wait for it (as its persistent session would keep them).

How a device runs commands is ``fleet.sim_device``; ``set_groups`` and
``roll_back_locally`` change a device as its own operator would (a new state, no
command), for tests of a server that must notice.

Not simulated: signed commands, MQTT 5 response topics, the chunk transfer itself
(a chunked deploy reports ``receiving`` without asking for chunks), and per-device
last wills (a connection has one will; ``stop`` says offline for every device).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.protocol import ModelState, Reply, ReplyCode, Topics

from .sim_device import CommandRunner, DeviceSim, telemetry_of

log = logging.getLogger(__name__)


class _Connection:
    """One MQTT connection and the worker that owns its devices."""

    def __init__(self, fleet: SimFleet, index: int, devices: list[DeviceSim]) -> None:
        self.fleet = fleet
        self.topics = fleet.topics
        self.devices = {d.id: d for d in devices}
        self.inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, Callable[[], float | None]]] = []
        self._order = itertools.count()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._lock = threading.Lock()
        self.published = 0
        self.acked = 0
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sim-{uuid.uuid4().hex[:8]}-{index}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.worker = threading.Thread(target=self._run, name=f"sim-conn-{index}", daemon=True)
        self.runner = CommandRunner(
            self,
            step_delay_s=fleet.step_delay_s,
            probation_s=fleet.probation_s,
            fetch_artifacts=fleet.fetch_artifacts,
            fetch_timeout_s=fleet.fetch_timeout_s,
        )

    # ------------------------------------------------------------ network thread

    def _on_connect(self, client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        prefix = self.topics.prefix
        client.subscribe([(f"{prefix}/+/cmd", 1), (f"{prefix}/group/+/cmd", 1)])

    def _on_message(self, client, userdata, msg):  # type: ignore[no-untyped-def]
        topic, payload = msg.topic, msg.payload
        self.inbox.put(lambda: self._dispatch(topic, payload))

    def _on_publish(self, client, userdata, mid, reason_code, properties):  # type: ignore[no-untyped-def]
        with self._lock:
            self.acked += 1

    # ------------------------------------------------------------------ lifecycle

    def connect(self, timeout: float = 10.0) -> None:
        self.client.connect(self.fleet.host, self.fleet.port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            raise TimeoutError("simulated fleet connection could not subscribe")
        self.worker.start()

    def call(self, work: Callable[[], None], timeout: float = 10.0) -> None:
        """Run ``work`` on the worker and wait for it; its exception is raised here."""
        done = threading.Event()
        failure: list[Exception] = []

        def run() -> None:
            try:
                work()
            except Exception as exc:
                failure.append(exc)
            finally:
                done.set()

        self.inbox.put(run)
        if not done.wait(timeout):
            raise TimeoutError("the simulated fleet's worker did not answer")
        if failure:
            raise failure[0]

    def wait_delivered(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.acked >= self.published:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        self.inbox.put(lambda: None)
        self.worker.join(10)
        self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------------- worker

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, task = heapq.heappop(self._timers)
                self._guarded(task)
            wait = min(0.1, self._timers[0][0] - now) if self._timers else 0.1
            try:
                item = self.inbox.get(timeout=max(0.0, wait))
            except queue.Empty:
                continue
            self._guarded(item)

    def _guarded(self, task: Callable[[], Any]) -> None:
        try:
            again = task()
        except Exception:
            log.exception("simulated device task failed")
            return
        if isinstance(again, int | float):
            self.after(float(again), task)

    def after(self, delay: float, task: Callable[[], float | None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._order), task))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        with self._lock:
            self.published += 1
        return True

    # ------------------------------------------------------------------ devices

    def start_device(self, dev: DeviceSim, phase: float) -> None:
        if dev.online:
            return
        dev.online = True
        dev.generation += 1
        self.publish(self.topics.state(dev.id), dev.state().to_bytes(), retain=True)
        generation = dev.generation
        self.after(phase, lambda: self._telemetry(dev, generation))
        while dev.held:
            self.runner.handle(dev, dev.held.popleft())

    def stop_device(self, dev: DeviceSim) -> None:
        if not dev.online:
            return
        dev.online = False
        dev.generation += 1
        self.publish(self.topics.state(dev.id), dev.state().to_bytes(), retain=True)

    def publish_state(self, dev: DeviceSim) -> None:
        self.publish(self.topics.state(dev.id), dev.state().to_bytes(), retain=True)

    def _telemetry(self, dev: DeviceSim, generation: int) -> float | None:
        if generation != dev.generation:
            return None
        dev.seq += 1
        if self.publish(self.topics.telemetry(dev.id), telemetry_of(dev).to_bytes()):
            dev.sent_telemetry += 1
        return self.fleet.interval_s

    # ----------------------------------------------------------------- commands

    def _dispatch(self, topic: str, payload: bytes) -> None:
        parts = topic[len(self.topics.prefix) + 1 :].split("/")
        if len(parts) == 3 and parts[0] == "group":
            targets = [d for d in self.devices.values() if parts[1] in d.groups]
        else:
            dev = self.devices.get(parts[0])
            targets = [dev] if dev is not None else []
        for dev in targets:
            if dev.online:
                self.runner.handle(dev, payload)
            else:
                dev.held.append(payload)

    def reply(
        self, dev: DeviceSim, cid: str, status: str, code: ReplyCode, final: bool = False, **kw: Any
    ) -> None:
        """Publish a reply; ``final`` records it as how the command ended."""
        reply = Reply(id=cid, device=dev.id, status=status, code=code, ts=time.time(), **kw)
        if final:
            dev.outcomes[cid] = reply
        self.publish(self.topics.reply(dev.id), reply.to_bytes())


class SimFleet:
    """Many simulated devices over a few MQTT 5 connections; see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        devices: Iterable[str],
        prefix: str = "edge",
        per_connection: int = 250,
        interval_s: float = 1.0,
        groups: Iterable[str] = (),
        model: str = "digits",
        version: str = "1",
        pipeline: str = "cam",
        step_delay_s: float = 0.0,
        probation_s: float | None = None,
        fetch_artifacts: bool = False,
        fetch_timeout_s: float = 10.0,
    ) -> None:
        self.host, self.port = host, port
        self.topics = Topics(prefix)
        self.interval_s = interval_s
        self.step_delay_s = step_delay_s
        # A real probation outlasts the other stages; None: as long as one of them.
        self.probation_s = step_delay_s if probation_s is None else probation_s
        self.fetch_artifacts = fetch_artifacts
        self.fetch_timeout_s = fetch_timeout_s
        initial = ModelState(
            name=model, active=version, last_known_good=version, status="serving",
            versions=[version],
        )  # fmt: skip
        ids = list(devices)
        self._devices = {d: DeviceSim(d, list(groups), pipeline, {model: initial}) for d in ids}
        self._connections = [
            _Connection(self, i, [self._devices[d] for d in ids[start : start + per_connection]])
            for i, start in enumerate(range(0, len(ids), per_connection))
        ]
        self._home = {d: c for c in self._connections for d in c.devices}
        self._phase = {d: interval_s * i / max(1, len(ids)) for i, d in enumerate(ids)}
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self, online: Iterable[str] | None = None) -> SimFleet:
        """Connect, then start every device (or only those in ``online``)."""
        for connection in self._connections:
            connection.connect()
        self._started = True
        for device in self._devices if online is None else online:
            self.start_device(device)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Every device says offline; what was published is delivered; disconnect."""
        if not self._started:
            return
        self._started = False
        for device in self._devices:
            self.stop_device(device)
        for connection in self._connections:
            connection.wait_delivered(timeout)
            connection.close()

    def start_device(self, device: str) -> None:
        conn, dev = self._home[device], self._devices[device]
        conn.call(lambda: conn.start_device(dev, self._phase[device]))

    def stop_device(self, device: str) -> None:
        conn, dev = self._home[device], self._devices[device]
        conn.call(lambda: conn.stop_device(dev))

    # ---------------------------------------------------------------- knobs, reads

    def fail_deploys(
        self, device: str, code: ReplyCode, message: str = "", times: int | None = None
    ) -> None:
        """Fail the device's next deploys (``times`` of them, or all) with ``code``,
        after every stage, as a version that failed probation does."""
        conn, dev = self._home[device], self._devices[device]
        text = message or f"simulated {code.value}"

        def set_failure() -> None:
            dev.fail_deploy = (code, text, times)

        conn.call(set_failure)

    @property
    def devices(self) -> list[str]:
        return list(self._devices)

    @property
    def sent_telemetry(self) -> int:
        return sum(d.sent_telemetry for d in self._devices.values())

    def active(self, device: str, model: str = "digits") -> str | None:
        state = self._devices[device].models.get(model)
        return state.active if state else None

    def runs(self, device: str) -> dict[str, int]:
        """Times each command id was executed on the device (never more than 1)."""
        return dict(self._devices[device].runs)

    def deploys(self, device: str) -> int:
        """Deploys the device executed (duplicates answered are not counted)."""
        return self._devices[device].deploys

    def installed(self, device: str) -> list[str]:
        """ "model version" for every version a deploy installed, in order: a device
        deployed twice to one version shows it twice."""
        return list(self._devices[device].installed)

    def online(self, device: str) -> bool:
        return self._devices[device].online

    def set_groups(self, device: str, groups: Iterable[str]) -> None:
        """The device joins or leaves groups (as after a config change): a new state."""
        conn, dev = self._home[device], self._devices[device]
        wanted = list(groups)

        def regroup() -> None:
            dev.groups = wanted
            if dev.online:
                conn.publish_state(dev)

        conn.call(regroup)

    def roll_back_locally(self, device: str, version: str, model: str = "digits") -> None:
        """The device goes back to a stored version on its own (as after a failed
        probation or an operator on the device): a new state, no command."""
        conn, dev = self._home[device], self._devices[device]

        def roll_back() -> None:
            m = dev.models[model]
            if version not in m.versions:
                raise ValueError(f"{device} has no {model} {version}")
            dev.models[model] = m.model_copy(update={"active": version, "status": "serving"})
            if dev.online:
                conn.publish_state(dev)

        conn.call(roll_back)
