"""An anchor-based detector's regressors to boxes, MediaPipe's weighted non-maximum
suppression, and the scores its drift statistics count: in one place for the agent's
decoder (``agent/loops/decoders/anchors.py``) and the converter's reference statistics,
so both count the same boxes.

Decoded anchors are *rows* ``[M, 4 + 2K]``: the box (x0, y0, x1, y1) then K keypoints
(x, y), so suppression averages a box and its keypoints in one matrix product. A frame
has a handful of candidates, so each function here is a few whole-array numpy steps:
at that size the number of numpy calls, not the arithmetic, is the cost.

Pure: numpy only, no runtime.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.models.anchors_grid import AnchorPair
from agent.models.decoder_spec import AnchorsDecoder


def pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    """IoU of every pair of ``boxes`` [M, 4] (x0, y0, x1, y1) as [M, M]; 0 for empty unions."""
    lo = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    wh = np.minimum(boxes[:, None, 2:4], boxes[None, :, 2:4])
    wh -= lo
    np.maximum(wh, 0, out=wh)
    inter = wh[..., 0] * wh[..., 1]
    size = np.maximum(boxes[:, 2:4] - boxes[:, :2], 0)
    areas = size[:, 0] * size[:, 1]
    union = areas[:, None] + areas
    union -= inter
    # In place: where a union is empty so is the intersection, already the 0 wanted.
    return np.divide(inter, union, out=inter, where=union > 0)


def _groups(ranked: np.ndarray, iou: float, max_detections: int) -> tuple[list[int], np.ndarray]:
    """Greedy grouping of ``ranked`` boxes [M, 4] (best first): each leader is the best
    box no earlier leader took, its group every box still free overlapping it by more
    than ``iou``, itself included. Returns the leaders' positions and their groups as
    [L, M] booleans. The loop runs once per leader, not once per box."""
    m = ranked.shape[0]
    overlaps = pairwise_iou(ranked) > iou
    free = np.ones(m, dtype=bool)
    groups = np.empty((min(m, max_detections), m), dtype=bool)
    leaders: list[int] = []
    i = 0
    while True:
        members = np.logical_and(overlaps[i], free, out=groups[len(leaders)])
        members[i] = True  # a degenerate box still stands for itself
        free ^= members  # members were all free
        leaders.append(i)
        if len(leaders) >= max_detections or not free.any():
            return leaders, groups[: len(leaders)]
        i = int(free.argmax())  # the first free box is the best left


def weighted_leaders(
    boxes: np.ndarray, scores: np.ndarray, iou: float, max_detections: int
) -> np.ndarray:
    """The indices of the boxes ``weighted_merge`` keeps, best first, without merging."""
    if scores.size <= 1:
        return np.arange(scores.size, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    leaders, _ = _groups(boxes[order].astype(np.float64, copy=False), iou, max_detections)
    return order[leaders]


def weighted_merge(
    rows: np.ndarray, scores: np.ndarray, iou: float, max_detections: int
) -> tuple[np.ndarray, np.ndarray]:
    """MediaPipe's weighted non-maximum suppression over ``rows`` [M, 4 + W] (a box, then
    anything averaged along with it, e.g. keypoints): best box first, every remaining box
    overlapping it by more than ``iou`` (itself included) averaged into it by score.
    Returns the leaders' indices (best first) and their averaged rows [L, 4 + W]."""
    if scores.size <= 1:  # the usual frame: one face, one anchor over min_score
        return np.arange(scores.size, dtype=np.int64), rows.astype(np.float64)
    order = np.argsort(-scores, kind="stable")
    ranked = rows[order].astype(np.float64, copy=False)
    ranked_scores = scores[order].astype(np.float64, copy=False)
    leaders, groups = _groups(ranked[:, :4], iou, max_detections)
    weights = groups * ranked_scores
    totals = np.add.reduce(weights, axis=1, keepdims=True)
    if ranked_scores[-1] <= 0:  # some zero (or negative) scores: maybe a zero total
        lone = totals[:, 0] <= 0
        weights[lone] = np.eye(order.size)[np.asarray(leaders)[lone]]  # the leader's own
        totals[lone] = 1.0
    weights /= totals
    return order[leaders], weights @ ranked


def weighted_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou: float,
    max_detections: int,
    points: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``weighted_merge`` of ``boxes`` [M, 4] and their ``points`` [M, K, 2]: the leaders'
    indices, their averaged boxes [L, 4] and points [L, K, 2]."""
    if points is None:
        lead, merged = weighted_merge(boxes, scores, iou, max_detections)
        return lead, merged, None
    k = points.shape[1]
    rows = np.concatenate([boxes, points.reshape(-1, 2 * k)], axis=1)
    lead, merged = weighted_merge(rows, scores, iou, max_detections)
    return lead, merged[:, :4], merged[:, 4:].reshape(-1, k, 2)


def centre_rows(anchors: np.ndarray, keypoints: int) -> np.ndarray:
    """Each anchor's centre once per (x, y) of a row [N, 4 + 2K]: what ``decode_rows``
    adds to the regressors."""
    return np.tile(anchors[:, :2], 2 + keypoints)


def decode_rows(centres: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Rows [M, 4 + 2K] (box x0, y0, x1, y1, then keypoints' x, y), fractions of the
    input, of anchors of size 1 (``generate_anchors`` makes no other: MediaPipe's
    fixed_anchor_size) from their ``centre_rows`` [M, 4 + 2K] and their regressors
    over the box scale ``r`` [M, 4 + 2K] float64. The same floats as ``decode_boxes``
    (a size of 1 multiplies exactly)."""
    rows = r + centres  # box centre, keypoints; columns 2:4 overwritten next
    half = r[:, 2:4] / 2
    np.add(rows[:, :2], half, out=rows[:, 2:4])
    rows[:, :2] -= half
    return rows


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
    lead = weighted_leaders(boxes, scores, spec.iou, spec.max_detections)
    return scores[lead], classes[lead]
