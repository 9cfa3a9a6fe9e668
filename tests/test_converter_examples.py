"""The colors and shapes examples: trained by `edge-convert example`, converted to full
int8, and wrong when fed BGR (what a manifest with the wrong colour order does to them).
The shapes detector's four outputs are read by the agent's own ``Detector``."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.loops.decoders.ssd import SsdDetector as Detector
from agent.loops.postprocess import FrameContext
from agent.models.health import box_f1
from agent.models.manifest import read_bundle
from agent.models.runtime import load_model
from converter.cli import build_parser, main
from converter.examples import COLORS_SIZE, EXAMPLES, ExampleFiles, colors_data

pytestmark = [pytest.mark.slow, pytest.mark.workstation]  # trains with TensorFlow


def example(name: str, workdir: Path) -> ExampleFiles:
    out = workdir / f"{name}.keras"
    assert main(["example", name, "-o", str(out)]) == 0
    return ExampleFiles(
        model=out,
        calib=out.with_name(f"{name}-calib.npz"),
        val=out.with_name(f"{name}-val.npz"),
        labels=out.with_name(f"{name}-labels.txt"),
    )


def convert(files: ExampleFiles, bundle: Path, *extra: str) -> dict[str, Any]:
    args = ["convert", files.model, "-o", bundle, "--calib", files.calib, "--val", files.val]
    args += ["--labels", files.labels, "--std", "255", "--json", *extra]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(a) for a in args]) == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


@pytest.fixture(scope="module")
def colors(tmp_path_factory: pytest.TempPathFactory) -> ExampleFiles:
    return example("colors", tmp_path_factory.mktemp("colors"))


@pytest.fixture(scope="module")
def converted(
    colors: ExampleFiles, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    bundle = tmp_path_factory.mktemp("converted") / "colors-bundle"
    return bundle, convert(colors, bundle)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_cli_offers_every_example(name: str) -> None:
    assert build_parser().parse_args(["example", name, "-o", "m.keras"]).which == name


def test_colors_data_is_deterministic_camera_pixels() -> None:
    x, _, _, yv = colors_data(0)
    assert x.dtype == np.uint8 and x.shape[1:] == (COLORS_SIZE, COLORS_SIZE, 3)
    assert np.bincount(yv).min() == np.bincount(yv).max()  # balanced classes
    again = colors_data(0)
    assert np.array_equal(x, again[0]) and np.array_equal(yv, again[3])
    assert not np.array_equal(x, colors_data(1)[0])  # a retrained model sees other data


def test_colors_converts_to_full_int8_with_a_small_drop(
    converted: tuple[Path, dict[str, Any]], colors: ExampleFiles
) -> None:
    bundle, result = converted
    assert (result["input_dtype"], result["output_dtype"]) == ("int8", "int8")
    assert result["float_accuracy"] >= 0.9
    assert result["accuracy_drop"] <= 0.01 and result["gate_applied"]
    m = read_bundle(bundle).manifest
    assert m.inputs[0].shape == [1, COLORS_SIZE, COLORS_SIZE, 3]
    assert (m.preprocess.color, m.preprocess.std) == ("rgb", [255.0])
    assert m.labels == colors.labels.read_text().split()


@pytest.mark.parametrize("runtime", ["ai_edge_litert", "tflite_runtime"])
def test_colors_fed_bgr_is_mostly_wrong(
    runtime: str, converted: tuple[Path, dict[str, Any]], colors: ExampleFiles
) -> None:
    bundle, result = converted
    loaded = load_model(bundle / "model.tflite", runtime=runtime)
    (inp,), (out,) = loaded.inputs, loaded.outputs
    with np.load(colors.val) as data:
        x, y = data["x"] / 255.0, data["y"]

    def accuracy(images: np.ndarray) -> float:
        hits = 0
        for i in range(len(images)):
            loaded.interpreter.set_tensor(inp.index, inp.quantize(images[i : i + 1]))
            loaded.interpreter.invoke()
            hits += int(loaded.interpreter.get_tensor(out.index).argmax() == y[i])
        return hits / len(images)

    assert accuracy(x) == pytest.approx(result["int8_accuracy"], abs=0.01)
    # Only green (R == B) survives the swap: about one frame in six is right.
    assert accuracy(x[..., ::-1]) < 0.35


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExampleFiles, Path]:
    files = example("shapes", tmp_path_factory.mktemp("shapes"))
    bundle = files.model.with_name("shapes-bundle")
    result = convert(files, bundle, "--task", "detect")
    assert (result["quantization"], result["input_dtype"]) == ("int8", "int8")
    return files, bundle


@pytest.mark.parametrize("runtime", ["ai_edge_litert", "tflite_runtime"])
def test_shapes_detector_is_full_int8_and_finds_its_squares(
    runtime: str, shapes: tuple[ExampleFiles, Path]
) -> None:
    files, bundle = shapes
    manifest = read_bundle(bundle).manifest
    assert manifest.task == "detect" and manifest.labels == files.labels.read_text().split()
    # int8 everywhere but the class ids and the count, which are exact int32.
    assert sorted(t.dtype for t in manifest.outputs) == ["int32", "int32", "int8", "int8"]
    loaded = load_model(bundle / "model.tflite", runtime=runtime)
    (inp,) = loaded.inputs
    size = inp.shape[2], inp.shape[1]
    detector = Detector(loaded.outputs, manifest.labels, size, threshold=0.5)
    with np.load(files.val) as data:
        x, boxes, classes = data["x"], data["boxes"], data["classes"]

    def f1(images: np.ndarray) -> float:
        scores = []
        for image, scene_boxes, scene_classes in zip(images, boxes, classes, strict=True):
            loaded.interpreter.set_tensor(inp.index, inp.quantize(image[None] / 255.0))
            loaded.interpreter.invoke()
            values = [loaded.interpreter.get_tensor(o.index) for o in loaded.outputs]
            found = [
                (
                    str(d.index),
                    (
                        d.box[1] / size[1],
                        d.box[0] / size[0],
                        d.box[3] / size[1],
                        d.box[2] / size[0],
                    ),
                )
                for d in detector(values, FrameContext()).detections
            ]
            truth = [
                (str(k), tuple(b))
                for k, b in zip(scene_classes, scene_boxes, strict=True)
                if k >= 0
            ]
            scores.append(box_f1(truth, found))
        return float(np.mean(scores))

    assert f1(x) >= 0.85
    # The boxes stay (squares on grey), their colours do not: red and blue swap.
    assert f1(x[..., ::-1]) < 0.6
