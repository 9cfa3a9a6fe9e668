"""The ``shapes`` example: a tiny detector of coloured squares whose .tflite has the four
outputs of TFLite's SSD post-processing, which the agent's ``Detector`` reads.

A 32x32 RGB input, a small CNN down to a 4x4 grid, and per cell one box: objectness,
class (the square's colour) and box, decoded inside the model into
``boxes [1,16,4]`` (ymin, xmin, ymax, xmax in 0..1), ``classes [1,16]``, ``scores
[1,16]`` and ``count [1]``, so the whole model converts to full int8.

Two outputs are integer tensors rather than quantised ones, on purpose: an int8
class id dequantises to 2.9999 for 3 and the agent truncates it, and a constant count
folds into a float ``SHAPE`` op. Keras's own ``argmax`` cannot be used (its guard
against -0.0 adds a ``BitwiseAnd`` TFLite has no kernel for), nor ``top_k`` (the
quantiser leaves ``TOPK_V2`` in float): the class is the first index whose
probability equals the largest (``EQUAL``, ``SELECT_V2``, ``REDUCE_MIN``, all int8 or
int32), and the count the number of scores >= 0 (``GREATER_EQUAL``, ``CAST``, ``SUM``).
The output order puts classes before scores, which the agent's ``Detector`` falls
back to when the tensor names do not say.

Written like the other examples: ``NAME-calib.npz``, ``NAME-val.npz`` (``x``, and the
true objects as ``boxes`` [n, MAX_SHAPES, 4] and ``classes`` [n, MAX_SHAPES], -1
where a scene has fewer) and ``NAME-labels.txt``; convert with ``--task detect --std 255``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.scenes import (
    MAX_SHAPES,
    SHAPE_GRID,
    SHAPE_LABELS,
    Box,
    shape_scenes,
)
from converter.examples import ExampleFiles, check_dest, save_example
from converter.tfimport import import_tensorflow, quiet_fds

SHAPES_SIZE = 32
SHAPES_STD = 255.0
_CLASSES = len(SHAPE_LABELS)
_CHANNELS = 5 + _CLASSES  # objectness, class logits, box (cy, cx in the cell; h, w)


def _grid_targets(objects: list[list[tuple[int, Box]]]) -> np.ndarray:
    """Per scene and grid cell: objectness, one-hot class and box of the object centred there."""
    y = np.zeros((len(objects), SHAPE_GRID, SHAPE_GRID, _CHANNELS), np.float32)
    for i, scene in enumerate(objects):
        for k, (y0, x0, y1, x1) in scene:
            cy, cx = (y0 + y1) / 2 * SHAPE_GRID, (x0 + x1) / 2 * SHAPE_GRID
            row, col = min(int(cy), SHAPE_GRID - 1), min(int(cx), SHAPE_GRID - 1)
            y[i, row, col, 0] = 1
            y[i, row, col, 1 + k] = 1
            y[i, row, col, 1 + _CLASSES :] = (cy - row, cx - col, y1 - y0, x1 - x0)
    return y


def _padded(objects: list[list[tuple[int, Box]]]) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.full((len(objects), MAX_SHAPES, 4), -1.0, np.float32)
    classes = np.full((len(objects), MAX_SHAPES), -1, np.int64)
    for i, scene in enumerate(objects):
        for j, (k, box) in enumerate(scene):
            boxes[i, j], classes[i, j] = box, k
    return boxes, classes


def shapes_data(
    seed: int = 0, train: int = 2000, val: int = 300
) -> tuple[np.ndarray, list[list[tuple[int, Box]]], np.ndarray, list[list[tuple[int, Box]]]]:
    """Scenes as (x_train, objects_train, x_val, objects_val); x uint8 RGB (n, 32, 32, 3)."""
    rng = np.random.default_rng(seed)
    x_train, o_train = shape_scenes(rng, train, SHAPES_SIZE, SHAPES_SIZE)
    x_val, o_val = shape_scenes(rng, val, SHAPES_SIZE, SHAPES_SIZE)
    return x_train, o_train, x_val, o_val


def _loss(tf: Any) -> Any:
    ops = tf.keras.ops

    def loss(y_true: Any, y_pred: Any) -> Any:
        obj = y_true[..., 0]
        l_obj = tf.keras.losses.binary_crossentropy(
            obj[..., None], y_pred[..., :1], from_logits=True
        )
        l_cls = tf.keras.losses.categorical_crossentropy(
            y_true[..., 1 : 1 + _CLASSES], y_pred[..., 1 : 1 + _CLASSES], from_logits=True
        )
        box = y_true[..., 1 + _CLASSES :] - ops.sigmoid(y_pred[..., 1 + _CLASSES :])
        l_box = ops.sum(ops.abs(box), axis=-1)
        positive = ops.sum(obj * (l_cls + 5 * l_box)) / (ops.sum(obj) + 1)
        return ops.mean(l_obj) + positive

    return loss


def _decode(tf: Any, head: Any) -> list[Any]:
    """The grid head -> boxes, classes, scores, count, in ops that all quantise."""
    ops = tf.keras.ops
    cells = SHAPE_GRID * SHAPE_GRID
    flat = tf.keras.layers.Reshape((cells, _CHANNELS))(head)
    probs = ops.softmax(flat[..., 1 : 1 + _CLASSES], axis=-1)
    best = ops.max(probs, axis=-1, keepdims=True)
    scores = ops.sigmoid(flat[..., 0]) * best[..., 0]
    index = ops.convert_to_tensor(np.arange(_CLASSES, dtype=np.int32))
    classes = ops.min(ops.where(ops.equal(probs, best), index, _CLASSES), axis=-1)
    rows = np.repeat(np.arange(SHAPE_GRID), SHAPE_GRID).astype(np.float32)[None]
    cols = np.tile(np.arange(SHAPE_GRID), SHAPE_GRID).astype(np.float32)[None]
    t = ops.sigmoid(flat[..., 1 + _CLASSES :])
    cy, cx = (t[..., 0] + rows) / SHAPE_GRID, (t[..., 1] + cols) / SHAPE_GRID
    half_h, half_w = t[..., 2] / 2, t[..., 3] / 2
    edges = [cy - half_h, cx - half_w, cy + half_h, cx + half_w]
    boxes = ops.stack([ops.clip(e, 0, 1) for e in edges], axis=-1)
    count = ops.sum(ops.cast(ops.greater_equal(scores, 0.0), "int32"), axis=-1)
    return [boxes, classes, scores, count]


def build_shapes(dest: Path, *, epochs: int = 12, seed: int = 0) -> ExampleFiles:
    check_dest(dest)
    tf = import_tensorflow()
    x_train, o_train, x_val, o_val = shapes_data(seed)
    tf.keras.utils.set_random_seed(seed)
    layers = tf.keras.layers
    inputs = tf.keras.Input((SHAPES_SIZE, SHAPES_SIZE, 3))
    h = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    h = layers.MaxPooling2D()(layers.Conv2D(32, 3, padding="same", activation="relu")(h))
    h = layers.MaxPooling2D()(layers.Conv2D(32, 3, padding="same", activation="relu")(h))
    h = layers.Conv2D(64, 3, padding="same", activation="relu")(h)
    head = layers.Conv2D(_CHANNELS, 1)(h)
    trainer = tf.keras.Model(inputs, head)
    trainer.compile(optimizer=tf.keras.optimizers.Adam(3e-3), loss=_loss(tf))
    with quiet_fds():
        trainer.fit(
            x_train / SHAPES_STD, _grid_targets(o_train), epochs=epochs, batch_size=32, verbose=0
        )
    model = tf.keras.Model(inputs, _decode(tf, head))
    boxes, classes = _padded(o_val)
    return save_example(
        dest,
        model,
        {"x": x_train},
        {"x": x_val, "boxes": boxes, "classes": classes},
        list(SHAPE_LABELS),
    )
