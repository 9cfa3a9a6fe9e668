"""The anchors decoder's lean path (thresholds on raw codes, code tables, one weighted
NMS over box and keypoint rows) against a straightforward decode written out here:
every output dequantised, every score computed, each kept anchor decoded one by one,
MediaPipe's weighted NMS as a plain loop, then mapped to the source and rounded."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.loops.decoders.anchors import AnchorsDetector
from agent.loops.postprocess import FrameContext
from agent.loops.preprocess import Transform
from agent.models.anchors_grid import generate_anchors
from agent.models.decoder_spec import AnchorsDecoder
from agent.models.runtime import TensorInfo
from agent.protocol import Detection

NAMES = ["right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear"]
SPEC = AnchorsDecoder(
    type="anchors", strides=[8, 16, 16, 16], box_scale=128, keypoints=6, keypoint_names=NAMES
)
TRANSFORM = Transform(0.2, 0.2, 0, 16, 640, 480)


def iou(a: list[float], b: list[float]) -> float:
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    inter = w * h
    union = max(a[2] - a[0], 0) * max(a[3] - a[1], 0) + max(b[2] - b[0], 0) * max(b[3] - b[1], 0)
    union -= inter
    return inter / union if union > 0 else 0.0


def reference(
    spec: AnchorsDecoder,
    outputs: list[TensorInfo],
    codes: list[np.ndarray],
    threshold: float,
    transform: Transform,
) -> tuple[list[float], list[tuple[float, tuple[float, ...], list[tuple[float, float]]]]]:
    """(scores counted at min_score, [(score, box, keypoints)]) the plain way."""
    regs = outputs[0].dequantize(codes[0]).reshape(896, 16).astype(np.float64).tolist()
    logits = outputs[1].dequantize(codes[1]).reshape(896).astype(np.float64).tolist()
    anchors = generate_anchors(spec, 128, 128).tolist()
    clip, k = spec.score_clip, spec.keypoints
    found = []  # (score, row: box then keypoints)
    for a, r, logit in zip(anchors, regs, logits, strict=True):
        score = 1 / (1 + math.exp(-min(max(logit, -clip), clip)))
        if score < spec.min_score:
            continue
        cx, cy = a[0], a[1]
        dx, dy, w, h = (v / spec.box_scale for v in r[:4])
        row = [cx + dx - w / 2, cy + dy - h / 2, cx + dx + w / 2, cy + dy + h / 2]
        for i in range(k):
            row += [cx + r[4 + 2 * i] / spec.box_scale, cy + r[5 + 2 * i] / spec.box_scale]
        found.append((score, row))

    def weighted(cands: list[tuple[float, list[float]]]) -> list[tuple[float, list[float]]]:
        left = sorted(cands, key=lambda c: -c[0])  # stable, as the decoder's argsort
        out = []
        while left and len(out) < spec.max_detections:
            best = left[0]
            group = [c for c in left if c is best or iou(best[1], c[1]) > spec.iou]
            left = [c for c in left if all(c is not g for g in group)]
            total = sum(s for s, _ in group)
            merged = [sum(s * row[j] for s, row in group) / total for j in range(len(best[1]))]
            out.append((best[0], merged))
        return out

    counted = [s for s, _ in weighted(found)]
    high = max(spec.min_score, threshold)
    result = []
    for score, row in weighted([c for c in found if c[0] >= high]):
        xs = [transform.to_source(np.array(v * 128), np.array(0.0))[0] for v in row[0::2]]
        ys = [transform.to_source(np.array(0.0), np.array(v * 128))[1] for v in row[1::2]]
        xs, ys = [float(v) for v in xs], [float(v) for v in ys]
        box = (xs[0], ys[0], xs[1], ys[1])
        result.append((score, box, list(zip(xs[2:], ys[2:], strict=True))))
    return counted, result


def scene(seed: int, faces: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Real regressors and logits: a few faces on neighbouring anchors, the rest low
    (or, with much noise, hundreds over the threshold)."""
    rng = np.random.default_rng(seed)
    regs = rng.normal(0, 3, (1, 896, 16))
    logits = rng.normal(-6, noise, (1, 896, 1))
    for _ in range(faces):
        j = int(rng.integers(0, 890))
        n = int(rng.integers(1, 6))
        logits[0, j : j + n, 0] = rng.uniform(-1, 5, n)
        regs[0, j : j + n, 2:4] = rng.uniform(10, 60, 2)
    return regs.astype(np.float32), logits.astype(np.float32)


def close(d: Detection, score: float, box: tuple[float, ...], points: list) -> bool:
    # Scores and coordinates go through different (but exact) arithmetic here: they may
    # round the other way at a tie, never further.
    return (
        abs(d.score - score) <= 1.1e-5
        and all(abs(u - v) <= 0.051 for u, v in zip(d.box, box, strict=True))
        and d.keypoints is not None
        and [k.name for k in d.keypoints] == NAMES
        and all(
            abs(kp.x - x) <= 0.051 and abs(kp.y - y) <= 0.051
            for kp, (x, y) in zip(d.keypoints, points, strict=True)
        )
    )


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 2**32 - 1),
    faces=st.integers(0, 5),
    noise=st.sampled_from([0.5, 4.0]),
    threshold=st.sampled_from([0.0, 0.5, 0.75, 0.9]),
    dtype=st.sampled_from(["int8", "uint8", "float32"]),
    score_zero=st.integers(-40, 40),
    score_scale=st.sampled_from([0.03, 0.1, 0.25]),
)
def test_the_lean_decode_matches_a_straightforward_one(
    seed: int,
    faces: int,
    noise: float,
    threshold: float,
    dtype: str,
    score_zero: int,
    score_scale: float,
) -> None:
    regs, logits = scene(seed, faces, noise)
    # Anchors on min_score's logit (0) and a code either side: the threshold's edge.
    edge = np.random.default_rng(seed).choice(896, 3, replace=False)
    logits[0, edge, 0] = [-score_scale, 0.0, score_scale]
    if dtype == "float32":
        outputs = [
            TensorInfo("regressors", 0, (1, 896, 16), dtype, 0.0, 0),
            TensorInfo("classificators", 1, (1, 896, 1), dtype, 0.0, 0),
        ]
    else:
        shift = 128 if dtype == "uint8" else 0
        outputs = [
            TensorInfo("regressors", 0, (1, 896, 16), dtype, 0.5, shift),
            TensorInfo("classificators", 1, (1, 896, 1), dtype, score_scale, score_zero + shift),
        ]
    codes = [outputs[0].quantize(regs), outputs[1].quantize(logits)]
    detector = AnchorsDetector(SPEC, outputs, ["face"], (128, 128), threshold)
    out = detector(codes, FrameContext(transform=TRANSFORM))
    counted, expected = reference(SPEC, outputs, codes, threshold, TRANSFORM)

    assert out.scores is not None
    np.testing.assert_allclose(out.scores, np.array(counted, np.float32), rtol=1e-6)
    assert out.detections is not None and len(out.detections) == len(expected)
    for d, (score, box, points) in zip(out.detections, expected, strict=True):
        assert (d.index, d.label) == (0, "face")
        assert close(d, score, box, points), (d, score, box, points)


def test_a_new_transform_maps_the_next_frames() -> None:
    """The decoder keeps the frames' mapping to the source while it stays the same: a
    different one (another camera mode) must be taken up at once."""
    regs, logits = scene(7, 1, 0.5)
    logits[0, 300, 0] = 4.0
    regs[0, 300, 2:4] = 30
    outputs = [
        TensorInfo("regressors", 0, (1, 896, 16), "float32", 0.0, 0),
        TensorInfo("classificators", 1, (1, 896, 1), "float32", 0.0, 0),
    ]
    detector = AnchorsDetector(SPEC, outputs, ["face"], (128, 128), 0.5)
    other = Transform(0.1, 0.1, 0, 0, 1280, 1280)
    for transform in (TRANSFORM, other, TRANSFORM):
        got = detector([regs, logits], FrameContext(transform=transform)).detections
        _, expected = reference(SPEC, outputs, [regs, logits], 0.5, transform)
        assert got is not None and len(got) == len(expected) > 0
        for d, (score, box, points) in zip(got, expected, strict=True):
            assert close(d, score, box, points)
