"""``data2vec demo``: pretrain a tiny ViT with data2vec 2.0 on Fashion-MNIST, then show what it
learned.

Steps: pretrain for a wall-clock budget -> embed the official train and test splits with the
pretrained encoder and with the *identical* randomly initialized encoder -> linear probe and
kNN on both and on raw pixels -> print a table, write ``results.json``, ``loss_curve.png`` and a
PCA picture of the test features.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data2vec.commands import evaluate_features
from data2vec.config import Config, load_config
from data2vec.data.images import ImageSource, open_image_source
from data2vec.data.skips import SkipError, SkipLog
from data2vec.engine.checkpoint import list_checkpoints
from data2vec.engine.metrics import read_metrics
from data2vec.engine.trainer import pretrain
from data2vec.errors import UserError
from data2vec.evaluate.features import Features, embed_images, load_encoder

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
    rows, idx = [], []
    for i in range(len(source)):
        try:
            rows.append(t(source.load(i)).ravel())
            idx.append(i)
        except SkipError as exc:
            if skips is not None:
                skips.add(source.name(i), str(exc))
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


def _table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'features':<28}{'linear probe':>14}{'kNN (k=20)':>12}", "-" * 54]
    for name, r in results.items():
        lines.append(
            f"{name:<28}{100 * r['linear']['accuracy']:>13.2f}%{100 * r['knn']['accuracy']:>11.2f}%"
        )
    return "\n".join(lines)


def _fit_schedule(cfg: Config, minutes: float, overrides: list[str]) -> Config:
    """Set ``train.max_steps`` so the cosine schedule ends when the time budget does.

    A few timed steps on synthetic input measure this machine's step time (the data loader runs
    in parallel, so real steps cost about the same). An explicit ``train.max_steps`` override
    wins; the time budget always stays the hard limit.
    """
    if any(o.startswith("train.max_steps=") for o in overrides):
        return cfg
    from data2vec.bench import time_steps

    # The fastest of a few steps after warm-up: the first steps of a process are slower than
    # the steady state (a 7-minute budget measured by the median ended 10 % early).
    step = min(time_steps(cfg, steps=5, warmup=3, count_flops=False)["times"])
    steps = max(1, int(minutes * 60 / step))
    log.info("measured %.3f s/step: scheduling %d steps for %g minutes", step, steps, minutes)
    return load_config(
        PRESET, [f"train.max_minutes={minutes}", f"train.max_steps={steps}", *overrides]
    )


def run_demo(
    out: Path, minutes: float, data: str = "fashion-mnist", overrides: list[str] | None = None
) -> dict[str, Any]:
    """Run the whole demo; returns what ``results.json`` holds."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    train_spec, test_spec = _splits(data)
    cfg = load_config(PRESET, [f"train.max_minutes={minutes}", *(overrides or [])])
    cfg = _fit_schedule(cfg, minutes, overrides or [])
    run_dir, random_dir = out / "pretrain", out / "random_init"
    for d in (run_dir, random_dir):
        if list_checkpoints(d):
            raise UserError(f"{d} holds an earlier demo run; remove it or choose another --out")
    print(f"[1/4] pretraining {PRESET} with data2vec 2.0 on {train_spec} for {minutes:g} min")
    result = pretrain(cfg, train_spec, run_dir)
    pretrain(load_config(PRESET, ["train.max_steps=0", *(overrides or [])]), train_spec, random_dir)

    print("[2/4] embedding the train and test splits")
    skips = SkipLog()
    train_src, test_src = open_image_source(train_spec, skips), open_image_source(test_spec, skips)
    feats: dict[str, tuple[Features, Features]] = {}
    for name, path in (
        ("data2vec 2.0 (pretrained)", run_dir),
        ("random init (same ViT)", random_dir),
    ):
        enc_cfg, encoder = load_encoder(path)
        feats[name] = tuple(
            embed_images(encoder, enc_cfg, src, skips) for src in (train_src, test_src)
        )
    size = cfg.encoder.image_size
    feats["raw pixels"] = (raw_pixels(train_src, size, skips), raw_pixels(test_src, size, skips))

    print("[3/4] linear probe and kNN")
    results: dict[str, dict[str, Any]] = {}
    for name, (tr, te) in feats.items():
        results[name] = {
            "linear": evaluate_features(tr, te, "linear"),
            "knn": evaluate_features(tr, te, "knn", k=20),
        }
        log.info("%s: %s", name, {k: v["accuracy"] for k, v in results[name].items()})

    print("[4/4] writing results")
    summary = {
        "preset": PRESET,
        "data": {
            "train": train_spec,
            "test": test_spec,
            "n_train": len(train_src),
            "n_test": len(test_src),
        },
        "pretraining": {
            "steps": result.steps,
            "seconds": round(result.seconds, 1),
            "stopped": result.stopped,
            "images_seen": result.steps * cfg.data.batch_size,
        },
        "results": results,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "skipped_inputs": len(skips),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    skips.write(out / "skipped.tsv")  # inputs skipped while embedding (pretraining: pretrain/)
    _plot_loss(run_dir, out / "loss_curve.png")
    _plot_pca({k: v[1] for k, v in feats.items()}, out / "features_pca.png")
    print()
    print(_table(results))
    print()
    print(
        f"pretraining: {result.steps} steps, {summary['pretraining']['images_seen']} images, "
        f"{result.seconds / 60:.1f} min; total {summary['total_seconds'] / 60:.1f} min"
    )
    print(f"wrote {out / 'results.json'}, {out / 'loss_curve.png'}, {out / 'features_pca.png'}")
    return summary
