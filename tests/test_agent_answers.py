"""What a real agent answers over a real broker where the protocol was vague or wrong.

- A model no pipeline uses: a deploy of it is ``done`` (stored, validated, active) but
  says ``served: false`` with a note, and its state is ``stored``, never ``serving``.
- A ``config`` change refused for a pipeline names the pipeline as the key did.
- A deploy the device would refuse whatever the file (a pipeline that does not exist, or
  one serving another model) is refused before anything is downloaded.

One in-process ``agent.service.Agent`` (link, command plane, chunk transfer, store,
validation child, probation) with one pipeline, driven by ``edge-fleet`` and raw
commands on a private Mosquitto.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.live import LiveConfig
from agent.models import manifest as mf
from agent.protocol import ConfigCommand, DeployCommand, Reply, State, UrlArtifact
from agent.service import Agent
from tests.fleet_support import json_out, tiny_agent_config
from tests.lifecycle_support import manifest_for
from tests.mqtt_support import Broker, MessageCollector, publish

ROOT = Path(__file__).resolve().parent.parent
PREFIX, DEVICE = "answers", "pi-answers"


@dataclass
class Rig:
    broker: Broker
    agent: Agent
    workdir: Path
    public: Path
    bundles: dict[str, Path]

    def deploy(self, model: str) -> tuple[int, dict[str, Any]]:
        """``edge-fleet deploy`` by chunks, as a user runs it: exit code, the device's row."""
        proc = subprocess.run(
            [sys.executable, "-m", "fleet", "deploy", str(self.bundles[model]),
             "--broker", f"{self.broker.host}:{self.broker.port}", "--prefix", PREFIX,
             "--device", DEVICE, "--pub", str(self.public), "--via", "mqtt",
             "--timeout", "60", "--json"],
            capture_output=True, text=True, timeout=90, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))},
        )  # fmt: skip
        (row,) = json_out(proc)["devices"]
        return proc.returncode, row

    def state(self) -> State:
        """The retained state as a console connecting now reads it."""
        late = MessageCollector(self.broker, f"{PREFIX}/{DEVICE}/state")
        try:
            (retained,) = late.wait_for(1, timeout=15)
        finally:
            late.close()
        return State.model_validate_json(retained.payload)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, tiny_int8_model: Path) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("answers")
    private, public = mf.generate_keypair()
    (workdir / "key.pem").write_bytes(private)
    (workdir / "key.pub").write_bytes(public)
    key = mf.load_private_key(workdir / "key.pem")
    bundles = {}
    for model in ("tiny", "spare"):  # "spare": no pipeline names it
        manifest = manifest_for(tiny_int8_model, name=model, version="1")
        signature = mf.sign_manifest(manifest, key)
        bundles[model] = mf.write_bundle(workdir / model, tiny_int8_model, manifest, signature)
    broker = Broker(workdir / "mosquitto")
    broker.start()
    path = tiny_agent_config(
        workdir, broker, device=DEVICE, prefix=PREFIX, trusted_key=workdir / "key.pub",
        pipeline="face",
    )  # fmt: skip
    agent = Agent(LiveConfig.load(path))
    try:
        agent.start()
        assert agent.link.connected, "the agent did not connect"
        yield Rig(broker, agent, workdir, workdir / "key.pub", bundles)
    finally:
        agent.stop()
        broker.stop()


def test_a_model_no_pipeline_uses_is_stored_not_serving(rig: Rig) -> None:
    code, row = rig.deploy("spare")
    assert code == 0 and row["status"] == "done", row
    data = row["data"]
    assert data["pipelines"] == [] and data["served"] is False, data
    assert "no pipeline uses model spare" in data["note"]
    assert data["probation"] == {}  # no frames reach it: nothing was waited for
    code, row = rig.deploy("tiny")  # the pipeline's model still goes through probation
    assert code == 0 and row["data"]["served"] is True and "note" not in row["data"], row
    assert row["data"]["probation"]["face"]["invokes"] >= 3
    models = {m.name: m for m in rig.state().models}
    assert (models["spare"].status, models["spare"].active) == ("stored", "1")
    assert models["spare"].message and "no pipeline uses model spare" in models["spare"].message
    assert (models["tiny"].status, models["tiny"].active) == ("serving", "1")
    assert models["tiny"].message is None


def test_a_refused_config_change_names_the_pipeline_by_name(rig: Rig) -> None:
    replies = MessageCollector(rig.broker, f"{PREFIX}/{DEVICE}/reply")
    try:
        command = ConfigCommand(
            id="cfg-face", changes={"pipelines.face.top_k": 0, "pipelines.face.threshold": 0.5}
        )
        publish(rig.broker, f"{PREFIX}/{DEVICE}/cmd", command.to_bytes())
        received = replies.wait_for(2, timeout=30)  # accepted, then failed
    finally:
        replies.close()
    final = Reply.model_validate_json(received[-1].payload)
    assert (final.id, final.status, final.code.value) == ("cfg-face", "failed", "config_rejected")
    assert final.message == "pipelines.face.top_k: Input should be greater than or equal to 1"
    assert rig.agent.live.current.pipelines[0].threshold == 0.0  # nothing changed


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("model", "pipeline", "code", "message"),
    [
        ("tiny", "nope", "not_found", "no pipeline named 'nope'"),
        ("spare", "face", "incompatible", "pipeline face serves model tiny, not spare"),
    ],
)
def test_a_deploy_refused_whatever_the_file_downloads_nothing(
    rig: Rig, model: str, pipeline: str, code: str, message: str
) -> None:
    bundle = rig.bundles[model]
    handler = functools.partial(CountingHandler, directory=str(bundle))
    CountingHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name="bundle-http", daemon=True).start()
    replies = MessageCollector(rig.broker, f"{PREFIX}/{DEVICE}/reply")
    try:
        command = DeployCommand(
            id=f"early-{code}",
            manifest=json.loads((bundle / "manifest.json").read_text()),
            signature=(bundle / "manifest.sig").read_text().strip(),
            artifact=UrlArtifact(url=f"http://127.0.0.1:{server.server_port}/model.tflite"),
            pipeline=pipeline,
        )
        publish(rig.broker, f"{PREFIX}/{DEVICE}/cmd", command.to_bytes())
        received = replies.wait_for(2, timeout=30)  # accepted, then failed
    finally:
        replies.close()
        server.shutdown()
        server.server_close()
    final = Reply.model_validate_json(received[-1].payload)
    assert (final.id, final.status, final.code.value) == (f"early-{code}", "failed", code)
    assert final.message == message
    assert CountingHandler.requests == [], "the device downloaded a model it was bound to refuse"
