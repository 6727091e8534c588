"""End-to-end tests of the fine-tuning loop (data2vec.finetune.trainer) on tiny tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from data2vec import finetune as ft
from data2vec.engine.metrics import read_metrics
from data2vec.errors import ConfigError, UserError
from data2vec.finetune.ctc import CharVocab
from data2vec.finetune.heads import CTCHead
from data2vec.finetune.model import FineTuneModel, SupervisedBatch, load_finetuned
from data2vec.finetune.trainer import FineTuneConfig, evaluate, finetune
from data2vec.models.encoder import EncoderOutput
from data2vec.models.registry import build_encoder
from tests.conftest import make_image_folder, tiny_config

QUIET = ["device=cpu", "num_workers=0", "progress=false", "tensorboard=false", "threads=2"]


# --------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ("lr=0", "finetune.lr"),
        ("layer_decay=1.5", "finetune.layer_decay"),
        ("max_steps=0", "finetune.max_steps"),
        ("label_smoothing=1.0", "finetune.label_smoothing"),
        ("clip_norm=-1", "finetune.clip_norm"),
        ("precision=fp16", "finetune.precision"),
        ("finetune.batch_size=two", "finetune.batch_size"),
        ("no_such_field=1", "finetune.no_such_field"),
    ],
)
def test_config__bad_values_name_the_field(item: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        FineTuneConfig.from_overrides([item])


def test_config__pretraining_style_key_names_the_flat_one() -> None:
    with pytest.raises(ConfigError, match=r"did you mean max_steps=10\?.*Fields: .*layer_decay"):
        FineTuneConfig.from_overrides(["train.max_steps=10"])
    with pytest.raises(ConfigError, match="must look like") as info:
        FineTuneConfig.from_overrides(["model.depth=2"])  # no flat field of that name
    assert "did you mean" not in str(info.value)


def test_config__overrides_with_and_without_section() -> None:
    cfg = FineTuneConfig.from_overrides(["lr=1e-4", "finetune.max_steps=7", "betas=[0.9, 0.95]"])
    assert (cfg.lr, cfg.max_steps, cfg.betas) == (1e-4, 7, (0.9, 0.95))


# --------------------------------------------------------------------------------------------
# image classification, end to end


@pytest.fixture(scope="module")
def image_task(tmp_path_factory) -> dict[str, Path]:
    """A random-init tiny encoder saved as a model directory, and 2-class train/valid folders."""
    root = tmp_path_factory.mktemp("image_task")
    torch.manual_seed(0)
    cfg = tiny_config()
    encoder = build_encoder(cfg)
    model_dir = root / "pretrained"
    model_dir.mkdir()
    save_file(
        {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
        str(model_dir / "model.safetensors"),
    )
    cfg.save(model_dir / "config.yaml")
    train = make_image_folder(root / "train", n_per_class=16, size=20)
    (train / "class0" / "broken.png").write_bytes(b"not a png")  # skipped, never fatal
    valid = make_image_folder(root / "valid", n_per_class=8, size=24)  # other pixels
    return {"checkpoint": model_dir, "train": train, "valid": valid}


# lr 5e-3 for 40 steps reached 1.0 validation accuracy for 5 encoder x 2 run seeds (2e-3: 0.5-1.0).
IMAGE_OVERRIDES = [
    *QUIET,
    "lr=5e-3",
    "warmup_steps=5",
    "max_steps=40",
    "eval_every=20",
    "batch_size=8",
    "label_smoothing=0",
]


@pytest.fixture(scope="module")
def image_run(image_task, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("image_run") / "run"
    summary = ft.run_finetune(
        "image-classification",
        image_task["checkpoint"],
        image_task["train"],
        image_task["valid"],
        out,
        IMAGE_OVERRIDES,
    )
    return summary, out


def test_image_classification__random_init_tiny_encoder_separates_two_classes(image_run) -> None:
    summary, _ = image_run
    assert summary["steps"] == 40
    assert summary["best_metrics"]["accuracy"] >= 0.9
    assert summary["final_metrics"]["accuracy"] >= 0.9
    assert set(summary["best_metrics"]) == {"loss", "accuracy", "f1", "n"}
    assert summary["best_metrics"]["n"] == 16
    json.dumps(summary)  # JSON-ready


def test_image_classification__run_directory_contents(image_run) -> None:
    summary, out = image_run
    assert summary["skipped_inputs"] == 1
    assert "broken.png" in (out / "skipped.tsv").read_text()
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "valid_accuracy" in r] == [20, 40]
    assert sum("loss" in r for r in records) == 40
    info = json.loads((out / "best" / "finetune.json").read_text())
    assert info["classes"] == ["class0", "class1"]
    assert info["step"] == summary["best_step"]
    assert info["metrics"] == summary["best_metrics"]
    assert (out / "config.yaml").is_file() and (out / "finetune_config.json").is_file()


def test_image_classification__best_model_reloads_and_reproduces_its_metric(
    image_task, image_run
) -> None:
    from data2vec.data.images import open_image_source
    from data2vec.finetune.image import image_loaders, label_space

    summary, out = image_run
    loaded = load_finetuned(out)
    train = open_image_source(image_task["train"])
    valid = open_image_source(image_task["valid"])
    _, valid_map = label_space(train, valid)
    cfg = FineTuneConfig.from_overrides(IMAGE_OVERRIDES)
    _, valid_loader = image_loaders(loaded.config, train, valid, cfg, valid_map)
    metrics = evaluate(loaded.model, valid_loader, torch.device("cpu"))
    assert metrics["accuracy"] == summary["best_metrics"]["accuracy"]
    assert metrics["loss"] == pytest.approx(summary["best_metrics"]["loss"], rel=1e-5)


def test_image_classification__validation_class_unknown_to_training(image_task, tmp_path) -> None:
    valid = make_image_folder(tmp_path / "valid", n_per_class=1, classes=3)
    with pytest.raises(UserError, match="class2"):
        ft.run_finetune(
            "image-classification",
            image_task["checkpoint"],
            image_task["train"],
            valid,
            tmp_path / "out",
            [*QUIET, "max_steps=1"],
        )


def test_image_classification__same_seed_same_run_whatever_the_workers(
    image_task, tmp_path
) -> None:
    common = ["device=cpu", "progress=false", "tensorboard=false", "max_steps=6", "eval_every=3"]
    runs = [
        ft.run_finetune(
            "image-classification",
            image_task["checkpoint"],
            image_task["train"],
            image_task["valid"],
            tmp_path / name,
            [*common, *extra],
        )
        for name, extra in (
            ("a", ["num_workers=0"]),
            ("b", ["num_workers=2"]),
            ("c", ["num_workers=0", "seed=7"]),
        )
    ]
    history = [read_metrics(tmp_path / name / "metrics.jsonl") for name in "abc"]
    strip = [[{k: v for k, v in r.items() if k != "time"} for r in h] for h in history]
    assert strip[0] == strip[1]
    assert strip[0] != strip[2]
    assert runs[0]["best_metrics"] == runs[1]["best_metrics"]


def test_run_finetune__unknown_task(tmp_path) -> None:
    with pytest.raises(UserError, match="unknown task"):
        ft.run_finetune("segmentation", tmp_path, tmp_path, tmp_path, tmp_path / "out", [])


# --------------------------------------------------------------------------------------------
# CTC on a synthetic sequence task

LETTERS = "abcd"


class FrameEncoder(nn.Module):
    """A tiny "speech" encoder: symbol embeddings + a local convolution, no extra tokens."""

    embed_dim = 24

    def __init__(self, n_symbols: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_symbols, self.embed_dim)
        self.conv = nn.Conv1d(self.embed_dim, self.embed_dim, 3, padding=1)

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None):
        x = self.embed(source)  # (B, T, D)
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2).relu()
        return EncoderOutput(x=x, padding_mask=padding_mask, num_extra_tokens=0)


def _utterance(rng: np.random.Generator, vocab: CharVocab) -> tuple[list[int], str]:
    """Frames for a random transcript: each label held 1-3 frames, silence (0) in between.

    The transcript is a deterministic function of the frames (collapse, drop silence), so a
    model that maps frames to labels solves the task.
    """
    words = [
        "".join(rng.choice(list(LETTERS), rng.integers(1, 4))) for _ in range(rng.integers(1, 3))
    ]
    text = " ".join(words)
    frames: list[int] = []
    previous = -1
    for label in vocab.encode(text):
        if label == previous or rng.random() < 0.3:
            frames += [0] * int(rng.integers(1, 3))
        frames += [label] * int(rng.integers(1, 4))
        previous = label
    return frames, text


def _ctc_batches(n: int, batch_size: int, seed: int, vocab: CharVocab) -> list[SupervisedBatch]:
    rng = np.random.default_rng(seed)
    items = [_utterance(rng, vocab) for _ in range(n)]
    batches = []
    for start in range(0, n, batch_size):
        chunk = items[start : start + batch_size]
        T = max(len(f) for f, _ in chunk)
        labels = [vocab.encode(t) for _, t in chunk]
        S = max(len(y) for y in labels)
        source = torch.zeros(len(chunk), T, dtype=torch.long)
        pad = torch.ones(len(chunk), T, dtype=torch.bool)
        targets = torch.zeros(len(chunk), S, dtype=torch.long)
        for i, ((frames, _), y) in enumerate(zip(chunk, labels)):
            source[i, : len(frames)] = torch.tensor(frames)
            pad[i, : len(frames)] = False
            targets[i, : len(y)] = torch.tensor(y)
        lengths = torch.tensor([len(y) for y in labels])
        batches.append(SupervisedBatch(source, pad, targets, lengths))
    return batches


@pytest.fixture(scope="module")
def ctc_task() -> dict:
    vocab = CharVocab.build([LETTERS])
    return {
        "vocab": vocab,
        "train": _ctc_batches(96, 16, seed=0, vocab=vocab),
        "valid": _ctc_batches(32, 16, seed=1, vocab=vocab),
    }


CTC_OVERRIDES = [*QUIET, "lr=1e-2", "warmup_steps=10", "max_steps=120", "eval_every=40"]


def _ctc_model(vocab: CharVocab, seed: int = 0) -> FineTuneModel:
    torch.manual_seed(seed)
    encoder = FrameEncoder(len(vocab))
    return FineTuneModel(encoder, CTCHead(encoder.embed_dim, len(vocab)), "ctc")


def _run_ctc(ctc_task, out: Path, overrides: list[str]):
    vocab = ctc_task["vocab"]
    model = _ctc_model(vocab)
    cfg = FineTuneConfig.from_overrides(overrides)
    result = finetune(
        model,
        ctc_task["train"],
        ctc_task["valid"],
        cfg,
        out,
        "ctc",
        encoder_config=tiny_config(),
        vocab=vocab,
    )
    return model, result


def test_ctc__error_rate_falls_clearly_and_the_best_model_reloads(ctc_task, tmp_path) -> None:
    vocab = ctc_task["vocab"]
    before = evaluate(_ctc_model(vocab), ctc_task["valid"], torch.device("cpu"), vocab=vocab)
    _, result = _run_ctc(ctc_task, tmp_path / "run", CTC_OVERRIDES)
    assert before["cer"] > 0.5
    assert result.best_metrics["cer"] < 0.1
    assert result.best_metrics["wer"] < 0.3
    assert [h["step"] for h in result.history] == [40, 80, 120]
    loaded = load_finetuned(tmp_path / "run", encoder=FrameEncoder(len(vocab)))
    assert loaded.vocab is not None and loaded.vocab.tokens == vocab.tokens
    again = evaluate(loaded.model, ctc_task["valid"], torch.device("cpu"), vocab=loaded.vocab)
    assert again["cer"] == result.best_metrics["cer"]
    assert again["loss"] == pytest.approx(result.best_metrics["loss"], rel=1e-5)


def test_finetune__deterministic_under_the_seed(ctc_task, tmp_path) -> None:
    overrides = [*QUIET, "lr=1e-2", "warmup_steps=2", "max_steps=12", "eval_every=6"]
    _, a = _run_ctc(ctc_task, tmp_path / "a", overrides)
    _, b = _run_ctc(ctc_task, tmp_path / "b", overrides)
    assert a.history == b.history


def test_finetune__frozen_encoder_steps_train_only_the_head(ctc_task, tmp_path) -> None:
    vocab = ctc_task["vocab"]
    model = _ctc_model(vocab)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.head.linear.weight.detach().clone()
    cfg = FineTuneConfig.from_overrides([*QUIET, "max_steps=5", "freeze_encoder_steps=5"])
    finetune(
        model,
        ctc_task["train"],
        ctc_task["valid"],
        cfg,
        tmp_path,
        "ctc",
        encoder_config=tiny_config(),
        vocab=vocab,
    )
    for k, v in model.encoder.state_dict().items():
        torch.testing.assert_close(v, encoder_before[k], rtol=0, atol=0)
    assert not torch.equal(model.head.linear.weight, head_before)


def test_finetune__bf16_autocast_runs(ctc_task, tmp_path) -> None:
    _, result = _run_ctc(ctc_task, tmp_path, [*QUIET, "max_steps=3", "precision=bf16"])
    assert result.steps == 3 and result.skipped_steps == 0
    assert np.isfinite(result.final_metrics["loss"])


def test_finetune__non_finite_steps_are_skipped_then_the_run_stops(ctc_task, tmp_path) -> None:
    vocab = ctc_task["vocab"]
    model = _ctc_model(vocab)
    with torch.no_grad():
        model.encoder.embed.weight.fill_(float("nan"))
    cfg = FineTuneConfig.from_overrides([*QUIET, "max_steps=50"])
    result = finetune(
        model,
        ctc_task["train"],
        ctc_task["valid"],
        cfg,
        tmp_path,
        "ctc",
        encoder_config=tiny_config(),
        vocab=vocab,
    )
    assert (result.stopped, result.steps, result.skipped_steps) == ("nonfinite", 0, 20)
    assert result.best_dir is None


def test_finetune__task_must_match_the_model(ctc_task, tmp_path) -> None:
    model = _ctc_model(ctc_task["vocab"])
    with pytest.raises(ValueError, match="task"):
        finetune(
            model,
            [],
            [],
            FineTuneConfig(),
            tmp_path,
            "classification",
            encoder_config=tiny_config(),
        )
