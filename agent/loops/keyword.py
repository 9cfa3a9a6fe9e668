"""Keyword spotting (task keyword): one audio window's class scores to a keyword that
fired, or to nothing.

Windows overlap (a hop is a fraction of a window), so one spoken keyword scores high in
several windows in a row. It fires once: a keyword is published when its probability
crosses the threshold and it was not detected within the last ``refractory_s`` seconds
of audio (each window in which it is detected, published or not, restarts that time).
Background labels (``ignore``: "_silence_", "_unknown_") never fire. A window with no
keyword gives a silent output: nothing is published, but its top class still feeds the
drift statistics, which describe everything the model hears.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.config import KeywordConfig
from agent.loops.postprocess import FrameContext, Output
from agent.models.health import probabilities
from agent.models.runtime import TensorInfo
from agent.protocol import ClassScore

#: The threshold when the pipeline's own is 0 (its default, which would fire on anything).
DEFAULT_THRESHOLD = 0.8


class KeywordSpotter:
    """Probabilities (softmax when the model gives logits), background labels, threshold
    and refractory time, counted on the frame's stream clock (``FrameContext.stream_s``:
    the audio's for audio windows)."""

    def __init__(
        self,
        outputs: Sequence[TensorInfo],
        labels: Sequence[str] | None,
        config: KeywordConfig,
        threshold: float = 0.0,
    ) -> None:
        self.tensor = outputs[0]
        self.labels = list(labels) if labels else None
        self.threshold = threshold or DEFAULT_THRESHOLD
        self.refractory_s = config.refractory_s
        ignore = set(config.ignore)
        self._ignored = {i for i, label in enumerate(self.labels or []) if label in ignore}
        # Keyword index -> stream time (FrameContext.stream_s) it was last detected at.
        self._last_seen: dict[int, float] = {}

    def __call__(self, values: Sequence[np.ndarray], frame: FrameContext) -> Output:
        scores = probabilities(self.tensor.dequantize(values[0]))
        best = int(np.argmax(scores))
        score = float(scores[best])
        top1 = (best, score)
        if best in self._ignored or score < self.threshold:
            return Output(top1=top1, silent=True)
        now = frame.stream_s
        last = self._last_seen.get(best)
        self._last_seen[best] = now
        if last is not None and now - last < self.refractory_s:
            return Output(top1=top1, silent=True)
        labels = self.labels
        label = labels[best] if labels and best < len(labels) else None
        return Output(
            classes=[ClassScore(index=best, label=label, score=round(score, 5))], top1=top1
        )
