"""Does signal pretraining generalize? Pretrain and probe on UCR/UEA sets the demo never used.

For each data set shipped in the aeon wheel (read by path, never imported) and each input form
(the ``.ts`` files, and an ``.npy`` folder export ``root/{train,test}/<label>/<i>.npy`` of the
same cases), this pretrains ``signal-v2-tiny`` for a fixed number of steps on the training
split (labels unused), writes the random-init encoder of the same config, and probes both with
the toolkit's linear probe and kNN (the functions behind ``data2vec pretrain`` and
``data2vec evaluate``). Two classical baselines on the same splits: the raw values (the model's
normalized, resampled input, flattened; linear probe and kNN) and MiniRocket-style random
kernels (:mod:`data2vec.evaluate.rocket`; ridge classifier, and the same linear probe and kNN).

    python benchmarks/signal_generalization.py   # ~4 min per data set and form, 1 thread
    python benchmarks/signal_generalization.py --datasets GunPoint --formats ts --steps 100

Prints the JSON it writes to ``benchmarks/results/signal_generalization.json`` and a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data2vec.commands import evaluate_features
from data2vec.config import load_config
from data2vec.data.signal import export_arrays, open_signal_source
from data2vec.demo_signal import random_kernel_features, raw_values
from data2vec.engine.trainer import pretrain
from data2vec.evaluate.features import Features, embed_source, load_encoder
from data2vec.evaluate.linear_probe import linear_probe
from data2vec.evaluate.rocket import ridge_classify

# Varied and unused by the demo (JapaneseVowels): univariate and multivariate, 2-10 classes,
# 24-361 steps, equal and variable length, 36-67 training cases.
DATASETS = ("PickupGestureWiimoteZ", "ArrowHead", "GunPoint", "ItalyPowerDemand", "BasicMotions")
FORMATS = ("ts", "npy")
RUN = ["train.progress=false", "train.tensorboard=false", "data.num_workers=0"]
OUT = Path(__file__).parent / "results" / "signal_generalization.json"


def _splits(name: str, fmt: str, work: Path) -> tuple[str, str]:
    ts = (f"ucr:{name}:train", f"ucr:{name}:test")
    if fmt == "ts":
        return ts
    root = work / f"{name}_npy"
    for spec, split in zip(ts, ("train", "test")):
        if not (root / split).is_dir():
            export_arrays(open_signal_source(spec), root / split)
    return str(root / "train"), str(root / "test")


def _centred(train: Features, test: Features) -> tuple[Features, Features]:
    """Both sets standardized with the training split's per-feature mean and std."""
    mean, std = train.features.mean(0), train.features.std(0) + 1e-6
    return tuple(  # type: ignore[return-value]
        dataclasses.replace(f, features=(f.features - mean) / std) for f in (train, test)
    )


def _linear(train: Features, test: Features) -> float:
    """The toolkit's linear probe; its validation split holds out 10 % of each class, or one
    example of each class where 10 % rounds to none (5 per class: PickupGestureWiimoteZ)."""
    smallest = int(np.bincount(train.labels).min())
    fraction = max(0.1, 1 / smallest)
    x, y = torch.from_numpy(train.features), torch.from_numpy(train.labels)
    tx, ty = torch.from_numpy(test.features), torch.from_numpy(test.labels)
    return linear_probe(x, y, tx, ty, val_fraction=fraction).accuracy


def _probes(train: Features, test: Features) -> dict[str, float]:
    """The toolkit's linear probe and cosine kNN, and the kNN of standardized features
    (``knn_centred``: the cosine of features centred on the training mean, as SimpleShot's
    CL2N, Wang et al. 2019, §3; the linear probe standardizes its input already)."""
    assert train.classes == test.classes, "label ids must index the same classes"
    return {
        "linear": _linear(train, test),
        "knn": evaluate_features(train, test, "knn", k=20)["accuracy"],
        "knn_centred": evaluate_features(*_centred(train, test), "knn", k=20)["accuracy"],
    }


def run_one(
    name: str, fmt: str, steps: int, work: Path, preset: str, overrides: list[str]
) -> dict[str, Any]:
    """Pretrain, random init, probes and baselines for one data set in one input form."""
    t0 = time.perf_counter()
    train, test = _splits(name, fmt, work)
    cfg = load_config(
        preset,
        [*RUN, f"train.max_steps={steps}", f"train.checkpoint_every={steps}", *overrides],
    )
    runs = work / f"{name}_{fmt}"
    result = pretrain(cfg, train, runs / "pretrained")
    pretrain(load_config(preset, [*RUN, *overrides, "train.max_steps=0"]), train, runs / "random")
    train_src, test_src = open_signal_source(train), open_signal_source(test)
    row: dict[str, Any] = {"dataset": name, "format": fmt, "n_train": len(train_src)}
    row["n_test"], row["steps"] = len(test_src), result.steps
    row["pretrain_seconds"] = round(result.seconds, 1)
    for key in ("pretrained", "random"):
        enc_cfg, encoder = load_encoder(runs / key)
        feats = [embed_source(encoder, enc_cfg, s, progress=False) for s in (train_src, test_src)]
        row[key] = _probes(*feats)
    row.update(baselines(train_src, test_src, cfg))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def baselines(train_src, test_src, cfg) -> dict[str, Any]:
    """The raw values and the random kernels (ridge and the toolkit's probes) of one split."""
    ktrain, ktest = random_kernel_features(train_src, test_src, cfg)
    ridge = ridge_classify(ktrain.features, ktrain.labels, ktest.features, ktest.labels)
    return {
        "raw": _probes(*raw_values(train_src, test_src, cfg)),
        "random_kernels": {"ridge": ridge.accuracy, "alpha": ridge.alpha, **_probes(ktrain, ktest)},
    }


def refresh_baselines(path: Path, preset: str, overrides: list[str]) -> list[dict[str, Any]]:
    """Recompute only the baselines of the rows in an earlier results file (no pretraining)."""
    summary = json.loads(path.read_text())
    with tempfile.TemporaryDirectory(prefix="signal_gen_") as tmp:
        for row in summary["rows"]:
            train, test = _splits(row["dataset"], row["format"], Path(tmp))
            cfg = load_config(preset, [*RUN, *overrides])
            row.update(baselines(open_signal_source(train), open_signal_source(test), cfg))
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary["rows"]


def _cells(r: dict[str, float], keys: tuple[str, ...]) -> str:
    return "/".join(f"{100 * r[k]:.1f}" for k in keys)


def _table(rows: list[dict[str, Any]]) -> str:
    """Accuracies in %: linear probe / cosine kNN / kNN of standardized features."""
    keys = ("linear", "knn", "knn_centred")
    head = (
        f"{'dataset':<22}{'format':<7}{'pretrained lin/kNN/kNNc':>24}{'random lin/kNN/kNNc':>22}"
        f"{'raw lin/kNN/kNNc':>20}{'kernels ridge/lin':>19}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        k = r["random_kernels"]
        lines.append(
            f"{r['dataset']:<22}{r['format']:<7}{_cells(r['pretrained'], keys):>24}"
            f"{_cells(r['random'], keys):>22}{_cells(r['raw'], keys):>20}"
            f"{_cells(k, ('ridge', 'linear')):>19}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps per run")
    parser.add_argument("--preset", default="signal-v2-tiny")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temp folder)")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.field=value")
    parser.add_argument(
        "--refresh-baselines", action="store_true", help="recompute the baselines of --out only"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    if args.refresh_baselines:
        print(_table(refresh_baselines(args.out, args.preset, args.overrides)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="signal_gen_") as tmp:
        work = args.work or Path(tmp)
        for name in args.datasets:
            for fmt in args.formats:
                rows.append(run_one(name, fmt, args.steps, work, args.preset, args.overrides))
                print(_table(rows[-1:]).splitlines()[-1], flush=True)
                summary = _summary(args, rows)  # written after every row
    print(json.dumps(summary, indent=2))
    print(_table(rows))


def _summary(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    probes = ("linear", "knn", "knn_centred")
    wins = {p: sum(r["pretrained"][p] > r["random"][p] for r in rows) for p in probes}
    summary = {
        "preset": args.preset,
        "steps": args.steps,
        "overrides": args.overrides,
        "rows": rows,
        "pretrained_beats_random": {p: f"{n} of {len(rows)}" for p, n in wins.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
