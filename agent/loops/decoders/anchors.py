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
the threshold's logit quantised once, so nothing else is dequantised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from agent.loops.postprocess import FrameContext, Output
from agent.loops.preprocess import Transform
from agent.models.anchors_boxes import decode_boxes, sigmoid_scores, weighted_nms
from agent.models.anchors_grid import AnchorPair, anchor_outputs, generate_anchors
from agent.models.decoder_spec import AnchorsDecoder
from agent.models.runtime import TensorInfo
from agent.protocol import Detection, Keypoint


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
        self._floors = [
            _raw_floor(self.outputs[p.scores], self.low, spec.score_clip) for p in self.pairs
        ]
        names = spec.keypoint_names
        self._names: list[str | None] = list(names) if names else [None] * spec.keypoints

    def _candidates(
        self, values: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The anchors scoring at least ``min_score``: (grid index, score, class, regressors)."""
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        clip = self.spec.score_clip
        for pair, floor in zip(self.pairs, self._floors, strict=True):
            raw = values[pair.scores].reshape(pair.count, -1)
            if raw.shape[1] > 1:  # one column per class: the best (codes share one scale)
                cls = np.argmax(raw, axis=1)
                best = raw[np.arange(pair.count), cls]
            else:
                cls = None
                best = raw[:, 0]
            idx = np.nonzero(best >= floor)[0]
            if idx.size == 0:
                continue
            logits = self.outputs[pair.scores].dequantize(best[idx]).astype(np.float64)
            scores = sigmoid_scores(logits, clip)
            ok = scores >= self.low
            idx, scores = idx[ok], scores[ok]
            reg_t = self.outputs[pair.regressors]
            regs = reg_t.dequantize(values[pair.regressors].reshape(pair.count, -1)[idx])
            classes = cls[idx] if cls is not None else np.zeros(idx.size, np.int64)
            found.append((idx + pair.offset, scores, classes, regs[:, : self.width]))
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
        boxes, points = decode_boxes(spec, self.anchors[index], regs)
        lead, merged, merged_points = weighted_nms(
            boxes, scores, spec.iou, spec.max_detections, points
        )
        counted = scores[lead]
        if self.high > self.low:
            # MediaPipe thresholds before suppression: the pipeline's threshold leaves
            # the lower anchors out of the averages too.
            keep = np.nonzero(scores >= self.high)[0]
            sub, merged, merged_points = weighted_nms(
                boxes[keep], scores[keep], spec.iou, spec.max_detections, points[keep]
            )
            lead = keep[sub]
        assert merged_points is not None
        return Output(
            detections=self._detections(
                scores[lead], classes[lead], merged, merged_points, frame.transform
            ),
            scores=counted.astype(np.float32),
        )

    def _detections(
        self,
        scores: np.ndarray,
        classes: np.ndarray,
        boxes: np.ndarray,
        points: np.ndarray,
        transform: Transform | None,
    ) -> list[Detection]:
        # Corners and keypoints as one x and one y array: one mapping, one list each.
        n, k = scores.size, points.shape[1]
        xs = np.concatenate([boxes[:, 0], boxes[:, 2], points[..., 0].reshape(-1)])
        ys = np.concatenate([boxes[:, 1], boxes[:, 3], points[..., 1].reshape(-1)])
        xs, ys = xs * self.input_w, ys * self.input_h
        if transform is not None:
            xs, ys = transform.to_source(xs, ys)
        x, y = [round(v, 1) for v in xs.tolist()], [round(v, 1) for v in ys.tolist()]
        labels = self.labels
        names = self._names
        detections = []
        for j, (cls, score) in enumerate(zip(classes.tolist(), scores.tolist(), strict=True)):
            at = 2 * n + j * k
            detections.append(
                Detection(
                    index=cls,
                    label=labels[cls] if labels and cls < len(labels) else None,
                    score=round(score, 5),
                    box=(x[j], y[j], x[n + j], y[n + j]),
                    keypoints=[
                        Keypoint(name=name, x=x[at + i], y=y[at + i])
                        for i, name in enumerate(names)
                    ]
                    or None,
                )
            )
        return detections
