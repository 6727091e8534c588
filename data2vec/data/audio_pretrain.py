"""Pretraining batches of speech: cropped, normalized waveforms plus their precomputed masks.

Each utterance gets its ``M`` block masks drawn on its own frames (in the loader worker, from
``make_rng(seed, stream_position)``). The collate function pads waveforms to the longest in the
batch and extends the masks over the padded frames; since data2vec 2.0 batches the visible
frames, every row must keep the same number of them, so rows of shorter utterances reveal some
padded frames. Padded frames never enter attention, targets or the loss.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from data2vec.config import Config, MaskConfig
from data2vec.data.audio import AudioSource, normalize, random_crop
from data2vec.data.batch import PretrainBatch
from data2vec.data.skips import SkipError, SkipLog
from data2vec.errors import ConfigError
from data2vec.masking import block_mask_1d, make_rng, random_mask, span_mask
from data2vec.modalities.audio import frame_lengths


def _frames(samples: int) -> int:
    return int(frame_lengths(torch.tensor([samples]))[0])


def audio_masks(m: MaskConfig, frames: int, rng: np.random.Generator) -> np.ndarray:
    """The ``m.clones`` masks of one utterance of ``frames`` frames: ``(M, frames)`` bool."""
    if m.kind == "block":
        return block_mask_1d(frames, m.clones, m.ratio, rng, span=m.block, adjust=m.adjust)
    if m.kind == "random":
        return random_mask(frames, m.clones, m.ratio, rng)
    if m.kind == "span":
        return span_mask(frames, m.clones, m.ratio, rng, span=m.block)
    raise ConfigError(
        f"mask.kind={m.kind!r} is not available for audio; allowed: block, random, span"
    )


class PretrainAudio(Dataset):
    """``dataset[(index, position)]`` -> ``("ok", wave (S,), masks (M, T), position)`` or
    ``("skip", name, reason)``.

    Args:
        source: the recordings.
        cfg: the run config (``data.max_samples/min_samples/normalize``, ``mask``, seed).
        skips: records files too short to use (found from their headers, never decoded).
    """

    def __init__(self, source: AudioSource, cfg: Config, skips: SkipLog) -> None:
        self.source = source
        self.cfg = cfg
        self.seed = cfg.train.seed
        self.lengths = source.lengths(skips)
        usable = []
        for i, n in enumerate(self.lengths):
            if 0 < n < cfg.data.min_samples:
                skips.add(
                    source.name(i),
                    f"too short: {n} samples < data.min_samples={cfg.data.min_samples}",
                )
            elif n > 0:
                usable.append(i)
        self.indices = np.asarray(usable, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, position = key
        rng = make_rng(self.seed, position)
        try:
            wave = self.source.load(index)
        except SkipError as exc:
            return ("skip", self.source.name(index), str(exc))
        if len(wave) < self.cfg.data.min_samples:  # the header can differ from the decoded length
            return ("skip", self.source.name(index), f"too short: {len(wave)} samples")
        wave = random_crop(wave, self.cfg.data.max_samples, rng)
        if self.cfg.data.normalize:
            wave = normalize(wave)
        return (
            "ok",
            np.asarray(wave, dtype=np.float32),
            audio_masks(self.cfg.mask, _frames(len(wave)), rng),
            position,
        )


def collate_pretrain_audio(items: list[tuple]) -> PretrainBatch:
    """Pad waveforms and masks; give every mask row the same number of visible frames."""
    good = [it for it in items if it[0] == "ok"]
    skipped = [(it[1], it[2]) for it in items if it[0] == "skip"]
    if not good:
        empty = torch.empty(0)
        return PretrainBatch(empty, empty.bool(), empty, skipped)
    longest = max(len(it[1]) for it in good)
    frames = _frames(longest)
    source = np.zeros((len(good), longest), dtype=np.float32)
    padding = np.ones((len(good), longest), dtype=bool)
    masks, valid = [], []
    for b, (_, wave, sample_masks, _) in enumerate(good):
        source[b, : len(wave)] = wave
        padding[b, : len(wave)] = False
        full = np.ones((sample_masks.shape[0], frames), dtype=bool)  # padded frames: masked
        full[:, : sample_masks.shape[1]] = sample_masks
        masks.append(full)
        valid += [sample_masks.shape[1]] * sample_masks.shape[0]
    mask = np.concatenate(masks)  # (B·M, T)
    visible = (~mask).sum(1)
    target = int(visible.max())
    for r in np.flatnonzero(visible < target):
        # Reveal padded frames only: they are excluded from attention, targets and the loss.
        # A row with fewer valid frames also has proportionally more padded ones to reveal.
        mask[r, valid[r] : valid[r] + target - visible[r]] = False
    positions = torch.tensor([it[3] for it in good])
    return PretrainBatch(
        torch.from_numpy(source),
        torch.from_numpy(mask),
        positions,
        skipped,
        padding_mask=torch.from_numpy(padding),
    )
