"""Example models: ``digits`` (trains in seconds, offline) and ``mobilenet`` (the benchmark load).

``digits`` also writes its data beside the model as 8-bit pixel values 0..255, what
a camera gives (scikit-learn's 0..16 scaled up), so the model is converted with
``--std 255``:
``NAME-calib.npz`` (training images), ``NAME-val.npz`` (held-out images and labels)
and ``NAME-labels.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converter.errors import ConverterError
from converter.tfimport import import_tensorflow, quiet_fds

DIGITS_STD = 255.0
DIGITS_LABELS = [str(d) for d in range(10)]


@dataclass(frozen=True)
class ExampleFiles:
    model: Path
    calib: Path | None = None
    val: Path | None = None
    labels: Path | None = None


def _check_dest(dest: Path) -> None:
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


def build_digits(dest: Path, *, epochs: int = 12, seed: int = 0) -> ExampleFiles:
    _check_dest(dest)
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    with quiet_fds():
        model.save(dest)
    calib = dest.with_name(f"{dest.stem}-calib.npz")
    val = dest.with_name(f"{dest.stem}-val.npz")
    labels = dest.with_name(f"{dest.stem}-labels.txt")
    np.savez(calib, x=x_train)
    np.savez(val, x=x_val, y=y_val)
    labels.write_text("\n".join(DIGITS_LABELS) + "\n", encoding="utf-8")
    return ExampleFiles(model=dest, calib=calib, val=val, labels=labels)


def build_mobilenet(dest: Path, *, seed: int = 0) -> ExampleFiles:
    """An untrained MobileNetV2 at 224x224x3: realistic ops and size, no download."""
    _check_dest(dest)
    tf = import_tensorflow()
    tf.keras.utils.set_random_seed(seed)
    with quiet_fds():
        model = tf.keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
        dest.parent.mkdir(parents=True, exist_ok=True)
        model.save(dest)
    return ExampleFiles(model=dest)


EXAMPLES = {"digits": build_digits, "mobilenet": build_mobilenet}
