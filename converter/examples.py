"""Example models: ``digits`` and ``colors`` (classifiers), ``shapes`` (a detector, see
``converter.detector_example``), all trained offline in seconds, and ``mobilenet`` (the
benchmark load).

``digits`` (8x8 grey) and ``colors`` (16x16 RGB patches of six colours, drawn by
``agent.scenes`` like the synthetic ``colors`` source) also write their
data beside the model as 8-bit pixel values 0..255, what a camera gives
(scikit-learn's 0..16 scaled up for digits; RGB order for colors), so the model is
converted with ``--std 255``:
``NAME-calib.npz`` (training images), ``NAME-val.npz`` (held-out images and labels)
and ``NAME-labels.txt``. A different ``seed`` draws other data and other initial
weights: a "retrained" model of the same task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.scenes import COLOR_LABELS, balanced_labels, color_patches
from converter.errors import ConverterError
from converter.tfimport import import_tensorflow, quiet_fds

DIGITS_STD = 255.0
DIGITS_LABELS = [str(d) for d in range(10)]
COLORS_STD = 255.0
COLORS_SIZE = 16


@dataclass(frozen=True)
class ExampleFiles:
    model: Path
    calib: Path | None = None
    val: Path | None = None
    labels: Path | None = None


def check_dest(dest: Path) -> None:
    if dest.suffix not in (".keras", ".h5"):
        raise ConverterError(f"{dest}: the example model is written as .keras or .h5")
    if dest.is_dir():
        raise ConverterError(f"{dest}: is a directory")


def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as (x_train, y_train, x_val, y_val); x pixels 0..255, (n, 8, 8, 1)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.round(digits.images * (255 / 16)).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    val = order[:360]
    train = order[360:]
    return x[train], y[train], x[val], y[val]


def save_example(
    dest: Path,
    model: Any,
    calib: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    labels: list[str],
) -> ExampleFiles:
    """The model and, beside it, its calibration and validation data and its labels."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with quiet_fds():
        model.save(dest)
    return save_data(dest, calib, val, labels)


def save_data(
    dest: Path,
    calib: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    labels: list[str],
) -> ExampleFiles:
    """Beside the model at ``dest``: NAME-calib.npz, NAME-val.npz and NAME-labels.txt."""
    calib_file = dest.with_name(f"{dest.stem}-calib.npz")
    val_file = dest.with_name(f"{dest.stem}-val.npz")
    labels_file = dest.with_name(f"{dest.stem}-labels.txt")
    np.savez(calib_file, **calib)
    np.savez(val_file, **val)
    labels_file.write_text("\n".join(labels) + "\n", encoding="utf-8")
    return ExampleFiles(model=dest, calib=calib_file, val=val_file, labels=labels_file)


def build_digits(dest: Path, *, epochs: int = 12, seed: int = 0) -> ExampleFiles:
    check_dest(dest)
    tf = import_tensorflow()
    x_train, y_train, x_val, y_val = digits_data(seed)
    tf.keras.utils.set_random_seed(seed)
    layers = tf.keras.layers
    # Wide enough that weights, not flatbuffer overhead, dominate the file size.
    model = tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 1)),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=tf.keras.optimizers.Adam(2e-3),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    with quiet_fds():
        model.fit(x_train / DIGITS_STD, y_train, epochs=epochs, batch_size=32, verbose=0)
    return save_example(dest, model, {"x": x_train}, {"x": x_val, "y": y_val}, DIGITS_LABELS)


def colors_data(
    seed: int = 0, train: int = 2400, val: int = 600
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Colour patches as (x_train, y_train, x_val, y_val); x uint8 RGB (n, 16, 16, 3)."""
    rng = np.random.default_rng(seed)
    y_train = balanced_labels(rng, train, len(COLOR_LABELS))
    x_train = color_patches(rng, y_train, COLORS_SIZE, COLORS_SIZE)
    y_val = balanced_labels(rng, val, len(COLOR_LABELS))
    x_val = color_patches(rng, y_val, COLORS_SIZE, COLORS_SIZE)
    return x_train, y_train, x_val, y_val


def build_colors(dest: Path, *, epochs: int = 8, seed: int = 0) -> ExampleFiles:
    check_dest(dest)
    tf = import_tensorflow()
    x_train, y_train, x_val, y_val = colors_data(seed)
    tf.keras.utils.set_random_seed(seed)
    layers = tf.keras.layers
    # Global pooling: the colour matters, not where the stripes of the texture fall.
    model = tf.keras.Sequential(
        [
            tf.keras.Input((COLORS_SIZE, COLORS_SIZE, 3)),
            layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(32, activation="relu"),
            layers.Dense(len(COLOR_LABELS)),
        ]
    )
    model.compile(
        optimizer=tf.keras.optimizers.Adam(3e-3),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    with quiet_fds():
        model.fit(x_train / COLORS_STD, y_train, epochs=epochs, batch_size=32, verbose=0)
    return save_example(dest, model, {"x": x_train}, {"x": x_val, "y": y_val}, list(COLOR_LABELS))


def build_mobilenet(dest: Path, *, seed: int = 0) -> ExampleFiles:
    """An untrained MobileNetV2 at 224x224x3: realistic ops and size, no download."""
    check_dest(dest)
    tf = import_tensorflow()
    tf.keras.utils.set_random_seed(seed)
    with quiet_fds():
        model = tf.keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
        dest.parent.mkdir(parents=True, exist_ok=True)
        model.save(dest)
    return ExampleFiles(model=dest)


def build_shapes(dest: Path, *, epochs: int = 12, seed: int = 0) -> ExampleFiles:
    """The tiny detector (converter.detector_example), imported only when built."""
    from converter.detector_example import build_shapes as build

    return build(dest, epochs=epochs, seed=seed)


def build_digits_torch(dest: Path, *, epochs: int = 12, seed: int = 0) -> ExampleFiles:
    """The digits CNN in PyTorch (converter.torch_examples), imported only when built."""
    from converter.torch_examples import build_digits_torch as build

    return build(dest, epochs=epochs, seed=seed)


EXAMPLES: dict[str, Callable[[Path], ExampleFiles]] = {
    "digits": build_digits,
    "colors": build_colors,
    "shapes": build_shapes,
    "mobilenet": build_mobilenet,
    "digits-torch": build_digits_torch,
}
