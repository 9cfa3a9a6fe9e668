"""PyTorch conversion (litert-torch) against the Keras path (TFLiteConverter), same models.

    python -m benchmarks.torch_convert [--quick] --json

Needs .venv-torch (`make setup-torch`); the PyTorch side runs there, in a child process
(``--torch-side``), and everything is measured here on the agent's runtimes, as a device
runs the bundles.

``digits``: the example CNN trained in each framework and converted with the same data and
options: accuracy (float, int8, drop), conversion seconds and bundle bytes per framework.
``cnn``: one small image CNN (96x96x3, four 3x3 convolutions, global pooling, a dense
layer; random weights, calibrated on random images) built alike in both frameworks:
``int8_over_float`` (median invoke of the int8 model over the float one, per framework)
and ``torch_over_keras`` (the PyTorch-made int8 model's median invoke over the Keras-made
one, per installed runtime): what the PyTorch path costs on a device. Both ratios are
measured in one run, so the machine's speed cancels out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from converter.tfimport import import_runtimes_first

import_runtimes_first()  # before TensorFlow, or tflite_runtime interpreters fail

import numpy as np  # noqa: E402

from agent.models.manifest import Preprocess  # noqa: E402
from agent.models.runtime import available_runtimes  # noqa: E402
from benchmarks.quantization import median_invoke_s  # noqa: E402
from converter.examples import DIGITS_STD, build_digits  # noqa: E402
from converter.pipeline import ConvertOptions, run_convert  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TORCH_PY = ROOT / ".venv-torch" / "bin" / "python"
CNN_SIZE = 96
CNN_WIDTHS = (16, 32, 64, 128)


def digits_options(model: Path, out: Path, files_dir: Path, stem: str, quick: bool) -> Any:
    return ConvertOptions(
        model=model,
        out=out,
        calib=files_dir / f"{stem}-calib.npz",
        val=files_dir / f"{stem}-val.npz",
        samples=100 if quick else 300,
        labels=files_dir / f"{stem}-labels.txt",
        preprocess=Preprocess(std=[DIGITS_STD]),
        max_drop=1.0,  # measured here, not gated
        progress=False,
        golden=0,
    )


def converted(started: float, result: dict[str, Any]) -> dict[str, Any]:
    keys = ("float_accuracy", "int8_accuracy", "accuracy_drop", "top1_agreement", "model_bytes")
    return {**{k: result[k] for k in keys}, "convert_s": round(time.perf_counter() - started, 2)}


def calibration(n: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (n, CNN_SIZE, CNN_SIZE, 3)).astype(np.float32)


# The PyTorch side, in .venv-torch -------------------------------------------------------


def torch_side(out: Path, quick: bool) -> None:
    import torch
    from torch import nn

    from converter.torch_examples import build_digits_torch
    from converter.torch_source import TorchSourceModel, convert_torch

    files = build_digits_torch(out / "digits.pt2", epochs=6 if quick else 12)
    started = time.perf_counter()
    result = run_convert(digits_options(files.model, out / "digits-bundle", out, "digits", quick))
    report: dict[str, Any] = {"digits": converted(started, result)}

    torch.manual_seed(0)
    layers: list[Any] = []
    channels = 3
    for i, width in enumerate(CNN_WIDTHS):
        layers += [nn.Conv2d(channels, width, 3, stride=2 if i != 1 else 1, padding=1), nn.ReLU()]
        channels = width
    body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))
    import litert_torch

    module = litert_torch.to_channel_last_io(body.eval(), args=[0])
    shape = (1, CNN_SIZE, CNN_SIZE, 3)
    source = TorchSourceModel(Path("cnn"), "factory", module, shape, [(1, 10)], "nchw")
    started = time.perf_counter()
    (out / "cnn-float.tflite").write_bytes(convert_torch(source, None))
    (out / "cnn-int8.tflite").write_bytes(
        convert_torch(source, "int8", calibration(4 if quick else 32))
    )
    report["cnn_convert_s"] = round(time.perf_counter() - started, 2)
    (out / "torch.json").write_text(json.dumps(report))


# The Keras side and the measurements, here -----------------------------------------------


def keras_cnn(out: Path, quick: bool) -> float:
    from converter.convert import SourceModel, convert
    from converter.tfimport import import_tensorflow

    tf = import_tensorflow()
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    stack = [tf.keras.Input((CNN_SIZE, CNN_SIZE, 3))]
    for i, width in enumerate(CNN_WIDTHS):
        stack.append(
            layers.Conv2D(width, 3, strides=2 if i != 1 else 1, padding="same", activation="relu")
        )
    model = tf.keras.Sequential([*stack, layers.GlobalAveragePooling2D(), layers.Dense(10)])
    source = SourceModel(Path("cnn"), "keras", model, (1, CNN_SIZE, CNN_SIZE, 3), [(1, 10)])
    started = time.perf_counter()
    (out / "keras-cnn-float.tflite").write_bytes(convert(source, None))
    (out / "keras-cnn-int8.tflite").write_bytes(
        convert(source, "int8", calibration(4 if quick else 32))
    )
    return round(time.perf_counter() - started, 2)


def measure(out: Path, quick: bool, threads: int) -> dict[str, Any]:
    x = calibration(1)
    invokes = 10 if quick else 50
    models = {
        name: (out / f"{name}.tflite").read_bytes()
        for name in ("cnn-float", "cnn-int8", "keras-cnn-float", "keras-cnn-int8")
    }
    by_runtime: dict[str, Any] = {}
    for rt in available_runtimes():
        try:
            ms = {
                name: median_invoke_s(data, rt, threads, x, invokes) * 1e3
                for name, data in models.items()
            }
        except Exception as exc:  # one broken runtime must not hide the others' figures
            by_runtime[rt.name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            continue
        by_runtime[rt.name] = {
            "torch_int8_ms": round(ms["cnn-int8"], 3),
            "keras_int8_ms": round(ms["keras-cnn-int8"], 3),
            "torch_over_keras": round(ms["cnn-int8"] / ms["keras-cnn-int8"], 3),
            "int8_over_float": {
                "torch": round(ms["cnn-int8"] / ms["cnn-float"], 3),
                "keras": round(ms["keras-cnn-int8"] / ms["keras-cnn-float"], 3),
            },
        }
    return {
        "by_runtime": by_runtime,
        "int8_bytes": {
            "torch": len(models["cnn-int8"]),
            "keras": len(models["keras-cnn-int8"]),
        },
        "invokes": invokes,
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.torch_convert", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples and invokes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--torch-side", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_side:
        torch_side(args.torch_side, args.quick)
        return 0
    if not TORCH_PY.exists():
        print(f"benchmarks.torch_convert: no {TORCH_PY}: run make setup-torch", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-torch-") as tmp:
        out = Path(tmp)
        child = [str(TORCH_PY), "-m", "benchmarks.torch_convert", "--torch-side", str(out)]
        proc = subprocess.run(
            [*child, *(["--quick"] if args.quick else [])],
            capture_output=True, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        torch_report = json.loads((out / "torch.json").read_text())
        files = build_digits(out / "kdigits.keras", epochs=6 if args.quick else 12)
        begun = time.perf_counter()
        keras_digits = run_convert(
            digits_options(files.model, out / "kdigits-bundle", out, "kdigits", args.quick)
        )
        digits = {"torch": torch_report["digits"], "keras": converted(begun, keras_digits)}
        keras_convert_s = keras_cnn(out, args.quick)
        cnn = {
            **measure(out, args.quick, args.threads),
            "convert_s": {"torch": torch_report["cnn_convert_s"], "keras": keras_convert_s},
        }
    result = {
        "benchmark": "torch_convert",
        "quick": args.quick,
        "digits": digits,
        "cnn": cnn,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
