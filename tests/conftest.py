"""Shared fixtures: real Mosquitto brokers on free loopback ports, tiny real models."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

# Import the TFLite runtimes before anything can import TensorFlow: the other order
# makes every tflite_runtime Interpreter in the process fail.
with contextlib.suppress(ImportError):
    import tflite_runtime.interpreter  # noqa: F401
with contextlib.suppress(ImportError):
    import ai_edge_litert.interpreter  # noqa: F401

from tests.model_factory import build_tiny_classifier
from tests.mqtt_support import Broker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker for the whole run, for tests that do not stop it."""
    b = Broker(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of this test's own, which the test may stop and restart on the same port."""
    b = Broker(tmp_path / "mosquitto")
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def tiny_int8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real full-integer int8 classifier: input int8[1,8,8,1], output int8[1,10]."""
    return build_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny-int8.tflite")


@pytest.fixture(scope="session")
def tiny_float_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture left in float32."""
    return build_tiny_classifier(
        tmp_path_factory.mktemp("models") / "tiny-float.tflite", int8=False
    )
