"""The batch the engine hands to an objective (modality-agnostic)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import Tensor


@dataclass
class PretrainBatch:
    """One pretraining batch.

    Attributes:
        source: the model input, ``(B, ...)`` (images: ``(B, C, H, W)`` float).
        mask: ``(B·M, T)`` bool, True = masked, sample-major.
        positions: ``(B,)`` stream positions of the samples (for debugging and exact resume).
        skipped: ``(path, reason)`` of inputs dropped from this batch.
        padding_mask: ``source``'s padding (e.g. ``(B, S)`` for waveforms), True = padding.
        modality: which modality the batch holds, for a joint model (None: the model's only one).
    """

    source: Tensor
    mask: Tensor
    positions: Tensor
    skipped: list[tuple[str, str]] = field(default_factory=list)
    padding_mask: Tensor | None = None
    modality: str | None = None

    def __len__(self) -> int:
        return int(self.source.shape[0])

    def pin_memory(self) -> PretrainBatch:
        """A copy in page-locked memory (``DataLoader(pin_memory=True)`` calls this), so that
        ``.to("cuda", non_blocking=True)`` copies without stalling the host."""
        pad = self.padding_mask
        return replace(
            self,
            source=self.source.pin_memory(),
            mask=self.mask.pin_memory(),
            padding_mask=None if pad is None else pad.pin_memory(),
        )
