"""YOLO heads as exported to TFLite: v5 ``[1, N, 5 + C]`` (cx, cy, w, h, objectness, C
class scores; score = objectness x class score) and v8 / v11 ``[1, 4 + C, N]`` (cx, cy,
w, h, C class scores, no objectness).

Per frame the work is one pass over the candidates to threshold them, then the few
survivors are decoded. An int8 head is thresholded on its raw codes (the threshold is
quantised to a code once, here): dequantising is monotonic, so the survivors are the
same, and only they are dequantised. v5 is prefiltered on objectness alone (class
scores are at most 1, so a candidate below on objectness is below on its score too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from agent.loops.decoders.nms import detections, nms
from agent.loops.postprocess import FrameContext, Output
from agent.models.decoder_spec import YoloDecoder
from agent.models.detect_layout import yolo_expected, yolo_layout
from agent.models.health import DETECT_THRESHOLD
from agent.models.runtime import TensorInfo

# Coordinates no larger than this are taken for fractions of the input (normalized:
# None): a pixel box this small in the input's corner is no detection worth having.
NORMALIZED_MAX = 1.5
# Survivors beyond this (best first) are not offered to NMS: an untrained or confused
# head would otherwise make every frame's suppression quadratic in thousands.
MAX_CANDIDATES = 3000


class YoloDetector:
    """Boxes in source pixels from one YOLO head output. A pipeline ``threshold`` of 0
    (the default) means ``DETECT_THRESHOLD``: every YOLO candidate has some score."""

    def __init__(
        self,
        spec: YoloDecoder,
        outputs: Sequence[TensorInfo],
        labels: Sequence[str] | None,
        input_size: tuple[int, int],
        threshold: float = 0.5,
    ) -> None:
        tensor = outputs[0]
        layout = yolo_layout(spec.type, tensor.shape) if len(outputs) == 1 else None
        if layout is None:
            shapes = ", ".join(f"{t.name!r} {list(t.shape)}" for t in outputs)
            raise ValueError(
                f"{spec.type} decoder needs one output {yolo_expected(spec.type)}, got {shapes}"
            )
        self.spec = spec
        self.tensor = tensor
        self.candidates, self.classes = layout
        self.labels = list(labels) if labels else None
        self.input_w, self.input_h = input_size
        self.threshold = threshold if threshold > 0 else DETECT_THRESHOLD
        # Scores kept for the drift statistics start here (the reference's threshold).
        self.floor = min(self.threshold, DETECT_THRESHOLD)
        self._floor_code = self._code(self.floor)

    def _code(self, value: float) -> float:
        """The smallest raw value whose real value is at least ``value``."""
        t = self.tensor
        if not t.quantized or np.dtype(t.dtype).kind == "f":
            return value
        return float(math.ceil(value / t.scale + t.zero_point - 1e-6))

    def _candidates(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes cx, cy, w, h as [k, 4], best score, its class) of the candidates at or
        above the floor, dequantised."""
        t = self.tensor
        if self.spec.type == "yolov8":
            head = raw.reshape(4 + self.classes, self.candidates)
            idx = np.flatnonzero(head[4:].max(axis=0) >= self._floor_code)
            rows = t.dequantize(head[:, idx]).T
            cls = rows[:, 4:]
            ids = cls.argmax(axis=1)
            best = cls[np.arange(ids.size), ids]
        else:
            head = raw.reshape(self.candidates, 5 + self.classes)
            idx = np.flatnonzero(head[:, 4] >= self._floor_code)
            rows = t.dequantize(head[idx])
            cls = rows[:, 5:]
            ids = cls.argmax(axis=1)
            best = rows[:, 4] * cls[np.arange(ids.size), ids]
        keep = best >= self.floor
        return rows[keep, :4], best[keep], ids[keep]

    def __call__(self, values: Sequence[np.ndarray], frame: FrameContext) -> Output:
        boxes, scores, ids = self._candidates(values[0])
        sure = np.flatnonzero(scores >= self.threshold)
        if sure.size == 0:
            return Output(detections=[], scores=scores)
        if sure.size > MAX_CANDIDATES:
            sure = sure[np.argpartition(-scores[sure], MAX_CANDIDATES)[:MAX_CANDIDATES]]
        b = boxes[sure].astype(np.float64)
        normalized = self.spec.normalized
        if normalized is None:
            normalized = bool(np.abs(b).max() <= NORMALIZED_MAX)
        if normalized:
            b = b * np.array([self.input_w, self.input_h, self.input_w, self.input_h])
        half_w, half_h = b[:, 2] / 2, b[:, 3] / 2
        xyxy = np.stack([b[:, 0] - half_w, b[:, 1] - half_h, b[:, 0] + half_w, b[:, 1] + half_h], 1)
        kept = nms(
            xyxy,
            scores[sure],
            ids[sure],
            iou=self.spec.iou,
            max_detections=self.spec.max_detections,
            class_agnostic=self.spec.class_agnostic,
        )
        xyxy = xyxy[kept]
        x0, y0, x1, y1 = xyxy[:, 0], xyxy[:, 1], xyxy[:, 2], xyxy[:, 3]
        transform = frame.transform
        if transform is not None:
            x0, y0 = transform.to_source(x0, y0)
            x1, y1 = transform.to_source(x1, y1)
        picked = sure[kept]
        found = detections(
            [int(c) for c in ids[picked].tolist()], scores[picked].tolist(), (x0, y0, x1, y1),
            self.labels,
        )  # fmt: skip
        return Output(detections=found, scores=scores)
