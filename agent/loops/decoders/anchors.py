"""Anchor-based single-shot detectors (BlazeFace, MediaPipe face detection): regressors
and scores over a fixed anchor grid to boxes with keypoints, merged by weighted NMS.

MediaPipe's TensorsToDetectionsCalculator and NonMaxSuppressionCalculator (WEIGHTED)
for each frame: a score is the sigmoid of the anchor's logit clipped at
``score_clip``; a box is ``anchor centre + (dx, dy) / box_scale`` wide ``w / box_scale``
(anchors have size 1), its keypoints ``anchor centre + (kx, ky) / box_scale``, all in
fractions of the input. Overlapping boxes are not dropped but averaged, weighted by
score, into the best one (which keeps its score): a face's several anchors make one
steadier box.

Per frame only the anchors scoring at least ``min_score`` are decoded, a handful of
the 896: the test runs on the score tensor as the model gave it, on int8 codes against
the threshold's logit quantised once, so nothing else is dequantised. One-byte codes are
not even dequantised then: their scores and regressors are looked up in 256-entry
tables made at load by the same arithmetic, so the floats are the same. A frame's cost
is the count of numpy calls, not arithmetic: survivors are decoded as rows (box, then
keypoints) that weighted NMS averages in one product, and result objects are built by
one pydantic validation each (cheaper than ``model_construct``, which is Python).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from agent.loops.postprocess import FrameContext, Output
from agent.loops.preprocess import Transform
from agent.models.anchors_boxes import (
    centre_rows,
    decode_rows,
    sigmoid_scores,
    weighted_leaders,
    weighted_merge,
)
from agent.models.anchors_grid import AnchorPair, anchor_outputs, generate_anchors
from agent.models.decoder_spec import AnchorsDecoder
from agent.models.runtime import TensorInfo
from agent.protocol import Detection


def _logit(p: float) -> float:
    if p <= 0:
        return -math.inf
    if p >= 1:
        return math.inf
    return math.log(p / (1 - p))


def _raw_floor(t: TensorInfo, p: float, clip: float) -> float:
    """The lowest raw value (code when quantised) that can score ``p`` or more: a loose
    bound, the candidates are checked exactly once dequantised."""
    logit = _logit(p)
    if logit < -clip:
        return -math.inf  # every clipped logit reaches it
    if not t.quantized or np.dtype(t.dtype).kind == "f":
        return logit
    return math.floor(t.zero_point + logit / t.scale)


@dataclass(frozen=True)
class _CodeTable:
    """One-byte quantised outputs decoded by table: every code's score (scores output)
    or regressor over the box scale (regressors output), computed once by the very
    arithmetic a per-frame decode would do, so a frame's lookups give the same floats.
    Indexed by the code's byte (``codes.view(np.uint8)``)."""

    dtype: np.dtype
    values: np.ndarray


def _code_table(t: TensorInfo, of_real: Callable[[np.ndarray], np.ndarray]) -> _CodeTable | None:
    dtype = np.dtype(t.dtype)
    if not t.quantized or dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
        return None
    codes = np.arange(256, dtype=np.uint8).view(dtype)  # position u: the code whose byte is u
    return _CodeTable(dtype, of_real(t.dequantize(codes).astype(np.float64)))


@dataclass(frozen=True)
class _PairPlan:
    """How one regressors/scores pair is read: ``floor`` is the lowest raw score that
    can reach ``min_score`` (exact with a score table, else a loose bound, the scores
    then checked), None when no code can."""

    pair: AnchorPair
    floor: float | None
    scores: _CodeTable | None
    regressors: _CodeTable | None


class AnchorsDetector:
    """Regressors and scores over the anchor grid to ``Detection``s with keypoints, in
    source pixels. ``threshold`` (the pipeline's) above the spec's ``min_score`` drops
    more; ``Output.scores`` (drift, shadow) are the merged boxes' scores at ``min_score``
    (``anchors_boxes.anchors_candidate_scores``: the converter's reference counts those)."""

    def __init__(
        self,
        spec: AnchorsDecoder,
        outputs: Sequence[TensorInfo],
        labels: Sequence[str] | None,
        input_size: tuple[int, int],
        threshold: float = 0.5,
    ) -> None:
        self.spec = spec
        self.outputs = list(outputs)
        self.labels = list(labels) if labels else None
        self.input_w, self.input_h = input_size
        classes = len(self.labels) if self.labels else None
        self.pairs: list[AnchorPair] = anchor_outputs(
            spec, self.outputs, self.input_w, self.input_h, classes
        )
        self.anchors = generate_anchors(spec, self.input_w, self.input_h).astype(np.float64)
        self.low = spec.min_score
        self.high = max(spec.min_score, threshold)
        self.width = 4 + 2 * spec.keypoints
        self._centres = centre_rows(self.anchors, spec.keypoints)
        self._plans = [self._plan(p) for p in self.pairs]
        names = spec.keypoint_names
        self._names: list[str | None] = list(names) if names else [None] * spec.keypoints
        self._input_xy = np.array([self.input_w, self.input_h], np.float64)
        self._mapped_for: Transform | None = None
        self._mapping = (self._input_xy, self._input_xy, self._input_xy)  # set on first use

    def _plan(self, pair: AnchorPair) -> _PairPlan:
        spec = self.spec
        score_t = self.outputs[pair.scores]
        scores = _code_table(score_t, lambda v: sigmoid_scores(v, spec.score_clip))
        regressors = _code_table(self.outputs[pair.regressors], lambda v: v / spec.box_scale)
        floor: float | None = _raw_floor(score_t, self.low, spec.score_clip)
        if scores is not None:
            codes = np.arange(256, dtype=np.uint8).view(scores.dtype)
            passing = scores.values >= self.low
            floor = int(codes[passing].min()) if passing.any() else None
            if floor is not None and not np.array_equal(passing, codes >= floor):
                # Not monotonic in the code (a negative scale): threshold the scores.
                scores, floor = None, _raw_floor(score_t, self.low, spec.score_clip)
        return _PairPlan(pair, floor, scores, regressors)

    def _candidates(
        self, values: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The anchors scoring at least ``min_score``: (grid index, score, class, their
        regressors over the box scale [M, width] float64)."""
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for plan in self._plans:
            if plan.floor is None:
                continue
            pair = plan.pair
            raw = values[pair.scores].reshape(pair.count, -1)
            if raw.shape[1] > 1:  # one column per class: the best (codes share one scale)
                cls = np.argmax(raw, axis=1)
                best = raw[np.arange(pair.count), cls]
            else:
                cls = None
                best = raw[:, 0]
            idx = np.nonzero(best >= plan.floor)[0]
            if idx.size == 0:
                continue
            table = plan.scores
            if table is not None and best.dtype == table.dtype:
                scores = table.values[best[idx].view(np.uint8)]  # floor exact: all pass
            else:
                logits = self.outputs[pair.scores].dequantize(best[idx]).astype(np.float64)
                scores = sigmoid_scores(logits, self.spec.score_clip)
                ok = scores >= self.low
                idx, scores = idx[ok], scores[ok]
            codes = values[pair.regressors].reshape(pair.count, -1)[idx]
            if codes.shape[1] != self.width:
                codes = codes[:, : self.width]
            table = plan.regressors
            if table is not None and codes.dtype == table.dtype:
                regs = table.values[codes.view(np.uint8)]
            else:
                reg_t = self.outputs[pair.regressors]
                regs = reg_t.dequantize(codes).astype(np.float64) / self.spec.box_scale
            classes = cls[idx] if cls is not None else np.zeros(idx.size, np.int64)
            found.append((idx + pair.offset, scores, classes, regs))
        if not found:
            empty = np.zeros(0)
            return empty.astype(np.int64), empty, empty.astype(np.int64), np.zeros((0, self.width))
        if len(found) == 1:
            return found[0]
        return (
            np.concatenate([f[0] for f in found]),
            np.concatenate([f[1] for f in found]),
            np.concatenate([f[2] for f in found]),
            np.concatenate([f[3] for f in found]),
        )

    def __call__(self, values: Sequence[np.ndarray], frame: FrameContext) -> Output:
        index, scores, classes, regs = self._candidates(values)
        if index.size == 0:
            return Output(detections=[], scores=np.zeros(0, np.float32))
        spec = self.spec
        rows = decode_rows(self._centres[index], regs)
        if self.high > self.low and scores.min() < self.high:
            # MediaPipe thresholds before suppression: the pipeline's threshold leaves
            # the lower anchors out of the averages too. The boxes counted (at
            # min_score) need only their leaders, not the averages.
            counted = scores[weighted_leaders(rows[:, :4], scores, spec.iou, spec.max_detections)]
            keep = np.flatnonzero(scores >= self.high)
            sub, merged = weighted_merge(rows[keep], scores[keep], spec.iou, spec.max_detections)
            lead = keep[sub]
        else:
            lead, merged = weighted_merge(rows, scores, spec.iou, spec.max_detections)
            counted = scores[lead]
        return Output(
            detections=self._detections(scores[lead], classes[lead], merged, frame.transform),
            scores=counted.astype(np.float32),
        )

    def _source_mapping(self, transform: Transform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``transform.to_source`` as (x, y) vectors: pad, scale, source size. Kept while
        the frames' transform stays the same (it does, frame after frame), so mapping
        the points is three in-place numpy steps, the same floats as ``to_source``."""
        if transform != self._mapped_for:
            t = transform
            self._mapping = (
                np.array([t.pad_x, t.pad_y], np.float64),
                np.array([t.scale_x, t.scale_y], np.float64),
                np.array([t.source_w, t.source_h], np.float64),
            )
            self._mapped_for = transform
        return self._mapping

    def _detections(
        self,
        scores: np.ndarray,
        classes: np.ndarray,
        rows: np.ndarray,
        transform: Transform | None,
    ) -> list[Detection]:
        # Rows are x0, y0, x1, y1, then keypoints' x, y: (x, y) pairs, mapped at once.
        xy = rows.reshape(rows.shape[0], rows.shape[1] // 2, 2) * self._input_xy
        if transform is not None:
            pad, scale, limit = self._source_mapping(transform)
            xy -= pad
            xy /= scale
            np.clip(xy, 0, limit, out=xy)
        labels = self.labels
        names = self._names
        detections = []
        for cls, score, row in zip(
            classes.tolist(), scores.tolist(), xy.reshape(rows.shape).tolist(), strict=True
        ):
            v = [round(c, 1) for c in row]
            # One validation per detection (keypoints as dicts) is the cheapest way to
            # build them: pydantic-core checks the lot at once, and model_construct,
            # being Python, is slower than that.
            detections.append(
                Detection.model_validate(
                    {
                        "index": cls,
                        "label": labels[cls] if labels and cls < len(labels) else None,
                        "score": round(score, 5),
                        "box": (v[0], v[1], v[2], v[3]),
                        "keypoints": [
                            {"name": name, "x": x, "y": y}
                            for name, x, y in zip(names, v[4::2], v[5::2], strict=True)
                        ]
                        or None,
                    }
                )
            )
        return detections
