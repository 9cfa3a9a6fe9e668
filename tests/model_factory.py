"""Tiny real TFLite models for tests that need a model but not the converter's bundle.

TensorFlow is imported lazily, and after the TFLite runtimes (see conftest), since
importing it first breaks every tflite_runtime Interpreter in the process.

With ``EDGE_TEST_MODELS`` set (`make test-pythons`, whose venvs have no TensorFlow), each
builder copies the file tests/prebuilt_models.py made for the same arguments instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import numpy as np

PREBUILT_ENV = "EDGE_TEST_MODELS"


def prebuilt(name: str, dest: Path) -> Path | None:
    """``dest`` as a copy of the prebuilt model (file or bundle directory) ``name``, or
    None when no prebuilt models are given: the caller builds it with TensorFlow."""
    root = os.environ.get(PREBUILT_ENV)
    if not root:
        return None
    src = Path(root) / name
    if not src.exists():
        raise FileNotFoundError(
            f"{src}: no such prebuilt model ({PREBUILT_ENV}={root}); "
            "tests/prebuilt_models.py must build it (list it in MODELS there)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)
    else:
        shutil.copyfile(src, dest)
    return dest


def tiny_name(input_shape: tuple[int, ...], classes: int, int8: bool, seed: int) -> str:
    shape = "x".join(map(str, input_shape))
    return f"tiny-{'int8' if int8 else 'float'}-{shape}-{classes}-seed{seed}.tflite"


def slow_name(input_shape: tuple[int, ...], classes: int, layers: int) -> str:
    return f"slow-{'x'.join(map(str, input_shape))}-{classes}-layers{layers}.tflite"


def build_tiny_classifier(
    dest: Path,
    *,
    input_shape: tuple[int, ...] = (8, 8, 1),
    classes: int = 10,
    int8: bool = True,
    seed: int = 0,
) -> Path:
    """A conv + dense classifier as a .tflite file (full-integer int8 unless ``int8=False``)."""
    if copied := prebuilt(tiny_name(input_shape, classes, int8, seed), dest):
        return copied
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential(
        [
            tf.keras.Input(input_shape),
            tf.keras.layers.Conv2D(4, 3, activation="relu"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(classes),
        ]
    )
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        rng = np.random.default_rng(seed)

        def representative():  # type: ignore[no-untyped-def]
            for _ in range(16):
                yield [rng.random((1, *input_shape), dtype=np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with contextlib.redirect_stdout(io.StringIO()):
        data = converter.convert()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def build_slow_classifier(
    dest: Path, *, input_shape: tuple[int, ...] = (8, 8, 1), classes: int = 10, layers: int = 8
) -> Path:
    """The tiny classifier's inputs and outputs (full-integer int8) behind ``layers``
    wide convolutions: a real model that does the same job many times slower."""
    if copied := prebuilt(slow_name(input_shape, classes, layers), dest):
        return copied
    import tensorflow as tf

    tf.keras.utils.set_random_seed(1)
    model = tf.keras.Sequential(
        [
            tf.keras.Input(input_shape),
            # 8x8 -> 64x64: the input stays the tiny model's, the work grows 64 times.
            tf.keras.layers.UpSampling2D(8),
            *[
                tf.keras.layers.Conv2D(128, 3, padding="same", activation="relu")
                for _ in range(layers)
            ],
            tf.keras.layers.MaxPooling2D(8),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(classes),
        ]
    )
    rng = np.random.default_rng(1)

    def representative():  # type: ignore[no-untyped-def]
        for _ in range(16):
            yield [rng.random((1, *input_shape), dtype=np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    with contextlib.redirect_stdout(io.StringIO()):
        data = converter.convert()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest
