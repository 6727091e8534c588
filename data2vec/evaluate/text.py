"""Text sources and frozen text features.

Labelled text is a ``.tsv`` (``text<TAB>label``) or ``.jsonl`` (``{"text", "label"}``) file;
unlabelled text a ``.txt`` file (documents separated by blank lines) or a folder of such files.
Each text is tokenized with the model's own tokenizer as ``<s> text </s>``, truncated to
``encoder.max_positions``; batches are formed from texts of similar length and padding is left
out of the pooling.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data2vec.config import Config
from data2vec.data.skips import SkipLog
from data2vec.data.text import iter_documents, read_labelled_text
from data2vec.errors import UserError
from data2vec.evaluate.features import Batch, Features, Pool, pooled_features
from data2vec.models.encoder import Encoder

LABELLED_SUFFIXES = (".tsv", ".jsonl")


@dataclass
class TextSource:
    """Texts with optional labels (``-1`` = none), classes in sorted order."""

    path: str
    texts: list[str]
    label_ids: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def labels(self) -> np.ndarray:
        return self.label_ids

    def name(self, i: int) -> str:
        return f"{self.path}:{i + 1}"


def open_text_source(spec: str | Path, skips: SkipLog | None = None) -> TextSource:
    """Labelled ``.tsv``/``.jsonl`` files, or unlabelled ``.txt`` files and folders."""
    skips = skips if skips is not None else SkipLog()
    path = Path(spec)
    if path.suffix in LABELLED_SUFFIXES:
        texts, labels = read_labelled_text(path, skips)
        classes = sorted(set(labels))
        index = {c: i for i, c in enumerate(classes)}
        ids = np.array([index[c] for c in labels], dtype=np.int64)
        return TextSource(str(path), texts, ids, classes)
    texts = list(iter_documents(path, skips))
    if not texts:
        raise UserError(f"no text documents in {path}")
    return TextSource(str(path), texts, np.full(len(texts), -1, dtype=np.int64), [])


def tokenize_texts(tokenizer, texts: list[str], max_len: int) -> list[np.ndarray]:
    """``<s> ids </s>`` per text, truncated to ``max_len`` tokens (batched encoding)."""
    out = []
    for ids in tokenizer.encode_batch(texts):
        body = ids[: max_len - 2]
        out.append(np.asarray([tokenizer.bos_id, *body, tokenizer.eos_id], dtype=np.int64))
    return out


def pad_tokens(seqs: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences: ``(B, L)`` int64 ids and ``(B, L)`` bool, True = padding."""
    longest = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = torch.from_numpy(s)
    return tokens, tokens.eq(pad_id)


def require_tokenizer(encoder: Encoder):
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None:
        raise UserError("this text encoder has no tokenizer (load it with load_encoder)")
    return tokenizer


@torch.no_grad()
def embed_text(
    encoder: Encoder,
    cfg: Config,
    source: TextSource,
    batch_size: int = 64,
    pool: Pool = "mean",
    layers: int = 1,
    device: torch.device | None = None,
    precision: str = "fp32",
    progress: bool = True,
) -> Features:
    """Embed every text of ``source`` with ``encoder`` and its tokenizer."""
    device = device or torch.device("cpu")
    encoder = encoder.to(device).eval()
    tokenizer = require_tokenizer(encoder)
    seqs = tokenize_texts(tokenizer, source.texts, cfg.encoder.max_positions)  # type: ignore[union-attr]
    order = np.argsort([len(s) for s in seqs], kind="stable")

    def batches() -> Iterator[Batch]:
        for start in range(0, len(order), batch_size):
            idx = [int(i) for i in order[start : start + batch_size]]
            tokens, pad = pad_tokens([seqs[i] for i in idx], tokenizer.pad_id)
            yield idx, tokens, pad
            bar.update(len(idx))

    with tqdm(total=len(seqs), desc="embed", disable=not progress, dynamic_ncols=True) as bar:
        return pooled_features(encoder, source, batches(), pool, layers, device, precision,
                               f"no text to embed in {source.path}")  # fmt: skip
