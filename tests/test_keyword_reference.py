"""Keyword spotters use the classify reference: every window counts for drift, the
silent ones (background, under threshold, refractory) included, through ``top1``."""

from __future__ import annotations

import numpy as np

from agent.config import DriftConfig, KeywordConfig
from agent.loops.drift import DriftMonitor
from agent.loops.keyword import KeywordSpotter
from agent.loops.postprocess import FrameContext
from agent.models.runtime import TensorInfo
from converter.reference import reference_of

LABELS = ["_silence_", "_unknown_", "yes", "no"]
TENSOR = TensorInfo("probs", 0, (1, 4), "float32", 0.0, 0)


def windows(rng: np.random.Generator, n: int, p: list[float]) -> list[np.ndarray]:
    """Logits of ``n`` windows, each one's top class drawn with probabilities ``p``."""
    out = []
    for k in rng.choice(4, n, p=p):
        logits = rng.normal(0, 0.3, 4).astype(np.float32)
        logits[k] += 4.0
        out.append(logits[None])
    return out


def test_silent_windows_count_for_drift() -> None:
    rng = np.random.default_rng(0)
    quiet = [0.85, 0.1, 0.03, 0.02]  # mostly silence: mostly silent outputs
    reference = reference_of("keyword", [TENSOR], [np.concatenate(windows(rng, 300, quiet))])
    assert reference is not None and reference.classify is not None

    def distance(p: list[float]) -> float:
        spotter = KeywordSpotter([TENSOR], LABELS, KeywordConfig(refractory_s=60))
        monitor = DriftMonitor("kws", DriftConfig(window=200, min_frames=100))
        outputs = [
            spotter([w], FrameContext(audio_s=i * 0.5)) for i, w in enumerate(windows(rng, 200, p))
        ]
        assert sum(o.silent for o in outputs) > 150  # nearly every window publishes nothing
        for o in outputs:
            monitor.add("1", reference, o)
        figures = monitor.evaluate("1")
        assert figures is not None and figures.frames == 200 and figures.distance is not None
        return figures.distance

    assert distance(quiet) < 0.1
    # Unknown speech where there was silence: every window silent still, yet drift.
    assert distance([0.2, 0.75, 0.03, 0.02]) > 0.5
