"""The signal demo: a UCR/UEA time-series data set, data2vec 2.0, probes and two baselines.

The data come from the ``.ts`` files inside the ``aeon`` wheel (read by path, aeon is never
imported): by default JapaneseVowels, 9 speakers saying "ae", 12 LPC cepstrum channels, series
of 7-29 frames, 270 training and 370 test cases. Pretraining sees the training split only
(labels unused). Two classical baselines: the raw values (each series normalized per channel
with training-split statistics, resampled to ``encoder.size``, flattened, with the same linear
probe and kNN) and MiniRocket-style random kernels with a ridge classifier
(:mod:`data2vec.evaluate.rocket`), reported under the table.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data2vec.config import Config
from data2vec.data.signal import (
    SignalSource,
    SignalTransform,
    open_signal_source,
    resolve_from_data,
)
from data2vec.data.signal_pretrain import SignalCollate, input_grid, signal_masks
from data2vec.data.skips import SkipLog, load_usable
from data2vec.demo import Recipe
from data2vec.errors import UserError
from data2vec.evaluate.features import Features
from data2vec.evaluate.rocket import fit_random_kernels, ridge_classify
from data2vec.masking import make_rng

PRESET = "signal-v2-tiny"
DEFAULT_DATA = "ucr:JapaneseVowels"


def _splits(data: str) -> tuple[str, str]:
    """``ucr:<Name>``, a folder with ``train/`` and ``test/`` array folders, or a folder with
    ``*_TRAIN.ts`` and ``*_TEST.ts``."""
    if data.startswith("ucr:"):
        return f"{data}:train", f"{data}:test"
    root = Path(data)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return str(root / "train"), str(root / "test")
    train, test = sorted(root.glob("*_TRAIN.ts")), sorted(root.glob("*_TEST.ts"))
    if len(train) == 1 and len(test) == 1:
        return str(train[0]), str(test[0])
    raise UserError(
        f"--data {data}: expected ucr:<Name> (a data set in the aeon wheel), a folder with "
        "train/ and test/ folders of .npy/.npz arrays, or one with *_TRAIN.ts and *_TEST.ts"
    )


def _fitted_rows(
    source: SignalSource, transform: SignalTransform, skips: SkipLog | None
) -> tuple[np.ndarray, list[int]]:
    """The fitted inputs of ``source`` stacked ``(N, C, ...)``, and the indices kept."""
    rows, kept = load_usable(source, transform, skips)
    if not rows:
        raise UserError("no usable signals for the baseline")
    return np.stack(rows), kept


def _baseline_transform(train: SignalSource, cfg: Config, size: tuple[int, ...]) -> SignalTransform:
    """The model's per-channel normalization (training-split statistics), resampling to ``size``."""
    # patch 1: any size is whole patches (the baselines have no patches)
    enc = dataclasses.replace(
        cfg.encoder,  # type: ignore[type-var]
        fit="resample",
        size=size,
        patch_size=(1,) * len(size),
    )
    fitted = dataclasses.replace(cfg, encoder=enc)
    resolve_from_data(fitted, train)
    return SignalTransform(fitted)


def raw_values(
    train: SignalSource, test: SignalSource, cfg: Config, skips: SkipLog | None = None
) -> tuple[Features, Features]:
    """Raw-values baseline: each input normalized per channel as the model's input is (the
    statistics of the training split), resampled to ``encoder.size`` along every axis so
    series of any length compare, and flattened."""
    transform = _baseline_transform(train, cfg, tuple(cfg.encoder.size))  # type: ignore[union-attr]
    out = []
    for source in (train, test):
        x, kept = _fitted_rows(source, transform, skips)
        names = np.array([source.name(i) for i in kept])
        feats = x.reshape(len(x), -1)
        out.append(Features(feats, source.labels()[kept], names, list(source.classes)))
    return out[0], out[1]


def _median_length(source: SignalSource, limit: int = 2000) -> int:
    """Median first-axis length of the first ``limit`` loadable inputs (at least 9 samples,
    the kernel length)."""
    lengths, _ = load_usable(source, lambda x: x.shape[-1], None, range(min(len(source), limit)))
    return max(int(np.median(lengths)) if lengths else 0, 9)


def random_kernel_features(
    train: SignalSource,
    test: SignalSource,
    cfg: Config,
    skips: SkipLog | None = None,
    num_features: int = 10_000,
) -> tuple[Features, Features]:
    """MiniRocket-style features (:mod:`data2vec.evaluate.rocket`) of 1-D signals.

    Each series is normalized per channel as the model's input is and resampled to the median
    length of the training split (equal-length data sets keep their own length), so the
    kernels see the series at their native resolution, not the model's ``encoder.size``.
    """
    if len(cfg.encoder.size) != 1:  # type: ignore[union-attr]
        raise UserError("the random-kernel baseline is for 1-D signals (time series)")
    transform = _baseline_transform(train, cfg, (_median_length(train),))
    (x_train, kept_train), (x_test, kept_test) = (
        _fitted_rows(src, transform, skips) for src in (train, test)
    )
    kernels = fit_random_kernels(x_train, num_features, seed=cfg.train.seed)
    out = []
    for source, x, kept in ((train, x_train, kept_train), (test, x_test, kept_test)):
        names = np.array([source.name(i) for i in kept])
        out.append(
            Features(kernels.transform(x), source.labels()[kept], names, list(source.classes))
        )
    return out[0], out[1]


def time_signal_step(cfg: Config, data: str, steps: int = 5, warmup: int = 3) -> float:
    """Seconds per training step of ``cfg`` on a batch of real inputs (the fastest of a few).

    ``encoder.in_chans=0`` is resolved from ``data`` as pretraining will resolve it.
    """
    from data2vec.engine.runtime import configure_threads
    from data2vec.engine.trainer import new_state, train_step
    from data2vec.models.registry import build_model

    source = open_signal_source(data)
    resolve_from_data(cfg, source)
    transform, enc = SignalTransform(cfg), cfg.encoder
    items = []
    for i in range(min(len(source), cfg.data.batch_size)):
        x = transform(source.load(i), make_rng(0, i))
        masks = signal_masks(cfg.mask, input_grid(enc, x.shape[1]), make_rng(0, i))  # type: ignore[arg-type]
        items.append(("ok", x, masks, i))
    batch = SignalCollate(enc)(items)  # type: ignore[arg-type]
    device = torch.device("cpu")
    configure_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    state = new_state(build_model(cfg), cfg, device)
    times = []
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        train_step(state, batch, cfg, device)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return min(times)


def random_kernel_report(train: str, test: str) -> Callable[[Path, Path], dict[str, Any]]:
    """The demo's extra step: the random-kernel baseline, printed under the table.

    Its linear column is the method's own ridge classifier (the logistic-regression probe
    on 10,000 features costs more than the rest of a small demo); normalized with the
    pretraining run's config.
    """

    def report(run_dir: Path, out: Path) -> dict[str, Any]:
        from data2vec.commands import evaluate_features
        from data2vec.engine import checkpoint as ckpt

        cfg = ckpt.load_config_file(ckpt.resolve_model_dir(run_dir))
        ktrain, ktest = random_kernel_features(
            open_signal_source(train), open_signal_source(test), cfg
        )
        ridge = ridge_classify(ktrain.features, ktrain.labels, ktest.features, ktest.labels)
        knn = evaluate_features(ktrain, ktest, "knn", k=20)["accuracy"]
        name = f"random kernels + ridge ({ktrain.features.shape[1]})"
        return {
            "random_kernels": {"ridge": ridge.accuracy, "alpha": ridge.alpha, "knn": knn},
            "report": [f"{name:<32}{100 * ridge.accuracy:>13.2f}%{100 * knn:>11.2f}%"],
        }

    return report


def signal_recipe(data: str | None) -> Recipe:
    train, test = _splits(data or DEFAULT_DATA)
    return Recipe(
        preset=PRESET,
        train=train,
        test=test,
        open_source=open_signal_source,
        baseline_name="raw values (resampled)",
        baseline=raw_values,
        fit_baseline=True,
        time_step=lambda cfg: time_signal_step(cfg, train),
        extra=random_kernel_report(train, test),  # the preset is 1-D: time series
    )
