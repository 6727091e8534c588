"""The signal modality end to end: the same engine, embed and evaluate for n = 1, 2, 3."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from data2vec.commands import evaluate_features
from data2vec.config import load_config
from data2vec.data.ts_format import write_ts
from data2vec.engine.trainer import pretrain
from data2vec.errors import DataError
from data2vec.evaluate.features import embed_path

FIXTURES = Path(__file__).parent / "fixtures" / "ts"

RUN = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "encoder.prenet_depth=1",
    "mask.clones=2",
    "decoder.dim=16",
    "decoder.groups=4",
    "decoder.layers=2",
    "target.top_k=2",
    "data.batch_size=4",
    "data.num_workers=0",
    "optim.warmup_steps=2",
    "train.progress=false",
    "train.tensorboard=false",
    "train.checkpoint_every=100",
]


def _npy_folder(root: Path, shape: tuple[int, ...], n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            np.save(root / label / f"{i}.npy", rng.standard_normal(shape).astype(np.float32))
    return root


def test_2d_signal__fashion_mnist_shaped_arrays_train_through_the_engine(tmp_path: Path) -> None:
    data = _npy_folder(tmp_path / "fm", (1, 28, 28))
    (data / "a" / "bad.npy").write_bytes(b"\x93NUMPY broken")
    np.save(data / "b" / "wrong.npy", np.zeros((3, 28, 28), np.float32))  # 3 channels
    cfg = load_config(
        "signal-v2-tiny",
        [*RUN, "encoder.in_chans=1", "encoder.size=[28, 28]", "encoder.patch_size=[4, 4]",
         "train.max_steps=3"],
    )  # fmt: skip
    result = pretrain(cfg, data, tmp_path / "run")
    assert result.steps == 3 and result.stopped == "max_steps"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all(np.isfinite(r["loss"]) for r in records) and len(records) == 3
    skipped = (tmp_path / "run" / "skipped.tsv").read_text()
    assert "bad.npy\tnot a readable numpy array" in skipped
    assert "wrong.npy\t3 channels, encoder.in_chans=1" in skipped
    feats = embed_path(tmp_path / "run", data, progress=False)
    assert feats.features.shape == (8, 32) and sorted(set(feats.labels.tolist())) == [0, 1]


def _moving_blob_clips(root: Path, n: int = 6, frames: int = 6, size: int = 16) -> Path:
    """Short clips of a Gaussian blob moving right (class ``right``) or down (``down``)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size]
    for label, (dy, dx) in (("right", (0, 1.5)), ("down", (1.5, 0))):
        (root / label).mkdir(parents=True)
        for i in range(n):
            y0, x0 = rng.uniform(3, 6, 2)
            clip = np.stack(
                [
                    np.exp(-((yy - y0 - t * dy) ** 2 + (xx - x0 - t * dx) ** 2) / 4.0)
                    for t in range(frames)
                ]
            )
            np.save(root / label / f"{i}.npy", clip[None].astype(np.float32))  # (1, T, H, W)
    return root


def test_3d_signal__moving_blob_clips_end_to_end(tmp_path: Path) -> None:
    data = _moving_blob_clips(tmp_path / "clips")
    overrides = [*RUN, "encoder.size=[4, 8, 8]", "encoder.patch_size=[2, 4, 4]"]
    run = tmp_path / "run"
    pretrain(load_config("signal3d-v2-tiny", [*overrides, "train.max_steps=2"]), data, run)
    cfg_text = (run / "config.yaml").read_text()
    assert "- 4\n  - 8\n  - 8" in cfg_text  # resampled to encoder.size
    from data2vec.commands import run_evaluate

    args = argparse.Namespace(
        checkpoint=run, train=data, test=data, probe="knn", k=3, seed=0, weights="student",
        pool="mean", layers=2, batch_size=5, device="cpu", no_progress=True,
    )  # fmt: skip
    result = run_evaluate(args)
    assert result["n_train"] == 12 and result["n_test"] == 12
    assert 0.0 <= result["accuracy"] <= 1.0


def test_1d_ts__variable_length_pretrain_embed_and_probe(tmp_path: Path) -> None:
    train = FIXTURES / "JapaneseVowels_TRAIN.ts"
    cfg = load_config(
        "signal-v2-tiny",
        [*RUN, "encoder.size=[32]", "encoder.patch_size=[4]", "encoder.fit=crop",
         "train.max_steps=2"],
    )  # fmt: skip
    run = tmp_path / "run"
    pretrain(cfg, train, run)
    assert "in_chans: 12" in (run / "config.yaml").read_text()  # from the data
    tr = embed_path(run, train, progress=False, batch_size=5)
    te = embed_path(run, FIXTURES / "JapaneseVowels_TEST.ts", progress=False)
    assert tr.features.shape == (27, 32) and te.features.shape == (31, 32)
    # The same series embedded in batches of 5 and of 256 (different padding) agree.
    alone = embed_path(run, train, progress=False, batch_size=1)
    np.testing.assert_allclose(alone.features, tr.features, atol=1e-4, rtol=1e-4)
    res = evaluate_features(tr, te, "knn", k=3)
    assert res["n_test"] == 31


def test_ts_with_missing_values_and_wrong_channels_are_handled(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    series = [rng.standard_normal((2, int(n))).astype(np.float32) for n in rng.integers(5, 20, 9)]
    series[0][1, 2] = np.nan
    path = write_ts(tmp_path / "t.ts", series, ["x", "y", "z"] * 3)
    cfg = load_config("signal-v2-tiny", [*RUN, "encoder.size=[16]", "train.max_steps=1"])
    pretrain(cfg, path, tmp_path / "run")
    feats = embed_path(tmp_path / "run", path, progress=False)
    assert np.isfinite(feats.features).all() and feats.features.shape == (9, 32)
    bad = load_config("signal-v2-tiny", [*RUN, "encoder.in_chans=3", "encoder.size=[16]"])
    with pytest.raises(DataError, match=r"no usable signal .* expected 3 channels"):
        pretrain(bad, path, tmp_path / "bad")


def test_signal_demo__ts_pair_three_rows_and_an_untrained_baseline(tmp_path: Path) -> None:
    from data2vec.demo import run_demo
    from data2vec.engine.checkpoint import list_checkpoints

    rng = np.random.default_rng(0)
    for split, n in (("TRAIN", 40), ("TEST", 20)):
        lengths = rng.integers(8, 24, n)
        series = [rng.standard_normal((2, int(k))) + (i % 2) for i, k in enumerate(lengths)]
        write_ts(tmp_path / "ts" / f"Toy_{split}.ts", series, ["lo", "hi"] * (n // 2))
    overrides = [*RUN, "encoder.size=[16]", "train.max_steps=2", "data.batch_size=8"]
    summary = run_demo(tmp_path / "demo", 0.5, str(tmp_path / "ts"), overrides, "signal")
    assert summary["data"]["n_train"] == 40 and summary["data"]["n_test"] == 20
    assert set(summary["results"]) == {
        "data2vec 2.0 (pretrained)",
        "random init (same model)",
        "raw values (resampled)",
    }
    assert summary["pretraining"]["steps"] == 2
    # The random-kernel baseline is reported under the table; the classes differ in level.
    kernels = summary["random_kernels"]
    assert set(kernels) == {"ridge", "alpha", "knn"} and kernels["ridge"] >= 0.8
    assert summary["report"][0].startswith("random kernels + ridge (9996)")
    # A train.max_steps override must not train the random-init baseline as well.
    assert [p.name for p in list_checkpoints(tmp_path / "demo" / "random_init")] == [
        "step_00000000"
    ]
