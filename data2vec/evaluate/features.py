"""Frozen features from a pretrained (or randomly initialized) encoder."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from data2vec.config import Config
from data2vec.data.audio import AudioSource, normalize, open_audio_source
from data2vec.data.images import ImageSource, open_image_source
from data2vec.data.skips import SkipLog, load_usable
from data2vec.data.transforms import EvalTransform
from data2vec.engine import checkpoint as ckpt
from data2vec.engine.runtime import autocast
from data2vec.errors import UserError
from data2vec.models.encoder import Encoder, EncoderOutput
from data2vec.models.registry import build_encoder

log = logging.getLogger(__name__)

Weights = Literal["student", "teacher"]
Pool = Literal["mean", "cls"]


@dataclass
class Features:
    """Features of one data set: ``features (N, D)`` float32, ``labels (N,)`` int64 (-1 = none)."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    classes: list[str]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            features=self.features,
            labels=self.labels,
            paths=self.paths,
            classes=np.array(self.classes),
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Features:
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read features file {path}: {exc}") from exc
        if "features" not in z.files:
            raise UserError(f"{path} has no 'features' array (written by `data2vec embed`?)")
        n = len(z["features"])
        labels = z["labels"] if "labels" in z.files else np.full(n, -1, dtype=np.int64)
        paths = z["paths"] if "paths" in z.files else np.array([str(i) for i in range(n)])
        classes = [str(c) for c in z["classes"]] if "classes" in z.files else []
        return cls(z["features"].astype(np.float32), labels.astype(np.int64), paths, classes)


def for_data(cfg: Config, encoder: Encoder, data: str | Path) -> tuple[Config, Encoder]:
    """A joint model's ``(config, encoder)`` for the modality ``data`` holds; others as they are."""
    if cfg.model.modality != "multi":
        return cfg, encoder
    from data2vec.data.multimodal import detect_modality
    from data2vec.models.multimodal import select_modality

    name = detect_modality(data, list(cfg.encoder.modalities))  # type: ignore[union-attr]
    return select_modality(cfg, encoder, name)


def load_encoder(path: str | Path, weights: Weights = "student") -> tuple[Config, Encoder]:
    """The encoder of a run/checkpoint/model directory, in eval mode on the CPU."""
    model_dir = ckpt.resolve_model_dir(path)
    cfg = ckpt.load_config_file(model_dir)
    encoder = build_encoder(cfg)
    if weights == "student":
        state = load_file(str(model_dir / ckpt.MODEL_FILE))
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    else:
        teacher_file = model_dir / ckpt.TEACHER_FILE
        if not teacher_file.is_file():
            raise UserError(f"{model_dir} has no {ckpt.TEACHER_FILE}; use the student weights")
        state = load_file(str(teacher_file))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if unexpected or (missing and weights == "student"):
        raise UserError(
            f"{model_dir}: weights do not match the config (missing {missing}, "
            f"unexpected {unexpected})"
        )
    if missing:  # a teacher that does not own every module shares them with the student
        student = load_file(str(model_dir / ckpt.MODEL_FILE))
        encoder.load_state_dict({k: student[f"encoder.{k}"] for k in missing}, strict=False)
    ckpt.attach_assets(encoder, model_dir, cfg)
    return cfg, encoder.eval()


def pool_tokens(out: EncoderOutput, pool: Pool = "mean", layers: int = 1) -> torch.Tensor:
    """One vector per sample.

    Args:
        out: encoder output with ``layer_outputs`` when ``layers > 1``.
        pool: ``mean`` over the (non-extra) tokens, or the first extra (``cls``) token.
        layers: average the outputs of the last ``layers`` blocks before pooling (DESIGN §5).

    Returns:
        ``(N, D)``.
    """
    x = out.x if layers == 1 else torch.stack(out.layer_outputs[-layers:]).mean(0)
    if pool == "cls":
        if out.num_extra_tokens == 0:
            raise UserError("pool=cls needs a model with an extra (CLS) token")
        return x[:, 0]
    tokens = x[:, out.num_extra_tokens :]
    if out.padding_mask is None:
        return tokens.mean(1)
    keep = (~out.padding_mask[:, out.num_extra_tokens :]).unsqueeze(-1).to(tokens.dtype)
    return (tokens * keep).sum(1) / keep.sum(1).clamp_min(1.0)


Batch = tuple[list[int], torch.Tensor, "torch.Tensor | None"]


def pooled_features(
    encoder: Encoder,
    source,
    batches: Iterable[Batch],
    pool: Pool,
    layers: int,
    device: torch.device,
    precision: str,
    empty: str,
) -> Features:
    """Encode and pool ``(indices, inputs, padding or None)`` batches of ``source`` in any order;
    the features come back in the source's order, with its labels and names.

    Raises:
        UserError: ``empty`` when no batch came.
    """
    feats, idx = [], []
    for chunk, x, pad in batches:
        with autocast(device, precision):
            pad = None if pad is None else pad.to(device)
            out = encoder(x.to(device), pad, keep_layers=layers > 1)
        feats.append(pool_tokens(out, pool, layers).float().cpu().numpy())
        idx += chunk
    if not feats:
        raise UserError(empty)
    back = np.argsort(idx, kind="stable")  # restore the source's order
    kept = np.asarray(idx, dtype=np.int64)[back]
    names = np.array([source.name(int(i)) for i in kept])
    labels = np.asarray(source.labels())[kept].astype(np.int64)
    return Features(np.concatenate(feats)[back], labels, names, list(source.classes))


@torch.no_grad()
def embed_images(
    encoder: Encoder,
    cfg: Config,
    source: ImageSource,
    skips: SkipLog | None = None,
    batch_size: int = 256,
    pool: Pool = "mean",
    layers: int = 1,
    device: torch.device | None = None,
    precision: str = "fp32",
    progress: bool = True,
) -> Features:
    """Embed every image of ``source`` (unreadable ones are skipped and recorded)."""
    device = device or torch.device("cpu")
    encoder = encoder.to(device).eval()
    transform = EvalTransform(cfg.encoder.image_size, mean=cfg.data.mean, std=cfg.data.std)

    def batches() -> Iterator[Batch]:
        for start in range(0, len(source), batch_size):
            end = min(start + batch_size, len(source))
            arrays, idx = load_usable(source, transform, skips, range(start, end))
            bar.update(min(batch_size, len(source) - start))
            if arrays:
                yield idx, torch.from_numpy(np.stack(arrays)), None

    with tqdm(total=len(source), desc="embed", disable=not progress, dynamic_ncols=True) as bar:
        return pooled_features(encoder, source, batches(), pool, layers, device, precision,
                               "no readable images to embed")  # fmt: skip


@torch.no_grad()
def embed_audio(
    encoder: Encoder,
    cfg: Config,
    source: AudioSource,
    skips: SkipLog | None = None,
    batch_size: int = 32,
    pool: Pool = "mean",
    layers: int = 1,
    device: torch.device | None = None,
    precision: str = "fp32",
    progress: bool = True,
) -> Features:
    """Embed every clip of ``source`` (the first ``data.max_samples`` samples of each).

    Clips are batched in order of length so little is padded; padded frames are left out of the
    pooling. Unreadable clips are skipped and recorded.
    """
    device = device or torch.device("cpu")
    encoder = encoder.to(device).eval()
    order = np.argsort(source.lengths(skips), kind="stable")

    def prepare(wave: np.ndarray) -> np.ndarray:
        wave = wave[: cfg.data.max_samples]
        return normalize(wave) if cfg.data.normalize else wave

    def batches() -> Iterator[Batch]:
        for start in range(0, len(order), batch_size):
            chunk = [int(i) for i in order[start : start + batch_size]]
            waves, batch_idx = load_usable(source, prepare, skips, chunk)
            bar.update(min(batch_size, len(order) - start))
            if not waves:
                continue
            longest = max(len(w) for w in waves)
            x = torch.zeros(len(waves), longest)
            pad = torch.ones(len(waves), longest, dtype=torch.bool)
            for b, w in enumerate(waves):
                x[b, : len(w)] = torch.from_numpy(w)
                pad[b, : len(w)] = False
            yield batch_idx, x, pad

    with tqdm(total=len(source), desc="embed", disable=not progress, dynamic_ncols=True) as bar:
        return pooled_features(encoder, source, batches(), pool, layers, device, precision,
                               "no readable audio to embed")  # fmt: skip


def open_source(modality: str, data: str | Path, skips: SkipLog | None = None):
    """The labelled/unlabelled data source of a modality."""
    if modality == "image":
        return open_image_source(data, skips)
    if modality == "audio":
        return open_audio_source(data, skips)
    if modality == "text":
        from data2vec.evaluate.text import open_text_source

        return open_text_source(data, skips)
    if modality == "signal":
        from data2vec.data.signal import open_signal_source

        return open_signal_source(data, skips)
    raise UserError(f"embedding {modality} data is not available")


def embed_source(
    encoder: Encoder, cfg: Config, source, skips: SkipLog | None = None, **kwargs
) -> Features:
    """Embed a source with the function of the encoder's modality."""
    if cfg.model.modality == "audio":
        return embed_audio(encoder, cfg, source, skips, **kwargs)
    if cfg.model.modality == "text":
        from data2vec.evaluate.text import embed_text

        return embed_text(encoder, cfg, source, **kwargs)
    if cfg.model.modality == "signal":
        from data2vec.evaluate.signal import embed_signals

        return embed_signals(encoder, cfg, source, skips, **kwargs)
    return embed_images(encoder, cfg, source, skips, **kwargs)


def embed_path(
    checkpoint: str | Path,
    data: str | Path,
    skips: SkipLog | None = None,
    weights: Weights = "student",
    **kwargs,
) -> Features:
    """Load the encoder of ``checkpoint`` and embed the data at ``data`` (a joint model embeds
    it with the encoder of the modality the data holds)."""
    cfg, encoder = load_encoder(checkpoint, weights)
    cfg, encoder = for_data(cfg, encoder, data)
    source = open_source(cfg.model.modality, data, skips)
    return embed_source(encoder, cfg, source, skips, **kwargs)
