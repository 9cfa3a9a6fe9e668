"""What int8 quantisation buys: size, accuracy and invoke latency, int8 vs float.

    python -m benchmarks.quantization [--quick] --json

digits (the example CNN, trained here): ``size_ratio`` (int8 / float .tflite bytes),
``accuracy_drop`` and ``top1_agreement`` on its held-out set. MobileNetV2 (untrained,
224x224x3, calibrated with random images): ``size_ratio`` and ``latency_ratio``
(int8 / float median invoke time on the agent's default runtime, same thread
count, both measured in this run), and the same ratio for every installed runtime
in ``latency_ratio_by_runtime``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from converter.tfimport import import_runtimes_first

import_runtimes_first()  # before TensorFlow, or tflite_runtime interpreters fail

import numpy as np  # noqa: E402

from agent.models.manifest import Preprocess  # noqa: E402
from agent.models.runtime import Runtime, available_runtimes, load_model, select_runtime  # noqa: E402
from converter.convert import SourceModel, convert  # noqa: E402
from converter.examples import DIGITS_STD, build_digits  # noqa: E402
from converter.pipeline import ConvertOptions, run_convert  # noqa: E402
from converter.tfimport import import_tensorflow, quiet_fds  # noqa: E402


def bench_digits(workdir: Path, quick: bool) -> dict[str, Any]:
    files = build_digits(workdir / "digits.keras", epochs=6 if quick else 12)
    result = run_convert(
        ConvertOptions(
            model=files.model,
            out=workdir / "digits-bundle",
            calib=files.calib,
            val=files.val,
            samples=100 if quick else 300,
            labels=files.labels,
            preprocess=Preprocess(std=[DIGITS_STD]),
            max_drop=1.0,  # measured here, not gated
            progress=False,
        )
    )
    return {
        k: result[k]
        for k in (
            "size_ratio",
            "accuracy_drop",
            "top1_agreement",
            "float_accuracy",
            "int8_accuracy",
            "model_bytes",
            "float_model_bytes",
        )
    }


def median_invoke_s(model: bytes, runtime: Runtime, threads: int, x: np.ndarray, n: int) -> float:
    loaded = load_model(model, runtime=runtime, num_threads=threads)
    inp = loaded.inputs[0]
    loaded.interpreter.set_tensor(inp.index, inp.quantize(x))
    loaded.interpreter.invoke()  # warm-up: first invoke allocates and packs weights
    times = []
    for _ in range(n):
        start = time.perf_counter()
        loaded.interpreter.invoke()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_mobilenet(quick: bool, threads: int) -> dict[str, Any]:
    tf = import_tensorflow()
    tf.keras.utils.set_random_seed(0)
    with quiet_fds():
        keras_model = tf.keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    source = SourceModel(Path("MobileNetV2"), "keras", keras_model, (1, 224, 224, 3), [(1, 1000)])
    calib_n = 4 if quick else 64
    calib = np.random.default_rng(0).uniform(-1, 1, (calib_n, 224, 224, 3)).astype(np.float32)
    float_model = convert(source, None)
    int8_model = convert(source, "int8", calib)
    x = calib[:1]
    invokes = 5 if quick else 30
    default = select_runtime("auto")
    by_runtime: dict[str, float] = {}
    medians: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for rt in available_runtimes():
        try:
            f = median_invoke_s(float_model, rt, threads, x, invokes)
            q = median_invoke_s(int8_model, rt, threads, x, invokes)
        except Exception as exc:  # one broken runtime must not hide the others' figures
            errors[rt.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            continue
        by_runtime[rt.name] = round(q / f, 3)
        medians[rt.name] = {"float_ms": round(f * 1e3, 2), "int8_ms": round(q * 1e3, 2)}
    return {
        "size_ratio": round(len(int8_model) / len(float_model), 4),
        "model_bytes": len(int8_model),
        "float_model_bytes": len(float_model),
        "default_runtime": str(default),
        "latency_ratio": by_runtime.get(default.name),
        "latency_ratio_by_runtime": by_runtime,
        "median_invoke_by_runtime": medians,
        "runtime_errors": errors,
        "calibration_samples": calib_n,
        "invokes": invokes,
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.quantization", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples; under 60 s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        digits = bench_digits(Path(tmp), args.quick)
    result = {
        "benchmark": "quantization",
        "quick": args.quick,
        "digits": digits,
        "mobilenet_v2": bench_mobilenet(args.quick, args.threads),
    }
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
