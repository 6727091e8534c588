"""Images: patch embedding, 2-D positions, a CLS token, 2-D decoder.

Defaults follow the data2vec 2.0 ViT-B/16 recipe (fairseq ``ImageEncoder``): fixed 2-D sin-cos
positions added to the patches. data2vec 1.0 (BEiT backbone) instead uses a learned relative
position bias shared by all blocks (``encoder.positions: relative``, ``nn/beit.py``). Module
and buffer names follow fairseq where that keeps weight conversion a plain rename.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from data2vec.config import DecoderConfig, ImageEncoderConfig
from data2vec.modalities.base import ContextEncoder, ModalityEncoder
from data2vec.models.decoders import ConvDecoder, build_conv_decoder
from data2vec.nn.beit import RelativePositionBias
from data2vec.nn.positions import sincos_2d


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches, linearly embedded by a strided conv.

    ``images: (B, C, H, W)`` -> ``(B, (H/p)·(W/p), D)``, patches in row-major order.
    """

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        # data2vec 2.0 / MAE: Xavier-uniform on the conv weight viewed as a (D, C·p·p) matrix.
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, "
                f"got {tuple(images.shape[-2:])}"
            )
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h·w, D)


class ImageEncoder(ModalityEncoder):
    """Image modality encoder.

    Args:
        cfg: image encoder settings (size, patch, channels, prenet depth, extra tokens).
        embed_dim: model width ``D``.
        num_heads: attention heads (the relative position bias has one table column per head).
        make_block: factory of one prenet block.
        make_norm: factory of the LayerNorm that starts the context encoder (post-LN models).
    """

    def __init__(
        self,
        cfg: ImageEncoderConfig,
        embed_dim: int,
        num_heads: int,
        make_block: Callable[[], nn.Module],
        make_norm: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_extra_tokens = cfg.num_extra_tokens
        self.local_encoder = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.in_chans, embed_dim)
        self.grid = self.local_encoder.grid
        self.rel_pos_bias: RelativePositionBias | None = None
        if cfg.positions == "relative":
            self.pos_embed = None
            self.rel_pos_bias = RelativePositionBias(self.grid, num_heads)
        else:
            pos = sincos_2d(embed_dim, *self.grid).unsqueeze(0)  # (1, T, D)
            self.register_buffer("pos_embed", pos, persistent=True)
        self.extra_tokens = None
        if cfg.num_extra_tokens > 0:
            # data2vec 2.0 images: the CLS token starts from N(0, 1) (init_extra_token_zero=False).
            self.extra_tokens = nn.Parameter(torch.randn(1, cfg.num_extra_tokens, embed_dim))
        blocks = nn.ModuleList(make_block() for _ in range(cfg.prenet_depth))
        self.context_encoder = ContextEncoder(make_norm(embed_dim), blocks)

    def attention_bias(
        self, positions: Tensor | None, length: int, device: torch.device
    ) -> Tensor | None:
        """The shared relative position bias, CLS row and column included, or None.

        ``(1, H, 1 + T, 1 + T)`` for all patches, ``(N, H, 1 + V, 1 + V)`` for the patches at
        ``positions`` after token dropping.
        """
        if self.rel_pos_bias is None:
            return None
        return self.rel_pos_bias(positions)

    @property
    def bias_covers_extra_tokens(self) -> bool:
        return self.rel_pos_bias is not None

    def no_weight_decay(self) -> set[str]:
        names = super().no_weight_decay()
        if self.rel_pos_bias is not None:
            names.add("rel_pos_bias.relative_position_bias_table")  # BEiT: no decay
        return names

    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def make_decoder(self, cfg: DecoderConfig) -> ConvDecoder:
        return build_conv_decoder(self.embed_dim, cfg, grid=self.grid)
