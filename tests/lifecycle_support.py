"""Helpers for the model lifecycle tests: signed bundles, odd models, frame streams."""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.loops.frames import Frame, FrameQueue
from agent.loops.worker import InferenceResult, InferenceWorker
from agent.models import manifest as mf
from agent.models import runtime as rt
from tests.device_venv import DEVICE_RUNTIMES
from tests.model_factory import prebuilt

RUNTIMES = DEVICE_RUNTIMES
NAN_MODEL = "nan-8x8x1-10.tflite"
FAULTS_SCRIPT = Path(__file__).with_name("validator_faults.py")


@dataclass
class Keys:
    private: Ed25519PrivateKey
    public: Ed25519PublicKey


def make_keys() -> Keys:
    key = Ed25519PrivateKey.generate()
    return Keys(key, key.public_key())


def manifest_for(
    model: Path, name: str = "digits", version: str = "1", **over: Any
) -> dict[str, Any]:
    """A manifest whose tensors are read from the model itself."""
    data = model.read_bytes()
    loaded = rt.load_model(data, runtime="ai_edge_litert")

    def spec(t: rt.TensorInfo) -> dict[str, Any]:
        return {
            "name": t.name,
            "shape": list(t.shape),
            "dtype": t.dtype,
            "scale": t.scale,
            "zero_point": t.zero_point,
        }

    manifest: dict[str, Any] = {
        "format": 1,
        "name": name,
        "version": version,
        "created_at": "2026-11-22T00:00:00Z",
        "task": "classify",
        "quantization": "int8" if loaded.inputs[0].dtype == "int8" else "none",
        "model": {
            "file": "model.tflite",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        },
        "inputs": [spec(t) for t in loaded.inputs],
        "outputs": [spec(t) for t in loaded.outputs],
        "labels": [str(i) for i in range(10)],
        "producer": {"converter": "test"},
    }
    manifest.update(over)
    return manifest


def make_bundle(
    dest: Path, model: Path, keys: Keys | None, name: str = "digits", version: str = "1"
) -> mf.Bundle:
    """A signed (or, with ``keys`` None, unsigned) bundle directory, read back."""
    data = manifest_for(model, name, version)
    sig = mf.sign_manifest(data, keys.private) if keys else None
    return mf.read_bundle(mf.write_bundle(dest, model, data, sig))


def build_nan_classifier(dest: Path) -> Path:
    """A float model shaped like the tiny float classifier whose outputs are all NaN."""
    if copied := prebuilt(NAN_MODEL, dest):
        return copied
    import tensorflow as tf

    inp = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Flatten()(inp)
    x = tf.keras.layers.Dense(10, kernel_initializer="zeros", bias_initializer="zeros")(x)
    out = tf.keras.layers.Lambda(lambda t: tf.math.sqrt(t - 1.0))(x)
    converter = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inp, out))
    with contextlib.redirect_stdout(io.StringIO()):
        data = converter.convert()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def faulty_child(mode: str) -> tuple[str, ...]:
    """The ``child`` argument of a Validator whose loader aborts, hangs or eats memory."""
    return (str(FAULTS_SCRIPT), mode)


def zeros_for(model: Path) -> np.ndarray:
    loaded = rt.load_model(model.read_bytes(), runtime="ai_edge_litert")
    info = loaded.inputs[0]
    return np.zeros(info.shape, np.dtype(info.dtype))


@dataclass
class Results:
    """A sink that keeps every result (thread-safe)."""

    items: list[InferenceResult] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, result: InferenceResult) -> None:
        with self.lock:
            self.items.append(result)

    def snapshot(self) -> list[InferenceResult]:
        with self.lock:
            return list(self.items)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[InferenceResult]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            items = self.snapshot()
            if len(items) >= n:
                return items
            time.sleep(0.01)
        raise AssertionError(f"only {len(self.snapshot())} results of {n} in {timeout}s")


class FrameFeeder:
    """Puts frames of ``data`` into a FrameQueue at ``fps`` on a thread of its own."""

    def __init__(self, frames: FrameQueue, data: Any, fps: float = 200.0) -> None:
        self.frames = frames
        self.data = data
        self.period = 1.0 / fps
        self.sent = 0
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-feeder", daemon=True)

    def start(self) -> FrameFeeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        seq = 0
        while not self._stop.wait(self.period):
            if self.frames.put(Frame(seq, time.time(), self.data)):
                seq += 1
                self.sent = seq
            else:
                self.refused += 1


@contextlib.contextmanager
def running_worker(
    pipeline: str, model_name: str, data: Any, runtime: str, fps: float = 200.0, **kwargs: Any
) -> Iterator[tuple[InferenceWorker, Results, FrameFeeder]]:
    """A started worker on ``runtime`` fed by a paced feeder; both stopped afterwards."""
    frames = FrameQueue(256)
    results = Results()

    def load(path: Path) -> rt.LoadedModel:
        return rt.load_model(path, runtime=runtime, num_threads=1)

    worker = InferenceWorker(pipeline, model_name, frames, results, load=load, **kwargs)
    feeder = FrameFeeder(frames, data, fps)
    worker.start()
    feeder.start()
    try:
        yield worker, results, feeder
    finally:
        feeder.stop()
        worker.stop()


PYTHON = sys.executable
