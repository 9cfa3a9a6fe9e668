"""A real ``edge-fleet server`` process for end-to-end tests, and its API over urllib."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.mqtt_support import Broker, free_port

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """``python -m fleet server --config <file>`` with its own data directory and port."""

    def __init__(
        self,
        workdir: Path,
        broker: Broker,
        *,
        db: str | None = None,
        prefix: str = "edge",
        instance: str = "s1",
        trusted_keys: list[Path] | None = None,
        reconcile: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{instance}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "data_dir": str(workdir / "data"),
            "db": db,
            "instance": instance,
            "broker": {"host": broker.host, "port": broker.port, "prefix": prefix},
            "http": {"bind": f"127.0.0.1:{self.port}"},
            "trusted_keys": [str(k) for k in trusted_keys or []],
            "require_signature": bool(trusted_keys),
            "reconcile": {"interval_s": 0.2, "backoff_s": 1.0, "lease_s": 3.0, **(reconcile or {})},
            **(extra or {}),
        }
        self.config = workdir / f"server-{instance}.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.token: str | None = None

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleet", "server", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            self.kill()
            raise RuntimeError(f"server did not answer /healthz within {timeout}s: {self.tail()}")
        token_file = self.workdir / "data" / "admin.token"
        if self.token is None and token_file.exists():
            self.token = token_file.read_text().strip()

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    # ------------------------------------------------------------------ API

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{method} {path}: {err.code} {err.read()[:500]!r}") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
