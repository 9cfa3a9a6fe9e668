"""A segmentation output's class map, read the one way the agent's ``Segmenter`` and the
converter's reference statistics both read it: the layout of the output, the evenly
sampled cells (at most ``REGION_GRID`` a side) and the class index of each cell.

Pure: shapes and numpy only, no runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# The map is read at most this many cells a side: areas to 1/4096 of the frame, and
# region boxes within 1/64 of it, at a small per-frame cost.
REGION_GRID = 64


def segment_layout(shape: Sequence[int]) -> tuple[int, int, int] | None:
    """(H, W, C) of a ``[1, H, W]`` or ``[1, H, W, C]`` output (C 1: an index mask)."""
    dims = list(shape)
    if len(dims) == 3:
        dims.append(1)
    if len(dims) != 4 or dims[0] != 1 or min(dims[1:]) < 1:
        return None
    return dims[1], dims[2], dims[3]


def nearest(n: int, size: int) -> np.ndarray:
    """Indices of ``size`` cells sampled evenly (centres) from ``n``."""
    return ((np.arange(size) + 0.5) * n / size).astype(np.int64)


def sampled(start: int, stop: int, grid: int = REGION_GRID) -> np.ndarray:
    """The rows (or columns) of ``start:stop`` read: all of them, or ``grid`` spread evenly."""
    n = stop - start
    return start + nearest(n, min(n, grid))


def class_map(
    value: np.ndarray,
    layout: tuple[int, int, int],
    rows: np.ndarray | None = None,
    cols: np.ndarray | None = None,
    dequantize: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """The map of class indices (int64) of one frame's output at ``rows`` and ``cols``
    (default: every pixel). Class scores: the argmax (codes with one scale have the
    real values' argmax). A single channel: rounded to an index after ``dequantize``
    (None: the values are real already), so a probability becomes two classes at 0.5."""
    height, width, channels = layout
    m = value.reshape(height, width, channels)
    if rows is not None:
        m = m[rows]
    if cols is not None:
        m = m[:, cols]
    if channels > 1:
        return np.argmax(m, axis=-1)
    m = m[..., 0]
    if dequantize is not None:
        m = dequantize(m)
    if m.dtype.kind == "f":
        m = np.rint(m)
    return np.clip(m, 0, None).astype(np.int64)


def frame_class_map(value: np.ndarray, layout: tuple[int, int, int]) -> np.ndarray:
    """The sampled class map of a whole frame from real (dequantised) values: what the
    ``Segmenter`` reads of a frame that fills the input (no letterbox padding)."""
    height, width, _ = layout
    return class_map(value, layout, sampled(0, height), sampled(0, width))
