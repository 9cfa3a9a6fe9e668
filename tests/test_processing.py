"""Pre- and post-processing against known tensors."""

from __future__ import annotations

import numpy as np
import pytest

from agent.loops.decoders.ssd import SsdDetector as Detector
from agent.loops.frames import Frame
from agent.loops.postprocess import Classifier, FrameContext, PublishPolicy, RawOutputs
from agent.loops.preprocess import (
    ImagePreprocessor,
    PreprocessError,
    Transform,
    WindowPreprocessor,
    make_preprocessor,
)
from agent.loops.processing import Processing, preprocess_frame
from agent.loops.sources.audio import AUDIO_TIME
from agent.loops.sources.jpeg import SOURCE_SIZE
from agent.models.manifest import Preprocess
from agent.models.runtime import TensorInfo


def tensor(
    shape: tuple[int, ...], dtype: str = "int8", scale: float = 0.0, zp: int = 0
) -> TensorInfo:
    return TensorInfo("t", 0, shape, dtype, scale, zp)


def test_int8_lookup_matches_the_direct_formula() -> None:
    t = tensor((1, 4, 4, 3), "int8", scale=1 / 255 * 2, zp=-1)
    spec = Preprocess(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5], color="rgb")
    pre = ImagePreprocessor(t, spec)
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out, transform = pre(bgr)
    rgb = bgr[..., ::-1].astype(np.float64)
    expect = np.clip(np.round((rgb - 127.5) / 127.5 / t.scale + t.zero_point), -128, 127)
    assert out.dtype == np.int8 and out.shape == (1, 4, 4, 3)
    assert np.array_equal(out[0], expect.astype(np.int8))
    assert transform == Transform(1.0, 1.0, 0, 0, 4, 4)


def test_per_channel_normalisation_uses_a_table_per_channel() -> None:
    t = tensor((1, 4, 4, 3), "int8", scale=0.02, zp=3)
    mean, std = [100.0, 120.0, 140.0], [50.0, 60.0, 70.0]
    pre = ImagePreprocessor(t, Preprocess(mean=mean, std=std, color="bgr"))
    bgr = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out, _ = pre(bgr)
    x = (bgr.astype(np.float64) - np.array(mean)) / np.array(std)
    expect = np.clip(np.round(x / t.scale + t.zero_point), -128, 127).astype(np.int8)
    assert np.array_equal(out[0], expect)


def test_non_integer_shrink_is_anti_aliased() -> None:
    """A one-pixel checkerboard shrunk by 2.86 x 2.14 must come out flat grey: plain
    bilinear sampling of it gives stripes of black and white (aliasing)."""
    board = ((np.indices((480, 640)).sum(axis=0) % 2) * 255).astype(np.uint8)
    pre = ImagePreprocessor(tensor((1, 224, 224, 1), "uint8", 1.0, 0), Preprocess(color="gray"))
    out, _ = pre(board[..., None])
    assert abs(float(out.mean()) - 127.5) < 2
    assert int(out.min()) >= 120 and int(out.max()) <= 135


def test_float_input_and_bgr_order_and_nchw() -> None:
    t = tensor((1, 3, 2, 2), "float32")
    pre = ImagePreprocessor(t, Preprocess(mean=[0.0], std=[255.0], color="bgr", layout="NCHW"))
    img = np.zeros((2, 2, 3), np.uint8)
    img[..., 0] = 255  # blue
    out, _ = pre(img)
    assert out.dtype == np.float32
    assert np.allclose(out[0, 0], 1.0) and np.allclose(out[0, 1:], 0.0)


def test_color_to_gray_and_gray_to_color() -> None:
    gray_model = ImagePreprocessor(tensor((1, 2, 2, 1), "uint8", 1.0, 0), Preprocess(color="gray"))
    white = np.full((2, 2, 3), 255, np.uint8)
    assert gray_model(white)[0].reshape(-1).tolist() == [255, 255, 255, 255]
    rgb_model = ImagePreprocessor(tensor((1, 2, 2, 3), "uint8", 1.0, 0), Preprocess())
    out, _ = rgb_model(np.full((2, 2), 7, np.uint8))
    assert (out == 7).all()


def test_downscale_keeps_a_digit_readable() -> None:
    big = np.kron(np.arange(64, dtype=np.uint8).reshape(8, 8), np.ones((4, 4), np.uint8))
    pre = ImagePreprocessor(tensor((1, 8, 8, 1), "uint8", 1.0, 0), Preprocess(color="gray"))
    out, transform = pre(big[..., None])
    assert np.array_equal(out[0, ..., 0], np.arange(64).reshape(8, 8))
    assert transform.scale_x == 0.25


def test_letterbox_pads_and_maps_back() -> None:
    pre = ImagePreprocessor(tensor((1, 10, 10, 3), "uint8", 1.0, 0), Preprocess(), "letterbox")
    img = np.full((5, 10, 3), 200, np.uint8)  # wide: 10x5 -> 10x5 inside 10x10
    out, tr = pre(img)
    assert tr.scale_x == tr.scale_y == 1.0 and (tr.pad_x, tr.pad_y) == (0, 2)
    assert (out[0, :2] == 0).all() and (out[0, 2:7] == 200).all() and (out[0, 7:] == 0).all()
    x, y = tr.to_source(np.array([5.0]), np.array([4.5]))
    assert (float(x[0]), float(y[0])) == (5.0, 2.5)


@pytest.mark.parametrize(
    ("image", "words"),
    [(np.zeros((4, 4), np.float32), "8-bit image"), (np.zeros((2, 2, 2, 2), np.uint8), "8-bit")],
)
def test_bad_frames_are_refused(image: np.ndarray, words: str) -> None:
    pre = ImagePreprocessor(tensor((1, 4, 4, 3), "uint8", 1.0, 0), Preprocess())
    with pytest.raises(PreprocessError, match=words):
        pre(image)


def test_window_quantised_and_reshaped() -> None:
    t = tensor((1, 12), "int8", scale=0.1, zp=0)
    pre = make_preprocessor(t, Preprocess(mean=[1.0], std=[2.0], layout="NC"))
    assert isinstance(pre, WindowPreprocessor)
    window = np.arange(12, dtype=np.float32).reshape(4, 3)
    out, _ = pre(window)
    assert out.shape == (1, 12) and out.dtype == np.int8
    assert (
        out.reshape(-1).tolist()
        == np.clip(np.round((np.arange(12) - 1) / 2 / 0.1), -128, 127).tolist()
    )
    with pytest.raises(PreprocessError, match="does not fit input"):
        pre(np.zeros((5, 3), np.float32))


def test_classify_softmaxes_logits_and_uses_labels() -> None:
    out_t = tensor((1, 4), "int8", scale=0.5, zp=0)
    labels = ["cat", "dog", "eel", "fox"]
    clf = Classifier([out_t], labels, top_k=2)
    logits = np.array([[0, 8, 2, -4]], np.int8)  # dequantised: 0, 4, 1, -2
    result = clf([logits], FrameContext())
    assert result.classes is not None
    assert [c.label for c in result.classes] == ["dog", "eel"]
    expect = np.exp([4.0, 1.0]) / np.exp([0.0, 4.0, 1.0, -2.0]).sum()
    assert [c.score for c in result.classes] == pytest.approx(expect.tolist(), abs=1e-4)
    assert result.top == (1, pytest.approx(expect[0], abs=1e-4))


def test_classify_keeps_probabilities_and_applies_threshold() -> None:
    out_t = tensor((1, 3), "uint8", scale=1 / 256, zp=0)
    probs = np.array([[26, 204, 26]], np.uint8)  # ~0.1, 0.8, 0.1
    result = Classifier([out_t], None, top_k=3, threshold=0.5)([probs], FrameContext())
    assert result.classes is not None and len(result.classes) == 1
    assert result.classes[0].index == 1 and result.classes[0].score == pytest.approx(
        0.797, abs=1e-3
    )


def test_detect_maps_boxes_to_source_pixels() -> None:
    outs = [
        TensorInfo("boxes", 0, (1, 3, 4), "float32", 0.0, 0),
        TensorInfo("classes", 1, (1, 3), "float32", 0.0, 0),
        TensorInfo("scores", 2, (1, 3), "float32", 0.0, 0),
        TensorInfo("count", 3, (1,), "float32", 0.0, 0),
    ]
    boxes = np.array([[[0.2, 0.0, 0.8, 0.5], [0, 0, 1, 1], [0, 0, 0.1, 0.1]]], np.float32)
    classes = np.array([[1, 0, 1]], np.float32)
    scores = np.array([[0.9, 0.3, 0.7]], np.float32)
    count = np.array([2], np.float32)  # the third detection is past the count
    det = Detector(outs, ["bg", "person"], input_size=(10, 10), threshold=0.5)
    # Letterboxed 20x10 source into 10x10: scale 0.5, pad_y 2.5
    tr = Transform(0.5, 0.5, 0, 2.5, 20, 10)
    result = det([boxes, classes, scores, count], FrameContext(transform=tr))
    assert result.detections is not None and len(result.detections) == 1
    d = result.detections[0]
    assert (d.label, d.score) == ("person", 0.9)
    assert d.box == pytest.approx((0.0, 0.0, 10.0, 10.0))


def test_boxes_from_a_reduced_decode_land_in_full_source_pixels() -> None:
    outs = [
        TensorInfo("boxes", 0, (1, 2, 4), "float32", 0.0, 0),
        TensorInfo("classes", 1, (1, 2), "float32", 0.0, 0),
        TensorInfo("scores", 2, (1, 2), "float32", 0.0, 0),
        TensorInfo("count", 3, (1,), "float32", 0.0, 0),
    ]
    # A 640x480 camera decoded at 1/2 (320x240), stretched into a 160x160 model input.
    pre = ImagePreprocessor(tensor((1, 160, 160, 3), "uint8", 1.0, 0), Preprocess())
    _, transform = pre(np.zeros((240, 320, 3), np.uint8))
    transform = transform.for_source(640, 480)
    det = Detector(outs, None, input_size=(160, 160), threshold=0.5)
    boxes = np.array([[[0.25, 0.5, 0.75, 1.0], [0, 0, 1, 1]]], np.float32)  # y0 x0 y1 x1
    scores = np.array([[0.9, 0.1]], np.float32)
    out = det(
        [boxes, np.zeros((1, 2), np.float32), scores, np.ones(1, np.float32)],
        FrameContext(transform=transform),
    )
    assert out.detections is not None and len(out.detections) == 1
    assert out.detections[0].box == pytest.approx((320.0, 120.0, 640.0, 360.0))


def test_a_frame_is_preprocessed_with_the_context_its_post_processor_gets() -> None:
    """preprocess_frame hands on the frame's number, capture time, audio time and the
    transform to its full source size (a reduced decode), whatever the task."""
    pre = ImagePreprocessor(tensor((1, 16, 16, 3), "uint8", 1.0, 0), Preprocess(), "letterbox")
    proc = Processing("1", pre, Classifier([tensor((1, 3))], None), input_index=0)
    image = np.zeros((8, 16, 3), np.uint8)
    meta = {SOURCE_SIZE: (64, 32), AUDIO_TIME: 2.5}
    tensor_, frame = preprocess_frame(proc, Frame(7, 1795000000.25, image, meta))
    assert tensor_.shape == (1, 16, 16, 3)
    letterbox = pre(image)[1].for_source(64, 32)
    assert frame == FrameContext(7, 1795000000.25, letterbox, 2.5)
    assert frame.stream_s == 2.5  # the audio clock where there is one
    _, plain = preprocess_frame(proc, Frame(8, 1795000000.5, image))
    assert plain == FrameContext(8, 1795000000.5, pre(image)[1], None)
    assert plain.stream_s == 1795000000.5  # else the capture time


def test_detect_needs_four_outputs() -> None:
    with pytest.raises(ValueError, match="needs 4 outputs"):
        Detector([tensor((1, 3))], None, (10, 10))


def test_raw_outputs_dequantised() -> None:
    t = tensor((1, 2), "int8", scale=0.25, zp=2)
    [out] = RawOutputs([t])([np.array([[2, 6]], np.int8)], FrameContext()).raw or []
    assert (out.shape, out.values) == ([1, 2], [0.0, 1.0])


def test_publish_policies() -> None:
    from agent.loops.postprocess import Output
    from agent.protocol import ClassScore

    def out(i: int, s: float) -> Output:
        return Output(classes=[ClassScore(index=i, score=s)])

    now = [0.0]
    rate = PublishPolicy("rate", max_per_s=2, clock=lambda: now[0])
    decisions = []
    for t in [0.0, 0.1, 0.4, 0.5, 0.9, 1.0]:
        now[0] = t
        decisions.append(rate.should_publish(out(0, 0.5)))
    assert decisions == [True, False, False, True, False, True]

    change = PublishPolicy("change", score_delta=0.1)
    seq = [out(0, 0.5), out(0, 0.55), out(0, 0.7), out(1, 0.7), out(1, 0.65)]
    assert [change.should_publish(o) for o in seq] == [True, False, True, True, False]
    assert PublishPolicy("every").should_publish(out(0, 0.1))
