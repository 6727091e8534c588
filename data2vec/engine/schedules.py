"""Learning-rate schedules as pure functions of the step (resuming is indexing, not replaying)."""

from __future__ import annotations

import math
from collections import deque


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


class ScheduleFit:
    """Re-estimates a time-budgeted run's total steps from its measured step time.

    A schedule fitted once, from a few timed steps at the start, ends early or is cut off when
    the machine's speed changes during the run (on the shared 2-core CI machines the demo's
    calibration measured 0.90 s per step for steps that then ran at 0.48 s). Refitting every
    step from the recent pace keeps the cosine's end at the end of the budget.

    The pace is the mean step time over a trailing window of ``window`` of the budget (10 %:
    long enough to average over checkpoints and noisy steps, short enough to follow a change
    of speed within the run). The first ``skip`` steps, slower while the loader's workers and
    the allocator warm up, are left out.

    Args:
        budget: the run's time budget in seconds.
        start_step: the optimizer step the run starts at (a resumed run's step).
        window: the trailing window as a fraction of the budget.
        skip: steps after the start that are not timed.
        min_steps: timed steps needed before the first estimate.
    """

    def __init__(
        self,
        budget: float,
        start_step: int,
        window: float = 0.1,
        skip: int = 2,
        min_steps: int = 5,
    ) -> None:
        if not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"a schedule is fitted to a finite time budget, got {budget}")
        self.budget, self.start_step = budget, start_step
        self.window, self.skip, self.min_steps = window * budget, skip, min_steps
        self._marks: deque[tuple[int, float]] = deque()  # (step, elapsed seconds)

    def update(self, step: int, elapsed: float) -> int | None:
        """Record that ``step`` ended ``elapsed`` seconds into the run; return the new total.

        Returns None until ``min_steps`` steps are timed. Whether an estimate comes back depends
        on ``step`` alone, so ranks that see different times still refit on the same steps.
        """
        if step < self.start_step + self.skip:
            return None
        marks = self._marks
        marks.append((step, elapsed))
        # Keep one mark at or before the window's start, so the pace spans the whole window.
        while len(marks) > 2 and marks[1][1] <= elapsed - self.window:
            marks.popleft()
        if step - (self.start_step + self.skip) < self.min_steps:
            return None
        first_step, first_time = marks[0]
        pace = (elapsed - first_time) / (step - first_step)
        remaining = max(0.0, self.budget - elapsed)
        return step + max(1, math.ceil(remaining / max(pace, 1e-9)))
