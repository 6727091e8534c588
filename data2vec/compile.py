"""Opt-in ``torch.compile`` of the hot path (``train.compile=true``).

Only the transformer blocks are compiled - the student's prenet and shared blocks, where almost
all FLOPs are and every shape is fixed for a run (the student always sees the same number of
visible tokens). Masking, the decoder's data-dependent gathers, the teacher update and the
optimizer stay eager, so compilation never recompiles on a new mask and a failure is easy to
place. ``nn.Module.compile`` compiles in place: parameter names, checkpoints and the EMA
teacher are unchanged.

On CPU the inductor backend generates C++ and needs a compiler (``g++``); the first steps
take minutes on a small machine.
"""

from __future__ import annotations

import torch
from torch import nn

from data2vec.errors import UserError


def _blocks(model: nn.Module) -> list[nn.Module]:
    encoder = getattr(model, "encoder", model)
    blocks = list(getattr(encoder, "blocks", []))
    context = getattr(getattr(encoder, "modality", None), "context_encoder", None)
    if context is not None:
        blocks += list(context.blocks)
    return blocks


def check_compiler(device: torch.device) -> None:
    """Compile and run a two-op function; raise a :class:`UserError` saying why if it fails."""
    try:
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2.0, dynamic=False)
        fn(torch.ones(4, device=device))
    except Exception as exc:  # inductor raises many types: compiler missing, codegen, ...
        hint = " (on CPU it needs a C++ compiler such as g++)" if device.type == "cpu" else ""
        raise UserError(
            f"train.compile=true, but torch.compile does not work here{hint}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''} - "
            "install the compiler or set train.compile=false"
        ) from exc


def compile_model(model: nn.Module, device: torch.device) -> int:
    """Compile the transformer blocks of ``model`` (a pretraining model or an encoder) in place.

    Returns:
        How many blocks were compiled.

    Raises:
        UserError: torch.compile cannot run on this machine.
    """
    check_compiler(device)
    blocks = _blocks(model)
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)
