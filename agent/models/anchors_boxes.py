"""An anchor-based detector's regressors to boxes, MediaPipe's weighted non-maximum
suppression, and the scores its drift statistics count: in one place for the agent's
decoder (``agent/loops/decoders/anchors.py``) and the converter's reference statistics,
so both count the same boxes.

Pure: numpy only, no runtime.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.models.anchors_grid import AnchorPair
from agent.models.decoder_spec import AnchorsDecoder


def pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    """IoU of every pair of ``boxes`` [M, 4] (x0, y0, x1, y1) as [M, M]; 0 for empty unions."""
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    w = np.maximum(np.minimum.outer(x1, x1) - np.maximum.outer(x0, x0), 0)
    h = np.maximum(np.minimum.outer(y1, y1) - np.maximum.outer(y0, y0), 0)
    inter = w * h
    areas = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
    union = areas[:, None] + areas[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def weighted_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou: float,
    max_detections: int,
    points: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MediaPipe's weighted non-maximum suppression: best box first, every remaining box
    overlapping it by more than ``iou`` (itself included) averaged into it by score.
    Returns the leaders' indices, their averaged boxes [L, 4] and points [L, K, 2].

    The overlaps are one [M, M] matrix (M: the few candidates over ``min_score``), so
    the loop over leaders only picks rows; the averages are one matrix product."""
    if scores.size == 1:  # the usual frame: one face, one anchor over min_score
        return np.zeros(1, np.int64), boxes.astype(np.float64), points
    order = np.argsort(-scores, kind="stable")
    overlaps = pairwise_iou(boxes[order].astype(np.float64)) > iou
    np.fill_diagonal(overlaps, True)  # a degenerate box still stands for itself
    alive = np.ones(order.size, dtype=bool)
    leaders: list[int] = []
    groups: list[np.ndarray] = []
    for i in range(order.size):
        if not alive[i]:
            continue
        members = overlaps[i] & alive
        alive &= ~members
        leaders.append(i)
        groups.append(members)
        if len(leaders) >= max_detections:
            break
    k = points.shape[1] if points is not None else 0
    if not leaders:
        empty_points = np.zeros((0, k, 2)) if points is not None else None
        return np.zeros(0, np.int64), np.zeros((0, 4)), empty_points
    weights = np.stack(groups) * scores[order][None, :].astype(np.float64)
    totals = weights.sum(axis=1, keepdims=True)
    lone = totals[:, 0] <= 0  # zero scores: the leader's own box
    weights[lone] = np.eye(order.size)[np.asarray(leaders)[lone]]
    weights /= weights.sum(axis=1, keepdims=True)
    merged = weights @ boxes[order]
    merged_points = np.einsum("lm,mkc->lkc", weights, points[order]) if points is not None else None
    return order[leaders].astype(np.int64), merged, merged_points


def decode_boxes(
    spec: AnchorsDecoder, anchors: np.ndarray, regs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [M, 4] (x0, y0, x1, y1) and keypoints [M, K, 2], fractions of the input, of
    the real regressors ``regs`` of ``anchors`` [M, 4] (cx, cy, w, h)."""
    r = regs.astype(np.float64) / spec.box_scale
    cx, cy, aw, ah = anchors[:, 0], anchors[:, 1], anchors[:, 2], anchors[:, 3]
    x = r[:, 0] * aw + cx
    y = r[:, 1] * ah + cy
    w = r[:, 2] * aw
    h = r[:, 3] * ah
    boxes = np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], axis=1)
    k = spec.keypoints
    points = r[:, 4 : 4 + 2 * k].reshape(-1, k, 2) * anchors[:, None, 2:4] + anchors[:, None, :2]
    return boxes, points


def sigmoid_scores(logits: np.ndarray, clip: float) -> np.ndarray:
    """Scores of real logits, clipped at ``clip`` first (MediaPipe's score_clipping_thresh)."""
    return 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -clip, clip)))


def anchors_candidate_scores(
    spec: AnchorsDecoder,
    pairs: Sequence[AnchorPair],
    anchors: np.ndarray,
    values: Sequence[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """(score, class) of each box left by weighted NMS over the anchors scoring at least
    ``min_score``, from one frame's real (dequantised) outputs: what the agent's
    ``AnchorsDetector`` puts in ``Output.scores`` (it gets the same from raw codes)."""
    width = 4 + 2 * spec.keypoints
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for pair in pairs:
        logits = np.asarray(values[pair.scores]).reshape(pair.count, -1)
        cls = np.argmax(logits, axis=1)
        scores = sigmoid_scores(logits[np.arange(pair.count), cls], spec.score_clip)
        idx = np.flatnonzero(scores >= spec.min_score)
        regs = np.asarray(values[pair.regressors]).reshape(pair.count, -1)[idx, :width]
        found.append((idx + pair.offset, scores[idx], cls[idx], regs))
    index = np.concatenate([f[0] for f in found])
    if index.size == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    scores = np.concatenate([f[1] for f in found])
    classes = np.concatenate([f[2] for f in found])
    boxes, _ = decode_boxes(spec, anchors[index], np.concatenate([f[3] for f in found]))
    lead, _, _ = weighted_nms(boxes, scores, spec.iou, spec.max_detections)
    return scores[lead], classes[lead]
