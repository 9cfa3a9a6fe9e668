"""Reference statistics of anchor-based detectors (``decoder: anchors``): the converter
counts, from the dequantised outputs, the same merged boxes' scores the agent's
``AnchorsDetector`` puts in ``Output.scores`` from the raw int8 codes, so a device
seeing the validation data measures no drift. And a converted face detector gets its
reference from ``edge-convert convert --val``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.loops.decoders.anchors import AnchorsDetector
from agent.loops.postprocess import FrameContext, summarise
from agent.models.anchors_boxes import anchors_candidate_scores
from agent.models.anchors_grid import anchor_outputs, generate_anchors
from agent.models.decoder_spec import AnchorsDecoder
from agent.models.health import OutputWindow, detect_reference
from agent.models.runtime import TensorInfo
from converter.errors import ConverterError
from converter.reference import reference_of

SPEC = AnchorsDecoder(type="anchors", strides=[8, 16, 16, 16], box_scale=128, keypoints=6)
INPUT = TensorInfo("image", 0, (1, 128, 128, 3), "int8", 1 / 255, -128)
REGS = TensorInfo("regressors", 1, (1, 896, 16), "int8", 0.5, 0)
SCORES = TensorInfo("classificators", 2, (1, 896, 1), "int8", 0.1, 0)


def frame(rng: np.random.Generator) -> list[np.ndarray]:
    """One frame's int8 codes: a few faces, each firing on 1-3 neighbouring anchors
    (overlapping boxes, merged by weighted NMS), the rest far below ``min_score``."""
    regs = rng.integers(-6, 6, (1, 896, 16)).astype(np.int8)
    scores = np.full((1, 896, 1), -80, np.int8)
    for _ in range(rng.integers(0, 4)):
        face = int(rng.integers(0, 894))
        for a in range(face, face + int(rng.integers(1, 4))):
            scores[0, a, 0] = rng.integers(-10, 60)  # logits -1..6: some under 0.5
            regs[0, a, 2:4] = rng.integers(40, 80, 2)  # boxes 20-40 px wide
    return [regs, scores]


def test_the_reference_counts_what_the_detector_counts() -> None:
    rng = np.random.default_rng(0)
    frames = [frame(rng) for _ in range(60)]
    detector = AnchorsDetector(SPEC, [REGS, SCORES], ["face"], (128, 128), threshold=0.8)
    pairs = anchor_outputs(SPEC, [REGS, SCORES], 128, 128)
    anchors = generate_anchors(SPEC, 128, 128).astype(np.float64)
    live = []
    for codes in frames:
        counted = detector(codes, FrameContext()).scores
        assert counted is not None
        real = [REGS.dequantize(codes[0])[0], SCORES.dequantize(codes[1])[0]]
        scores, classes = anchors_candidate_scores(SPEC, pairs, anchors, real)
        np.testing.assert_allclose(np.sort(scores), np.sort(counted), rtol=1e-6)
        assert (classes == 0).all()
        live.append(counted)
    assert sum(s.size for s in live) > 20  # faces were found, some merged
    values = [
        np.concatenate([REGS.dequantize(f[0]) for f in frames]),
        np.concatenate([SCORES.dequantize(f[1]) for f in frames]),
    ]
    ref = reference_of("detect", [REGS, SCORES], values, SPEC, inputs=[INPUT], labels=["face"])
    assert ref is not None and ref.detect is not None and ref.samples == 60
    zeros = [np.zeros(s.size, np.int64) for s in live]
    assert ref.detect == detect_reference(zeros, live, threshold=SPEC.min_score)
    # The device on the same frames: no drift.
    window = OutputWindow(ref, size=100, min_frames=10)
    for codes in frames:
        summarise(window, detector(codes, FrameContext()))
    figures = window.figures()
    assert figures.distance is not None and figures.distance < 0.01


def test_outputs_that_do_not_fit_the_anchors_are_named() -> None:
    values = [np.zeros((2, 896, 16)), np.zeros((2, 800, 1))]
    short = TensorInfo("classificators", 2, (1, 800, 1), "int8", 0.1, 0)
    with pytest.raises(ConverterError, match=r"--decoder anchors: output 'classificators'"):
        reference_of("detect", [REGS, short], values, SPEC, inputs=[INPUT])


@pytest.mark.slow
@pytest.mark.workstation
def test_convert_with_val_records_the_face_detectors_reference(tmp_path: Path) -> None:
    from agent.models.manifest import Preprocess, read_bundle
    from converter.pipeline import ConvertOptions, run_convert
    from tests.test_decoders_anchors_e2e import DECODER, FACE_LOGIT, build_face_model

    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(1)
    np.savez(calib, x=rng.integers(0, 256, (12, 128, 128, 3)).astype(np.uint8))
    labels = tmp_path / "labels.txt"
    labels.write_text("face\n")
    run_convert(
        ConvertOptions(
            model=build_face_model(tmp_path / "face.keras"), out=tmp_path / "bundle",
            calib=calib, val=calib, samples=12, task="detect", labels=labels,
            decoder=DECODER, preprocess=Preprocess(std=[255.0]), progress=False, golden=0,
        )
    )  # fmt: skip
    manifest = read_bundle(tmp_path / "bundle").manifest
    ref = manifest.reference
    assert ref is not None and ref.detect is not None and ref.samples == 12
    # One face per frame (the weak anchor is under min_score), at sigmoid(FACE_LOGIT).
    assert ref.detect.boxes_per_frame.freq[1] == 1.0
    face = 1 / (1 + np.exp(-FACE_LOGIT))
    assert ref.detect.score_quantiles["0"][3] == pytest.approx(face, abs=0.01)
