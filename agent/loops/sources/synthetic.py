"""Generated frames and sensor windows at a set rate, for tests, the demo and benchmarks."""

from __future__ import annotations

from importlib import resources
from typing import Any

import numpy as np

from agent.config import SyntheticSource
from agent.loops.sources.base import Source, register


def digit_samples() -> tuple[np.ndarray, np.ndarray]:
    """200 handwritten digits (8x8, uint8 0-255) with labels, from the UCI digits set."""
    with resources.files("agent.loops.sources").joinpath("digits_samples.npz").open("rb") as f:
        data = np.load(f)
        return data["images"], data["labels"]


@register("synthetic")
class SyntheticFrames(Source):
    """``frames``: moving gradients; ``digits``: real digit images scaled to the frame size,
    with the true label in the frame's metadata; ``windows``: multi-channel sine windows
    (height = window length, width = channels)."""

    def __init__(self, config: SyntheticSource) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)
        self._n = 0
        self._digits: tuple[np.ndarray, np.ndarray] | None = None
        self._base: np.ndarray | None = None

    @property
    def fps(self) -> float | None:
        return self.config.fps

    def open(self) -> None:
        c = self.config
        if c.kind == "digits":
            images, labels = digit_samples()
            # Nearest-neighbour upscale once, so each read is an index, not a resize.
            ys = np.arange(c.height) * 8 // c.height
            xs = np.arange(c.width) * 8 // c.width
            frames = images[:, ys][:, :, xs]
            if c.channels == 3:
                frames = np.repeat(frames[..., None], 3, axis=-1)
            else:
                frames = frames[..., None]
            self._digits = (np.ascontiguousarray(frames), labels)
        elif c.kind == "frames":
            y, x = np.mgrid[0 : c.height, 0 : c.width]
            self._base = ((x + y) % 256).astype(np.uint8)

    def read(self) -> tuple[np.ndarray, dict[str, Any]]:
        c = self.config
        n = self._n
        self._n += 1
        if self._digits is not None:
            frames, labels = self._digits
            i = n % len(frames)
            return frames[i], {"label": int(labels[i])}
        if c.kind == "windows":
            t = (n * c.height + np.arange(c.height))[:, None] / 50.0
            freqs = np.arange(1, c.width + 1)[None, :]
            noise = 0.05 * self._rng.standard_normal((c.height, c.width))
            return (np.sin(t * freqs) + noise).astype(np.float32), {}
        assert self._base is not None
        frame = (self._base + np.uint8(n % 256)).astype(np.uint8)
        if c.channels == 3:
            frame = np.stack([frame, frame[::-1], frame[:, ::-1]], axis=-1)
        else:
            frame = frame[..., None]
        return frame, {}
