"""The parts of ``benchmarks.fleet_server``: a real ``edge-fleet server`` process, the
simulated fleet in a child process, a fresh PostgreSQL database, and a signed bundle.

Nothing here measures; ``benchmarks.fleet_server`` does, with these.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from agent.models.manifest import generate_keypair, load_private_key, sign_manifest, write_bundle
from fleet.client import ServerClient
from fleet.sim import SimFleet
from tests.mqtt_support import Broker

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "edge"
GROUP = "bench"
MODEL = "digits"
PER_CONNECTION = 250
ADMIN_TOKEN_FILE = "admin.token"  # fleet.server.server.ADMIN_TOKEN_FILE, in its data dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def device_ids(n: int) -> list[str]:
    return [f"bench-{i:05d}" for i in range(n)]


# ------------------------------------------------------------------ the server


class ServerProcess:
    """``python -m fleet server --config <file>``: its own data directory, port and log."""

    def __init__(self, work: Path, broker: Broker, db_url: str, trusted_key: Path) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "server.log"
        self.data_dir = work / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: ServerClient | None = None
        work.mkdir(parents=True, exist_ok=True)
        config = {
            "data_dir": str(self.data_dir),
            "db": db_url,
            "instance": "bench",
            "broker": {"host": broker.host, "port": broker.port, "prefix": PREFIX},
            "http": {"bind": f"127.0.0.1:{self.port}"},
            "trusted_keys": [str(trusted_key)],
            "require_signature": True,
        }
        self.config = work / "server.yaml"
        self.config.write_text(yaml.safe_dump(config))

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not running"
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleet", "server", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited {self.proc.returncode}: {self.tail()}")
            try:
                self.health()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no /healthz within {timeout:g}s: {self.tail()}") from None
                time.sleep(0.1)
        token = (self.data_dir / ADMIN_TOKEN_FILE).read_text().strip()
        self.client = ServerClient(self.url, token, timeout=60)

    def health(self) -> dict[str, Any]:
        """``/healthz``: the process's figures (``ingest_*``, ``reconcile_*``), no token."""
        with urllib.request.urlopen(self.url + "/healthz", timeout=10) as r:
            body: dict[str, Any] = json.loads(r.read())
            return body

    def memory_mb(self) -> dict[str, float]:
        """VmHWM (peak resident) and VmRSS (now) of the server process, in MB."""
        out: dict[str, float] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = round(int(value.split()[0]) / 1024, 1)
        return out

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM; the seconds until the process exited."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0.0
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise RuntimeError(f"the server did not stop within {timeout:g}s of SIGTERM") from None
        if proc.returncode != 0:
            raise RuntimeError(f"the server exited {proc.returncode} on SIGTERM: {self.tail()}")
        return time.monotonic() - started

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def tail(self, n: int = 1500) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


# ------------------------------------------------------------------ the devices


def _sim_process(
    host: str,
    port: int,
    devices: int,
    interval_s: float,
    conn: Connection,
    prefix: str = PREFIX,
    per_connection: int = PER_CONNECTION,
) -> None:
    """The simulated fleet, in its own process: start, answer requests, stop when told."""
    logging.basicConfig(level=logging.WARNING)
    ids = device_ids(devices)
    fleet = SimFleet(
        host, port, devices=ids, prefix=prefix, per_connection=per_connection,
        interval_s=interval_s, groups=[GROUP], model=MODEL, version="1",
    )  # fmt: skip
    try:
        fleet.start()
        conn.send({"started": True})
        while True:
            request, arg = conn.recv()
            if request == "sent":
                conn.send({"sent": fleet.sent_telemetry})
            elif request == "active":  # devices whose active version is `arg`
                conn.send({"active": sum(fleet.active(d) == arg for d in ids)})
            elif request == "interval":  # read by each device's timer at its next send
                fleet.interval_s = float(arg)
                conn.send({"interval": fleet.interval_s})
            elif request == "deploys":
                conn.send({"deploys": sum(fleet.deploys(d) for d in ids)})
            elif request in ("device_start", "device_stop"):  # its state is published
                (fleet.start_device if request == "device_start" else fleet.stop_device)(arg)
                conn.send({"done": True})
            elif request == "stop":
                break
        fleet.stop(timeout=180)
        conn.send({"sent": fleet.sent_telemetry})
    except Exception as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})


class SimChild:
    """``fleet.sim.SimFleet`` in a child process (the devices' side, as another machine
    would be), asked for its counts over a pipe."""

    def __init__(
        self,
        broker: Broker,
        devices: int,
        interval_s: float,
        *,
        prefix: str = PREFIX,
        per_connection: int = PER_CONNECTION,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=_sim_process,
            args=(broker.host, broker.port, devices, interval_s, child, prefix, per_connection),
            name="sim-fleet",
            daemon=True,
        )

    def start(self, timeout: float = 300.0) -> None:
        self.process.start()
        self._answer(timeout)

    def sent(self) -> int:
        return int(self._ask("sent")["sent"])

    def active(self, version: str) -> int:
        return int(self._ask("active", version)["active"])

    def set_interval(self, seconds: float) -> None:
        """Every device's telemetry interval from its next message on."""
        self._ask("interval", seconds)

    def deploys(self) -> int:
        return int(self._ask("deploys")["deploys"])

    def change(self, op: str, device: str) -> None:
        """``op`` "start" or "stop" one device; returns once its state is published."""
        self._ask(f"device_{op}", device)

    def stop(self) -> int:
        """Every device says offline and its telemetry is delivered; the total sent."""
        self._conn.send(("stop", None))
        sent = int(self._answer(240)["sent"])
        self.process.join(30)
        return sent

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)

    def _ask(self, request: str, arg: Any = None) -> dict[str, Any]:
        self._conn.send((request, arg))
        return self._answer(60)

    def _answer(self, timeout: float) -> dict[str, Any]:
        if not self._conn.poll(timeout):
            raise TimeoutError("the simulated fleet did not answer")
        answer: dict[str, Any] = self._conn.recv()
        if "error" in answer:
            raise RuntimeError(f"simulated fleet: {answer['error']}")
        return answer


# ------------------------------------------------------------------ databases


class FreshPostgres:
    """A new database on the PostgreSQL server, dropped afterwards."""

    def __init__(self, url: str) -> None:
        self.admin = create_engine(make_url(url), isolation_level="AUTOCOMMIT")
        self.base = make_url(url)
        self.name = f"edge_fleet_bench_{uuid.uuid4().hex[:8]}"

    def create(self) -> str:
        with self.admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{self.name}"'))
        return self.base.set(database=self.name).render_as_string(hide_password=False)

    def drop(self) -> None:
        with self.admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


# ------------------------------------------------------------------ the bundle


def signed_bundle(work: Path, version: str, model_kb: int = 64) -> tuple[Path, Path]:
    """A bundle of ``MODEL`` ``version`` (random model bytes: the simulator does not run
    it) signed with a new key; (bundle directory, public key file)."""
    private, public = generate_keypair()
    keys = work / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "signing.pem").write_bytes(private)
    (keys / "signing.pub").write_bytes(public)
    model = os.urandom(model_kb * 1024)
    manifest: dict[str, Any] = {
        "format": 1,
        "name": MODEL,
        "version": version,
        "created_at": "2026-01-01T00:00:00Z",
        "task": "classify",
        "quantization": "int8",
        "model": {
            "file": "model.tflite",
            "sha256": hashlib.sha256(model).hexdigest(),
            "size": len(model),
        },
        "inputs": [{"name": "input", "shape": [1, 8, 8, 1], "dtype": "int8"}],
        "outputs": [{"name": "output", "shape": [1, 10], "dtype": "int8"}],
        "producer": {"converter": "benchmarks.fleet_server"},
    }
    signature = sign_manifest(manifest, load_private_key(keys / "signing.pem"))
    bundle = write_bundle(work / f"{MODEL}-{version}", model, manifest, signature)
    return bundle, keys / "signing.pub"
