"""Datasets per modality: the only place the engine learns what kind of data it reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, IterableDataset, Sampler

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
    make_sampler: Callable[..., Sampler] | None
    size: int
    tokenizer: Any = None
    # Streams (tar shards): ``make_stream(start_batch, rank, world_size)`` returns the rank's
    # endless IterableDataset of samples positioned at a batch; ``make_sampler`` is then None.
    make_stream: Callable[..., IterableDataset] | None = None


def build_pretrain_data(
    cfg: Config, spec: str | Path, skips: SkipLog, work_dir: Path | None = None
) -> PretrainData:
    """The pretraining data for ``cfg.model.modality``.

    ``work_dir`` (the run directory) keeps what is derived from the data once per run: for
    text, the tokenizer and the tokenized corpus (which also set ``cfg.encoder.vocab_size``).
    """
    if cfg.model.modality == "multi":  # a joint model: one loader over several modalities
        from data2vec.data.multimodal import build_multi_data

        return build_multi_data(cfg, spec, skips, work_dir)
    B, seed = cfg.data.batch_size, cfg.train.seed
    from data2vec.data.shards import find_shards

    shards = find_shards(spec)
    if shards is not None:
        from data2vec.data.shard_stream import build_stream_data

        return build_stream_data(cfg, shards, skips, work_dir)
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
    if cfg.model.modality == "signal":
        from data2vec.data.signal import open_signal_source, resolve_from_data
        from data2vec.data.signal_pretrain import PretrainSignals, SignalCollate

        signal_source = open_signal_source(spec, skips)
        resolve_from_data(cfg, signal_source)  # in_chans=0, dataset statistics
        signals = PretrainSignals(signal_source, cfg)
        return PretrainData(
            signals,
            SignalCollate(cfg.encoder),  # type: ignore[arg-type]
            lambda start, rank=0, world=1: StreamBatchSampler(
                len(signals), B, seed, start_batch=start, rank=rank, world_size=world
            ),
            len(signals),
        )
    if cfg.model.modality == "text":
        from data2vec.data.text_corpus import prepare_text

        if work_dir is None:
            raise ValueError("text pretraining data needs a work_dir for its tokenized corpus")
        return prepare_text(cfg, spec, skips, work_dir)
    raise NotImplementedError(f"no pretraining data for modality {cfg.model.modality!r}")
