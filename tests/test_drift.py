"""Drift statistics in parts: the output window on synthetic summaries, the monitor's
warning (hysteresis, restarts), what post-processing hands on for them, and the
Prometheus gauges. The real pipeline is tests/test_pipeline_drift.py."""

from __future__ import annotations

import numpy as np
import pytest

from agent.config import DriftConfig, PipelineConfig
from agent.loops.decoders.ssd import SsdDetector as Detector
from agent.loops.drift import CLEAR_RATIO, DriftMonitor
from agent.loops.postprocess import Classifier, FrameContext, Output, RawOutputs
from agent.models.health import (
    QUANTILES,
    OutputWindow,
    Reference,
    classify_reference,
    detect_reference,
    raw_reference,
)
from agent.models.runtime import TensorInfo
from agent.ops.metrics import MetricsExporter
from agent.protocol import PipelineTelemetry, Telemetry

CLASSES = 10
RNG = np.random.default_rng(0)


def confident_scores(
    n: int, rng: np.random.Generator, classes: list[int] | None = None
) -> np.ndarray:
    """Logits of n frames: a random class (of ``classes``) well ahead of the rest."""
    logits = rng.normal(0.0, 1.0, (n, CLASSES))
    top = rng.choice(classes or list(range(CLASSES)), n)
    logits[np.arange(n), top] += rng.uniform(2.0, 6.0, n)
    return logits


def classify_window(reference: Reference, scores: np.ndarray, size: int = 500) -> OutputWindow:
    window = OutputWindow(reference, size=size, min_frames=100)
    for row in scores:
        p = np.exp(row - row.max())
        p /= p.sum()
        window.add_classes(int(p.argmax()), float(p.max()))
    return window


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference(samples=2000, classify=classify_reference(confident_scores(2000, RNG)))


# ------------------------------------------------------------------ output window


def test_classify_window_steady_is_low_and_shifted_is_high(reference: Reference) -> None:
    rng = np.random.default_rng(1)
    steady = classify_window(reference, confident_scores(500, rng)).figures()
    assert steady.frames == 500 and steady.distance is not None
    assert steady.distance < 0.1
    assert len(steady.quantiles) == len(QUANTILES)
    # The scene now shows two classes only, and the model is less sure of them.
    shifted_scores = confident_scores(500, rng, classes=[3, 7]) * 0.3
    shifted = classify_window(reference, shifted_scores).figures()
    assert shifted.distance is not None and shifted.distance > 1.0
    assert shifted.quantiles[3] < steady.quantiles[3]  # median confidence fell


def test_no_distance_below_min_frames(reference: Reference) -> None:
    figures = classify_window(reference, confident_scores(99, RNG)).figures()
    assert figures.frames == 99 and figures.distance is None and figures.quantiles


def test_detect_and_raw_windows() -> None:
    rng = np.random.default_rng(2)
    frames = [rng.uniform(0.0, 1.0, 5) for _ in range(1000)]
    ref = Reference(
        samples=1000,
        detect=detect_reference([np.zeros(5)] * 1000, frames, threshold=0.5),
    )
    window = OutputWindow(ref, size=500, min_frames=100)
    for _ in range(500):
        window.add_detections(rng.uniform(0.0, 1.0, 5))
    steady = window.figures().distance
    for _ in range(500):
        window.add_detections(rng.uniform(0.0, 0.55, 5))  # fewer, weaker boxes
    shifted = window.figures().distance
    assert steady is not None and shifted is not None and steady < 0.1 < 1.0 < shifted

    outputs = [rng.normal(0.0, 1.0, (1000, 4))]
    raw = Reference(samples=1000, raw=raw_reference(outputs))
    window = OutputWindow(raw, size=500, min_frames=100)
    for _ in range(500):
        window.add_raw([rng.normal(0.0, 1.0, 4)])
    steady = window.figures().distance
    for _ in range(500):
        window.add_raw([rng.normal(1.5, 1.0, 4)])
    shifted = window.figures().distance
    assert steady is not None and shifted is not None and steady < 0.1 < 1.0 < shifted


# ------------------------------------------------------------------------ monitor


def out(top: int, confidence: float) -> Output:
    return Output(top1=(top, confidence))


def feed(
    monitor: DriftMonitor, version: str, reference: Reference | None, scores: np.ndarray
) -> None:
    for row in scores:
        p = np.exp(row - row.max())
        p /= p.sum()
        monitor.add(version, reference, out(int(p.argmax()), float(p.max())))


def test_monitor_warns_over_the_threshold_and_clears_below_its_fraction(
    reference: Reference,
) -> None:
    rng = np.random.default_rng(3)
    monitor = DriftMonitor("cam", DriftConfig(window=200, min_frames=50), clock=lambda: 0.0)
    feed(monitor, "1", reference, confident_scores(200, rng))
    steady = monitor.evaluate("1")
    assert steady is not None and steady.distance is not None and steady.distance < 0.25
    assert monitor.warning is None and steady.frames == 200 and steady.confidence

    feed(monitor, "1", reference, confident_scores(200, rng, classes=[4]))
    drifted = monitor.evaluate("1")
    assert drifted is not None and drifted.distance is not None and drifted.distance > 0.25
    assert monitor.warning == (
        f"output drift PSI {drifted.distance:.3f} over 0.25 (top-1 classes, confidence) "
        "since 1970-01-01T00:00:00Z"
    )

    # The same window against thresholds that put its distance in the band between
    # CLEAR_RATIO x threshold and the threshold: the warning holds, it does not flap.
    def at(fraction: float) -> DriftConfig:
        assert drifted is not None and drifted.distance is not None
        return DriftConfig(window=200, min_frames=50, threshold=drifted.distance / fraction)

    warning = monitor.warning
    monitor.configure(at(0.9))
    monitor.evaluate("1")
    assert monitor.warning == warning
    monitor.configure(at(CLEAR_RATIO - 0.05))
    monitor.evaluate("1")
    assert monitor.warning is None
    monitor.configure(at(0.9))  # in the band again, from below: not raised
    monitor.evaluate("1")
    assert monitor.warning is None


def test_monitor_starts_again_for_a_new_version_and_stops_without_reference(
    reference: Reference,
) -> None:
    rng = np.random.default_rng(4)
    monitor = DriftMonitor("cam", DriftConfig(window=200, min_frames=50))
    feed(monitor, "1", reference, confident_scores(200, rng, classes=[4]))
    assert (monitor.evaluate("1") or pytest.fail()).distance is not None
    assert monitor.warning is not None
    # Another version is served now: the old window's figures are not its figures.
    assert monitor.evaluate("2") is None and monitor.warning is None
    feed(monitor, "2", reference, confident_scores(10, rng))
    figures = monitor.evaluate("2")
    assert figures is not None and figures.frames == 10 and figures.distance is None
    # A version without reference statistics has no drift figures.
    feed(monitor, "3", None, confident_scores(200, rng, classes=[4]))
    assert monitor.evaluate("3") is None and monitor.warning is None


def test_monitor_live_settings(reference: Reference) -> None:
    rng = np.random.default_rng(5)
    monitor = DriftMonitor("cam", DriftConfig(window=200, min_frames=50))
    feed(monitor, "1", reference, confident_scores(200, rng, classes=[4]))
    monitor.evaluate("1")
    assert monitor.warning is not None
    monitor.configure(DriftConfig(window=200, min_frames=50, threshold=9.5))
    figures = monitor.evaluate("1")  # same window, a threshold it is far below
    assert figures is not None and figures.frames == 200 and monitor.warning is None
    monitor.configure(DriftConfig(window=200, min_frames=50, enabled=False))
    feed(monitor, "1", reference, confident_scores(200, rng, classes=[4]))
    assert monitor.evaluate("1") is None and monitor.warning is None
    monitor.configure(DriftConfig(window=300, min_frames=50))
    feed(monitor, "1", reference, confident_scores(20, rng))
    assert (monitor.evaluate("1") or pytest.fail()).frames == 20


def test_a_reference_that_does_not_fit_never_stops_the_results(reference: Reference) -> None:
    raw = Reference(samples=10, raw=raw_reference([np.zeros((10, 4)), np.zeros((10, 2))]))
    monitor = DriftMonitor("cam", DriftConfig(window=20, min_frames=1))
    monitor.add("1", raw, Output(tensors=[np.zeros(4), np.zeros(2)]))
    monitor.add("1", raw, Output(tensors=[np.zeros(4)]))  # one output fewer: cannot stack
    assert monitor.evaluate("1") is None and monitor.warning is None
    monitor.add("1", raw, Output(tensors=[np.zeros(4), np.zeros(2)]))  # ignored from now on


def test_drift_config_bounds() -> None:
    base = {"name": "cam", "model": "m", "source": {"type": "synthetic"}}
    assert PipelineConfig.model_validate(base).drift == DriftConfig()
    for bad in ({"window": 5}, {"min_frames": 600}, {"threshold": 0}, {"enabled": 1}):
        with pytest.raises(ValueError):
            PipelineConfig.model_validate({**base, "drift": bad})


# ------------------------------------------------------------ post-processing


def tensor(
    shape: tuple[int, ...], dtype: str = "float32", scale: float = 0.0, zp: int = 0
) -> TensorInfo:
    return TensorInfo("out", 0, shape, dtype, scale, zp)


def test_postprocessors_hand_on_their_summaries_before_the_threshold() -> None:
    # Logits: top-1 is class 1 at softmax probability ~0.84, under the threshold 0.9.
    clf = Classifier([tensor((1, 3))], None, top_k=2, threshold=0.9)
    result = clf([np.array([[0.0, 2.0, 0.0]], np.float32)], FrameContext())
    assert result.classes == []
    assert result.top1 is not None and result.top1[0] == 1
    assert result.top1[1] == pytest.approx(np.exp(2) / (np.exp(2) + 2), abs=1e-5)
    # Quantised probabilities (codes read as they are).
    probs = Classifier([tensor((1, 3), "uint8", 1 / 256)], None, top_k=1, threshold=0.9)
    assert probs([np.array([[26, 204, 26]], np.uint8)], FrameContext()).top1 == (
        1,
        pytest.approx(0.797, abs=1e-3),
    )

    outs = [
        TensorInfo("boxes", 0, (1, 3, 4), "float32", 0.0, 0),
        TensorInfo("classes", 1, (1, 3), "float32", 0.0, 0),
        TensorInfo("scores", 2, (1, 3), "float32", 0.0, 0),
        TensorInfo("count", 3, (1,), "float32", 0.0, 0),
    ]
    det = Detector(outs, None, input_size=(10, 10), threshold=0.95)
    values = [np.zeros((1, 3, 4), np.float32), np.zeros((1, 3), np.float32),
              np.array([[0.9, 0.3, 0.7]], np.float32), np.array([2], np.float32)]  # fmt: skip
    result = det(values, FrameContext())
    assert result.detections == [] and result.scores is not None
    assert result.scores.tolist() == pytest.approx([0.9, 0.3])  # the third is past the count

    raw = RawOutputs([tensor((1, 2), "int8", 0.25, 2)])(
        [np.array([[2, 6]], np.int8)], FrameContext()
    )
    assert raw.tensors is not None and raw.tensors[0].tolist() == [[0.0, 1.0]]


# ------------------------------------------------------------------- prometheus


def test_drift_gauges() -> None:
    pytest.importorskip("prometheus_client")
    quantiles = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
    telemetry = Telemetry(
        device="pi-x",
        seq=0,
        ts=0.0,
        uptime_s=1.0,
        pipelines={
            "cam": PipelineTelemetry(model="m", drift=0.41, confidence=quantiles),
            "mic": PipelineTelemetry(model="k"),  # no reference: no drift series
        },
    )
    from prometheus_client.parser import text_string_to_metric_families

    body, _ = MetricsExporter(lambda: telemetry).render()
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name in ("edge_agent_pipeline_drift_psi", "edge_agent_pipeline_confidence")
    }
    expected = {("edge_agent_pipeline_drift_psi", (("pipeline", "cam"),)): 0.41}
    for q, v in zip(QUANTILES, quantiles, strict=True):
        key = (("pipeline", "cam"), ("quantile", f"{q:g}"))
        expected[("edge_agent_pipeline_confidence", key)] = v
    assert found == expected
