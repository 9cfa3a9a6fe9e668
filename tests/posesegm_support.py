"""Pose and segmentation models whose outputs are a fixed function of the input, made
int8 bundles by the project's converter, and a real agent serving one over MQTT.

- pose: ``[1, 16, 16, 3]`` -> ``[1, 1, 17, 3]``: point k at fixed (y, x) = ``POSE_POINTS[k]``
  (0..1 of the input), every score the frame's mean brightness (0..1 with ``--std 255``).
- segment: ``[1, 32, 32, 3]`` -> ``[1, 16, 16, 4]`` (2x2 average, then per pixel):
  class 0 scores 0.3, classes 1, 2, 3 the R, G, B values (0..1). Pure red, green or blue
  is class 1, 2 or 3, black is background.

TensorFlow is imported lazily, after the TFLite runtimes (conftest imports those first).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agent.live import LiveConfig
from agent.models.manifest import Preprocess, generate_keypair
from agent.protocol import Result
from agent.service import Agent
from converter.pipeline import ConvertOptions, run_convert
from tests.fleet_support import deploy_over_mqtt
from tests.mqtt_support import Broker, MessageCollector

K = 17
POSE_POINTS = np.stack(
    [0.1 + 0.8 * np.arange(K) / (K - 1), 0.9 - 0.8 * np.arange(K) / (K - 1)], axis=1
)
SEGMENT_LABELS = ["background", "red", "green", "blue"]
BACKGROUND_SCORE = 0.3
PREFIX = "posesegm"


def _pose_keras(path: Path) -> Path:
    import tensorflow as tf

    inp = tf.keras.Input((16, 16, 3))
    mean = tf.keras.layers.GlobalAveragePooling2D()(inp)
    dense = tf.keras.layers.Dense(K * 3)
    out = tf.keras.layers.Reshape((1, K, 3))(dense(mean))
    model = tf.keras.Model(inp, out)
    kernel = np.zeros((3, K * 3), np.float32)
    kernel[:, 2::3] = 1 / 3
    bias = np.zeros(K * 3, np.float32)
    bias[0::3], bias[1::3] = POSE_POINTS[:, 0], POSE_POINTS[:, 1]
    dense.set_weights([kernel, bias])
    model.save(path)
    return path


def _segment_keras(path: Path) -> Path:
    import tensorflow as tf

    inp = tf.keras.Input((32, 32, 3))
    pooled = tf.keras.layers.AveragePooling2D(2)(inp)
    conv = tf.keras.layers.Conv2D(4, 1)
    model = tf.keras.Model(inp, conv(pooled))
    kernel = np.zeros((1, 1, 3, 4), np.float32)
    for c in range(3):
        kernel[0, 0, c, c + 1] = 1.0
    conv.set_weights([kernel, np.array([BACKGROUND_SCORE, 0, 0, 0], np.float32)])
    model.save(path)
    return path


def build_bundle(task: str, workdir: Path, key: Path | None = None) -> Path:
    """The pose (``keypoints``) or ``segment`` model as a signed int8 bundle, converted
    with calibration and validation data (random images) by ``edge-convert convert``."""
    workdir.mkdir(parents=True, exist_ok=True)
    size = 16 if task == "keypoints" else 32
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, size, size, 3)).astype(np.float32)
    # Saturated colours too, so that calibration sees the whole range of every output.
    images[:8] = rng.choice([0.0, 255.0], (8, 1, 1, 3))
    np.save(workdir / "calib.npy", images)
    labels = None
    if task == "segment":
        labels = workdir / "labels.txt"
        labels.write_text("\n".join(SEGMENT_LABELS) + "\n")
    build = _pose_keras if task == "keypoints" else _segment_keras
    run_convert(
        ConvertOptions(
            model=build(workdir / f"{task}.keras"),
            out=workdir / "bundle",
            calib=workdir / "calib.npy",
            val=workdir / "calib.npy",
            samples=40,
            task=task,  # type: ignore[arg-type]
            labels=labels,
            name="pose" if task == "keypoints" else "segmenter",
            preprocess=Preprocess(std=[255.0], color="rgb"),
            sign_key=key,
            progress=False,
            max_drop=1.0,
        )
    )
    return workdir / "bundle"


def make_keys(directory: Path) -> tuple[Path, Path]:
    """(private key, public key) files of a fresh Ed25519 pair."""
    directory.mkdir(parents=True, exist_ok=True)
    private, public = generate_keypair()
    (directory / "fleet.key").write_bytes(private)
    (directory / "fleet.pub").write_bytes(public)
    return directory / "fleet.key", directory / "fleet.pub"


@contextmanager
def serving_agent(
    tmp: Path, broker: Broker, pub: Path, pipeline: dict[str, Any], image: np.ndarray
) -> Iterator[tuple[str, MessageCollector]]:
    """A real agent (in this process) whose one pipeline reads ``image`` (BGR) from a
    folder: yields its device id and a collector of its results topic."""
    import cv2

    frames = tmp / "frames"
    frames.mkdir(parents=True)
    cv2.imwrite(str(frames / "frame.png"), image)
    device = f"ps-{pipeline['name']}"
    config = {
        "device": {"id": device},
        "state_dir": str(tmp / "state"),
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX},
        "runtime": {"num_threads": 1},
        "models": {"trusted_keys": [str(pub)],
                   "probation": {"duration_s": 1.0, "min_inferences": 5}},
        "pipelines": [{**pipeline,
                       "source": {"type": "images", "path": str(frames), "fps": 20}}],
    }  # fmt: skip
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    collector = MessageCollector(broker, f"{PREFIX}/{device}/results/{pipeline['name']}")
    agent = Agent(LiveConfig.load(path))
    loop = threading.Thread(target=agent.serve, name="test-agent-serve", daemon=True)
    agent.start()
    loop.start()
    try:
        yield device, collector
    finally:
        agent.stop_event.set()
        loop.join(10)
        agent.stop()
        collector.close()


def deployed_results(
    broker: Broker, device: str, pub: Path, bundle: Path, collector: MessageCollector, n: int = 3
) -> list[Result]:
    """Deploy ``bundle`` over MQTT as edge-fleet does; the first ``n`` results it makes."""
    code, reply = deploy_over_mqtt(broker, device, pub, bundle, "--prefix", PREFIX)
    assert (code, reply["status"]) == (0, "done"), reply
    return [Result.model_validate_json(m.payload) for m in collector.wait_for(n, timeout=30)]
