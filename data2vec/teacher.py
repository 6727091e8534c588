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
from typing import Any

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
        self.last_decay = decay
        self._pairs: _Pairs | None = None

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
        pairs = self.pairs(student)
        if pairs.averaged_t:
            # ema <- decay * ema + (1 - decay) * student, in fp32, as one fused foreach op.
            torch._foreach_lerp_(pairs.averaged_t, pairs.student_values(), 1.0 - decay)
        for _, t, s in pairs.frozen:
            t.copy_(s)
        for t, s in pairs.buffers:
            t.copy_(s)
        return decay

    def pairs(self, student: nn.Module) -> _Pairs:
        """Which of the teacher's tensors follow which of ``student``'s, and how (the teacher
        moved to ``student``'s device first); found again only where they no longer hold."""
        self.follow_device(student)
        pairs = self._pairs
        if pairs is None or not pairs.current(self.model, student):
            pairs = self._pairs = _Pairs(self.model, student, self.copied)
        return pairs

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


class _Pairs:
    """Which teacher tensor follows which student tensor, and how: averaged (the trained
    parameters), or copied (``frozen``: parameters that do not train or are named in
    ``copied``; ``buffers``).

    Finding the pairs by name costs two dispatcher calls per parameter, hundreds per update:
    on a GPU the host spent them while the device waited at the start of the teacher stage
    (image-v2-base, 149 parameters; benchmarks/README.md). So the pairs are found once and
    kept while they hold: :meth:`current` checks, with one dictionary look-up per tensor and
    submodule, that no module has had a parameter, buffer or submodule replaced
    (``load_state_dict(assign=True)``, moving the teacher's buffers to another device, swapping
    a layer) and that no student parameter was frozen or unfrozen since; otherwise they are
    found again.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, copied: tuple[str, ...]) -> None:
        src = dict(student.named_parameters())
        self.averaged_names: list[str] = []
        self.averaged_t: list[Tensor] = []
        self.averaged_s: list[Tensor] = []
        self.frozen: list[tuple[str, Tensor, Tensor]] = []  # parameters copied: (name, t, s)
        for name, t in teacher.named_parameters():
            s = src[name]
            if s.requires_grad and not name.startswith(copied):
                self.averaged_names.append(name)
                self.averaged_t.append(t)
                self.averaged_s.append(s)
            else:
                self.frozen.append((name, t, s))
        student_buffers = dict(student.named_buffers())
        self.buffers = [(b, student_buffers[n]) for n, b in teacher.named_buffers()]
        # The parameters are kept as they are (not detached views), so a student whose
        # ``.data`` is swapped in place is still read; only a differing dtype is cast per update.
        self.cast = any(s.dtype != t.dtype for t, s in zip(self.averaged_t, self.averaged_s))
        self.roots = (teacher, student)
        self.slots = _slots(teacher) + _slots(student)
        self.trainable = [p.requires_grad for p in src.values()]
        self.student_params = list(src.values())

    def current(self, teacher: nn.Module, student: nn.Module) -> bool:
        """Whether these are the models the pairs were found in, every tensor is still where it
        was found, and every student parameter trains as it did."""
        if self.roots[0] is not teacher or self.roots[1] is not student:
            return False
        return (
            all(table.get(key) is value for table, key, value in self.slots)
            and [p.requires_grad for p in self.student_params] == self.trainable
        )

    def student_values(self) -> list[Tensor]:
        """The student's side of the average, in the teacher's dtype."""
        if not self.cast:
            return self.averaged_s
        return [s.detach().to(t.dtype) for t, s in zip(self.averaged_t, self.averaged_s)]


def _slots(model: nn.Module) -> list[tuple[dict[str, Any], str, Tensor | nn.Module]]:
    """``(owning module's table, key, value)`` for every parameter, buffer and submodule of
    ``model``."""
    slots: list[tuple[dict[str, Any], str, Tensor | nn.Module]] = []
    for module in model.modules():
        for table in (module._parameters, module._buffers, module._modules):
            slots += [(table, key, v) for key, v in table.items() if v is not None]
    return slots
