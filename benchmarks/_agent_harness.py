"""The parts the agent-process benchmarks share (``benchmarks.chaos``, ``benchmarks.startup``).

The agent runs as systemd runs it: ``python -m agent run CONFIG`` in its own process,
against a private Mosquitto (``tests.mqtt_support.Broker``). An ``Observer`` is the
console side: one MQTT 5 client with a persistent session that records every seq of
every result and telemetry message, the retained states, and every reply by command
id. Models are real converter-built digits bundles, built once with TensorFlow in a
child process (the benchmark process never imports TensorFlow) and cached.

Not a benchmark itself: the leading underscore keeps ``make bench`` from running it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.models.manifest import read_bundle
from agent.models.store import ModelStore
from tests.mqtt_support import Broker

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "edge"
MODEL = "digits"
PIPELINE = "cam"

_BUILD = r"""
import sys
from pathlib import Path
from tests.converter_support import build_digits_bundle
dest = Path(sys.argv[1])
for version in sys.argv[2:]:
    build_digits_bundle(dest / f"digits-{version}", version)
"""


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "edge-deploy" / "benchmarks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def digits_bundles(versions: Iterable[str] = ("1", "2")) -> dict[str, Path]:
    """Converter-built int8 digits bundles (unsigned), one per version, cached."""
    root = cache_dir() / "digits-bundles"
    wanted = list(versions)
    missing = [v for v in wanted if not (root / f"digits-{v}" / "manifest.json").exists()]
    if missing:
        tmp = root.with_name(f"digits-bundles.{uuid.uuid4().hex[:6]}.tmp")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
        try:
            subprocess.run(
                [sys.executable, "-c", _BUILD, str(tmp), *missing],
                check=True, env=env, cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600,
            )  # fmt: skip
            root.mkdir(parents=True, exist_ok=True)
            for v in missing:
                with contextlib.suppress(OSError):
                    os.replace(tmp / f"digits-{v}", root / f"digits-{v}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {v: root / f"digits-{v}" for v in wanted}


def preinstall(state_dir: Path, bundle: Path) -> str:
    """Put ``bundle`` in a device's store as active and last-known-good, as a past deploy
    that passed probation would have left it. Returns the version."""
    b = read_bundle(bundle)
    store = ModelStore(state_dir, require_signature=False)
    store.open()
    stored = store.install(b.manifest_data, b.signature, b.model_path)
    store.set_active(stored.name, stored.version)
    store.mark_good(stored.name, stored.version)
    return stored.version


def agent_config(
    workdir: Path,
    device: str,
    broker: Broker,
    *,
    state_dir: Path | None = None,
    fps: float = 50.0,
    prefer: str = "auto",
    extra: dict[str, Any] | None = None,
) -> Path:
    """One device: a synthetic digits source at ``fps``, every result published."""
    config: dict[str, Any] = {
        "device": {"id": device, "groups": ["chaos"]},
        "state_dir": str(state_dir or workdir / "state"),
        "log_level": "INFO",
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX,
                 "keepalive_s": 10, "reconnect": {"min_delay_s": 0.2, "max_delay_s": 1.0}},
        "runtime": {"prefer": prefer, "num_threads": 1},
        "models": {
            "require_signature": False,
            "validation": {"timeout_s": 120},
            "probation": {"duration_s": 2.0, "min_inferences": 5},
        },
        "pipelines": [{
            "name": PIPELINE, "model": MODEL, "queue": "fifo",
            "source": {"type": "synthetic", "kind": "digits", "width": 32, "height": 32,
                       "channels": 1, "fps": fps},
            "publish": {"mode": "every"},
        }],
        "telemetry": {"interval_s": 1},
        "transfer": {"chunk_wait_s": 2.0},
    }  # fmt: skip
    for key, value in (extra or {}).items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{device}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ------------------------------------------------------------------ the agent process


class AgentProcess:
    """``python -m agent run CONFIG``; its log collects every start of it."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self, env: dict[str, str] | None = None) -> None:
        if self.alive:
            raise RuntimeError("agent already running")
        full = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
        for key in ("EDGE_AGENT_KILL_AT", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            full.pop(key, None)
        full.update(env or {})
        with self.log.open("ab") as out:
            out.write(f"\n===== start {time.strftime('%H:%M:%S')} env={env or {}}\n".encode())
            out.flush()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, env=full, cwd=ROOT,
            )  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """kill -9: no clean shutdown of anything."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        self.kill()

    def rss_mb(self) -> float | None:
        """Resident memory from /proc/<pid>/status (VmRSS)."""
        if not self.alive:
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def thread_deaths_in_log(text: str) -> int:
    """Threads that ended with an exception: Python prints this for each one."""
    return text.count("Exception in thread")


# ------------------------------------------------------------------------ the observer


@dataclass
class DeviceLog:
    """What the observer has seen of one device."""

    seqs: set[int] = field(default_factory=set)
    messages: int = 0
    results: int = 0
    # (the result's own ts: when its frame was captured, version)
    result_versions: list[tuple[float, str]] = field(default_factory=list)
    # (ts, the source's frame number): when the source opened (frame n is due n/fps later)
    result_frames: list[tuple[float, int]] = field(default_factory=list)
    first_result_at: float | None = None  # arrival
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    states: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    replies: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))


class Observer:
    """The console's side: every seq, state and reply of every device under PREFIX."""

    def __init__(self, broker: Broker) -> None:
        self.lock = threading.Lock()
        self.devices: dict[str, DeviceLog] = defaultdict(DeviceLog)
        self.invalid = 0
        self._handlers: dict[str, Callable[[bytes], None]] = {}
        ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"chaos-observer-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        # paho types these as whole seconds; fractions work and keep outages short.
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self.client.max_inflight_messages_set(200)
        topics = [
            f"{PREFIX}/+/results/+",
            f"{PREFIX}/+/telemetry",
            f"{PREFIX}/+/state",
            f"{PREFIX}/+/reply",
            f"{PREFIX}/transfer/+/missing",
        ]
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        # A persistent session: what arrives while the broker is down or restarting
        # waits for us (the first connect starts clean, reconnects resume).
        props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, keepalive=10, properties=props)
        self.client.loop_start()
        if not ready.wait(10):
            self.close()
            raise RuntimeError("observer could not subscribe")

    def close(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()

    def device(self, device: str) -> DeviceLog:
        with self.lock:
            return self.devices[device]

    # -------------------------------------------------------------- receiving

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        # Wall-clock times throughout: results carry the device's (same machine) ts.
        now = time.time()
        parts = msg.topic.split("/")
        if len(parts) >= 3 and parts[1] == "transfer":
            handler = self._handlers.get(msg.topic)
            if handler is not None:
                handler(msg.payload)
            return
        try:
            data = json.loads(msg.payload)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError:
            with self.lock:
                self.invalid += 1
            return
        device, kind = parts[1], parts[2]
        with self.lock:
            log = self.devices[device]
            if kind in ("results", "telemetry"):
                seq = data.get("seq")
                if isinstance(seq, int):
                    log.seqs.add(seq)
                log.messages += 1
                if kind == "results":
                    log.results += 1
                    ts = data.get("ts")
                    ts = float(ts) if isinstance(ts, int | float) else now
                    log.result_versions.append((ts, str(data.get("version"))))
                    frame = data.get("frame")
                    if isinstance(frame, int):
                        log.result_frames.append((ts, frame))
                    if log.first_result_at is None:
                        log.first_result_at = now
                else:
                    log.telemetry.append(data)
            elif kind == "state":
                log.states.append((now, data))
            elif kind == "reply":
                log.replies[str(data.get("id", ""))].append(data)

    def handle(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """``fleet.serve`` Subscribe: the observer already listens to every chunk request."""
        self._handlers[topic] = handler

    # ---------------------------------------------------------------- sending

    def publish_many(self, messages: Iterable[tuple[str, bytes]], timeout: float = 30.0) -> None:
        infos = [self.client.publish(topic, payload, qos=1) for topic, payload in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError("the broker did not acknowledge a publish")

    def publish(self, topic: str, payload: bytes, timeout: float = 10.0) -> None:
        self.publish_many([(topic, payload)], timeout)

    def command(self, device: str, body: dict[str, Any]) -> str:
        """Send a command (an ``id`` is added when missing); returns its id."""
        body = {"id": f"c-{uuid.uuid4().hex[:12]}", **body}
        self.publish(f"{PREFIX}/{device}/cmd", json.dumps(body).encode())
        return str(body["id"])

    # ---------------------------------------------------------------- reading

    def final_reply(self, device: str, command_id: str) -> dict[str, Any] | None:
        with self.lock:
            replies = list(self.devices[device].replies.get(command_id, []))
        for reply in replies:
            if reply.get("status") in ("done", "failed"):
                return reply
        return None

    def replies(self, device: str, command_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.devices[device].replies.get(command_id, []))

    def wait_final(self, device: str, command_id: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.final_reply(device, command_id)
            if reply is not None:
                return reply
            time.sleep(0.05)
        return None

    def ask(self, device: str, op: str, timeout: float = 15.0) -> dict[str, Any] | None:
        """A ``ping`` or ``status``: its final reply, or None when none came."""
        return self.wait_final(device, self.command(device, {"op": op}), timeout)

    def last_state(self, device: str, since: float = 0.0) -> dict[str, Any] | None:
        with self.lock:
            states = [s for t, s in self.devices[device].states if t >= since]
        return states[-1] if states else None

    def last_telemetry(self, device: str) -> dict[str, Any] | None:
        with self.lock:
            telemetry = self.devices[device].telemetry
            return telemetry[-1] if telemetry else None

    def results(self, device: str, since: float = 0.0) -> list[str]:
        """Versions of the results captured after ``since`` (Unix time)."""
        with self.lock:
            return [v for t, v in self.devices[device].result_versions if t >= since]

    def seqs(self, device: str) -> set[int]:
        with self.lock:
            return set(self.devices[device].seqs)


def wait_until(predicate: Callable[[], object], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def model_state(state: dict[str, Any] | None, name: str = MODEL) -> dict[str, Any]:
    for model in (state or {}).get("models", []):
        if model.get("name") == name:
            return dict(model)
    return {}


def serving(observer: Observer, device: str, since: float) -> Callable[[], bool]:
    """True once an agent started after ``since`` (Unix time) says it is online and its
    results flow."""

    def check() -> bool:
        state = observer.last_state(device, since)
        fresh = bool(state and state.get("online") and float(state.get("since", 0)) >= since)
        return fresh and len(observer.results(device, since)) >= 5

    return check


# ---------------------------------------------------------------------- HTTP artifacts


class ArtifactHttp:
    """Serves model files; a path under ``/stall/`` sends a quarter, then hangs."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.release = threading.Event()
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                name = self.path.rsplit("/", 1)[-1]
                data = outer.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.path.startswith("/stall/"):
                    self.wfile.write(data[: len(data) // 4])
                    self.wfile.flush()
                    outer.release.wait(600)
                    return
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="bench-http", daemon=True
        )
        self.thread.start()

    def url(self, name: str, *, stall: bool = False) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/{'stall/' if stall else ''}{name}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------------- sd_notify


class NotifySocket:
    """systemd's side of sd_notify: a datagram socket that records when (Unix time) each
    line came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[tuple[float, str]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-notify", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.time()
            for line in data.decode(errors="replace").splitlines():
                self.received.append((now, line))

    def first(self, message: str) -> float | None:
        return next((t for t, line in list(self.received) if line == message), None)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self.thread.join(2)
