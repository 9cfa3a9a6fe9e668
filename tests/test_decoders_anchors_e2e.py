"""A face detector with anchors, made and served as users do: a small Keras model with
BlazeFace's outputs (regressors [1, 896, 16], scores [1, 896, 1]) whose weights make one
known anchor fire with known regressors, converted by the project's converter to a
full-integer int8 bundle, described as ``task: detect`` with ``decoder: anchors``, then

- decoded on both device runtimes, boxes and keypoints where they were put;
- served by a real agent on a synthetic source after ``edge-fleet deploy --via mqtt``,
  its results over a real broker carrying the face with its named keypoints;
- refused at deploy (``incompatible``) when its manifest's anchors (strides
  [8, 16, 16]: 768) do not match the model's 896, the active version serving on.

The good bundle is what ``edge-convert convert --task detect --decoder-json ...`` makes;
the converter refuses the mismatched one, so that one is the good manifest edited and
re-signed (``mismatched`` below), as a bundle made by other tools would reach a device.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agent.live import LiveConfig
from agent.loops.decoders.anchors import AnchorsDetector
from agent.loops.postprocess import FrameContext
from agent.loops.preprocess import make_preprocessor
from agent.models import runtime as rt
from agent.models.decoder_spec import AnchorsDecoder
from agent.models.manifest import Preprocess, generate_keypair, read_bundle
from agent.protocol import Result, Topics
from agent.service import Agent
from converter.bundle import load_signing_key, sign_bundle
from converter.pipeline import ConvertOptions, run_convert
from tests.device_venv import DEVICE_RUNTIMES
from tests.fleet_support import deploy_over_mqtt
from tests.mqtt_support import Broker, MessageCollector
from tests.test_pipeline_live import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.workstation]

NAMES = ["right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear"]
DECODER = {"type": "anchors", "strides": [8, 16, 16, 16], "box_scale": 128, "keypoints": 6,
           "keypoint_names": NAMES}  # fmt: skip
# Anchor 740: cell (row 4, column 6) of the stride-16 map, centre (104, 72) in the input.
FACE = 740
FACE_REGRESSORS = [-8, 0, 40, 20, -10, 5, 0, 0, 10, -5, -4, 4, 4, 4, 0, 8]
FACE_LOGIT = 4.0
# In the 128 x 128 input: box (76, 62, 116, 82); keypoints below. A 256 x 256 source
# stretched to it doubles them.
BOX = (76.0, 62.0, 116.0, 82.0)
KEYPOINTS = [(94, 77), (104, 72), (114, 67), (100, 76), (108, 76), (104, 80)]
SOURCE = 256
PIPELINE = "face-cam"
TOLERANCE = 1.0  # source pixels: int8 regressors (scale ~0.2) doubled by the stretch


def build_face_model(path: Path) -> Path:
    """Pooled image -> dense layers whose biases are the outputs: one face at anchor
    ``FACE``, a weak one (0.27, under min_score) at anchor 3, nothing elsewhere. The
    kernels are small, not zero, so the model still reads its input."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    x = tf.keras.Input((128, 128, 3))
    pooled = tf.keras.layers.GlobalAveragePooling2D()(x)
    regs = tf.keras.layers.Dense(896 * 16, name="regressors_dense")(pooled)
    scores = tf.keras.layers.Dense(896, name="scores_dense")(pooled)
    model = tf.keras.Model(
        x,
        [
            tf.keras.layers.Reshape((896, 16), name="regressors")(regs),
            tf.keras.layers.Reshape((896, 1), name="classificators")(scores),
        ],
    )
    rng = np.random.default_rng(0)
    reg_bias = np.zeros((896, 16), np.float32)
    reg_bias[FACE] = FACE_REGRESSORS
    reg_bias[3] = [0, 0, 10, 10] + [0] * 12
    score_bias = np.full(896, -8.0, np.float32)
    score_bias[FACE] = FACE_LOGIT
    score_bias[3] = -1.0
    for layer, bias in (("regressors_dense", reg_bias), ("scores_dense", score_bias)):
        kernel = model.get_layer(layer).get_weights()[0]
        small = rng.uniform(-1e-3, 1e-3, kernel.shape).astype(np.float32)
        model.get_layer(layer).set_weights([small, bias.reshape(-1)])
    model.save(path)
    return path


def mismatched(bundle: Path, key: Path, **decoder: Any) -> Path:
    """The converter's bundle with another decoder in its manifest, signed again."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data.update(decoder={**DECODER, **decoder}, reference=None)
    path.write_text(json.dumps(data))
    sign_bundle(bundle, load_signing_key(key))  # type: ignore[arg-type]
    return bundle


@dataclass(frozen=True)
class Bundles:
    work: Path
    key: Path
    pub: Path
    good: Path
    mismatched: Path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    work = tmp_path_factory.mktemp("anchors")
    private, public = generate_keypair()
    (work / "fleet.key").write_bytes(private)
    (work / "fleet.pub").write_bytes(public)
    model = build_face_model(work / "face.keras")
    calib = work / "calib.npz"
    rng = np.random.default_rng(1)
    np.savez(calib, x=rng.integers(0, 256, (16, 128, 128, 3)).astype(np.uint8))
    labels = work / "labels.txt"
    labels.write_text("face\n")
    key = work / "fleet.key"
    made = []
    for version in ("1", "2"):
        run_convert(
            ConvertOptions(
                model=model, out=work / f"face-{version}", calib=calib, samples=16,
                task="detect", decoder=DECODER, labels=labels, name="face", version=version,
                preprocess=Preprocess(std=[255.0], color="rgb"), sign_key=key, progress=False,
            )
        )  # fmt: skip
        made.append(work / f"face-{version}")
    return Bundles(
        work, key, work / "fleet.pub",
        good=made[0], mismatched=mismatched(made[1], key, strides=[8, 16, 16]),
    )  # fmt: skip


def check_face(detections: list[Any], scale: float) -> None:
    (face,) = detections
    assert (face.index, face.label) == (0, "face")
    assert face.score == pytest.approx(1 / (1 + np.exp(-FACE_LOGIT)), abs=0.01)
    assert face.box == pytest.approx(tuple(v * scale for v in BOX), abs=TOLERANCE)
    assert [k.name for k in face.keypoints] == NAMES
    got = [(k.x, k.y) for k in face.keypoints]
    for (x, y), (ex, ey) in zip(got, KEYPOINTS, strict=True):
        assert (x, y) == pytest.approx((ex * scale, ey * scale), abs=TOLERANCE)


@pytest.mark.parametrize("runtime", DEVICE_RUNTIMES)
def test_the_int8_bundle_decodes_on_each_runtime(bundles: Bundles, runtime: str) -> None:
    manifest = read_bundle(bundles.good).manifest
    assert manifest.quantization == "int8" and isinstance(manifest.decoder, AnchorsDecoder)
    model = rt.load_model(
        bundles.good / "model.tflite", runtime=rt.select_runtime(runtime), num_threads=1
    )
    assert model.runtime.name == runtime
    assert all(t.dtype == "int8" for t in model.outputs)
    pre = make_preprocessor(model.inputs[0], manifest.preprocess)
    detector = AnchorsDetector(manifest.decoder, model.outputs, manifest.labels, (128, 128))
    frame = np.random.default_rng(2).integers(0, 256, (SOURCE, SOURCE, 3), dtype=np.uint8)
    tensor, transform = pre(frame)
    model.interpreter.set_tensor(model.inputs[0].index, tensor)
    model.interpreter.invoke()
    values = [model.interpreter.get_tensor(t.index) for t in model.outputs]
    out = detector(values, FrameContext(transform=transform))
    check_face(out.detections or [], SOURCE / 128)
    assert out.scores is not None and len(out.scores) == 1


@dataclass
class Device:
    agent: Agent
    broker: Broker
    bundles: Bundles
    collector: MessageCollector
    id: str = "face-pi"

    def deploy(self, bundle: Path) -> tuple[int, dict[str, Any]]:
        return deploy_over_mqtt(self.broker, self.id, self.bundles.pub, bundle)

    def results(self) -> list[Result]:
        return [Result.model_validate_json(m.payload) for m in list(self.collector.messages)]


@pytest.fixture(scope="module")
def device(bundles: Bundles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    tmp = tmp_path_factory.mktemp("face-device")
    broker = Broker(tmp / "mosquitto")
    broker.start()
    config = {
        "device": {"id": "face-pi"},
        "state_dir": str(tmp / "state"),
        "mqtt": {"host": broker.host, "port": broker.port},
        "runtime": {"num_threads": 1},
        "models": {"trusted_keys": [str(bundles.pub)],
                   "probation": {"duration_s": 1.0, "min_inferences": 5}},
        "pipelines": [{
            "name": PIPELINE, "model": "face", "threshold": 0.6,
            "source": {"type": "synthetic", "kind": "frames", "width": SOURCE,
                       "height": SOURCE, "channels": 3, "fps": 30},
        }],
    }  # fmt: skip
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    agent = Agent(LiveConfig.load(path))
    collector = MessageCollector(broker, Topics().results("face-pi", PIPELINE))
    loop = threading.Thread(target=agent.serve, name="test-face-agent", daemon=True)
    try:
        agent.start()
        loop.start()
        yield Device(agent, broker, bundles, collector)
    finally:
        agent.stop_event.set()
        loop.join(10)
        agent.stop()
        collector.close()
        broker.stop()


def test_a_served_face_detector_publishes_boxes_with_named_keypoints(device: Device) -> None:
    code, reply = device.deploy(device.bundles.good)
    assert (code, reply["status"]) == (0, "done"), reply
    wait_for(lambda: len(device.results()) >= 5, timeout=60, what="5 face results")
    results = device.results()
    assert all(r.version == "1" and r.model == "face" for r in results)
    for r in results:
        check_face(r.detections or [], SOURCE / 128)
    raw = device.collector.messages[-1].payload
    assert len(raw) < 2048, len(raw)


def test_a_bundle_whose_anchors_do_not_match_is_refused_at_deploy(device: Device) -> None:
    if device.agent.pipelines[PIPELINE].worker.serving_version() is None:
        code, reply = device.deploy(device.bundles.good)
        assert code == 0, reply
    code, reply = device.deploy(device.bundles.mismatched)
    assert code != 0 and reply["status"] == "failed", reply
    assert reply["code"] == "incompatible", reply
    assert "expected [1, 768, >=16]" in reply["message"], reply
    assert "strides [8, 16, 16], 2 per cell, at input 128x128" in reply["message"], reply
    (model,) = device.agent.lifecycle.model_states()
    assert model.active == "1" and model.versions == ["1"]
    assert device.agent.pipelines[PIPELINE].worker.serving_version() == "1"
