"""Audio: a microphone (PortAudio through ``sounddevice``) or a replayed WAV file, cut
into fixed windows of ``window_s`` seconds every ``hop_s``.

A window is a float32 array of ``window_s * sample_rate`` mono samples in [-1, 1];
its meta says where it ends on the audio's own clock (``audio_s``, seconds since the
source opened), so a keyword spotter's refractory time holds on a WAV replayed fast
and across windows a slow model let a live source drop.
"""

from __future__ import annotations

import logging
import queue
import wave
from collections import deque
from typing import Any

import numpy as np

from agent.config import MicrophoneSource, WavSource
from agent.loops.sources.base import EndOfStream, Source, SourceError, register

logger = logging.getLogger(__name__)

#: Frame meta key: the end of the window, in seconds of audio since the source opened.
AUDIO_TIME = "audio_s"
# Blocks the PortAudio callback may queue before the oldest are dropped (the reader is
# gone or far behind): a few seconds of audio at most.
_MAX_BLOCKS = 64


class AudioWindower:
    """Samples in, a window out every ``hop`` samples once ``window`` have arrived."""

    def __init__(self, window: int, hop: int, sample_rate: int) -> None:
        self.window = window
        self.hop = hop
        self.sample_rate = sample_rate
        self._buf = np.zeros(0, np.float32)
        self._consumed = 0  # samples dropped from the front of _buf so far
        self._next_end = window  # sample count at which the next window ends
        self.ready: deque[tuple[np.ndarray, dict[str, Any]]] = deque()

    def add(self, samples: np.ndarray) -> None:
        self._buf = np.concatenate([self._buf, samples.astype(np.float32, copy=False)])
        end_of_buf = self._consumed + len(self._buf)
        while self._next_end <= end_of_buf:
            start = self._next_end - self.window - self._consumed
            window = self._buf[start : start + self.window].copy()
            self.ready.append((window, {AUDIO_TIME: self._next_end / self.sample_rate}))
            self._next_end += self.hop
        # Keep only what the next window still needs.
        keep_from = self._next_end - self.window - self._consumed
        if keep_from > 0:
            self._buf = self._buf[keep_from:]
            self._consumed += keep_from


def _sizes(config: MicrophoneSource | WavSource) -> tuple[int, int]:
    return round(config.window_s * config.sample_rate), round(config.hop_s * config.sample_rate)


def pcm16_to_mono(data: bytes, channels: int) -> np.ndarray:
    """Little-endian 16-bit PCM frames to mono float32 in [-1, 1]."""
    samples = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples


@register("wav")
class WavFile(Source):
    def __init__(self, config: WavSource) -> None:
        self.config = config
        self._wav: wave.Wave_read | None = None
        self._windower: AudioWindower | None = None

    @property
    def fps(self) -> float | None:
        return 1.0 / self.config.hop_s if self.config.pace == "native" else None

    def open(self) -> None:
        c = self.config
        try:
            wav = wave.open(str(c.path), "rb")
        except FileNotFoundError:
            raise SourceError(f"WAV file not found: {c.path}") from None
        except (OSError, EOFError, wave.Error) as exc:
            raise SourceError(f"{c.path}: not a PCM WAV file ({exc})") from None
        problem = None
        if wav.getsampwidth() != 2:
            problem = f"{8 * wav.getsampwidth()}-bit samples, only 16-bit PCM is read"
        elif wav.getnchannels() not in (1, 2):
            problem = f"{wav.getnchannels()} channels, only mono or stereo is read"
        elif wav.getframerate() != c.sample_rate:
            problem = (
                f"sample rate {wav.getframerate()} Hz, the source's sample_rate is "
                f"{c.sample_rate} Hz (resampling is not done: convert the file or set sample_rate)"
            )
        if problem is not None:
            wav.close()
            raise SourceError(f"{c.path}: {problem}")
        self._wav = wav
        self._windower = AudioWindower(*_sizes(c), c.sample_rate)

    def read(self) -> tuple[np.ndarray, dict[str, Any]]:
        wav, windower = self._wav, self._windower
        assert wav is not None and windower is not None
        while not windower.ready:
            data = wav.readframes(windower.hop)
            if not data:
                if not self.config.loop:
                    raise EndOfStream()
                if wav.getnframes() == 0:
                    raise SourceError(f"{self.config.path}: no audio in the file")
                # A looped file is one continuous stream: windows straddle the seam.
                wav.rewind()
                continue
            windower.add(pcm16_to_mono(data, wav.getnchannels()))
        window, meta = windower.ready.popleft()
        return window, {**meta, "file": self.config.path.name}

    def close(self) -> None:
        if self._wav is not None:
            self._wav.close()
            self._wav = None


def import_sounddevice() -> Any:
    try:
        import sounddevice
    except ImportError:
        raise SourceError(
            "sounddevice is not installed: pip install 'edge-deploy[audio]' (sounddevice)"
        ) from None
    except OSError as exc:  # the module loads libportaudio when imported
        raise SourceError(
            f"PortAudio is not available ({exc}): install it (apt install libportaudio2)"
        ) from None
    return sounddevice


def _name(config: MicrophoneSource) -> int | str:
    return config.device if config.device is not None else "default"


@register("microphone")
class Microphone(Source):
    """ALSA (or any PortAudio host API) capture; PortAudio's thread fills a queue."""

    live = True

    def __init__(self, config: MicrophoneSource) -> None:
        self.config = config
        self._stream: Any = None
        self._blocks: queue.Queue[np.ndarray] = queue.Queue(_MAX_BLOCKS)
        self._windower: AudioWindower | None = None
        self.overflows = 0

    def open(self) -> None:
        sd = import_sounddevice()
        c = self.config
        window, hop = _sizes(c)
        self._blocks = queue.Queue(_MAX_BLOCKS)
        self._windower = AudioWindower(window, hop, c.sample_rate)
        blocks = self._blocks

        def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
            if status:
                self.overflows += 1
            try:
                blocks.put_nowait(indata[:, 0].copy())
            except queue.Full:  # nobody reads: the next open starts afresh
                self.overflows += 1

        try:
            stream = sd.InputStream(
                device=c.device,
                samplerate=c.sample_rate,
                channels=c.channels,
                dtype="float32",
                blocksize=hop,
                callback=callback,
            )
            stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            # ValueError: no such device (name or index); PortAudioError: cannot open it.
            text = " ".join(str(exc).split())
            raise SourceError(f"cannot open microphone {_name(c)!r}: {text}") from None
        self._stream = stream

    def read(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        windower = self._windower
        assert windower is not None
        while not windower.ready:
            try:
                block = self._blocks.get(timeout=0.2)
            except queue.Empty:
                if self._stream is not None and not self._stream.active:
                    raise SourceError(f"microphone {_name(self.config)!r} stopped") from None
                return None  # the capture thread checks for shutdown between reads
            windower.add(block)
        return windower.ready.popleft()

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.stop()
                stream.close()
            except Exception as exc:  # a device already gone: nothing left to release
                logger.debug("microphone close: %s", exc)
