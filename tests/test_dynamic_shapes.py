"""A .tflite with dynamic input dims: refused by ``edge-convert bundle`` without
``--input-shape``, bundled at the given shape, then validated and served by the
agent's runtime at the manifest's shape (the file stays dynamic)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.config import PipelineConfig
from agent.loops.postprocess import FrameContext
from agent.loops.processing import build_processing
from agent.models.manifest import input_shapes_beside, read_bundle
from agent.models.runtime import ModelLoadError, load_model
from agent.models.validate import Validator
from converter.inspect import describe, format_description

pytestmark = [pytest.mark.slow, pytest.mark.workstation]

RUNTIMES = ["ai_edge_litert", "tflite_runtime"]
SHAPE = "1,16,16,3"


def edge_convert(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "converter", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error:" in line]


@pytest.fixture(scope="module")
def dynamic_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Input float32[-1, -1, -1, 3]; outputs a per-pixel map [-1, -1, -1, 2] and its
    spatial mean [-1, 2]."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(3)
    inp = tf.keras.Input(shape=(None, None, 3))
    mapped = tf.keras.layers.Conv2D(2, 3, padding="same")(inp)
    pooled = tf.keras.layers.GlobalAveragePooling2D()(mapped)
    converter = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inp, [mapped, pooled]))
    with contextlib.redirect_stdout(io.StringIO()):
        data = converter.convert()
    path = tmp_path_factory.mktemp("dynamic") / "dynamic.tflite"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def bundle(dynamic_model: Path) -> Path:
    val = dynamic_model.with_name("val.npy")
    np.save(val, np.random.default_rng(0).random((6, 16, 16, 3), dtype=np.float32))
    out = dynamic_model.with_name("bundle")
    proc = edge_convert(
        "bundle", dynamic_model, "-o", out, "--task", "raw", "--input-shape", SHAPE,
        "--val", val, "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["golden_samples"] > 0
    return out


def test_bundle_without_input_shape_names_the_dynamic_input(
    dynamic_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "b"
    proc = edge_convert("bundle", dynamic_model, "-o", out, "--task", "raw")
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert line.endswith("shape [-1, -1, -1, 3] is dynamic: give --input-shape 1,H,W,3")
    assert "input 'serving_default" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        (["1,16,16"], "--input-shape 1,16,16 does not fit input"),
        (["1,16,16,4"], "does not fit input"),
        ([SHAPE, SHAPE], "2 --input-shape option(s) for a model with 1 input(s)"),
        (["1,0,16,3"], "expected comma-separated positive integers"),
    ],
)
def test_input_shape_that_does_not_fit_is_refused(
    dynamic_model: Path, tmp_path: Path, shapes: list[str], expected: str
) -> None:
    options = [arg for shape in shapes for arg in ("--input-shape", shape)]
    proc = edge_convert("bundle", dynamic_model, "-o", tmp_path / "b", *options)
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert expected in line


def test_inspect_reports_dynamic_dims(dynamic_model: Path, bundle: Path) -> None:
    info = describe(dynamic_model)
    [inp] = info["inputs"]
    assert inp["dynamic"] is True and inp["shape_signature"] == [-1, -1, -1, 3]
    assert "float32[-1, -1, -1, 3] (dynamic: bundle it with --input-shape)" in (
        format_description(info)
    )
    # A bundle's model runs at the manifest's shape, as on a device.
    info = describe(bundle)
    assert info["inputs"][0]["shape"] == [1, 16, 16, 3]
    assert sorted(o["shape"] for o in info["outputs"]) == [[1, 2], [1, 16, 16, 2]]
    assert "dynamic in the file: [-1, -1, -1, 3]" in format_description(info)


def test_manifest_records_the_fixed_shape(bundle: Path) -> None:
    m = read_bundle(bundle).manifest
    assert [t.shape for t in m.inputs] == [[1, 16, 16, 3]]
    assert sorted(t.shape for t in m.outputs) == [[1, 2], [1, 16, 16, 2]]
    assert input_shapes_beside(bundle / "model.tflite") == [[1, 16, 16, 3]]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_agent_validates_and_serves_it_at_the_manifest_shape(bundle: Path, runtime: str) -> None:
    stored = read_bundle(bundle)
    path, manifest = stored.model_path, stored.manifest
    report = Validator(runtime=runtime, timeout_s=30).validate(path, manifest)
    assert report.inputs[0].shape == (1, 16, 16, 3)
    assert report.golden is not None and report.golden["over"] == 0

    # As the service's loader loads it: the shapes from the manifest beside the file.
    loaded = load_model(path, runtime=runtime, input_shapes=input_shapes_beside(path))
    config = PipelineConfig.model_validate(
        {"name": "p", "model": manifest.name, "source": {"type": "synthetic"}}
    )
    proc = build_processing(manifest.version, manifest, loaded, config)
    frame = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    tensor, transform = proc.pre(frame)
    loaded.interpreter.set_tensor(proc.input_index, tensor)
    loaded.interpreter.invoke()
    values = [loaded.interpreter.get_tensor(o.index) for o in loaded.outputs]
    # The converter's output order is its own: the map is the 4-D one.
    raw = proc.post(values, FrameContext(transform=transform)).raw or []
    m = next(i for i, v in enumerate(values) if v.ndim == 4)
    mapped, pooled = raw[m], raw[1 - m]
    assert mapped.shape == [1, 16, 16, 2] and mapped.values is None
    assert mapped.mean == pytest.approx(float(values[m].astype(np.float64).mean()), abs=1e-5)
    assert pooled.shape == [1, 2] and pooled.values is not None and len(pooled.values) == 2


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_shape_the_input_cannot_take_is_a_load_error(dynamic_model: Path, runtime: str) -> None:
    with pytest.raises(ModelLoadError, match=r"cannot take the shape \[1, 16, 16, 4\]"):
        load_model(dynamic_model, runtime=runtime, input_shapes=[[1, 16, 16, 4]])
