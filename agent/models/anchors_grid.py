"""The anchor grid of a MediaPipe-style single-shot detector (BlazeFace), and which of a
model's outputs are its regressors and its scores.

Pure (numpy and shapes): the deploy check (``output_fit``) and the decoder
(``agent/loops/decoders/anchors.py``) read the same layout, so a model the check lets
through is one the decoder can read.

The grid is MediaPipe's SsdAnchorsCalculator with ``fixed_anchor_size``: for each run
of consecutive layers with the same stride, a feature map of ceil(input / stride)
cells, row by row, each cell holding ``anchors_per_cell`` anchors per layer of the run,
all centred on the cell (``anchor_offset``) with width and height 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.models.decoder_spec import AnchorsDecoder
from agent.models.health import NamedTensor


def stride_groups(spec: AnchorsDecoder) -> list[tuple[int, int]]:
    """(stride, anchors per cell) of each run of consecutive layers sharing a stride."""
    groups: list[tuple[int, int]] = []
    for stride in spec.strides:
        if groups and groups[-1][0] == stride:
            groups[-1] = (stride, groups[-1][1] + spec.anchors_per_cell)
        else:
            groups.append((stride, spec.anchors_per_cell))
    return groups


def group_counts(spec: AnchorsDecoder, input_w: int, input_h: int) -> list[int]:
    """Anchors per stride group, in the grid's order."""
    return [
        math.ceil(input_w / s) * math.ceil(input_h / s) * per_cell
        for s, per_cell in stride_groups(spec)
    ]


def anchor_count(spec: AnchorsDecoder, input_w: int, input_h: int) -> int:
    """How many anchors the grid has for a ``input_w`` x ``input_h`` model input."""
    return sum(group_counts(spec, input_w, input_h))


def generate_anchors(spec: AnchorsDecoder, input_w: int, input_h: int) -> np.ndarray:
    """The grid as float32 ``[N, 4]``: cx, cy, w, h in fractions of the input."""
    parts = []
    for stride, per_cell in stride_groups(spec):
        fw, fh = math.ceil(input_w / stride), math.ceil(input_h / stride)
        cy, cx = np.meshgrid(
            (np.arange(fh) + spec.anchor_offset) / fh,
            (np.arange(fw) + spec.anchor_offset) / fw,
            indexing="ij",
        )
        centres = np.stack([cx.reshape(-1), cy.reshape(-1)], axis=1)
        parts.append(np.repeat(centres, per_cell, axis=0))
    centres = np.concatenate(parts).astype(np.float32)
    return np.concatenate([centres, np.ones_like(centres)], axis=1)


def input_size(shape: Sequence[int], layout: str) -> tuple[int, int]:
    """(width, height) of an image input ``[1, H, W, C]`` (or ``[1, C, H, W]``)."""
    if len(shape) != 4:
        raise ValueError(
            f"the anchors decoder needs an image input [1, H, W, C], not {list(shape)}"
        )
    return (shape[3], shape[2]) if layout == "NCHW" else (shape[2], shape[1])


@dataclass(frozen=True)
class AnchorPair:
    """One regressors output and its scores output, covering anchors ``offset`` to
    ``offset + count`` of the grid."""

    regressors: int
    scores: int
    offset: int
    count: int


def _describe(t: NamedTensor) -> str:
    return f"output {t.name!r} {list(t.shape)}"


def anchor_outputs(
    spec: AnchorsDecoder,
    outputs: Sequence[NamedTensor],
    input_w: int,
    input_h: int,
    classes: int | None = None,
) -> list[AnchorPair]:
    """Which outputs are regressors ``[1, N, >= 4 + 2K]`` and scores ``[1, N, 1]`` (or
    ``[1, N, classes]``), by shape: one pair over the whole grid, or one pair per stride
    group (full-range variants split by stride). ``ValueError``: one line naming the
    tensor and the shape expected."""
    need = 4 + 2 * spec.keypoints
    score_widths = {1, classes} if classes else {1}
    counts = group_counts(spec, input_w, input_h)
    total = sum(counts)
    grid = (
        f"the anchors of strides {spec.strides}, {spec.anchors_per_cell} per cell, "
        f"at input {input_w}x{input_h}"
    )
    regs: list[int] = []
    scores: list[int] = []
    for i, t in enumerate(outputs):
        shape = list(t.shape)
        if len(shape) < 2 or math.prod(shape[:-2]) != 1:
            raise ValueError(f"{_describe(t)}: expected [1, {total}, W] ({grid})")
        width = shape[-1]
        if width in score_widths and (width == 1 or width < need):
            scores.append(i)
        elif width >= need:
            regs.append(i)
        else:
            columns = " or ".join(map(str, sorted(score_widths)))
            raise ValueError(
                f"{_describe(t)}: neither regressors [1, N, >={need}] (4 + 2 x "
                f"{spec.keypoints} keypoints) nor scores [1, N, {columns}]"
            )
    if len(outputs) not in (2, 2 * len(counts)) or len(regs) != len(scores):
        raise ValueError(
            f"the anchors decoder needs 2 outputs, regressors [1, {total}, >={need}] and "
            f"scores [1, {total}, 1], this model has {len(regs)} regressors and "
            f"{len(scores)} scores outputs"
        )

    def n(i: int) -> int:
        return int(outputs[i].shape[-2])

    if len(regs) == 1:
        for i, expected in ((regs[0], f"[1, {total}, >={need}]"), (scores[0], f"[1, {total}, 1]")):
            if n(i) != total:
                raise ValueError(f"{_describe(outputs[i])}: expected {expected} ({grid})")
        return [AnchorPair(regs[0], scores[0], 0, total)]
    pairs = []
    offset = 0
    for (stride, _), count in zip(stride_groups(spec), counts, strict=True):
        reg = next((i for i in regs if n(i) == count), None)
        score = next((i for i in scores if n(i) == count), None)
        if reg is None or score is None:
            what = (
                f"regressors [1, {count}, >={need}]" if reg is None else f"scores [1, {count}, 1]"
            )
            raise ValueError(f"no output {what} for the stride {stride} anchors ({grid})")
        regs.remove(reg)
        scores.remove(score)
        pairs.append(AnchorPair(reg, score, offset, count))
        offset += count
    return pairs
