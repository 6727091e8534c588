"""Atomic, resumable checkpoints.

Layout of one checkpoint (a directory, written under a temporary name and renamed into place,
so a crash never leaves a half-written checkpoint that looks complete)::

    <run>/checkpoints/step_00001000/
        model.safetensors     student weights (encoder.* and decoder.*)
        teacher.safetensors   EMA teacher (fp32)
        trainer_state.pt      optimizer, step, RNG states, data position, counters
        config.yaml           the resolved config
        tokenizer.json        text models: the tokenizer the model was trained with

The same directory is also a *model directory*: ``config.yaml`` + ``model.safetensors``
(+ ``tokenizer.json`` for text). Exported model directories (``save_model``, ``convert``,
fine-tuning's ``best/``) hold ``config.json`` instead: the same resolved config inside a small
versioned envelope (:func:`save_model_config`).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from data2vec.config import Config, config_from_dict
from data2vec.errors import UserError

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
TEACHER_FILE = "teacher.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
MODEL_CONFIG_FILE = "config.json"
MODEL_FORMAT = "data2vec-model"
MODEL_FORMAT_VERSION = 1


def save_assets(encoder: Any, directory: Path) -> None:
    """Write what must travel with an encoder's weights: a text encoder's tokenizer.

    An encoder carries its tokenizer as the plain attribute ``tokenizer`` (set by pretraining
    and by :func:`attach_assets`), so every writer of a model directory keeps them together.
    """
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(Path(directory))  # -> directory/tokenizer.json


def attach_assets(encoder: Any, model_dir: Path, cfg: Config) -> None:
    """Attach the assets of ``model_dir`` to ``encoder`` (text: its tokenizer, required)."""
    modalities = getattr(cfg.encoder, "modalities", (cfg.model.modality,))  # joint models
    if "text" not in modalities:
        return
    from data2vec.data.tokenizer import TOKENIZER_FILE, TextTokenizer

    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        # Weights imported from elsewhere may come without one: usable on token ids, and
        # embedding text then fails with a message naming the missing tokenizer.
        log.warning("%s holds a text model without its %s", model_dir, TOKENIZER_FILE)
        return
    encoder.tokenizer = TextTokenizer.load(path)


def rng_state() -> dict[str, Any]:
    """Every global RNG, in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    # The uint32 key words as int64: torch 2.4's torch.save cannot write uint32 tensors.
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    # int64 words (uint32 in checkpoints of earlier data2vec versions), as uint32 again
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, Tensor],
    teacher_state: dict[str, Tensor] | None,
    trainer_state: dict[str, Any],
    config: Config,
    keep: int,
    encoder: Any = None,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep``.

    ``encoder``: the student encoder, whose assets (a tokenizer) are saved alongside.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_contiguous(model_state), str(tmp / MODEL_FILE), metadata={"step": str(step)})
    if teacher_state is not None:
        save_file(_contiguous(teacher_state), str(tmp / TEACHER_FILE), metadata={"step": str(step)})
    torch.save(trainer_state, tmp / STATE_FILE)
    config.save(tmp / CONFIG_FILE)
    save_assets(encoder, tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def load_trainer_checkpoint(
    ckpt: Path,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, dict[str, Any]]:
    """Read one checkpoint: student state, teacher state (or None) and trainer state."""
    model_state = load_file(str(ckpt / MODEL_FILE))
    teacher_path = ckpt / TEACHER_FILE
    teacher_state = load_file(str(teacher_path)) if teacher_path.exists() else None
    # Even our own files are read without running pickled code.
    trainer_state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    return model_state, teacher_state, trainer_state


def latest_loadable(run_dir: Path) -> tuple[Path, tuple[dict, dict | None, dict]] | None:
    """The newest checkpoint that loads; a corrupt newer one is skipped with a warning."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            return ckpt, load_trainer_checkpoint(ckpt)
        except Exception as exc:  # a truncated/corrupt file: fall back to the previous one
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", ckpt, exc)
    return None


def resolve_model_dir(path: str | Path) -> Path:
    """A directory holding ``config.yaml`` + ``model.safetensors``.

    Accepts a model/checkpoint directory itself or a pretraining run directory (its latest
    checkpoint is used).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint path not found: {path}")
    has_config = (path / MODEL_CONFIG_FILE).is_file() or (path / CONFIG_FILE).is_file()
    if (path / MODEL_FILE).is_file() and has_config:
        return path
    ckpts = list_checkpoints(path)
    if ckpts:
        return ckpts[-1]
    raise UserError(
        f"{path} is neither a model directory ({MODEL_CONFIG_FILE} or {CONFIG_FILE} + "
        f"{MODEL_FILE}) nor a run directory with checkpoints/step_*"
    )


def save_model_config(cfg: Config, model_dir: Path) -> Path:
    """Write ``config.json``: the resolved config in a versioned envelope.

    ``{"format": "data2vec-model", "format_version": 1, "data2vec_version": ..., "modality",
    "algorithm", "config": {section: {field: value}}}``; readers refuse other formats and newer
    versions by name instead of misreading them.
    """
    import json

    from data2vec import __version__

    doc = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "data2vec_version": __version__,
        "modality": cfg.model.modality,
        "algorithm": cfg.model.algorithm,
        "config": cfg.to_dict(),
    }
    path = Path(model_dir) / MODEL_CONFIG_FILE
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def load_config_file(model_dir: Path) -> Config:
    """The config of a model directory (``config.json``, else ``config.yaml``)."""
    import json

    import yaml

    path = Path(model_dir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raw = yaml.safe_load((Path(model_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
        return config_from_dict(raw)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != MODEL_FORMAT:
        raise UserError(
            f"{path} is not a data2vec model config (a Hugging Face folder? convert it with "
            "data2vec convert --from hf --to ours)"
        )
    if int(doc.get("format_version", 0)) > MODEL_FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {doc['format_version']}; this data2vec reads up to "
            f"{MODEL_FORMAT_VERSION}: upgrade data2vec"
        )
    return config_from_dict(doc["config"])
