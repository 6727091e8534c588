"""Pretraining from tar shards: an endless, seeded stream for every modality.

Each reader (one per rank and loader worker) reads its share of the shards (see
:func:`~data2vec.data.shards.reader_plan`), epoch after epoch, through a shuffle buffer, and
turns samples into the items the in-memory pipelines produce, with their code: images and audio
go through :class:`PretrainImages` / :class:`PretrainAudio` (same decoding, bad-input checks,
augmentation and masks), text documents are tokenized and packed into blocks as
:func:`~data2vec.data.text_pretrain.pack_blocks` does. The ``k``-th item of reader ``r`` of
``R`` gets stream position ``k·R + r``, which seeds its crops and masks, so a run is a pure
function of the seed and the layout (ranks, workers, batch size). Resuming after ``n`` batches
skips each reader's share of them without decoding it.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from data2vec.config import Config
from data2vec.data.registry import PretrainData
from data2vec.data.shards import Sample, read_samples, reader_plan, shard_index, shuffled
from data2vec.data.skips import SkipError, SkipLog
from data2vec.errors import ConfigError, DataError
from data2vec.masking import make_rng

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 1000  # samples held per reader (data.shuffle_buffer)
# tmpfs when there is one: decoders read the sample from a scratch file, never from disk.
_SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


class ShardStream(IterableDataset):
    """The endless item stream of one rank.

    Args:
        shards: every shard of the data set (all ranks get the same list).
        units: turns this reader's sample stream into units (images/audio: the samples; text:
            packed token blocks).
        make_item: ``(unit, position) -> ("ok", ..., position)`` or ``("skip", name, reason)``.
        seed, batch_size: the run's seed and per-rank batch size.
        start_batch: batches of this rank already trained on (resume).
        rank, world_size: this rank's place.
        buffer: shuffle buffer size.
    """

    def __init__(
        self,
        shards: list[Path],
        units: Callable[[Iterator[Sample]], Iterator[Any]],
        make_item: Callable[[Any, int], tuple],
        seed: int,
        batch_size: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer: int = SHUFFLE_BUFFER,
    ) -> None:
        self.shards, self.units, self.make_item = shards, units, make_item
        self.seed, self.batch_size, self.start_batch = seed, batch_size, start_batch
        self.rank, self.world_size, self.buffer = rank, world_size, buffer

    def _epoch(self, epoch: int, reader: int, readers: int, damaged: list) -> Iterator[Sample]:
        """This reader's samples of one epoch, in shard order."""
        plan = reader_plan(len(self.shards), epoch, self.seed, reader, readers)
        n = kept = 0  # n counts the samples of the shards split sample by sample
        for i, offset, stride in plan:
            for sample in read_samples(self.shards[i]):
                if isinstance(sample, tuple):  # a damaged shard: report, go on
                    damaged.append(("skip", *sample))
                    continue
                if stride == 1 or n % stride == offset:
                    kept += 1
                    yield sample
                n += stride > 1
        if kept == 0:
            raise DataError(
                f"reader {reader} of {readers} (ranks x loader workers) found no sample in "
                f"{len(self.shards)} shards"
            )

    def _samples(self, reader: int, readers: int, damaged: list) -> Iterator[Sample]:
        """Epoch after epoch, each shuffled on its own: every sample once per epoch."""
        for epoch in itertools.count():
            rng = make_rng(self.seed, 0xB0FF, reader, epoch)
            yield from shuffled(self._epoch(epoch, reader, readers, damaged), self.buffer, rng)

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        # The loader takes batch j from worker j % workers: this worker made the batches
        # worker, worker + workers, ... below start_batch.
        done = max(0, -(-(self.start_batch - worker) // workers)) * self.batch_size
        damaged: list[tuple] = []
        for k, unit in enumerate(self.units(self._samples(reader, readers, damaged))):
            while damaged:
                yield damaged.pop()
            if k >= done:
                yield self.make_item(unit, k * readers + reader)


def _identity(samples: Iterator[Sample]) -> Iterator[Sample]:
    return samples


class _Slot:
    """A one-sample source for the in-memory pipelines: :meth:`hold` puts a sample's member
    into a scratch file that the pipeline's own loader then reads."""

    def __init__(self, extensions: frozenset[str], loader: Callable[[Path], Any]) -> None:
        self.classes: list[str] = []
        self.extensions, self.loader = extensions, loader
        self.path: Path | None = None
        self.origin = ""

    def __len__(self) -> int:
        return 1

    def name(self, i: int) -> str:
        return self.origin

    def labels(self) -> np.ndarray:
        return np.full(1, -1, dtype=np.int64)

    def lengths(self, skips: SkipLog | None = None) -> np.ndarray:
        return np.zeros(1, dtype=np.int64)  # unknown before decoding: no length bucketing

    def load(self, i: int) -> Any:
        if self.path is None:
            raise SkipError("no decodable member")
        return self.loader(self.path)


class _SlotItems:
    """``(sample, position) -> item`` through a pipeline dataset reading from a :class:`_Slot`."""

    def __init__(self, slot: _Slot, dataset: Any) -> None:
        self.slot, self.dataset = slot, dataset

    def __call__(self, sample: Sample, position: int) -> tuple:
        exts = [e for e in sample.files if f".{e}" in self.slot.extensions]
        if not exts:
            found = ", ".join(sorted(sample.files)) or "none"
            return ("skip", sample.origin, f"no usable member (found: {found})")
        ext = exts[0]
        self.slot.origin = f"{sample.origin}.{ext}"
        with tempfile.NamedTemporaryFile(suffix=f".{ext}", dir=_SCRATCH) as f:
            f.write(sample.files[ext])
            f.flush()
            self.slot.path = Path(f.name)
            try:
                return self.dataset[(0, position)]
            finally:
                self.slot.path = None


def _image_items(cfg: Config) -> _SlotItems:
    from data2vec.data.image_pretrain import PretrainImages
    from data2vec.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, load_image_file

    slot = _Slot(IMAGE_EXTENSIONS, partial(load_image_file, max_pixels=DEFAULT_MAX_PIXELS))
    return _SlotItems(slot, PretrainImages(slot, cfg))  # type: ignore[arg-type]


def _audio_items(cfg: Config) -> _SlotItems:
    from data2vec.data.audio import AUDIO_EXTENSIONS, load_audio_file
    from data2vec.data.audio_pretrain import PretrainAudio

    slot = _Slot(AUDIO_EXTENSIONS, load_audio_file)
    return _SlotItems(slot, PretrainAudio(slot, cfg, SkipLog()))  # type: ignore[arg-type]


def build_stream_data(
    cfg: Config, shards: list[Path], skips: SkipLog, work_dir: Path | None
) -> PretrainData:
    """Pretraining data streamed from ``shards`` for ``cfg.model.modality``."""
    index = shard_index(shards)
    modality = cfg.model.modality
    if index.get("modality", modality) != modality:
        raise ConfigError(
            f"the shards in {shards[0].parent} hold {index['modality']} data but the preset "
            f"trains a {modality} model"
        )
    B, seed = cfg.data.batch_size, cfg.train.seed
    tokenizer = None
    if modality == "image":
        from data2vec.data.image_pretrain import collate_pretrain as collate

        units, make_item = _identity, _image_items(cfg)
    elif modality == "audio":
        from data2vec.data.audio_pretrain import collate_pretrain_audio as collate

        units, make_item = _identity, _audio_items(cfg)
    elif modality == "text":
        from data2vec.data.text_stream import text_stream_parts

        if work_dir is None:
            raise ValueError("text pretraining data needs a work_dir for its tokenizer")
        units, make_item, collate, tokenizer = text_stream_parts(cfg, shards, work_dir)
    else:
        raise NotImplementedError(f"no stream for modality {modality!r}")
    size = int(index.get("samples", 0))
    log.info("streaming %d shards (%s samples) of %s data", len(shards), size or "?", modality)
    return PretrainData(
        None,  # type: ignore[arg-type]
        collate,
        None,
        size,
        tokenizer=tokenizer,
        make_stream=lambda start, rank=0, world=1: ShardStream(
            shards, units, make_item, seed, B, start, rank, world, cfg.data.shuffle_buffer
        ),
    )
