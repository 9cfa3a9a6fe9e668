"""Audio windows to model features: a log-mel spectrogram in numpy, or the waveform.

The mel filterbank and the Hann window are built once per model; a window's features
are then one strided view, one batched rfft and one matrix product. The converter's
calibration data for an audio model is computed with the same ``LogMel``, so what a
device feeds the model is what it was quantised for.
"""

from __future__ import annotations

import numpy as np

from agent.models.manifest import AudioFeatures

# Added to the mel power before the log: silence gives a finite floor (log 1e-6 = -13.8).
LOG_EPS = 1e-6


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK's mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float
) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters, centres equally spaced in mel."""
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2, got {fmin}, {fmax}")
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    bins = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lower) / (centre - lower)
    falling = (upper - bins[None, :]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


class LogMel:
    """``(samples,)`` float audio -> ``(frames, n_mels)`` float32 log-mel power."""

    def __init__(self, spec: AudioFeatures) -> None:
        self.spec = spec
        self.n_fft = spec.n_fft
        self.hop = spec.hop
        fmax = spec.fmax if spec.fmax is not None else spec.sample_rate / 2
        self.filters = mel_filterbank(spec.sample_rate, spec.n_fft, spec.n_mels, spec.fmin, fmax)
        # Periodic Hann, as spectrogram front ends use.
        n = np.arange(spec.n_fft)
        self.window = (0.5 - 0.5 * np.cos(2 * np.pi * n / spec.n_fft)).astype(np.float32)

    def frames(self, samples: int) -> int:
        """How many spectrogram frames a window of ``samples`` gives (no padding)."""
        return 0 if samples < self.n_fft else 1 + (samples - self.n_fft) // self.hop

    def samples_for(self, frames: int) -> int:
        """The shortest window that gives ``frames`` frames."""
        return self.n_fft + (frames - 1) * self.hop

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, np.float32).reshape(-1)
        if audio.size < self.n_fft:
            raise ValueError(f"{audio.size} samples is shorter than one FFT ({self.n_fft})")
        framed = np.lib.stride_tricks.sliding_window_view(audio, self.n_fft)[:: self.hop]
        spectrum = np.fft.rfft(framed * self.window, axis=-1)
        power = spectrum.real**2 + spectrum.imag**2
        return np.log(power.astype(np.float32) @ self.filters.T + LOG_EPS)
