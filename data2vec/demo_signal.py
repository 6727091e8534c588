"""The signal demo: a UCR/UEA time-series data set, data2vec 2.0, probes and two baselines.

The data come from the ``.ts`` files inside the ``aeon`` wheel (read by path, aeon is never
imported): by default JapaneseVowels, 9 speakers saying "ae", 12 LPC cepstrum channels, series
of 7-29 frames, 270 training and 370 test cases. Pretraining sees the training split only
(labels unused). The classical baseline is the raw values: each series normalized per channel
(training-split statistics) and resampled to ``encoder.size``, flattened, with the same linear
probe and kNN.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

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
from data2vec.data.skips import SkipError, SkipLog
from data2vec.demo import Recipe
from data2vec.errors import UserError
from data2vec.evaluate.features import Features
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


def raw_values(
    train: SignalSource, test: SignalSource, cfg: Config, skips: SkipLog | None = None
) -> tuple[Features, Features]:
    """Raw-values baseline: each input normalized per channel as the model's input is (the
    statistics of the training split), resampled to ``encoder.size`` along every axis so
    series of any length compare, and flattened."""
    enc = dataclasses.replace(cfg.encoder, fit="resample")  # type: ignore[type-var]
    fitted = dataclasses.replace(cfg, encoder=enc)
    resolve_from_data(fitted, train)
    transform = SignalTransform(fitted)
    out = []
    for source in (train, test):
        rows, kept = [], []
        for i in range(len(source)):
            try:
                rows.append(transform(source.load(i)).ravel())
                kept.append(i)
            except SkipError as exc:
                if skips is not None:
                    skips.add(source.name(i), str(exc))
        names = np.array([source.name(i) for i in kept])
        out.append(Features(np.stack(rows), source.labels()[kept], names, list(source.classes)))
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
    )
