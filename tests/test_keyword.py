"""Keyword spotting: audio sources, the log-mel front end, the keyword post-processor,
a converter-built keyword bundle on both runtimes, and a real agent over MQTT."""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agent.config import KeywordConfig, MicrophoneSource, WavSource
from agent.loops.audio_features import LogMel, mel_to_hz
from agent.loops.frames import FrameQueue
from agent.loops.keyword import DEFAULT_THRESHOLD, KeywordSpotter
from agent.loops.postprocess import FrameContext
from agent.loops.preprocess import AudioPreprocessor, PreprocessError, make_preprocessor
from agent.loops.sources import CaptureThread, EndOfStream, SourceError, create_source
from agent.loops.sources.audio import AUDIO_TIME
from agent.models.manifest import AudioFeatures, Preprocess, generate_keypair, read_bundle
from agent.models.output_fit import OutputMismatch, check_outputs
from agent.models.runtime import TensorInfo, load_model
from agent.protocol import Result, Telemetry
from tests.device_venv import DEVICE_RUNTIMES
from tests.fleet_support import deploy_over_mqtt
from tests.keyword_models import (
    LABELS,
    SAMPLE_RATE,
    WINDOW_S,
    build_keyword_bundle,
    clip,
    write_wav,
)
from tests.mqtt_support import Broker, MessageCollector

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------- log-mel


def _slow_log_mel(audio: np.ndarray, spec: AudioFeatures) -> np.ndarray:
    """The textbook formula, one frame, band and bin at a time: a DFT by its sum, HTK
    mel edges, triangles from their definition."""
    n_fft, hop, sr = spec.n_fft, spec.hop, spec.sample_rate
    fmax = spec.fmax or sr / 2
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    step = (mel(fmax) - mel(spec.fmin)) / (spec.n_mels + 1)
    points = [
        700 * (10 ** ((mel(spec.fmin) + i * step) / 2595) - 1) for i in range(spec.n_mels + 2)
    ]
    n = np.arange(n_fft)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    frames = 1 + (len(audio) - n_fft) // hop
    out = np.zeros((frames, spec.n_mels))
    for t in range(frames):
        x = audio[t * hop : t * hop + n_fft] * hann
        power = [
            abs(np.sum(x * np.exp(-2j * np.pi * k * n / n_fft))) ** 2 for k in range(n_fft // 2 + 1)
        ]
        for m in range(spec.n_mels):
            lo, c, hi = points[m], points[m + 1], points[m + 2]
            total = 0.0
            for k, p in enumerate(power):
                f = k * sr / n_fft
                if lo < f <= c:
                    total += p * (f - lo) / (c - lo)
                elif c < f < hi:
                    total += p * (hi - f) / (hi - c)
            out[t, m] = np.log(total + 1e-6)
    return out


def test_log_mel_matches_the_formula_and_peaks_at_the_tone() -> None:
    spec = AudioFeatures(sample_rate=8000, n_fft=128, hop=64, n_mels=16, fmin=50.0)
    tone_hz = 1200.0
    t = np.arange(1024) / 8000
    audio = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
    fast = LogMel(spec)(audio)
    assert fast.shape == (1 + (1024 - 128) // 64, 16)
    np.testing.assert_allclose(fast, _slow_log_mel(audio, spec), atol=1e-3, rtol=1e-4)
    # The loudest band is the one whose centre is nearest the tone.
    centres = mel_to_hz(
        np.linspace(2595 * np.log10(1 + 50 / 700), 2595 * np.log10(1 + 4000 / 700), 18)
    )[1:-1]
    expected = int(np.argmin(abs(centres - tone_hz)))
    assert set(np.argmax(fast, axis=1).tolist()) == {expected}


def test_audio_preprocessor_shapes_and_refuses_a_window_of_the_wrong_length() -> None:
    spec = Preprocess(
        mean=[-2.0], std=[2.0], audio=AudioFeatures(sample_rate=8000, n_fft=256, hop=128, n_mels=20)
    )
    tensor = TensorInfo("in", 0, (1, 30, 20, 1), "int8", 0.03, -28)
    pre = make_preprocessor(tensor, spec)
    assert isinstance(pre, AudioPreprocessor)
    x, _ = pre(np.zeros(4000, np.float32))
    assert x.shape == (1, 30, 20, 1) and x.dtype == np.int8
    with pytest.raises(PreprocessError, match=r"2000 samples gives 14 log-mel frames; input 'in'"):
        pre(np.zeros(2000, np.float32))
    with pytest.raises(PreprocessError, match=r"\[1, frames, 20\]"):
        AudioPreprocessor(TensorInfo("in", 0, (1, 30, 16, 1), "int8", 0.03, 0), spec)
    waveform = Preprocess(audio=AudioFeatures(features="waveform"))
    raw = make_preprocessor(TensorInfo("wave", 0, (1, 16000), "float32", 0.0, 0), waveform)
    assert raw(np.ones(16000, np.float32))[0].shape == (1, 16000)
    with pytest.raises(PreprocessError, match="8000 samples does not fit waveform input 'wave'"):
        raw(np.ones(8000, np.float32))


# ---------------------------------------------------------------------- sources


def _wav_source(path: Path, **kw: Any) -> Any:
    config = WavSource(type="wav", path=path, sample_rate=8000, window_s=0.5, hop_s=0.125, **kw)
    source = create_source(config)
    source.open()
    return source


def test_wav_windows_and_hops_are_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    audio = rng.uniform(-0.9, 0.9, 8000 * 2 + 300).astype(np.float32)
    write_wav(tmp_path / "a.wav", audio)
    write_wav(tmp_path / "stereo.wav", audio, channels=2)
    codes = np.clip(np.round(audio * 32767), -32768, 32767) / 32768
    for name in ("a.wav", "stereo.wav"):
        source = _wav_source(tmp_path / name, loop=False, pace="fast")
        windows = []
        with pytest.raises(EndOfStream):
            while True:
                windows.append(source.read())
        source.close()
        # (16300 - 4000) // 1000 + 1 windows, each 4000 samples, 1000 apart.
        assert len(windows) == 13
        for k, (window, meta) in enumerate(windows):
            assert window.dtype == np.float32 and window.shape == (4000,)
            np.testing.assert_allclose(window, codes[k * 1000 : k * 1000 + 4000], atol=1e-6)
            assert meta[AUDIO_TIME] == pytest.approx(0.5 + k * 0.125)
    assert source.fps is None
    assert _wav_source(tmp_path / "a.wav").fps == 8.0


def test_a_looped_wav_is_one_continuous_stream(tmp_path: Path) -> None:
    audio = np.linspace(-0.5, 0.5, 5000).astype(np.float32)
    write_wav(tmp_path / "a.wav", audio)
    codes = np.round(audio * 32767) / 32768
    source = _wav_source(tmp_path / "a.wav", pace="fast")
    windows = [source.read() for _ in range(6)]
    stream = np.concatenate([codes, codes])
    for k, (window, meta) in enumerate(windows):
        np.testing.assert_allclose(window, stream[k * 1000 : k * 1000 + 4000], atol=1e-6)
        assert meta[AUDIO_TIME] == pytest.approx(0.5 + k * 0.125)


def test_wav_files_that_cannot_be_read_are_one_line_errors(tmp_path: Path) -> None:
    write_wav(tmp_path / "16k.wav", np.zeros(100, np.float32), rate=16000)
    with pytest.raises(
        SourceError,
        match=r"sample rate 16000 Hz, the source's sample_rate is 8000 Hz \(resampling is not done",
    ):
        _wav_source(tmp_path / "16k.wav")
    import wave

    with wave.open(str(tmp_path / "8bit.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(1), w.setframerate(8000)
        w.writeframes(bytes(100))
    with pytest.raises(SourceError, match="8-bit samples, only 16-bit PCM"):
        _wav_source(tmp_path / "8bit.wav")
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(SourceError, match="not a PCM WAV file"):
        _wav_source(tmp_path / "text.wav")
    with pytest.raises(SourceError, match="WAV file not found"):
        _wav_source(tmp_path / "missing.wav")


def test_microphone_without_sounddevice_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails as when missing
    source = create_source(MicrophoneSource(type="microphone"))
    with pytest.raises(
        SourceError, match=r"^sounddevice is not installed: pip install 'edge-deploy\[audio\]'"
    ):
        source.open()


def _expected_microphone_error(device: str) -> str:
    """The one path this machine takes when the microphone cannot open: `make setup`
    installs sounddevice and PortAudio, so here it is PortAudio's own answer."""
    if importlib.util.find_spec("sounddevice") is None:
        return "sounddevice is not installed: pip install 'edge-deploy[audio]'"
    if ctypes.util.find_library("portaudio") is None:
        return "PortAudio is not available"
    return f"cannot open microphone {device!r}: No input device matching {device!r}"


def test_a_microphone_that_cannot_open_is_reported_not_fatal() -> None:
    """The capture thread reports one line naming the device and retries; nothing
    raises out of it."""
    device = "no-such-microphone-xyz"
    source = create_source(MicrophoneSource(type="microphone", device=device))
    capture = CaptureThread("mic", source, FrameQueue(), min_backoff_s=0.05, max_backoff_s=0.1)
    capture.start()
    try:
        deadline = time.monotonic() + 10
        while capture.failures < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert capture.failures >= 2 and capture.alive
        assert capture.state == "reconnecting"
        error = capture.last_error or ""
        assert "\n" not in error
        assert _expected_microphone_error(device) in error, error
    finally:
        capture.stop()


def test_the_default_microphone_of_a_machine_without_one_is_a_portaudio_error() -> None:
    sd = pytest.importorskip("sounddevice", reason="sounddevice not installed (extra audio)")
    if any(d["max_input_channels"] > 0 for d in sd.query_devices()):
        pytest.skip("this machine has an input device")
    source = create_source(MicrophoneSource(type="microphone"))
    with pytest.raises(SourceError, match=r"^cannot open microphone 'default': \S") as err:
        source.open()
    assert "\n" not in str(err.value)


# -------------------------------------------------------------- keyword spotter


def _spotter(threshold: float = 0.0, **kw: Any) -> KeywordSpotter:
    out = TensorInfo("scores", 0, (1, 4), "float32", 0.0, 0)
    return KeywordSpotter(
        [out], ["_silence_", "_unknown_", "up", "down"], KeywordConfig(**kw), threshold
    )


def _probs(*p: float) -> list[np.ndarray]:
    return [np.asarray([p], np.float32)]


def test_keywords_fire_once_above_threshold_and_not_again_within_the_refractory_time() -> None:
    spot = _spotter(threshold=0.7, refractory_s=1.0)
    fired = []
    for at, p in [
        (0.00, (0.9, 0.05, 0.03, 0.02)),  # silence: never fires
        (0.25, (0.1, 0.85, 0.03, 0.02)),  # unknown: never fires
        (0.50, (0.3, 0.1, 0.6, 0.0)),  # up, below threshold
        (0.75, (0.1, 0.0, 0.9, 0.0)),  # up fires
        (1.00, (0.0, 0.0, 0.95, 0.05)),  # still up: refractory
        (1.25, (0.1, 0.0, 0.1, 0.8)),  # down: its own refractory, fires
        (1.90, (0.1, 0.0, 0.8, 0.1)),  # up again 1.15 s after it fired but 0.9 s after seen
        (3.00, (0.1, 0.0, 0.8, 0.1)),  # up, 1.1 s after last seen: fires
    ]:
        out = spot(_probs(*p), FrameContext(audio_s=at))
        assert out.top1 is not None and out.top1[0] == int(np.argmax(p))
        if out.classes:
            assert not out.silent
            (c,) = out.classes
            fired.append((at, c.label, c.index, c.score))
        else:
            assert out.silent and out.classes is None
    assert fired == [(0.75, "up", 2, 0.9), (1.25, "down", 3, 0.8), (3.00, "up", 2, 0.8)]


def test_the_refractory_time_runs_on_the_audio_clock_else_on_capture_time() -> None:
    spot = _spotter(threshold=0.7, refractory_s=1.0)
    up = _probs(0.1, 0.0, 0.9, 0.0)
    # A WAV replayed fast: windows 2 s apart in audio, captured within a millisecond.
    assert not spot(up, FrameContext(1, 1000.0, audio_s=0.5)).silent
    assert not spot(up, FrameContext(2, 1000.001, audio_s=2.5)).silent
    assert spot(up, FrameContext(3, 1000.002, audio_s=3.0)).silent
    # Frames without an audio time (not an audio source): their capture time counts.
    spot = _spotter(threshold=0.7, refractory_s=1.0)
    silent = [spot(up, FrameContext(n, ts)).silent for n, ts in enumerate((10.0, 10.5, 11.6))]
    assert silent == [False, True, False]


def test_keyword_threshold_default_logits_and_ignore_list() -> None:
    spot = _spotter(ignore=["_silence_"])  # pipeline threshold 0: the keyword default
    assert spot.threshold == DEFAULT_THRESHOLD == 0.8
    # Logits: softmax first; [0, 5, 0, 0] is 0.98 for _unknown_, which now may fire.
    out = spot([np.asarray([[0.0, 5.0, 0.0, 0.0]], np.float32)], FrameContext(audio_s=0.0))
    assert out.classes is not None and out.classes[0].label == "_unknown_"
    assert out.classes[0].score == pytest.approx(np.exp(5) / (np.exp(5) + 3), abs=1e-4)
    assert spot(_probs(0.1, 0.1, 0.75, 0.05), FrameContext(audio_s=5.0)).silent


def test_keyword_outputs_must_fit_the_labels() -> None:
    manifest = read_bundle(_bundle_path()).manifest
    check_outputs(manifest)
    bad = manifest.model_copy(update={"labels": ["a", "b"]})
    with pytest.raises(OutputMismatch, match=r"scores 3 classes but the manifest has 2 labels"):
        check_outputs(bad)
    out = manifest.outputs[0].model_copy(update={"shape": [1, 30, 3]})
    with pytest.raises(OutputMismatch, match=r"int8\[1, 30, 3\] is not class scores"):
        check_outputs(manifest.model_copy(update={"outputs": [out]}))


# --------------------------------------------------------------- the real model

_BUNDLE: dict[str, Path] = {}


def _bundle_path() -> Path:
    if "path" not in _BUNDLE:
        import tempfile

        _BUNDLE["path"] = build_keyword_bundle(Path(tempfile.mkdtemp(prefix="edge-kws-")) / "kws")
    return _BUNDLE["path"]


@pytest.fixture(scope="module")
def bundle() -> Path:
    return _bundle_path()


@pytest.mark.parametrize("runtime", DEVICE_RUNTIMES)
def test_the_keyword_bundle_hears_its_keywords_on_each_runtime(runtime: str, bundle: Path) -> None:
    manifest = read_bundle(bundle).manifest
    assert manifest.task == "keyword" and manifest.labels == LABELS
    assert manifest.preprocess.audio is not None and manifest.preprocess.audio.features == "log_mel"
    loaded = load_model(bundle / "model.tflite", runtime=runtime)
    pre = make_preprocessor(loaded.inputs[0], manifest.preprocess)
    spot = KeywordSpotter(loaded.outputs, manifest.labels, KeywordConfig())
    heard = []
    for word in LABELS:
        audio = clip([word], seed=11, gap_s=WINDOW_S)  # the word centred in one window
        x, _ = pre(audio)
        loaded.interpreter.set_tensor(loaded.inputs[0].index, x)
        loaded.interpreter.invoke()
        out = spot(
            [loaded.interpreter.get_tensor(loaded.outputs[0].index)],
            FrameContext(audio_s=10.0 * len(heard)),
        )
        assert out.top1 is not None
        heard.append((LABELS[out.top1[0]], [c.label for c in out.classes or []]))
    assert heard == [("_silence_", []), ("down", ["down"]), ("up", ["up"])]


# -------------------------------------------------------------- agent over MQTT


@pytest.fixture
def kws_agent(
    tmp_path: Path, bundle: Path
) -> Iterator[tuple[Broker, MessageCollector, Path, subprocess.Popen[str]]]:
    private, public = generate_keypair()
    (tmp_path / "fleet.key").write_bytes(private)
    (tmp_path / "fleet.pub").write_bytes(public)
    signed = build_keyword_bundle(tmp_path / "kws", sign_key=tmp_path / "fleet.key")
    assert read_bundle(signed).signature is not None
    # 1.5 s of noise, up, 1.5 s, down, 1.5 s: the queue holds the first windows (all
    # noise) until the model arrives, then every window is served in order.
    write_wav(
        tmp_path / "speech.wav",
        clip(["_silence_", "up", "_silence_", "down", "_silence_"], gap_s=1.5),
    )
    broker = Broker(tmp_path / "mosquitto")
    broker.start()
    config = {
        "device": {"id": "pi-kws"},
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "models": {
            "trusted_keys": [str(tmp_path / "fleet.pub")],
            "probation": {"duration_s": 0.5, "min_inferences": 5},
        },
        "telemetry": {"interval_s": 1},
        "pipelines": [
            {
                "name": "speech",
                "model": "keyword",
                "queue": "fifo",
                "source": {"type": "wav", "path": str(tmp_path / "speech.wav"),
                           "sample_rate": SAMPLE_RATE, "window_s": WINDOW_S, "hop_s": 0.125,
                           "loop": False, "pace": "fast"},
                "keyword": {"refractory_s": 1.0},
            },
            {
                "name": "mic",
                "model": "mic-keyword",
                "source": {"type": "microphone", "device": "no-such-microphone-xyz",
                           "sample_rate": SAMPLE_RATE, "window_s": WINDOW_S},
            },
        ],
    }  # fmt: skip
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
    collector = MessageCollector(broker, ["edge/pi-kws/#"])
    log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", str(tmp_path / "agent.yaml")],
        stdout=log, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
    )  # fmt: skip
    try:
        yield broker, collector, tmp_path, agent
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(10)
        collector.close()
        broker.stop()
        log.close()


def _messages(collector: MessageCollector, kind: str) -> list[Any]:
    model = {"results": Result, "telemetry": Telemetry}[kind]
    return [
        model.model_validate_json(m.payload)
        for m in list(collector.messages)
        if m.topic.split("/")[2] == kind
    ]


def _wait(predicate: Any, what: str, timeout: float = 60.0) -> None:
    done = threading.Event()
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        done.wait(0.1)


def test_an_agent_replaying_a_wav_publishes_exactly_its_keywords_in_order(kws_agent: Any) -> None:
    broker, collector, workdir, agent = kws_agent
    code, row = deploy_over_mqtt(broker, "pi-kws", workdir / "fleet.pub", workdir / "kws")
    assert code == 0 and row["status"] == "done", row

    def speech() -> Any:
        tel = _messages(collector, "telemetry")
        return tel[-1].pipelines.get("speech") if tel else None

    # 7.5 s at 8 kHz: (60000 - 4000) // 1000 + 1 = 57 windows, the file played once.
    _wait(lambda: speech() is not None and speech().source_state == "ended"
          and speech().frames_in == 57, "the WAV to be played")  # fmt: skip
    _wait(lambda: (t := _messages(collector, "telemetry")[-1].pipelines["speech"]).results_out == 2
          or t.errors > 0, "results")  # fmt: skip
    time.sleep(1.5)  # one more telemetry period: nothing else arrives
    results = [r for r in _messages(collector, "results") if r.pipeline == "speech"]
    fired = [(r.classes[0].label, r.classes[0].index) for r in results if r.classes]
    assert fired == [("up", 2), ("down", 1)]
    assert all(r.classes and len(r.classes) == 1 and r.classes[0].score >= 0.8 for r in results)
    # Frames ending inside each chirp (windows end at 0.5 + 0.125 * (frame - 1) s).
    ends = [0.5 + 0.125 * (r.frame - 1) for r in results]
    # The chirps sound at 2.1-2.4 s and 5.1-5.4 s.
    assert 2.1 < ends[0] < 2.9 and 5.1 < ends[1] < 5.9, ends
    tel = _messages(collector, "telemetry")[-1].pipelines
    assert tel["speech"].errors == 0 and tel["speech"].dropped == 0
    # The microphone that cannot open is reported, retried, and harms nothing else.
    assert tel["mic"].source_failures >= 1 and tel["mic"].source_state in (
        "reconnecting",
        "opening",
    )
    log = (workdir / "agent.log").read_text()
    assert f"source mic failed: {_expected_microphone_error('no-such-microphone-xyz')}" in log
    assert agent.poll() is None
