"""``data2vec demo``: pretrain a tiny model with data2vec 2.0, then show what it learned.

Steps (the same for every modality): pretrain for a wall-clock budget -> embed the train and
test splits with the pretrained encoder and with the *identical* randomly initialized encoder
-> linear probe and kNN on both and on a classical baseline -> print a table, write
``results.json``, ``loss_curve.png`` and a PCA picture of the test features. A modality's
:class:`Recipe` names its preset, data, baseline and any extra step (speech: a CTC fine-tune).

- image: Fashion-MNIST (Debian ``dataset-fashion-mnist``), baseline raw pixels.
- audio: spoken words synthesized with espeak-ng and flite (voice-disjoint split), baseline
  MFCC statistics + logistic regression, plus a short CTC fine-tune reporting CER/WER.
- text: WordNet 3.0 glosses (Debian ``wordnet-base``), 26-way noun category of a gloss,
  baseline TF-IDF + logistic regression.
- signal: a UCR/UEA time-series data set from the ``aeon`` wheel (JapaneseVowels), baseline
  the raw values (normalized, resampled).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data2vec.commands import evaluate_features
from data2vec.config import Config, load_config
from data2vec.data.images import ImageSource, open_image_source
from data2vec.data.skips import SkipLog, load_usable
from data2vec.engine.checkpoint import list_checkpoints
from data2vec.engine.metrics import read_metrics
from data2vec.engine.trainer import pretrain
from data2vec.errors import UserError
from data2vec.evaluate.features import Features, embed_source, load_encoder

log = logging.getLogger("data2vec.demo")

PRESET = "image-v2-tiny"


def _splits(data: str) -> tuple[str, str]:
    if data == "fashion-mnist":
        return "fashion-mnist:train", "fashion-mnist:test"
    root = Path(data)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise UserError(
            f"--data {data}: expected 'fashion-mnist' or a folder with train/ and test/"
        )
    return str(root / "train"), str(root / "test")


def raw_pixels(source: ImageSource, size: int, skips: SkipLog | None = None) -> Features:
    """Raw-pixel baseline: the image itself, in [0, 1], as the feature vector.

    IDX data (Fashion-MNIST) uses the stored 28x28 grayscale pixels; other sources the
    ``size x size`` RGB image of the evaluation transform. Unreadable files are skipped.
    """
    array = getattr(source, "array", None)
    if array is not None:
        feats = array.reshape(len(array), -1).astype(np.float32) / 255.0
        names = [source.name(i) for i in range(len(source))]
        return Features(feats, source.labels(), np.array(names), list(source.classes))
    from data2vec.data.transforms import EvalTransform

    t = EvalTransform(size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    rows, idx = load_usable(source, lambda image: t(image).ravel(), skips)
    names = np.array([source.name(i) for i in idx])
    return Features(np.stack(rows), source.labels()[idx], names, list(source.classes))


def _plot_loss(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, [r["loss"] for r in records], label="total")
    a.plot(steps, [r["loss_regression"] for r in records], label="regression (masked tokens)")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_title("data2vec 2.0 pretraining loss")
    a.legend()
    b.plot(steps, [r["target_std"] for r in records], label="target std")
    b.plot(steps, [r["pred_std"] for r in records], label="prediction std")
    b.set_xlabel("step")
    b.set_title("collapse monitor (per-dimension std)")
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_pca(feats: dict[str, Features], out: Path, n: int = 2000) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(feats), figsize=(4.2 * len(feats), 4))
    for ax, (name, f) in zip(np.atleast_1d(axes), feats.items()):
        x = torch.from_numpy(f.features[:n])
        x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
        _, _, v = torch.pca_lowrank(x, q=2, center=False)
        xy = (x @ v).numpy()
        ax.scatter(xy[:, 0], xy[:, 1], c=f.labels[:n], cmap="tab10", s=4)
        ax.set_title(f"{name}: test features, PCA")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


TABLE_HEADER = f"{'features':<32}{'linear probe':>14}{'kNN (k=20)':>12}"


def table_row(name: str, result: dict[str, Any]) -> str:
    """One row of the results table: a feature set's linear-probe and kNN accuracy."""
    linear, knn = (100 * result[probe]["accuracy"] for probe in ("linear", "knn"))
    return f"{name:<32}{linear:>13.2f}%{knn:>11.2f}%"


def _table(results: dict[str, dict[str, Any]]) -> str:
    lines = [TABLE_HEADER, "-" * len(TABLE_HEADER)]
    lines += [table_row(name, r) for name, r in results.items()]
    return "\n".join(lines)


def _fit_schedule(
    cfg: Config,
    minutes: float,
    overrides: list[str],
    seconds: float = 2.0,
    seq_len: int = 128,
    time_step: Callable[[Config], float] | None = None,
) -> Config:
    """Set ``train.max_steps`` so the cosine schedule ends when the time budget does.

    A few timed steps on synthetic input give the first estimate of this machine's step time
    (the data loader runs in parallel, so real steps cost about the same); with
    ``train.fit_schedule`` the trainer then re-estimates it every step from the real pace, since
    a busy machine's speed changes during the run. An explicit ``train.max_steps`` override
    wins; the time budget always stays the hard limit.
    """
    if any(o.startswith("train.max_steps=") for o in overrides):
        return cfg
    from data2vec.bench import time_steps

    if time_step is not None:
        step = time_step(cfg)
    else:
        # The fastest of a few steps after warm-up: the first steps of a process are slower
        # than the steady state (a 7-minute budget measured by the median ended 10 % early).
        run = time_steps(
            cfg, steps=5, warmup=3, count_flops=False, seconds=seconds, seq_len=seq_len
        )
        step = min(run["times"])
    steps = max(1, int(minutes * 60 / step))
    log.info("measured %.3f s/step: scheduling %d steps for %g minutes", step, steps, minutes)
    return load_config(
        cfg.preset,
        [
            f"train.max_minutes={minutes}",
            f"train.max_steps={steps}",
            "train.fit_schedule=true",
            *overrides,
        ],
    )


@dataclass
class Recipe:
    """What differs between the demos of two modalities.

    Attributes:
        preset: the tiny preset to pretrain.
        train, test: data specs of the two splits (labelled).
        open_source: ``open_source(spec, skips) -> source``.
        baseline_name: the classical baseline's row in the table.
        baseline: ``baseline(source, cfg, skips) -> Features``, applied to each split; or, with
            ``fit_baseline=True``, ``baseline(train, test, cfg, skips) -> (Features, Features)``
            (a baseline fitted on the training split, like TF-IDF).
        clip_seconds: typical input length (audio), for fitting the schedule to the budget.
        seq_len: tokens per block (text), for the same.
        extra: optional final step ``extra(run_dir, out) -> dict`` (added to the results).
        pretrain: the pretraining data when it is not ``train`` (labels are never used).
    """

    preset: str
    train: str
    test: str
    open_source: Callable[..., Any]
    baseline_name: str
    baseline: Callable[..., Features]
    clip_seconds: float = 2.0
    extra: Callable[[Path, Path], dict[str, Any]] | None = None
    pretrain: str | None = None
    fit_baseline: bool = False
    seq_len: int = 128
    # seconds per training step of a config, for a modality the benchmark has no synthetic
    # input for (signal: timed on real inputs, whose channel count the data decides)
    time_step: Callable[[Config], float] | None = None


def image_recipe(data: str) -> Recipe:
    train, test = _splits(data)
    return Recipe(
        preset=PRESET,
        train=train,
        test=test,
        open_source=open_image_source,
        baseline_name="raw pixels",
        baseline=lambda src, cfg, skips: raw_pixels(src, cfg.encoder.image_size, skips),
    )


def run_demo(
    out: Path,
    minutes: float,
    data: str = "fashion-mnist",
    overrides: list[str] | None = None,
    modality: str = "image",
) -> dict[str, Any]:
    """Run the whole demo of ``modality``; returns what ``results.json`` holds."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if modality == "audio":
        from data2vec.demo_audio import audio_recipe

        recipe = audio_recipe(data, out, minutes)
    elif modality == "text":
        from data2vec.demo_text import text_recipe

        recipe = text_recipe(data, out)
    elif modality == "signal":
        from data2vec.demo_signal import signal_recipe

        recipe = signal_recipe(data)
    else:
        recipe = image_recipe(data)
    overrides = overrides or []
    cfg = load_config(recipe.preset, [f"train.max_minutes={minutes}", *overrides])
    cfg = _fit_schedule(
        cfg, minutes, overrides, recipe.clip_seconds, recipe.seq_len, recipe.time_step
    )
    run_dir, random_dir = out / "pretrain", out / "random_init"
    for d in (run_dir, random_dir):
        if list_checkpoints(d):
            raise UserError(f"{d} holds an earlier demo run; remove it or choose another --out")
    data = recipe.pretrain or recipe.train
    print(f"[1/4] pretraining {recipe.preset} with data2vec 2.0 on {data} for {minutes:g} min")
    result = pretrain(cfg, data, run_dir)
    # max_steps=0 last, so a train.max_steps override cannot pretrain the random baseline too
    random_overrides = [*overrides, "train.max_steps=0"]
    if (run_dir / "tokenizer.json").is_file():  # text: the identical tokenizer and vocabulary
        random_overrides.append(f"data.tokenizer={run_dir / 'tokenizer.json'}")
    pretrain(load_config(recipe.preset, random_overrides), data, random_dir)

    print("[2/4] embedding the train and test splits")
    skips = SkipLog()
    train_src, test_src = (recipe.open_source(s, skips) for s in (recipe.train, recipe.test))
    feats: dict[str, tuple[Features, Features]] = {}
    for name, path in (
        ("data2vec 2.0 (pretrained)", run_dir),
        ("random init (same model)", random_dir),
    ):
        enc_cfg, encoder = load_encoder(path)
        feats[name] = tuple(
            embed_source(encoder, enc_cfg, src, skips) for src in (train_src, test_src)
        )
    if recipe.fit_baseline:
        feats[recipe.baseline_name] = recipe.baseline(train_src, test_src, cfg, skips)
    else:
        feats[recipe.baseline_name] = tuple(
            recipe.baseline(src, cfg, skips) for src in (train_src, test_src)
        )

    print("[3/4] linear probe and kNN")
    results: dict[str, dict[str, Any]] = {}
    for name, (tr, te) in feats.items():
        results[name] = {
            "linear": evaluate_features(tr, te, "linear"),
            "knn": evaluate_features(tr, te, "knn", k=20),
        }
        log.info("%s: %s", name, {k: v["accuracy"] for k, v in results[name].items()})
    extra = recipe.extra(run_dir, out) if recipe.extra is not None else {}

    print("[4/4] writing results")
    summary = {
        "modality": modality,
        "preset": recipe.preset,
        "data": {
            "train": recipe.train,
            "test": recipe.test,
            "n_train": len(train_src),
            "n_test": len(test_src),
        },
        "pretraining": {
            "steps": result.steps,
            "seconds": round(result.seconds, 1),
            "stopped": result.stopped,
            "samples_seen": result.steps * cfg.data.batch_size,
        },
        "results": results,
        **extra,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "skipped_inputs": len(skips),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    skips.write(out / "skipped.tsv")  # inputs skipped while embedding (pretraining: pretrain/)
    _plot_loss(run_dir, out / "loss_curve.png")
    _plot_pca({k: v[1] for k, v in feats.items()}, out / "features_pca.png")
    print()
    print(_table(results))
    for line in extra.get("report", []):
        print(line)
    print()
    print(
        f"pretraining: {result.steps} steps, {summary['pretraining']['samples_seen']} samples, "
        f"{result.seconds / 60:.1f} min; total {summary['total_seconds'] / 60:.1f} min"
    )
    print(f"wrote {out / 'results.json'}, {out / 'loss_curve.png'}, {out / 'features_pca.png'}")
    return summary
