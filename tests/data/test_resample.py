"""Resampling to 16 kHz: frequency and length preserved, identity when the rates match."""

from __future__ import annotations

import numpy as np
import pytest

from data2vec.data.resample import resample, resampled_length


def _sine(freq: float, sr: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wave: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * sr / len(wave))


@pytest.mark.parametrize("orig_sr", [44100, 22050, 8000])
def test_resample__sine_keeps_frequency_and_length(orig_sr: int) -> None:
    wave = _sine(440.0, orig_sr)
    out = resample(wave, orig_sr, 16000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - len(wave) * 16000 / orig_sr) <= 1
    assert len(out) == resampled_length(len(wave), orig_sr, 16000)
    assert abs(_peak_hz(out, 16000) - 440.0) <= 1.0  # 1 Hz FFT bins over 1 s
    # Away from the filter's start-up and tail, the output is the same sine at 16 kHz.
    ref = _sine(440.0, 16000)[: len(out)]
    assert np.abs(out[800:-800] - ref[800:-800]).max() < 1e-3


def test_resample__downsampling_removes_content_above_new_nyquist() -> None:
    wave = _sine(440.0, 44100) + _sine(12000.0, 44100)  # 12 kHz > 8 kHz Nyquist at 16 kHz
    out = resample(wave, 44100, 16000)
    ref = _sine(440.0, 16000)[: len(out)]
    assert np.abs(out[800:-800] - ref[800:-800]).max() < 1e-3  # no alias left at 4 kHz


def test_resample__identity_returns_same_values() -> None:
    wave = np.random.default_rng(0).standard_normal(1234).astype(np.float32)
    out = resample(wave, 16000, 16000)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, wave)
    np.testing.assert_array_equal(resample(wave.astype(np.float64), 16000), wave)


@pytest.mark.parametrize("orig_sr", [8000, 11025, 22050, 32000, 44100, 48000])
def test_resampled_length__matches_soxr_exactly(orig_sr: int) -> None:
    for n in [1, 2, 3, 999, 1001, 21321, 34601]:  # 21321 @ 32 kHz lands on a half sample
        assert len(resample(np.zeros(n, np.float32), orig_sr)) == resampled_length(n, orig_sr)


def test_resample__empty_and_invalid_inputs() -> None:
    assert resample(np.zeros(0, np.float32), 44100).shape == (0,)
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((10, 2), np.float32), 44100)
    with pytest.raises(ValueError, match="positive"):
        resample(np.zeros(10, np.float32), 0)
