"""The foreign consoles of docs/examples/ against a real agent and a private Mosquitto.

``console.py`` (paho-mqtt only) and ``console.sh`` (mosquitto_pub, mosquitto_sub, jq)
run as subprocesses, as a user runs them; the agent (link, command plane, URL fetch
and chunk transfer, signature check, store, validation child, shadow, hot-swap,
probation) runs in this process. Every deploy and rollback is checked on the
device's retained state, as any subscriber reads it, so an edit of the protocol
that the page's readers would trip over fails here.
"""

from __future__ import annotations

import ast
import functools
import http.server
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.live import LiveConfig
from agent.models import manifest as mf
from agent.protocol import Reply, State
from agent.service import Agent
from tests.fleet_support import tiny_agent_config
from tests.lifecycle_support import manifest_for
from tests.mqtt_support import Broker, MessageCollector

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs/examples"
PREFIX, DEVICE, MODEL = "site-1", "cam-1", "tiny"
TIMEOUT = "60"  # the consoles' own deadline, in seconds; a deploy here takes a few


@dataclass
class Lab:
    workdir: Path
    broker: Broker
    http_port: int

    def state(self) -> State:
        """The device's retained state, read as a new subscriber reads it."""
        collector = MessageCollector(self.broker, f"{PREFIX}/{DEVICE}/state")
        try:
            (message,) = collector.wait_for(1)
        finally:
            collector.close()
        assert message.retain
        return State.model_validate_json(message.payload)

    def active(self) -> str | None:
        (model,) = [m for m in self.state().models if m.name == MODEL]
        return model.active

    def bundle(self, version: str) -> Path:
        return self.workdir / f"{MODEL}-{version}"

    def url(self, version: str) -> str:
        return f"http://127.0.0.1:{self.http_port}/{MODEL}-{version}/model.tflite"

    def py(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(
            sys.executable, str(EXAMPLES / "console.py"),
            "--broker", f"{self.broker.host}:{self.broker.port}", "--prefix", PREFIX,
            "--device", DEVICE, "--timeout", TIMEOUT, *args,
        )  # fmt: skip

    def sh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(
            "bash", str(EXAMPLES / "console.sh"),
            "-h", self.broker.host, "-p", str(self.broker.port), "--prefix", PREFIX,
            "-d", DEVICE, "--timeout", TIMEOUT, *args,
        )  # fmt: skip

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        # No PYTHONPATH and another working directory: nothing of this repository
        # is put on the console's path (the venv's editable install aside, which
        # test_python_console_imports_only_paho_and_the_standard_library covers).
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=120, cwd=self.workdir,
            env={"PATH": _path(), "HOME": str(self.workdir), "LANG": "C.UTF-8"},
        )  # fmt: skip


def _path() -> str:
    return f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def final_reply(proc: subprocess.CompletedProcess[str]) -> Reply:
    """The console's last stdout line: the device's final reply, which must parse."""
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no reply printed (rc {proc.returncode}): {proc.stderr!r}"
    return Reply.model_validate_json(lines[-1])


def done(proc: subprocess.CompletedProcess[str]) -> Reply:
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stdout!r} {proc.stderr!r}"
    reply = final_reply(proc)
    assert reply.status == "done" and reply.device == DEVICE, reply
    return reply


def agent_config(workdir: Path, broker: Broker, trusted: Path) -> Path:
    return tiny_agent_config(
        workdir, broker, device=DEVICE, prefix=PREFIX, trusted_key=trusted, model=MODEL,
        fps=30, probation={"duration_s": 0.5, "shadow_frames": 5}, models={"keep_versions": 5},
    )  # fmt: skip


def write_bundle(workdir: Path, model: Path, version: str, key: Path) -> None:
    # A null and a float 1.0 as a converter may write them: the signature covers the
    # manifest as written, so a console that drops nulls or rewrites 1.0 as 1 (jq
    # does) gets bad_signature.
    manifest = manifest_for(
        model, name=MODEL, version=version, metrics=None,
        preprocess={"mean": [0.0], "std": [1.0], "audio": None},
    )  # fmt: skip
    signature = mf.sign_manifest(manifest, mf.load_private_key(key))
    mf.write_bundle(workdir / f"{MODEL}-{version}", model, manifest, signature)


def write_key(directory: Path) -> tuple[Path, Path]:
    private, public = mf.generate_keypair()
    directory.mkdir(parents=True)
    (directory / "key.pem").write_bytes(private)
    (directory / "key.pub").write_bytes(public)
    return directory / "key.pem", directory / "key.pub"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the bundles and remembers which paths were asked for."""

    requested: list[str] = []

    def log_message(self, format: str, *args: object) -> None:
        QuietHandler.requested.append(self.path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_int8_model: Path) -> Iterator[Lab]:
    for tool in ("mosquitto_pub", "mosquitto_sub", "jq"):
        assert shutil.which(tool), f"{tool} is missing: `make setup` installs it"
    workdir = tmp_path_factory.mktemp("consoles")
    key, pub = write_key(workdir / "fleet")
    other_key, _ = write_key(workdir / "other")
    for version in ("1", "2", "3", "4"):
        write_bundle(workdir, tiny_int8_model, version, key)
    write_bundle(workdir, tiny_int8_model, "9", other_key)  # signed by a key nobody trusts
    handler = functools.partial(QuietHandler, directory=str(workdir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    broker = Broker(workdir / "mosquitto")
    broker.start()
    agent = Agent(LiveConfig.load(agent_config(workdir, broker, pub)))
    try:
        agent.start()
        assert agent.link.connected, "the agent did not connect"
        yield Lab(workdir, broker, server.server_address[1])
    finally:
        agent.stop()
        broker.stop()
        server.shutdown()


def test_python_console_imports_only_paho_and_the_standard_library() -> None:
    tree = ast.parse((EXAMPLES / "console.py").read_text())
    roots = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    foreign = {r for r in roots if r not in sys.stdlib_module_names and r != "__future__"}
    assert foreign == {"paho"}


def test_both_consoles_ping(lab: Lab) -> None:
    for proc in (lab.py("ping"), lab.sh("ping")):
        data = done(proc).data
        assert data is not None and data["pong"] is True, data


def test_deploy_by_url_and_by_chunks_then_roll_back(lab: Lab) -> None:
    reply = done(lab.py("deploy", str(lab.bundle("1")), "--serve", "127.0.0.1"))
    assert reply.data and reply.data["version"] == "1"
    assert lab.active() == "1"

    # Chunks of 1 KiB: the model takes several, so requests and answers go both ways.
    proc = lab.py("deploy", str(lab.bundle("2")), "--chunks", "--chunk-size", "1024")
    done(proc)
    assert "receiving" in proc.stderr
    assert lab.active() == "2"

    done(lab.sh("deploy", str(lab.bundle("3")), "--url", lab.url("3")))
    assert lab.active() == "3"
    assert f"/{MODEL}-3/model.tflite" in QuietHandler.requested

    proc = lab.sh("deploy", str(lab.bundle("4")), "--chunks", "--chunk-size", "1024")
    done(proc)
    assert "receiving" in proc.stderr
    assert lab.active() == "4"

    reply = done(lab.py("rollback", MODEL))
    assert lab.active() == "3", reply

    done(lab.sh("rollback", MODEL, "--to", "1"))
    state = lab.state()
    (model,) = state.models
    assert (model.active, model.status) == ("1", "serving"), state
    assert [p.model for p in state.pipelines] == [f"{MODEL}:1"]


@pytest.mark.parametrize("console", ["py", "sh"])
def test_a_bundle_signed_by_an_unknown_key_is_refused(lab: Lab, console: str) -> None:
    before = lab.active()
    if console == "py":
        proc = lab.py("deploy", str(lab.bundle("9")), "--chunks")
    else:
        proc = lab.sh("deploy", str(lab.bundle("9")), "--url", lab.url("9"))
    assert proc.returncode == 1, f"{proc.stdout!r} {proc.stderr!r}"
    assert "failed: bad_signature: " in proc.stderr
    reply = final_reply(proc)
    assert (reply.status, reply.code.value) == ("failed", "bad_signature")
    assert lab.active() == before
    # Verified before fetched: no chunk was asked for, the file was never downloaded.
    if console == "py":
        assert "sent 0 chunk message(s)" in proc.stderr
    assert f"/{MODEL}-9/model.tflite" not in QuietHandler.requested
