"""Multi-process training with ``torchrun``: process group, device, and the few collectives
the engine needs.

``torchrun --nproc_per_node N -m data2vec.cli pretrain ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` joins the group (NCCL on GPUs, gloo on CPUs). Every rank
runs the same loop on its own slice of the sample stream (global batch slot ``k·W + r``, see
:class:`~data2vec.data.sampling.StreamBatchSampler`); gradients are averaged by DDP. Decisions
that end or skip a step (non-finite loss, collapse, time budget, Ctrl-C) are agreed on by all
ranks, so no rank waits forever in a collective the others have left.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank and world size from the ``torchrun`` environment (single process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group ``torchrun`` describes (no-op for a single process).

    Returns the rank info; on CUDA, each rank uses the GPU of its ``LOCAL_RANK``.
    """
    info = env_info()
    if not info.enabled or dist.is_initialized():
        return info
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend)
    log.info("rank %d of %d (%s)", info.rank, info.world_size, backend)
    return info


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` under torchrun on GPUs."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


_RANK_LOCAL = False  # inside rank_local(): this rank computes as if alone


@contextlib.contextmanager
def rank_local() -> Iterator[None]:
    """Inside this block this rank computes as if it were alone: no collectives, and a model's
    loss is normalized by its own token count. For work the ranks do not do in step, such as
    the start-up kernel check's extra passes on a rank whose check failed."""
    global _RANK_LOCAL
    before, _RANK_LOCAL = _RANK_LOCAL, True
    try:
        yield
    finally:
        _RANK_LOCAL = before


def active() -> bool:
    """Whether this process is one of several ranks (and not inside :func:`rank_local`)."""
    if _RANK_LOCAL:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over all ranks (itself when not distributed); no gradient flows."""
    if not active():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


# Micro-batches per optimizer step while the engine accumulates gradients (see
# :func:`micro_batches`); 1 otherwise.
_MICRO_BATCHES = 1


@contextlib.contextmanager
def micro_batches(k: int) -> Iterator[None]:
    """Within this block, :func:`global_count` reports ``k`` times the micro-batch's count.

    With gradient accumulation the loss of one optimizer step is normalized by the masked-token
    count of all ``k`` micro-batches, which is known only after the last forward pass. ``k``
    times the current count is the best guess at that moment: it gives terms that are sums over
    rows (the image CLS loss) their one-big-batch weight, and the engine corrects the per-token
    regression term exactly once the true total is known (``trainer.train_step``).
    """
    global _MICRO_BATCHES
    previous, _MICRO_BATCHES = _MICRO_BATCHES, k
    try:
        yield
    finally:
        _MICRO_BATCHES = previous


def global_max(value: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``value`` over all ranks (itself when not distributed)."""
    if not active():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def global_count(n: int, device: torch.device) -> int:
    """``n`` summed over all ranks, at least 1 (a loss normalizer); ``max(n, 1)`` alone.

    Times the number of micro-batches inside :func:`micro_batches`.
    """
    if active():
        n = int(global_sum(torch.tensor(float(n), device=device)))
    return max(n, 1) * _MICRO_BATCHES


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on at least one rank (every rank gets the same answer)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag OR-ed over all ranks, in one collective."""
    if not active():
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
