from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.models import runtime as rt
from tests.device_venv import DEVICE_RUNTIMES

INSTALLED = [r.name for r in rt.available_runtimes()]


def test_the_device_runtimes_expected_here_are_installed() -> None:
    # The lifecycle is tested on each; a missing one would silently shrink coverage.
    assert [n for n in INSTALLED if n != "tensorflow"] == DEVICE_RUNTIMES


def test_auto_picks_the_fastest_installed() -> None:
    assert rt.select_runtime("auto").name == INSTALLED[0] == "ai_edge_litert"


@pytest.mark.workstation
def test_tensorflow_lite_runtime_loads_too(tiny_int8_model: Path) -> None:
    # The workstation fallback: conftest imported the device runtimes first.
    loaded = rt.load_model(tiny_int8_model, runtime="tensorflow")
    assert loaded.runtime.name == "tensorflow" and loaded.outputs[0].shape == (1, 10)


def test_unknown_runtime_is_named() -> None:
    with pytest.raises(rt.RuntimeUnavailable, match="unknown runtime 'onnx'"):
        rt.select_runtime("onnx")


@pytest.mark.parametrize("name", DEVICE_RUNTIMES)
def test_loads_and_invokes_an_int8_model(name: str, tiny_int8_model: Path) -> None:
    loaded = rt.load_model(tiny_int8_model, runtime=name, num_threads=1)
    assert loaded.runtime.name == name
    assert loaded.runtime.version[0].isdigit()
    (inp,) = loaded.inputs
    (out,) = loaded.outputs
    assert (inp.shape, inp.dtype, out.shape, out.dtype) == ((1, 8, 8, 1), "int8", (1, 10), "int8")
    assert inp.quantized and out.quantized
    loaded.interpreter.set_tensor(inp.index, np.zeros(inp.shape, np.int8))
    loaded.interpreter.invoke()
    assert loaded.interpreter.get_tensor(out.index).shape == (1, 10)


def int8_outputs(model: Path, runtime: str, x: np.ndarray) -> np.ndarray:
    m = rt.load_model(model.read_bytes(), runtime=runtime)
    m.interpreter.set_tensor(m.inputs[0].index, x)
    m.interpreter.invoke()
    return np.asarray(m.interpreter.get_tensor(m.outputs[0].index)).astype(int)


@pytest.mark.workstation
def test_runtimes_agree_on_the_same_model(tiny_int8_model: Path) -> None:
    # The two device runtimes against each other, on inputs that spread over the range.
    assert len(DEVICE_RUNTIMES) == 2
    rng = np.random.default_rng(1)
    for _ in range(8):
        x = rng.integers(-128, 127, (1, 8, 8, 1), dtype=np.int8)
        litert, tflite = (int8_outputs(tiny_int8_model, r, x) for r in DEVICE_RUNTIMES)
        assert np.abs(litert - tflite).max() <= 1, (litert, tflite)


@pytest.mark.workstation
@pytest.mark.parametrize("name", DEVICE_RUNTIMES)
def test_runtime_int8_output_follows_the_float_model(
    name: str, tiny_int8_model: Path, tiny_float_model: Path
) -> None:
    # The reference is the float32 model with the same weights (same seed), run by
    # TensorFlow's own interpreter: neither device runtime judges itself.
    q = rt.load_model(tiny_int8_model.read_bytes(), runtime=name)
    f = rt.load_model(tiny_float_model.read_bytes(), runtime="tensorflow")
    qin, qout = q.inputs[0], q.outputs[0]
    rng = np.random.default_rng(2)
    worst = 0.0
    for _ in range(8):
        x = rng.random((1, 8, 8, 1), dtype=np.float32)  # the calibration range
        q.interpreter.set_tensor(qin.index, qin.quantize(x))
        q.interpreter.invoke()
        got = qout.dequantize(q.interpreter.get_tensor(qout.index))
        f.interpreter.set_tensor(f.inputs[0].index, x)
        f.interpreter.invoke()
        want = f.interpreter.get_tensor(f.outputs[0].index)
        worst = max(worst, float(np.abs(got - want).max()))
    # Rounding of the input, weights and output: a few output steps at most.
    assert worst <= 4 * qout.scale, f"{name}: off by {worst} ({worst / qout.scale:.1f} steps)"


@pytest.mark.parametrize("name", DEVICE_RUNTIMES)
def test_garbage_file_is_a_model_load_error(name: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"this is not a flatbuffer" * 10)
    with pytest.raises(rt.ModelLoadError, match=f"{name} cannot load the model"):
        rt.load_model(bad, runtime=name)


def test_missing_edgetpu_library_is_named(tiny_int8_model: Path) -> None:
    with pytest.raises(rt.DelegateUnavailable, match="libedgetpu.so.1"):
        rt.load_model(tiny_int8_model, delegate="edgetpu")


def test_missing_external_delegate_is_named(tiny_int8_model: Path, tmp_path: Path) -> None:
    with pytest.raises(rt.DelegateUnavailable, match="nope.so"):
        rt.load_model(tiny_int8_model, delegate="external", delegate_path=tmp_path / "nope.so")
