"""Output drift in the field: what the statistics cost per frame, and how the distance
(PSI) behaves on steady and on changed scenes.

    python -m benchmarks.drift [--quick] [--json]

The digits example (``edge-convert example digits``, converted int8 with ``--val``;
built once in a child process, TensorFlow never enters this one, and cached under
``$XDG_CACHE_HOME/edge-deploy/benchmarks``) on the default runtime. Its reference
statistics are the manifest's when the converter records them, otherwise computed here
the same way (``health.classify_reference`` on the int8 model's outputs on the
validation set).

- ``results_us``: the results thread's time per frame (``Pipeline._on_result``:
  post-processing, drift statistics, the ``Result`` handed to a sink), replayed on
  results recorded from a real pipeline, with ``drift.enabled`` off and on (the best
  of alternating turns); ``results_ratio`` = on / off; ``drift_add_us``: the drift
  statistics' own part (``DriftMonitor.add``), alone. ``evaluate_us``: one binning
  of a full window (median; what a telemetry read or the service's tick costs).
- ``steady``: PSI of the default window (500 frames, checked every 15 frames: 1 s
  at 15 fps) over a long steady stream, against the reference, for three scenes:
  ``synthetic`` (the synthetic digits source: 200 digits in a loop, most of them
  training digits, so the model is surer of them than of its validation set),
  ``held_out`` (random draws from half the validation set, the reference made from the
  other half: sampling noise on both sides, nothing else), and ``held_out_noisy``
  (the same with sensor noise, sigma 6 of 255). ``psi_p50``, ``psi_p99``,
  ``psi_max`` and ``false_alarms`` (warnings raised at the default threshold 0.25),
  also per hour at 15 fps.
- ``changed``: after a steady stretch, the scene changes (inverted digits; half as
  bright; only ones): ``psi_after`` (a full window later) and ``frames_to_warning``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import DriftConfig, PipelineConfig
from agent.loops.drift import DriftMonitor
from agent.loops.pipeline import Pipeline
from agent.loops.postprocess import Classifier, FrameContext
from agent.loops.preprocess import make_preprocessor
from agent.loops.sources.synthetic import digit_samples
from agent.loops.worker import InferenceResult
from agent.models import runtime as rt
from agent.models.health import Reference, classify_reference
from agent.models.manifest import Manifest, read_bundle

BUNDLE_KIND = "digits-bundle-v1"
CHECK_EVERY = 15  # frames between evaluations: 1 s at 15 fps
FPS = 15.0
PASSES = 5  # over the recorded results per timed turn


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "edge-deploy" / "benchmarks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_bundle() -> tuple[Path, Path]:
    """The digits bundle and its validation set (x 0..255, y), built once via edge-convert."""
    dest = _cache_dir() / BUNDLE_KIND
    if (dest / "bundle" / "manifest.json").exists():
        return dest / "bundle", dest / "digits-val.npz"
    with tempfile.TemporaryDirectory(prefix="bench-digits-", dir=dest.parent) as tmp:
        work = Path(tmp)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        cli = [sys.executable, "-m", "converter"]
        keras = work / "digits.keras"
        for command in (
            ["example", "digits", "-o", str(keras)],
            [
                "convert", str(keras), "--calib", str(work / "digits-calib.npz"),
                "--val", str(work / "digits-val.npz"), "--labels", str(work / "digits-labels.txt"),
                "--samples", "100", "--std", "255", "--name", "digits", "-o", str(work / "bundle"),
            ],
        ):  # fmt: skip
            subprocess.run([*cli, *command], check=True, env=env, stdout=subprocess.DEVNULL)
        keep = work / "keep"
        keep.mkdir()
        (work / "bundle").rename(keep / "bundle")
        (work / "digits-val.npz").rename(keep / "digits-val.npz")
        keep.rename(dest)
    return dest / "bundle", dest / "digits-val.npz"


class Digits:
    """The int8 digits model run frame by frame as the pipeline runs it (same
    pre-processing, same post-processing), for streams too long to run in real time."""

    def __init__(self, bundle: Path, manifest: Manifest) -> None:
        self.model = rt.load_model(bundle / "model.tflite", num_threads=1)
        self.pre = make_preprocessor(self.model.inputs[0], manifest.preprocess)
        self.post = Classifier(self.model.outputs, manifest.labels, top_k=3)

    def codes(self, image: np.ndarray) -> np.ndarray:
        interpreter = self.model.interpreter
        tensor, _ = self.pre(image.reshape(8, 8, 1).astype(np.uint8))
        interpreter.set_tensor(self.model.inputs[0].index, tensor)
        interpreter.invoke()
        return interpreter.get_tensor(self.model.outputs[0].index)

    def scores(self, images: np.ndarray) -> np.ndarray:
        out = self.model.outputs[0]
        return np.stack([out.dequantize(self.codes(im)).reshape(-1) for im in images])


def reference_of(digits: Digits, manifest: Manifest, images: np.ndarray) -> Reference:
    return Reference(samples=len(images), classify=classify_reference(digits.scores(images)))


def run_stream(
    digits: Digits,
    reference: Reference,
    frames: Iterator[np.ndarray],
    count: int,
) -> dict[str, Any]:
    """Feed ``count`` frames through a DriftMonitor (default settings) and read it
    every CHECK_EVERY frames, as the service's tick would."""
    monitor = DriftMonitor("bench", DriftConfig())
    cache: dict[bytes, np.ndarray] = {}
    psis: list[tuple[int, float]] = []  # (frames so far, PSI)
    alarms = 0
    first_warning: int | None = None
    warned = False
    for n in range(count):
        image = next(frames)
        key = image.tobytes()
        codes = cache.get(key)
        if codes is None:
            codes = digits.codes(image)
            if len(cache) < 10_000:
                cache[key] = codes
        monitor.add("1", reference, digits.post([codes], FrameContext()))
        if (n + 1) % CHECK_EVERY == 0:
            figures = monitor.evaluate("1")
            if figures is not None and figures.distance is not None:
                psis.append((n + 1, figures.distance))
            now_warned = monitor.warning is not None
            if now_warned and not warned:
                alarms += 1
                if first_warning is None:
                    first_warning = n + 1
            warned = now_warned
    return {"psis": psis, "alarms": alarms, "first_warning": first_warning}


def steady_figures(result: dict[str, Any], frames: int) -> dict[str, Any]:
    psis = np.asarray([psi for _, psi in result["psis"]])
    hours = frames / FPS / 3600
    return {
        "frames": frames,
        "psi_p50": round(float(np.quantile(psis, 0.5)), 4),
        "psi_p99": round(float(np.quantile(psis, 0.99)), 4),
        "psi_max": round(float(psis.max()), 4),
        "false_alarms": result["alarms"],
        "false_alarms_per_hour_at_15fps": round(result["alarms"] / hours, 3),
    }


def draws(pool: np.ndarray, seed: int, noise: float = 0.0) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    while True:
        image = pool[rng.integers(len(pool))].astype(np.float32)
        if noise:
            image = image + rng.normal(0.0, noise, image.shape)
        yield np.clip(np.round(image), 0, 255).astype(np.uint8)


def cycle(pool: np.ndarray) -> Iterator[np.ndarray]:
    while True:
        yield from pool


def changed_after(
    steady: Iterator[np.ndarray], changed: Iterator[np.ndarray], at: int
) -> Iterator[np.ndarray]:
    for _ in range(at):
        yield next(steady)
    yield from changed


def mapped(frames: Iterator[np.ndarray], f: Callable[[np.ndarray], np.ndarray]) -> Iterator[Any]:
    return (f(x) for x in frames)


# ------------------------------------------------------------- results thread cost


def record_results(bundle: Path, manifest: Manifest, count: int) -> list[InferenceResult]:
    """``count`` results of a real pipeline (synthetic digits, fifo) as its results
    thread received them."""
    recorded: list[InferenceResult] = []

    class Recording(Pipeline):
        def _on_result(self, result: InferenceResult) -> None:
            if len(recorded) < count:
                recorded.append(result)
            super()._on_result(result)

    source = {"type": "synthetic", "kind": "digits", "width": 32, "height": 32,
              "channels": 1, "fps": 1000}  # fmt: skip
    pipeline = Recording(
        PipelineConfig.model_validate(
            {"name": "cam", "model": "digits", "source": source, "queue": "fifo"}
        ),
        device="bench",
        manifests=lambda _n, _v: manifest,
        publish=lambda _r: None,
        load=lambda path: rt.load_model(path, num_threads=1),
    )
    pipeline.start()
    try:
        pipeline.worker.swap("1", bundle / "model.tflite").result(60)
        deadline = time.monotonic() + 120
        while len(recorded) < count and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pipeline.stop()
    return recorded


def results_cost(recorded: list[InferenceResult], turns: int) -> dict[str, Any]:
    """Each recorded result carries the processing (and reference) that prepared it."""

    def replay_us(enabled: bool) -> float:
        published: list[Any] = []
        pipeline = Pipeline(
            PipelineConfig.model_validate(
                {
                    "name": "cam",
                    "model": "digits",
                    "drift": {"enabled": enabled},
                    "source": {"type": "synthetic", "kind": "digits"},
                }
            ),
            device="bench",
            manifests=lambda _n, _v: None,  # not asked: no frames are prepared here
            publish=published.append,
            load=lambda path: rt.load_model(path),
        )
        gc.collect()
        gc.disable()  # as timeit does: a collection lands on whichever turn it likes
        try:
            start = time.perf_counter()
            for _ in range(PASSES):
                for result in recorded:
                    pipeline._on_result(result)
            elapsed = time.perf_counter() - start
        finally:
            gc.enable()
        assert len(published) == PASSES * len(recorded), "every result published"
        figures = pipeline.drift.evaluate("1")
        assert (figures is not None and figures.distance is not None) == enabled
        return elapsed / (PASSES * len(recorded)) * 1e6

    def add_us() -> float:
        monitor = DriftMonitor("bench", DriftConfig())
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            for _ in range(PASSES):
                for result, reference, output in outputs:
                    monitor.add(result.version, reference, output)
            elapsed = time.perf_counter() - start
        finally:
            gc.enable()
        return elapsed / (PASSES * len(outputs)) * 1e6

    outputs = [
        (r, r.context.processing.reference, r.context.processing.post(r.outputs, r.context.frame))
        for r in recorded
    ]
    off: list[float] = []
    on: list[float] = []
    for turn in range(turns):
        for enabled in (False, True) if turn % 2 else (True, False):
            (on if enabled else off).append(replay_us(enabled))
    # The best turn of each: load from elsewhere only ever adds time.
    off_us, on_us = min(off), min(on)
    return {
        "drift_add_us": round(min(add_us() for _ in range(turns)), 2),
        "results_us_off": round(off_us, 2),
        "results_us_on": round(on_us, 2),
        "results_ratio": round(on_us / off_us, 3),
        "frames": len(recorded),
    }


def evaluate_cost(digits: Digits, reference: Reference, frames: np.ndarray, turns: int) -> float:
    monitor = DriftMonitor("bench", DriftConfig())
    for image in frames[:500]:
        monitor.add("1", reference, digits.post([digits.codes(image)], FrameContext()))
    times = []
    for _ in range(turns):
        start = time.perf_counter()
        monitor.evaluate("1")
        times.append((time.perf_counter() - start) * 1e6)
    return round(statistics.median(times), 1)


# ------------------------------------------------------------------------------ run


def run(quick: bool) -> dict[str, Any]:
    started = time.perf_counter()
    bundle, val_path = build_bundle()
    manifest = read_bundle(bundle).manifest
    digits = Digits(bundle, manifest)
    val = np.load(val_path)
    x_val = np.round(val["x"]).astype(np.uint8).reshape(-1, 8, 8)
    y_val = val["y"]
    half = len(x_val) // 2
    reference = manifest.reference or reference_of(digits, manifest, x_val)
    half_reference = reference_of(digits, manifest, x_val[:half])
    synthetic, _ = digit_samples()
    n = 20_000 if quick else 108_000  # 22 min / 2 h at 15 fps

    steady = {
        "synthetic": steady_figures(run_stream(digits, reference, cycle(synthetic), n), n),
        "held_out": steady_figures(
            run_stream(digits, half_reference, draws(x_val[half:], 1), n), n
        ),
        "held_out_noisy": steady_figures(
            run_stream(digits, half_reference, draws(x_val[half:], 2, noise=6.0), n), n
        ),
    }
    at, after = 1000, 1000
    scenes: dict[str, Iterator[np.ndarray]] = {
        "inverted": mapped(draws(x_val[half:], 3), lambda x: 255 - x),
        "half_bright": mapped(draws(x_val[half:], 4), lambda x: (x // 2).astype(np.uint8)),
        "only_ones": draws(x_val[half:][y_val[half:] == 1], 5),
    }
    changed = {}
    for name, scene in scenes.items():
        result = run_stream(
            digits,
            half_reference,
            changed_after(draws(x_val[half:], 6), scene, at),
            at + after,
        )
        first = result["first_warning"]
        before = [psi for frame, psi in result["psis"] if frame <= at]
        changed[name] = {
            "psi_before": round(before[-1], 4),
            "psi_after": round(result["psis"][-1][1], 4),
            "frames_to_warning": None if first is None else first - at,
        }
    turns = 6 if quick else 20
    with_reference = manifest.model_copy(update={"reference": reference})
    recorded = record_results(bundle, with_reference, 1000 if quick else 3000)
    cost = results_cost(recorded, turns)
    return {
        "benchmark": "drift",
        "quick": quick,
        "model": "digits int8 (edge-convert)",
        "runtime": str(rt.select_runtime("auto")),
        "reference": "manifest" if manifest.reference else "computed here from --val",
        "window": DriftConfig().window,
        "threshold": DriftConfig().threshold,
        **cost,
        "evaluate_us": evaluate_cost(digits, reference, x_val, 50 if quick else 200),
        "steady": steady,
        "changed": changed,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.drift", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter streams; under 60 s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run(args.quick)
    if args.json:
        print(json.dumps(result))
    else:
        json.dump(result, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
