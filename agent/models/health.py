"""Model health measures: reference statistics, distribution distance, agreement.

Pure numpy, shared by the converter (which records a model's reference statistics from
its validation set into the manifest) and the agent (which compares live outputs with
them: drift in the field, and a candidate's distance during shadow evaluation). One
definition of every summary, so both sides bin the same values the same way.

Distance is the population stability index (PSI) between a reference distribution and
a live one over the same bins: ``sum((live - ref) * ln(live / ref))``, fractions floored
at ``PSI_FLOOR`` so an empty bin costs a bounded amount. Common reading: below 0.1 no
change, 0.1-0.25 some, above 0.25 a shift worth a look. A task's distance is the largest
PSI of its summaries (see ``OutputWindow``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

PSI_FLOOR = 1e-3
# Quantiles the reference and the live window report (confidence, scores).
QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
# Cut points of value histograms: deciles of the reference values.
DECILES = tuple(i / 10 for i in range(1, 10))
# Classes kept apart in the top-1 distribution; the rest are pooled as "other". More bins
# than this makes PSI on a few hundred frames mostly sampling noise ((bins - 1) / n).
MAX_CLASS_BINS = 10
BOX_COUNT_EDGES = (0.0, 1.0, 2.0, 3.0, 5.0, 10.0)
DETECT_THRESHOLD = 0.25
# segment: a class is present in a frame from this fraction of it (a few stray cells
# at the edge of a region are no object); class 0 is the background.
PRESENT_AREA = 0.01
SEGMENT_BACKGROUND = 0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Histogram(_Strict):
    """Bins ``(-inf, e0], (e0, e1], ..., (e_last, inf)`` and the reference fraction in each."""

    edges: list[float] = Field(max_length=64)
    freq: list[float]

    @model_validator(mode="after")
    def _bins_match_edges(self) -> Histogram:
        # A mismatch would only show as a numpy error in a results thread, frames later.
        if len(self.freq) != len(self.edges) + 1:
            raise ValueError(
                f"{len(self.edges)} edges make {len(self.edges) + 1} bins, "
                f"not {len(self.freq)} frequencies"
            )
        if any(b < a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must be in ascending order")
        return self


class ClassifyReference(_Strict):
    classes: int = Field(gt=0)
    top1_freq: list[float] = Field(description="fraction of frames whose top-1 is each class")
    confidence: Histogram = Field(description="top-1 probability, binned at its deciles")
    confidence_quantiles: list[float] = Field(description="top-1 probability at QUANTILES")

    @model_validator(mode="after")
    def _one_frequency_per_class(self) -> ClassifyReference:
        if len(self.top1_freq) != self.classes:
            raise ValueError(
                f"top1_freq has {len(self.top1_freq)} values for {self.classes} classes"
            )
        return self


class DetectReference(_Strict):
    threshold: float = Field(description="score from which a box is counted")
    boxes_per_frame: Histogram
    score: Histogram = Field(description="scores of the counted boxes, binned at their deciles")
    score_quantiles: dict[str, list[float]] = Field(
        default_factory=dict, description="per class index: scores at QUANTILES"
    )


class RawReference(_Strict):
    mean: list[float] = Field(description="per output, over every element of every frame")
    std: list[float]
    frame_mean: list[Histogram] = Field(description="per output: the mean of each frame, binned")

    @model_validator(mode="after")
    def _one_entry_per_output(self) -> RawReference:
        if not len(self.mean) == len(self.std) == len(self.frame_mean):
            raise ValueError("mean, std and frame_mean need one entry per output")
        return self


class SegmentReference(_Strict):
    classes: int = Field(gt=0)
    background: int = Field(default=SEGMENT_BACKGROUND, ge=0)
    present_area: float = Field(default=PRESENT_AREA, ge=0, le=1)
    present_freq: list[float] = Field(
        description="fraction of frames in which each class covers present_area or more"
    )
    foreground: Histogram = Field(
        description="fraction of the frame not of the background class, binned at its deciles"
    )
    foreground_quantiles: list[float] = Field(description="foreground fraction at QUANTILES")

    @model_validator(mode="after")
    def _one_frequency_per_class(self) -> SegmentReference:
        if len(self.present_freq) != self.classes:
            raise ValueError(
                f"present_freq has {len(self.present_freq)} values for {self.classes} classes"
            )
        return self


class Reference(_Strict):
    """What the model's outputs looked like on its validation set (in the manifest)."""

    samples: int = Field(gt=0)
    classify: ClassifyReference | None = None
    detect: DetectReference | None = None
    raw: RawReference | None = None
    segment: SegmentReference | None = None


# ------------------------------------------------------------------------- summaries


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def looks_like_probabilities(x: np.ndarray) -> bool:
    return bool(x.min() >= -1e-3 and x.max() <= 1 + 1e-3 and abs(x.sum() - 1) < 0.05)


def probabilities(scores: np.ndarray) -> np.ndarray:
    """One frame's class scores as probabilities (softmax unless they already are)."""
    scores = scores.reshape(-1).astype(np.float32)
    return scores if looks_like_probabilities(scores) else softmax(scores)


def histogram_of(values: np.ndarray, quantiles: Sequence[float] = DECILES) -> Histogram:
    """A reference histogram: cut at the values' own quantiles (ties merged)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return Histogram(edges=[], freq=[1.0])
    edges = np.unique(np.round(np.quantile(values, quantiles), 6))
    return fixed_histogram(values, [float(e) for e in edges])


def fixed_histogram(values: np.ndarray, edges: Sequence[float]) -> Histogram:
    counts = bin_counts(values, edges)
    total = max(1, int(counts.sum()))
    return Histogram(edges=list(edges), freq=[round(float(c) / total, 6) for c in counts])


def bin_counts(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(values), side="left")
    return np.bincount(idx.reshape(-1), minlength=len(edges) + 1)


def psi(reference: Sequence[float], counts: Sequence[float] | np.ndarray) -> float:
    """Population stability index of live ``counts`` against reference fractions."""
    ref = np.maximum(np.asarray(reference, dtype=np.float64), PSI_FLOOR)
    live = np.asarray(counts, dtype=np.float64)
    total = live.sum()
    if total <= 0:
        return 0.0
    live = np.maximum(live / total, PSI_FLOOR)
    return float(np.sum((live - ref) * np.log(live / ref)))


def class_bins(top1_freq: Sequence[float]) -> tuple[list[int], list[float]]:
    """The classes kept apart (most frequent in the reference) and the reference
    fractions of those bins plus one "other" bin."""
    freq = np.asarray(top1_freq, dtype=np.float64)
    keep = [int(i) for i in np.argsort(-freq, kind="stable")[:MAX_CLASS_BINS] if freq[i] > 0]
    if len(keep) == freq.size:
        return keep, [float(freq[i]) for i in keep] + [0.0]
    other = float(max(0.0, 1.0 - freq[keep].sum()))
    return keep, [float(freq[i]) for i in keep] + [other]


def quantiles_of(values: np.ndarray, qs: Sequence[float] = QUANTILES) -> list[float]:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return []
    return [round(float(v), 6) for v in np.quantile(values, qs)]


class NamedTensor(Protocol):
    """What ``detect_order`` reads of a tensor (``TensorInfo``, a manifest's ``TensorSpec``)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Sequence[int]: ...


def detect_order(outputs: Sequence[NamedTensor]) -> tuple[int, int, int, int]:
    """Indices of an SSD post-processing op's boxes ``[1, N, 4]``, classes, scores and
    count ``[1]`` outputs: by shape, then by name, else the op's own order (classes
    before scores). One definition for the agent's decoder and the converter's reference."""
    if len(outputs) != 4:
        raise ValueError(
            f"a detect model needs 4 outputs (boxes, classes, scores, count), "
            f"this one has {len(outputs)}"
        )
    boxes = [i for i, t in enumerate(outputs) if len(t.shape) == 3 and t.shape[-1] == 4]
    count = [i for i, t in enumerate(outputs) if math.prod(t.shape) == 1]
    if len(boxes) != 1 or len(count) != 1:
        raise ValueError("cannot tell the boxes and count outputs of this detect model")
    rest = [i for i in range(4) if i not in (boxes[0], count[0])]
    names = [outputs[i].name.lower() for i in rest]
    if sum("score" in n for n in names) == 1 and sum("class" in n for n in names) == 1:
        scores = rest[0] if "score" in names[0] else rest[1]
        classes = rest[1] if scores == rest[0] else rest[0]
    else:
        classes, scores = rest
    return boxes[0], classes, scores, count[0]


# ---------------------------------------------------------------- reference (converter)


def classify_reference(scores: np.ndarray) -> ClassifyReference:
    """From the class scores of n frames, ``[n, classes]`` (logits or probabilities)."""
    n = scores.shape[0]
    probs = np.stack([probabilities(row) for row in scores.reshape(n, -1)])
    top1 = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    classes = probs.shape[1]
    freq = np.bincount(top1, minlength=classes) / max(1, n)
    return ClassifyReference(
        classes=classes,
        top1_freq=[round(float(f), 6) for f in freq],
        confidence=histogram_of(confidence),
        confidence_quantiles=quantiles_of(confidence),
    )


def detect_reference(
    classes: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    threshold: float = DETECT_THRESHOLD,
) -> DetectReference:
    """From each frame's detections (class ids and scores, any count per frame)."""
    counted = [np.asarray(s) >= threshold for s in scores]
    per_frame = np.array([int(c.sum()) for c in counted], dtype=np.float64)
    kept_scores = np.concatenate(
        [np.asarray(s, dtype=np.float64)[c] for s, c in zip(scores, counted, strict=True)]
        or [np.zeros(0)]
    )
    kept_classes = np.concatenate(
        [np.asarray(k).astype(np.int64)[c] for k, c in zip(classes, counted, strict=True)]
        or [np.zeros(0, np.int64)]
    )
    per_class = {
        str(int(k)): quantiles_of(kept_scores[kept_classes == k]) for k in np.unique(kept_classes)
    }
    return DetectReference(
        threshold=threshold,
        boxes_per_frame=fixed_histogram(per_frame, BOX_COUNT_EDGES),
        score=histogram_of(kept_scores),
        score_quantiles=per_class,
    )


def raw_reference(outputs: Sequence[np.ndarray]) -> RawReference:
    """From every output of n frames (each ``[n, ...]``)."""
    means, stds, frame_means = [], [], []
    for out in outputs:
        flat = np.asarray(out, dtype=np.float64).reshape(out.shape[0], -1)
        means.append(round(float(flat.mean()), 6))
        stds.append(round(float(flat.std()), 6))
        frame_means.append(histogram_of(flat.mean(axis=1)))
    return RawReference(mean=means, std=stds, frame_mean=frame_means)


def area_summary(
    class_map: np.ndarray, background: int = SEGMENT_BACKGROUND, present: float = PRESENT_AREA
) -> tuple[float, np.ndarray]:
    """(foreground fraction, classes present) of one frame's class map: what a
    segmentation's drift statistics count, in the converter and on the device alike."""
    flat = np.asarray(class_map, dtype=np.int64).reshape(-1)
    if flat.size == 0:
        return 0.0, np.zeros(0, np.int64)
    areas = np.bincount(flat) / flat.size
    back = float(areas[background]) if background < areas.size else 0.0
    return 1.0 - back, np.flatnonzero(areas >= present)


def segment_reference(class_maps: Sequence[np.ndarray], classes: int = 1) -> SegmentReference:
    """From each frame's class map (as ``agent.models.segment_map`` samples it); at
    least ``classes`` classes (more when a map holds higher indices)."""
    summaries = [area_summary(m) for m in class_maps]
    foreground = np.array([f for f, _ in summaries], dtype=np.float64)
    present = [p for _, p in summaries]
    top = max((int(p.max()) + 1 for p in present if p.size), default=0)
    classes = max(classes, top, SEGMENT_BACKGROUND + 1)
    counts = np.zeros(classes, np.int64)
    for p in present:
        counts[p] += 1
    return SegmentReference(
        classes=classes,
        present_freq=[round(float(c) / max(1, len(present)), 6) for c in counts],
        foreground=histogram_of(foreground),
        foreground_quantiles=quantiles_of(foreground),
    )


def presence_bins(present_freq: Sequence[float]) -> tuple[list[int], list[float]]:
    """``class_bins`` of the classes' shares of all presences (a frame counts once for
    each class present in it), so presence is one distribution to take PSI of."""
    freq = np.asarray(present_freq, dtype=np.float64)
    total = float(freq.sum())
    shares = freq / total if total > 0 else freq
    return class_bins([float(f) for f in shares])


# -------------------------------------------------------------------- live (agent)


@dataclass(frozen=True)
class WindowFigures:
    frames: int
    distance: float | None
    quantiles: list[float]


class OutputWindow:
    """The last ``size`` frames' output summaries of one model, against its reference.

    Not thread-safe: one owner (a pipeline's results thread, or the shadow worker) adds
    and reads. Per frame, ``add_*`` appends a few numbers; ``figures`` bins the window.
    """

    def __init__(self, reference: Reference, size: int = 500, min_frames: int = 100) -> None:
        self.reference = reference
        self.min_frames = min_frames
        # top-1 class / boxes in the frame / - / foreground fraction
        self._a: deque[float] = deque(maxlen=size)
        self._b: deque[float] = deque(maxlen=size)  # confidence / - / - / -
        self._scores: deque[np.ndarray] = deque(maxlen=size)  # detect: counted scores
        self._frame_means: deque[np.ndarray] = deque(maxlen=size)  # raw: per output
        self._present: deque[np.ndarray] = deque(maxlen=size)  # segment: bins present
        if reference.classify is not None:
            self._keep, self._class_ref = class_bins(reference.classify.top1_freq)
        if reference.segment is not None:
            keep, self._present_ref = presence_bins(reference.segment.present_freq)
            # Class index -> its bin; any other class (also one the reference never
            # saw) is in the last, "other".
            self._present_bin = np.full(reference.segment.classes, len(keep), np.int64)
            self._present_bin[keep] = np.arange(len(keep))

    def __len__(self) -> int:
        return max(len(self._a), len(self._frame_means))

    def add_classes(self, top1: int, confidence: float) -> None:
        self._a.append(float(top1))
        self._b.append(float(confidence))

    def add_detections(self, scores: np.ndarray) -> None:
        """One frame's detection scores, before any threshold of the pipeline's own."""
        ref = self.reference.detect
        threshold = ref.threshold if ref is not None else DETECT_THRESHOLD
        kept = np.asarray(scores, dtype=np.float64).reshape(-1)
        kept = kept[kept >= threshold]
        self._a.append(float(kept.size))
        self._scores.append(kept)

    def add_raw(self, outputs: Sequence[np.ndarray]) -> None:
        self._frame_means.append(np.array([float(np.mean(o)) for o in outputs], dtype=np.float64))

    def add_segment(self, class_map: np.ndarray) -> None:
        """One frame's class map (the ``Segmenter``'s sampled grid)."""
        ref = self.reference.segment
        if ref is None:
            return
        foreground, present = area_summary(class_map, ref.background, ref.present_area)
        self._a.append(foreground)
        bins = self._present_bin
        other = len(self._present_ref) - 1
        known = present[present < bins.size]
        extra = int(present.size - known.size)
        self._present.append(np.concatenate([bins[known], np.full(extra, other, np.int64)]))

    def clear(self) -> None:
        for q in (self._a, self._b, self._scores, self._frame_means, self._present):
            q.clear()

    def figures(self) -> WindowFigures:
        """The window's distance to the reference (None below ``min_frames``) and the
        live quantiles of the top-1 confidence (classify) or box scores (detect)."""
        n = len(self)
        ref = self.reference
        quantiles: list[float] = []
        parts: list[float] = []
        if ref.classify is not None and self._a:
            top1 = np.fromiter(self._a, dtype=np.int64, count=len(self._a))
            confidence = np.fromiter(self._b, dtype=np.float64, count=len(self._b))
            counts = [int(np.sum(top1 == k)) for k in self._keep]
            counts.append(len(top1) - sum(counts))
            parts.append(psi(self._class_ref, counts))
            hist = ref.classify.confidence
            parts.append(psi(hist.freq, bin_counts(confidence, hist.edges)))
            quantiles = quantiles_of(confidence)
        elif ref.detect is not None and self._a:
            boxes = np.fromiter(self._a, dtype=np.float64, count=len(self._a))
            hist = ref.detect.boxes_per_frame
            parts.append(psi(hist.freq, bin_counts(boxes, hist.edges)))
            scores = np.concatenate(list(self._scores)) if self._scores else np.zeros(0)
            if scores.size:
                hist = ref.detect.score
                parts.append(psi(hist.freq, bin_counts(scores, hist.edges)))
                quantiles = quantiles_of(scores)
        elif ref.segment is not None and self._a:
            foreground = np.fromiter(self._a, dtype=np.float64, count=len(self._a))
            hist = ref.segment.foreground
            parts.append(psi(hist.freq, bin_counts(foreground, hist.edges)))
            present = np.concatenate(list(self._present)) if self._present else np.zeros(0)
            if present.size:
                present_counts = np.bincount(
                    present.astype(np.int64), minlength=len(self._present_ref)
                )
                parts.append(psi(self._present_ref, present_counts))
            quantiles = quantiles_of(foreground)
        elif ref.raw is not None and self._frame_means:
            means = np.stack(list(self._frame_means))
            for i, hist in enumerate(ref.raw.frame_mean[: means.shape[1]]):
                parts.append(psi(hist.freq, bin_counts(means[:, i], hist.edges)))
        distance = round(max(parts), 4) if parts and n >= self.min_frames else None
        return WindowFigures(frames=n, distance=distance, quantiles=quantiles)


# ------------------------------------------------------------------------ agreement


def same_class(a_index: int, a_label: str | None, b_index: int, b_label: str | None) -> bool:
    """Two top-1 answers agree: by label when both models name their classes (a model
    exported with shuffled labels disagrees), by index otherwise."""
    if a_label is not None and b_label is not None:
        return a_label == b_label
    return a_index == b_index


Box = tuple[float, float, float, float]


def iou(a: Box, b: Box) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_f1(
    reference: Sequence[tuple[str, Box]], candidate: Sequence[tuple[str, Box]], at: float = 0.5
) -> float:
    """F1 of the candidate's boxes against the reference's: greedy one-to-one matches of
    the same class key (label, or index as text) with IoU >= ``at``. Both empty: 1."""
    if not reference and not candidate:
        return 1.0
    pairs = sorted(
        (
            (iou(rb, cb), i, j)
            for i, (rk, rb) in enumerate(reference)
            for j, (ck, cb) in enumerate(candidate)
            if rk == ck
        ),
        reverse=True,
    )
    used_r: set[int] = set()
    used_c: set[int] = set()
    matched = 0
    for overlap, i, j in pairs:
        if overlap < at:
            break
        if i in used_r or j in used_c:
            continue
        used_r.add(i)
        used_c.add(j)
        matched += 1
    return 2 * matched / (len(reference) + len(candidate))


def cosine(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Cosine similarity of all outputs taken as one vector (both zero: 1)."""
    x = np.concatenate([np.asarray(t, dtype=np.float64).reshape(-1) for t in a])
    y = np.concatenate([np.asarray(t, dtype=np.float64).reshape(-1) for t in b])
    if x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return 0.0  # different sizes, or NaN/inf: not the same answer
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return float(np.dot(x, y) / (nx * ny))
