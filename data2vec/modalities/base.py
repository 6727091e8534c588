"""The modality encoder: everything between raw input and the shared transformer blocks.

Pipeline (data2vec 2.0 §3; fairseq ``ModalitySpecificEncoder``)::

    source --embed--> local features (B, T, D)              [local encoder + projection]
           --contextualize--> (B·M, E + V, D)                 [+ positions, clone M times,
                                                                keep the V visible tokens,
                                                                prepend E extra tokens,
                                                                LayerNorm + prenet blocks]

A concrete modality (``modalities/image.py``) supplies the local encoder, the position table,
the number of extra tokens and the decoder's geometry; this base class owns the rest, so the
objectives never need to know what an image is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from data2vec.masking import MaskInfo
from data2vec.nn.attention import attention_mask
from data2vec.nn.block import run_blocks


@dataclass
class Context:
    """Input of the shared blocks.

    Attributes:
        x: ``(N, E + T', D)`` with the ``E`` extra tokens first.
        padding_mask: ``(N, E + T')`` bool, True = padding, or None.
        attn_mask: additive attention mask for SDPA (padding and any bias), or None.
    """

    x: Tensor
    padding_mask: Tensor | None
    attn_mask: Tensor | None


class ContextEncoder(nn.Module):
    """``norm -> dropout -> prenet blocks``: module names as fairseq's ``BlockEncoder``."""

    def __init__(self, norm: nn.Module, blocks: nn.ModuleList, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = norm
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.blocks = blocks

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        """``x: (N, T, D)`` -> ``(N, T, D)``."""
        h = self.dropout(self.norm(x))
        for out, _ in run_blocks(self.blocks, h, attn_mask):
            h = out
        return h


class ModalityEncoder(nn.Module):
    """Base class of modality encoders.

    Subclasses set ``local_encoder`` (a module mapping the source to ``(B, T, D)``), optionally
    ``pos_embed`` (a ``(1, T, D)`` buffer of fixed positions), ``extra_tokens`` and
    ``context_encoder``, and implement :meth:`num_tokens` and :meth:`make_decoder`.
    """

    embed_dim: int
    num_extra_tokens: int
    extra_tokens: nn.Parameter | None
    pos_embed: Tensor | None
    local_encoder: nn.Module
    context_encoder: ContextEncoder

    def no_weight_decay(self) -> set[str]:
        """Parameters that must not be weight-decayed (extra tokens; subclasses add positions)."""
        return {"extra_tokens"} if self.extra_tokens is not None else set()

    def embed(
        self, source: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Local features. ``source`` -> ``(B, T, D)`` and a ``(B, T)`` padding mask or None."""
        return self.local_encoder(source), padding_mask

    def add_positions(self, x: Tensor) -> Tensor:
        """``x: (B, T, D)`` -> ``x`` plus fixed positions (identity when the modality has none)."""
        return x if self.pos_embed is None else x + self.pos_embed.to(x.dtype)

    def contextualize(
        self,
        local: Tensor,
        padding_mask: Tensor | None = None,
        mask: MaskInfo | None = None,
    ) -> Context:
        """Positions, masking, extra tokens, attention bias and prenet.

        Args:
            local: ``(B, T, D)`` local features.
            padding_mask: ``(B, T)`` bool, True = padding, or None.
            mask: masks of ``N = B·M`` rows (``M`` clones per sample, sample-major: row
                ``b·M + c``), or None for the unmasked view. Masked tokens are dropped.

        Returns:
            The input of the shared blocks, ``x: (N, E + V, D)`` (``V = T`` without a mask).
        """
        x, padding_mask, positions = self.position_and_select(local, padding_mask, mask)
        E = self.num_extra_tokens
        if self.extra_tokens is not None:
            extra = self.extra_tokens.to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([extra, x], dim=1)  # (N, E + V, D)
            if padding_mask is not None:
                padding_mask = nn.functional.pad(padding_mask, (E, 0))
        bias = self.attention_bias(positions, local.shape[1], x.device)
        if bias is not None and E > 0 and not self.bias_covers_extra_tokens:
            bias = nn.functional.pad(bias, (E, 0, E, 0))  # extra tokens get no bias
        attn = attention_mask(padding_mask, bias, x.dtype)
        x = self.context_encoder(x, attn)
        return Context(x=x, padding_mask=padding_mask, attn_mask=attn)

    def position_and_select(
        self, local: Tensor, padding_mask: Tensor | None, mask: MaskInfo | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Add positions and keep the visible tokens.

        Returns:
            ``x: (N, V, D)``, its padding mask, and the original positions of its tokens
            ``(N, V)`` (None when nothing was dropped: positions are ``0..T-1``).
        """
        x = self.add_positions(local)
        if mask is None:
            return x, padding_mask, None
        kept, kept_pad = self._keep_visible(x, padding_mask, mask)
        return kept, kept_pad, mask.ids_keep

    def attention_bias(
        self, positions: Tensor | None, length: int, device: torch.device
    ) -> Tensor | None:
        """Additive attention bias ``(N | 1, H, V, V)`` for tokens at ``positions`` (None: none)."""
        return None

    @property
    def bias_covers_extra_tokens(self) -> bool:
        """True when :meth:`attention_bias` already has rows/columns for the extra tokens."""
        return False

    @staticmethod
    def _keep_visible(
        x: Tensor, padding_mask: Tensor | None, mask: MaskInfo
    ) -> tuple[Tensor, Tensor | None]:
        """Gather the visible tokens of each clone straight from the un-cloned batch.

        ``x: (B, T, D)``, ``mask`` of ``B·M`` rows -> ``(B·M, V, D)``; indexing row ``n // M``
        avoids materializing the ``(B·M, T, D)`` repeat.
        """
        B = x.shape[0]
        N = mask.mask.shape[0]
        if N % B:
            raise ValueError(f"{N} mask rows is not a multiple of the batch size {B}")
        sample = torch.arange(N, device=x.device).div(N // B, rounding_mode="floor")[:, None]
        ids = mask.ids_keep.to(x.device)
        kept = x[sample, ids]  # (N, V, D)
        kept_pad = None if padding_mask is None else padding_mask[sample, ids]
        if kept_pad is not None and not bool(kept_pad.any()):
            kept_pad = None
        return kept, kept_pad

    def num_tokens(self) -> int:
        """``T``, the number of local-feature tokens for the configured input size."""
        raise NotImplementedError

    def make_decoder(self, cfg: object) -> nn.Module:
        """The data2vec 2.0 decoder with this modality's geometry (1-D or 2-D)."""
        raise NotImplementedError
