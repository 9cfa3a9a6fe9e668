"""agent.models.health: reference statistics, PSI, the live output window, agreement."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from agent.models.health import (
    PSI_FLOOR,
    Histogram,
    OutputWindow,
    Reference,
    bin_counts,
    box_f1,
    class_bins,
    classify_reference,
    cosine,
    detect_order,
    detect_reference,
    fixed_histogram,
    histogram_of,
    psi,
    raw_reference,
    same_class,
)

RNG = np.random.default_rng(11)


def test_bins_hold_values_up_to_and_including_their_edge() -> None:
    counts = bin_counts(np.array([-5.0, 0.0, 0.5, 1.0, 1.5, 9.0]), [0.0, 1.0])
    assert counts.tolist() == [2, 2, 2]
    hist = fixed_histogram(np.array([0.0, 1.0, 2.0, 3.0]), [1.0, 2.0])
    assert hist.freq == [0.5, 0.25, 0.25]


def test_a_reference_histogram_cuts_at_the_values_deciles_and_merges_ties() -> None:
    values = RNG.uniform(0, 1, 10_000)
    hist = histogram_of(values)
    assert len(hist.edges) == 9 and all(f == pytest.approx(0.1, abs=0.002) for f in hist.freq)
    tied = histogram_of(np.array([0.0] * 50 + [1.0] * 50))
    assert tied.edges == [0.0, 0.5, 1.0] and tied.freq == [0.5, 0.0, 0.5, 0.0]
    assert histogram_of(np.array([])) == Histogram(edges=[], freq=[1.0])


def test_psi_is_zero_for_the_same_distribution_and_grows_with_a_shift() -> None:
    ref = [0.25, 0.25, 0.25, 0.25]
    assert psi(ref, [25, 25, 25, 25]) == 0.0
    small = psi(ref, [30, 25, 25, 20])
    large = psi(ref, [70, 10, 10, 10])
    assert 0 < small < 0.1 < 0.25 < large
    # An empty live bin costs a bounded amount (the floor), not infinity.
    assert math.isfinite(psi(ref, [50, 50, 0, 0]))
    assert psi([1.0, 0.0], [0, 10]) == pytest.approx(
        (1 - PSI_FLOOR) * math.log(1 / PSI_FLOOR) * 2, rel=1e-6
    )
    assert psi(ref, [0, 0, 0, 0]) == 0.0


def test_a_histogram_must_have_one_frequency_per_bin() -> None:
    with pytest.raises(ValueError, match="2 edges make 3 bins, not 2 frequencies"):
        Histogram(edges=[0.0, 1.0], freq=[0.5, 0.5])
    with pytest.raises(ValueError, match="ascending"):
        Histogram(edges=[1.0, 0.0], freq=[0.3, 0.3, 0.4])


def logits(n: int, classes: int, favour: int | None = None) -> np.ndarray:
    x = RNG.normal(0, 1, (n, classes))
    x[np.arange(n), RNG.integers(0, classes, n)] += 4
    if favour is not None:
        x[:, favour] += 6
    return x.astype(np.float32)


def test_classify_reference_and_a_window_that_sees_the_same_or_a_shifted_stream() -> None:
    ref_scores = logits(2000, 10)
    reference = Reference(samples=2000, classify=classify_reference(ref_scores))
    c = reference.classify
    assert c is not None and c.classes == 10 and sum(c.top1_freq) == pytest.approx(1, abs=1e-5)
    assert len(c.confidence_quantiles) == 7 and c.confidence_quantiles == sorted(
        c.confidence_quantiles
    )
    # Survives the manifest's JSON round trip.
    assert Reference.model_validate_json(reference.model_dump_json()) == reference

    window = OutputWindow(reference, size=500, min_frames=100)
    for row in logits(99, 10):
        p = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        window.add_classes(int(p.argmax()), float(p.max()))
    assert window.figures().distance is None and window.figures().frames == 99

    def fill(scores: np.ndarray) -> float:
        window.clear()
        for row in scores:
            p = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
            window.add_classes(int(p.argmax()), float(p.max()))
        figures = window.figures()
        assert figures.frames == 500 and len(figures.quantiles) == 7
        assert figures.distance is not None
        return figures.distance

    steady = fill(logits(500, 10))
    shifted = fill(logits(500, 10, favour=3))
    assert steady < 0.1 < 0.25 < shifted


def test_classes_past_the_binned_ones_are_pooled() -> None:
    freq = [0.0] * 30
    freq[:12] = [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]
    keep, ref = class_bins(freq)
    assert len(keep) == 10 and len(ref) == 11 and ref[-1] == pytest.approx(0.1)
    keep, ref = class_bins([0.5, 0.5])
    assert keep == [0, 1] and ref == [0.5, 0.5, 0.0]


def test_detect_reference_and_window() -> None:
    def frames(n: int, boxes: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        classes = [RNG.integers(0, 3, 10) for _ in range(n)]
        scores = []
        for _ in range(n):
            s = RNG.uniform(0, 0.2, 10)
            s[:boxes] = RNG.uniform(0.5, 0.95, boxes)
            scores.append(s)
        return classes, scores

    classes, scores = frames(300, 2)
    detect = detect_reference(classes, scores)
    assert detect.boxes_per_frame.freq[2] == 1.0  # exactly two boxes a frame
    assert set(detect.score_quantiles) <= {"0", "1", "2"}
    window = OutputWindow(Reference(samples=300, detect=detect), min_frames=50)
    for s in frames(200, 2)[1]:
        window.add_detections(s)
    same = window.figures()
    window.clear()
    for s in frames(200, 6)[1]:
        window.add_detections(s)
    crowded = window.figures()
    assert same.distance is not None and crowded.distance is not None
    assert same.distance < 0.1 < crowded.distance


def test_raw_reference_and_window() -> None:
    out = RNG.normal(0.0, 1.0, (400, 16)).astype(np.float32)
    raw = raw_reference([out])
    assert raw.mean[0] == pytest.approx(0, abs=0.05) and raw.std[0] == pytest.approx(1, abs=0.05)
    window = OutputWindow(Reference(samples=400, raw=raw), min_frames=100)
    for row in RNG.normal(0.0, 1.0, (300, 16)):
        window.add_raw([row])
    near = window.figures().distance
    window.clear()
    for row in RNG.normal(1.0, 1.0, (300, 16)):
        window.add_raw([row])
    far = window.figures().distance
    assert near is not None and far is not None and near < 0.25 < far
    with pytest.raises(ValueError, match="one entry per output"):
        type(raw)(mean=[0.0], std=[], frame_mean=[])


def test_same_class_goes_by_label_when_both_models_name_classes() -> None:
    assert same_class(3, "cat", 3, "cat")
    assert not same_class(3, "cat", 3, "dog")  # shuffled labels at export
    assert same_class(1, "cat", 4, "cat")
    assert same_class(2, None, 2, "dog") and not same_class(2, None, 3, None)


def test_box_f1_matches_boxes_one_to_one_at_iou_half() -> None:
    a = ("person", (0.0, 0.0, 10.0, 10.0))
    b = ("person", (20.0, 20.0, 30.0, 30.0))
    nudged = ("person", (1.0, 1.0, 11.0, 11.0))  # IoU 81/119
    assert box_f1([], []) == 1.0
    assert box_f1([a, b], [nudged, b]) == 1.0
    assert box_f1([a], [("car", a[1])]) == 0.0
    assert box_f1([a], [("person", (5.0, 5.0, 15.0, 15.0))]) == 0.0  # IoU 25/175
    assert box_f1([a, b], [nudged]) == pytest.approx(2 / 3)
    # One reference box cannot match two candidates.
    assert box_f1([a], [a, nudged]) == pytest.approx(2 / 3)


def test_cosine_of_all_outputs() -> None:
    x = [np.array([1.0, 2.0]), np.array([[3.0]])]
    assert cosine(x, x) == pytest.approx(1.0)
    assert cosine(x, [-t for t in x]) == pytest.approx(-1.0)
    assert cosine([np.zeros(3)], [np.zeros(3)]) == 1.0
    assert cosine([np.zeros(3)], [np.ones(3)]) == 0.0
    assert cosine([np.zeros(3)], [np.zeros(4)]) == 0.0
    assert cosine([np.array([np.inf, 1.0])], [np.array([1.0, 1.0])]) == 0.0


@dataclass(frozen=True)
class T:
    name: str
    shape: tuple[int, ...]


def test_detect_order_by_shape_then_name_then_the_ops_order() -> None:
    by_name = [T("scores", (1, 10)), T("boxes", (1, 10, 4)), T("num", (1,)), T("classes", (1, 10))]
    assert detect_order(by_name) == (1, 3, 0, 2)
    unnamed = [T("a", (1, 10, 4)), T("b", (1, 10)), T("c", (1, 10)), T("d", (1,))]
    assert detect_order(unnamed) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="needs 4 outputs"):
        detect_order(unnamed[:3])
    with pytest.raises(ValueError, match="cannot tell"):
        detect_order([T("a", (1, 10)), T("b", (1, 10)), T("c", (1, 10)), T("d", (1,))])
