"""Pretraining batches of N-d signals: fitted arrays plus their precomputed masks.

Each input gets its ``M`` masks drawn on its own patch grid (in the loader worker, from
``make_rng(seed, stream_position)``). Inputs of different first-axis lengths are zero-padded
to the longest; their masks are extended over the padded (trailing) tokens, and since data2vec
2.0 batches the visible tokens, every row is then brought to the same visible count. Padded
tokens never enter attention, targets or the loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from data2vec.config import Config, MaskConfig, SignalEncoderConfig
from data2vec.data.batch import PretrainBatch
from data2vec.data.signal import SignalSource, SignalTransform, pad_batch
from data2vec.data.skips import SkipError
from data2vec.errors import ConfigError
from data2vec.masking import inverse_block_mask_nd, make_rng, random_mask

MASK_KINDS = ("inverse_block", "random")


def check_mask_kind(m: MaskConfig) -> None:
    """Refuse mask kinds the signal modality has no N-d version of."""
    if m.kind not in MASK_KINDS:
        raise ConfigError(
            f"mask.kind={m.kind!r} is not available for signals; allowed: {', '.join(MASK_KINDS)}"
        )


def signal_masks(m: MaskConfig, grid: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The ``m.clones`` masks of one input on its patch ``grid``: ``(M, prod(grid))`` bool."""
    check_mask_kind(m)
    if m.kind == "inverse_block":
        return inverse_block_mask_nd(grid, m.clones, m.ratio, rng, block=m.block, adjust=m.adjust)
    return random_mask(math.prod(grid), m.clones, m.ratio, rng)


def input_grid(enc: SignalEncoderConfig, length: int) -> tuple[int, ...]:
    """The patch grid of an input whose first axis has ``length`` samples."""
    return (-(-length // enc.patch_size[0]), *enc.grid[1:])


class PretrainSignals(Dataset):
    """``dataset[(index, position)]`` -> ``("ok", x (C, L, ...), masks (M, T), position)`` or
    ``("skip", name, reason)``.

    Args:
        source: the arrays.
        cfg: the run config (``encoder`` sizes, ``data.normalize``, ``mask``, seed).
    """

    def __init__(self, source: SignalSource, cfg: Config) -> None:
        check_mask_kind(cfg.mask)
        self.source = source
        self.cfg = cfg
        self.enc: SignalEncoderConfig = cfg.encoder  # type: ignore[assignment]
        self.seed = cfg.train.seed
        self.transform = SignalTransform(cfg)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, position = key
        rng = make_rng(self.seed, position)
        try:
            x = self.transform(self.source.load(index), rng)
        except SkipError as exc:
            return ("skip", self.source.name(index), str(exc))
        masks = signal_masks(self.cfg.mask, input_grid(self.enc, x.shape[1]), rng)
        return ("ok", x, masks, position)


def equalize_visible(mask: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Give every row of ``mask`` the same number of visible tokens, in place.

    Args:
        mask: ``(N, T)`` bool, True = masked; tokens ``>= valid[r]`` of row ``r`` are padding
            (all masked on entry).
        valid: ``(N,)`` valid tokens per row.

    Rows below the target reveal padded tokens (they are excluded from attention, targets and
    the loss); when a row has too few padded tokens to reach the most visible row, rows above
    the reachable target hide their last visible tokens instead.
    """
    visible = (~mask).sum(1)
    padded = mask.shape[1] - valid
    target = int(min(visible.max(), (visible + padded).min()))
    for r in range(mask.shape[0]):
        if visible[r] < target:
            start = int(valid[r])
            mask[r, start : start + target - visible[r]] = False
        elif visible[r] > target:
            shown = np.flatnonzero(~mask[r])
            mask[r, shown[target:]] = True
    return mask


def collate_pretrain_signals(items: list[tuple], patch: int, tokens_per_step: int) -> PretrainBatch:
    """Pad good inputs along the first axis and extend their masks; report skipped ones.

    Args:
        items: dataset items.
        patch: patch size of the first axis (inputs are padded to whole patches).
        tokens_per_step: tokens per first-axis patch (``g2 * ... * gn``).
    """
    good = [it for it in items if it[0] == "ok"]
    skipped = [(it[1], it[2]) for it in items if it[0] == "skip"]
    if not good:
        empty = torch.empty(0)
        return PretrainBatch(empty, empty.bool(), empty, skipped)
    source, padding = pad_batch([it[1] for it in good], patch)
    tokens = source.shape[2] // patch * tokens_per_step
    masks, valid = [], []
    for _, _, sample_masks, _ in good:
        full = np.ones((sample_masks.shape[0], tokens), dtype=bool)  # padded tokens: masked
        full[:, : sample_masks.shape[1]] = sample_masks
        masks.append(full)
        valid += [sample_masks.shape[1]] * sample_masks.shape[0]
    mask = equalize_visible(np.concatenate(masks), np.asarray(valid))  # (B·M, T)
    return PretrainBatch(
        torch.from_numpy(source),
        torch.from_numpy(mask),
        torch.tensor([it[3] for it in good]),
        skipped,
        padding_mask=torch.from_numpy(padding) if padding.any() else None,
    )


class SignalCollate:
    """A picklable collate function for loader workers (binds the patch geometry)."""

    def __init__(self, enc: SignalEncoderConfig) -> None:
        self.patch = enc.patch_size[0]
        self.tokens_per_step = math.prod(enc.grid[1:])

    def __call__(self, items: list[tuple]) -> PretrainBatch:
        return collate_pretrain_signals(items, self.patch, self.tokens_per_step)
