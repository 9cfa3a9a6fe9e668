"""Generated frames and sensor windows at a set rate, for tests, the demo and benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import numpy as np

from agent.config import SyntheticSource
from agent.loops.sources.base import Source, register
from agent.scenes import (
    COLOR_LABELS,
    WARM_CAST,
    balanced_labels,
    color_patches,
    shape_scenes,
)

# Frames drawn once at open(): a read is then an index, and the label frequencies of
# one pass are exactly balanced, as the colors example's validation set is.
COLOR_BANK = 120
_DRAW_CHUNK = 16  # patches drawn at once: bounds the float scratch at large frame sizes


def digit_samples() -> tuple[np.ndarray, np.ndarray]:
    """200 handwritten digits (8x8, uint8 0-255) with labels, from the UCI digits set."""
    with resources.files("agent.loops.sources").joinpath("digits_samples.npz").open("rb") as f:
        data = np.load(f)
        return data["images"], data["labels"]


def _digit_frames(c: SyntheticSource) -> np.ndarray:
    images, _ = digit_samples()
    # Nearest-neighbour upscale once, so each read is an index, not a resize.
    ys = np.arange(c.height) * 8 // c.height
    xs = np.arange(c.width) * 8 // c.width
    frames = images[:, ys][:, :, xs]
    if c.channels == 3:
        return np.ascontiguousarray(np.repeat(frames[..., None], 3, axis=-1))
    return np.ascontiguousarray(frames[..., None])


def _color_frames(
    c: SyntheticSource, labels: np.ndarray, cast: tuple[float, float, float] | None
) -> np.ndarray:
    # Its own generator per scene: the steady scene is the same with or without drift.
    rng = np.random.default_rng([c.seed, 0 if cast is None else 1])
    rgb = np.concatenate(
        [
            color_patches(rng, labels[i : i + _DRAW_CHUNK], c.height, c.width, cast=cast)
            for i in range(0, len(labels), _DRAW_CHUNK)
        ]
    )
    return np.ascontiguousarray(rgb[..., ::-1])  # BGR, as OpenCV cameras deliver


def _shape_frames(
    c: SyntheticSource, cast: tuple[float, float, float] | None
) -> tuple[np.ndarray, list[list[dict[str, Any]]]]:
    # The same generator for both scenes: the drifted one holds the same objects.
    images, scenes = shape_scenes(
        np.random.default_rng(c.seed), COLOR_BANK, c.height, c.width, cast=cast
    )
    objects = [[{"index": k, "box": list(box)} for k, box in scene] for scene in scenes]
    return np.ascontiguousarray(images[..., ::-1]), objects


@register("synthetic")
class SyntheticFrames(Source):
    """``frames``: moving gradients; ``digits``: real digit images scaled to the frame size;
    ``colors``: coloured patches (BGR) drawn like the colors example's data; both with
    the true ``label`` in the frame's metadata; ``shapes``: coloured squares (BGR) drawn
    like the shapes detector's data, the true ``objects`` (index, box as ymin, xmin,
    ymax, xmax in 0..1) in the metadata; ``windows``: multi-channel sine windows
    (height = window length, width = channels).

    With ``drift_after_s``, the scene changes that long after ``open()`` (digits
    inverted, colors and shapes under a warm cast, frames inverted, windows louder and
    offset); the metadata then says ``scene: drift`` (``steady`` before).
    """

    def __init__(
        self, config: SyntheticSource, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._rng = np.random.default_rng(config.seed)
        self._n = 0
        self._bank: np.ndarray | None = None
        self._drift_bank: np.ndarray | None = None
        self._truth: list[dict[str, Any]] = []  # each banked frame's metadata
        self._base: np.ndarray | None = None
        self._drift_at: float | None = None

    @property
    def fps(self) -> float | None:
        return self.config.fps

    def open(self) -> None:
        c = self.config
        drifts = c.drift_after_s is not None
        if c.kind == "digits":
            self._bank = _digit_frames(c)
            self._truth = [{"label": int(label)} for label in digit_samples()[1]]
            self._drift_bank = 255 - self._bank if drifts else None
        elif c.kind == "colors":
            labels = balanced_labels(np.random.default_rng(c.seed), COLOR_BANK, len(COLOR_LABELS))
            self._bank = _color_frames(c, labels, None)
            self._truth = [{"label": int(label)} for label in labels]
            self._drift_bank = _color_frames(c, labels, WARM_CAST) if drifts else None
        elif c.kind == "shapes":
            self._bank, objects = _shape_frames(c, None)
            self._truth = [{"objects": scene} for scene in objects]
            self._drift_bank = _shape_frames(c, WARM_CAST)[0] if drifts else None
        elif c.kind == "frames":
            y, x = np.mgrid[0 : c.height, 0 : c.width]
            self._base = ((x + y) % 256).astype(np.uint8)
        if c.drift_after_s is not None:
            self._drift_at = self._clock() + c.drift_after_s

    def read(self) -> tuple[np.ndarray, dict[str, Any]]:
        n = self._n
        self._n += 1
        drifted = self._drift_at is not None and self._clock() >= self._drift_at
        meta: dict[str, Any] = {}
        if self._drift_at is not None:
            meta["scene"] = "drift" if drifted else "steady"
        if self._bank is not None:
            i = n % len(self._bank)
            meta.update(self._truth[i])
            if drifted and self._drift_bank is not None:
                return self._drift_bank[i], meta
            return self._bank[i], meta
        if self.config.kind == "windows":
            window = self._window(n)
            return (3 * window + 1 if drifted else window), meta
        frame = self._gradient(n)
        return (255 - frame if drifted else frame), meta

    def _window(self, n: int) -> np.ndarray:
        c = self.config
        t = (n * c.height + np.arange(c.height))[:, None] / 50.0
        freqs = np.arange(1, c.width + 1)[None, :]
        noise = 0.05 * self._rng.standard_normal((c.height, c.width))
        return (np.sin(t * freqs) + noise).astype(np.float32)

    def _gradient(self, n: int) -> np.ndarray:
        assert self._base is not None
        frame = (self._base + np.uint8(n % 256)).astype(np.uint8)
        if self.config.channels == 3:
            return np.stack([frame, frame[::-1], frame[:, ::-1]], axis=-1)
        return frame[..., None]
