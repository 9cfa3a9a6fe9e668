"""Single-person pose models without heatmaps (the MoveNet kind): one output
``[1, 1, K, 3]`` holding each point's (y, x, score), y and x in 0..1 of the input.

Every point is published with its score, also below the pipeline's threshold: a pose
is read as a whole (a skeleton drawn from 17 points misses limbs when the weak ones
are dropped), and its consumer decides per point. The threshold applies to the pose:
when the mean point score is below it, nobody was found and the result carries an
empty list.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.loops.postprocess import FrameContext, Output
from agent.models.runtime import TensorInfo
from agent.protocol import Keypoint

# MoveNet's and COCO's order, the names of a 17-point pose without labels.
COCO_KEYPOINTS = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)


def keypoint_count(shape: Sequence[int]) -> int | None:
    """K of a ``[1, 1, K, 3]`` output, None for any other shape."""
    dims = list(shape)
    if len(dims) == 4 and dims[0] == 1 and dims[1] == 1 and dims[3] == 3 and dims[2] > 0:
        return int(dims[2])
    return None


def keypoint_names(k: int, labels: Sequence[str] | None) -> list[str | None]:
    """The manifest's labels when there are K of them, else COCO's for 17, else none."""
    if labels and len(labels) == k:
        return list(labels)
    if k == len(COCO_KEYPOINTS):
        return list(COCO_KEYPOINTS)
    return [None] * k


class KeypointsDecoder:
    """``[1, 1, K, 3]`` (y, x, score) to named points in source pixels."""

    def __init__(
        self,
        outputs: Sequence[TensorInfo],
        labels: Sequence[str] | None,
        input_size: tuple[int, int],
        threshold: float = 0.0,
    ) -> None:
        self.tensor = outputs[0]
        k = keypoint_count(self.tensor.shape)
        if k is None:
            raise ValueError(
                f"keypoints: output {self.tensor.name!r} has shape {list(self.tensor.shape)}, "
                "expected [1, 1, K, 3] (y, x, score)"
            )
        self.names = keypoint_names(k, labels)
        self.input_w, self.input_h = input_size
        self.threshold = threshold

    def __call__(self, values: Sequence[np.ndarray], frame: FrameContext) -> Output:
        points = self.tensor.dequantize(values[0]).reshape(-1, 3).astype(np.float64)
        scores = points[:, 2]
        if float(scores.mean()) < self.threshold:
            return Output(keypoints=[], scores=scores)
        x, y = points[:, 1] * self.input_w, points[:, 0] * self.input_h
        transform = frame.transform
        if transform is not None:
            x, y = transform.to_source(x, y)
        keypoints = [
            Keypoint(name=name, x=round(float(px), 1), y=round(float(py), 1), score=round(s, 4))
            for name, px, py, s in zip(self.names, x, y, scores.tolist(), strict=True)
        ]
        return Output(keypoints=keypoints, scores=scores)


def pose_agreement(active: Sequence[Keypoint], candidate: Sequence[Keypoint]) -> float:
    """Fraction of the candidate's points within a tenth of the active pose's size (the
    longer side of its points' bounding box) of the active's same point (PCK@0.1). Both
    without a pose agree; one without, or another point count, do not."""
    if not active or not candidate:
        return float(not active and not candidate)
    if len(active) != len(candidate):
        return 0.0
    a = np.array([(p.x, p.y) for p in active], dtype=np.float64)
    c = np.array([(p.x, p.y) for p in candidate], dtype=np.float64)
    size = float((a.max(axis=0) - a.min(axis=0)).max())
    # A pose collapsed to one spot still has a pixel's tolerance.
    tolerance = max(0.1 * size, 1.0)
    return float(np.mean(np.hypot(*(a - c).T) <= tolerance))
