"""A fleet deploy at scale: N real agents in one process, one Mosquitto, `edge-fleet deploy`.

    python -m benchmarks.fleet [--quick] --json [--agents N] [--via mqtt|http]

Each simulated device is the real agent (``agent.service.Agent``: MQTT link, outbox,
command plane, artifact fetcher, model store, validation in a child process,
hot-swap, probation, a pipeline on a synthetic source), sized to share a 2-core
machine: 32x32 frames at ``FPS``, one interpreter thread, telemetry every
``TELEMETRY_S``. The deploy is the operator's: ``python -m fleet deploy --group``
as its own process, chunks over MQTT by default. The model is the small int8 CNN
of ``benchmarks.hotswap`` (built once with TensorFlow in a child, cached).

Figures per N: ``all_active`` (the console exited 0 and every retained state shows
the new version serving, as ``edge-fleet status`` reads them; ``serving_seen_live`` is
how many the in-process observer saw change), ``deploy_s`` (the first command on
the broker to the last state that shows the version serving, after probation),
``broker_msgs_per_s``
(PUBLISH packets in plus out of the broker per second over the deploy, from its
``$SYS`` counters), ``validation_cpu_s`` (CPU of all validation children: the part
of the deploy that is one device's work on real hardware but shares 2 cores here),
``agents_cpu_s`` (the agents' process), ``start_s`` (bringing the agents up).
``--quick``: 50 agents; otherwise the sweep 50, 200, 500, or ``--agents N`` alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.live import LiveConfig
from agent.models import manifest as mf
from agent.models.runtime import load_model
from agent.protocol import State
from agent.service import Agent
from benchmarks.hotswap import build_model
from tests.mqtt_support import Broker

GROUP = "bench"
PREFIX = "edge"
FPS = 1.0
TELEMETRY_S = 10.0
PROBATION_S = 2.0
SWEEP = (50, 200, 500)
# Generous: on 2 shared cores, N validation children run at once.
VALIDATION_TIMEOUT_S = 600.0
# Memory one validation child peaks at (measured before each run); N of them may
# overlap, and a run that cannot hold them is refused rather than left to the OOM killer.
MEMORY_HEADROOM = 0.8
# A run in progress is stopped when the machine's available memory falls below this.
MEMORY_FLOOR_MB = 2000.0

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------- the bundle


def make_bundle(dest: Path, model: Path, version: str) -> tuple[Path, Path]:
    """A signed bundle of ``model`` and the public key that verifies it."""
    private, public = mf.generate_keypair()
    (dest / "keys").mkdir(parents=True, exist_ok=True)
    (dest / "keys" / "fleet.pub").write_bytes(public)
    data = model.read_bytes()
    loaded = load_model(data)

    def spec(t: Any) -> dict[str, Any]:
        return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                "scale": t.scale, "zero_point": t.zero_point}  # fmt: skip

    manifest: dict[str, Any] = {
        "format": 1,
        "name": "tiny",
        "version": version,
        "created_at": "2026-01-01T00:00:00Z",
        "task": "classify",
        "quantization": "int8",
        "model": {"file": "model.tflite", "sha256": mf.sha256_file(model), "size": len(data)},
        "inputs": [spec(t) for t in loaded.inputs],
        "outputs": [spec(t) for t in loaded.outputs],
        "labels": [str(i) for i in range(10)],
        "producer": {"converter": "benchmarks.fleet"},
    }
    (dest / "keys" / "fleet.key").write_bytes(private)
    signature = mf.sign_manifest(manifest, mf.load_private_key(dest / "keys" / "fleet.key"))
    bundle = mf.write_bundle(dest / f"tiny-{version}", model, manifest, signature)
    return bundle, dest / "keys" / "fleet.pub"


# ----------------------------------------------------------------------- the agents


def agent_config(workdir: Path, index: int, broker: Broker, pub: Path) -> Path:
    device = f"dev-{index:04d}"
    config = {
        "device": {"id": device, "groups": [GROUP]},
        "state_dir": str(workdir / device),
        "log_level": "WARNING",
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX,
                 "keepalive_s": 60},
        "runtime": {"num_threads": 1},
        "models": {
            "trusted_keys": [str(pub)],
            "validation": {"timeout_s": VALIDATION_TIMEOUT_S},
            "probation": {"duration_s": PROBATION_S, "min_inferences": 1},
        },
        "pipelines": [{
            "name": "cam", "model": "tiny", "queue": "latest",
            "source": {"type": "synthetic", "kind": "frames", "width": 32, "height": 32,
                       "channels": 3, "fps": FPS, "seed": index},
            "publish": {"mode": "rate", "max_per_s": 1},
        }],
        "telemetry": {"interval_s": TELEMETRY_S},
        "transfer": {"chunk_wait_s": 10.0, "chunk_requests": 12},
    }  # fmt: skip
    path = workdir / f"{device}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Telemetry:
    """What ``Agent.run`` does every ``telemetry.interval_s``, for many agents, staggered."""

    def __init__(self, agents: list[Agent]) -> None:
        self.agents = agents
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-telemetry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        step = TELEMETRY_S / max(1, len(self.agents))
        i = 0
        while not self._stop.wait(step):
            agent = self.agents[i % len(self.agents)]
            agent.outbox.enqueue_telemetry(agent.telemetry.build())
            i += 1


# ------------------------------------------------------------------ the observer


@dataclass
class Observer:
    """Watches the broker: the first command, each device's state, the $SYS counters."""

    broker: Broker
    version: str
    first_command: float | None = None
    serving_at: dict[str, float] = field(default_factory=dict)
    sys: dict[str, tuple[float, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-observer-{uuid.uuid4().hex[:6]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        topics = [
            f"{PREFIX}/+/cmd",
            f"{PREFIX}/+/state",
            "$SYS/broker/publish/messages/received",
            "$SYS/broker/publish/messages/sent",
        ]
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()
        if not ready.wait(30):
            raise RuntimeError("observer could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.monotonic()
        with self.lock:
            if msg.topic.startswith("$SYS/"):
                self.sys[msg.topic.rsplit("/", 1)[1]] = (now, int(msg.payload))
            elif msg.topic.endswith("/cmd"):
                if self.first_command is None:
                    self.first_command = now
            else:
                state = State.model_validate_json(msg.payload)
                if any(m.active == self.version and m.status == "serving" for m in state.models):
                    self.serving_at.setdefault(state.device, now)

    def published(self) -> tuple[float, int]:
        """(when the broker last reported, PUBLISH packets in + out so far)."""
        with self.lock:
            rx, tx = self.sys.get("received", (0.0, 0)), self.sys.get("sent", (0.0, 0))
        return max(rx[0], tx[0]), rx[1] + tx[1]

    def next_report(self, timeout: float = 5.0) -> tuple[float, int]:
        before = self.published()[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.published()
            if now[0] > before:
                return now
            time.sleep(0.05)
        return self.published()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ------------------------------------------------------------------------ one run


def cpu_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


_COST = r"""
import json, resource, sys, time
from pathlib import Path
from agent.models.validate import Validator
v = Validator(num_threads=1)
v.run(Path(sys.argv[1]))  # warm the page cache
r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
v.run(Path(sys.argv[1]))
r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({
    "validation_child_s": round(time.monotonic() - t0, 3),
    "validation_child_cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 3),
    "validation_child_rss_mb": round(r1.ru_maxrss / 1024, 1),
}))
"""


def validation_cost(model: Path) -> dict[str, float]:
    """One validation child alone: wall time, CPU and peak memory. Measured from a small
    parent, since a child forked from this big process counts its pages until exec."""
    out = subprocess.run(
        [sys.executable, "-c", _COST, str(model)], capture_output=True, text=True, check=True
    ).stdout
    cost: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return cost


class MemoryGuard:
    """Stops a run before the machine runs out of memory (other work shares it)."""

    def __init__(self, floor_mb: float, on_low: Any) -> None:
        self.floor_mb = floor_mb
        self.on_low = on_low
        self.tripped: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            free = available_mb()
            if free < self.floor_mb:
                self.tripped = free
                self.on_low()
                return


def available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def run_fleet(
    n: int, model: Path, via: str, deploy_timeout: float, cost: dict[str, float]
) -> dict[str, Any]:
    need = n * cost["validation_child_rss_mb"]
    if need > MEMORY_HEADROOM * available_mb():
        return {
            "agents": n,
            "all_active": False,
            "not_run": f"{n} validation children at once could need {need:.0f} MB; "
            f"{available_mb():.0f} MB available",
        }
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "mosquitto", listener_conf="sys_interval 1\nmax_keepalive 120\n")
        broker.start()
        agents: list[Agent] = []
        telemetry: Telemetry | None = None
        observer: Observer | None = None
        try:
            bundle, pub = make_bundle(work, model, "1")
            observer = Observer(broker, "1")
            started = time.monotonic()
            for i in range(n):
                agent = Agent(LiveConfig.load(agent_config(work, i, broker, pub)))
                agent.start(connect_wait_s=5.0)
                agents.append(agent)
            deadline = time.monotonic() + 60
            while not all(a.link.connected for a in agents) and time.monotonic() < deadline:
                time.sleep(0.1)
            start_s = time.monotonic() - started
            telemetry = Telemetry(agents)
            telemetry.start()
            time.sleep(1.0)  # the retained states settle
            sys_before = observer.next_report()
            cpu_children, cpu_self = cpu_of_children(), time.process_time()
            running: list[subprocess.Popen[str]] = []
            guard = MemoryGuard(MEMORY_FLOOR_MB, lambda: kill_all(running))
            guard.start()
            try:
                fleet = fleet_deploy(broker, bundle, pub, via, deploy_timeout, work, running)
            finally:
                guard.stop()
            cpu_validation = cpu_of_children() - cpu_children - fleet["cpu_s"]
            cpu_agents = time.process_time() - cpu_self
            serving = dict(observer.serving_at)
            sys_after = observer.next_report()
            first = observer.first_command
            end = max(serving.values()) if serving else None
            # The observer shares this process with N agents and can fall behind (the
            # broker then drops what it has queued for it), so the verdict is the
            # operator's: the retained states as `edge-fleet status` reads them.
            retained = serving_in_status(broker, "1")
            all_active = fleet["exit_code"] == 0 and retained == n
            msgs = sys_after[1] - sys_before[1]
            span = sys_after[0] - sys_before[0]
            return {
                "agents": n,
                "all_active": all_active,
                "serving": retained,
                "serving_seen_live": len(serving),
                "deploy_s": round(end - first, 2) if end and first else None,
                "broker_msgs_per_s": round(msgs / span, 1) if span > 0 else None,
                "broker_msgs": msgs,
                "fleet_exit_code": fleet["exit_code"],
                "fleet_result": fleet.get("result"),
                "failed": fleet.get("failed", []),
                "start_s": round(start_s, 2),
                "validation_cpu_s": round(cpu_validation, 2),
                "agents_cpu_s": round(cpu_agents, 2),
                "fleet_cpu_s": round(fleet["cpu_s"], 2),
                "threads": threading.active_count(),
                **(
                    {"stopped": f"available memory fell to {guard.tripped:.0f} MB"}
                    if guard.tripped is not None
                    else {}
                ),
            }
        finally:
            if telemetry is not None:
                telemetry.stop()
            if observer is not None:
                observer.close()
            stop_all(agents)
            broker.stop()


def serving_in_status(broker: Broker, version: str) -> int:
    """Devices whose retained state shows ``version`` serving, by ``edge-fleet status``."""
    out = subprocess.run(
        [sys.executable, "-m", "fleet", "status", "--json", "--group", GROUP,
         "--broker", f"{broker.host}:{broker.port}", "--prefix", PREFIX, "--wait", "0.5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if out.returncode != 0:
        log.warning("edge-fleet status failed: %s", out.stderr.strip()[-300:])
        return 0
    devices = json.loads(out.stdout)["devices"]
    return sum(
        any(m.get("active") == version and m.get("status") == "serving" for m in d["models"])
        for d in devices
    )


def kill_all(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.kill()


def stop_all(agents: list[Agent]) -> None:
    threads = [threading.Thread(target=a.stop, name=f"stop-{i}") for i, a in enumerate(agents)]
    for i in range(0, len(threads), 50):
        batch = threads[i : i + 50]
        for t in batch:
            t.start()
        for t in batch:
            t.join(60)


def fleet_deploy(
    broker: Broker,
    bundle: Path,
    pub: Path,
    via: str,
    timeout: float,
    work: Path,
    running: list[subprocess.Popen[str]],
) -> dict[str, Any]:
    """``edge-fleet deploy --group`` as the operator runs it; its summary and CPU time."""
    err = (work / "fleet.err").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "deploy", str(bundle), "--group", GROUP,
         "--broker", f"{broker.host}:{broker.port}", "--prefix", PREFIX, "--pub", str(pub),
         "--via", via, "--timeout", str(timeout), "--json"],
        stdout=subprocess.PIPE, stderr=err, text=True,
    )  # fmt: skip
    running.append(proc)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    summary: dict[str, Any] = {
        "exit_code": proc.returncode,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }
    try:
        data = json.loads(out.strip().splitlines()[-1])
        summary["result"] = data.get("result")
        summary["failed"] = [
            {k: d.get(k) for k in ("device", "status", "code", "message")}
            for d in data.get("devices", []) if d.get("status") != "done"
        ][:10]  # fmt: skip
    except (ValueError, IndexError):
        summary["result"] = f"no summary: {err.read()[-500:]}"
    err.close()
    return summary


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet")
    parser.add_argument("--quick", action="store_true", help="50 agents only (< 60 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--agents", type=int, help="one run with N agents instead of the sweep")
    parser.add_argument("--via", choices=("mqtt", "http"), default="mqtt")
    parser.add_argument("--timeout", type=float, default=300.0, help="deploy timeout (s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    # The agents' own loggers: only trouble, or 500 agents drown the output.
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("agent.link").setLevel(logging.WARNING)
    sizes = [args.agents] if args.agents else [50] if args.quick else list(SWEEP)
    model = build_model("small-cnn", 0)
    cost = validation_cost(model)
    runs = []
    for n in sizes:
        runs.append(run_fleet(n, model, args.via, args.timeout, cost))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    first = runs[0]
    report: dict[str, Any] = {
        "agents": first["agents"],
        "all_active": first["all_active"],
        "deploy_s": first.get("deploy_s"),
        "broker_msgs_per_s": first.get("broker_msgs_per_s"),
        "via": args.via,
        "cores": os.cpu_count(),
        **cost,
        "sweep": runs,
    }
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0 if all(r["all_active"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
