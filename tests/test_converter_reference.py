"""converter.reference in-process: reference statistics by task, golden samples in a budget."""

from __future__ import annotations

import base64
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.models.golden import unpack_input, unpack_output
from agent.models.manifest import Preprocess, read_bundle
from agent.models.runtime import TensorInfo, load_model
from agent.models.validate import Validator
from converter import reference
from converter.errors import ConverterError
from converter.examples import DIGITS_STD, ExampleFiles
from converter.pipeline import ConvertOptions, run_convert
from converter.reference import golden_of, reference_of
from converter.reference_probe import survives
from tests.converter_support import build_digits_bundle, digits_example
from tests.lifecycle_support import RUNTIMES

# Trains and converts the digits example: TensorFlow (left out of the device venvs).
pytestmark = [pytest.mark.slow, pytest.mark.workstation]


@pytest.fixture(scope="module")
def digits() -> ExampleFiles:
    return digits_example()


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    bundle = build_digits_bundle(tmp_path_factory.mktemp("b") / "digits", "1")
    return (bundle / "model.tflite").read_bytes()


def info(name: str, shape: tuple[int, ...], index: int) -> TensorInfo:
    return TensorInfo(name, index, shape, "float32", 0.0, 0)


def test_detect_reference_reads_the_ssd_outputs_up_to_each_frames_count() -> None:
    outputs = [
        info("boxes", (1, 5, 4), 0),
        info("num_detections", (1,), 1),
        info("scores", (1, 5), 2),
        info("classes", (1, 5), 3),
    ]
    n = 3
    scores = np.array([[0.9, 0.8, 0.1, 0.9, 0.9], [0.7, 0.0, 0.0, 0.0, 0.0], [0.6, 0.5, 0.3, 0, 0]])
    values = [
        np.zeros((n, 5, 4), np.float32),
        np.array([2.0, 1.0, 3.0], np.float32),  # the rows past the count are padding
        scores.astype(np.float32),
        np.array([[1, 2, 0, 0, 0], [1, 0, 0, 0, 0], [2, 2, 1, 0, 0]], np.float32),
    ]
    reference = reference_of("detect", outputs, values)
    detect = reference.detect
    assert reference.samples == 3 and detect is not None
    # Frames with 2, 1 and 3 counted boxes (all scores >= 0.25 up to the count).
    assert detect.boxes_per_frame.freq[1:4] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert set(detect.score_quantiles) == {"1", "2"}
    assert detect.score_quantiles["1"][0] == pytest.approx(0.3, abs=0.05)


def test_raw_reference_has_one_entry_per_output() -> None:
    outputs = [info("a", (1, 4), 0), info("b", (1, 2, 2), 1)]
    values = [np.ones((10, 4), np.float32), np.full((10, 2, 2), 3.0, np.float32)]
    raw = reference_of("raw", outputs, values).raw
    assert raw is not None and raw.mean == [1.0, 3.0] and raw.std == [0.0, 0.0]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_golden_samples_squeezed_into_a_small_budget_still_pass_on_the_device(
    runtime: str, digits: ExampleFiles, digits_model: bytes, tmp_path: Path
) -> None:
    x = np.load(digits.val)["x"][:40] / DIGITS_STD
    loaded = load_model(digits_model)
    golden = golden_of(digits_model, loaded, x, 4, quantization="int8", budget=200)
    assert golden is not None and len(golden.samples) == 4
    stored = sum(
        len(base64.b64decode(t.data)) for s in golden.samples for t in (*s.inputs, *s.outputs)
    )
    assert stored <= 200
    first = golden.samples[0].inputs[0]
    assert first.stored is not None and first.shape == [1, 8, 8, 1]
    # The outputs are the model's on the restored input, which is what a device feeds.
    (inp,), (out,) = loaded.inputs, loaded.outputs
    loaded.interpreter.set_tensor(inp.index, unpack_input(first))
    loaded.interpreter.invoke()
    np.testing.assert_array_equal(
        loaded.interpreter.get_tensor(out.index).reshape(-1),
        unpack_output(golden.samples[0].outputs[0]),
    )
    model = tmp_path / "model.tflite"
    model.write_bytes(digits_model)
    report = Validator(runtime=runtime, timeout_s=30).run(model, golden)
    assert report.golden is not None and report.golden["samples"] == 4
    assert report.golden["values"] == 40 and report.golden["over"] == 0


def test_golden_count_is_bounded_and_zero_means_none(
    digits: ExampleFiles, digits_model: bytes
) -> None:
    loaded = load_model(digits_model)
    x = np.load(digits.val)["x"][:5] / DIGITS_STD
    assert golden_of(digits_model, loaded, x, 0, quantization="int8") is None
    few = golden_of(digits_model, loaded, x, 16, quantization="int8")
    assert few is not None and len(few.samples) == 5  # no more than the data holds
    with pytest.raises(ConverterError, match=r"--golden must be 0\.\.16, got 17"):
        golden_of(digits_model, loaded, x, 17, quantization="int8")


def test_convert_without_val_takes_golden_samples_from_the_calibration_set(
    digits: ExampleFiles, tmp_path: Path
) -> None:
    result = run_convert(
        ConvertOptions(
            model=digits.model,
            out=tmp_path / "b",
            calib=digits.calib,
            samples=50,
            preprocess=Preprocess(std=[DIGITS_STD]),
            golden=2,
            progress=False,
        )
    )
    assert (result["reference_samples"], result["golden_samples"]) == (0, 2)
    manifest = read_bundle(tmp_path / "b").manifest
    assert manifest.reference is None and manifest.golden is not None
    assert manifest.golden.tolerance_steps == 4.0


class Disagreeing:
    """The runtime's reference kernels, but ``steps`` off on the samples ``off`` picks."""

    def __init__(self, real: Any, steps: int, off: Callable[[int], bool]) -> None:
        self.real, self.steps, self.off = real, steps, off
        self.fed = 0

    def set_tensor(self, index: int, value: np.ndarray) -> None:
        self.fed += 1
        self.real.set_tensor(index, value)

    def invoke(self) -> None:
        self.real.invoke()

    def get_tensor(self, index: int) -> np.ndarray:
        value = self.real.get_tensor(index)
        if not self.off(self.fed):
            return value
        wide = value.astype(np.int16)  # moved away from the int8 ends: never clipped
        return np.where(wide > 0, wide - self.steps, wide + self.steps).astype(value.dtype)


def test_samples_on_a_knife_edge_are_replaced_by_steadier_ones(
    monkeypatch: pytest.MonkeyPatch, digits: ExampleFiles, digits_model: bytes
) -> None:
    loaded = load_model(digits_model)
    x = np.load(digits.val)["x"][:40] / DIGITS_STD
    real = reference.reference_kernels(loaded, digits_model)
    assert real is not None  # ai_edge_litert has them
    # The reference kernels round differently by a step here and there already (1 step
    # on the digits model). Every other sample 4 steps off: more than half the
    # tolerance of 4, so dropped.
    every_other = Disagreeing(real, 4, lambda n: n % 2 == 1)
    monkeypatch.setattr(reference, "reference_kernels", lambda loaded, model: every_other)
    golden = golden_of(digits_model, loaded, x, 4, quantization="int8")
    assert golden is not None and len(golden.samples) == 4 and every_other.fed == 8
    # One step more is within half the tolerance: kept.
    near = Disagreeing(real, 1, lambda n: True)
    monkeypatch.setattr(reference, "reference_kernels", lambda loaded, model: near)
    golden = golden_of(digits_model, loaded, x, 4, quantization="int8")
    assert golden is not None and near.fed == 4
    always = Disagreeing(real, 4, lambda n: True)
    monkeypatch.setattr(reference, "reference_kernels", lambda loaded, model: always)
    assert golden_of(digits_model, loaded, x, 4, quantization="int8") is None


ABORTS = (sys.executable, "-c", "import os, sys; sys.stdin.read(); os.abort()")
FAILS = (sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit('no BUILTIN_REF here')")


def test_reference_kernels_that_crash_the_process_are_tried_in_a_child_first(
    monkeypatch: pytest.MonkeyPatch, digits: ExampleFiles, digits_model: bytes
) -> None:
    loaded = load_model(digits_model)
    shapes = [t.shape for t in loaded.inputs]
    # The real child runs the digits model on the reference kernels.
    assert survives(digits_model, loaded.runtime.name, shapes) is None
    # A child killed by a signal (ai-edge-litert aborts so on the example MobileNetV2)
    # or failing is reported, and this process is still here to say so.
    assert survives(digits_model, loaded.runtime.name, shapes, ABORTS) == (
        "they crash on this model (signal 6)"
    )
    assert "no BUILTIN_REF here" in (
        survives(digits_model, loaded.runtime.name, shapes, FAILS) or ""
    )
    # Then golden samples are screened on the optimised kernels only: still made.
    monkeypatch.setattr(
        reference, "survives", lambda model, runtime, shapes: "they crash on this model"
    )
    assert reference.reference_kernels(loaded, digits_model) is None
    x = np.load(digits.val)["x"][:40] / DIGITS_STD
    golden = golden_of(digits_model, loaded, x, 4, quantization="int8")
    assert golden is not None and len(golden.samples) == 4
