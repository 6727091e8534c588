"""Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth")."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DropPath(nn.Module):
    """Drop the whole residual branch of a sample with probability ``p`` during training.

    Kept samples are scaled by ``1 / (1 - p)`` so the expectation is unchanged.
    Build it only for ``p > 0``; use ``nn.Identity`` otherwise (see :func:`drop_path_or_identity`).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, ...)`` -> same shape."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_or_identity(p: float) -> nn.Module:
    """A :class:`DropPath` for ``p > 0``, else ``nn.Identity`` (no branch in ``forward``)."""
    return DropPath(p) if p > 0 else nn.Identity()
