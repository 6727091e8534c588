"""MFCC features against a slow loop-by-loop reference of the same formulas; sanity checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.fft import dct
from scipy.signal import get_window

from data2vec.data.mfcc import (
    dct_matrix,
    deltas,
    hz_to_mel,
    log_mel_spectrogram,
    mel_filterbank,
    mel_to_hz,
    mfcc,
    utterance_features,
)


def _reference_mfcc(
    x: np.ndarray, n_mfcc: int = 13, n_mels: int = 40, win: int = 400, hop: int = 160
) -> np.ndarray:
    """Frame by frame, filter by filter, bin by bin: slow but obviously the textbook recipe."""
    sr, n_fft = 16000, 512
    y = [float(x[0])] + [float(x[n]) - 0.97 * float(x[n - 1]) for n in range(1, len(x))]
    window = get_window("hamming", win, fftbins=False)
    top = 2595 * math.log10(1 + (sr / 2) / 700)  # HTK mel of the Nyquist frequency
    points = [700 * (10 ** (top * i / (n_mels + 1) / 2595) - 1) for i in range(n_mels + 2)]
    out = []
    for start in range(0, len(y) - win + 1, hop):
        frame = np.array(y[start : start + win]) * window
        spectrum = np.fft.fft(np.concatenate([frame, np.zeros(n_fft - win)]))
        power = [abs(spectrum[k]) ** 2 for k in range(n_fft // 2 + 1)]
        energies = []
        for m in range(1, n_mels + 1):
            lo, mid, hi = points[m - 1], points[m], points[m + 1]
            total = 0.0
            for k, p in enumerate(power):
                f = k * sr / n_fft
                if lo < f <= mid:
                    total += p * (f - lo) / (mid - lo)
                elif mid < f < hi:
                    total += p * (hi - f) / (hi - mid)
            energies.append(math.log(max(total, 1e-10)))
        out.append(dct(np.array(energies), type=2, norm="ortho")[:n_mfcc])
    return np.array(out)


def test_mfcc__matches_slow_reference() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(4000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(4000)
    wave[:600] = 0.0  # digital silence exercises the log floor
    got = mfcc(wave.astype(np.float32))
    ref = _reference_mfcc(wave.astype(np.float32))
    assert got.dtype == np.float32 and got.shape == ref.shape == (1 + (4000 - 400) // 160, 13)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)  # float32 output


def test_dct_matrix__equals_scipy_orthonormal_dct() -> None:
    x = np.random.default_rng(1).standard_normal((7, 40))
    np.testing.assert_allclose(x @ dct_matrix(13, 40).T, dct(x, norm="ortho", axis=1)[:, :13])
    full = dct_matrix(40, 40)
    np.testing.assert_allclose(full @ full.T, np.eye(40), atol=1e-12)


def test_mel_scale__htk_formula_and_round_trip() -> None:
    assert hz_to_mel(700.0) == pytest.approx(2595 * math.log10(2))
    assert hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.1)  # the scale's anchor point
    f = np.array([0.0, 100.0, 1234.5, 8000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f, atol=1e-9)


def test_mel_filterbank__triangles_cover_the_band() -> None:
    fb = mel_filterbank(40, 512, 16000)
    assert fb.shape == (40, 257) and fb.min() >= 0 and fb.max() <= 1
    assert (fb.max(axis=1) > 0.5).all()  # every filter catches a bin near its peak
    assert (fb[:, 1:-1].sum(axis=0) > 0).all()  # every bin but DC and Nyquist is covered
    peaks = fb.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all()  # centres ascend with the filter index


@pytest.mark.parametrize("freq", [500.0, 1000.0, 3000.0])
def test_log_mel__pure_tone_peaks_in_its_mel_band(freq: float) -> None:
    t = np.arange(16000) / 16000
    wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    logmel = log_mel_spectrogram(wave)
    assert logmel.shape == (98, 40)
    centres = mel_to_hz(np.linspace(0, hz_to_mel(8000), 42))[1:-1]
    expected = int(np.argmin(np.abs(centres - freq)))
    assert (logmel.argmax(axis=1) == expected).all()


def test_mfcc__short_clip_gives_one_frame_and_silence_is_finite() -> None:
    assert mfcc(np.zeros(100, np.float32)).shape == (1, 13)
    assert np.isfinite(mfcc(np.zeros(16000, np.float32))).all()
    assert mfcc(np.ones(401, np.float32), n_mfcc=20).shape == (1, 20)
    with pytest.raises(ValueError, match="n_mfcc"):
        mfcc(np.zeros(1000), n_mfcc=41)


def test_deltas__slope_of_a_ramp_and_zero_for_constants() -> None:
    ramp = np.arange(20, dtype=np.float32)[:, None] * np.array([[1.0, -2.0]], np.float32)
    d = deltas(ramp)
    assert d.dtype == np.float32 and d.shape == (20, 2)
    np.testing.assert_allclose(d[2:-2], [[1.0, -2.0]] * 16, atol=1e-6)  # edges are padded
    np.testing.assert_array_equal(deltas(np.ones((5, 3))), np.zeros((5, 3)))


def test_utterance_features__fixed_size_mean_and_std() -> None:
    rng = np.random.default_rng(2)
    for n in [300, 8000, 23456]:
        feats = utterance_features(0.1 * rng.standard_normal(n).astype(np.float32))
        assert feats.shape == (78,) and feats.dtype == np.float32 and np.isfinite(feats).all()
    wave = 0.1 * rng.standard_normal(8000).astype(np.float32)
    feats = utterance_features(wave, n_mfcc=13, order=0)
    np.testing.assert_allclose(feats[:13], mfcc(wave).mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats[13:], mfcc(wave).std(axis=0), rtol=1e-4, atol=1e-5)
