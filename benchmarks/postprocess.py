"""Post-processing per model family: its time per frame beside its model's invoke time,
and the size of the result it publishes.

    python -m benchmarks.postprocess [--quick] [--json]

Each family is a model of a realistic size and output layout, built with Keras (random
weights; in a child process, so TensorFlow never enters this one), converted int8 by
``edge-convert convert`` and cached under ``$XDG_CACHE_HOME/edge-deploy/benchmarks``:

- ``yolov8``: a YOLOv8n-layout detector at 320x320 (a MobileNetV2 1.0 backbone, a 3x3
  neck and a head at strides 8, 16 and 32; about half YOLOv8n's compute, so its ratio is
  the pessimistic side): output ``[1, 84, 2100]``, 2,100 candidates, 80 classes;
- ``yolov5``: the same backbone with a v5 head, ``[1, 2100, 85]``;
- ``anchors``: a face detector of BlazeFace's layout at 128x128 (six 3x3 convolutions, then
  heads at strides 8 and 16): 896 anchors, 6 keypoints;
- ``keypoints``: a pose model of MoveNet's output layout at 192x192 (MobileNetV2 0.5),
  ``[1, 1, 17, 3]``;
- ``segment``: a segmentation model at 256x256 (DeepLabV3's MobileNetV2 1.0 backbone at
  output stride 16, no ASPP), 21 classes, ``[1, 256, 256, 21]``;
- ``classify``: the MobileNetV2 1.0 classifier at 224x224 (1,001 classes) for comparison.

``invoke_ms`` is the model's ``set_tensor`` + ``invoke`` + ``get_tensor`` (median);
``post_ms`` the agent's post-processor for the task and decoder (the one the pipeline
builds, ``build_processing``) on outputs shaped like a real scene's, not the random
model's: random weights make every candidate a detection, which a trained model never
does. Detectors see 0 to 8 objects a frame (each found by a few neighbouring
candidates, which suppression must merge), quantised as exported models are (scores
and normalised boxes in int8 at scale 1/256); the segmentation map holds a few
blobs of classes on a background. ``post_over_invoke`` = post_ms / invoke_ms (the done
bar: <= 0.1), ``result_bytes_p95`` the published result's JSON size over the frames
(<= 2,048). Medians of rounds taken in rotation, so load from elsewhere falls on all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import PipelineConfig
from agent.loops.postprocess import FrameContext, Output
from agent.loops.processing import build_processing
from agent.models import runtime as rt
from agent.models.manifest import Manifest, read_bundle
from agent.protocol import Result

CACHE_VERSION = "v1"


@dataclass(frozen=True)
class Family:
    name: str
    size: int  # input side, pixels
    task: str
    decoder: list[str]  # edge-convert options for the decoder
    threshold: float
    pipeline: dict[str, Any]


ANCHORS = json.dumps(
    {
        "type": "anchors",
        "strides": [8, 16, 16, 16],
        "anchors_per_cell": 2,
        "box_scale": 128.0,
        "keypoints": 6,
        "iou": 0.3,
    }
)
FAMILIES = [
    Family("yolov8", 320, "detect", ["--decoder", "yolov8"], 0.25, {}),
    Family("yolov5", 320, "detect", ["--decoder", "yolov5"], 0.25, {}),
    Family("anchors", 128, "detect", ["--decoder", "anchors", "--decoder-json", ANCHORS], 0.5, {}),
    Family("keypoints", 192, "keypoints", [], 0.2, {}),
    Family("segment", 256, "segment", [], 0.0, {"segment": {"mask_size": 32}}),
    Family("classify", 224, "classify", [], 0.0, {}),
]


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "edge-deploy" / "benchmarks"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------ models (child)


def build_keras(kind: str, size: int, dest: str) -> None:
    """The Keras model of one family, random weights (run in a child process)."""
    import tensorflow as tf

    k = tf.keras
    inp = k.Input((size, size, 3), batch_size=1)

    def backbone(alpha: float) -> Any:
        return k.applications.MobileNetV2(
            input_tensor=inp, alpha=alpha, include_top=False, weights=None
        )

    if kind in ("yolov8", "yolov5"):
        net = backbone(1.0)
        feats = [
            net.get_layer(n).output
            for n in ("block_6_expand_relu", "block_13_expand_relu", "out_relu")
        ]
        width = 84 if kind == "yolov8" else 85
        neck = [k.layers.Conv2D(96, 3, padding="same", activation="relu")(f) for f in feats]
        heads = [k.layers.Reshape((-1, width))(k.layers.Conv2D(width, 1)(f)) for f in neck]
        out = k.layers.Concatenate(axis=1)(heads)  # [1, 2100, width]
        if kind == "yolov8":
            out = k.layers.Permute((2, 1))(out)  # [1, 84, 2100]
    elif kind == "anchors":
        x = inp
        for filters in (24, 32, 48):  # 128 -> 64 -> 32 -> 16: stride 8
            x = k.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
            x = k.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        s8 = x
        s16 = k.layers.Conv2D(96, 3, strides=2, padding="same", activation="relu")(s8)
        reg = [
            k.layers.Reshape((-1, 16))(k.layers.Conv2D(2 * 16, 1)(s8)),
            k.layers.Reshape((-1, 16))(k.layers.Conv2D(6 * 16, 1)(s16)),
        ]
        cls = [
            k.layers.Reshape((-1, 1))(k.layers.Conv2D(2, 1)(s8)),
            k.layers.Reshape((-1, 1))(k.layers.Conv2D(6, 1)(s16)),
        ]
        out = [k.layers.Concatenate(axis=1)(reg), k.layers.Concatenate(axis=1)(cls)]
    elif kind == "keypoints":
        net = backbone(0.5)
        x = k.layers.GlobalAveragePooling2D()(net.output)
        x = k.layers.Dense(17 * 3, activation="sigmoid")(x)
        out = k.layers.Reshape((1, 17, 3))(x)
    elif kind == "segment":
        net = backbone(1.0)
        x = net.get_layer("block_13_expand_relu").output  # stride 16
        x = k.layers.Conv2D(21, 1)(x)
        out = k.layers.UpSampling2D(16, interpolation="bilinear")(x)
    elif kind == "classify":
        out = k.applications.MobileNetV2(
            input_tensor=inp, alpha=1.0, include_top=True, weights=None, classes=1001
        ).output
    else:
        raise SystemExit(f"unknown kind {kind}")
    k.Model(inp, out).save(dest)


def build_bundle(family: Family) -> Path:
    """The family's int8 bundle, built once through the converter."""
    dest = _cache_dir() / f"postprocess-{family.name}-{CACHE_VERSION}"
    if (dest / "manifest.json").exists():
        return dest
    with tempfile.TemporaryDirectory(prefix=f"bench-{family.name}-") as tmp:
        work = Path(tmp)
        keras = work / "model.keras"
        calib = work / "calib.npy"
        pixels = np.random.default_rng(0).integers(0, 256, (8, family.size, family.size, 3))
        np.save(calib, pixels.astype(np.float32))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        me = [sys.executable, "-m", "benchmarks.postprocess"]
        build = [*me, "--build-child", family.name, str(family.size), str(keras)]
        subprocess.run(build, check=True, env=env, stdout=subprocess.DEVNULL)
        convert = [
            sys.executable, "-m", "converter", "convert", str(keras), "--calib", str(calib),
            "--samples", "8", "--mean", "127.5", "--std", "127.5", "--name", family.name,
            "--task", family.task, *family.decoder, "--golden", "0", "-o", str(work / "b"),
        ]  # fmt: skip
        subprocess.run(convert, check=True, env=env, stdout=subprocess.DEVNULL)
        (work / "b").rename(dest)
    return dest


# ------------------------------------------------------------------ scenes


def _codes(info: rt.TensorInfo, values: np.ndarray) -> np.ndarray:
    return info.quantize(values.astype(np.float32))


def _scene_info(info: rt.TensorInfo, scale: float, zero_point: int) -> rt.TensorInfo:
    """The tensor as an exported trained model quantises it (the random model's ranges
    mean nothing)."""
    return replace(info, scale=scale, zero_point=zero_point) if info.quantized else info


def yolo_scene(rng: np.random.Generator, v8: bool, n: int = 2100, c: int = 80) -> np.ndarray:
    """Candidates as a trained head gives them: low scores everywhere, and 0-8 objects
    each seen by 3-6 neighbouring candidates. Boxes normalised (cx, cy, w, h)."""
    box = np.column_stack(
        [rng.uniform(0, 1, n), rng.uniform(0, 1, n), rng.uniform(0.02, 0.2, (n, 2))]
    )
    cls = rng.uniform(0, 0.03, (n, c))
    obj = rng.uniform(0, 0.05, n)
    for _ in range(int(rng.integers(0, 9))):
        centre = rng.uniform(0.1, 0.9, 2)
        size = rng.uniform(0.05, 0.4, 2)
        k = int(rng.integers(0, c))
        for j in rng.choice(n, int(rng.integers(3, 7)), replace=False):
            box[j] = [*(centre + rng.normal(0, 0.01, 2)), *(size * rng.uniform(0.9, 1.1, 2))]
            cls[j, k] = rng.uniform(0.5, 0.95)
            obj[j] = rng.uniform(0.7, 0.99)
    rows = np.hstack([box, cls]) if v8 else np.hstack([box, obj[:, None], cls])
    return (rows.T if v8 else rows)[None].astype(np.float32)


def anchors_scene(rng: np.random.Generator, n: int = 896) -> list[np.ndarray]:
    """Regressors near zero (offsets from each anchor) and score logits far below zero,
    except 0-3 faces each seen by a few anchors."""
    reg = rng.normal(0, 2, (1, n, 16)).astype(np.float32)
    logits = rng.uniform(-12, -4, (1, n, 1)).astype(np.float32)
    for _ in range(int(rng.integers(0, 4))):
        j = int(rng.integers(0, n - 8))
        logits[0, j : j + 4, 0] = rng.uniform(1, 4, 4)
        reg[0, j : j + 4, 2:4] = rng.uniform(20, 50)
    return [reg, logits]


def segment_scene(rng: np.random.Generator, side: int = 256, c: int = 21) -> np.ndarray:
    """Logits of a background with 1-5 rectangular blobs of classes."""
    logits = rng.normal(0, 1, (1, side, side, c)).astype(np.float32)
    logits[..., 0] += 6
    for _ in range(int(rng.integers(1, 6))):
        x0, y0 = rng.integers(0, side - 40, 2)
        w, h = rng.integers(20, 120, 2)
        logits[0, y0 : y0 + h, x0 : x0 + w, int(rng.integers(1, c))] += 12
    return logits


def scene(
    family: Family, outputs: list[rt.TensorInfo], rng: np.random.Generator
) -> tuple[list[rt.TensorInfo], list[np.ndarray]]:
    """(output tensors as a trained export quantises them, one frame's output codes)."""
    if family.name in ("yolov8", "yolov5"):
        info = [_scene_info(outputs[0], 1 / 256, -128)]
        return info, [_codes(info[0], yolo_scene(rng, family.name == "yolov8"))]
    if family.name == "anchors":
        values = anchors_scene(rng)
        # Which output is the regressors: the wider one.
        order = sorted(range(2), key=lambda i: -outputs[i].shape[-1])
        info = list(outputs)
        info[order[0]] = _scene_info(outputs[order[0]], 0.5, 0)
        info[order[1]] = _scene_info(outputs[order[1]], 0.1, 60)
        codes: list[np.ndarray] = [np.empty(0)] * 2
        codes[order[0]] = _codes(info[order[0]], values[0])
        codes[order[1]] = _codes(info[order[1]], values[1])
        return info, codes
    if family.name == "segment":
        info = [_scene_info(outputs[0], 0.1, 0)]
        return info, [_codes(info[0], segment_scene(rng))]
    if family.name == "keypoints":
        info = [_scene_info(outputs[0], 1 / 256, -128)]
        return info, [_codes(info[0], rng.uniform(0, 1, (1, 1, 17, 3)))]
    info = [_scene_info(outputs[0], 1 / 256, -128)]
    return info, [_codes(info[0], np.eye(1001, dtype=np.float32)[rng.integers(0, 1001)][None])]


# ------------------------------------------------------------------ measuring


def _result_bytes(output: Output) -> int:
    result = Result(
        device="bench-1", pipeline="cam", seq=123456, ts=time.time(), frame=123456,
        model="model", version="1", latency_ms=12.345, classes=output.classes,
        detections=output.detections, keypoints=output.keypoints,
        segmentation=output.segmentation, raw=output.raw,
    )  # fmt: skip
    return len(result.to_bytes())


def _time_ms(fn: Callable[[], object], turns: int) -> float:
    times = []
    for _ in range(turns):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


class Bench:
    """One family: its loaded model and post-processor, and the frames' outputs."""

    def __init__(self, family: Family, frames: int) -> None:
        self.family = family
        bundle = build_bundle(family)
        manifest: Manifest = read_bundle(bundle).manifest
        self.model = rt.load_model(bundle / "model.tflite", num_threads=1)
        rng = np.random.default_rng(1)
        scenes = [scene(family, self.model.outputs, rng) for _ in range(frames)]
        loaded = replace(self.model, outputs=scenes[0][0])
        config = PipelineConfig.model_validate(
            {
                "name": "cam", "model": family.name, "threshold": family.threshold,
                "source": {"type": "synthetic"}, **family.pipeline,
            }
        )  # fmt: skip
        processing = build_processing("1", manifest, loaded, config)
        self.post = processing.post
        self.frame = FrameContext(transform=processing.pre(np.zeros((480, 640, 3), np.uint8))[1])
        self.values = [codes for _, codes in scenes]
        t = self.model.inputs[0]
        self.tensor = np.zeros(t.shape, np.dtype(t.dtype))
        self.outputs = self.model.outputs
        self.sizes = [_result_bytes(self.post(v, self.frame)) for v in self.values]
        self.invoke_ms: list[float] = []
        self.post_ms: list[float] = []
        self._next = 0

    def invoke(self) -> None:
        it = self.model.interpreter
        it.set_tensor(self.model.inputs[0].index, self.tensor)
        it.invoke()
        for o in self.outputs:
            it.get_tensor(o.index)

    def turn(self, invokes: int, posts: int) -> None:
        self.invoke_ms.append(_time_ms(self.invoke, invokes))
        times = []
        for _ in range(posts):
            v = self.values[self._next % len(self.values)]
            self._next += 1
            start = time.perf_counter()
            self.post(v, self.frame)
            times.append((time.perf_counter() - start) * 1000)
        self.post_ms.append(statistics.median(times))

    def figures(self) -> dict[str, Any]:
        invoke = statistics.median(self.invoke_ms)
        post = statistics.median(self.post_ms)
        return {
            "outputs": [list(o.shape) for o in self.outputs],
            "invoke_ms": round(invoke, 3),
            "post_ms": round(post, 4),
            "post_over_invoke": round(post / invoke, 4),
            "result_bytes_p50": int(np.percentile(self.sizes, 50)),
            "result_bytes_p95": int(np.percentile(self.sizes, 95)),
        }


def run(quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    families = [f for f in FAMILIES if not only or f.name in only]
    frames = 40 if quick else 200
    benches = [Bench(f, frames) for f in families]
    rounds, invokes, posts = (3, 5, 20) if quick else (9, 15, 60)
    for _ in range(rounds):
        for b in benches:
            b.turn(invokes, posts)
    per = {b.family.name: b.figures() for b in benches}
    return {
        "benchmark": "postprocess",
        "quick": quick,
        "runtime": str(rt.select_runtime("auto")),
        "families": per,
        "worst_post_over_invoke": max(f["post_over_invoke"] for f in per.values()),
        "worst_result_bytes_p95": max(f["result_bytes_p95"] for f in per.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.postprocess")
    parser.add_argument("--quick", action="store_true", help="a short run; about a minute")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", nargs="+", help="these families only")
    parser.add_argument("--build-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_child:
        kind, size, dest = args.build_child
        build_keras(kind, int(size), dest)
        return 0
    figures = run(args.quick, args.only)
    if args.json:
        print(json.dumps(figures))
    else:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
