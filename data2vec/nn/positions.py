"""Fixed sinusoidal position tables."""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """Transformer sin-cos encoding (Vaswani et al. 2017, §3.5), sines first then cosines.

    Args:
        dim: even output width ``D``.
        positions: ``(N,)`` float positions.

    Returns:
        ``(N, D)`` float32: ``[sin(p * w_i) for i < D/2] + [cos(p * w_i) for i < D/2]`` with
        ``w_i = 10000 ** (-2i / D)``.
    """
    if dim % 2 != 0:
        raise ValueError(f"sin-cos positions need an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / (10000.0**omega)  # (D/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (N, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, height: int, width: int) -> Tensor:
    """2-D sin-cos table for a ``height x width`` patch grid, row-major (as MAE / data2vec 2.0).

    The first half of the channels encodes the *column* index and the second half the *row*
    index: MAE's ``get_2d_sincos_pos_embed`` builds ``np.meshgrid(grid_w, grid_h)`` and encodes
    ``grid[0]`` (the column coordinate) first. Matching that order is what lets released image
    checkpoints load unchanged.

    Returns:
        ``(height * width, dim)`` float32.
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    rows = torch.arange(height).repeat_interleave(width)  # (H*W,) row index of each patch
    cols = torch.arange(width).repeat(height)  # (H*W,) column index of each patch
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
