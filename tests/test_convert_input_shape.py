"""``edge-convert convert --input-shape``: a Keras model with unknown input dims is
refused with the option to give and a shape for it, and with the option converts at
that shape (a .tflite without dynamic dims, which every runtime loads as it is)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.models import runtime as rt
from agent.models.manifest import read_bundle
from converter.errors import ConverterError
from converter.pipeline import ConvertOptions, run_convert
from tests.device_venv import DEVICE_RUNTIMES

pytestmark = [pytest.mark.slow, pytest.mark.workstation]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import tensorflow as tf

    work = tmp_path_factory.mktemp("dynamic")
    inp = tf.keras.Input((None, None, 3))
    pooled = tf.keras.layers.GlobalAveragePooling2D()(tf.keras.layers.Conv2D(4, 1)(inp))
    tf.keras.Model(inp, tf.keras.layers.Dense(3)(pooled)).save(work / "dynamic.keras")
    rng = np.random.default_rng(0)
    np.save(work / "calib.npy", rng.random((8, 24, 32, 3)).astype(np.float32))
    return work


def options(work: Path, out: str, shape: list[int] | None) -> ConvertOptions:
    return ConvertOptions(model=work / "dynamic.keras", out=work / out, calib=work / "calib.npy",
                          samples=8, task="raw", progress=False, input_shape=shape)  # fmt: skip


def test_unknown_dims_name_the_option_and_a_shape(work: Path) -> None:
    with pytest.raises(ConverterError, match=r"\[1, None, None, 3\] .*give --input-shape 1,H,W,3"):
        run_convert(options(work, "none", None))
    with pytest.raises(ConverterError, match=r"--input-shape 1,24,32,4 does not fit"):
        run_convert(options(work, "bad", [1, 24, 32, 4]))
    assert not (work / "none").exists() and not (work / "bad").exists()


@pytest.mark.parametrize("runtime", DEVICE_RUNTIMES)
def test_the_model_converts_at_the_shape_given(work: Path, runtime: str) -> None:
    bundle = work / "fixed"
    if not bundle.exists():
        run_convert(options(work, "fixed", [1, 24, 32, 3]))
    manifest = read_bundle(bundle).manifest
    assert manifest.inputs[0].shape == [1, 24, 32, 3]
    loaded = rt.load_model((bundle / "model.tflite").read_bytes(), runtime=runtime)
    (inp,) = loaded.inputs
    assert inp.shape == (1, 24, 32, 3) and not inp.dynamic
    loaded.interpreter.set_tensor(inp.index, inp.quantize(np.full((1, 24, 32, 3), 0.5)))
    loaded.interpreter.invoke()
    assert loaded.interpreter.get_tensor(loaded.outputs[0].index).shape == (1, 3)
