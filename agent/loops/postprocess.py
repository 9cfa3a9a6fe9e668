"""Output tensors to results, by task, and the per-pipeline publishing policy.

Every post-processor is called the same way, ``post(values, frame)``: the output tensors
and the ``FrameContext`` of the frame they came from, so the pipeline hands each one
what any of them needs without knowing which it has."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.loops.preprocess import Transform
from agent.models.health import OutputWindow, probabilities
from agent.models.runtime import TensorInfo
from agent.protocol import ClassScore, Detection, Keypoint, RawTensor, Segmentation


@dataclass(frozen=True, slots=True)
class FrameContext:
    """What a post-processor may need of the frame its outputs came from: ``seq`` and
    ``ts`` (the source's frame number and Unix time of capture), ``transform`` (how the
    source was fitted to the input: boxes and points go back through it) and
    ``audio_s`` (an audio window's end on the audio's own clock, else None)."""

    seq: int = 0
    ts: float = 0.0
    transform: Transform | None = None
    audio_s: float | None = None

    @property
    def stream_s(self) -> float:
        """The frame's time in seconds on its stream's clock: the audio's for audio
        windows (a WAV replayed fast, or a window a slow model let drop, keeps its
        timing), else the capture time."""
        return self.ts if self.audio_s is None else self.audio_s


@dataclass(frozen=True)
class Output:
    """What a post-processor hands on: the protocol's fields for one result, and what
    the drift statistics summarise, taken before the pipeline's own threshold (the
    reference statistics know nothing of it): ``top1`` (classify: index and
    probability), ``scores`` (detect: every counted detection's score; keypoints: every
    point's score), ``tensors`` (raw: the dequantised outputs), ``class_map`` (segment:
    the reduced class map, for drift and a shadow's agreement). Those are never published.
    ``silent``: nothing to publish for this frame (a keyword spotter's window where no
    keyword fired); it still counts for drift."""

    classes: list[ClassScore] | None = None
    detections: list[Detection] | None = None
    raw: list[RawTensor] | None = None
    keypoints: list[Keypoint] | None = None
    segmentation: Segmentation | None = None
    top1: tuple[int, float] | None = None
    scores: np.ndarray | None = field(default=None, compare=False)
    tensors: list[np.ndarray] | None = field(default=None, compare=False)
    silent: bool = False
    class_map: np.ndarray | None = field(default=None, compare=False)

    @property
    def top(self) -> tuple[int, float] | None:
        """(index, score) of the best class or detection, for change detection; a pose:
        (0, its mean point score); a segmentation: its largest class and that class's area."""
        if self.classes:
            return self.classes[0].index, self.classes[0].score
        if self.detections:
            best = max(self.detections, key=lambda d: d.score)
            return best.index, best.score
        if self.keypoints:
            return 0, sum(p.score or 0.0 for p in self.keypoints) / len(self.keypoints)
        if self.segmentation is not None and self.segmentation.classes:
            largest = self.segmentation.classes[0]
            return largest.index, largest.area
        return None


def summarise(window: OutputWindow, output: Output) -> None:
    """Add one frame's output summary (taken before the pipeline's threshold) to a
    reference window: drift in the field and a shadow candidate's distance alike."""
    if output.top1 is not None:
        window.add_classes(*output.top1)
    elif output.scores is not None:
        window.add_detections(output.scores)
    elif output.tensors is not None:
        window.add_raw(output.tensors)
    elif output.class_map is not None:
        window.add_segment(output.class_map)


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

    def __call__(self, values: Sequence[np.ndarray], frame: FrameContext) -> Output:
        raw = values[0].reshape(-1)
        k = min(self.top_k, raw.size)
        if self._codes_are_probabilities:
            best = np.argpartition(raw, -k)[-k:]
            best = best[np.argsort(raw[best])[::-1]]
            t = self.tensor
            top = ((raw[best].astype(np.float32) - t.zero_point) * np.float32(t.scale)).tolist()
        else:
            scores = probabilities(self.tensor.dequantize(raw))
            best = np.argpartition(scores, -k)[-k:]
            best = best[np.argsort(scores[best])[::-1]]
            top = scores[best].tolist()
        labels = self.labels
        n_labels = len(labels) if labels else 0
        indices = best.tolist()
        classes = [
            ClassScore(
                index=i, label=labels[i] if labels and i < n_labels else None, score=round(v, 5)
            )
            for i, v in zip(indices, top, strict=True)
            if v >= self.threshold
        ]
        return Output(classes=classes, top1=(indices[0], top[0]))


DEFAULT_RAW_VALUES = 64


def _figure(v: float) -> float:
    return round(float(v), 6)


class RawOutputs:
    """Outputs of a model whose meaning the agent does not know: an output of at most
    ``max_values`` elements goes out as its dequantised values, a larger one as a
    summary (min, max, mean, argmax), so a segmentation-sized map never becomes a
    megabyte of JSON per frame. The summary is taken on the tensor as the model gave
    it: dequantising is monotonic and linear (scale > 0), so min, max, argmax and mean
    of the integer codes map to the real ones, and only those four are dequantised.
    ``Output.tensors`` holds every output dequantised (drift and shadow read them)."""

    def __init__(self, outputs: Sequence[TensorInfo], max_values: int = DEFAULT_RAW_VALUES) -> None:
        self.outputs = list(outputs)
        self.max_values = max_values

    def __call__(self, values: Sequence[np.ndarray], frame: FrameContext) -> Output:
        tensors = [t.dequantize(x) for t, x in zip(self.outputs, values, strict=True)]
        raw = [
            self._values(x) if x.size <= self.max_values else self._summary(t, codes)
            for t, x, codes in zip(self.outputs, tensors, values, strict=True)
        ]
        return Output(raw=raw, tensors=tensors)

    @staticmethod
    def _values(x: np.ndarray) -> RawTensor:
        return RawTensor(shape=list(x.shape), values=[_figure(v) for v in x.reshape(-1)])

    @staticmethod
    def _summary(t: TensorInfo, codes: np.ndarray) -> RawTensor:
        flat = codes.reshape(-1)
        argmax = int(np.argmax(flat))
        # float64: the mean of a large int8 or float16 map stays exact enough.
        picked = np.array([flat.min(), flat[argmax], flat.mean(dtype=np.float64)])
        if t.quantized:
            picked = (picked.astype(np.float64) - t.zero_point) * t.scale
        low, high, mean = picked.tolist()
        return RawTensor(
            shape=list(codes.shape),
            min=_figure(low),
            max=_figure(high),
            mean=_figure(mean),
            argmax=argmax,
        )


#: Output tensors of one frame (all but a streaming model's state) and that frame's context.
Postprocessor = Callable[[Sequence[np.ndarray], FrameContext], Output]


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
