"""Overlap (IoU) and hard non-maximum suppression in numpy, and the detections a decoder
hands on. Hard NMS: vectorised overlap, greedy by score.

Boxes are ``[n, 4]`` arrays of x0, y0, x1, y1 (any unit). Per kept box one vectorised
IoU against the rest, so the cost is O(kept x candidates), and candidates are few once
the confidence threshold has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.protocol import Detection


def detections(
    classes: Sequence[int],
    scores: Sequence[float],
    corners: Sequence[np.ndarray],
    labels: Sequence[str] | None,
) -> list[Detection]:
    """Detections from class indices, scores and the corner arrays x0, y0, x1, y1 (source
    pixels), labelled where the index has a label."""
    x0, y0, x1, y1 = ([round(v, 1) for v in np.asarray(c, np.float64).tolist()] for c in corners)
    n_labels = len(labels) if labels else 0
    return [
        Detection(
            index=cls,
            label=labels[cls] if labels and 0 <= cls < n_labels else None,
            score=round(float(score), 5),
            box=(x0[j], y0[j], x1[j], y1[j]),
        )
        for j, (cls, score) in enumerate(zip(classes, scores, strict=True))
    ]


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (x0, y0, x1, y1) with each row of ``boxes``; 0 where both are empty."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = max(0.0, float((box[2] - box[0]) * (box[3] - box[1])))
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(
        boxes[:, 3] - boxes[:, 1], 0, None
    )
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter, dtype=np.float64), where=union > 0)


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray | None = None,
    *,
    iou: float = 0.45,
    max_detections: int = 100,
    class_agnostic: bool = False,
) -> np.ndarray:
    """Indices of the boxes kept, best score first: a box goes when it overlaps a kept,
    better box of the same class (any class with ``class_agnostic``) by more than ``iou``."""
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    work = boxes.astype(np.float64, copy=False)
    if classes is not None and not class_agnostic:
        # Each class moved to its own far-apart region: boxes of different classes can
        # no longer overlap, so one pass suppresses per class.
        span = float(work.max() - min(0.0, float(work.min()))) + 1.0
        work = work + (classes.astype(np.float64) * span)[:, None]
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_detections:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        order = rest[iou_one_to_many(work[best], work[rest]) <= iou]
    return np.asarray(keep, dtype=np.int64)
