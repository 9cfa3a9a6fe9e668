"""YOLO heads: the decoders on hand-built arrays, then tiny Keras models with a v8 and a
v5 head whose outputs are known (a constant, set by hand), converted to int8 by the
project's converter and decoded on both runtimes, refused at the converter and at
deploy when their labels do not fit, and served end to end by an agent over MQTT."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agent.loops.decoders import SsdDetector, YoloDetector, make_detector
from agent.loops.decoders.nms import iou_one_to_many, nms
from agent.loops.postprocess import FrameContext
from agent.loops.preprocess import Transform, make_preprocessor
from agent.models import runtime as rt
from agent.models.decoder_spec import YoloDecoder
from agent.models.detect_layout import suggest_decoder, suggest_task, yolo_candidate_scores
from agent.models.manifest import Manifest, Preprocess, TensorSpec, parse_manifest, read_bundle
from agent.models.output_fit import OutputMismatch, check_outputs
from agent.models.runtime import TensorInfo
from agent.protocol import ReplyCode, Result
from converter.errors import ConverterError
from tests.device_venv import DEVICE_RUNTIMES

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["cat", "dog", "bird"]
SIZE = 32  # model input, pixels

# The known head: (cx, cy, w, h as fractions of the input, objectness, class, score).
# 0 and 1 overlap (same class: 1 goes); 2 is 0's box in another class (kept per class,
# gone class-agnostic); 3 stands alone; 4 is below the 0.5 threshold but above the
# drift floor (0.25); the rest are empty.
CANDIDATES = [
    (0.25, 0.25, 0.25, 0.25, 0.9, 0, 1.0),
    (0.27, 0.25, 0.25, 0.25, 0.8, 0, 1.0),
    (0.25, 0.25, 0.25, 0.25, 0.7, 1, 1.0),
    (0.75, 0.60, 0.30, 0.40, 0.8, 2, 0.75),
    (0.50, 0.50, 0.10, 0.10, 0.3, 1, 1.0),
]
N = 32
C = len(LABELS)
# Expected after NMS per class at 0.5: (class, score, box x0, y0, x1, y1 in input pixels).
EXPECTED = [
    (0, 0.9, (4.0, 4.0, 12.0, 12.0)),
    (1, 0.7, (4.0, 4.0, 12.0, 12.0)),
    (2, 0.6, (19.2, 12.8, 28.8, 25.6)),
]


def head(kind: str, scale: float = 1.0) -> np.ndarray:
    """The known head's output, float32, in ``kind``'s layout (boxes times ``scale``)."""
    rows = np.zeros((N, 5 + C), np.float32)
    for i, (cx, cy, w, h, obj, cls, score) in enumerate(CANDIDATES):
        rows[i, :4] = np.array([cx, cy, w, h]) * scale
        if kind == "yolov5":
            rows[i, 4] = obj
            rows[i, 5 + cls] = score
        else:
            rows[i, 5 + cls] = obj * score
    if kind == "yolov5":
        return rows[None]
    return np.concatenate([rows[:, :4], rows[:, 5:]], axis=1).T[None].copy()


def info(
    shape: tuple[int, ...], dtype: str = "float32", scale: float = 0.0, zp: int = 0
) -> TensorInfo:
    return TensorInfo("Identity", 0, shape, dtype, scale, zp)


def boxes_of(output: Any) -> list[tuple[int, float, tuple[float, ...]]]:
    return sorted((d.index, d.score, d.box) for d in output.detections)


def assert_expected(found: list[Any], expected: list[Any], tol: float = 0.5) -> None:
    assert [f[0] for f in found] == [e[0] for e in expected]
    for (_, score, box), (_, want_score, want_box) in zip(found, expected, strict=True):
        assert score == pytest.approx(want_score, abs=0.01)
        assert np.allclose(box, want_box, atol=tol), (box, want_box)


# ----------------------------------------------------------------- hand-built arrays


@pytest.mark.parametrize("kind", ["yolov5", "yolov8"])
def test_float_heads_decode_to_the_hand_computed_boxes(kind: str) -> None:
    x = head(kind)
    det = YoloDetector(YoloDecoder(type=kind), [info(x.shape)], LABELS, (SIZE, SIZE), 0.5)
    out = det([x], FrameContext())
    assert_expected(boxes_of(out), EXPECTED, tol=0.01)
    assert [d.label for d in sorted(out.detections, key=lambda d: d.index)] == LABELS
    # Drift sees every candidate from the floor (0.25) up, before suppression.
    assert out.scores is not None
    assert np.allclose(np.sort(out.scores), [0.3, 0.6, 0.7, 0.8, 0.9])


@pytest.mark.parametrize("kind", ["yolov5", "yolov8"])
def test_pixel_boxes_are_recognised_and_normalized_can_be_forced(kind: str) -> None:
    x = head(kind, scale=SIZE)
    det = YoloDetector(YoloDecoder(type=kind), [info(x.shape)], None, (SIZE, SIZE), 0.5)
    assert_expected(boxes_of(det([x], FrameContext())), EXPECTED, tol=0.01)
    forced = YoloDetector(
        YoloDecoder(type=kind, normalized=False), [info(x.shape)], None, (SIZE, SIZE), 0.5
    )
    assert_expected(boxes_of(forced([x], FrameContext())), EXPECTED, tol=0.01)
    tiny = forced([head(kind)], FrameContext())  # fractions read as pixels: sub-pixel boxes
    assert max(d.box[2] for d in tiny.detections) < 1.0


def test_class_agnostic_nms_suppresses_across_classes() -> None:
    x = head("yolov8")
    spec = YoloDecoder(type="yolov8", class_agnostic=True)
    out = YoloDetector(spec, [info(x.shape)], None, (SIZE, SIZE), 0.5)([x], FrameContext())
    assert_expected(boxes_of(out), [EXPECTED[0], EXPECTED[2]], tol=0.01)
    capped = YoloDetector(
        YoloDecoder(type="yolov8", max_detections=1), [info(x.shape)], None, (SIZE, SIZE), 0.5
    )([x], FrameContext())
    assert boxes_of(capped) == boxes_of(out)[:1]


def test_threshold_decides_what_is_a_detection() -> None:
    x = head("yolov8")
    for threshold, count in ((0.95, 0), (0.65, 2), (0.5, 3), (0.25, 4)):
        det = YoloDetector(YoloDecoder(type="yolov8"), [info(x.shape)], None, (32, 32), threshold)
        assert len(det([x], FrameContext()).detections or []) == count, threshold
    # The pipeline's default threshold 0 means the drift floor: not every candidate.
    default = YoloDetector(YoloDecoder(type="yolov8"), [info(x.shape)], None, (32, 32), 0.0)
    assert len(default([x], FrameContext()).detections or []) == 4


@pytest.mark.parametrize("kind", ["yolov5", "yolov8"])
def test_int8_codes_path_equals_the_float_path(kind: str) -> None:
    scale, zp = 1 / 255, -128
    x = head(kind)
    codes = np.clip(np.round(x / scale + zp), -128, 127).astype(np.int8)
    q = info(x.shape, "int8", scale, zp)
    quantised = YoloDetector(YoloDecoder(type=kind), [q], LABELS, (SIZE, SIZE), 0.5)
    floats = YoloDetector(YoloDecoder(type=kind), [info(x.shape)], LABELS, (SIZE, SIZE), 0.5)
    a, b = quantised([codes], FrameContext()), floats([q.dequantize(codes)], FrameContext())
    assert a.detections == b.detections
    assert a.scores is not None and b.scores is not None
    assert np.allclose(np.sort(a.scores), np.sort(b.scores))
    # The threshold quantised to a code: a score exactly at it passes, one step below not.
    assert quantised._floor_code == np.ceil(0.25 / scale + zp)


def test_letterbox_is_undone_into_source_pixels() -> None:
    # A 64x32 source letterboxed into 32x32: scale 0.5, 8 pixels of padding above.
    transform = Transform(0.5, 0.5, 0.0, 8.0, 64, 32)
    x = head("yolov8")
    out = YoloDetector(YoloDecoder(type="yolov8"), [info(x.shape)], None, (SIZE, SIZE), 0.5)(
        [x], FrameContext(transform=transform)
    )
    want = [
        (k, s, ((b[0] - 0) / 0.5, (b[1] - 8) / 0.5, (b[2] - 0) / 0.5, (b[3] - 8) / 0.5))
        for k, s, b in EXPECTED
    ]
    want = [(k, s, tuple(float(np.clip(v, 0, 64 if i % 2 == 0 else 32)) for i, v in enumerate(b)))
            for k, s, b in want]  # fmt: skip
    assert_expected(boxes_of(out), want, tol=0.01)


def test_nms_helpers() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    assert np.allclose(iou_one_to_many(boxes[0], boxes), [1.0, 1.0, 1 / 3, 0.0])
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, np.array([0, 1, 0, 0]), iou=0.5).tolist() == [0, 1, 2, 3]
    assert nms(boxes, scores, np.array([0, 1, 0, 0]), iou=0.3).tolist() == [0, 1, 3]
    assert nms(boxes, scores, np.array([0, 1, 0, 0]), iou=0.5, class_agnostic=True).tolist() == [
        0,
        2,
        3,
    ]
    assert nms(boxes[:0], scores[:0]).size == 0


def test_layouts_are_suggested_only_when_unambiguous() -> None:
    def spec(*shapes: tuple[int, ...]) -> list[TensorSpec]:
        return [
            TensorSpec(name=f"t{i}", shape=list(s), dtype="float32") for i, s in enumerate(shapes)
        ]

    assert suggest_decoder(spec((1, 84, 2100))) == "yolov8"
    assert suggest_decoder(spec((1, 25200, 85))) == "yolov5"
    assert suggest_decoder(spec((1, 10, 10))) is None
    assert suggest_decoder(spec((1, 10, 4), (1, 10), (1, 10), (1,))) == "ssd"
    assert suggest_decoder(spec((1, 1001))) is None
    assert suggest_task(spec((1, 84, 2100))) == ("detect", "yolov8", "80 classes, 2100 candidates")
    assert suggest_task(spec((1, 1001))) == ("classify", None, "1001 classes")
    scores, classes = yolo_candidate_scores("yolov5", head("yolov5")[0], 0.25)
    assert np.allclose(np.sort(scores), [0.3, 0.6, 0.7, 0.8, 0.9])
    assert sorted(classes.tolist()) == [0, 0, 1, 1, 2]


def test_output_checks_name_the_tensor_and_the_shape() -> None:
    def manifest(kind: str, shape: list[int], labels: list[str] | None) -> Manifest:
        return parse_manifest(
            {
                "name": "m", "version": "1", "created_at": "2024-01-01T00:00:00Z",
                "task": "detect", "quantization": "int8", "decoder": {"type": kind},
                "model": {"sha256": "0" * 64, "size": 1},
                "inputs": [{"name": "in", "shape": [1, 32, 32, 3], "dtype": "int8"}],
                "outputs": [{"name": "Identity", "shape": shape, "dtype": "int8"}],
                "labels": labels, "producer": {"converter": "test"},
            }
        )  # fmt: skip

    check_outputs(manifest("yolov8", [1, 7, 32], LABELS))
    check_outputs(manifest("yolov5", [1, 32, 8], LABELS))
    with pytest.raises(OutputMismatch, match=r"'Identity' int8\[1, 7, 32\] has 3 classes but "
                       r"there are 2 labels: expected \[1, 4 \+ 2, N\]"):  # fmt: skip
        check_outputs(manifest("yolov8", [1, 7, 32], LABELS[:2]))
    with pytest.raises(OutputMismatch, match=r"'Identity' int8\[1, 32\] is not a yolov5 head"):
        check_outputs(manifest("yolov5", [1, 32], None))


def test_make_detector_picks_by_decoder() -> None:
    base = {
        "name": "m", "version": "1", "created_at": "2024-01-01T00:00:00Z", "task": "detect",
        "quantization": "none", "model": {"sha256": "0" * 64, "size": 1},
        "inputs": [{"name": "in", "shape": [1, 32, 32, 3], "dtype": "float32"}],
        "outputs": [{"name": "Identity", "shape": [1, 7, 32], "dtype": "float32"}],
        "producer": {"converter": "test"},
    }  # fmt: skip
    outs = [info((1, 7, 32))]
    yolo = make_detector(
        parse_manifest({**base, "decoder": {"type": "yolov8"}}), outs, None, (32, 32), 0.5
    )
    assert isinstance(yolo, YoloDetector)
    ssd_outs = [info((1, 10, 4)), info((1, 10)), info((1, 10)), info((1,))]
    assert isinstance(
        make_detector(parse_manifest(base), ssd_outs, None, (32, 32), 0.5), SsdDetector
    )
    with pytest.raises(ValueError, match=r"yolov5 decoder needs one output \[1, N, 5 \+ C\]"):
        make_detector(
            parse_manifest({**base, "decoder": {"type": "yolov5"}}),
            outs[:1] * 2,
            None,
            (32, 32),
            0.5,
        )


# ------------------------------------------------------------- real converted models


def _build_keras(kind: str, path: Path) -> None:
    """A tiny Keras model whose output is the known head whatever the image: the
    image's channel means through a kernel too small to show in int8, plus the head
    as the bias."""
    import tensorflow as tf

    target = head(kind)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((SIZE, SIZE, 3)),
            tf.keras.layers.GlobalAveragePooling2D(),
            tf.keras.layers.Dense(target.size),
            tf.keras.layers.Reshape(target.shape[1:]),
        ]
    )
    dense = model.layers[1]
    kernel = np.full((3, target.size), 1e-4, np.float32)
    dense.set_weights([kernel, target.reshape(-1)])
    model.save(path)


_bundles: dict[tuple[str, tuple[str, ...]], Path] = {}


def yolo_bundle(workdir: Path, kind: str, labels: list[str] = LABELS) -> Path:
    """The known head converted to int8 by the project's converter (once per session)."""
    key = (kind, tuple(labels))
    if key in _bundles:
        return _bundles[key]
    from converter.pipeline import ConvertOptions, run_convert

    keras = workdir / f"{kind}.keras"
    _build_keras(kind, keras)
    rng = np.random.default_rng(0)
    calib = workdir / f"{kind}-calib.npy"
    np.save(calib, rng.random((16, SIZE, SIZE, 3), dtype=np.float32) * 255)
    labels_file = workdir / f"{kind}-{len(labels)}-labels.txt"
    labels_file.write_text("\n".join(labels) + "\n")
    out = workdir / f"{kind}-{len(labels)}-bundle"
    run_convert(
        ConvertOptions(
            model=keras, out=out, calib=calib, val=calib, samples=16, task="detect",
            labels=labels_file, name=f"yolo-{kind[-2:]}", preprocess=_preprocess(),
            progress=False, max_drop=1.0,
        )
    )  # fmt: skip
    _bundles[key] = out
    return out


def _preprocess() -> Preprocess:
    return Preprocess(std=[255.0])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("yolo")


@pytest.mark.slow
@pytest.mark.workstation
@pytest.mark.parametrize("runtime", DEVICE_RUNTIMES)
@pytest.mark.parametrize("kind", ["yolov5", "yolov8"])
def test_converted_int8_heads_decode_on_both_runtimes(
    workdir: Path, kind: str, runtime: str
) -> None:
    bundle = yolo_bundle(workdir, kind)
    manifest = read_bundle(bundle).manifest
    # Recognised from the outputs, written into the manifest, reference kept for drift.
    assert manifest.decoder == YoloDecoder(type=kind)
    assert manifest.outputs[0].dtype == "int8"
    assert manifest.reference is not None and manifest.reference.detect is not None
    model = rt.load_model(
        bundle / "model.tflite", runtime=rt.select_runtime(runtime), num_threads=1
    )
    assert model.runtime.name == runtime
    pre = make_preprocessor(model.inputs[0], manifest.preprocess)
    frame = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    tensor, transform = pre(frame)
    model.interpreter.set_tensor(model.inputs[0].index, tensor)
    model.interpreter.invoke()
    raw = model.interpreter.get_tensor(model.outputs[0].index)
    assert raw.dtype == np.int8
    det = make_detector(manifest, model.outputs, manifest.labels, (SIZE, SIZE), 0.5)
    out = det([raw], FrameContext(transform=transform))
    # Stretched from 64x48 into 32x32: x doubles, y times 1.5.
    want = [(k, s, (b[0] * 2, b[1] * 1.5, b[2] * 2, b[3] * 1.5)) for k, s, b in EXPECTED]
    assert_expected(boxes_of(out), want, tol=1.0)
    assert [d.label for d in sorted(out.detections or [], key=lambda d: d.index)] == LABELS


@pytest.mark.slow
@pytest.mark.workstation
def test_labels_that_do_not_fit_the_head_are_refused_at_the_converter_and_at_deploy(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.models.validate import ValidationFailed, Validator

    with pytest.raises(ConverterError, match=r"output '[^']+' int8\[1, 7, 32\] has 3 classes but "
                       r"there are 4 labels: expected \[1, 4 \+ 4, N\]"):  # fmt: skip
        yolo_bundle(workdir, "yolov8", [*LABELS, "fish"])
    assert not (workdir / "yolov8-4-bundle").exists()
    # A bundle made elsewhere that says so anyway: refused before it swaps in.
    bundle = read_bundle(yolo_bundle(workdir, "yolov8"))
    lying = parse_manifest({**bundle.manifest_data, "labels": [*LABELS, "fish"]})
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    with pytest.raises(ValidationFailed) as info:
        Validator(timeout_s=60).validate(bundle.model_path, lying)
    assert info.value.code == ReplyCode.INCOMPATIBLE
    name = bundle.manifest.outputs[0].name
    assert f"{name!r} int8[1, 7, 32] has 3 classes but there are 4 labels" in info.value.message


@pytest.mark.slow
@pytest.mark.workstation
def test_cli_bundle_decoder_options_and_inspect_suggestion(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from converter.cli import main

    model = yolo_bundle(workdir, "yolov8") / "model.tflite"
    assert main(["inspect", str(model)]) == 0
    assert "suggested: --task detect --decoder yolov8 (3 classes, 32 candidates)" in (
        capsys.readouterr().out
    )
    out = workdir / "cli-bundle"
    argv = ["bundle", str(model), "-o", str(out), "--task", "detect", "--decoder", "yolov8",
            "--iou", "0.6", "--max-detections", "5", "--class-agnostic", "--json"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    decoder = json.loads((out / "manifest.json").read_text())["decoder"]
    assert decoder == {"type": "yolov8", "iou": 0.6, "max_detections": 5,
                       "class_agnostic": True, "normalized": None}  # fmt: skip
    labels = str(workdir / "yolov8-3-labels.txt")
    v5 = ["--task", "detect", "--decoder", "yolov5", "--labels", labels]
    assert main(["bundle", str(model), "-o", str(workdir / "v5"), *v5]) == 2
    err = capsys.readouterr().err
    assert "int8[1, 7, 32] has 27 classes but there are 3 labels: expected [1, N, 5 + 3]" in err
    assert not (workdir / "v5").exists()
    assert main(["bundle", str(model), "-o", str(workdir / "c"), "--decoder", "yolov8"]) == 2
    assert "--decoder and its options are for --task detect" in capsys.readouterr().err


# ------------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.workstation
def test_an_agent_serves_a_yolov8_detector_over_mqtt(
    workdir: Path, broker: Any, tmp_path: Path
) -> None:
    from agent.live import LiveConfig
    from agent.models.store import ModelStore
    from agent.service import Agent
    from tests.mqtt_support import MessageCollector
    from tests.test_pipeline_live import wait_for

    stored = read_bundle(yolo_bundle(workdir, "yolov8"))
    store = ModelStore(tmp_path / "state", require_signature=False)
    store.open()
    store.install(stored.manifest_data, None, stored.model_path)
    store.set_active(stored.manifest.name, stored.manifest.version)
    config = {
        "device": {"id": "pi-yolo"},
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": "yolo-test"},
        "models": {"require_signature": False},
        "pipelines": [
            {"name": "cam", "model": stored.manifest.name, "threshold": 0.5,
             "source": {"type": "synthetic", "width": 64, "height": 48, "fps": 50}},
        ],
    }  # fmt: skip
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    collector = MessageCollector(broker, "yolo-test/pi-yolo/results/#")
    agent = Agent(LiveConfig.load(path))
    loop = threading.Thread(target=agent.serve, name="test-agent-serve", daemon=True)
    agent.start()
    loop.start()
    try:
        wait_for(lambda: len(collector.messages) >= 5, timeout=60, what="5 results")
    finally:
        agent.stop_event.set()
        loop.join(10)
        agent.stop()
        collector.close()
    want = [(k, s, (b[0] * 2, b[1] * 1.5, b[2] * 2, b[3] * 1.5)) for k, s, b in EXPECTED]
    for message in collector.messages[:5]:
        result = Result.model_validate_json(message.payload)
        assert result.version == stored.manifest.version
        assert_expected(boxes_of(result), want, tol=1.0)
        assert [d.label for d in sorted(result.detections or [], key=lambda d: d.index)] == LABELS
        assert len(message.payload) < 2048
