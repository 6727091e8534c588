"""The data2vec 1.0 vision backbone: BEiT-style pre-LN blocks (Bao et al. 2022).

Three things set it apart from the post-LN blocks of data2vec 2.0 (``nn/block.py``)::

    x = x + DropPath(gamma_1 * Attn(LN1(x), rel_pos_bias))     # pre-LN, layer scale
    f = DropPath(gamma_2 * MLP(LN2(x)))
    x = x + f

- **layer scale**: learned per-channel ``gamma_1``/``gamma_2`` that start small (0.1 for base),
- **one relative position bias shared by every block**: a learned table of
  ``(2h-1)(2w-1) + 3`` entries per head, indexed by the 2-D offset between two patches, plus
  three entries for CLS-to-patch, patch-to-CLS and CLS-to-CLS,
- **query and value biases but no key bias** (a key bias shifts every logit of a query by the
  same amount and cancels in the softmax).

This is the architecture of Hugging Face's ``Data2VecVisionModel``. data2vec 1.0 takes its
vision targets from the end-of-block outputs (paper §3.3; DESIGN §4), not the FFN branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.nn.attention import sdpa, split_heads
from data2vec.nn.block import Mlp
from data2vec.nn.drop_path import drop_path_or_identity

NormFactory = Callable[[int], nn.Module]


class QVBiasAttention(nn.Module):
    """Fused-qkv self-attention with learned query and value biases and no key bias.

    Parameter names (``qkv``, ``q_bias``, ``v_bias``, ``proj``) follow BEiT/data2vec-vision.

    Args:
        dim: width ``C``.
        num_heads: heads ``H``.
        attn_drop: dropout on attention probabilities (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``x: (B, T, C)``, additive mask broadcastable to ``(B, H, T, T)`` -> ``(B, T, C)``."""
        B, T, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = split_heads(F.linear(x, self.qkv.weight, bias.to(x.dtype)), self.num_heads)
        drop = self.attn_drop if self.training else 0.0
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        out = sdpa(q, k, v, attn_mask, drop)
        out = out.transpose(1, 2).reshape(B, T, C)
        return self.proj_drop(self.proj(out))


class LayerScaleBlock(nn.Module):
    """Pre-LN block with layer scale returning ``(output, ffn_branch)``.

    Like :class:`~data2vec.nn.block.PostLNBlock` the second element is the FFN branch before
    the residual (``gamma_2 * mlp(norm2(x))``); data2vec 1.0 vision takes its targets from the
    first, the end-of-block output (``target.source: block``).

    Args:
        dim: width ``C``.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``C``.
        norm_layer: factory of the two pre-norms.
        drop_path: stochastic-depth probability of both branches.
        layer_scale: initial value of ``gamma_1``/``gamma_2`` (BEiT base 0.1, large 1e-5).
        attn_drop: dropout on attention probabilities.
        proj_drop: dropout after the attention projection and the MLP.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_layer: NormFactory = nn.LayerNorm,
        drop_path: float = 0.0,
        layer_scale: float = 0.1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = QVBiasAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.mlp_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        self.layer_scale = float(layer_scale)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x: (B, T, C)`` -> ``(x, ffn)``; ``attn_mask`` carries the relative position bias."""
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), attn_mask))
        f = self.gamma_2 * self.mlp_drop(self.mlp(self.norm2(x)))
        return x + self.drop_path(f), f


def relative_position_index(height: int, width: int) -> Tensor:
    """Index into the relative position table for every (query, key) pair of ``1 + h·w`` tokens.

    Patches ``i = (r_i, c_i)`` and ``j`` use entry
    ``(r_i - r_j + h - 1)·(2w - 1) + (c_i - c_j + w - 1)``; the CLS token (position 0) uses the
    last three entries: ``n`` (CLS to patch), ``n + 1`` (patch to CLS), ``n + 2`` (CLS to CLS),
    with ``n = (2h-1)(2w-1)``.

    Returns:
        ``(1 + h·w, 1 + h·w)`` long.
    """
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # (T,)
    dr = rows[:, None] - rows[None, :] + height - 1
    dc = cols[:, None] - cols[None, :] + width - 1
    n = (2 * height - 1) * (2 * width - 1)
    index = torch.empty(1 + height * width, 1 + height * width, dtype=torch.long)
    index[1:, 1:] = dr * (2 * width - 1) + dc
    index[0, :] = n
    index[:, 0] = n + 1
    index[0, 0] = n + 2
    return index


class RelativePositionBias(nn.Module):
    """The relative position bias shared by all blocks (``use_shared_rel_pos_bias``).

    Args:
        grid: patch grid ``(h, w)``.
        num_heads: heads ``H``.
    """

    def __init__(self, grid: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        h, w = grid
        self.grid = grid
        # BEiT starts the table at zero: no positional preference before training.
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * h - 1) * (2 * w - 1) + 3, num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(h, w), False)

    def forward(self, positions: Tensor | None = None) -> Tensor:
        """The bias for the CLS token and the patches at ``positions``.

        Args:
            positions: ``(N, V)`` indices of the patches present (after token dropping), or
                None for all ``h·w`` patches in order.

        Returns:
            ``(1, H, 1 + h·w, 1 + h·w)`` or ``(N, H, 1 + V, 1 + V)``.
        """
        table = self.relative_position_bias_table
        index = self.relative_position_index.to(table.device)
        if positions is None:
            return table[index].permute(2, 0, 1).unsqueeze(0)  # (T+1, T+1, H) -> (1, H, ., .)
        tokens = F.pad(positions.to(table.device) + 1, (1, 0))  # CLS is token 0: (N, 1 + V)
        sub = index[tokens[:, :, None], tokens[:, None, :]]  # (N, 1 + V, 1 + V)
        return table[sub].permute(0, 3, 1, 2)


@torch.no_grad()
def init_beit_(model: nn.Module, blocks: nn.ModuleList) -> None:
    """BEiT / data2vec-vision initialization of ``model`` in place.

    Linear weights truncated normal (std 0.02) with zero bias, LayerNorms at 1 / 0, the
    relative position table at zero; then each block's two output projections divided by
    ``sqrt(2·layer)`` (BEiT ``fix_init_weight``) so the residual stream does not grow with
    depth.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, QVBiasAttention):
            nn.init.zeros_(module.q_bias)
            nn.init.zeros_(module.v_bias)
        elif isinstance(module, LayerScaleBlock):
            module.gamma_1.fill_(module.layer_scale)
            module.gamma_2.fill_(module.layer_scale)
        elif isinstance(module, RelativePositionBias):
            nn.init.zeros_(module.relative_position_bias_table)
    for layer, block in enumerate(blocks, start=1):
        block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))
