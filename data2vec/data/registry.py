"""Datasets per modality: the only place the engine learns what kind of data it reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Sampler

from data2vec.config import Config
from data2vec.data.sampling import BucketedBatchSampler, StreamBatchSampler
from data2vec.data.skips import SkipLog


@dataclass
class PretrainData:
    """A pretraining dataset, its collate function and its batch sampler factory.

    ``make_sampler(start_batch, rank, world_size)`` returns the endless batch sampler of a rank
    positioned at a batch.
    ``tokenizer`` (text) travels with the model into every checkpoint.
    """

    dataset: Dataset
    collate: Callable
    make_sampler: Callable[..., Sampler]
    size: int
    tokenizer: Any = None


def build_pretrain_data(
    cfg: Config, spec: str | Path, skips: SkipLog, work_dir: Path | None = None
) -> PretrainData:
    """The pretraining data for ``cfg.model.modality``.

    ``work_dir`` (the run directory) keeps what is derived from the data once per run: for
    text, the tokenizer and the tokenized corpus (which also set ``cfg.encoder.vocab_size``).
    """
    B, seed = cfg.data.batch_size, cfg.train.seed
    if cfg.model.modality == "image":
        from data2vec.data.image_pretrain import PretrainImages, collate_pretrain
        from data2vec.data.images import open_image_source

        images = PretrainImages(open_image_source(spec, skips), cfg)
        return PretrainData(
            images,
            collate_pretrain,
            lambda start, rank=0, world=1: StreamBatchSampler(
                len(images), B, seed, start_batch=start, rank=rank, world_size=world
            ),
            len(images),
        )
    if cfg.model.modality == "audio":
        from data2vec.data.audio import open_audio_source
        from data2vec.data.audio_pretrain import PretrainAudio, collate_pretrain_audio

        audio = PretrainAudio(open_audio_source(spec, skips), cfg, skips)
        return PretrainData(
            audio,
            collate_pretrain_audio,
            lambda start, rank=0, world=1: BucketedBatchSampler(
                audio.lengths, audio.indices, B, seed, start, rank=rank, world_size=world
            ),
            len(audio.indices),
        )
    if cfg.model.modality == "text":
        from data2vec.data.text_corpus import prepare_text

        if work_dir is None:
            raise ValueError("text pretraining data needs a work_dir for its tokenized corpus")
        return prepare_text(cfg, spec, skips, work_dir)
    raise NotImplementedError(f"no pretraining data for modality {cfg.model.modality!r}")
