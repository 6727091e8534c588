"""Optimizer construction: AdamW with weight decay only where it belongs."""

from __future__ import annotations

import torch
from torch import nn

from data2vec.config import OptimConfig


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters excluded from weight decay.

    Biases, every 1-D parameter (norm scales) and the names a module lists in its
    ``no_weight_decay()`` (CLS token, learned positions, ALiBi scales) — DESIGN §3.
    """
    names = set()
    for prefix, module in model.named_modules():
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            names |= {f"{prefix}.{n}" if prefix else n for n in hook()}
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name.endswith(".bias"):
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: with and without weight decay (trainable parameters only)."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (foreach implementation: one kernel per op over all tensors)."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        foreach=True,
    )
