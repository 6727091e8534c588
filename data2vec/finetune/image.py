"""Image classification fine-tuning: labelled image datasets, collate, and the entry point.

Training images get the pretraining augmentation (random resized crop + flip with the pretrained
config's crop scale, flip probability, mean and std), seeded by ``(seed, stream position)`` so a
run is the same whatever the number of loader workers; validation images get the deterministic
resize + centre crop. The label space is the training set's classes; validation classes are
matched to them by name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data2vec.config import Config
from data2vec.data.images import ImageSource, open_image_source
from data2vec.data.sampling import StreamBatchSampler
from data2vec.data.skips import SkipError, SkipLog
from data2vec.data.transforms import EvalTransform, TrainTransform
from data2vec.errors import DataError
from data2vec.finetune.heads import ClassificationHead
from data2vec.finetune.model import FineTuneModel, SupervisedBatch, load_pretrained
from data2vec.finetune.trainer import FineTuneConfig, FineTuneResult, finetune, pin_batches
from data2vec.masking import make_rng

log = logging.getLogger(__name__)


class LabelledImages(Dataset):
    """``dataset[(index, position)]`` -> ``("ok", image, label)`` or ``("skip", name, reason)``.

    ``image`` is float32 ``(C, H, W)``.

    Args:
        source: the images.
        transform: ``transform(pil_image, rng) -> float32 (C, H, W)``.
        seed: augmentation seed; sample ``position`` draws from ``make_rng(seed, position)``.
        label_map: ``(K,)`` int64, the class index of each source label (identity when None).
    """

    def __init__(
        self, source: ImageSource, transform, seed: int, label_map: np.ndarray | None = None
    ) -> None:
        self.source = source
        self.transform = transform
        self.seed = seed
        labels = source.labels()
        self.labels = labels if label_map is None else label_map[labels]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, position = key
        try:
            image = self.source.load(index)
        except SkipError as exc:
            return ("skip", self.source.name(index), str(exc))
        array = self.transform(image, make_rng(self.seed, position))
        return ("ok", array, int(self.labels[index]))


def collate_labelled(items: list[tuple]) -> SupervisedBatch:
    """Stack the readable samples into a :class:`SupervisedBatch`; report the skipped ones."""
    good = [it for it in items if it[0] == "ok"]
    skipped = [(it[1], it[2]) for it in items if it[0] == "skip"]
    if not good:
        return SupervisedBatch(
            torch.empty(0), None, torch.empty(0, dtype=torch.long), None, skipped
        )
    source = torch.from_numpy(np.stack([it[1] for it in good]))  # (B, C, H, W)
    targets = torch.tensor([it[2] for it in good], dtype=torch.long)  # (B,)
    return SupervisedBatch(source, None, targets, None, skipped)


def label_space(train: ImageSource, valid: ImageSource) -> tuple[list[str], np.ndarray]:
    """The training classes and the map from validation labels to them (by class name).

    Raises:
        DataError: unlabelled data, or a validation class the training set does not have.
    """
    for name, source in (("training", train), ("validation", valid)):
        if not source.classes or bool((source.labels() < 0).any()):
            raise DataError(
                f"the {name} images {source!r} are unlabelled; fine-tuning needs one sub-folder "
                "per class (root/<label>/<image>) or a manifest with labels"
            )
    index = {c: i for i, c in enumerate(train.classes)}
    unknown = [c for c in valid.classes if c not in index]
    if unknown:
        raise DataError(
            f"validation classes {unknown} are not among the training classes {train.classes}"
        )
    return list(train.classes), np.array([index[c] for c in valid.classes], dtype=np.int64)


def image_loaders(
    encoder_config: Config,
    train: ImageSource,
    valid: ImageSource,
    cfg: FineTuneConfig,
    valid_map: np.ndarray | None = None,
) -> tuple[DataLoader, DataLoader]:
    """An endless, seeded training loader and a one-pass validation loader."""
    size, data = encoder_config.encoder.image_size, encoder_config.data
    train_tf = TrainTransform(
        size, scale=data.crop_scale, hflip=data.hflip, mean=data.mean, std=data.std
    )
    eval_tf = EvalTransform(size, mean=data.mean, std=data.std)
    workers = cfg.num_workers
    pin = pin_batches(cfg)  # for CUDA
    train_loader = DataLoader(
        LabelledImages(train, train_tf, cfg.seed),
        batch_sampler=StreamBatchSampler(len(train), cfg.batch_size, cfg.seed),
        collate_fn=collate_labelled,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    n = len(valid)
    in_order = [
        [(i, i) for i in range(start, min(start + cfg.batch_size, n))]
        for start in range(0, n, cfg.batch_size)
    ]
    valid_loader = DataLoader(
        LabelledImages(valid, eval_tf, cfg.seed, valid_map),
        batch_sampler=in_order,
        collate_fn=collate_labelled,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
    )
    return train_loader, valid_loader


def finetune_images(
    checkpoint: str | Path,
    train_path: str | Path,
    valid_path: str | Path,
    out: str | Path,
    cfg: FineTuneConfig,
) -> FineTuneResult:
    """Fine-tune the pretrained image encoder of ``checkpoint`` for classification.

    Args:
        checkpoint: a pretraining run, checkpoint or model directory.
        train_path: labelled training images (class folders, manifest with labels, IDX,
            ``fashion-mnist:train``).
        valid_path: labelled validation images (classes matched to the training ones by name).
        out: the run directory (see :func:`~data2vec.finetune.trainer.finetune`).
        cfg: fine-tuning settings.
    """
    encoder_config, encoder = load_pretrained(
        checkpoint, "image", "image-classification", "an image encoder"
    )
    skips = SkipLog()
    train = open_image_source(train_path, skips)
    valid = open_image_source(valid_path, skips)
    classes, valid_map = label_space(train, valid)
    log.info(
        "fine-tuning on %d images, %d classes; %d validation images",
        len(train),
        len(classes),
        len(valid),
    )
    torch.manual_seed(cfg.seed)  # the head's initialization
    head = ClassificationHead(encoder.embed_dim, len(classes), cfg.pool, cfg.head_dropout)
    model = FineTuneModel(encoder, head, "classification")
    train_loader, valid_loader = image_loaders(encoder_config, train, valid, cfg, valid_map)
    info = {
        "source_task": "image-classification",
        "classes": classes,
        "pretrained": str(checkpoint),
    }
    return finetune(
        model,
        train_loader,
        valid_loader,
        cfg,
        out,
        "classification",
        encoder_config=encoder_config,
        info=info,
        skips=skips,
    )
