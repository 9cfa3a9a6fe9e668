"""Shadow evaluation for real: an ``agent.service.Agent`` on the first device runtime, a private
Mosquitto, converter-built digits bundles and `edge-fleet deploy` over MQTT chunks.

Digits v1 serves a synthetic digits source. Candidates broken in ways that run fast and
answer confidently (a wrong normalisation in the manifest, shuffled labels) are refused
with ``shadow_rejected`` before they serve a frame; a good one (retrained with another
seed and data split) is promoted, with its figures in the reply.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import ProbationConfig
from agent.live import LiveConfig
from agent.models import manifest as mf
from agent.service import Agent
from tests import health_support as hs
from tests.converter_support import build_digits_bundle
from tests.fleet_support import deploy_over_mqtt
from tests.lifecycle_support import RUNTIMES
from tests.mqtt_support import Broker

PIPELINE = "digits-cam"
FRAMES = ProbationConfig().shadow_frames


@dataclass
class Lab:
    agent: Agent
    broker: Broker
    pub: Path
    bundles: dict[str, Path]

    def deploy(self, bundle: Path, *args: str) -> tuple[int, dict[str, Any]]:
        return deploy_over_mqtt(self.broker, "pi-shadow", self.pub, bundle, *args)

    def models(self) -> tuple[str | None, list[str]]:
        (model,) = self.agent.lifecycle.model_states()
        return model.active, model.versions


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    wd = tmp_path_factory.mktemp("shadow-bundles")
    private, public = mf.generate_keypair()
    (wd / "fleet.key").write_bytes(private)
    (wd / "fleet.pub").write_bytes(public)
    key = wd / "fleet.key"
    v1 = build_digits_bundle(wd / "digits-1", "1", sign_key=key)
    retrained = build_digits_bundle(wd / "digits-seed1", "2", sign_key=key, seed=1)
    return {
        "1": v1,
        # std 1 instead of 255: every pixel saturates the int8 input.
        "2": hs.wrong_normalisation(v1, wd / "wrong-std", key, version="2"),
        # Exported with the labels mixed up.
        "3": hs.shuffled_labels(v1, wd / "shuffled", key, version="3"),
        "4": hs.restamped(retrained, wd / "retrained", key, version="4"),
        "5": hs.restamped(retrained, wd / "retrained-5", key, version="5"),
    }, wd / "fleet.pub"


# One runtime here: every broken kind runs on both in tests/test_model_health_e2e.py
# (colors); this keeps the digits path, whose wrong std is the hard case, in `make test`
# at half the time.
@pytest.fixture(params=RUNTIMES[:1])
def lab(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    bundles: tuple[dict[str, Path], Path],
) -> Iterator[Lab]:
    by_version, pub = bundles
    broker = Broker(tmp_path / "mosquitto")
    broker.start()
    config = {
        "device": {"id": "pi-shadow"},
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": broker.host, "port": broker.port},
        "runtime": {"prefer": request.param, "num_threads": 1},
        # Shadow settings as shipped: the test checks the defaults decide right.
        "models": {"trusted_keys": [str(pub)],
                   "probation": {"duration_s": 1.0, "min_inferences": 5}},
        "pipelines": [{
            "name": PIPELINE, "model": "digits",
            "source": {"type": "synthetic", "kind": "digits", "width": 32, "height": 32,
                       "channels": 1, "fps": 100},
        }],
    }  # fmt: skip
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    agent = Agent(LiveConfig.load(path))
    try:
        agent.start()
        assert agent.link.connected
        assert agent.runtime is not None and agent.runtime.name == request.param
        yield Lab(agent, broker, pub, by_version)
    finally:
        agent.stop()
        broker.stop()


def test_broken_candidates_are_refused_and_a_retrained_one_is_promoted(lab: Lab) -> None:
    code, first = lab.deploy(lab.bundles["1"])
    assert (code, first["status"]) == (0, "done"), first
    assert "shadow" not in first["data"]  # nothing served before: nothing to compare with

    for version, why in (("2", "wrong normalisation"), ("3", "shuffled labels")):
        code, refused = lab.deploy(lab.bundles[version])
        assert code != 0 and refused["code"] == "shadow_rejected", (why, refused)
        figures = refused["data"]["shadow"][PIPELINE]
        assert figures["frames"] >= FRAMES and figures["agreement"] < 0.96, (why, figures)
        assert f"digits {version} refused by shadow evaluation" in refused["message"]
        # It never served; the device serves v1 as before and keeps nothing of it.
        assert lab.models() == ("1", ["1"]), why
        assert lab.agent.pipelines[PIPELINE].worker.serving_version() == "1"
    assert refused["data"]["shadow"][PIPELINE]["agreement"] == 0.0  # shuffled: never

    code, promoted = lab.deploy(lab.bundles["4"], "--min-agreement", "0.9")
    assert (code, promoted["status"]) == (0, "done"), promoted
    figures = promoted["data"]["shadow"][PIPELINE]
    assert figures["frames"] >= FRAMES and figures["agreement"] >= 0.9, figures
    assert lab.models() == ("4", ["1", "4"])
    assert lab.agent.pipelines[PIPELINE].shadow_tap is None

    code, unshadowed = lab.deploy(lab.bundles["5"], "--no-shadow")
    assert (code, unshadowed["status"]) == (0, "done"), unshadowed
    assert "shadow" not in unshadowed["data"]
    assert lab.models()[0] == "5"
