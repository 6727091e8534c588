"""Fully sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``).

``train.distributed=fsdp`` shards the student's parameters, gradients and optimizer state
over the ``torchrun`` ranks instead of replicating them (DDP), for models that do not fit one
device. The pieces that FSDP does not know about:

* **The EMA teacher** is not a submodule of the student. Its repeated layers (the transformer
  blocks, where nearly all parameters live) are sharded exactly like the student's, so the EMA
  update is local, shard against shard, with no communication. Its few other parameters
  (patch embedding, positions, norms) stay whole on every rank and follow the gathered student
  parameter.
* **Checkpoints** hold full, unsharded tensors written by rank 0 in the usual layout, so a
  checkpoint of an FSDP run loads in any run (FSDP, DDP, one process, fine-tuning, export).
  The optimizer state is saved keyed by parameter name (``optimizer_format: "fqn"``).

Only the repeated layers (children of an ``nn.ModuleList``) get their own FSDP unit; the root
unit holds the rest. Layers must run in the same order on every rank: LayerDrop, which skips
blocks at random per rank, is refused.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.torch_version import TorchVersion

from data2vec.errors import ConfigError

log = logging.getLogger(__name__)

OPTIMIZER_FORMAT = "fqn"  # trainer_state["optimizer_format"] of FSDP checkpoints


def check_supported(cfg: Any, device: torch.device) -> None:
    """Refuse what FSDP cannot run here, before any work starts."""
    if cfg.model.modality == "multi":
        raise ConfigError(
            "train.distributed=fsdp is not available for joint models (model.modality=multi: "
            "each step trains one modality's parts); use train.distributed=ddp"
        )
    if cfg.model.layerdrop > 0:
        raise ConfigError(
            f"model.layerdrop={cfg.model.layerdrop} cannot be used with train.distributed=fsdp "
            "(ranks would skip different blocks and wait for each other); set model.layerdrop=0"
        )
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6)
    except ImportError as exc:
        raise ConfigError(
            f"train.distributed=fsdp needs torch.distributed.fsdp.fully_shard (FSDP2, torch >= "
            f"2.6); this is torch {torch.__version__}. Use train.distributed=ddp"
        ) from exc
    if device.type == "cpu" and TorchVersion(torch.__version__) < (2, 7):
        # torch 2.6's fully_shard records stream events, which CPU streams do not have
        # (AttributeError in the first forward); 2.7 runs tests/test_fsdp.py on the CPU.
        raise ConfigError(
            f"train.distributed=fsdp on the CPU needs torch >= 2.7; this is torch "
            f"{torch.__version__}. Use train.distributed=ddp"
        )


def repeated_layers(module: nn.Module) -> list[nn.Module]:
    """The children of the outermost ``nn.ModuleList`` containers of ``module``, in order.

    These are the transformer blocks, decoder layers and convolution stacks: the natural FSDP
    units (one all-gather each, freed again after use).
    """
    found: list[nn.Module] = []
    taken: list[str] = []
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.ModuleList):
            continue
        if any(name.startswith(t + ".") for t in taken):
            continue
        found += [child for child in sub if any(True for _ in child.parameters())]
        taken += [f"{name}.{i}" for i in range(len(sub))]
    return found


def shard(model: nn.Module) -> None:
    """Apply ``fully_shard`` to the student (layers, then root) and the teacher's layers.

    Call after loading weights and before building the optimizer (it must see the sharded
    parameters).
    """
    from torch.distributed.fsdp import fully_shard

    # Our blocks return (x, ffn output) with a view among them; FSDP2 warns on every forward in
    # case an in-place op follows. None does: tests/test_fsdp.py checks the gradients against
    # an unsharded run.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    teacher: nn.Module = model.teacher.model  # type: ignore[union-attr]
    for layer in repeated_layers(teacher):
        # Each teacher layer is its own FSDP root (the teacher never runs a root forward);
        # an explicit reshard_after_forward frees the gathered weights after use.
        fully_shard(layer, reshard_after_forward=True)
        # torch 2.7 keeps a root's gathered weights after forward whatever it is told, and the
        # EMA step then wrote to that gathered copy, lost at the next reshard (the teacher was
        # off by 1e-4 after one step, tests/test_fsdp.py); resharding here holds everywhere.
        layer.register_forward_hook(_reshard)
    for layer in repeated_layers(model):
        fully_shard(layer)
    fully_shard(model)


def _reshard(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook: free ``module``'s gathered parameters (a no-op where FSDP already has)."""
    module.reshard()  # type: ignore[operator]


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce-scatter gradients in this backward pass (False while accumulating)."""
    model.set_requires_gradient_sync(enabled)  # type: ignore[operator]


@functools.cache
def _dtensor_type() -> type | None:
    """``DTensor``, public since torch 2.5 (``torch.distributed._tensor`` before), or None
    in a build without distributed support."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def _is_dtensor(t: Tensor) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: writes go to the parameter), else ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor (all-gathered from every rank: a collective), else ``t``."""
    return t.full_tensor() if _is_dtensor(t) else t


def to_float(value: Tensor | float) -> float:
    """A Python float from a possibly sharded scalar (e.g. a gradient norm)."""
    return float(full(value)) if isinstance(value, Tensor) else float(value)


@torch.no_grad()
def update_teacher(model: nn.Module, step: int) -> float:
    """The EMA step of :meth:`EMATeacher.update`, on sharded parameters.

    ``ema <- decay * ema + (1 - decay) * student`` for averaged parameters, a copy for the rest;
    shard against shard where the teacher is sharded like the student, against the gathered
    student tensor where the teacher parameter is whole.

    Returns:
        The decay used (1.0: nothing to do).
    """
    teacher = model.teacher  # type: ignore[union-attr]
    decay = teacher.decay_at(step)
    teacher.last_decay = decay
    if decay >= 1.0:
        return decay
    student = dict(model.encoder.named_parameters())  # type: ignore[union-attr]
    averaged_t, averaged_s = [], []
    for name, t in teacher.model.named_parameters():
        s = student[name]
        # Every rank walks the parameters in the same order, so full() gathers line up.
        s_value = local(s) if _is_dtensor(t) else full(s)
        if s.requires_grad and not name.startswith(teacher.copied):
            averaged_t.append(local(t))
            averaged_s.append(s_value.detach().float())
        else:
            local(t).copy_(s_value)
    if averaged_t:
        torch._foreach_lerp_(averaged_t, averaged_s, 1.0 - decay)
    buffers = dict(model.encoder.named_buffers())  # type: ignore[union-attr]
    for name, b in teacher.model.named_buffers():
        b.copy_(buffers[name])
    return decay


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """Unsharded ``(student, teacher, optimizer)`` states; a collective (every rank calls it).

    Rank 0 receives the tensors (on the CPU); the other ranks get empty student and optimizer
    states.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    student = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    teacher_model: nn.Module = model.teacher.model  # type: ignore[union-attr]
    teacher = {k: full(v).detach().cpu() for k, v in teacher_model.state_dict().items()}
    return student, teacher, optim


def load_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a name-keyed full optimizer state (from :func:`full_state`) into ``optimizer``,
    sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
