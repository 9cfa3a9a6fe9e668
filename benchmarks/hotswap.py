"""Hot-swap under a paced frame stream: dropped frames, result gaps, swap latency, memory.

    python -m benchmarks.hotswap [--quick] [--json] [--swaps N]

A paced synthetic source feeds an ``InferenceWorker``; the benchmark swaps it between
two versions of a model again and again. ``--quick`` uses a small int8 CNN (32x32x3)
at 100 fps; the full run an int8 MobileNetV2 (224x224x3, random weights, random
calibration) at 30 fps. Models are built with TensorFlow in a child process (the
agent never imports TensorFlow) and cached under ``$XDG_CACHE_HOME/edge-deploy``.

Figures: ``dropped`` = frames lost or repeated (frames_in - distinct results +
duplicates); ``max_gap_ratio`` = largest gap between consecutive results / median
gap; ``swap_ms_*`` = from the swap request to the first result of the new version;
``rss_growth_mb`` = resident memory after all swaps minus after the first 20.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.loops.frames import Frame, FrameQueue
from agent.loops.worker import InferenceResult, InferenceWorker
from agent.models import runtime as rt

_BUILD = r"""
import contextlib, io, sys
import numpy as np
import tensorflow as tf
kind, dest, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
tf.keras.utils.set_random_seed(seed)
if kind == "mobilenetv2":
    shape = (224, 224, 3)
    model = tf.keras.applications.MobileNetV2(weights=None, input_shape=shape)
    samples = 8
else:
    shape = (32, 32, 3)
    model = tf.keras.Sequential([
        tf.keras.Input(shape),
        tf.keras.layers.Conv2D(8, 3, activation="relu"),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Conv2D(16, 3, activation="relu"),
        tf.keras.layers.GlobalAveragePooling2D(),
        tf.keras.layers.Dense(10),
    ])
    samples = 16
rng = np.random.default_rng(seed)
def representative():
    for _ in range(samples):
        yield [rng.random((1, *shape), dtype=np.float32)]
conv = tf.lite.TFLiteConverter.from_keras_model(model)
conv.optimizations = [tf.lite.Optimize.DEFAULT]
conv.representative_dataset = representative
conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
conv.inference_input_type = tf.int8
conv.inference_output_type = tf.int8
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    data = conv.convert()
open(dest, "wb").write(data)
"""


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "edge-deploy" / "benchmarks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_model(kind: str, seed: int) -> Path:
    dest = _cache_dir() / f"{kind}-int8-seed{seed}.tflite"
    if not dest.exists():
        tmp = dest.with_suffix(".tmp")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        subprocess.run(
            [sys.executable, "-c", _BUILD, kind, str(tmp), str(seed)],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        tmp.rename(dest)
    return dest


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PacedSource:
    """Frames on a fixed schedule (no drift), like a camera at ``fps``."""

    def __init__(self, frames: FrameQueue, data: np.ndarray, fps: float) -> None:
        self.frames, self.data, self.period = frames, data, 1.0 / fps
        self.sent = 0
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-source", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        start = time.perf_counter()
        seq = 0
        while True:
            delay = start + seq * self.period - time.perf_counter()
            if self._stop.wait(max(0.0, delay)):
                return
            if self.frames.put(Frame(seq, time.time(), self.data)):
                self.sent = seq + 1
            else:
                self.refused += 1
            seq += 1


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seqs: list[int] = []
        self.versions: list[str] = []
        self.arrivals: list[float] = []
        self.first_of: dict[int, float] = {}  # swap number -> arrival of its first result
        self.expect: tuple[int, str] | None = None
        self.event = threading.Event()

    def __call__(self, r: InferenceResult) -> None:
        now = time.perf_counter()
        with self.lock:
            self.seqs.append(r.seq)
            self.versions.append(r.version)
            self.arrivals.append(now)
            if self.expect is not None and r.version == self.expect[1]:
                self.first_of[self.expect[0]] = now
                self.expect = None
                self.event.set()

    def count(self) -> int:
        with self.lock:
            return len(self.seqs)


def run(quick: bool, swaps: int) -> dict[str, Any]:
    kind = "small-cnn" if quick else "mobilenetv2"
    fps = 100.0 if quick else 30.0
    t0 = time.perf_counter()
    paths = {"a": build_model(kind, 0), "b": build_model(kind, 0 if not quick else 1)}
    build_s = time.perf_counter() - t0
    runtime = rt.select_runtime("auto")

    def load(path: Path) -> rt.LoadedModel:
        return rt.load_model(path, runtime=runtime, num_threads=1)

    probe = load(paths["a"])
    info = probe.inputs[0]
    data = np.random.default_rng(0).integers(-128, 127, info.shape, dtype=np.int8)
    del probe

    frames = FrameQueue(64)
    rec = Recorder()
    worker = InferenceWorker("bench", kind, frames, rec, load=load)
    source = PacedSource(frames, data, fps)
    worker.start()
    worker.swap("a", paths["a"]).result(120)
    source.start()
    while rec.count() < 10:
        time.sleep(0.01)

    swap_ms: list[float] = []
    swap_starts: list[float] = []
    rss_after_20 = 0.0
    version = "a"
    for i in range(swaps):
        version = "b" if version == "a" else "a"
        rec.event.clear()
        with rec.lock:
            rec.expect = (i, version)
        start = time.perf_counter()
        swap_starts.append(start)
        worker.swap(version, paths[version]).result(120)
        if not rec.event.wait(30):
            raise RuntimeError(f"no result of version {version} after swap {i}")
        swap_ms.append((rec.first_of[i] - start) * 1000)
        # Let a few frames through on the new version before the next swap.
        target = rec.count() + 3
        while rec.count() < target:
            time.sleep(0.002)
        if i + 1 == 20:
            gc.collect()
            rss_after_20 = rss_mb()
    gc.collect()
    rss_end = rss_mb()
    source.stop()
    deadline = time.monotonic() + 10
    while rec.count() < source.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = worker.stats(version)
    worker.stop()

    seqs = rec.seqs
    distinct = len(set(seqs))
    duplicates = len(seqs) - distinct
    missing = source.sent - distinct
    gaps = np.diff(np.array(rec.arrivals))
    median_gap = float(np.median(gaps))
    # Where the largest gap ended, relative to the swap request before it: tells a
    # swap-induced stall from scheduling noise on a busy machine.
    worst = int(np.argmax(gaps))
    worst_at = rec.arrivals[worst + 1]
    before = [t for t in swap_starts if t <= worst_at]
    since_swap_ms = (worst_at - before[-1]) * 1000 if before else None
    return {
        "benchmark": "hotswap",
        "quick": quick,
        "model": kind,
        "input": list(info.shape),
        "runtime": str(runtime),
        "fps": fps,
        "swaps": swaps,
        "frames_in": source.sent,
        "results_out": len(seqs),
        "dropped": missing + duplicates,
        "source_refused": source.refused,
        "in_order": seqs == sorted(seqs),
        "max_gap_ratio": round(float(gaps.max()) / median_gap, 3),
        "median_gap_ms": round(median_gap * 1000, 3),
        "max_gap_ms_after_swap_request": round(since_swap_ms, 1) if since_swap_ms else None,
        "gaps_over_1_5x": int((gaps > 1.5 * median_gap).sum()),
        "swap_ms_p50": round(statistics.median(swap_ms), 2),
        "swap_ms_max": round(max(swap_ms), 2),
        "invoke_ms_p50": round(stats.p50_ms, 3) if stats and stats.p50_ms else None,
        "rss_after_20_mb": round(rss_after_20, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_growth_mb": round(rss_end - rss_after_20, 2),
        "model_build_s": round(build_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.hotswap", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small model, within 60 s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--swaps", type=int, default=200)
    args = parser.parse_args(argv)
    result = run(args.quick, max(21, args.swaps))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
