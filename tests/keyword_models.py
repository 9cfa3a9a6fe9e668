"""A tiny keyword spotter on synthetic audio, converted to an int8 bundle by the converter.

The "keywords" are tone patterns at 8 kHz: ``up`` a rising chirp, ``down`` a falling
one, ``_silence_`` low noise. Windows of 0.5 s become 30 x 20 log-mel frames through
the agent's own ``LogMel`` (the calibration and validation data are those features, so
the bundle is quantised for what a device computes); the manifest's ``preprocess.audio``
is set through the converter's Python API (``ConvertOptions.preprocess``).

    bundle = build_keyword_bundle(tmp_path / "kws", sign_key=key)
    write_wav(path, clip(["_silence_", "up", "_silence_", "down", "_silence_"]))

TensorFlow is imported lazily (after the TFLite runtimes); with ``EDGE_TEST_MODELS`` set
the bundle is a copy of the one tests/prebuilt_models.py built.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import wave
from pathlib import Path

import numpy as np

from agent.loops.audio_features import LogMel
from agent.models.manifest import AudioFeatures, Preprocess
from converter.bundle import load_signing_key, sign_bundle
from converter.pipeline import ConvertOptions, run_convert
from tests.model_factory import prebuilt

SAMPLE_RATE = 8000
WINDOW_S = 0.5
LABELS = ["_silence_", "down", "up"]
FEATURES = AudioFeatures(
    sample_rate=SAMPLE_RATE, features="log_mel", n_fft=256, hop=128, n_mels=20, fmin=100.0
)
FRAMES = 30  # 1 + (0.5 s * 8000 - 256) // 128
CHIRP_S = 0.3
KEYWORD_BUNDLE = "bundle-keyword-v1"
_trained: dict[str, Path] = {}


def noise(seconds: float, rng: np.random.Generator, level: float = 0.01) -> np.ndarray:
    return (rng.standard_normal(round(seconds * SAMPLE_RATE)) * level).astype(np.float32)


def chirp(word: str, rng: np.random.Generator, amplitude: float = 0.5) -> np.ndarray:
    """A linear chirp of CHIRP_S: 500 -> 2500 Hz for up, the reverse for down."""
    lo, hi = 500.0 + rng.uniform(-100, 100), 2500.0 + rng.uniform(-200, 200)
    f0, f1 = (lo, hi) if word == "up" else (hi, lo)
    t = np.arange(round(CHIRP_S * SAMPLE_RATE)) / SAMPLE_RATE
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * CHIRP_S))
    fade = np.minimum(1.0, np.minimum(t, CHIRP_S - t) / 0.02)  # no clicks at the ends
    return (amplitude * fade * np.sin(phase)).astype(np.float32)


def window_of(word: str, rng: np.random.Generator) -> np.ndarray:
    """One 0.5 s training window: noise, with the word's chirp (whole or cut by the
    window's edge, as a sliding window sees it) when it is not silence."""
    x = noise(WINDOW_S, rng, rng.uniform(0.002, 0.03))
    if word != "_silence_":
        c = chirp(word, rng, rng.uniform(0.2, 0.9))
        # Mostly inside; sometimes up to a third cut off at either edge.
        start = int(rng.integers(-len(c) // 3, len(x) - 2 * len(c) // 3))
        lo, hi = max(0, start), min(len(x), start + len(c))
        x[lo:hi] += c[lo - start : hi - start]
    return x


def features(windows: np.ndarray) -> np.ndarray:
    log_mel = LogMel(FEATURES)
    return np.stack([log_mel(w) for w in windows])


def clip(words: list[str], seed: int = 3, gap_s: float = 1.0) -> np.ndarray:
    """A recording: each word is a chirp (centred in ``gap_s`` of noise) or noise alone."""
    rng = np.random.default_rng(seed)
    parts = []
    for word in words:
        part = noise(gap_s, rng)
        if word != "_silence_":
            c = chirp(word, rng)
            at = (len(part) - len(c)) // 2
            part[at : at + len(c)] += c
        parts.append(part)
    return np.concatenate(parts)


def write_wav(path: Path, audio: np.ndarray, channels: int = 1, rate: int = SAMPLE_RATE) -> Path:
    """16-bit PCM; with 2 channels the same signal in both."""
    pcm = np.clip(np.round(audio * 32767), -32768, 32767).astype("<i2")
    if channels == 2:
        pcm = np.repeat(pcm, 2)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def _train(workdir: Path) -> Path:
    """The Keras model and its data files in ``workdir``; returns the model's path."""
    import tensorflow as tf

    from converter.tfimport import quiet_fds

    rng = np.random.default_rng(0)
    y = np.tile(np.arange(len(LABELS)), 200)
    x = features(np.stack([window_of(LABELS[i], rng) for i in y]))
    mean, std = float(x.mean()), float(x.std())
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((FRAMES, FEATURES.n_mels, 1)),
            tf.keras.layers.Conv2D(8, 3, activation="relu"),
            tf.keras.layers.MaxPooling2D(2),
            tf.keras.layers.Conv2D(16, 3, activation="relu"),
            tf.keras.layers.GlobalAveragePooling2D(),
            tf.keras.layers.Dense(len(LABELS), activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(((x - mean) / std)[..., None], y, epochs=12, batch_size=32, verbose=0)
    path = workdir / "keyword.keras"
    with quiet_fds():
        model.save(path)
    n_val = 150
    np.savez(workdir / "calib.npz", x=x[:-n_val])
    np.savez(workdir / "val.npz", x=x[-n_val:], y=y[-n_val:])
    (workdir / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    (workdir / "norm.txt").write_text(f"{mean} {std}\n", encoding="utf-8")
    return path


def build_keyword_bundle(dest: Path, version: str = "1", sign_key: Path | None = None) -> Path:
    """The int8 keyword bundle (task keyword, log-mel front end) at ``dest``."""
    if prebuilt(f"{KEYWORD_BUNDLE}" if version == "1" else f"{KEYWORD_BUNDLE}-{version}", dest):
        key = load_signing_key(sign_key)
        if key is not None:
            sign_bundle(dest, key)
        return dest
    if "model" not in _trained:
        workdir = Path(tempfile.mkdtemp(prefix="edge-keyword-"))
        atexit.register(shutil.rmtree, workdir, True)
        _trained["model"] = _train(workdir)
    model = _trained["model"]
    mean, std = (float(v) for v in (model.parent / "norm.txt").read_text().split())
    run_convert(
        ConvertOptions(
            model=model,
            out=dest,
            calib=model.parent / "calib.npz",
            val=model.parent / "val.npz",
            samples=100,
            task="keyword",
            labels=model.parent / "labels.txt",
            name="keyword",
            version=version,
            preprocess=Preprocess(mean=[mean], std=[std], audio=FEATURES),
            sign_key=sign_key,
            progress=False,
            # The gate compares accuracy; synthetic keywords leave a margin.
            max_drop=0.05,
        )
    )
    return dest
