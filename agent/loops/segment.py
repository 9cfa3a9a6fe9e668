"""Segmentation maps to a few hundred bytes: per-class areas, connected regions with
boxes in source pixels, and optionally a run-length-encoded class mask at a reduced size.

The model's output is ``[1, H, W, C]`` (per-pixel class scores: logits or
probabilities) or ``[1, H, W]`` / ``[1, H, W, 1]`` (a class index per pixel; a float
or quantised single channel is rounded, so a foreground probability becomes a
two-class mask at 0.5). Scores are compared as the runtime gives them: with one scale
for the whole tensor, int8 codes have the same per-pixel argmax as the real values.

Only the part of the map that covers the source frame counts (letterbox padding is
cut off), so areas are fractions of the frame and the mask lies on the frame. The
map is read at most ``REGION_GRID`` pixels a side, sampled evenly (the mask, at its
own size): the per-pixel argmax over a 256 x 256 x 21 map would cost a third of
the model's own invoke time on a desktop CPU, and areas to 1/4096 of the frame say
as much. Connected regions (4-neighbour) are found on that grid by union-find over
each row's runs: pure numpy and Python, as devices have neither OpenCV nor SciPy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.config import SegmentConfig
from agent.loops.postprocess import FrameContext, Output
from agent.loops.preprocess import Transform
from agent.models.runtime import TensorInfo
from agent.models.segment_map import (
    class_map,
    nearest,
    sampled,
    segment_layout,
)
from agent.protocol import Region, RleMask, Segmentation, SegmentClass

Box = tuple[float, float, float, float]
# (class, cells, row0, row1, col0, col1), rows and columns inclusive.
Component = tuple[int, int, int, int, int, int]


def reduce_map(class_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour copy of a class map at ``height`` x ``width``."""
    h, w = class_map.shape
    if (h, w) == (height, width):
        return class_map
    return class_map[nearest(h, height)][:, nearest(w, width)]


def components(grid: np.ndarray, skip: int | None = None) -> list[Component]:
    """4-connected regions of equal class in ``grid``, except class ``skip``.

    Two passes over runs rather than cells: each row's runs of one class are found
    with numpy, runs that overlap a run of the same class in the row above are joined
    (union-find), and the regions' sizes and extents are summed per root."""
    h, w = grid.shape
    change = np.ones((h, w), dtype=bool)
    change[:, 1:] = grid[:, 1:] != grid[:, :-1]
    rows, starts = np.nonzero(change)
    last_in_row = np.append(rows[1:] != rows[:-1], True)
    ends = np.where(last_in_row, w, np.append(starts[1:], w))
    classes = grid[rows, starts]
    if skip is not None:
        keep = classes != skip
        rows, starts, ends, classes = rows[keep], starts[keep], ends[keep], classes[keep]
    n = int(rows.size)
    if n == 0:
        return []
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(h + 1)).tolist()
    s, e, k = starts.tolist(), ends.tolist(), classes.tolist()
    for r in range(1, h):
        i, i_end, j, j_end = first[r - 1], first[r], first[r], first[r + 1]
        while i < i_end and j < j_end:
            if s[i] < e[j] and s[j] < e[i] and k[i] == k[j]:
                a, b = find(i), find(j)
                if a != b:
                    parent[b] = a
            if e[i] <= e[j]:
                i += 1
            else:
                j += 1
    _, label = np.unique(np.array([find(i) for i in range(n)]), return_inverse=True)
    m = int(label.max()) + 1
    cells = np.bincount(label, weights=ends - starts, minlength=m).astype(np.int64)
    r0 = np.full(m, h, np.int64)
    np.minimum.at(r0, label, rows)
    r1 = np.zeros(m, np.int64)
    np.maximum.at(r1, label, rows)
    c0 = np.full(m, w, np.int64)
    np.minimum.at(c0, label, starts)
    c1 = np.zeros(m, np.int64)
    np.maximum.at(c1, label, ends - 1)
    cls = np.zeros(m, np.int64)
    cls[label] = classes
    return list(
        zip(
            cls.tolist(),
            cells.tolist(),
            r0.tolist(),
            r1.tolist(),
            c0.tolist(),
            c1.tolist(),
            strict=True,
        )
    )


def rle_encode(grid: np.ndarray) -> RleMask:
    """Row by row, runs of ``[class, length]`` (runs continue across rows)."""
    flat = grid.reshape(-1)
    starts = np.flatnonzero(np.append(True, flat[1:] != flat[:-1]))
    lengths = np.diff(np.append(starts, flat.size))
    runs = list(zip(flat[starts].tolist(), lengths.tolist(), strict=True))
    return RleMask(width=int(grid.shape[1]), height=int(grid.shape[0]), runs=runs)


def rle_decode(mask: RleMask) -> np.ndarray:
    """The class map an ``RleMask`` holds, ``height`` x ``width``."""
    classes = np.array([c for c, _ in mask.runs], dtype=np.int64)
    lengths = np.array([n for _, n in mask.runs], dtype=np.int64)
    if int(lengths.sum()) != mask.width * mask.height:
        raise ValueError(
            f"mask runs cover {int(lengths.sum())} cells, not {mask.width} x {mask.height}"
        )
    return np.repeat(classes, lengths).reshape(mask.height, mask.width)


def map_agreement(active: np.ndarray, candidate: np.ndarray) -> float:
    """Mean IoU over the classes in either of two class maps (the candidate's taken at
    the active's size when they differ)."""
    if candidate.shape != active.shape:
        candidate = reduce_map(candidate, *active.shape)
    a, c = active.reshape(-1), candidate.reshape(-1)
    n = int(max(a.max(initial=0), c.max(initial=0))) + 1
    both = np.bincount(a[a == c], minlength=n)
    union = np.bincount(a, minlength=n) + np.bincount(c, minlength=n) - both
    present = union > 0
    return float(np.mean(both[present] / union[present])) if present.any() else 1.0


class Segmenter:
    """One segmentation output to a ``Segmentation`` (see the module's docstring)."""

    def __init__(
        self,
        outputs: Sequence[TensorInfo],
        labels: Sequence[str] | None,
        input_size: tuple[int, int],
        config: SegmentConfig,
    ) -> None:
        self.tensor = outputs[0]
        layout = segment_layout(self.tensor.shape)
        if layout is None:
            raise ValueError(
                f"segment: output {self.tensor.name!r} has shape {list(self.tensor.shape)}, "
                "expected [1, H, W, C] (class scores) or [1, H, W] (class indices)"
            )
        self.height, self.width, self.channels = layout
        self.labels = list(labels) if labels else None
        self.input_w, self.input_h = input_size
        self.config = config
        self._crop: tuple[Transform | None, tuple[int, int, int, int]] | None = None

    def class_map(
        self, value: np.ndarray, rows: np.ndarray | None = None, cols: np.ndarray | None = None
    ) -> np.ndarray:
        """The map of class indices (int64) from the raw output, at the ``rows`` and
        ``cols`` given (default: every pixel)."""
        t = self.tensor
        dequantize = t.dequantize if t.quantized else None
        return class_map(value, (self.height, self.width, self.channels), rows, cols, dequantize)

    def crop(self, transform: Transform | None) -> tuple[int, int, int, int]:
        """(row0, row1, col0, col1) of the map that covers the source frame."""
        cached = self._crop
        if cached is not None and cached[0] == transform:
            return cached[1]
        h, w = self.height, self.width
        if transform is None:
            bounds = (0, h, 0, w)
        else:
            fx, fy = w / self.input_w, h / self.input_h
            x0 = round(transform.pad_x * fx)
            y0 = round(transform.pad_y * fy)
            x1 = round((transform.pad_x + transform.source_w * transform.scale_x) * fx)
            y1 = round((transform.pad_y + transform.source_h * transform.scale_y) * fy)
            x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
            bounds = (y0, min(max(y1, y0 + 1), h), x0, min(max(x1, x0 + 1), w))
        self._crop = (transform, bounds)
        return bounds

    def _label(self, index: int) -> str | None:
        labels = self.labels
        return labels[index] if labels is not None and 0 <= index < len(labels) else None

    def __call__(self, values: Sequence[np.ndarray], frame: FrameContext) -> Output:
        transform = frame.transform
        config = self.config
        y0, y1, x0, x1 = self.crop(transform)
        ch, cw = y1 - y0, x1 - x0
        # The same cells the converter's reference statistics read (segment_map).
        content = self.class_map(values[0], sampled(y0, y1), sampled(x0, x1))
        counts = np.bincount(content.reshape(-1), minlength=self.channels)
        areas = counts / content.size
        order = np.argsort(-areas, kind="stable")
        classes = [
            SegmentClass(index=i, label=self._label(i), area=round(float(areas[i]), 4))
            for i in order.tolist()
            if areas[i] > 0 and areas[i] >= config.min_region_area
        ]
        grid = content
        regions = self._regions(grid, (y0, x0, ch, cw), transform) if config.max_regions else []
        mask = None
        if config.mask_size is not None:
            side = config.mask_size
            mh, mw = (
                (max(1, round(side * ch / cw)), side)
                if cw >= ch
                else (side, max(1, round(side * cw / ch)))
            )
            mh, mw = min(mh, ch), min(mw, cw)
            mask_map = self.class_map(values[0], y0 + nearest(ch, mh), x0 + nearest(cw, mw))
            mask = rle_encode(mask_map)
        segmentation = Segmentation(classes=classes, regions=regions, mask=mask)
        return Output(segmentation=segmentation, class_map=grid)

    def _regions(
        self,
        grid: np.ndarray,
        content: tuple[int, int, int, int],
        transform: Transform | None,
    ) -> list[Region]:
        config = self.config
        rh, rw = grid.shape
        total = rh * rw
        found = [
            c for c in components(grid, config.background) if c[1] / total >= config.min_region_area
        ]
        found.sort(key=lambda c: -c[1])
        found = found[: config.max_regions]
        if not found:
            return []
        y0, x0, ch, cw = content
        parts = np.array([c[2:] for c in found], dtype=np.float64)
        # Grid cells to map pixels (the cell's edges), then to model input pixels.
        sy, sx = ch / rh, cw / rw
        fx, fy = self.input_w / self.width, self.input_h / self.height
        top = (y0 + parts[:, 0] * sy) * fy
        bottom = (y0 + (parts[:, 1] + 1) * sy) * fy
        left = (x0 + parts[:, 2] * sx) * fx
        right = (x0 + (parts[:, 3] + 1) * sx) * fx
        if transform is not None:
            left, top = transform.to_source(left, top)
            right, bottom = transform.to_source(right, bottom)
        return [
            Region(
                index=c[0],
                label=self._label(c[0]),
                area=round(c[1] / total, 4),
                box=(
                    round(float(left[i]), 1),
                    round(float(top[i]), 1),
                    round(float(right[i]), 1),
                    round(float(bottom[i]), 1),
                ),
            )
            for i, c in enumerate(found)
        ]
