"""The EMA teacher (data2vec §3.2): an exponential moving average of the student.

The teacher keeps an fp32 master copy of the parameters it owns and is updated explicitly by
the training loop after every optimizer step::

    teacher.update(student, step)   # step = optimizer steps completed so far

Parameters that do not train (``requires_grad=False``) and buffers are copied, not averaged.
What the teacher owns is decided when it is built: modules named in ``exclude`` stay shared with
the student (the objective runs the student's module there, without gradient).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def ema_decay_at(step: int, start: float, end: float, anneal_steps: int) -> float:
    """Decay after ``step`` updates: linear start -> end over ``anneal_steps``, then ``end``.

    (data2vec §3.2; fairseq ``get_annealed_rate``.)
    """
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return end - (end - start) * (1.0 - step / anneal_steps)


class EMATeacher:
    """An EMA copy of (part of) a student module.

    It is deliberately *not* an ``nn.Module`` attribute of the student: it is never seen by the
    optimizer, by DDP or by ``student.state_dict()``; checkpoints save it on its own.

    Args:
        student: the module to average (e.g. the student :class:`~data2vec.models.encoder.Encoder`).
        decay, end_decay, anneal_steps: the decay schedule.
        exclude: dotted names of submodules the teacher does not own (left ``None`` in the copy).
        copied: name prefixes of parameters copied from the student at every update instead of
            averaged (data2vec 1.0 speech: the positional convolution, fairseq ``skip_keys``).
    """

    def __init__(
        self,
        student: nn.Module,
        decay: float,
        end_decay: float,
        anneal_steps: int,
        exclude: Iterable[str] = (),
        copied: Iterable[str] = (),
    ) -> None:
        self.decay = decay
        self.end_decay = end_decay
        self.anneal_steps = anneal_steps
        self.exclude = tuple(exclude)
        self.copied = tuple(copied)
        # deepcopy with a memo that maps excluded submodules to None copies everything else once.
        memo: dict[int, object] = {id(student.get_submodule(n)): None for n in self.exclude}
        self.model: nn.Module = copy.deepcopy(student, memo)
        self.model.float().eval().requires_grad_(False)
        self._names = [n for n, _ in self.model.named_parameters()]
        self.last_decay = decay

    def decay_at(self, step: int) -> float:
        return ema_decay_at(step, self.decay, self.end_decay, self.anneal_steps)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """Move the teacher towards ``student``; skipped when the decay has reached 1.

        Returns:
            The decay used (1.0 when skipped).
        """
        decay = self.decay_at(step)
        self.last_decay = decay
        if decay >= 1.0:
            return decay
        self.follow_device(student)
        src = dict(student.named_parameters())
        averaged_t, averaged_s, copied = [], [], []
        for name, t in self.model.named_parameters():
            s = src[name]
            if s.requires_grad and not name.startswith(self.copied):
                averaged_t.append(t)
                averaged_s.append(s.detach().float())
            else:
                copied.append((t, s))
        if averaged_t:
            # ema <- decay * ema + (1 - decay) * student, in fp32, as one fused foreach op.
            torch._foreach_lerp_(averaged_t, averaged_s, 1.0 - decay)
        for t, s in copied:
            t.copy_(s)
        student_buffers = dict(student.named_buffers())
        for name, b in self.model.named_buffers():
            b.copy_(student_buffers[name])
        return decay

    def follow_device(self, ref: nn.Module | Tensor) -> None:
        """Move the teacher to the device of ``ref`` (a tensor or module) if it is elsewhere."""
        p = ref if isinstance(ref, Tensor) else next(ref.parameters())
        q = next(self.model.parameters())
        if q.device != p.device:
            self.model.to(p.device)

    def to(self, device: torch.device | str) -> EMATeacher:
        self.model.to(device)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
