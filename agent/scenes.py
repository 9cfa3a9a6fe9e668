"""Drawn scenes (numpy only), shared by the synthetic source and the converter's examples.

The converter trains its ``colors`` example on exactly what the synthetic ``colors``
source shows a device, so a model, its reference statistics and a live pipeline see
one distribution; a *cast* (a tinted light) moves that distribution for drift tests.
Images come out in RGB order, pixel values 0..255 as a camera gives them; the
source flips them to the BGR order of OpenCV cameras.
"""

from __future__ import annotations

import numpy as np

COLOR_LABELS = ("red", "orange", "yellow", "green", "blue", "purple")
# RGB. Only green has R == B, so a model fed BGR mistakes every other class (red <->
# blue, yellow -> cyan-ish ...): a swapped channel order cannot go unnoticed.
_PALETTE = np.array(
    [
        [220, 30, 30],
        [240, 130, 20],
        [230, 215, 30],
        [40, 180, 50],
        [30, 60, 220],
        [110, 40, 220],
    ],
    np.float32,
)
# A sodium-lamp light: every patch drifts towards orange, so a classifier's output
# distribution moves while the objects stay the same.
WARM_CAST = (255.0, 160.0, 40.0)
CAST_STRENGTH = 0.5


def balanced_labels(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    """``n`` labels with every class as often as possible, in random order."""
    return rng.permutation(np.arange(n) % classes).astype(np.int64)


def _stripes(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """(n, h, w) texture in -1..1: a sinusoid of random direction, 1..3 cycles a patch,
    relative to the patch so that a resized patch keeps its texture."""
    y, x = np.meshgrid(
        np.linspace(0, 1, height, dtype=np.float32),
        np.linspace(0, 1, width, dtype=np.float32),
        indexing="ij",
    )
    angle = rng.uniform(0, np.pi, n).astype(np.float32)[:, None, None]
    cycles = rng.uniform(1, 3, n).astype(np.float32)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)[:, None, None]
    along = x[None] * np.cos(angle) + y[None] * np.sin(angle)
    return np.sin(2 * np.pi * cycles * along + phase)


def color_patches(
    rng: np.random.Generator,
    labels: np.ndarray,
    height: int = 16,
    width: int = 16,
    *,
    cast: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """One patch per label: (n, h, w, 3) uint8 RGB.

    Each patch varies its hue a little, its saturation, its brightness (a dim to a
    bright light), carries a striped texture of random direction and strength, and
    per-pixel sensor noise; so telling orange from red or yellow is a real learning
    problem, not a lookup. ``cast`` tints every patch towards that RGB colour.
    """
    n = len(labels)
    base = _PALETTE[labels] + rng.normal(0, 22, (n, 3)).astype(np.float32)
    grey = base.mean(axis=1, keepdims=True)
    fade = rng.uniform(0, 0.45, (n, 1)).astype(np.float32)
    base = base * (1 - fade) + grey * fade
    brightness = rng.uniform(0.35, 1.2, (n, 1)).astype(np.float32)
    base = base * brightness
    if cast is not None:
        tint = np.asarray(cast, np.float32)[None] * brightness
        base = base * (1 - CAST_STRENGTH) + tint * CAST_STRENGTH
    strength = rng.uniform(0, 0.25, n).astype(np.float32)[:, None, None]
    texture = 1 + strength * _stripes(rng, n, height, width)
    images = base[:, None, None, :] * texture[..., None]
    sigma = rng.uniform(4, 20, n).astype(np.float32)[:, None, None, None]
    images = images + sigma * rng.standard_normal(images.shape, dtype=np.float32)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------- shapes

SHAPE_LABELS = ("red", "yellow", "green", "blue")
_SHAPE_PALETTE = _PALETTE[[COLOR_LABELS.index(name) for name in SHAPE_LABELS]]
# Object centres fall in distinct cells of this grid (a detector with one box per cell
# can then find every object), at most MAX_SHAPES a scene.
SHAPE_GRID = 4
MAX_SHAPES = 3

Box = tuple[float, float, float, float]


def shape_scenes(
    rng: np.random.Generator,
    n: int,
    height: int = 32,
    width: int = 32,
    *,
    cast: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, list[list[tuple[int, Box]]]]:
    """``n`` scenes of 0..MAX_SHAPES coloured squares on a grey, shaded, noisy
    background: (n, h, w, 3) uint8 RGB, and per scene its objects as (class, box) with
    the box ``(ymin, xmin, ymax, xmax)`` in 0..1, as a detector reports it."""
    images = np.empty((n, height, width, 3), np.uint8)
    objects: list[list[tuple[int, Box]]] = []
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    short = min(height, width)
    for i in range(n):
        level = rng.uniform(60, 200)
        slope = rng.normal(0, 30, 2) / short
        image = (level + slope[0] * (y - height / 2) + slope[1] * (x - width / 2))[..., None]
        image = np.repeat(image, 3, axis=-1) + rng.normal(0, 10, 3).astype(np.float32)
        found: list[tuple[int, Box]] = []
        taken = np.zeros((height, width), bool)
        for cell in rng.permutation(SHAPE_GRID * SHAPE_GRID)[: rng.integers(0, MAX_SHAPES + 1)]:
            row, col = divmod(int(cell), SHAPE_GRID)
            side = max(2, round(rng.uniform(0.18, 0.34) * short))
            cy = (row + rng.uniform(0.05, 0.95)) * height / SHAPE_GRID
            cx = (col + rng.uniform(0.05, 0.95)) * width / SHAPE_GRID
            y0 = int(np.clip(round(cy - side / 2), 0, height - side))
            x0 = int(np.clip(round(cx - side / 2), 0, width - side))
            k = int(rng.integers(len(SHAPE_LABELS)))
            color = _SHAPE_PALETTE[k] * rng.uniform(0.6, 1.1) + rng.normal(0, 12, 3)
            if taken[y0 : y0 + side, x0 : x0 + side].any():
                continue  # squares never hide one another: every box is what it shows
            taken[y0 : y0 + side, x0 : x0 + side] = True
            image[y0 : y0 + side, x0 : x0 + side] = color
            found.append((k, (y0 / height, x0 / width, (y0 + side) / height, (x0 + side) / width)))
        if cast is not None:
            image = image * (1 - CAST_STRENGTH) + np.asarray(cast, np.float32) * CAST_STRENGTH
        image += rng.uniform(3, 12) * rng.standard_normal(image.shape, dtype=np.float32)
        images[i] = np.clip(np.rint(image), 0, 255)
        objects.append(found)
    return images, objects
