"""The fine-tuning model (pretrained encoder + task head), its batch, and layer-wise lr decay.

Nothing here knows a modality: the encoder maps ``(source, padding_mask)`` to an
:class:`~data2vec.models.encoder.EncoderOutput` and the head maps that to logits.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from data2vec.config import Config
from data2vec.engine import checkpoint as ckpt
from data2vec.engine.optim import no_decay_names
from data2vec.errors import UserError
from data2vec.finetune.ctc import CharVocab, frame_lengths
from data2vec.finetune.heads import build_head
from data2vec.models.encoder import EncoderOutput

Task = Literal["classification", "ctc"]
TASKS: tuple[str, ...] = ("classification", "ctc")
FINETUNE_FILE = "finetune.json"


@dataclass
class SupervisedBatch:
    """One labelled batch, the same for every modality and task.

    Attributes:
        source: the encoder input, ``(B, ...)`` (images ``(B, C, H, W)``, audio ``(B, S)``,
            token ids ``(B, S)``).
        padding_mask: ``(B, S)`` bool, True = padding, or None (nothing padded).
        targets: classification: ``(B,)`` int64 class ids; CTC: ``(B, L)`` int64 label ids,
            padded after ``target_lengths``.
        target_lengths: CTC: ``(B,)`` labels per row; None for classification.
        skipped: ``(path, reason)`` of inputs dropped from this batch.
    """

    source: Tensor
    padding_mask: Tensor | None
    targets: Tensor
    target_lengths: Tensor | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def pin_memory(self) -> SupervisedBatch:
        """A copy in page-locked memory (``DataLoader(pin_memory=True)`` calls this)."""

        def pin(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.pin_memory()

        return SupervisedBatch(
            self.source.pin_memory(),
            pin(self.padding_mask),
            self.targets.pin_memory(),
            pin(self.target_lengths),
            self.skipped,
        )

    def to(self, device: torch.device) -> SupervisedBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return SupervisedBatch(
            self.source.to(device, non_blocking=True),
            move(self.padding_mask),
            self.targets.to(device, non_blocking=True),
            move(self.target_lengths),
            self.skipped,
        )


class FineTuneModel(nn.Module):
    """``encoder -> head``.

    Args:
        encoder: maps ``(source, padding_mask)`` to an :class:`EncoderOutput`.
        head: a :class:`~data2vec.finetune.heads.ClassificationHead` (task ``classification``)
            or :class:`~data2vec.finetune.heads.CTCHead` (task ``ctc``).
        task: ``classification`` or ``ctc``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, task: Task) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task={task!r}; expected one of {TASKS}")
        self.encoder = encoder
        self.head = head
        self.task = task
        # While True the encoder runs without autograd: only the head trains (and the encoder's
        # AdamW state stays untouched, since its parameters get no gradient).
        self.encoder_frozen = False

    def set_encoder_frozen(self, frozen: bool) -> None:
        self.encoder_frozen = frozen

    def forward_features(self, source: Tensor, padding_mask: Tensor | None = None) -> EncoderOutput:
        """``source`` -> encoder output ``x: (B, E + T, D)``."""
        frozen = self.encoder_frozen and torch.is_grad_enabled()
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return self.encoder(source, padding_mask)

    def forward(
        self, source: Tensor, padding_mask: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits.

        Returns:
            classification: ``(B, C)``; CTC: ``(logits (B, T, V), frame_lengths (B,))``, the
            lengths from the encoder's output padding mask (None = every frame valid).
        """
        out = self.forward_features(source, padding_mask)
        logits = self.head(out)
        if self.task == "classification":
            return logits
        pad = None if out.padding_mask is None else out.padding_mask[:, out.num_extra_tokens :]
        B, T = logits.shape[:2]
        return logits, frame_lengths(pad, B, T, logits.device)


def _blocks(encoder: nn.Module) -> list[nn.Module]:
    """Transformer blocks in depth order: the modality's prenet blocks, then the shared blocks."""
    blocks: list[nn.Module] = []
    context = getattr(getattr(encoder, "modality", None), "context_encoder", None)
    if context is not None:
        blocks += list(context.blocks)
    blocks += list(getattr(encoder, "blocks", []))
    return blocks


def layer_ids(model: FineTuneModel) -> tuple[dict[str, int], int]:
    """Depth of every parameter for layer-wise lr decay.

    Returns:
        ``({name: layer}, L)`` with ``L`` the number of blocks: 0 = the modality encoder's
        embeddings (local encoder, positions, extra tokens, pre-block norm), ``1..L`` = the
        blocks in depth order (prenet blocks first, as fairseq's data2vec 2.0 fine-tuning counts
        them), ``L + 1`` = what follows the blocks (the encoder's final norm and the head).
    """
    blocks = _blocks(model.encoder)
    depth = {id(p): i + 1 for i, block in enumerate(blocks) for p in block.parameters()}
    final_norm = getattr(model.encoder, "norm", None)
    after = {id(p) for p in final_norm.parameters()} if isinstance(final_norm, nn.Module) else set()
    ids = {}
    for name, p in model.named_parameters():
        if id(p) in depth:
            ids[name] = depth[id(p)]
        elif name.startswith("encoder.") and id(p) not in after:
            ids[name] = 0
        else:
            ids[name] = len(blocks) + 1
    return ids, len(blocks)


def layer_decay_groups(
    model: FineTuneModel, base_lr: float, weight_decay: float, decay: float
) -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay (BEiT, Bao et al. 2022, §2.3).

    A parameter at layer ``l`` (see :func:`layer_ids`) gets ``lr_scale = decay ** (L + 1 - l)``:
    the head ``base_lr``, the last block ``base_lr·decay``, ..., the embeddings
    ``base_lr·decay^(L+1)``. Biases, 1-D parameters and ``no_weight_decay()`` names get no weight
    decay. Each group carries ``lr_scale`` and ``layer``; the trainer sets
    ``lr = schedule(step) * lr_scale``.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer decay must be in (0, 1], got {decay}")
    ids, L = layer_ids(model)
    skip = no_decay_names(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, no_wd = ids[name], name in skip
        if (layer, no_wd) not in groups:
            scale = decay ** (L + 1 - layer)
            groups[(layer, no_wd)] = {
                "params": [],
                "weight_decay": 0.0 if no_wd else weight_decay,
                "lr_scale": scale,
                "lr": base_lr * scale,
                "layer": layer,
            }
        groups[(layer, no_wd)]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def load_pretrained(
    checkpoint: str | Path, modality: str, task: str, needs: str
) -> tuple[Config, nn.Module]:
    """The pretrained encoder of ``checkpoint``, refused unless it is of ``modality``.

    ``needs`` completes the message, e.g. "an image encoder".
    """
    from data2vec.evaluate.features import load_encoder

    encoder_config, encoder = load_encoder(checkpoint)
    if encoder_config.model.modality == "multi":  # a joint model: its encoder of this modality
        from data2vec.models.multimodal import select_modality

        if modality not in encoder_config.encoder.modalities:  # type: ignore[union-attr]
            raise UserError(f"{checkpoint} is a joint model without {needs}; {task} needs one")
        encoder_config, encoder = select_modality(encoder_config, encoder, modality)
    if encoder_config.model.modality != modality:
        raise UserError(
            f"{checkpoint} holds a {encoder_config.model.modality} encoder; {task} needs {needs}"
        )
    return encoder_config, encoder


# --------------------------------------------------------------------------------------------
# the fine-tuned model directory: config.json + model.safetensors + finetune.json


def save_finetuned(
    model_dir: str | Path, model: FineTuneModel, encoder_config: Config, info: dict[str, Any]
) -> Path:
    """Write a fine-tuned model directory atomically.

    The directory is a model directory as :func:`~data2vec.engine.checkpoint.resolve_model_dir`
    understands it (``config.json`` of the pretrained encoder, ``model.safetensors`` with
    ``encoder.*`` and ``head.*`` weights), plus ``finetune.json``: ``info`` with the task and the
    head's spec added. It is written under a temporary name; an existing directory is renamed
    away before the new one takes its place and deleted after, so a crash leaves either the old
    or the new model complete (the old one under ``.<name>.old`` in the worst case).
    """
    final = Path(model_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    old = final.with_name(f".{final.name}.old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / ckpt.MODEL_FILE))
    ckpt.save_model_config(encoder_config, tmp)
    ckpt.save_assets(model.encoder, tmp)
    meta = {"task": model.task, "head": model.head.spec(), **info}
    (tmp / FINETUNE_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class FinetunedModel:
    """A fine-tuned model restored by :func:`load_finetuned`, in eval mode on the CPU.

    Attributes:
        model: encoder + head.
        config: the pretrained encoder's config.
        info: the contents of ``finetune.json`` (task, head, classes/vocab, metrics, step, ...).
    """

    model: FineTuneModel
    config: Config
    info: dict[str, Any]

    @property
    def task(self) -> str:
        return self.info["task"]

    @property
    def classes(self) -> list[str]:
        return list(self.info.get("classes", []))

    @property
    def vocab(self) -> CharVocab | None:
        return CharVocab.from_dict(self.info["vocab"]) if "vocab" in self.info else None

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.info.get("metrics", {}))


def load_finetuned(path: str | Path, encoder: nn.Module | None = None) -> FinetunedModel:
    """Restore a model saved by :func:`save_finetuned`.

    Args:
        path: the model directory, or a fine-tuning run directory (its ``best`` model is used).
        encoder: an encoder to load the weights into; default: built from ``config.yaml``.

    Raises:
        UserError: not a fine-tuned model directory, or weights that do not fit.
    """
    from data2vec.models.registry import build_encoder  # the registry imports every modality

    model_dir = Path(path)
    if not (model_dir / FINETUNE_FILE).is_file() and (model_dir / "best" / FINETUNE_FILE).is_file():
        model_dir = model_dir / "best"
    if not (model_dir / FINETUNE_FILE).is_file():
        raise UserError(
            f"{path} is not a fine-tuned model ({FINETUNE_FILE} missing; expected the output "
            "directory of `data2vec finetune` or its best/ folder)"
        )
    info = json.loads((model_dir / FINETUNE_FILE).read_text(encoding="utf-8"))
    config = ckpt.load_config_file(model_dir)
    if encoder is None:
        encoder = build_encoder(config)
        ckpt.attach_assets(encoder, model_dir, config)
    head = build_head(info["head"], encoder.embed_dim)
    model = FineTuneModel(encoder, head, info["task"])
    state = load_file(str(model_dir / ckpt.MODEL_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{model_dir}: weights do not match the model (missing {missing}, "
            f"unexpected {unexpected})"
        )
    return FinetunedModel(model.eval(), config, info)
