"""Optimizer construction: AdamW with weight decay only where it belongs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

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


def adamw(groups: Callable[[], list[dict]], **hyper: Any) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel where this PyTorch has one for the device, else foreach.

    The fused kernel updates each tensor in one pass (CPU since PyTorch 2.4): on the 2-core
    machine an 85M-parameter step took 0.057 s against 0.199 s for foreach, which on CPU is a
    loop of per-tensor ops, with parameters equal to 6e-7 after 7 steps (summation order).

    Args:
        groups: builds the parameter groups (called again for the fallback: a failed
            constructor has already written its defaults into the first groups).
        **hyper: ``lr``, ``betas``, ``eps``, ... as for ``torch.optim.AdamW``.
    """
    try:
        return torch.optim.AdamW(groups(), fused=True, **hyper)
    except RuntimeError:  # no fused kernel for this device (or PyTorch < 2.4 on CPU)
        return torch.optim.AdamW(groups(), foreach=True, **hyper)


@contextlib.contextmanager
def keep_implementation(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Keep this run's fused/foreach choice while loading an optimizer state dict.

    ``load_state_dict`` brings back every saved group setting, including how the step was
    implemented when the checkpoint was written; that is a property of this process.
    """
    flags = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    yield
    for group, saved in zip(optimizer.param_groups, flags, strict=True):
        group.update(saved)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters (fused kernel where available)."""
    return adamw(
        lambda: param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps
    )
