"""Any N-d signal ``(channels, d1, ..., dn)``: N-d patches, N-d positions, an N-d decoder.

One modality for multichannel time series (n = 1), images or spectrograms (n = 2) and volumes
or video (n = 3): a user pretrains on a new kind of array with a config instead of new code.

    source (B, C, d1, ..., dn) -> strided Conv{n}d, kernel = stride = patch  (B, D, g1, ..., gn)
    -> flatten row-major (first axis slowest)                                 (B, T, D)
    -> + fixed N-d sin-cos (or learned) positions -> keep visible -> prenet blocks

The first axis may vary in length (time series of different lengths share a batch): inputs
are zero-padded to whole patches, and a ``(B, d1)`` padding mask of the source becomes a
``(B, T)`` mask of the tokens. Because the first axis is the slowest, a shorter input's tokens
are a prefix of a longer one's, so positions and masks of a short input are the prefix of the
full tables, and padded tokens are the trailing ones of each row.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.config import DecoderConfig, SignalEncoderConfig
from data2vec.errors import ConfigError
from data2vec.masking import select_positions
from data2vec.modalities.base import ContextEncoder, ModalityEncoder
from data2vec.models.decoders import ChannelLayerNorm, _projection
from data2vec.nn.positions import sincos_1d

CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def sincos_nd(dim: int, grid: tuple[int, ...]) -> Tensor:
    """N-d sin-cos table for a patch grid, row-major (first axis slowest).

    The width is split between the axes in even chunks; the first axis takes what is left
    over, so any even ``dim`` works for any ``n``. Each chunk is the 1-D sin-cos encoding of
    that axis' patch index (Vaswani et al. 2017, §3.5; MAE's 2-D table generalized).

    Returns:
        ``(prod(grid), dim)`` float32.
    """
    n = len(grid)
    if dim % 2 or dim < 2 * n:
        raise ValueError(f"sin-cos positions on {n} axes need an even width >= {2 * n}, got {dim}")
    chunk = (dim // (2 * n)) * 2
    widths = [dim - chunk * (n - 1)] + [chunk] * (n - 1)
    coords = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    parts = [sincos_1d(w, c.reshape(-1)) for w, c in zip(widths, coords)]
    return torch.cat(parts, dim=1)


class PatchEmbedND(nn.Module):
    """Non-overlapping N-d patches, linearly embedded by a strided ``Conv{n}d``.

    ``source: (B, C, d1, ..., dn)`` -> ``(B, T, D)`` with ``T = ceil(d1/p1) * g2 * ... * gn``.
    The first axis is zero-padded to whole patches; the others must have the configured size.
    """

    def __init__(self, size: tuple[int, ...], patch: tuple[int, ...], in_chans: int, dim: int):
        super().__init__()
        self.size = tuple(size)
        self.patch = tuple(patch)
        self.proj = CONVS[len(size)](in_chans, dim, kernel_size=patch, stride=patch)
        # data2vec 2.0 / MAE: Xavier-uniform on the conv weight viewed as a (D, C·prod(p)) matrix.
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def forward(self, source: Tensor) -> Tensor:
        n = len(self.size)
        if source.ndim != n + 2 or tuple(source.shape[3:]) != self.size[1:]:
            raise ValueError(
                f"expected (B, C, d1, {', '.join(map(str, self.size[1:])) or '...'}) input with "
                f"{n} signal axes, got {tuple(source.shape)}"
            )
        extra = -source.shape[2] % self.patch[0]
        if extra:
            source = F.pad(source, [0, 0] * (n - 1) + [0, extra])  # pad the first axis's end
        return self.proj(source).flatten(2).transpose(1, 2)  # (B, D, g1..gn) -> (B, T, D)


class SignalEncoder(ModalityEncoder):
    """N-d signal modality encoder.

    Args:
        cfg: signal encoder settings (size and patch per axis, channels, positions, prenet).
        embed_dim: model width ``D``.
        make_block: factory of one prenet block.
        make_norm: factory of the LayerNorm that starts the context encoder (post-LN models).
    """

    def __init__(
        self,
        cfg: SignalEncoderConfig,
        embed_dim: int,
        make_block: Callable[[], nn.Module],
        make_norm: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        if cfg.in_chans < 1:
            raise ConfigError(
                f"encoder.in_chans={cfg.in_chans}: set the channel count (0 is resolved from the "
                "data only when pretraining)"
            )
        self.embed_dim = embed_dim
        self.num_extra_tokens = cfg.num_extra_tokens
        self.patch = tuple(cfg.patch_size)
        self.grid = cfg.grid
        self.local_encoder = PatchEmbedND(cfg.size, cfg.patch_size, cfg.in_chans, embed_dim)
        table = sincos_nd(embed_dim, self.grid).unsqueeze(0)  # (1, T, D)
        self.learned_positions = cfg.positions == "learned"
        if self.learned_positions:
            self.pos_embed = nn.Parameter(torch.zeros_like(table))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_buffer("pos_embed", table, persistent=True)
        self.extra_tokens = None
        if cfg.num_extra_tokens > 0:
            self.extra_tokens = nn.Parameter(torch.randn(1, cfg.num_extra_tokens, embed_dim))
        blocks = nn.ModuleList(make_block() for _ in range(cfg.prenet_depth))
        self.context_encoder = ContextEncoder(make_norm(embed_dim), blocks)

    @property
    def tokens_per_step(self) -> int:
        """Tokens per patch of the first axis: ``g2 * ... * gn``."""
        return math.prod(self.grid[1:])

    def reset_parameters(self) -> None:
        """Learned positions start at N(0, 0.02²) truncated (ViT), not the Linear init."""
        if self.learned_positions:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        names = super().no_weight_decay()
        if self.learned_positions:
            names.add("pos_embed")
        return names

    def embed(
        self, source: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``source: (B, C, d1, ...)``, ``padding_mask: (B, d1)`` -> ``(B, T, D)``, ``(B, T)``.

        A token is padding when its whole first-axis patch is: a partly valid last patch is
        zero-filled, exactly as the same input alone would be.
        """
        local = self.local_encoder(source)
        if padding_mask is None or not bool(padding_mask.any()):
            return local, None
        valid = (~padding_mask).sum(-1)  # (B,) valid samples of the first axis
        steps = torch.div(valid + self.patch[0] - 1, self.patch[0], rounding_mode="floor")
        step_of_token = torch.arange(local.shape[1], device=local.device) // self.tokens_per_step
        pad = step_of_token[None, :] >= steps[:, None]  # (B, T)
        return local, pad if bool(pad.any()) else None

    def add_positions(self, x: Tensor) -> Tensor:
        """``x: (B, T, D)`` plus the first ``T`` rows of the table (a shorter first axis)."""
        if x.shape[1] > self.pos_embed.shape[1]:
            raise ValueError(
                f"{x.shape[1]} tokens exceed the {self.pos_embed.shape[1]} of encoder.size; "
                "raise encoder.size[0] for longer inputs"
            )
        return x + self.pos_embed[:, : x.shape[1]].to(x.dtype)

    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def make_decoder(self, cfg: DecoderConfig) -> SignalDecoder:
        return SignalDecoder(self.embed_dim, cfg, self.grid[1:])


class SignalDecoder(nn.Module):
    """The data2vec 2.0 light decoder as ``Conv{n}d`` layers on the patch grid.

    ``L`` layers of ``conv (same padding, groups) -> LayerNorm over channels (no affine) ->
    GELU`` with residuals where widths match, then a projection to ``D``; module names as
    :class:`~data2vec.models.decoders.ConvDecoder`. The first axis' length comes from the
    input, so one decoder serves every length.

    Args:
        in_dim: model width ``D``.
        cfg: decoder shape.
        inner_grid: patches per axis after the first, ``(g2, ..., gn)``.
    """

    def __init__(self, in_dim: int, cfg: DecoderConfig, inner_grid: tuple[int, ...]) -> None:
        super().__init__()
        self.inner_grid = tuple(inner_grid)
        self.residual = cfg.residual
        conv = CONVS[len(inner_grid) + 1]
        k = cfg.kernel
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(
                    conv(
                        in_dim if i == 0 else cfg.dim, cfg.dim, k, padding=k // 2, groups=cfg.groups
                    ),
                    ChannelLayerNorm(),
                    nn.GELU(),
                )
                for i in range(cfg.layers)
            ]
        )
        self.proj = _projection(cfg.dim, in_dim, cfg.projection_layers, cfg.projection_ratio)

    def reset_parameters(self) -> None:
        """PyTorch's default init for the projection (data2vec 2.0 keeps it; DESIGN §3)."""
        for m in self.proj.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward_features(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Conv stack. ``x: (N, T, D)`` -> ``(N, T, dim)``; padding is zeroed before each conv."""
        N, T, D = x.shape
        grid = (T // max(math.prod(self.inner_grid), 1), *self.inner_grid)
        h = x.transpose(1, 2).reshape(N, D, *grid)  # (N, D, g1, ..., gn)
        keep = None
        if padding_mask is not None:
            keep = (~padding_mask).reshape(N, 1, *grid).to(h.dtype)
        for layer in self.blocks:
            if keep is not None:
                h = h * keep  # padding never leaks into valid tokens through the kernels
            out = layer(h)
            h = out + h if self.residual and out.shape[1] == h.shape[1] else out
        return h.reshape(N, h.shape[1], T).transpose(1, 2)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, padding_mask: Tensor | None = None
    ) -> Tensor:
        """``x: (N, T, D)`` -> ``(N, T, D)``, or ``(num_masked, D)`` rows when ``mask`` (bool or
        flat indices, see :func:`select_positions`) is given."""
        h = self.forward_features(x, padding_mask)
        return self.proj(select_positions(h, mask))
