"""Pretraining batches of images: augmented views plus their precomputed masks.

Masks are drawn here, in the loader workers, from ``make_rng(seed, stream_position)``: the
model receives ``(images, masks)`` and the same run always sees the same views and masks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from data2vec.config import Config
from data2vec.data.batch import PretrainBatch
from data2vec.data.images import ImageSource
from data2vec.data.skips import SkipError
from data2vec.data.transforms import TrainTransform
from data2vec.errors import ConfigError
from data2vec.masking import beit_block_mask, inverse_block_mask, make_rng, random_mask


class ImageMaskGenerator:
    """Draws the ``M`` masks of one sample as configured (``mask.kind``)."""

    KINDS = ("inverse_block", "beit", "random")

    def __init__(self, cfg: Config, grid: tuple[int, int]) -> None:
        if cfg.mask.kind not in self.KINDS:
            raise ConfigError(
                f"mask.kind={cfg.mask.kind!r} is not available for images; allowed: "
                + ", ".join(self.KINDS)
            )
        self.cfg = cfg.mask
        self.grid = grid

    def __call__(self, rng: np.random.Generator, rows: int | None = None) -> np.ndarray:
        m = self.cfg
        rows = m.clones if rows is None else rows
        h, w = self.grid
        if m.kind == "inverse_block":
            return inverse_block_mask(h, w, rows, m.ratio, rng, block=m.block, adjust=m.adjust)
        if m.kind == "beit":
            return beit_block_mask(h, w, rows, m.ratio, rng, min_block=m.min_block)
        return random_mask(h * w, rows, m.ratio, rng)


class PretrainImages(Dataset):
    """``dataset[(index, position)]`` -> ``(image (C,H,W), masks (M,T))`` or ``(name, reason)``.

    Args:
        source: the images.
        cfg: the run config (image size, augmentation, masking, seed).
    """

    def __init__(self, source: ImageSource, cfg: Config) -> None:
        self.source = source
        self.seed = cfg.train.seed
        size = cfg.encoder.image_size
        self.transform = TrainTransform(
            size,
            scale=cfg.data.crop_scale,
            hflip=cfg.data.hflip,
            mean=cfg.data.mean,
            std=cfg.data.std,
        )
        grid = (size // cfg.encoder.patch_size, size // cfg.encoder.patch_size)
        self.masks = ImageMaskGenerator(cfg, grid)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, position = key
        rng = make_rng(self.seed, position)
        try:
            image = self.source.load(index)
        except SkipError as exc:
            return ("skip", self.source.name(index), str(exc))
        return ("ok", self.transform(image, rng), self.masks(rng), position)


def collate_pretrain(items: list[tuple]) -> PretrainBatch:
    """Stack good samples; report skipped ones (a batch may shrink, never crash)."""
    good = [it for it in items if it[0] == "ok"]
    skipped = [(it[1], it[2]) for it in items if it[0] == "skip"]
    if not good:
        return PretrainBatch(
            torch.empty(0), torch.empty(0, dtype=torch.bool), torch.empty(0), skipped
        )
    source = torch.from_numpy(np.stack([it[1] for it in good]))
    mask = torch.from_numpy(np.concatenate([it[2] for it in good]))
    positions = torch.tensor([it[3] for it in good])
    return PretrainBatch(source, mask, positions, skipped)
