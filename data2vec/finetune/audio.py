"""Speech fine-tuning: utterance classification and CTC recognition over characters.

Training clips get a random crop to ``data.max_samples`` (seeded by ``(seed, position)``) and the
per-utterance normalization of pretraining; batches are length-bucketed and padded, the padding
mask carried through the encoder. CTC transcripts come from the manifest's ``transcript``
column; a labelled folder of spoken words uses each clip's class name as its transcript.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data2vec.config import Config
from data2vec.data.audio import AudioSource, normalize, open_audio_source, random_crop
from data2vec.data.sampling import BucketedBatchSampler
from data2vec.data.skips import SkipError, SkipLog
from data2vec.errors import DataError
from data2vec.finetune.ctc import CharVocab
from data2vec.finetune.heads import ClassificationHead, CTCHead
from data2vec.finetune.image import label_space
from data2vec.finetune.model import FineTuneModel, SupervisedBatch, load_pretrained
from data2vec.finetune.trainer import FineTuneConfig, FineTuneResult, finetune, pin_batches
from data2vec.masking import make_rng

log = logging.getLogger(__name__)


def transcripts(source: AudioSource) -> list[str]:
    """One transcript per clip: the manifest's, else the class name (spoken-word folders)."""
    out = []
    for i in range(len(source)):
        text = source.transcript(i)
        if text is None and source.classes and source.label(i) >= 0:
            text = source.classes[source.label(i)]
        if not text:
            raise DataError(
                f"{source.name(i)} has no transcript: CTC needs a manifest with a 'transcript' "
                "column, or class folders named by the spoken word"
            )
        out.append(text)
    return out


class LabelledAudio(Dataset):
    """``dataset[(index, position)]`` -> ``("ok", wave, target)`` or ``("skip", name, reason)``.

    ``target`` is a class index (classification) or a list of label ids (CTC).
    """

    def __init__(
        self, source: AudioSource, cfg: Config, targets: list, seed: int, train: bool
    ) -> None:
        self.source = source
        self.max_samples = cfg.data.max_samples
        self.normalize = cfg.data.normalize
        self.targets = targets
        self.seed = seed
        self.train = train

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, position = key
        try:
            wave = self.source.load(index)
        except SkipError as exc:
            return ("skip", self.source.name(index), str(exc))
        if self.train:
            wave = random_crop(wave, self.max_samples, make_rng(self.seed, position))
        else:
            wave = wave[: self.max_samples]
        if self.normalize:
            wave = normalize(wave)
        return ("ok", np.asarray(wave, dtype=np.float32), self.targets[index])


def collate_audio(items: list[tuple]) -> SupervisedBatch:
    """Pad waveforms (and CTC label sequences) into a :class:`SupervisedBatch`."""
    good = [it for it in items if it[0] == "ok"]
    skipped = [(it[1], it[2]) for it in items if it[0] == "skip"]
    if not good:
        return SupervisedBatch(
            torch.empty(0), None, torch.empty(0, dtype=torch.long), None, skipped
        )
    longest = max(len(it[1]) for it in good)
    source = torch.zeros(len(good), longest)
    pad = torch.ones(len(good), longest, dtype=torch.bool)
    for b, (_, wave, _) in enumerate(good):
        source[b, : len(wave)] = torch.from_numpy(wave)
        pad[b, : len(wave)] = False
    if isinstance(good[0][2], list):  # CTC: (B, L) padded label ids and their lengths
        lengths = torch.tensor([len(it[2]) for it in good])
        targets = torch.zeros(len(good), int(lengths.max()), dtype=torch.long)
        for b, (_, _, ids) in enumerate(good):
            targets[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return SupervisedBatch(source, pad, targets, lengths, skipped)
    targets = torch.tensor([it[2] for it in good], dtype=torch.long)
    return SupervisedBatch(source, pad, targets, None, skipped)


def _loaders(
    encoder_config: Config,
    train: AudioSource,
    valid: AudioSource,
    train_targets: list,
    valid_targets: list,
    cfg: FineTuneConfig,
    skips: SkipLog,
) -> tuple[DataLoader, DataLoader]:
    lengths = train.lengths(skips)
    usable = np.flatnonzero(lengths > 0)
    workers = cfg.num_workers
    pin = pin_batches(cfg)  # for CUDA
    train_loader = DataLoader(
        LabelledAudio(train, encoder_config, train_targets, cfg.seed, train=True),
        batch_sampler=BucketedBatchSampler(lengths, usable, cfg.batch_size, cfg.seed),
        collate_fn=collate_audio,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    order = np.argsort(valid.lengths(skips), kind="stable")  # similar lengths: little padding
    batches = [
        [(int(i), int(i)) for i in order[s : s + cfg.batch_size]]
        for s in range(0, len(order), cfg.batch_size)
    ]
    valid_loader = DataLoader(
        LabelledAudio(valid, encoder_config, valid_targets, cfg.seed, train=False),
        batch_sampler=batches,
        collate_fn=collate_audio,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
    )
    return train_loader, valid_loader


def finetune_audio(
    task: str,
    checkpoint: str | Path,
    train_path: str | Path,
    valid_path: str | Path,
    out: str | Path,
    cfg: FineTuneConfig,
) -> FineTuneResult:
    """Fine-tune the speech encoder of ``checkpoint`` for ``audio-classification`` or ``ctc``."""
    encoder_config, encoder = load_pretrained(checkpoint, "audio", task, "a speech encoder")
    skips = SkipLog()
    train = open_audio_source(train_path, skips)
    valid = open_audio_source(valid_path, skips)
    torch.manual_seed(cfg.seed)  # the head's initialization
    info: dict = {"source_task": task, "pretrained": str(checkpoint)}
    vocab = None
    if task == "ctc":
        train_text, valid_text = transcripts(train), transcripts(valid)
        vocab = CharVocab.build(train_text)
        train_targets = [vocab.encode(t) for t in train_text]
        valid_targets = [vocab.encode(t) for t in valid_text]
        head = CTCHead(encoder.embed_dim, len(vocab), cfg.head_dropout)
        model = FineTuneModel(encoder, head, "ctc")
    else:
        classes, valid_map = label_space(train, valid)
        train_targets = train.labels().tolist()
        valid_targets = valid_map[valid.labels()].tolist()
        head = ClassificationHead(encoder.embed_dim, len(classes), cfg.pool, cfg.head_dropout)
        model = FineTuneModel(encoder, head, "classification")
        info["classes"] = classes
    log.info("fine-tuning %s on %d clips; %d validation clips", task, len(train), len(valid))
    train_loader, valid_loader = _loaders(
        encoder_config, train, valid, train_targets, valid_targets, cfg, skips
    )
    return finetune(
        model,
        train_loader,
        valid_loader,
        cfg,
        out,
        model.task,
        encoder_config=encoder_config,
        info=info,
        vocab=vocab,
        skips=skips,
    )
