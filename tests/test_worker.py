from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.loops.frames import Frame, FrameQueue
from agent.loops.worker import InferenceWorker, ServedModel, feed_tensor
from agent.models import runtime as rt
from tests.lifecycle_support import RUNTIMES, build_nan_classifier, running_worker
from tests.model_factory import build_tiny_classifier


@pytest.fixture(scope="module")
def other_int8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shapes as tiny_int8_model, other weights: its outputs tell the two apart."""
    return build_tiny_classifier(tmp_path_factory.mktemp("m") / "other.tflite", seed=7)


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_nan_classifier(tmp_path_factory.mktemp("m") / "nan.tflite")


def frame_data() -> np.ndarray:
    return np.random.default_rng(3).integers(-128, 127, (1, 8, 8, 1), dtype=np.int8)


def reference_output(model: Path, data: np.ndarray) -> np.ndarray:
    m = rt.load_model(model.read_bytes(), runtime="ai_edge_litert")
    m.interpreter.set_tensor(m.inputs[0].index, data)
    m.interpreter.invoke()
    out = m.outputs[0]
    raw = m.interpreter.get_tensor(out.index).astype(np.float32)
    return (raw - out.zero_point) * out.scale


def wait_until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_swaps_under_a_running_stream_drop_and_repeat_nothing(
    runtime: str, tiny_int8_model: Path, other_int8_model: Path
) -> None:
    data = frame_data()
    expected = {
        "a": reference_output(tiny_int8_model, data),
        "b": reference_output(other_int8_model, data),
    }
    assert not np.allclose(expected["a"], expected["b"])
    paths = {"a": tiny_int8_model, "b": other_int8_model}
    order = ["a", "b", "a", "b", "a", "b"]
    with running_worker("cam", "digits", data, runtime, fps=300) as (worker, results, feeder):
        assert worker.swap("a", paths["a"]).result(10).previous is None
        for i, version in enumerate(order[1:], start=1):
            results.wait_for(10 * i)
            done = worker.swap(version, paths[version]).result(10)
            assert (done.version, done.previous) == (version, order[i - 1])
            assert worker.serving_version() == version
        results.wait_for(10 * len(order))
        feeder.stop()
        wait_until(lambda: len(results.snapshot()) == feeder.sent)
        items = results.snapshot()
    # Every frame exactly once, in order.
    assert [r.seq for r in items] == list(range(feeder.sent))
    assert feeder.refused == 0
    # Versions come in blocks, in swap order, and each result is the tagged model's output.
    blocks = [items[0].version]
    for r in items[1:]:
        if r.version != blocks[-1]:
            blocks.append(r.version)
    assert blocks == order
    for r in items:
        assert (r.pipeline, r.model) == ("cam", "digits")
        np.testing.assert_allclose(r.outputs[0], expected[r.version], atol=1e-6)
    stats = worker.stats("b")
    assert stats is not None and stats.invokes > 0 and stats.errors == 0
    assert stats.p95_ms is not None


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_invoke_errors_are_counted_and_never_stop_the_worker(
    runtime: str, tiny_int8_model: Path
) -> None:
    def flaky(model: ServedModel, frame: Frame) -> None:
        if frame.seq % 4 == 0:
            raise RuntimeError(f"frame {frame.seq} is unreadable")
        feed_tensor(model, frame)

    with running_worker("cam", "digits", frame_data(), runtime, prepare=flaky) as (
        worker,
        results,
        _feeder,
    ):
        worker.swap("1", tiny_int8_model).result(10)
        items = results.wait_for(30)
        stats = worker.stats("1")
    assert stats is not None
    assert stats.errors >= 7
    assert "unreadable" in (stats.last_error or "")
    assert all(r.seq % 4 != 0 for r in items)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_nan_outputs_are_counted_and_not_delivered(runtime: str, nan_model: Path) -> None:
    data = np.zeros((1, 8, 8, 1), np.float32)
    with running_worker("cam", "digits", data, runtime) as (worker, results, _feeder):
        worker.swap("nan", nan_model).result(10)
        wait_until(lambda: (worker.stats("nan") or stats_zero).nonfinite >= 10)
        assert results.snapshot() == []
        assert worker.serving_version() == "nan"


stats_zero = type("Z", (), {"nonfinite": 0})()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_model_that_cannot_be_built_leaves_the_old_one_serving(
    runtime: str, tiny_int8_model: Path, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"nope" * 100)
    with running_worker("cam", "digits", frame_data(), runtime) as (worker, results, _feeder):
        worker.swap("1", tiny_int8_model).result(10)
        with pytest.raises(RuntimeError, match="cannot build digits 2 on cam"):
            worker.swap("2", garbage).result(10)
        n = len(results.wait_for(5))
        items = results.wait_for(n + 5)
        assert {r.version for r in items} == {"1"}
        assert worker.serving_version() == "1"


def test_unload_stops_serving_and_stop_is_prompt(tiny_int8_model: Path) -> None:
    frames = FrameQueue(8)
    got: list[object] = []
    worker = InferenceWorker("cam", "digits", frames, got.append)
    worker.start()
    worker.swap("1", tiny_int8_model).result(10)
    frames.put(Frame(0, 0.0, frame_data()))
    wait_until(lambda: len(got) == 1)
    done = worker.swap(None, None).result(10)
    assert (done.version, done.previous) == (None, "1")
    frames.put(Frame(1, 0.0, frame_data()))
    time.sleep(0.2)
    assert len(got) == 1 and frames.qsize() == 1  # no model: frames wait, none is lost
    start = time.monotonic()
    worker.stop()
    assert time.monotonic() - start < 1.0
    assert not any(t.name == "worker-cam" for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="stopped"):
        worker.swap("1", tiny_int8_model).result(1)
