"""Each kind of broken candidate, on both device runtimes, through a real deploy over MQTT.

One real agent per runtime (``runtime.prefer``) against a private Mosquitto serves the
colors model (version 1, deployed first) on the synthetic colors source: a scene in
which every kind of breakage shows. Each broken candidate is version 1's model with one
thing broken (tests/health_support.py), a valid signed bundle that only model health
can catch, deployed with ``edge-fleet deploy --via mqtt``:

- wrong normalisation, swapped channels, shuffled labels: ``shadow_rejected`` (they
  disagree with the serving version on live frames);
- perturbed golden outputs (what a runtime computing wrong int8 gives):
  ``validation_failed`` with the golden figures, before the model ever runs on a frame;
- after each refusal the device serves version 1 as before and stores nothing new;
- a good candidate (the colors example trained again, seed 1) is promoted, deployed
  with ``--min-agreement 0.9`` as a retrained model's deploy would be.

The shadow track's own tests cover digits and the stage's mechanics; the benchmark
(benchmarks/model_health.py) deploys many candidates of each kind for the rates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.live import LiveConfig
from agent.models.manifest import generate_keypair, read_bundle
from agent.service import Agent
from tests import health_support as hs
from tests.converter_support import build_colors_bundle
from tests.device_venv import DEVICE_RUNTIMES
from tests.fleet_support import deploy_over_mqtt
from tests.mqtt_support import Broker

pytestmark = pytest.mark.slow

PIPELINE = "colors-cam"
SHADOW_FRAMES = 60
GOOD_MIN_AGREEMENT = 0.9
# kind -> the refusal it must meet
REFUSALS = {
    "wrong_normalisation": "shadow_rejected",
    "swapped_channels": "shadow_rejected",
    "shuffled_labels": "shadow_rejected",
    "perturbed_golden": "validation_failed",
}


@dataclass(frozen=True)
class Bundles:
    work: Path
    key: Path
    pub: Path
    active: Path  # colors, seed 0, version 1
    retrained: Path  # colors, seed 1


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    work = tmp_path_factory.mktemp("health-e2e")
    private, public = generate_keypair()
    (work / "fleet.key").write_bytes(private)
    (work / "fleet.pub").write_bytes(public)
    key = work / "fleet.key"
    return Bundles(
        work=work,
        key=key,
        pub=work / "fleet.pub",
        active=build_colors_bundle(work / "colors-1", "1", key),
        retrained=build_colors_bundle(work / "colors-2", "2", key, seed=1),
    )


def device_id(runtime: str) -> str:
    return f"health-{runtime.replace('_', '-')}"


@dataclass
class Device:
    agent: Agent
    broker: Broker
    bundles: Bundles
    runtime: str
    made: int = 0

    @property
    def id(self) -> str:
        return device_id(self.runtime)

    def candidate(self, kind: str) -> Path:
        """A ``kind`` candidate new to the device (fresh version and creation time)."""
        self.made += 1
        version = f"{self.made + 1}-{kind.replace('_', '-')}"
        base = self.bundles.retrained if kind == "good" else self.bundles.active
        fresh = hs.restamped(base, self.bundles.work / self.runtime / version, self.bundles.key,
                             version=version)  # fmt: skip
        if kind == "good":
            return fresh
        broken = hs.BROKEN_MAKERS[kind]
        return broken(fresh, fresh.with_name(f"{version}-made"), self.bundles.key, version=version)

    def deploy(self, bundle: Path, *args: str) -> tuple[int, dict[str, Any]]:
        return deploy_over_mqtt(self.broker, self.id, self.bundles.pub, bundle, *args)

    def models(self) -> tuple[str | None, list[str]]:
        (model,) = self.agent.lifecycle.model_states()
        return model.active, model.versions

    def serving(self) -> str | None:
        return self.agent.pipelines[PIPELINE].worker.serving_version()


@pytest.fixture(scope="module", params=DEVICE_RUNTIMES)
def device(
    request: pytest.FixtureRequest, bundles: Bundles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Device]:
    runtime = str(request.param)
    tmp = tmp_path_factory.mktemp(f"device-{runtime}")
    broker = Broker(tmp / "mosquitto")
    broker.start()
    config = {
        "device": {"id": device_id(runtime)},
        "state_dir": str(tmp / "state"),
        "mqtt": {"host": broker.host, "port": broker.port},
        "runtime": {"prefer": runtime, "num_threads": 1},
        "models": {
            "trusted_keys": [str(bundles.pub)],
            "probation": {"duration_s": 1.0, "min_inferences": 5,
                          "shadow_frames": SHADOW_FRAMES},
        },
        "pipelines": [{
            "name": PIPELINE, "model": "colors",
            "source": {"type": "synthetic", "kind": "colors", "width": 32, "height": 32,
                       "fps": 100},
        }],
    }  # fmt: skip
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    dev = Device(Agent(LiveConfig.load(path)), broker, bundles, runtime)
    try:
        dev.agent.start()
        assert dev.agent.runtime is not None and dev.agent.runtime.name == runtime
        code, first = dev.deploy(bundles.active)
        assert (code, first["status"]) == (0, "done"), first
        yield dev
    finally:
        dev.agent.stop()
        broker.stop()


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_a_broken_candidate_is_refused_and_the_active_model_stays(
    device: Device, kind: str
) -> None:
    active, versions = device.models()
    code, reply = device.deploy(device.candidate(kind))
    assert code != 0 and reply["status"] == "failed", reply
    assert reply["code"] == REFUSALS[kind], reply
    data = reply["data"]
    if REFUSALS[kind] == "shadow_rejected":
        figures = data["shadow"][PIPELINE]
        assert figures["frames"] >= SHADOW_FRAMES, figures
        # Far below any threshold (another training of the model: 0.96-1.0).
        assert figures["agreement"] < 0.5, figures
        assert "refused by shadow evaluation" in reply["message"]
    else:
        golden = data["golden"]
        assert golden["over"] > 0 and golden["worst_steps"] > golden["tolerance_steps"], golden
        assert "golden sample" in reply["message"]
    # It never served: the device serves what it served, and keeps nothing of it.
    assert device.models() == (active, versions)
    assert device.serving() == active


def test_a_retrained_candidate_is_promoted(device: Device) -> None:
    active, versions = device.models()
    good = device.candidate("good")
    # Another training agrees on 0.96-1.0 of the scene's frames (benchmarks.model_health),
    # at the default's edge: a retrained model's deploy sets its own, as operators do.
    code, reply = device.deploy(good, "--min-agreement", str(GOOD_MIN_AGREEMENT))
    assert (code, reply["status"]) == (0, "done"), reply
    figures = reply["data"]["shadow"][PIPELINE]
    assert figures["frames"] >= SHADOW_FRAMES, figures
    assert figures["agreement"] >= GOOD_MIN_AGREEMENT, figures
    assert reply["data"]["golden"]["over"] == 0
    version = read_bundle(good).manifest.version
    now_active, now_versions = device.models()
    assert now_active == version and set(now_versions) == {*versions, version}
    assert device.serving() == version
    assert device.agent.pipelines[PIPELINE].shadow_tap is None
    assert active != version
