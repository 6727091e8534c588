"""Text classification fine-tuning: sequences of ``<s> text </s>`` -> pooled output -> head.

Texts come from ``.tsv`` (``text<TAB>label``) or ``.jsonl`` (``{"text", "label"}``) files and
are tokenized once, up front, with the pretrained model's own tokenizer (truncated to
``encoder.max_positions``). Training batches group texts of similar length; padding is masked
in attention and left out of the pooling.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data2vec.data.sampling import BucketedBatchSampler
from data2vec.data.skips import SkipLog
from data2vec.data.text import read_labelled_text
from data2vec.errors import DataError
from data2vec.evaluate.text import pad_tokens, require_tokenizer, tokenize_texts
from data2vec.finetune.heads import ClassificationHead
from data2vec.finetune.model import FineTuneModel, SupervisedBatch, load_pretrained
from data2vec.finetune.trainer import FineTuneConfig, FineTuneResult, finetune, pin_batches

log = logging.getLogger(__name__)


class LabelledTokens(Dataset):
    """``dataset[(index, position)]`` -> ``(token ids (L,), class id)``."""

    def __init__(self, seqs: list[np.ndarray], labels: list[int]) -> None:
        self.seqs = seqs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int]:
        index, _ = key
        return self.seqs[index], self.labels[index]


def make_collate(pad_id: int):
    """A collate function padding token ids into a :class:`SupervisedBatch`."""

    def collate(items: list[tuple[np.ndarray, int]]) -> SupervisedBatch:
        tokens, pad = pad_tokens([seq for seq, _ in items], pad_id)
        targets = torch.tensor([label for _, label in items], dtype=torch.long)
        return SupervisedBatch(tokens, pad if bool(pad.any()) else None, targets)

    return collate


def text_label_space(train: list[str], valid: list[str]) -> tuple[list[str], list[int], list[int]]:
    """Sorted training classes and both label lists as class ids.

    Raises:
        DataError: a validation label the training set does not have.
    """
    classes = sorted(set(train))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(valid) - set(index))
    if unknown:
        raise DataError(f"validation labels {unknown[:10]} are not among the training labels")
    return classes, [index[c] for c in train], [index[c] for c in valid]


def finetune_text(
    checkpoint: str | Path,
    train_path: str | Path,
    valid_path: str | Path,
    out: str | Path,
    cfg: FineTuneConfig,
) -> FineTuneResult:
    """Fine-tune the text encoder of ``checkpoint`` for sequence classification."""
    encoder_config, encoder = load_pretrained(
        checkpoint, "text", "text-classification", "a text encoder"
    )
    tokenizer = require_tokenizer(encoder)
    skips = SkipLog()
    train_texts, train_labels = read_labelled_text(train_path, skips)
    valid_texts, valid_labels = read_labelled_text(valid_path, skips)
    classes, train_ids, valid_ids = text_label_space(train_labels, valid_labels)
    if len(classes) < 2:
        raise DataError(f"{train_path} has a single label {classes}; classification needs two")
    max_len = encoder_config.encoder.max_positions  # type: ignore[union-attr]
    train_seqs = tokenize_texts(tokenizer, train_texts, max_len)
    valid_seqs = tokenize_texts(tokenizer, valid_texts, max_len)
    torch.manual_seed(cfg.seed)  # the head's initialization
    head = ClassificationHead(encoder.embed_dim, len(classes), cfg.pool, cfg.head_dropout)
    model = FineTuneModel(encoder, head, "classification")
    log.info(
        "fine-tuning text-classification on %d texts (%d classes); %d validation texts",
        len(train_seqs),
        len(classes),
        len(valid_seqs),
    )
    collate = make_collate(tokenizer.pad_id)
    pin = pin_batches(cfg)  # for CUDA
    lengths = np.array([len(s) for s in train_seqs])
    train_loader = DataLoader(
        LabelledTokens(train_seqs, train_ids),
        batch_sampler=BucketedBatchSampler(
            lengths, np.arange(len(lengths)), cfg.batch_size, cfg.seed
        ),
        collate_fn=collate,
        pin_memory=pin,
    )
    order = np.argsort([len(s) for s in valid_seqs], kind="stable")
    batches = [
        [(int(i), int(i)) for i in order[s : s + cfg.batch_size]]
        for s in range(0, len(order), cfg.batch_size)
    ]
    valid_loader = DataLoader(
        LabelledTokens(valid_seqs, valid_ids),
        batch_sampler=batches,
        collate_fn=collate,
        pin_memory=pin,
    )
    info = {"source_task": "text-classification", "pretrained": str(checkpoint)}
    return finetune(
        model,
        train_loader,
        valid_loader,
        cfg,
        out,
        "classification",
        encoder_config=encoder_config,
        info=info | {"classes": classes},
        skips=skips,
    )
