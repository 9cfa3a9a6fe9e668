"""The anchors decoder (BlazeFace / MediaPipe face detection kind) against hand-computed
grids, boxes and keypoints; weighted NMS; int8 codes against floats; the deploy check.

The converter-built model served on both runtimes and over MQTT by a real agent:
tests/test_decoders_anchors_e2e.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from agent.loops.decoders.anchors import AnchorsDetector
from agent.loops.postprocess import FrameContext
from agent.loops.preprocess import Transform
from agent.models.anchors_boxes import weighted_nms
from agent.models.anchors_grid import anchor_count, anchor_outputs, generate_anchors, group_counts
from agent.models.decoder_spec import AnchorsDecoder
from agent.models.manifest import Manifest
from agent.models.output_fit import OutputMismatch, check_outputs
from agent.models.runtime import TensorInfo

NAMES = ["right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear"]
BLAZE = AnchorsDecoder(
    type="anchors", strides=[8, 16, 16, 16], box_scale=128, keypoints=6, keypoint_names=NAMES
)
# Anchor 740: stride-16 group (from 512), cell 38 = row 4, column 6, centre (104, 72) px.
FACE = 740


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def floats(shape: tuple[int, ...], name: str, index: int) -> TensorInfo:
    return TensorInfo(name, index, shape, "float32", 0.0, 0)


FLOAT_OUTPUTS = [floats((1, 896, 16), "regressors", 0), floats((1, 896, 1), "classificators", 1)]


def blank() -> tuple[np.ndarray, np.ndarray]:
    regs = np.zeros((1, 896, 16), np.float32)
    scores = np.full((1, 896, 1), -8.0, np.float32)
    return regs, scores


# ------------------------------------------------------------------------- the grid


def test_the_grid_is_blazefaces_896_anchor_layout() -> None:
    anchors = generate_anchors(BLAZE, 128, 128)
    assert anchor_count(BLAZE, 128, 128) == 896 and anchors.shape == (896, 4)
    assert group_counts(BLAZE, 128, 128) == [512, 384]
    # Stride 8: 16 x 16 cells, 2 anchors each, row by row.
    assert anchors[0].tolist() == [0.03125, 0.03125, 1.0, 1.0]
    assert anchors[1].tolist() == [0.03125, 0.03125, 1.0, 1.0]
    assert anchors[2].tolist() == [0.09375, 0.03125, 1.0, 1.0]
    assert anchors[32].tolist() == [0.03125, 0.09375, 1.0, 1.0]
    assert anchors[511].tolist() == [0.96875, 0.96875, 1.0, 1.0]
    # The three stride-16 layers merged: 8 x 8 cells, 6 anchors each.
    assert np.all(anchors[512:518] == [0.0625, 0.0625, 1.0, 1.0])
    assert anchors[518].tolist() == [0.1875, 0.0625, 1.0, 1.0]
    assert anchors[FACE, :2].tolist() == [104 / 128, 72 / 128]
    assert anchors[-1].tolist() == [0.9375, 0.9375, 1.0, 1.0]


def test_feature_maps_round_up_and_only_consecutive_strides_merge() -> None:
    spec = AnchorsDecoder(type="anchors", strides=[8, 16, 8], anchors_per_cell=1, box_scale=100)
    # 100 x 60: ceil(12.5) x ceil(7.5) = 13 x 8, then 7 x 4, then 13 x 8 again.
    assert group_counts(spec, 100, 60) == [104, 28, 104]
    anchors = generate_anchors(spec, 100, 60)
    assert anchors.shape == (236, 4)
    assert anchors[103, :2] == pytest.approx([12.5 / 13, 7.5 / 8])
    assert anchors[104, :2] == pytest.approx([0.5 / 7, 0.5 / 4])


def test_keypoint_names_must_name_every_keypoint() -> None:
    with pytest.raises(ValidationError, match="keypoint_names has 2 names for 6 keypoints"):
        AnchorsDecoder(type="anchors", strides=[8], box_scale=128, keypoints=6,
                       keypoint_names=["a", "b"])  # fmt: skip


# ------------------------------------------------------------------------ decoding


def test_a_firing_anchor_decodes_to_hand_computed_box_and_keypoints() -> None:
    regs, scores = blank()
    regs[0, FACE, :4] = [-8, 0, 40, 20]  # centre (96, 72), 40 x 20
    regs[0, FACE, 4:] = [-10, 5, 0, 0, 10, -5, -4, 4, 4, 4, 0, 8]
    scores[0, FACE, 0] = 2.0
    scores[0, 3, 0] = -1.0  # 0.27: under min_score 0.5, never decoded
    detector = AnchorsDetector(BLAZE, FLOAT_OUTPUTS, ["face"], (128, 128), threshold=0.0)
    out = detector([regs, scores], FrameContext())
    assert out.detections is not None and len(out.detections) == 1
    (face,) = out.detections
    assert (face.index, face.label) == (0, "face")
    assert face.score == pytest.approx(sigmoid(2.0), abs=1e-5)
    assert face.box == (76.0, 62.0, 116.0, 82.0)
    assert face.keypoints is not None
    assert [(k.name, k.x, k.y) for k in face.keypoints] == [
        ("right_eye", 94.0, 77.0), ("left_eye", 104.0, 72.0), ("nose", 114.0, 67.0),
        ("mouth", 100.0, 76.0), ("right_ear", 108.0, 76.0), ("left_ear", 104.0, 80.0),
    ]  # fmt: skip
    assert out.scores is not None and out.scores.tolist() == pytest.approx([sigmoid(2.0)])

    # Letterboxed from a 256 x 128 source: scale 0.5, 32 rows of padding above.
    letterbox = Transform(0.5, 0.5, 0, 32, 256, 128)
    (placed,) = detector([regs, scores], FrameContext(transform=letterbox)).detections or []
    assert placed.box == (152.0, 60.0, 232.0, 100.0)
    assert placed.keypoints is not None
    assert (placed.keypoints[0].x, placed.keypoints[0].y) == (188.0, 90.0)


def test_scores_are_clipped_logits_and_the_pipeline_threshold_drops_more() -> None:
    regs, scores = blank()
    regs[0, :, 2:4] = 10
    scores[0, 0, 0] = 1000.0  # clipped at score_clip (100): 1.0, not an overflow
    scores[0, 500, 0] = 0.5  # 0.62
    low = AnchorsDetector(BLAZE, FLOAT_OUTPUTS, None, (128, 128), threshold=0.0)
    out = low([regs, scores], FrameContext())
    assert [d.score for d in out.detections or []] == [1.0, round(sigmoid(0.5), 5)]
    assert all(d.label is None for d in out.detections or [])
    high = AnchorsDetector(BLAZE, FLOAT_OUTPUTS, None, (128, 128), threshold=0.7)
    out = high([regs, scores], FrameContext())
    assert [d.score for d in out.detections or []] == [1.0]
    # Drift and shadow see the same boxes whatever the pipeline's threshold.
    assert out.scores is not None and len(out.scores) == 2
    regs, scores = blank()
    assert low([regs, scores], FrameContext()).detections == []


def test_weighted_nms_averages_overlapping_boxes_by_score() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10.5]], float)
    scores = np.array([0.9, 0.6, 0.8, 0.3])
    points = boxes[:, None, :2].copy()
    # IoU(A, B) = 81 / 119 = 0.68; D inside A too. C stands alone.
    lead, merged, merged_points = weighted_nms(boxes, scores, 0.3, 10, points)
    assert lead.tolist() == [0, 2]
    w = np.array([0.9, 0.6, 0.3]) / 1.8
    expect = w @ boxes[[0, 1, 3]]
    assert merged[0] == pytest.approx(expect)
    assert merged[0] == pytest.approx([0.3333333, 0.3333333, 10.3333333, 10.4166667])
    assert merged[1].tolist() == [50, 50, 60, 60]
    assert merged_points is not None and merged_points[0, 0] == pytest.approx(expect[:2])
    # Above the overlap threshold nothing merges; max_detections stops early.
    lead, _, _ = weighted_nms(boxes, scores, 0.99, 10)
    assert lead.tolist() == [0, 2, 1, 3]
    lead, merged, none = weighted_nms(boxes, scores, 0.3, 1)
    assert lead.tolist() == [0] and none is None and merged.shape == (1, 4)


def test_two_anchors_on_one_face_merge_into_one_detection() -> None:
    regs, scores = blank()
    regs[0, FACE, :4] = [-8, 0, 40, 20]
    regs[0, FACE + 1, :4] = [0, 0, 40, 20]  # same cell: IoU 0.67
    regs[0, FACE + 1, 4:6] = [8, 8]
    scores[0, FACE, 0], scores[0, FACE + 1, 0] = 4.0, 2.0
    out = AnchorsDetector(BLAZE, FLOAT_OUTPUTS, ["face"], (128, 128))(
        [regs, scores], FrameContext()
    )
    (face,) = out.detections or []
    a, b = sigmoid(4.0), sigmoid(2.0)
    x = (a * 96 + b * 104) / (a + b)
    assert face.score == pytest.approx(a, abs=1e-5)
    assert face.box == pytest.approx((x - 20, 62, x + 20, 82), abs=0.05)
    assert face.keypoints is not None
    assert face.keypoints[0].x == pytest.approx((a * 104 + b * 112) / (a + b), abs=0.05)


def quantised(values: np.ndarray, t: TensorInfo) -> np.ndarray:
    return t.quantize(values)


def test_int8_codes_decode_as_their_dequantised_floats() -> None:
    rng = np.random.default_rng(3)
    regs = rng.normal(0, 12, (1, 896, 16)).astype(np.float32)
    logits = rng.normal(-2, 2.5, (1, 896, 1)).astype(np.float32)
    q_regs = TensorInfo("regressors", 0, (1, 896, 16), "int8", 0.25, 3)
    q_scores = TensorInfo("classificators", 1, (1, 896, 1), "int8", 0.07, -20)
    codes = [quantised(regs, q_regs), quantised(logits, q_scores)]
    dequantised = [q_regs.dequantize(codes[0]), q_scores.dequantize(codes[1])]
    for threshold in (0.0, 0.6, 0.9):
        q = AnchorsDetector(BLAZE, [q_regs, q_scores], ["face"], (128, 128), threshold)
        f = AnchorsDetector(BLAZE, FLOAT_OUTPUTS, ["face"], (128, 128), threshold)
        frame = FrameContext(transform=Transform(0.25, 0.25, 0, 16, 512, 384))
        q_out, f_out = q(codes, frame), f(dequantised, frame)
        assert q_out.detections and q_out.detections == f_out.detections
        assert q_out.scores is not None and f_out.scores is not None
        assert np.array_equal(q_out.scores, f_out.scores)
    # The threshold's code: a score at exactly min_score's logit counts, one code under not.
    edge = np.full((1, 896, 1), -128, np.int8)
    edge[0, 7, 0] = 20  # (20 + 20) * 0.07 = 2.8 -> 0.943
    edge[0, 9, 0] = -20  # 0.0 -> 0.5 exactly: counts
    edge[0, 11, 0] = -21  # -0.07 -> 0.4825: does not
    q = AnchorsDetector(BLAZE, [q_regs, q_scores], None, (128, 128))
    scores = q([codes[0], edge], FrameContext()).scores
    assert scores is not None and scores.tolist() == pytest.approx([0.94268, 0.5], abs=1e-5)


def test_outputs_split_by_stride_decode_as_one_pair() -> None:
    regs, scores = blank()
    regs[0, FACE, :4] = [-8, 0, 40, 20]
    regs[0, 40, :4] = [0, 0, 30, 30]
    scores[0, FACE, 0], scores[0, 40, 0] = 2.0, 3.0
    split = [
        floats((1, 384, 1), "scores_16", 0), floats((1, 512, 16), "regressors_8", 1),
        floats((1, 512, 1), "scores_8", 2), floats((1, 384, 16), "regressors_16", 3),
    ]  # fmt: skip
    pairs = anchor_outputs(BLAZE, split, 128, 128)
    assert [(p.regressors, p.scores, p.offset, p.count) for p in pairs] == [
        (1, 2, 0, 512), (3, 0, 512, 384)
    ]  # fmt: skip
    values = [scores[:, 512:], regs[:, :512], scores[:, :512], regs[:, 512:]]
    whole = AnchorsDetector(BLAZE, FLOAT_OUTPUTS, None, (128, 128))([regs, scores], FrameContext())
    parts = AnchorsDetector(BLAZE, split, None, (128, 128))(values, FrameContext())
    assert parts.detections == whole.detections and len(whole.detections or []) == 2


def test_multi_class_scores_take_each_anchors_best_class() -> None:
    regs, _ = blank()
    scores = np.full((1, 896, 3), -8.0, np.float32)
    regs[0, FACE, 2:4] = 20
    scores[0, FACE] = [0.0, 3.0, 1.0]
    outputs = [FLOAT_OUTPUTS[0], floats((1, 896, 3), "scores", 1)]
    labels = ["cat", "dog", "bird"]
    out = AnchorsDetector(BLAZE, outputs, labels, (128, 128))([regs, scores], FrameContext())
    (d,) = out.detections or []
    assert (d.index, d.label, d.score) == (1, "dog", round(sigmoid(3.0), 5))


# ------------------------------------------------------------------------ the check


def manifest(outputs: list[tuple[str, list[int]]], **decoder: object) -> Manifest:
    spec = {"type": "anchors", "strides": [8, 16, 16, 16], "box_scale": 128, "keypoints": 6,
            **decoder}  # fmt: skip
    return Manifest.model_validate(
        {
            "name": "face", "version": "1", "created_at": "2025-01-01T00:00:00Z",
            "task": "detect", "quantization": "int8",
            "model": {"sha256": "0" * 64, "size": 1},
            "inputs": [{"name": "input", "shape": [1, 128, 128, 3], "dtype": "int8"}],
            "outputs": [{"name": n, "shape": s, "dtype": "int8"} for n, s in outputs],
            "labels": ["face"], "decoder": spec, "producer": {"converter": "test"},
        }
    )  # fmt: skip


def test_the_deploy_check_takes_fitting_outputs() -> None:
    check_outputs(manifest([("regressors", [1, 896, 16]), ("classificators", [1, 896, 1])]))
    check_outputs(manifest([("classificators", [1, 896, 1]), ("regressors", [1, 896, 18])]))
    check_outputs(manifest([("r", [896, 16]), ("s", [896, 1])]))
    check_outputs(manifest([("r8", [1, 512, 16]), ("r16", [1, 384, 16]),
                            ("s16", [1, 384, 1]), ("s8", [1, 512, 1])]))  # fmt: skip


@pytest.mark.parametrize(
    ("outputs", "decoder", "message"),
    [
        (
            [("regressors", [1, 896, 16]), ("classificators", [1, 896, 1])],
            {"strides": [8, 16, 16]},
            "output 'regressors' [1, 896, 16]: expected [1, 768, >=16] (the anchors of "
            "strides [8, 16, 16], 2 per cell, at input 128x128)",
        ),
        (
            [("regressors", [1, 896, 16]), ("classificators", [1, 900, 1])],
            {},
            "output 'classificators' [1, 900, 1]: expected [1, 896, 1]",
        ),
        (
            [("regressors", [1, 896, 12]), ("classificators", [1, 896, 1])],
            {},
            "output 'regressors' [1, 896, 12]: neither regressors [1, N, >=16] "
            "(4 + 2 x 6 keypoints) nor scores [1, N, 1]",
        ),
        (
            [("regressors", [1, 896, 16])],
            {},
            "the anchors decoder needs 2 outputs, regressors [1, 896, >=16] and scores "
            "[1, 896, 1], this model has 1 regressors and 0 scores outputs",
        ),
        (
            [("r8", [1, 512, 16]), ("r16", [1, 384, 16]), ("s16", [1, 384, 1]),
             ("s8", [1, 500, 1])],
            {},
            "no output scores [1, 512, 1] for the stride 8 anchors",
        ),
        (
            [("regressors", [2, 896, 16]), ("classificators", [1, 896, 1])],
            {},
            "output 'regressors' [2, 896, 16]: expected [1, 896, W]",
        ),
    ],
)  # fmt: skip
def test_the_deploy_check_names_the_tensor_and_the_shape_expected(
    outputs: list[tuple[str, list[int]]], decoder: dict[str, object], message: str
) -> None:
    with pytest.raises(OutputMismatch) as err:
        check_outputs(manifest(outputs, **decoder))
    assert message in str(err.value) and "\n" not in str(err.value)
    # The decoder refuses the same outputs when built.
    m = manifest(outputs, **decoder)
    assert isinstance(m.decoder, AnchorsDecoder)
    infos = [TensorInfo(t.name, i, tuple(t.shape), "int8", 0.1, 0) for i, t in enumerate(m.outputs)]
    with pytest.raises(ValueError):
        AnchorsDetector(m.decoder, infos, m.labels, (128, 128))
