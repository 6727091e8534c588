"""Text: token embedding, learned positions, a 1-D decoder (data2vec 2.0 language recipe).

Follows fairseq's ``TextEncoder`` (``examples/data2vec/models/modalities/text.py``)::

    token ids (B, T) -> embedding + learned positions -> LayerNorm -> dropout   (B, T, D)
    -> keep the visible tokens -> prenet blocks (none in the released recipe)

Unlike images and audio, a text model without prenet blocks has no LayerNorm at the start of
its context encoder: the embedding LayerNorm already normalizes the blocks' input. The teacher
of the text recipe owns only the shared blocks and reads the student's unmasked embeddings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from data2vec.config import DecoderConfig, TextEncoderConfig
from data2vec.modalities.base import ContextEncoder, ModalityEncoder
from data2vec.models.decoders import ConvDecoder, build_conv_decoder


def token_positions(tokens: Tensor, pad_id: int) -> Tensor:
    """Position ids as fairseq's ``make_positions``: ``pad_id + 1 + i`` for the i-th real token.

    Padding gets ``pad_id`` (a zero row of the table), so a right-padded sequence has the
    same positions as the sequence alone. ``tokens: (B, T)`` -> ``(B, T)`` int64.
    """
    real = tokens.ne(pad_id).long()
    return torch.cumsum(real, dim=1) * real + pad_id


class TokenEmbedding(nn.Module):
    """The local encoder: ``LayerNorm(embed(tokens) + embed_positions(positions))``, dropout.

    The position table has ``max_positions + pad_id + 1`` rows (fairseq's layout, so weights
    convert by renaming); embeddings are not scaled by sqrt(D) (``no_scale_embedding``).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        max_positions: int,
        pad_id: int,
        layernorm: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.max_positions = max_positions
        self.embed_tokens = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.embed_positions = nn.Embedding(max_positions + pad_id + 1, dim, padding_idx=pad_id)
        # fairseq's LayerNorm default eps (1e-5), independent of model.norm_eps
        self.layernorm_embedding = nn.LayerNorm(dim) if layernorm else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens: (B, T)`` int64 -> ``(B, T, D)``."""
        if tokens.shape[1] > self.max_positions:
            raise ValueError(
                f"sequence of {tokens.shape[1]} tokens exceeds encoder.max_positions="
                f"{self.max_positions}"
            )
        vocab = self.embed_tokens.num_embeddings
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(
                f"token ids must be in [0, {vocab}) (encoder.vocab_size); got "
                f"[{int(tokens.min())}, {int(tokens.max())}]: was the text tokenized with this "
                "model's tokenizer?"
            )
        x = self.embed_tokens(tokens) + self.embed_positions(token_positions(tokens, self.pad_id))
        return self.dropout(self.layernorm_embedding(x))


class TextEncoder(ModalityEncoder):
    """Text modality encoder.

    Args:
        cfg: text encoder settings (vocabulary, positions, padding id, dropout, prenet).
        embed_dim: model width ``D``.
        make_block: factory of one prenet block.
        make_norm: factory of the context encoder's LayerNorm (only used with prenet blocks).
    """

    def __init__(
        self,
        cfg: TextEncoderConfig,
        embed_dim: int,
        make_block: Callable[[], nn.Module],
        make_norm: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_extra_tokens = 0
        self.extra_tokens = None
        self.pos_embed = None
        self.pad_id = cfg.pad_id
        self.zero_padding = cfg.zero_padding
        self.local_encoder = TokenEmbedding(
            cfg.vocab_size,
            embed_dim,
            cfg.max_positions,
            cfg.pad_id,
            cfg.layernorm_embedding,
            cfg.dropout,
        )
        blocks = nn.ModuleList(make_block() for _ in range(cfg.prenet_depth))
        # fairseq: the context encoder starts with a LayerNorm only when it has prenet blocks.
        norm = make_norm(embed_dim) if cfg.prenet_depth > 0 else nn.Identity()
        dropout = cfg.prenet_dropout if cfg.prenet_depth > 0 else 0.0
        self.context_encoder = ContextEncoder(norm, blocks, dropout)

    def embed(
        self, source: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``source: (B, T)`` token ids -> ``(B, T, D)`` and the ``(B, T)`` padding mask.

        Padding is where the tokens equal ``pad_id`` (or where ``padding_mask`` says so).
        """
        pad = source.eq(self.pad_id)
        if padding_mask is not None:
            pad = pad | padding_mask
        local = self.local_encoder(source)
        if self.zero_padding:
            local = local.masked_fill(pad.unsqueeze(-1), 0.0)
        return local, (pad if bool(pad.any()) else None)

    def num_tokens(self, length: int = 512) -> int:
        return length

    def make_decoder(self, cfg: DecoderConfig) -> ConvDecoder:
        return build_conv_decoder(self.embed_dim, cfg)
