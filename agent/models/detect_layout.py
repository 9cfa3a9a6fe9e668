"""Detection output layouts: which decoder a model's outputs fit, and the YOLO heads'
candidate scores, in one place for the agent's decoders, the deploy-time check and the
converter (which suggests a decoder and records reference statistics with it).

Pure: shapes and numpy only, no runtime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from agent.models.health import NamedTensor, detect_order

YOLO_TYPES = ("yolov5", "yolov8")


def yolo_layout(kind: str, shape: Sequence[int]) -> tuple[int, int] | None:
    """(candidates N, classes C) of a YOLO head's output shape, or None when the shape is
    not that head's: yolov5 ``[1, N, 5 + C]``, yolov8 ``[1, 4 + C, N]``."""
    if len(shape) != 3 or shape[0] != 1:
        return None
    if kind == "yolov5":
        n, c = shape[1], shape[2] - 5
    elif kind == "yolov8":
        n, c = shape[2], shape[1] - 4
    else:
        raise ValueError(f"not a YOLO decoder type: {kind!r}")
    return (n, c) if n >= 1 and c >= 1 else None


def yolo_expected(kind: str, classes: int | str = "C") -> str:
    """The shape a YOLO head must have, for error messages."""
    return f"[1, N, 5 + {classes}]" if kind == "yolov5" else f"[1, 4 + {classes}, N]"


def suggest_decoder(outputs: Sequence[NamedTensor]) -> str | None:
    """The decoder the outputs unambiguously fit: ``ssd`` for the post-processing op's
    four outputs, ``yolov8`` for one ``[1, 4 + C, N]`` with N > 4 + C, ``yolov5`` for one
    ``[1, N, 5 + C]`` with N > 5 + C; None otherwise (say it with ``--decoder``)."""
    if len(outputs) == 4:
        try:
            detect_order(outputs)
        except ValueError:
            return None
        return "ssd"
    if len(outputs) != 1:
        return None
    shape = list(outputs[0].shape)
    if len(shape) != 3:
        return None
    v8 = yolo_layout("yolov8", shape)
    v5 = yolo_layout("yolov5", shape)
    # Candidates outnumber the per-candidate values in every real head (thousands vs.
    # 5 + 80), which tells the two transposed layouts apart.
    fits = [
        kind
        for kind, layout, width in (("yolov8", v8, shape[1]), ("yolov5", v5, shape[2]))
        if layout is not None and layout[0] > width
    ]
    return fits[0] if len(fits) == 1 else None


def suggest_task(outputs: Sequence[NamedTensor]) -> tuple[str, str | None, str] | None:
    """(task, decoder, what it saw) for ``edge-convert inspect``; None when nothing fits."""
    decoder = suggest_decoder(outputs)
    if decoder == "ssd":
        return "detect", "ssd", "TFLite_Detection_PostProcess outputs"
    if decoder is not None:
        n, c = yolo_layout(decoder, list(outputs[0].shape)) or (0, 0)
        return "detect", decoder, f"{c} classes, {n} candidates"
    if len(outputs) == 1 and math.prod(outputs[0].shape) == max(outputs[0].shape, default=0):
        return "classify", None, f"{math.prod(outputs[0].shape)} classes"
    return None


def yolo_candidate_scores(
    kind: str, values: np.ndarray, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """(best class score, its class) of each candidate at or above ``floor`` in one
    frame's dequantised head output (yolov5: objectness times class score). What a YOLO
    detector's drift statistics count per frame, before suppression: the converter's
    reference and the agent's decoder (which gets the same on raw codes) alike."""
    if kind == "yolov5":
        rows = values.reshape(-1, values.shape[-1])
        rows = rows[rows[:, 4] >= floor]
        cls = rows[:, 5:]
        ids = cls.argmax(axis=1) if rows.size else np.zeros(0, np.int64)
        best = rows[:, 4] * cls[np.arange(ids.size), ids]
    else:
        head = values.reshape(values.shape[-2], -1)[4:]
        ids = head.argmax(axis=0)
        best = head[ids, np.arange(ids.size)]
    keep = best >= floor
    return best[keep], ids[keep]
