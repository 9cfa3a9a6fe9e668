"""The whole loop with real parts: `edge-agent run` as a process, a private Mosquitto,
converter-built signed bundles, and `edge-fleet deploy` as the operator runs it.

One agent process serves the module: deploy v1 over HTTP, hot-swap to v2 over MQTT
chunks without losing a frame, refuse a tampered bundle and one whose golden outputs
differ while v2 keeps serving, roll back, and stop on SIGTERM with `online: false` as
its last word.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.loops.sources.synthetic import digit_samples
from agent.models.manifest import generate_keypair, read_bundle
from agent.protocol import (
    ConfigCommand,
    DeployCommand,
    Reply,
    Result,
    State,
    Telemetry,
    UrlArtifact,
)
from tests.converter_support import build_digits_bundle
from tests.health_support import perturbed_golden
from tests.mqtt_support import Broker, MessageCollector, publish

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@dataclass
class Setup:
    workdir: Path
    broker: Broker
    agent: subprocess.Popen[str]
    collector: MessageCollector
    bundles: dict[str, Path]
    pub: Path


def fleet(setup: Setup, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet", args[0], "--host", "127.0.0.1",
         "--port", str(setup.broker.port), *args[1:]],
        capture_output=True, text=True, timeout=timeout, env=ENV, cwd=setup.workdir,
    )  # fmt: skip


def messages(setup: Setup, kind: str) -> list[Any]:
    model = {"results": Result, "state": State, "telemetry": Telemetry, "reply": Reply}[kind]
    return [
        model.model_validate_json(m.payload)
        for m in list(setup.collector.messages)
        if m.topic.split("/")[2] == kind
    ]


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    wd = tmp_path_factory.mktemp("e2e")
    private, public = generate_keypair()
    (wd / "fleet.key").write_bytes(private)
    (wd / "fleet.pub").write_bytes(public)
    bundles = {v: build_digits_bundle(wd / f"digits-{v}", v, sign_key=wd / "fleet.key")
               for v in ("1", "2", "3")}  # fmt: skip
    broker = Broker(wd / "mosquitto")
    broker.start()
    config = {
        "device": {"id": "pi-e2e", "groups": ["lab"]},
        "state_dir": str(wd / "state"),
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "models": {
            "trusted_keys": [str(wd / "fleet.pub")],
            "probation": {"duration_s": 1.5, "min_inferences": 5},
        },
        "telemetry": {"interval_s": 1},
        "pipelines": [
            {
                "name": "digits-cam",
                "model": "digits",
                # A FIFO, so every frame is served: a lost frame would be a real loss.
                "queue": "fifo",
                "source": {"type": "synthetic", "kind": "digits", "width": 32, "height": 32,
                           "channels": 1, "fps": 40},
            }
        ],
    }  # fmt: skip
    (wd / "agent.yaml").write_text(yaml.safe_dump(config))
    collector = MessageCollector(broker, ["edge/pi-e2e/#"])
    log = (wd / "agent.log").open("w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", str(wd / "agent.yaml")],
        stdout=log, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=wd,
    )  # fmt: skip
    s = Setup(wd, broker, agent, collector, bundles, wd / "fleet.pub")
    try:
        wait_for(lambda: any(st.online for st in messages(s, "state")), what="agent online")
        yield s
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        collector.close()
        broker.stop()
        log.close()


def test_agent_comes_up_without_a_model_and_says_so(setup: Setup) -> None:
    state = next(st for st in messages(setup, "state") if st.online)
    assert state.runtime is not None and state.runtime.name == "ai_edge_litert"
    assert [p.status for p in state.pipelines] == ["degraded"]
    assert [(m.name, m.active, m.status) for m in state.models] == [("digits", None, "absent")]


def test_deploy_v1_over_http_and_results_are_right(setup: Setup) -> None:
    proc = fleet(setup, "deploy", str(setup.bundles["1"]), "--device", "pi-e2e",
                 "--pub", str(setup.pub), "--via", "http", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["exit_code"] == 0 and summary["failed"] == []
    wait_for(lambda: len([r for r in messages(setup, "results") if r.version == "1"]) >= 40,
             what="40 results from version 1")  # fmt: skip
    _, labels = digit_samples()
    results = [r for r in messages(setup, "results") if r.version == "1"]
    right = sum(r.classes[0].index == labels[(r.frame - 1) % len(labels)] for r in results
                if r.classes)  # fmt: skip
    assert right / len(results) >= 0.9
    state = messages(setup, "state")[-1]
    assert state.models[0].active == "1" and state.models[0].last_known_good == "1"
    assert state.pipelines[0].status == "running"


def test_hot_swap_to_v2_over_mqtt_loses_no_frame(setup: Setup) -> None:
    before = len(messages(setup, "results"))
    proc = fleet(setup, "deploy", str(setup.bundles["2"]), "--group", "lab",
                 "--pub", str(setup.pub), "--via", "mqtt")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(lambda: len([r for r in messages(setup, "results") if r.version == "2"]) >= 20,
             what="results from version 2")  # fmt: skip
    # By the outbox's sequence number, not by arrival: the order the device made them.
    results = sorted(messages(setup, "results")[before:], key=lambda r: r.seq)
    seqs = [r.seq for r in results]
    assert len(set(seqs)) == len(seqs), "a sequence number was given twice"
    frames = [r.frame for r in results]
    # Every frame once, in order, and the switch happens once: 1 ... 1 2 ... 2.
    assert frames == list(range(frames[0], frames[0] + len(frames)))
    versions = [r.version for r in results]
    switch = versions.index("2")
    assert switch > 0, "no result of version 1 after the deploy started"
    assert set(versions[:switch]) == {"1"} and set(versions[switch:]) == {"2"}, versions
    last_v1, first_v2 = results[switch - 1], results[switch]
    assert last_v1.frame < first_v2.frame and last_v1.ts <= first_v2.ts
    # Capture times follow frame numbers: no frame was held back and served late.
    stamps = [r.ts for r in results]
    assert stamps == sorted(stamps)
    # That the worker went on serving while version 2 was built cannot be seen from
    # here (the build takes less than one frame period):
    # tests/test_pipeline_live.py::test_hot_swap_serves_and_captures_while_the_new_model_builds
    # holds the build open and checks it.


def test_tampered_bundle_is_refused_and_v2_keeps_serving(setup: Setup, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(setup.bundles["3"], bad)
    blob = bytearray((bad / "model.tflite").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "model.tflite").write_bytes(bytes(blob))
    # The console refuses it before sending anything...
    proc = fleet(setup, "deploy", str(bad), "--device", "pi-e2e", "--pub", str(setup.pub))
    assert proc.returncode == 2 and "sha256" in (proc.stdout + proc.stderr)
    # ...and a console that skips the check is refused by the device itself.
    manifest = json.loads((bad / "manifest.json").read_text())
    signature = (bad / "manifest.sig").read_text().strip()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0),
        functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(bad)),
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/model.tflite"
        command = DeployCommand(
            id="tampered-1", manifest=manifest, signature=signature,
            artifact=UrlArtifact(url=url), expires_at=time.time() + 60,
        )  # fmt: skip
        publish(setup.broker, "edge/pi-e2e/cmd", command.to_bytes())
        wait_for(
            lambda: any(r.id == "tampered-1" and r.status == "failed"
                        for r in messages(setup, "reply")),
            what="the device's refusal",
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    (reply,) = [
        r for r in messages(setup, "reply") if r.id == "tampered-1" and r.status == "failed"
    ]
    assert reply.code.value == "checksum_mismatch", reply
    n = len(messages(setup, "results"))
    wait_for(lambda: len(messages(setup, "results")) > n + 10, what="results after refusal")
    assert {r.version for r in messages(setup, "results")[n:]} == {"2"}


def test_wrong_golden_outputs_are_refused_with_the_figures_and_v2_keeps_serving(
    setup: Setup, tmp_path: Path
) -> None:
    # Signed and intact, but its golden outputs are 9 steps off what this runtime
    # computes: to the device, a runtime that computes the model wrongly.
    key = setup.workdir / "fleet.key"
    off = read_bundle(
        perturbed_golden(setup.bundles["3"], tmp_path / "off", key, steps=9, every=3, version="3")
    )
    proc = fleet(setup, "deploy", str(off.path), "--device", "pi-e2e", "--pub", str(setup.pub),
                 "--via", "mqtt", "--json")  # fmt: skip
    assert proc.returncode != 0, proc.stdout + proc.stderr
    (reply,) = [r for r in messages(setup, "reply") if r.status == "failed" and r.data
                and r.data.get("version") == "3"]  # fmt: skip
    assert reply.code.value == "validation_failed", reply
    assert reply.message.startswith("digits 3: golden sample ")
    assert reply.data is not None and reply.data["golden"]["over"] > 0
    n = len(messages(setup, "results"))
    wait_for(lambda: len(messages(setup, "results")) > n + 10, what="results after refusal")
    assert {r.version for r in messages(setup, "results")[n:]} == {"2"}


def test_rollback_and_telemetry(setup: Setup) -> None:
    proc = fleet(setup, "rollback", "--device", "pi-e2e", "--to", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(messages(setup, "results"))
    wait_for(lambda: len(messages(setup, "results")) > n + 10, what="results after rollback")
    assert messages(setup, "results")[-1].version == "1"
    telemetry = messages(setup, "telemetry")
    assert telemetry, "no telemetry"
    pipe = telemetry[-1].pipelines["digits-cam"]
    assert pipe.frames_in > 0 and pipe.stages["invoke"].p50 > 0
    proc = fleet(setup, "status", "--json")
    assert proc.returncode == 0 and "pi-e2e" in proc.stdout


def test_config_command_changes_top_k_live(setup: Setup) -> None:
    command = ConfigCommand(id="cfg-1", changes={"pipelines.digits-cam.top_k": 1})
    publish(setup.broker, "edge/pi-e2e/cmd", command.to_bytes())
    wait_for(
        lambda: any(r.id == "cfg-1" and r.status == "done" for r in messages(setup, "reply")),
        what="config done",
    )
    n = len(messages(setup, "results"))
    wait_for(lambda: len(messages(setup, "results")) > n + 10, what="results after config")
    assert all(len(r.classes or []) == 1 for r in messages(setup, "results")[n + 5 :])
    bad = ConfigCommand(id="cfg-2", changes={"mqtt.host": "elsewhere"})
    publish(setup.broker, "edge/pi-e2e/cmd", bad.to_bytes())
    wait_for(
        lambda: any(r.id == "cfg-2" and r.status == "failed" for r in messages(setup, "reply")),
        what="config refused",
    )
    (reply,) = [r for r in messages(setup, "reply") if r.id == "cfg-2" and r.status == "failed"]
    assert reply.code.value == "config_rejected" and "mqtt.host" in reply.message


def test_sigterm_stops_within_10s_and_says_offline(setup: Setup) -> None:
    started = time.monotonic()
    setup.agent.send_signal(signal.SIGTERM)
    assert setup.agent.wait(15) == 0
    assert time.monotonic() - started < 10
    wait_for(lambda: not messages(setup, "state")[-1].online, what="online: false")
    # What a console connecting later sees: the broker's retained state says offline.
    late = MessageCollector(setup.broker, ["edge/pi-e2e/state"])
    try:
        (retained,) = late.wait_for(1, timeout=15)
    finally:
        late.close()
    assert retained.retain, "the device's last state is not retained"
    state = State.model_validate_json(retained.payload)
    assert state.device == "pi-e2e" and not state.online
