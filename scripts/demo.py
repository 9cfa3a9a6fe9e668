"""`make demo`: the whole loop on one machine, with the real commands.

convert (edge-convert) -> broker -> agent (edge-agent run, a synthetic camera showing
handwritten digits) -> deploy v1 (edge-fleet deploy) -> live results -> hot-swap to v2
-> an unsigned model refused while v2 keeps serving -> the fleet server (edge-fleet
server) brings a second agent, offline during the rollout, to v2 when it is back, after
the CLI exited -> stop everything it started.
Ends with `demo: ok` (exit 0) or `demo: FAILED: <what>` (exit 1).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEVICE = "demo-pi"


class DemoFailed(Exception):
    pass


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def run(*cmd: str | Path, timeout: float = 300, quiet: bool = False) -> str:
    args = [str(c) for c in cmd]
    shown = " ".join(a if len(a) < 60 else "…" + a[-40:] for a in args)
    if not quiet:
        print(f"$ {shown.replace(str(BIN) + '/', '')}", flush=True)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout.strip()
    if out and not quiet:
        print("\n".join("  " + line for line in out.splitlines()[-12:]), flush=True)
    if proc.returncode != 0:
        raise DemoFailed(f"{Path(args[0]).name} {args[1]} exited {proc.returncode}: "
                         f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")  # fmt: skip
    return proc.stdout


def broker_answers(host: str, port: int) -> bool:
    """Whether an MQTT broker (not just any listener) accepts a CONNECT there."""
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            # MQTT 3.1.1 CONNECT, clean session, keepalive 10, client id "probe".
            s.sendall(bytes.fromhex("100f00044d5154540402000a000370726f6265"))
            return s.recv(4)[:1] == b"\x20"
    except OSError:
        return False


class Processes:
    """Everything the demo starts, stopped by PID at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, *cmd: str | Path, log: Path) -> subprocess.Popen[Any]:
        out = log.open("w")
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def start_broker(procs: Processes, work: Path) -> tuple[str, int, str]:
    if broker_answers("127.0.0.1", 1883):
        return "127.0.0.1", 1883, "the system Mosquitto on 127.0.0.1:1883"
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(mosquitto, os.X_OK):
        raise DemoFailed("no MQTT broker on 127.0.0.1:1883 and no mosquitto binary to start one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    procs.start(mosquitto, "-c", conf, log=work / "mosquitto.log")
    deadline = time.monotonic() + 10
    while not broker_answers("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise DemoFailed("could not start a local MQTT broker (install mosquitto)")
        time.sleep(0.1)
    return "127.0.0.1", port, f"a private broker on 127.0.0.1:{port}"


class Watcher:
    """Reads the device's results and telemetry, prints a line a second, counts frames."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from agent.loops.sources.synthetic import digit_samples

        self.labels = digit_samples()[1]
        self.results: list[dict[str, Any]] = []
        self.telemetry: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"demo-{uuid.uuid4().hex[:6]}"
        )
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._prefix = prefix
        self._client.subscribe(f"{prefix}/{DEVICE}/#", qos=1)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        kind = msg.topic.split("/")[-2] if "/results/" in msg.topic else msg.topic.rsplit("/", 1)[1]
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        with self._lock:
            {"results": self.results, "telemetry": self.telemetry, "reply": self.replies}.get(
                kind, []
            ).append(data)

    def show(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(1.0)
            with self._lock:
                last = self.results[-1] if self.results else None
                tele = self.telemetry[-1] if self.telemetry else None
            if last is None:
                print("  (no results yet)", flush=True)
                continue
            truth = int(self.labels[(last["frame"] - 1) % len(self.labels)])
            top = last["classes"][0]
            fps = tele["pipelines"]["camera"]["fps"] if tele else 0.0
            p95 = (tele["pipelines"]["camera"].get("invoke_ms_p95") if tele else None) or 0.0
            print(
                f"  frame {last['frame']:5d}  digit {truth} -> predicted {top['label']} "
                f"({top['score']:.2f})  model {last['model']} v{last['version']}  "
                f"{fps:5.1f} fps  invoke p95 {p95:.2f} ms",
                flush=True,
            )

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise DemoFailed(f"timed out waiting for {what}")
            time.sleep(0.1)

    def since(self, n: int) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.results[n:])

    def close(self) -> None:
        # Leave no retained message behind on a shared broker.
        self._client.publish(
            f"{self._prefix}/{DEVICE}/state", b"", qos=1, retain=True
        ).wait_for_publish(5)
        self._client.loop_stop()
        self._client.disconnect()


def accuracy(results: list[dict[str, Any]], labels: Any) -> float:
    right = sum(r["classes"][0]["index"] == labels[(r["frame"] - 1) % len(labels)] for r in results)
    return right / max(1, len(results))


def demo(work: Path, procs: Processes) -> str:
    convert, agent, fleet = BIN / "edge-convert", BIN / "edge-agent", BIN / "edge-fleet"
    say("1/8 train the digits example and convert it to signed int8 bundles")
    run(convert, "example", "digits", "-o", work / "digits.keras")
    run(convert, "keygen", "-o", work / "keys")
    common = ["--calib", work / "digits-calib.npz", "--val", work / "digits-val.npz",
              "--labels", work / "digits-labels.txt", "--std", "255", "--samples", "200",
              "--sign-key", work / "keys/signing.key", "--json"]  # fmt: skip
    for v in ("1", "2"):
        out = run(convert, "convert", work / "digits.keras", "-o", work / f"digits-v{v}",
                  "--version", v, *common)  # fmt: skip
        summary = json.loads(out)
        print(
            f"  v{v}: {summary['model_bytes']} bytes ({summary['size_ratio']:.2f} of float), "
            f"accuracy {summary['float_accuracy']:.3f} -> {summary['int8_accuracy']:.3f}"
        )
    run(convert, "bundle", work / "digits-v2/model.tflite", "-o", work / "digits-unsigned",
        "--name", "digits", "--version", "3", "--labels", work / "digits-labels.txt",
        "--std", "255")  # fmt: skip

    say("2/8 start a broker")
    host, port, which = start_broker(procs, work)
    prefix = f"edge-demo-{uuid.uuid4().hex[:6]}"
    print(f"  using {which}, topic prefix {prefix}")

    say("3/8 start the agent on a synthetic camera showing handwritten digits")
    config = {
        "device": {"id": DEVICE, "groups": ["demo"]},
        "state_dir": str(work / "state"),
        "mqtt": {"host": host, "port": port, "topic_prefix": prefix},
        "models": {"trusted_keys": [str(work / "keys/signing.pub")],
                   "probation": {"duration_s": 3, "min_inferences": 20}},
        "telemetry": {"interval_s": 1},
        "pipelines": [{"name": "camera", "model": "digits", "queue": "fifo",
                       "source": {"type": "synthetic", "kind": "digits", "width": 64,
                                  "height": 64, "channels": 3, "fps": 15}}],
    }  # fmt: skip
    (work / "agent.yaml").write_text(yaml.safe_dump(config))
    run(agent, "check", work / "agent.yaml", "--offline")
    procs.start(agent, "run", work / "agent.yaml", log=work / "agent.log")
    watcher = Watcher(host, port, prefix)
    fleet_broker = ["--host", host, "--port", str(port), "--prefix", prefix]
    deadline = time.monotonic() + 30
    while DEVICE not in run(fleet, "status", *fleet_broker):
        if time.monotonic() > deadline:
            raise DemoFailed("the agent did not come online")
        time.sleep(1)

    try:
        say("4/8 deploy version 1 with edge-fleet")
        run(fleet, "deploy", work / "digits-v1", "--device", DEVICE, "--pub",
            work / "keys/signing.pub", *fleet_broker)  # fmt: skip
        watcher.wait_for(lambda: len(watcher.results) >= 20, 30, "results from v1")
        watcher.show(4)

        say("5/8 hot-swap to version 2 while the camera runs")
        before = len(watcher.results)
        run(fleet, "deploy", work / "digits-v2", "--group", "demo", "--via", "mqtt", "--pub",
            work / "keys/signing.pub", *fleet_broker)  # fmt: skip
        watcher.wait_for(lambda: sum(r["version"] == "2" for r in watcher.since(before)) >= 20,
                         30, "results from v2")  # fmt: skip
        swap = watcher.since(before)
        frames = [r["frame"] for r in swap]
        dropped = (frames[-1] - frames[0] + 1) - len(set(frames))
        print(f"  {len(swap)} results across the swap, frames {frames[0]}..{frames[-1]}: "
              f"dropped {dropped}, repeated {len(frames) - len(set(frames))}")  # fmt: skip
        if dropped or len(frames) != len(set(frames)):
            raise DemoFailed(f"the hot-swap lost {dropped} frame(s)")
        watcher.show(3)

        say("6/8 deploy an unsigned model: the device must refuse it, v2 keeps serving")
        proc = subprocess.run(
            [str(fleet), "deploy", str(work / "digits-unsigned"), "--device", DEVICE,
             "--allow-unsigned", "--timeout", "60", *fleet_broker],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        print("\n".join("  " + line for line in proc.stdout.strip().splitlines()[-4:]))
        refused = [r for r in watcher.replies if r.get("status") == "failed"]
        if proc.returncode == 0 or not refused:
            raise DemoFailed("the unsigned model was not refused")
        print(f"  refused: {refused[-1]['code']}: {refused[-1]['message']}")
        after = len(watcher.results)
        watcher.wait_for(lambda: len(watcher.results) > after + 15, 20, "results after refusal")
        versions = {r["version"] for r in watcher.since(after)}
        if versions != {"2"}:
            raise DemoFailed(f"after the refusal results came from {versions}, not v2")
        watcher.show(2)
        acc = accuracy(watcher.results, watcher.labels)
        print(f"  {len(watcher.results)} results, top-1 correct on {acc:.1%} of the digits shown")
        if acc < 0.9:
            raise DemoFailed(f"accuracy {acc:.1%} is too low")
        say("7/8 the fleet server: a device offline during a rollout gets v2 when it is back")
        server = fleet_server(work, procs, host, port, prefix)
        late = server_demo(work, procs, server, host, port, prefix)
    finally:
        watcher.close()
    say("8/8 stop everything the demo started")
    procs.stop_all()
    return (
        f"v1 -> v2 hot-swap dropped 0 frames, unsigned model refused ({refused[-1]['code']}), "
        f"{late}"
    )


def fleet_server(work: Path, procs: Processes, host: str, port: int, prefix: str) -> str:
    """Start `edge-fleet server` on a free port; returns its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        api_port = s.getsockname()[1]
    config = {
        "data_dir": str(work / "fleet-data"),
        "broker": {"host": host, "port": port, "prefix": prefix},
        "http": {"bind": f"127.0.0.1:{api_port}"},
        "trusted_keys": [str(work / "keys/signing.pub")],
        "reconcile": {"interval_s": 0.5},
    }
    (work / "fleet-server.yaml").write_text(yaml.safe_dump(config))
    procs.start(BIN / "edge-fleet", "server", "--config", work / "fleet-server.yaml",
                log=work / "fleet-server.log")  # fmt: skip
    token = work / "fleet-data/admin.token"
    deadline = time.monotonic() + 30
    while not token.exists() or not broker_answers("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise DemoFailed("the fleet server did not start (see fleet-server.log)")
        time.sleep(0.2)
    print(f"  edge-fleet server on http://127.0.0.1:{api_port}, SQLite in fleet-data/")
    return f"http://127.0.0.1:{api_port}"


def server_demo(
    work: Path, procs: Processes, server: str, host: str, port: int, prefix: str
) -> str:
    fleet = BIN / "edge-fleet"
    auth = ["--server", server, "--token-file", str(work / "fleet-data/admin.token")]
    second = "demo-pi-2"
    config = yaml.safe_load((work / "agent.yaml").read_text())
    config["device"]["id"] = second
    config["state_dir"] = str(work / "state-2")
    (work / "agent-2.yaml").write_text(yaml.safe_dump(config))
    agent2 = procs.start(BIN / "edge-agent", "run", work / "agent-2.yaml", log=work / "agent-2.log")

    def device(name: str) -> dict[str, Any] | None:
        rows = json.loads(run(fleet, "status", *auth, "--json", quiet=True))["devices"]
        return next((r for r in rows if r.get("device", r.get("id")) == name), None)

    wait(lambda: (device(second) or {}).get("online"), 60, f"{second} to come online")
    print(f"  {second} is online without a model; now it goes away (power cut, Wi-Fi...)")
    agent2.send_signal(signal.SIGTERM)
    agent2.wait(20)
    wait(lambda: not (device(second) or {}).get("online", True), 30, f"{second} offline")
    out = run(fleet, "deploy", work / "digits-v2", *auth, "--group", "demo", "--no-follow",
              "--json", "--pub", work / "keys/signing.pub")  # fmt: skip
    rollout = json.loads(out.strip().splitlines()[-1])["rollout"]["id"]
    print(f"  rollout {rollout} declared; the CLI has exited and the server carries it on:")

    def statuses() -> dict[str, str]:
        view = json.loads(run(fleet, "rollouts", *auth, "--id", rollout, "--json", quiet=True))
        return {d["device"]: d["status"] for d in view["devices"]}

    wait(lambda: statuses() == {DEVICE: "done", second: "pending"}, 30,
         f"{DEVICE} done (it runs v2 already) and {second} pending")  # fmt: skip
    run(fleet, "rollouts", *auth, "--id", rollout)
    print(f"  {second} comes back online")
    procs.start(BIN / "edge-agent", "run", work / "agent-2.yaml", log=work / "agent-2b.log")
    wait(lambda: statuses()[second] == "done", 90, f"{second} on digits v2, past probation")
    if (device(second) or {}).get("models", {}).get("digits") != "2":
        raise DemoFailed(f"{second} is done in the rollout but does not report digits v2")
    run(fleet, "rollouts", *auth, "--id", rollout)
    run(fleet, "history", second, *auth)
    return f"{second}, offline during the rollout, brought to v2 by the fleet server"


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out waiting for {what}")
        time.sleep(1.0)


def main() -> int:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="edge-demo-"))
    procs = Processes()
    try:
        summary = demo(work, procs)
    except (DemoFailed, subprocess.TimeoutExpired) as exc:
        procs.stop_all()
        print(f"demo: FAILED: {exc} (logs in {work})")
        return 1
    except KeyboardInterrupt:
        procs.stop_all()
        print("demo: FAILED: interrupted")
        return 1
    procs.stop_all()
    shutil.rmtree(work, ignore_errors=True)
    print(f"demo: ok ({summary}; {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
