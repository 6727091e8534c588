"""Our model directory: ``config.json``, ``model.safetensors`` and ``teacher.safetensors``
(+ ``tokenizer.json`` for text)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from data2vec.config import Config
from data2vec.engine import checkpoint as ckpt
from data2vec.models.data2vec2 import Data2Vec2
from data2vec.models.encoder import Encoder


def export_model(out: str | Path, cfg: Config, model: Data2Vec2) -> Path:
    """Write a model directory that ``--checkpoint`` and :func:`load_encoder` accept."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    state |= {f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / ckpt.MODEL_FILE))
    teacher = {k: v.contiguous() for k, v in model.teacher.state_dict().items()}
    save_file(teacher, str(out / ckpt.TEACHER_FILE))
    ckpt.save_model_config(cfg, out)
    ckpt.save_assets(model.encoder, out)
    return out


def export_encoder(out: str | Path, cfg: Config, encoder: Encoder) -> Path:
    """Write a model directory holding an encoder only (e.g. imported from Hugging Face)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(out / ckpt.MODEL_FILE))
    ckpt.save_model_config(cfg, out)
    ckpt.save_assets(encoder, out)
    return out
