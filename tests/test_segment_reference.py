"""Reference statistics of segmentation models: what the converter records from the
int8 outputs on its validation set, and the drift the agent measures against it from
the same class-map cells (``agent.models.segment_map``): same data, distance ~0; a
scene where other classes show, a distance over the warning threshold."""

from __future__ import annotations

import numpy as np
import pytest

from agent.config import DriftConfig, SegmentConfig
from agent.loops.drift import DriftMonitor
from agent.loops.postprocess import FrameContext, summarise
from agent.loops.segment import Segmenter
from agent.models.health import OutputWindow, Reference, segment_reference
from agent.models.runtime import TensorInfo
from converter.reference import reference_of

CLASSES = 5
SCALE, ZERO = 0.05, -10


def scenes(rng: np.random.Generator, n: int, classes: tuple[int, ...]) -> list[np.ndarray]:
    """``n`` 32 x 32 class maps: background with one rectangle of each of ``classes``
    (random size and place, each left out one time in four)."""
    maps = []
    for _ in range(n):
        m = np.zeros((32, 32), np.int64)
        for c in classes:
            if rng.random() < 0.25:
                continue
            h, w = rng.integers(3, 14, 2)
            y, x = rng.integers(0, 32 - h), rng.integers(0, 32 - w)
            m[y : y + h, x : x + w] = c
        maps.append(m)
    return maps


def int8_scores(class_map: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[1, H, W, C] int8 codes (scale SCALE) whose argmax is ``class_map``, with noise."""
    real = np.eye(CLASSES, dtype=np.float32)[class_map] * 4.0 - 2.0
    real += rng.normal(0, 0.5, real.shape).astype(np.float32)
    return np.clip(np.round(real / SCALE + ZERO), -128, 127).astype(np.int8)[None]


TENSOR = TensorInfo("seg", 0, (1, 32, 32, CLASSES), "int8", SCALE, ZERO)


def segmenter() -> Segmenter:
    return Segmenter([TENSOR], None, (32, 32), SegmentConfig())


def test_the_reference_counts_foreground_and_classes_present() -> None:
    a = np.zeros((8, 8), np.int64)
    a[:4, :2] = 1  # a quarter of the frame... of class 1
    b = np.full((8, 8), 2)
    b[0, 0] = 3  # 1/64 of the frame: present (over 1%)
    c = np.zeros((8, 8), np.int64)
    ref = segment_reference([a, b, c], classes=4)
    assert ref.classes == 4 and ref.background == 0
    assert ref.present_freq == pytest.approx([2 / 3, 1 / 3, 1 / 3, 1 / 3], abs=1e-6)
    assert ref.foreground_quantiles[3] == pytest.approx(0.125)  # the median of 0, 1/8, 1
    assert sum(ref.foreground.freq) == pytest.approx(1.0, abs=1e-5)
    # An index higher than the output's channels widens the class list.
    assert segment_reference([np.full((2, 2), 6)]).classes == 7


def test_converter_reference_equals_the_agents_class_maps_on_int8_codes() -> None:
    """The converter reads dequantised values, the agent raw codes: the same cells and
    the same classes either way, so the same reference."""
    rng = np.random.default_rng(0)
    codes = [int8_scores(m, rng) for m in scenes(rng, 30, (1, 2, 3))]
    values = [np.concatenate([TENSOR.dequantize(c) for c in codes])]
    converted = reference_of("segment", [TENSOR], values)
    assert converted is not None and converted.segment is not None
    post = segmenter()
    maps = [post([c], FrameContext()).class_map for c in codes]
    assert all(m is not None for m in maps)
    assert converted.segment == segment_reference(
        [m for m in maps if m is not None], classes=CLASSES
    )
    assert converted.samples == 30


def drift_after(reference: Reference, maps: list[np.ndarray], rng: np.random.Generator) -> float:
    monitor = DriftMonitor("seg", DriftConfig(window=200, min_frames=50, threshold=0.25))
    post = segmenter()
    for m in maps:
        monitor.add("1", reference, post([int8_scores(m, rng)], FrameContext()))
    figures = monitor.evaluate("1")
    assert figures is not None and figures.distance is not None
    assert figures.frames == len(maps) and figures.confidence is not None
    return figures.distance


def test_drift_of_a_segmentation_model_against_its_reference() -> None:
    rng = np.random.default_rng(1)
    frames = [TENSOR.dequantize(int8_scores(m, rng)) for m in scenes(rng, 200, (1, 2))]
    values = [np.concatenate(frames)]
    reference = reference_of("segment", [TENSOR], values)
    assert reference is not None
    same = drift_after(reference, scenes(rng, 150, (1, 2)), rng)
    assert same < 0.2, same  # sampling noise only: under the warning threshold
    # Classes 3 and 4 show up, 1 and 2 no more: what the field sees changed.
    other = drift_after(reference, scenes(rng, 150, (3, 4)), rng)
    assert other > 0.5, other
    # Mostly empty scenes: the foreground fraction alone moves.
    empty = drift_after(reference, [np.zeros((32, 32), np.int64)] * 150, rng)
    assert empty > 0.5, empty


def test_the_window_counts_only_segment_outputs_and_classes_beyond_the_reference() -> None:
    reference = Reference(samples=2, segment=segment_reference([np.ones((4, 4), np.int64)] * 2))
    window = OutputWindow(reference, size=10, min_frames=1)
    out = segmenter()([int8_scores(np.full((32, 32), 4), np.random.default_rng(2))], FrameContext())
    summarise(window, out)  # class 4, unknown to the reference: the "other" bin
    assert len(window) == 1
    figures = window.figures()
    assert figures.distance is not None and figures.distance > 1
    assert figures.quantiles[0] == pytest.approx(1.0)
