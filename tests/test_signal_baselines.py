"""The signal baselines: random-kernel (MiniRocket-style) features, the ridge classifier, and the
``.npy`` folder export the generalization benchmark feeds them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data2vec.config import load_config
from data2vec.data.signal import ArrayFolder, TsSource, export_arrays
from data2vec.data.ts_format import write_ts
from data2vec.demo_signal import random_kernel_features, raw_values
from data2vec.evaluate.rocket import (
    dilations_for,
    fit_random_kernels,
    kernel_weights,
    ridge_classify,
)


def test_kernel_weights__84_distinct_zero_sum_kernels_with_three_twos() -> None:
    w = kernel_weights()[:, 0]
    assert w.shape == (84, 9)
    assert len({tuple(r.tolist()) for r in w}) == 84
    assert torch.all(w.sum(1) == 0) and torch.all((w == 2).sum(1) == 3)


@pytest.mark.parametrize(("length", "top"), [(9, 1), (24, 2), (150, 18), (1460, 182)])
def test_dilations_for__exponential_up_to_the_series_span(length: int, top: int) -> None:
    d = dilations_for(length)
    assert d[0] == 1 and d[-1] == top and d == sorted(set(d)) and len(d) <= 32
    assert (9 - 1) * d[-1] <= max(length - 1, 8)  # the widest kernel fits the series


def test_random_kernels__ppv_features_in_unit_interval_and_seeded() -> None:
    x = np.random.default_rng(0).standard_normal((6, 3, 50)).astype(np.float32)
    a = fit_random_kernels(x, num_features=840, seed=1)
    f = a.transform(x)
    assert f.shape == (6, 840) and a.num_features == 840
    assert f.min() >= 0 and f.max() <= 1 and f.std() > 0.05
    np.testing.assert_array_equal(f, fit_random_kernels(x, 840, seed=1).transform(x))
    assert not np.array_equal(f, fit_random_kernels(x, 840, seed=2).transform(x))
    assert all(c.sum(1).min() >= 1 for c in a.channels)  # every kernel reads some channel


def test_random_kernels__short_series_and_chunking_give_the_same_features() -> None:
    x = np.random.default_rng(0).standard_normal((5, 1, 12)).astype(np.float32)
    k = fit_random_kernels(x, num_features=168)
    np.testing.assert_allclose(k.transform(x, chunk=2), k.transform(x, chunk=64))
    assert np.isfinite(k.transform(x)).all()


def test_ridge_classify__loo_matches_refitting_without_each_row() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 8))
    y = (x[:, 0] + 0.8 * rng.standard_normal(30) > 0).astype(np.int64)
    # Reference: refit on the other 29 rows (same standardization of all 30, unpenalized
    # intercept), once per alpha; the chosen alpha has the smallest squared LOO residual.
    z = (x - x.mean(0)) / x.std(0)
    t = np.where(np.eye(2)[y] > 0, 1.0, -1.0)
    errors, hits = {}, {}
    for alpha in (0.1, 3.0, 300.0):
        sq, hit = 0.0, 0
        for i in range(30):
            keep = np.arange(30) != i
            zc, tc = z[keep] - z[keep].mean(0), t[keep] - t[keep].mean(0)
            coef = np.linalg.solve(zc.T @ zc + alpha * np.eye(8), zc.T @ tc)
            pred = (z[i] - z[keep].mean(0)) @ coef + t[keep].mean(0)
            sq += float(((pred - t[i]) ** 2).mean()) / 30
            hit += int(pred.argmax() == y[i])
        errors[alpha], hits[alpha] = sq, hit / 30
        res = ridge_classify(x, y, x[:2], y[:2], alphas=(alpha,))
        assert res.loo_accuracy == pytest.approx(hits[alpha])
    best = min(errors, key=errors.get)
    assert ridge_classify(x, y, x, y, alphas=(0.1, 3.0, 300.0)).alpha == best


def test_ridge_classify__more_features_than_rows_still_chooses_by_loo() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 500))  # pure noise: the LOO error wants a large penalty
    y = np.arange(20) % 2
    assert ridge_classify(x, y, x, y, alphas=(1e-3, 1e3, 1e5)).alpha > 1e-3


def _shapes(n: int, length: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """Sines vs. square waves of random phase and period: the level and scale say nothing."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    series, labels = [], []
    for i in range(n):
        phase, period = rng.uniform(0, 2 * np.pi), rng.uniform(12, 20)
        wave = np.sin(2 * np.pi * t / period + phase)
        wave = wave if i % 2 else np.sign(wave)
        series.append((wave + 0.3 * rng.standard_normal(length))[None].astype(np.float32))
        labels.append("square" if i % 2 == 0 else "sine")
    return series, labels


def test_random_kernel_features__separate_waveform_shapes_raw_values_cannot(
    tmp_path: Path,
) -> None:
    for split, n, seed in (("TRAIN", 40, 0), ("TEST", 40, 1)):
        write_ts(tmp_path / f"W_{split}.ts", *_shapes(n, 99, seed), name="W")
    train, test = TsSource(tmp_path / "W_TRAIN.ts"), TsSource(tmp_path / "W_TEST.ts")
    cfg = load_config("signal-v2-tiny", ["encoder.in_chans=1"])
    ktr, kte = random_kernel_features(train, test, cfg, num_features=840)
    assert ktr.features.shape == (40, 840)
    kernels = ridge_classify(ktr.features, ktr.labels, kte.features, kte.labels).accuracy
    rtr, rte = raw_values(train, test, cfg)
    raw = ridge_classify(rtr.features, rtr.labels, rte.features, rte.labels).accuracy
    assert kernels >= 0.95 and raw <= 0.75  # random phase: raw values are no template


def test_export_arrays__ts_cases_become_a_class_folder_with_the_same_arrays(
    tmp_path: Path,
) -> None:
    series, labels = _shapes(6, 20, 0)
    series[1][0, 3] = np.nan  # missing values survive
    ts = TsSource(write_ts(tmp_path / "a.ts", series, labels))
    folder = ArrayFolder(export_arrays(ts, tmp_path / "npy"))
    assert folder.classes == ["sine", "square"] and len(folder) == 6
    by_name = {Path(folder.name(i)).stem: i for i in range(len(folder))}
    for i in range(6):
        j = by_name[str(i)]
        np.testing.assert_array_equal(folder.load(j), ts.load(i))
        assert folder.classes[folder.labels()[j]] == labels[i]
