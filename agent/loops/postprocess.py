"""Output tensors to results, by task, and the per-pipeline publishing policy."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from agent.loops.preprocess import Transform
from agent.models.runtime import TensorInfo
from agent.protocol import ClassScore, Detection


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _looks_like_probabilities(x: np.ndarray) -> bool:
    return bool(x.min() >= -1e-3 and x.max() <= 1 + 1e-3 and abs(x.sum() - 1) < 0.05)


@dataclass(frozen=True)
class Output:
    """What a post-processor hands on: the protocol's fields for one result."""

    classes: list[ClassScore] | None = None
    detections: list[Detection] | None = None
    raw: list[list[float]] | None = None

    @property
    def top(self) -> tuple[int, float] | None:
        """(index, score) of the best class or detection, for change detection."""
        if self.classes:
            return self.classes[0].index, self.classes[0].score
        if self.detections:
            best = max(self.detections, key=lambda d: d.score)
            return best.index, best.score
        return None


class Classifier:
    """Dequantise, softmax when the model outputs logits, top-k with labels, threshold.

    Per frame this is a handful of numpy calls on one small vector. A quantised output
    whose whole code range maps into [0, 1] is a softmax's (TFLite quantises softmax
    to scale 1/256), so it needs no check: top-k runs on the raw codes (dequantising
    is monotonic) and only the k winners are dequantised.
    """

    def __init__(
        self,
        outputs: Sequence[TensorInfo],
        labels: Sequence[str] | None,
        top_k: int = 3,
        threshold: float = 0.0,
    ) -> None:
        self.tensor = outputs[0]
        self.labels = list(labels) if labels else None
        self.top_k = top_k
        self.threshold = threshold
        t = self.tensor
        codes = np.dtype(t.dtype)
        lo_hi = (
            (int(np.iinfo(codes).min), int(np.iinfo(codes).max))
            if t.quantized and codes.kind in "iu"
            else None
        )
        self._codes_are_probabilities = (
            lo_hi is not None
            and t.scale > 0
            and (lo_hi[0] - t.zero_point) * t.scale >= 0
            and (lo_hi[1] - t.zero_point) * t.scale <= 1 + 1e-6
        )

    def __call__(self, values: Sequence[np.ndarray], transform: Transform | None) -> Output:
        raw = values[0].reshape(-1)
        k = min(self.top_k, raw.size)
        if self._codes_are_probabilities:
            best = np.argpartition(raw, -k)[-k:]
            best = best[np.argsort(raw[best])[::-1]]
            t = self.tensor
            top = ((raw[best].astype(np.float32) - t.zero_point) * np.float32(t.scale)).tolist()
        else:
            scores = self.tensor.dequantize(raw)
            if not _looks_like_probabilities(scores):
                scores = _softmax(scores)
            best = np.argpartition(scores, -k)[-k:]
            best = best[np.argsort(scores[best])[::-1]]
            top = scores[best].tolist()
        labels = self.labels
        n_labels = len(labels) if labels else 0
        classes = [
            ClassScore(
                index=i, label=labels[i] if labels and i < n_labels else None, score=round(v, 5)
            )
            for i, v in zip(best.tolist(), top, strict=True)
            if v >= self.threshold
        ]
        return Output(classes=classes)


class Detector:
    """TFLite SSD post-processing outputs: boxes [1,N,4] (ymin, xmin, ymax, xmax in 0..1),
    classes [1,N], scores [1,N], count [1]. Boxes come out in source pixels."""

    def __init__(
        self,
        outputs: Sequence[TensorInfo],
        labels: Sequence[str] | None,
        input_size: tuple[int, int],
        threshold: float = 0.5,
    ) -> None:
        if len(outputs) != 4:
            raise ValueError(
                f"a detect model needs 4 outputs (boxes, classes, scores, count), "
                f"this one has {len(outputs)}"
            )
        self.order = self._find_order(outputs)
        self.outputs = list(outputs)
        self.labels = list(labels) if labels else None
        self.input_w, self.input_h = input_size
        self.threshold = threshold

    @staticmethod
    def _find_order(outputs: Sequence[TensorInfo]) -> tuple[int, int, int, int]:
        """Indices of boxes, classes, scores, count: by shape, then by conventional order."""
        boxes = [i for i, t in enumerate(outputs) if len(t.shape) == 3 and t.shape[-1] == 4]
        count = [i for i, t in enumerate(outputs) if int(np.prod(t.shape)) == 1]
        if len(boxes) != 1 or len(count) != 1:
            raise ValueError("cannot tell the boxes and count outputs of this detect model")
        rest = [i for i in range(4) if i not in (boxes[0], count[0])]
        names = [outputs[i].name.lower() for i in rest]
        if sum("score" in n for n in names) == 1 and sum("class" in n for n in names) == 1:
            scores = rest[0] if "score" in names[0] else rest[1]
            classes = rest[1] if scores == rest[0] else rest[0]
        else:  # the post-processing op's own order: classes before scores
            classes, scores = rest
        return boxes[0], classes, scores, count[0]

    def __call__(self, values: Sequence[np.ndarray], transform: Transform | None) -> Output:
        ib, ic, isc, icount = self.order
        boxes = self.outputs[ib].dequantize(values[ib]).reshape(-1, 4)
        classes = self.outputs[ic].dequantize(values[ic]).reshape(-1)
        scores = self.outputs[isc].dequantize(values[isc]).reshape(-1)
        n = min(int(self.outputs[icount].dequantize(values[icount]).reshape(-1)[0]), len(scores))
        keep = np.nonzero(scores[:n] >= self.threshold)[0]
        if keep.size == 0:
            return Output(detections=[])
        b = boxes[keep]
        x0, y0 = b[:, 1] * self.input_w, b[:, 0] * self.input_h
        x1, y1 = b[:, 3] * self.input_w, b[:, 2] * self.input_h
        if transform is not None:
            x0, y0 = transform.to_source(x0, y0)
            x1, y1 = transform.to_source(x1, y1)
        detections = []
        for j, i in enumerate(keep):
            cls = int(classes[i])
            detections.append(
                Detection(
                    index=cls,
                    label=self.labels[cls] if self.labels and 0 <= cls < len(self.labels) else None,
                    score=round(float(scores[i]), 5),
                    box=(
                        round(float(x0[j]), 1),
                        round(float(y0[j]), 1),
                        round(float(x1[j]), 1),
                        round(float(y1[j]), 1),
                    ),
                )
            )
        return Output(detections=detections)


class RawOutputs:
    """Dequantised tensors, flattened, for models whose meaning the agent does not know."""

    def __init__(self, outputs: Sequence[TensorInfo]) -> None:
        self.outputs = list(outputs)

    def __call__(self, values: Sequence[np.ndarray], transform: Transform | None) -> Output:
        return Output(
            raw=[
                [round(float(v), 6) for v in t.dequantize(x).reshape(-1)]
                for t, x in zip(self.outputs, values, strict=True)
            ]
        )


Postprocessor = Callable[[Sequence[np.ndarray], Transform | None], Output]


class PublishPolicy:
    """Which results go out: every one, at most ``max_per_s``, or only on change."""

    def __init__(
        self,
        mode: str = "every",
        max_per_s: float | None = None,
        score_delta: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode = mode
        self.min_interval = 1.0 / max_per_s if max_per_s else 0.0
        self.score_delta = score_delta
        self._clock = clock
        self._last_time = -float("inf")
        self._last_top: tuple[int, float] | None = None
        self._first = True

    def should_publish(self, output: Output) -> bool:
        if self.mode == "every":
            return True
        if self.mode == "rate":
            now = self._clock()
            if now - self._last_time >= self.min_interval:
                self._last_time = now
                return True
            return False
        top = output.top
        if self._first:
            self._first = False
            self._last_top = top
            return True
        last = self._last_top
        changed = (top is None) != (last is None) or (
            top is not None
            and last is not None
            and (top[0] != last[0] or abs(top[1] - last[1]) > self.score_delta)
        )
        if changed:
            self._last_top = top
        return changed
