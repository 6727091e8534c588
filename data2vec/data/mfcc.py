"""MFCC features: the classical baseline that learned speech representations are compared with.

The textbook recipe (Davis & Mermelstein 1980; the HTK Book §5.6): pre-emphasis, Hamming-windowed
frames, power spectrum, triangular filters equally spaced on the HTK mel scale, log, orthonormal
DCT-II. :func:`utterance_features` pools MFCCs and their deltas over time into one fixed-size
vector, the input of a logistic-regression probe.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000
LOG_FLOOR = 1e-10
"""Smallest filterbank energy taken into the log, so digital silence gives -23, not -inf."""


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: ``2595·log10(1 + f/700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    n_mels: int = 40,
    n_fft: int = 512,
    sample_rate: int = SAMPLE_RATE,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> np.ndarray:
    """Triangular filters with peaks equally spaced in mel between ``fmin`` and ``fmax``.

    Filter ``m`` rises linearly in Hz from the centre of filter ``m-1`` to its own centre (weight
    1) and falls to the centre of filter ``m+1``; filters are not area-normalized (as in HTK).

    Args:
        n_mels: Number of filters.
        n_fft: FFT size; the filters cover its ``n_fft//2 + 1`` non-negative frequency bins.
        sample_rate: In Hz.
        fmin: Lower edge of the first filter, in Hz.
        fmax: Upper edge of the last filter, in Hz (default: the Nyquist frequency).

    Returns:
        float64 ``(n_mels, n_fft//2 + 1)``.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # (M+2,) Hz
    bins = np.arange(n_fft // 2 + 1) * sample_rate / n_fft  # (F,) Hz
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1) each
    rising = (bins - lo) / (mid - lo)
    falling = (hi - bins) / (hi - mid)
    return np.maximum(0.0, np.minimum(rising, falling))  # (M, F)


def dct_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Rows of the orthonormal DCT-II, ``(n_out, n_in)``: ``y = D @ x`` equals
    ``scipy.fft.dct(x, type=2, norm="ortho")[:n_out]`` (numpy only: scipy is not a dependency).
    """
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    d = np.sqrt(2.0 / n_in) * np.cos(np.pi * k * (2 * n + 1) / (2 * n_in))
    d[0] /= np.sqrt(2.0)  # the orthonormal scaling of the DC row
    return d


def frames(wave: np.ndarray, win: int = 400, hop: int = 160) -> np.ndarray:
    """Overlapping frames ``(T, win)`` with ``T = 1 + (S - win) // hop``.

    A clip shorter than one window is zero-padded to one frame, so every clip gives features.
    """
    wave = np.asarray(wave, dtype=np.float64)
    if len(wave) < win:
        wave = np.pad(wave, (0, win - len(wave)))
    return np.lib.stride_tricks.sliding_window_view(wave, win)[::hop]


def log_mel_spectrogram(
    wave: np.ndarray,
    n_mels: int = 40,
    win: int = 400,
    hop: int = 160,
    n_fft: int = 512,
    sample_rate: int = SAMPLE_RATE,
    preemphasis: float = 0.97,
) -> np.ndarray:
    """Log mel filterbank energies of a waveform.

    Args:
        wave: float ``(S,)`` at ``sample_rate`` (values in [-1, 1]; not normalized first).
        n_mels: Number of mel filters.
        win: Window length in samples (400 = 25 ms at 16 kHz).
        hop: Hop length in samples (160 = 10 ms at 16 kHz).
        n_fft: FFT size (>= ``win``; frames are zero-padded to it).
        sample_rate: In Hz.
        preemphasis: Coefficient ``a`` of ``y[n] = x[n] - a·x[n-1]`` over the whole clip; it
            flattens the -6 dB/octave tilt of voiced speech so high bands are not lost.

    Returns:
        float64 ``(T, n_mels)``, natural log of the unscaled power ``|FFT|²`` per filter.
    """
    if n_fft < win:
        raise ValueError(f"n_fft ({n_fft}) must be >= win ({win})")
    x = np.asarray(wave, dtype=np.float64)
    x = np.concatenate([x[:1], x[1:] - preemphasis * x[:-1]])
    framed = frames(x, win, hop) * np.hamming(win)  # (T, win); symmetric Hamming as in HTK
    power = np.abs(np.fft.rfft(framed, n=n_fft, axis=1)) ** 2  # (T, n_fft//2 + 1)
    energies = power @ mel_filterbank(n_mels, n_fft, sample_rate).T  # (T, n_mels)
    return np.log(np.maximum(energies, LOG_FLOOR))


def mfcc(
    wave: np.ndarray,
    n_mfcc: int = 13,
    n_mels: int = 40,
    win: int = 400,
    hop: int = 160,
    n_fft: int = 512,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """Mel-frequency cepstral coefficients, ``c0`` (log energy) first.

    Args:
        wave: float ``(S,)`` at ``sample_rate``.
        n_mfcc: Coefficients kept (the first ``n_mfcc`` of the DCT).
        n_mels, win, hop, n_fft, sample_rate: See :func:`log_mel_spectrogram`.

    Returns:
        float32 ``(T, n_mfcc)`` with ``T = 1 + (S - win) // hop`` (at least 1).
    """
    if not 1 <= n_mfcc <= n_mels:
        raise ValueError(f"n_mfcc must be in [1, n_mels={n_mels}], got {n_mfcc}")
    logmel = log_mel_spectrogram(wave, n_mels, win, hop, n_fft, sample_rate)  # (T, n_mels)
    return (logmel @ dct_matrix(n_mfcc, n_mels).T).astype(np.float32)  # (T, n_mfcc)


def deltas(feats: np.ndarray, width: int = 2) -> np.ndarray:
    """Regression deltas over time (HTK Book eq. 5.16), edges padded by repetition.

    ``d[t] = Σ_{n=1..W} n·(c[t+n] - c[t-n]) / (2·Σ n²)``.

    Args:
        feats: ``(T, D)``.
        width: ``W``, frames each side.

    Returns:
        ``(T, D)``, same dtype as ``feats``.
    """
    T = len(feats)
    padded = np.pad(feats, ((width, width), (0, 0)), mode="edge")  # (T + 2W, D)
    out = np.zeros_like(feats, dtype=np.float64)
    for n in range(1, width + 1):
        out += n * (padded[width + n : width + n + T] - padded[width - n : width - n + T])
    return (out / (2 * sum(n * n for n in range(1, width + 1)))).astype(feats.dtype)


def utterance_features(wave: np.ndarray, n_mfcc: int = 13, order: int = 2) -> np.ndarray:
    """One fixed-size vector per clip: mean and std over time of MFCCs and their deltas.

    Args:
        wave: float ``(S,)`` at 16 kHz.
        n_mfcc: Coefficients per frame.
        order: Delta orders appended (2: MFCC, Δ, ΔΔ, the classic 39 values per frame).

    Returns:
        float32 ``(2·(order+1)·n_mfcc,)`` = ``[mean over frames, std over frames]`` of the
        ``(T, (order+1)·n_mfcc)`` frame features (78 values with the defaults).
    """
    parts = [mfcc(wave, n_mfcc)]  # (T, n_mfcc)
    for _ in range(order):
        parts.append(deltas(parts[-1]))
    feats = np.concatenate(parts, axis=1).astype(np.float64)  # (T, (order+1)·n_mfcc)
    return np.concatenate([feats.mean(axis=0), feats.std(axis=0)]).astype(np.float32)
