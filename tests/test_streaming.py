"""Streaming models that keep state between windows (manifest ``state``).

The model is a leaky accumulator: ``new_state = 0.5 * state + frame`` and ``level =
mean(new_state)``. On a constant window of value v, a stream of windows gives v, 1.5v,
1.75v, ... while each window alone gives v: the results prove the state is carried,
and that it starts from zero again when version 2 swaps in."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import PipelineConfig
from agent.loops.pipeline import Pipeline
from agent.loops.stream_state import StreamState
from agent.models import runtime as rt
from agent.models.manifest import (
    AudioFeatures,
    Manifest,
    ManifestError,
    Preprocess,
    StateLink,
    parse_manifest,
    read_bundle,
)
from agent.models.output_fit import OutputMismatch, check_outputs
from agent.models.validate import ValidationFailed, Validator
from agent.ops.stream_queue import stream_queue_warning
from agent.protocol import ReplyCode, Result
from converter.bundle import BundleSpec, wrap_tflite
from converter.errors import ConverterError
from tests.device_venv import DEVICE_RUNTIMES
from tests.keyword_models import write_wav

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 8
RATE = 1000
LEVEL = 0.25  # the WAV's constant sample value (exact in 16-bit PCM)


def slow(test: Any) -> Any:
    """Builds the model with TensorFlow: not on device venvs."""
    return pytest.mark.slow(pytest.mark.workstation(test))


def _build_tflite(dest: Path) -> Path:
    import tensorflow as tf

    frame = tf.keras.Input((WINDOW,), name="frame")
    state = tf.keras.Input((WINDOW,), name="state")
    new_state = tf.keras.layers.Add()([tf.keras.layers.Rescaling(0.5)(state), frame])
    level = tf.keras.layers.Dense(
        1, use_bias=False, kernel_initializer=tf.keras.initializers.Constant(1 / WINDOW)
    )(new_state)
    model = tf.keras.Model([frame, state], [level, new_state])
    with contextlib.redirect_stdout(io.StringIO()):
        data = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def _names(path: Path) -> tuple[str, str, str]:
    """(state input, state output, level output) of the .tflite, by name and shape."""
    loaded = rt.load_model(path)
    (state_in,) = [t.name for t in loaded.inputs if "state" in t.name]
    (state_out,) = [t.name for t in loaded.outputs if t.shape == (1, WINDOW)]
    (level,) = [t.name for t in loaded.outputs if t.shape == (1, 1)]
    return state_in, state_out, level


@pytest.fixture(scope="module")
def tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_tflite(tmp_path_factory.mktemp("stream") / "accumulator.tflite")


def _bundle(tflite: Path, dest: Path, version: str, val: Path | None = None) -> Path:
    state_in, state_out, _ = _names(tflite)
    spec = BundleSpec(
        "accumulator",
        version,
        "raw",
        preprocess=Preprocess(audio=AudioFeatures(sample_rate=RATE, features="waveform")),
        state=[f"{state_in}:{state_out}"],  # names holding ':' themselves are resolved
    )
    wrap_tflite(tflite, dest, spec, None, val=val)
    return dest


@pytest.fixture(scope="module")
def bundles(tflite: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {v: _bundle(tflite, root / f"v{v}", v) for v in ("1", "2")}


# ------------------------------------------------------------------ pure parts


def test_state_links_must_name_the_models_tensors_and_fit() -> None:
    tensor = {"shape": [1, WINDOW], "dtype": "float32"}
    data: dict[str, Any] = {
        "name": "m",
        "version": "1",
        "created_at": "2025-01-01T00:00:00Z",
        "task": "raw",
        "quantization": "none",
        "model": {"sha256": "0" * 64, "size": 1},
        "inputs": [{"name": "x", **tensor}, {"name": "s", **tensor}],
        "outputs": [{"name": "y", "shape": [1, 1], "dtype": "float32"}, {"name": "s2", **tensor}],
        "producer": {"converter": "test"},
        "state": [{"input": "s", "output": "s2"}],
    }
    manifest = parse_manifest(data)
    assert manifest.frame_input == 0
    check_outputs(manifest)
    with pytest.raises(ManifestError, match="state input 'z' is not a model input"):
        parse_manifest({**data, "state": [{"input": "z", "output": "s2"}]})
    with pytest.raises(ManifestError, match="none is left for the frame"):
        both = [{"input": "s", "output": "s2"}, {"input": "x", "output": "y"}]
        parse_manifest({**data, "state": both})
    wrong = parse_manifest({**data, "state": [{"input": "s", "output": "y"}]})
    with pytest.raises(OutputMismatch, match=r"state: output 'y' float32\[1, 1\] cannot feed"):
        check_outputs(wrong)


def test_a_keyword_model_is_checked_on_its_scores_not_its_state() -> None:
    state = {"shape": [1, 16], "dtype": "int8", "scale": 0.1, "zero_point": -3}
    manifest = Manifest.model_validate(
        {
            "name": "kws",
            "version": "1",
            "created_at": "2025-01-01T00:00:00Z",
            "task": "keyword",
            "quantization": "int8",
            "model": {"sha256": "0" * 64, "size": 1},
            "inputs": [{"name": "s", **state}, {"name": "x", "shape": [1, 40], "dtype": "int8"}],
            # The state output first: the task reads the scores all the same.
            "outputs": [{"name": "s2", **state}, {"name": "p", "shape": [1, 3], "dtype": "int8"}],
            "labels": ["_silence_", "up", "down"],
            "producer": {"converter": "test"},
            "state": [{"input": "s", "output": "s2"}],
        }
    )
    assert manifest.frame_input == 1
    check_outputs(manifest)


@slow
def test_stream_queue_warning_only_for_a_streaming_model_on_latest(
    bundles: dict[str, Path],
) -> None:
    manifest = read_bundle(bundles["1"]).manifest
    source = {"type": "wav", "path": "/x.wav", "sample_rate": RATE}
    latest = PipelineConfig.model_validate({"name": "kws", "model": "m", "source": source})
    fifo = latest.model_copy(update={"queue": "fifo"})
    warning = stream_queue_warning(latest, manifest)
    assert warning is not None and "queue 'latest'" in warning
    assert stream_queue_warning(fifo, manifest) is None


# ------------------------------------------------------------------ the model


@slow
@pytest.mark.parametrize("runtime", DEVICE_RUNTIMES)
def test_stream_state_starts_at_zero_and_carries_on(runtime: str, bundles: dict[str, Path]) -> None:
    bundle = read_bundle(bundles["1"])
    loaded = rt.load_model(bundle.model_path, runtime=rt.select_runtime(runtime))
    assert bundle.manifest.state is not None
    stream = StreamState(loaded, bundle.manifest.state)
    frame = loaded.inputs[bundle.manifest.frame_input]
    level = next(o for o in loaded.outputs if o.shape == (1, 1))
    x = np.full((1, WINDOW), LEVEL, np.float32)
    got = []
    for _ in range(3):
        loaded.interpreter.set_tensor(frame.index, x)
        stream.feed()
        loaded.interpreter.invoke()
        stream.keep()
        got.append(float(loaded.interpreter.get_tensor(level.index)[0, 0]))
    assert got == pytest.approx([LEVEL, 1.5 * LEVEL, 1.75 * LEVEL], abs=1e-6)
    stream.reset()
    stream.feed()
    loaded.interpreter.invoke()
    assert float(loaded.interpreter.get_tensor(level.index)[0, 0]) == pytest.approx(LEVEL)


def _levels(results: list[Result], version: str) -> list[float]:
    out = []
    for r in list(results):
        if r.version == version:
            assert r.raw is not None and len(r.raw) == 1, "the state output is not published"
            assert r.raw[0].values is not None
            out.append(r.raw[0].values[0])
    return out


def _wait(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@slow
@pytest.mark.parametrize("runtime", DEVICE_RUNTIMES)
def test_a_pipeline_carries_state_between_windows_and_resets_it_on_a_swap(
    runtime: str, bundles: dict[str, Path], tmp_path: Path
) -> None:
    wav = write_wav(tmp_path / "dc.wav", np.full(RATE, LEVEL), rate=RATE)
    source = {"type": "wav", "path": str(wav), "sample_rate": RATE, "pace": "native",
              "window_s": WINDOW / RATE, "hop_s": WINDOW / RATE}  # fmt: skip
    config = PipelineConfig.model_validate(
        {"name": "kws", "model": "accumulator", "source": source, "queue": "fifo"}
    )
    manifests = {v: read_bundle(b).manifest for v, b in bundles.items()}
    results: list[Result] = []
    runtime_ = rt.select_runtime(runtime)
    pipeline = Pipeline(
        config,
        device="pi-test",
        manifests=lambda name, version: manifests.get(version),
        publish=results.append,
        load=lambda path: rt.load_model(path, runtime=runtime_, num_threads=1),
    )
    pipeline.start()
    try:
        pipeline.worker.swap("1", bundles["1"] / "model.tflite").result(60)
        _wait(lambda: len(_levels(results, "1")) >= 4, "4 results of version 1")
        pipeline.worker.swap("2", bundles["2"] / "model.tflite").result(60)
        _wait(lambda: len(_levels(results, "2")) >= 4, "4 results of version 2")
    finally:
        pipeline.stop()
    for version in ("1", "2"):
        levels = _levels(results, version)[:4]
        # Each from zero state: v, 1.5v, 1.75v, 1.875v (a window alone gives v every time).
        assert levels == pytest.approx([LEVEL * (2 - 0.5**k) for k in range(4)], abs=1e-4)
    assert pipeline.frames.dropped == 0


@slow
def test_a_manifest_whose_state_tensors_do_not_fit_is_refused_at_deploy(
    tflite: Path, bundles: dict[str, Path]
) -> None:
    bundle = read_bundle(bundles["1"])
    state_in, _, level = _names(tflite)
    data = dict(bundle.manifest_data)
    data["state"] = [{"input": state_in, "output": level}]
    manifest = parse_manifest(data)
    validator = Validator(runtime="ai_edge_litert")
    validator.validate(bundle.model_path, bundle.manifest)  # the right one passes
    with pytest.raises(ValidationFailed) as refused:
        validator.validate(bundle.model_path, manifest)
    assert refused.value.code == ReplyCode.INCOMPATIBLE
    assert f"output {level!r} float32[1, 1] cannot feed input {state_in!r}" in refused.value.message
    spec = BundleSpec("accumulator", "3", "raw", state=[StateLink(input=state_in, output=level)])
    with pytest.raises(ConverterError, match="cannot feed input"):
        wrap_tflite(tflite, Path(tflite.parent / "bad"), spec, None)


@slow
def test_edge_convert_bundle_state_option_with_golden_samples(tflite: Path, tmp_path: Path) -> None:
    """``--state IN:OUT`` from the command line; ``--val`` gives golden samples whose state
    inputs are zero (and no reference), which the validation child checks."""
    state_in, state_out, _ = _names(tflite)
    val = tmp_path / "val.npy"
    np.save(val, np.random.default_rng(0).uniform(-1, 1, (16, WINDOW)).astype(np.float32))
    dest = tmp_path / "bundle"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "converter", "bundle", str(tflite), "-o", str(dest), "--task",
         "raw", "--state", f"{state_in}:{state_out}", "--val", str(val), "--json"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["golden_samples"] == 4 and report["reference_samples"] == 0
    bundle = read_bundle(dest)
    assert bundle.manifest.state == [StateLink(input=state_in, output=state_out)]
    assert bundle.manifest.golden is not None
    sample = bundle.manifest.golden.samples[0]
    assert len(sample.inputs) == 2
    Validator(runtime="ai_edge_litert").validate(bundle.model_path, bundle.manifest)
    bad = subprocess.run(
        [sys.executable, "-m", "converter", "bundle", str(tflite), "-o", str(tmp_path / "b2"),
         "--task", "raw", "--state", f"{state_in}:nope"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "is not INPUT:OUTPUT of this model" in bad.stderr


@slow
def test_edge_agent_check_warns_of_a_streaming_model_on_a_latest_queue(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    import yaml

    from agent.models.store import ModelStore

    bundle = read_bundle(bundles["1"])
    store = ModelStore(tmp_path / "state", require_signature=False)
    store.install(bundle.manifest_data, None, bundle.model_path)
    store.set_active("accumulator", "1")
    wav = write_wav(tmp_path / "dc.wav", np.full(RATE, LEVEL), rate=RATE)
    source = {"type": "wav", "path": str(wav), "sample_rate": RATE,
              "window_s": WINDOW / RATE, "hop_s": WINDOW / RATE}  # fmt: skip
    config = {
        "device": {"id": "chk-1"},
        "state_dir": str(tmp_path / "state"),
        "models": {"require_signature": False},
        "mqtt": {"host": "127.0.0.1", "port": 1},
        "pipelines": [{"name": "kws", "model": "accumulator", "source": source}],
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "check", str(path), "--timeout", "3"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    rows = [line for line in proc.stdout.splitlines() if line.startswith("WARN")]
    assert any("queue kws" in r and "keeps state between windows" in r for r in rows), proc.stdout
    assert "set pipelines[kws].queue: fifo" in proc.stdout
    assert any(
        line.startswith("PASS") and "model accumulator" in line for line in proc.stdout.splitlines()
    ), proc.stdout
