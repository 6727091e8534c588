"""Datasets per modality: the only place the engine learns what kind of data it reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from data2vec.config import Config
from data2vec.data.image_pretrain import PretrainImages, collate_pretrain
from data2vec.data.images import open_image_source
from data2vec.data.skips import SkipLog


def build_pretrain_dataset(
    cfg: Config, spec: str | Path, skips: SkipLog
) -> tuple[Dataset, Callable]:
    """The pretraining dataset and its collate function for ``cfg.model.modality``."""
    if cfg.model.modality == "image":
        return PretrainImages(open_image_source(spec, skips), cfg), collate_pretrain
    raise NotImplementedError(f"no pretraining data for modality {cfg.model.modality!r}")
