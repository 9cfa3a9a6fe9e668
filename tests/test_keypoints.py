"""task keypoints: MoveNet-like [1, 1, K, 3] outputs to named points in source pixels.

Hand-built arrays for the decoding; a Keras pose model whose points are fixed and whose
scores are the frame's brightness, converted to an int8 bundle by the project's
converter, on both runtimes and served by a real agent over a real broker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.config import PipelineConfig
from agent.loops.keypoints import COCO_KEYPOINTS, KeypointsDecoder, pose_agreement
from agent.loops.postprocess import FrameContext, Output, PublishPolicy, summarise
from agent.loops.preprocess import Transform
from agent.loops.processing import build_processing
from agent.loops.shadow import agreement
from agent.models import runtime as rt
from agent.models.health import OutputWindow
from agent.models.manifest import Manifest, TensorSpec, read_bundle
from agent.models.output_fit import OutputMismatch, check_outputs
from agent.models.runtime import TensorInfo
from agent.protocol import Keypoint
from tests.device_venv import DEVICE_RUNTIMES
from tests.mqtt_support import Broker
from tests.posesegm_support import (
    POSE_POINTS,
    K,
    build_bundle,
    deployed_results,
    make_keys,
    serving_agent,
)

FLOAT = TensorInfo("pose", 0, (1, 1, K, 3), "float32", 0.0, 0)
# A 64 x 32 frame letterboxed into 16 x 16: scale 1/4, 4 rows of padding above.
LETTERBOX = Transform(0.25, 0.25, 0.0, 4.0, 64, 32)


def pose(scores: float | np.ndarray = 0.8, k: int = K) -> np.ndarray:
    out = np.zeros((1, 1, k, 3), np.float32)
    out[0, 0, :, :2] = POSE_POINTS[:k]
    out[0, 0, :, 2] = scores
    return out


def expected_points(score: float = 0.8) -> list[tuple[float, float]]:
    """(x, y) in the 64 x 32 frame of ``POSE_POINTS``, by hand: input pixels = 16 * value,
    less the padding, times 4; y clipped to the frame."""
    return [(x * 16 * 4, min(32.0, max(0.0, (y * 16 - 4) * 4))) for y, x in POSE_POINTS]


def test_points_are_named_and_put_back_on_the_source() -> None:
    out = KeypointsDecoder([FLOAT], None, (16, 16))(
        [pose(np.linspace(0.5, 0.9, K))], FrameContext(transform=LETTERBOX)
    )
    assert out.keypoints is not None and len(out.keypoints) == K
    assert [p.name for p in out.keypoints] == list(COCO_KEYPOINTS)
    for point, (x, y) in zip(out.keypoints, expected_points(), strict=True):
        assert point.x == pytest.approx(x, abs=0.06) and point.y == pytest.approx(y, abs=0.06)
    assert [p.score for p in out.keypoints] == pytest.approx(np.linspace(0.5, 0.9, K), abs=1e-4)
    # The nose (0.1, 0.9): input (14.4, 1.6), in the padding above the frame: clipped to 0.
    assert (out.keypoints[0].x, out.keypoints[0].y) == (57.6, 0.0)
    # For drift and capture: every point's score.
    assert out.scores is not None and out.scores.shape == (K,)


def test_names_come_from_labels_else_coco_for_17_else_none() -> None:
    labels = [f"p{i}" for i in range(K)]
    named = KeypointsDecoder([FLOAT], labels, (16, 16))([pose()], FrameContext())
    assert [p.name for p in named.keypoints or []] == labels
    five = TensorInfo("pose", 0, (1, 1, 5, 3), "float32", 0.0, 0)
    unnamed = KeypointsDecoder([five], None, (16, 16))([pose(k=5)], FrameContext())
    assert [p.name for p in unnamed.keypoints or []] == [None] * 5
    # Without a transform the points are in input pixels.
    assert (unnamed.keypoints or [])[2].x == pytest.approx(POSE_POINTS[2, 1] * 16, abs=0.05)


def test_weak_points_are_kept_and_the_threshold_applies_to_the_pose() -> None:
    scores = np.full(K, 0.9, np.float32)
    scores[:4] = 0.05
    decoder = KeypointsDecoder([FLOAT], None, (16, 16), threshold=0.5)
    out = decoder([pose(scores)], FrameContext())
    assert out.keypoints is not None and len(out.keypoints) == K
    assert out.keypoints[0].score == 0.05
    mean = float(scores.mean())
    assert out.top == (0, pytest.approx(mean, abs=1e-4))
    nobody = decoder([pose(0.2)], FrameContext())
    assert nobody.keypoints == [] and nobody.top is None
    assert nobody.scores is not None and nobody.scores.size == K


def test_int8_outputs_are_dequantised() -> None:
    int8 = TensorInfo("pose", 0, (1, 1, K, 3), "int8", 1 / 255, -128)
    codes = np.round(pose(0.6) * 255 - 128).astype(np.int8)
    out = KeypointsDecoder([int8], None, (16, 16))([codes], FrameContext(transform=LETTERBOX))
    for point, (x, y) in zip(out.keypoints or [], expected_points(), strict=True):
        assert point.x == pytest.approx(x, abs=0.2) and point.y == pytest.approx(y, abs=0.2)
        assert point.score == pytest.approx(0.6, abs=0.003)


def test_a_wrong_output_shape_is_named() -> None:
    wrong = TensorInfo("Identity", 0, (1, 17, 3), "float32", 0.0, 0)
    with pytest.raises(
        ValueError, match=r"'Identity' has shape \[1, 17, 3\], expected \[1, 1, K, 3\]"
    ):
        KeypointsDecoder([wrong], None, (16, 16))


def test_change_policy_publishes_when_the_mean_score_moves() -> None:
    decoder = KeypointsDecoder([FLOAT], None, (16, 16))
    policy = PublishPolicy("change", score_delta=0.1)
    sent = [
        policy.should_publish(decoder([pose(s)], FrameContext())) for s in (0.5, 0.55, 0.7, 0.72)
    ]
    assert sent == [True, False, True, False]


def points(offset: float = 0.0, moved: int = K) -> list[Keypoint]:
    return [
        Keypoint(x=float(x) * 100 + (offset if i < moved else 0), y=float(y) * 100, score=0.9)
        for i, (y, x) in enumerate(POSE_POINTS)
    ]


def test_shadow_agreement_is_the_share_of_points_close_enough() -> None:
    # The pose spans 80 px: points within 8 px agree.
    assert pose_agreement(points(), points(7.0)) == 1.0
    assert pose_agreement(points(), points(9.0, moved=K - 4)) == pytest.approx(4 / K)
    assert pose_agreement([], []) == 1.0 and pose_agreement(points(), []) == 0.0
    assert agreement(Output(keypoints=points()), Output(keypoints=points(20.0, moved=5))) == (
        pytest.approx((K - 5) / K)
    )
    assert agreement(Output(keypoints=[]), Output(keypoints=[])) == 1.0


# ----------------------------------------------------------- the converted model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("pose")
    key, _pub = make_keys(work / "keys")
    return build_bundle("keypoints", work, key)


@pytest.mark.slow
@pytest.mark.workstation
def test_the_converter_checks_the_outputs_and_records_a_reference(bundle: Path) -> None:
    manifest = read_bundle(bundle).manifest
    assert manifest.task == "keypoints" and manifest.outputs[0].shape == [1, 1, K, 3]
    # Point scores as detect scores: drift compares scores and points over the threshold.
    reference = manifest.reference
    assert reference is not None and reference.detect is not None and reference.samples == 40
    window = OutputWindow(reference, size=10, min_frames=1)
    summarise(window, KeypointsDecoder([FLOAT], None, (16, 16))([pose(0.5)], FrameContext()))
    assert window.figures().distance is not None
    check_outputs(manifest)
    with pytest.raises(OutputMismatch, match="has 17 points but the manifest names 3"):
        check_outputs(manifest.model_copy(update={"labels": ["a", "b", "c"]}))
    flat = TensorSpec(name="out", shape=[1, 17, 3], dtype="int8")
    with pytest.raises(OutputMismatch, match=r"'out' int8\[1, 17, 3\] is not \[1, 1, K, 3\]"):
        check_outputs(manifest.model_copy(update={"outputs": [flat]}))


@pytest.mark.slow
@pytest.mark.workstation
@pytest.mark.parametrize("runtime", DEVICE_RUNTIMES)
def test_the_int8_pose_model_on_each_runtime(bundle: Path, runtime: str) -> None:
    manifest: Manifest = read_bundle(bundle).manifest
    loaded = rt.load_model(
        bundle / "model.tflite", runtime=rt.select_runtime(runtime), num_threads=1
    )
    config = PipelineConfig.model_validate(
        {"name": "pose", "model": "pose", "source": {"type": "synthetic"}, "resize": "letterbox"}
    )
    proc = build_processing("1", manifest, loaded, config)
    frame = np.full((32, 64, 3), 200, np.uint8)
    tensor, transform = proc.pre(frame)
    loaded.interpreter.set_tensor(proc.input_index, tensor)
    loaded.interpreter.invoke()
    out = proc.post(
        [loaded.interpreter.get_tensor(o.index) for o in loaded.outputs],
        FrameContext(transform=transform),
    )
    assert out.keypoints is not None and [p.name for p in out.keypoints] == list(COCO_KEYPOINTS)
    for point, (x, y) in zip(out.keypoints, expected_points(), strict=True):
        # int8 steps of 1/255 of the input: 0.06 input pixels, 0.25 source pixels.
        assert point.x == pytest.approx(x, abs=0.3) and point.y == pytest.approx(y, abs=0.3)
        # Letterbox padding is black: the mean brightness is half the frame's.
        assert point.score == pytest.approx(200 / 255 / 2, abs=0.01)


@pytest.mark.slow
@pytest.mark.workstation
def test_edge_convert_bundle_task_keypoints(bundle: Path, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent

    def bundle_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "converter", "bundle", bundle / "model.tflite", *args],
            capture_output=True, text=True, timeout=120, cwd=root,
            env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip

    ok = bundle_cli("-o", tmp_path / "b", "--task", "keypoints", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["name"] == "model"
    assert read_bundle(tmp_path / "b").manifest.task == "keypoints"
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    bad = bundle_cli(
        "-o", tmp_path / "c", "--task", "keypoints", "--labels", tmp_path / "labels.txt"
    )
    assert bad.returncode != 0
    assert "task keypoints: output " in bad.stderr
    assert "has 17 points but the manifest names 3" in bad.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
@pytest.mark.workstation
def test_a_pose_model_end_to_end_over_mqtt(bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """Deployed with edge-fleet over MQTT to a real agent, which publishes named points
    in the frame's pixels (64 x 32, letterboxed into the model's 16 x 16)."""
    pub = bundle.parent / "keys" / "fleet.pub"
    pipeline = {"name": "pose", "model": "pose", "resize": "letterbox", "threshold": 0.2}
    frame = np.full((32, 64, 3), 200, np.uint8)
    with serving_agent(tmp_path, broker, pub, pipeline, frame) as (device, collector):
        results = deployed_results(broker, device, pub, bundle, collector)
    for result in results:
        assert (result.model, result.version) == ("pose", "1")
        assert result.keypoints is not None and len(result.keypoints) == K
        assert result.classes is None and result.segmentation is None
        for point, (x, y) in zip(result.keypoints, expected_points(), strict=True):
            assert point.x == pytest.approx(x, abs=0.3) and point.y == pytest.approx(y, abs=0.3)
            assert point.score == pytest.approx(200 / 255 / 2, abs=0.01)
        assert result.keypoints[5].name == "left_shoulder"
