"""task segment: per-pixel maps to class areas, connected regions and an RLE mask.

Hand-built maps for the decoding (areas, regions' boxes, letterbox, index masks, the
region labelling against a flood fill, the RLE round trip, the result's size); a Keras
model whose class per pixel is its colour, converted to an int8 bundle by the project's
converter, on both runtimes and served by a real agent over a real broker.
"""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from agent.config import PipelineConfig, SegmentConfig
from agent.loops.postprocess import FrameContext, Output, PublishPolicy
from agent.loops.preprocess import Transform
from agent.loops.processing import build_processing
from agent.loops.segment import (
    Segmenter,
    components,
    map_agreement,
    reduce_map,
    rle_decode,
)
from agent.loops.shadow import agreement
from agent.models import runtime as rt
from agent.models.manifest import TensorSpec, read_bundle
from agent.models.output_fit import OutputMismatch, check_outputs
from agent.models.runtime import TensorInfo
from agent.protocol import Result, Segmentation
from tests.device_venv import DEVICE_RUNTIMES
from tests.mqtt_support import Broker
from tests.posesegm_support import (
    SEGMENT_LABELS,
    build_bundle,
    deployed_results,
    make_keys,
    serving_agent,
)

DEFAULT = SegmentConfig()


def logits(class_map: np.ndarray, classes: int) -> np.ndarray:
    """[1, H, W, C] scores whose argmax is ``class_map``."""
    out = np.eye(classes, dtype=np.float32)[class_map] * 5.0 - 2.0
    return out[None]


def segmenter(
    shape: tuple[int, ...],
    labels: list[str] | None = None,
    config: SegmentConfig = DEFAULT,
    *,
    input_size: tuple[int, int] = (32, 32),
    dtype: str = "float32",
    scale: float = 0.0,
    zero_point: int = 0,
) -> Segmenter:
    tensor = TensorInfo("seg", 0, shape, dtype, scale, zero_point)
    return Segmenter([tensor], labels, input_size, config)


def scene() -> np.ndarray:
    """16 x 16: class 1 at rows 2-5, cols 0-3; class 2 at rows 10-15, cols 8-15; class 3
    in two blobs (rows 0-1, cols 12-15 and row 8, cols 0-1)."""
    m = np.zeros((16, 16), np.int64)
    m[2:6, 0:4] = 1
    m[10:16, 8:16] = 2
    m[0:2, 12:16] = 3
    m[8, 0:2] = 3
    return m


def seg(out: Output) -> Segmentation:
    assert out.segmentation is not None
    return out.segmentation


def test_areas_and_regions_of_a_score_map() -> None:
    labels = ["bg", "a", "b", "c"]
    out = segmenter((1, 16, 16, 4), labels)([logits(scene(), 4)], FrameContext())
    s = seg(out)
    assert [(c.index, c.label, c.area) for c in s.classes] == [
        (0, "bg", round(1 - 74 / 256, 4)),
        (2, "b", 0.1875),
        (1, "a", 0.0625),
        (3, "c", round(10 / 256, 4)),
    ]
    # Background is not a region; class 3's two blobs are two; boxes in input pixels
    # (the map is half the input's 32 x 32): map cells' edges times 2.
    assert [(r.index, r.label, r.area, r.box) for r in s.regions] == [
        (2, "b", 0.1875, (16.0, 20.0, 32.0, 32.0)),
        (1, "a", 0.0625, (0.0, 4.0, 8.0, 12.0)),
        (3, "c", 0.0312, (24.0, 0.0, 32.0, 4.0)),
    ]
    assert s.mask is None
    # The second blob of class 3 (2 cells, 0.8%) is under min_region_area (1%).
    everything = segmenter((1, 16, 16, 4), labels, SegmentConfig(min_region_area=0))
    small = seg(everything([logits(scene(), 4)], FrameContext())).regions[-1]
    assert (small.index, small.area, small.box) == (3, 0.0078, (0.0, 16.0, 4.0, 18.0))


def test_int8_codes_give_the_same_answer_as_real_values() -> None:
    real = logits(scene(), 4)
    scale, zero = 7.0 / 255, -128 + round(2.0 / (7.0 / 255))
    codes = np.clip(np.round(real / scale + zero), -128, 127).astype(np.int8)
    float_out = segmenter((1, 16, 16, 4))([real], FrameContext())
    int8_out = segmenter((1, 16, 16, 4), dtype="int8", scale=scale, zero_point=zero)(
        [codes], FrameContext()
    )
    assert int8_out.segmentation == float_out.segmentation
    assert int8_out.class_map is not None and np.array_equal(int8_out.class_map, scene())


def test_letterbox_padding_is_cut_off_and_boxes_land_in_source_pixels() -> None:
    # A 64 x 32 frame letterboxed into 32 x 32: scale 1/2, 8 input rows (4 map rows) of
    # padding above and below. The model calls the padding class 2: it must not count.
    m = np.full((16, 16), 2, np.int64)
    m[4:12] = 0
    m[6:10, 0:4] = 1  # source x 0-16, y 8-24
    letterbox = Transform(0.5, 0.5, 0.0, 8.0, 64, 32)
    config = SegmentConfig(mask_size=8)
    s = seg(
        segmenter((1, 16, 16, 4), config=config)([logits(m, 4)], FrameContext(transform=letterbox))
    )
    assert [(c.index, c.area) for c in s.classes] == [(0, 0.875), (1, 0.125)]
    assert [(r.index, r.area, r.box) for r in s.regions] == [(1, 0.125, (0.0, 8.0, 16.0, 24.0))]
    # The mask covers the frame (64 x 32): 8 x 4 cells.
    assert s.mask is not None and (s.mask.width, s.mask.height) == (8, 4)
    decoded = rle_decode(s.mask)
    assert np.array_equal(decoded, reduce_map(m[4:12], 4, 8))
    assert decoded[1:3, 0:2].tolist() == [[1, 1], [1, 1]] and decoded.sum() == 4


@pytest.mark.parametrize(
    ("shape", "dtype", "scale", "zero_point"),
    [
        ((1, 16, 16), "int32", 0.0, 0),
        ((1, 16, 16, 1), "int64", 0.0, 0),
        ((1, 16, 16, 1), "float32", 0.0, 0),
    ],
)
def test_class_index_masks(
    shape: tuple[int, ...], dtype: str, scale: float, zero_point: int
) -> None:
    labels = ["bg", "a", "b", "c"]
    values = scene().astype(dtype).reshape(shape)
    s = seg(segmenter(shape, labels)([values], FrameContext()))
    expected = seg(segmenter((1, 16, 16, 4), labels)([logits(scene(), 4)], FrameContext()))
    assert s == expected


def test_a_foreground_probability_becomes_two_classes_at_one_half() -> None:
    # [1, H, W, 1] uint8 probabilities (scale 1/255), as selfie segmenters output.
    probability = np.full((1, 8, 8, 1), 0.2)
    probability[0, :4, :, 0] = 0.7
    codes = np.round(probability * 255).astype(np.uint8)
    s = seg(
        segmenter((1, 8, 8, 1), ["bg", "person"], dtype="uint8", scale=1 / 255)(
            [codes], FrameContext()
        )
    )
    assert [(c.label, c.area) for c in s.classes] == [("bg", 0.5), ("person", 0.5)]
    assert [(r.label, r.box) for r in s.regions] == [("person", (0.0, 0.0, 32.0, 16.0))]


def flood_fill(grid: np.ndarray, skip: int) -> set[tuple[int, ...]]:
    """The regions of ``grid`` by breadth-first search over cells: the slow, sure way."""
    h, w = grid.shape
    seen = np.zeros_like(grid, dtype=bool)
    found: set[tuple[int, ...]] = set()
    for r0 in range(h):
        for c0 in range(w):
            if seen[r0, c0] or grid[r0, c0] == skip:
                continue
            cls, todo, cells = grid[r0, c0], deque([(r0, c0)]), []
            seen[r0, c0] = True
            while todo:
                r, c = todo.popleft()
                cells.append((r, c))
                for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                    if 0 <= rr < h and 0 <= cc < w and not seen[rr, cc] and grid[rr, cc] == cls:
                        seen[rr, cc] = True
                        todo.append((rr, cc))
            rows, cols = zip(*cells, strict=True)
            found.add((int(cls), len(cells), min(rows), max(rows), min(cols), max(cols)))
    return found


@pytest.mark.parametrize("seed", range(6))
def test_regions_match_a_flood_fill(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Coarse noise upsampled: blobs, rings, diagonals touching at corners (not joined).
    grid = np.kron(rng.integers(0, 4, (16, 16)), np.ones((4, 4), np.int64))
    grid = np.where(rng.random(grid.shape) < 0.05, rng.integers(0, 4, grid.shape), grid)
    assert set(components(grid, 0)) == flood_fill(grid, 0)
    assert set(components(grid)) == flood_fill(grid, -1)


def blobs(rng: np.random.Generator, n: int, size: int = 256, classes: int = 21) -> np.ndarray:
    """A map of ``n`` ellipses of random classes on background."""
    m = np.zeros((size, size), np.int64)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(n):
        cy, cx = rng.integers(0, size, 2)
        ry, rx = rng.integers(size // 20, size // 4, 2)
        m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = rng.integers(1, classes)
    return m


def test_at_most_max_regions_largest_first() -> None:
    m = np.zeros((64, 64), np.int64)
    for i in range(30):  # 30 separate squares of 4 to 33 cells a side... sized 2 + i % 7
        r, c = divmod(i, 6)
        side = 2 + i % 7
        m[r * 12 : r * 12 + side, c * 10 : c * 10 + min(side, 8)] = 1 + i % 3
    config = SegmentConfig(max_regions=16, min_region_area=0)
    s = seg(
        segmenter((1, 64, 64, 4), config=config, input_size=(64, 64))(
            [logits(m, 4)], FrameContext()
        )
    )
    areas = [r.area for r in s.regions]
    assert len(areas) == 16 and areas == sorted(areas, reverse=True)
    everything = sorted((c[1] for c in components(m, 0)), reverse=True)
    assert len(everything) == 30
    assert areas == [round(a / 4096, 4) for a in everything[:16]]
    assert seg(segmenter((1, 64, 64, 4), config=SegmentConfig(max_regions=0))(
        [logits(m, 4)], FrameContext()
    )).regions == []  # fmt: skip


def test_the_rle_mask_decodes_to_the_reduced_map() -> None:
    m = blobs(np.random.default_rng(3), 6)
    config = SegmentConfig(mask_size=32)
    s = seg(
        segmenter((1, 256, 256, 21), config=config, input_size=(256, 256))(
            [logits(m, 21)], FrameContext()
        )
    )
    assert s.mask is not None and (s.mask.width, s.mask.height) == (32, 32)
    assert sum(n for _, n in s.mask.runs) == 32 * 32
    assert np.array_equal(rle_decode(s.mask), reduce_map(m, 32, 32))
    # Runs of one class do not follow each other.
    assert all(a[0] != b[0] for a, b in zip(s.mask.runs, s.mask.runs[1:], strict=False))


def test_results_of_a_21_class_256_map_stay_under_2_kb() -> None:
    rng = np.random.default_rng(0)
    labels = [f"class-{i:02d}" for i in range(21)]
    decoder = segmenter((1, 256, 256, 21), labels, input_size=(256, 256))
    source = Transform(256 / 1280, 256 / 1280, 0.0, 56.0, 1280, 720)  # letterboxed 720p
    sizes = []
    for _ in range(60):
        out = decoder(
            [logits(blobs(rng, int(rng.integers(2, 12))), 21)], FrameContext(transform=source)
        )
        result = Result(
            device="pi-yard-01", pipeline="yard", seq=123456, ts=1795000020.123, frame=987654,
            model="deeplab", version="3", latency_ms=96.123, segmentation=out.segmentation,
        )  # fmt: skip
        sizes.append(len(result.to_bytes()))
    assert np.percentile(sizes, 95) <= 2048, sorted(sizes)[-5:]


def test_agreement_is_the_mean_iou_of_the_class_maps() -> None:
    a = scene()
    assert map_agreement(a, a) == 1.0
    b = a.copy()
    b[2:6, 0:4] = 0  # class 1 missing: IoU 0 for it, background grows
    background = np.sum(a == 0) / np.sum((a == 0) | (b == 0))
    assert map_agreement(a, b) == pytest.approx((background + 0 + 1 + 1) / 4)
    # Another size is compared at the active's.
    assert map_agreement(a, np.kron(a, np.ones((2, 2), np.int64))) == 1.0
    decoder = segmenter((1, 16, 16, 4))
    assert agreement(
        decoder([logits(a, 4)], FrameContext()), decoder([logits(b, 4)], FrameContext())
    ) == (pytest.approx(map_agreement(a, b)))


def test_change_policy_follows_the_largest_class() -> None:
    decoder = segmenter((1, 16, 16, 4))
    policy = PublishPolicy("change", score_delta=0.1)
    big = np.zeros((16, 16), np.int64)
    big[:12] = 2  # class 2 covers 75%
    outs = [decoder([logits(m, 4)], FrameContext()) for m in (scene(), scene(), big)]
    assert outs[2].top == (2, 0.75)
    assert [policy.should_publish(o) for o in outs] == [True, False, True]


def test_bad_shapes_and_settings_are_named() -> None:
    with pytest.raises(ValueError, match=r"'seg' has shape \[1, 256\], expected \[1, H, W, C\]"):
        segmenter((1, 256))
    with pytest.raises(ValidationError, match="min_region_area"):
        PipelineConfig.model_validate(
            {"name": "s", "model": "m", "source": {"type": "synthetic"},
             "segment": {"min_region_area": 2}}
        )  # fmt: skip
    with pytest.raises(ValidationError, match="mask"):
        SegmentConfig.model_validate({"mask": 32})


# ----------------------------------------------------------- the converted model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("segment")
    key, _pub = make_keys(work / "keys")
    return build_bundle("segment", work, key)


def frame() -> np.ndarray:
    """64 x 32 BGR, black, a red square at x 0-16, y 8-24 and a blue one at x 40-56, y 16-32."""
    image = np.zeros((32, 64, 3), np.uint8)
    image[8:24, 0:16] = (0, 0, 255)
    image[16:32, 40:56] = (255, 0, 0)
    return image


EXPECTED_CLASSES = [("background", 0.75), ("red", 0.125), ("blue", 0.125)]
EXPECTED_REGIONS = [
    ("red", 0.125, (0.0, 8.0, 16.0, 24.0)),
    ("blue", 0.125, (40.0, 16.0, 56.0, 32.0)),
]


@pytest.mark.slow
@pytest.mark.workstation
def test_the_converter_checks_the_outputs(bundle: Path) -> None:
    manifest = read_bundle(bundle).manifest
    assert manifest.task == "segment" and manifest.outputs[0].shape == [1, 16, 16, 4]
    assert manifest.labels == SEGMENT_LABELS
    # --val gave it segmentation reference statistics (tests/test_segment_reference.py).
    reference = manifest.reference
    assert reference is not None and reference.segment is not None
    assert reference.samples == 40 and reference.segment.classes == 4
    check_outputs(manifest)
    with pytest.raises(OutputMismatch, match="scores 4 classes but the manifest names 3"):
        check_outputs(manifest.model_copy(update={"labels": ["a", "b", "c"]}))
    flat = TensorSpec(name="out", shape=[1, 1024], dtype="int8")
    with pytest.raises(OutputMismatch, match=r"'out' int8\[1, 1024\] is not \[1, H, W, C\]"):
        check_outputs(manifest.model_copy(update={"outputs": [flat]}))


@pytest.mark.slow
@pytest.mark.workstation
@pytest.mark.parametrize("runtime", DEVICE_RUNTIMES)
def test_the_int8_segmentation_model_on_each_runtime(bundle: Path, runtime: str) -> None:
    manifest = read_bundle(bundle).manifest
    loaded = rt.load_model(
        bundle / "model.tflite", runtime=rt.select_runtime(runtime), num_threads=1
    )
    config = PipelineConfig.model_validate(
        {"name": "seg", "model": "segmenter", "source": {"type": "synthetic"},
         "resize": "letterbox", "segment": {"mask_size": 16}}
    )  # fmt: skip
    proc = build_processing("1", manifest, loaded, config)
    tensor, transform = proc.pre(frame())
    loaded.interpreter.set_tensor(proc.input_index, tensor)
    loaded.interpreter.invoke()
    out = proc.post(
        [loaded.interpreter.get_tensor(o.index) for o in loaded.outputs],
        FrameContext(transform=transform),
    )
    s = seg(out)
    assert [(c.label, c.area) for c in s.classes] == EXPECTED_CLASSES
    assert [(r.label, r.area, r.box) for r in s.regions] == EXPECTED_REGIONS
    # The map's content is 16 x 8 cells, each 4 x 4 source pixels.
    assert s.mask is not None and (s.mask.width, s.mask.height) == (16, 8)
    expected = np.zeros((8, 16), np.int64)
    expected[2:6, 0:4] = 1
    expected[4:8, 10:14] = 3
    assert np.array_equal(rle_decode(s.mask), expected)


@pytest.mark.slow
@pytest.mark.workstation
def test_edge_convert_bundle_task_segment(bundle: Path, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    labels = tmp_path / "labels.txt"

    def bundle_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "converter", "bundle", bundle / "model.tflite", *args],
            capture_output=True, text=True, timeout=120, cwd=root,
            env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip

    labels.write_text("\n".join(SEGMENT_LABELS) + "\n")
    # With --val: segmentation reference statistics (the same as convert's, from the
    # same model and data) and golden samples.
    ok = bundle_cli("-o", tmp_path / "b", "--task", "segment", "--labels", labels,
                    "--val", bundle.parent / "calib.npy", "--std", "255")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    written = read_bundle(tmp_path / "b").manifest
    assert written.task == "segment" and written.reference is not None
    assert written.reference == read_bundle(bundle).manifest.reference
    assert written.golden is not None and written.golden.samples
    labels.write_text("a\nb\nc\n")
    bad = bundle_cli("-o", tmp_path / "c", "--task", "segment", "--labels", labels)
    assert bad.returncode != 0 and "scores 4 classes but the manifest names 3" in bad.stderr


@pytest.mark.slow
@pytest.mark.workstation
def test_a_segmentation_model_end_to_end_over_mqtt(
    bundle: Path, broker: Broker, tmp_path: Path
) -> None:
    pub = bundle.parent / "keys" / "fleet.pub"
    pipeline = {"name": "yard", "model": "segmenter", "resize": "letterbox",
                "segment": {"mask_size": 16, "max_regions": 1}}  # fmt: skip
    with serving_agent(tmp_path, broker, pub, pipeline, frame()) as (device, collector):
        results = deployed_results(broker, device, pub, bundle, collector)
    for result in results:
        assert (result.model, result.version) == ("segmenter", "1")
        s = result.segmentation
        assert s is not None and result.classes is None and result.keypoints is None
        assert [(c.label, c.area) for c in s.classes] == EXPECTED_CLASSES
        assert [(r.label, r.area, r.box) for r in s.regions] == EXPECTED_REGIONS[:1]
        assert s.mask is not None and rle_decode(s.mask).sum() == 16 * 1 + 16 * 3
