"""Supervised fine-tuning of pretrained encoders (DESIGN §5).

The trainer, heads, CTC and metrics are modality-agnostic; each modality contributes a dataset
module (``image.py``, ``audio.py``, ``text.py``) that turns its data into
:class:`SupervisedBatch` objects.
:func:`run_finetune` is the entry point of ``data2vec finetune``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data2vec.errors import UserError
from data2vec.finetune.ctc import CharVocab, ctc_greedy_decode, ctc_loss, frame_lengths
from data2vec.finetune.heads import ClassificationHead, CTCHead, build_head
from data2vec.finetune.metrics import accuracy, binary_f1, cer, edit_distance, wer
from data2vec.finetune.model import (
    FinetunedModel,
    FineTuneModel,
    SupervisedBatch,
    layer_decay_groups,
    load_finetuned,
    save_finetuned,
)
from data2vec.finetune.trainer import FineTuneConfig, FineTuneResult, evaluate, finetune

CLI_TASKS: tuple[str, ...] = (
    "image-classification",
    "audio-classification",
    "ctc",
    "text-classification",
)

__all__ = [
    "CLI_TASKS",
    "CTCHead",
    "CharVocab",
    "ClassificationHead",
    "FineTuneConfig",
    "FineTuneModel",
    "FineTuneResult",
    "FinetunedModel",
    "SupervisedBatch",
    "accuracy",
    "binary_f1",
    "build_head",
    "cer",
    "ctc_greedy_decode",
    "ctc_loss",
    "edit_distance",
    "evaluate",
    "finetune",
    "frame_lengths",
    "layer_decay_groups",
    "load_finetuned",
    "run_finetune",
    "save_finetuned",
    "wer",
]


def run_finetune(
    task: str,
    checkpoint: str | Path,
    train: str | Path,
    valid: str | Path,
    out: str | Path,
    overrides: Iterable[str] = (),
) -> dict[str, Any]:
    """``data2vec finetune``: fine-tune ``checkpoint`` on ``task``; a JSON-ready summary.

    Args:
        task: one of :data:`CLI_TASKS`.
        checkpoint: a pretraining run, checkpoint or model directory.
        train: labelled training data.
        valid: labelled validation data.
        out: the run directory; the best model is saved in ``out/best``.
        overrides: ``key=value`` or ``finetune.key=value`` (fields of :class:`FineTuneConfig`).

    Returns:
        ``{"task", "out_dir", "best_dir", "steps", "seconds", "best_step", "best_metrics",
        "final_metrics", "skipped_inputs", "skipped_steps", "stopped"}``.

    Raises:
        UserError: unknown task, bad override, unusable data or checkpoint.
    """
    if task not in CLI_TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(CLI_TASKS)}")
    cfg = FineTuneConfig.from_overrides(overrides)
    if task == "image-classification":
        from data2vec.finetune.image import finetune_images

        result = finetune_images(checkpoint, train, valid, out, cfg)
    elif task == "text-classification":
        from data2vec.finetune.text import finetune_text

        result = finetune_text(checkpoint, train, valid, out, cfg)
    else:
        from data2vec.finetune.audio import finetune_audio

        result = finetune_audio(task, checkpoint, train, valid, out, cfg)
    summary = result.to_dict()
    summary.pop("history")  # every evaluation is in out/metrics.jsonl
    summary["model_task"] = summary.pop("task")
    return {"task": task, **summary}
