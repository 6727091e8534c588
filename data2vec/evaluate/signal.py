"""Frozen features of N-d signals (``data2vec embed`` / ``evaluate`` on signal data)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm import tqdm

from data2vec.config import Config
from data2vec.data.signal import SignalSource, SignalTransform, pad_batch
from data2vec.data.skips import SkipLog, load_usable
from data2vec.errors import UserError
from data2vec.evaluate.features import Batch, Features, Pool, pooled_features
from data2vec.models.encoder import Encoder


@torch.no_grad()
def embed_signals(
    encoder: Encoder,
    cfg: Config,
    source: SignalSource,
    skips: SkipLog | None = None,
    batch_size: int = 256,
    pool: Pool = "mean",
    layers: int = 1,
    device: torch.device | None = None,
    precision: str = "fp32",
    progress: bool = True,
) -> Features:
    """Embed every input of ``source`` (fitted as in pretraining, first crop at the start).

    Inputs are batched in order of length so little is padded; padded tokens are left out of
    attention and pooling, so an input gets the same features in any batch. Unusable inputs
    are skipped and recorded.
    """
    device = device or torch.device("cpu")
    encoder = encoder.to(device).eval()
    transform = SignalTransform(cfg)
    patch = cfg.encoder.patch_size[0]  # type: ignore[union-attr]
    rows, kept = load_usable(source, transform, skips)
    arrays = dict(zip(kept, rows))
    if not arrays:
        raise UserError("no usable signals to embed")
    order = sorted(arrays, key=lambda i: arrays[i].shape[1])

    def batches() -> Iterator[Batch]:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            x, pad = pad_batch([arrays[i] for i in chunk], patch)
            yield chunk, torch.from_numpy(x), torch.from_numpy(pad) if pad.any() else None
            bar.update(len(chunk))

    with tqdm(total=len(order), desc="embed", disable=not progress, dynamic_ncols=True) as bar:
        return pooled_features(encoder, source, batches(), pool, layers, device, precision,
                               "no usable signals to embed")  # fmt: skip
