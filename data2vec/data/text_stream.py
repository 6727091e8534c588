"""Text from tar shards: documents streamed, tokenized and packed into blocks on the fly.

The streamed counterpart of :mod:`data2vec.data.text_corpus` (which tokenizes a corpus once
into an on-disk store): blocks are packed exactly as :func:`~data2vec.data.text_pretrain.
pack_blocks` packs them (``<s> doc </s> doc </s>``, whole documents, a document longer than a
block cut into block-sized chunks), and masked by :meth:`PretrainText.masks`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from data2vec.config import Config, TextEncoderConfig
from data2vec.data.shards import Sample, read_samples
from data2vec.data.text_pretrain import PretrainText, collate_pretrain_text
from data2vec.data.tokenizer import TOKENIZER_FILE, TextTokenizer
from data2vec.errors import ConfigError

log = logging.getLogger(__name__)

ENCODE_CHUNK = 64  # documents per encode_batch call


def document_text(sample: Sample) -> str:
    """The document of a text sample (its ``.txt`` member; invalid UTF-8 replaced)."""
    raw = sample.files.get("txt", b"")
    return raw.decode("utf-8", errors="replace").strip()


def shard_documents(shards: list[Path]) -> Iterator[str]:
    """Every non-empty document of ``shards``, in order (one pass, streamed)."""
    for shard in shards:
        for sample in read_samples(shard):
            if isinstance(sample, Sample) and (doc := document_text(sample)):
                yield doc


class PackBlocks:
    """``samples -> blocks``: token ids ``(L,)`` int64 with ``<s>``/``</s>``, ``L <= T``."""

    def __init__(self, tokenizer: TextTokenizer, block_size: int) -> None:
        self.tokenizer, self.T = tokenizer, block_size

    def __call__(self, samples: Iterator[Sample]) -> Iterator[np.ndarray]:
        bos, eos, T = self.tokenizer.bos_id, self.tokenizer.eos_id, self.T
        cap = T - 2  # content tokens of a block holding one document
        held: list[int] = [bos]
        docs = (d for d in map(document_text, samples) if d)
        while chunk := list(itertools.islice(docs, ENCODE_CHUNK)):
            for ids in self.tokenizer.encode_batch(chunk):
                if not ids:
                    continue
                if len(ids) > cap:  # its own blocks, in chunks of cap tokens
                    for lo in range(0, len(ids), cap):
                        yield np.array([bos, *ids[lo : lo + cap], eos], dtype=np.int64)
                    continue
                if len(held) + len(ids) + 1 > T:
                    yield np.array(held, dtype=np.int64)
                    held = [bos]
                held += [*ids, eos]
        if len(held) > 1:
            yield np.array(held, dtype=np.int64)


class _BlockItems:
    """``(block, position) -> ("ok", tokens, masks, position)``."""

    def __init__(self, masks: PretrainText) -> None:
        self.masks = masks

    def __call__(self, tokens: np.ndarray, position: int) -> tuple:
        return ("ok", tokens, self.masks.masks(len(tokens), position), position)


def stream_tokenizer(cfg: Config, shards: list[Path], work_dir: Path) -> TextTokenizer:
    """The run's tokenizer (resume), ``data.tokenizer``, or one trained on the shards."""
    own = work_dir / TOKENIZER_FILE
    if own.is_file():
        return TextTokenizer.load(own)
    if cfg.data.tokenizer is not None:
        tokenizer = TextTokenizer.load(cfg.data.tokenizer)
    else:
        vocab = cfg.encoder.vocab_size  # type: ignore[union-attr]
        log.info("training a byte-level BPE tokenizer of %d tokens on the shards", vocab)
        tokenizer = TextTokenizer.train(shard_documents(shards), vocab)
    work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(own)
    return tokenizer


def text_stream_parts(
    cfg: Config, shards: list[Path], work_dir: Path
) -> tuple[Callable, Callable, Callable, Any]:
    """``(units, make_item, collate, tokenizer)`` for a :class:`ShardStream` of text.

    Sets ``cfg.encoder.vocab_size``, ``pad_id`` and ``mask_id`` from the tokenizer.
    """
    enc = cfg.encoder
    if not isinstance(enc, TextEncoderConfig):
        raise ConfigError("text shards need a text preset")
    if cfg.mask.kind not in ("random", "span"):
        raise ConfigError(
            f"mask.kind={cfg.mask.kind!r} is not available for text; allowed values: "
            "['random', 'span']"
        )
    tokenizer = stream_tokenizer(cfg, shards, work_dir)
    enc.vocab_size, enc.pad_id, enc.mask_id = (
        tokenizer.vocab_size,
        tokenizer.pad_id,
        tokenizer.mask_id,
    )
    T = cfg.data.block_size
    # only its masks are used: no store, no blocks
    masks = PretrainText.from_config(None, np.zeros((0, 2), np.int64), cfg, tokenizer)
    collate = partial(collate_pretrain_text, block_size=T, pad_id=tokenizer.pad_id)
    return PackBlocks(tokenizer, T), _BlockItems(masks), collate, tokenizer
