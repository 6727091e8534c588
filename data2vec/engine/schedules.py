"""Learning-rate schedules as pure functions of the step (resuming is indexing, not replaying)."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    final_lr_ratio: float = 0.0,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warm-up from ``base_lr / warmup_steps`` to ``base_lr`` over ``warmup_steps`` steps,
    then either constant or a half cosine down to ``base_lr * final_lr_ratio`` at ``total_steps``
    (Loshchilov & Hutter 2017, without restarts).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    final = base_lr * final_lr_ratio
    return final + (base_lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
