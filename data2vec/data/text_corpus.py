"""Text pretraining data: the tokenizer, the tokenized corpus on disk, and packed blocks.

``prepare_text`` runs once at the start of a run, in the run directory::

    <run>/tokenizer.json    trained on the corpus (byte-level BPE, encoder.vocab_size), or a
                            copy of data.tokenizer; reused on resume
    <run>/tokens/           the corpus tokenized once (memory-mapped; rebuilt only when the
                            corpus files or the tokenizer change)

The model's vocabulary is the tokenizer's: ``encoder.vocab_size`` and ``encoder.pad_id`` are set
from it before the model is built, so a small corpus giving fewer merges than asked still works.
"""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from pathlib import Path

from data2vec.config import Config, TextEncoderConfig
from data2vec.data.registry import PretrainData
from data2vec.data.sampling import StreamBatchSampler
from data2vec.data.skips import SkipLog
from data2vec.data.text import TEXT_SUFFIXES, TextStats, iter_documents, text_files
from data2vec.data.text_pretrain import (
    PretrainText,
    TokenStore,
    collate_pretrain_text,
    pack_blocks,
)
from data2vec.data.tokenizer import TOKENIZER_FILE, TextTokenizer
from data2vec.errors import ConfigError, DataError

log = logging.getLogger(__name__)

STORE_DIR = "tokens"


def corpus_signature(spec: str | Path, tokenizer_file: Path) -> str:
    """Identifies a tokenized corpus: every file's path, size and mtime, and the tokenizer."""
    h = hashlib.sha256()
    for f in text_files(Path(spec), TEXT_SUFFIXES):
        st = f.stat()
        h.update(f"{f.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    h.update(tokenizer_file.read_bytes())
    return h.hexdigest()


def resolve_tokenizer(cfg: Config, spec: str | Path, work_dir: Path) -> TextTokenizer:
    """The run's tokenizer: the run directory's own (resume), ``data.tokenizer``, or a new one."""
    enc = cfg.encoder
    assert isinstance(enc, TextEncoderConfig)
    own = work_dir / TOKENIZER_FILE
    if own.is_file():
        log.info("using the run's tokenizer %s", own)
        return TextTokenizer.load(own)
    if cfg.data.tokenizer is not None:
        tokenizer = TextTokenizer.load(cfg.data.tokenizer)
        log.info("using tokenizer %s (%d tokens)", cfg.data.tokenizer, tokenizer.vocab_size)
    else:
        log.info("training a byte-level BPE tokenizer of %d tokens on %s", enc.vocab_size, spec)
        tokenizer = TextTokenizer.train(iter_documents(spec, SkipLog()), enc.vocab_size)
        log.info("tokenizer: %d tokens", tokenizer.vocab_size)
    tokenizer.save(own)
    return tokenizer


def prepare_text(cfg: Config, spec: str | Path, skips: SkipLog, work_dir: Path) -> PretrainData:
    """Tokenizer, token store and packed blocks for pretraining on the text at ``spec``.

    Sets ``cfg.encoder.vocab_size``, ``pad_id`` and ``mask_id`` from the tokenizer.

    Raises:
        ConfigError: a mask kind other than ``random``.
        DataError: no text in the corpus.
    """
    if cfg.mask.kind not in ("random", "span"):
        raise ConfigError(
            f"mask.kind={cfg.mask.kind!r} is not available for text; allowed values: "
            "['random', 'span']"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = resolve_tokenizer(cfg, spec, work_dir)
    enc = cfg.encoder
    assert isinstance(enc, TextEncoderConfig)
    enc.vocab_size, enc.pad_id = tokenizer.vocab_size, tokenizer.pad_id
    enc.mask_id = tokenizer.mask_id
    signature = corpus_signature(spec, work_dir / TOKENIZER_FILE)
    store = TokenStore.open(work_dir / STORE_DIR, signature)
    if store is None:
        stats = TextStats()
        log.info("tokenizing %s", spec)
        documents = iter_documents(spec, skips, stats)
        store = TokenStore.build(documents, tokenizer, work_dir / STORE_DIR, signature=signature)
        log.info("corpus: %s", stats.as_dict())
    if store.num_tokens == 0:
        raise DataError(f"no text to pretrain on in {spec}")
    T = cfg.data.block_size
    blocks = pack_blocks(store.doc_lengths, T)
    log.info(
        "%d documents, %d tokens -> %d blocks of %d tokens",
        store.num_documents,
        store.num_tokens,
        len(blocks),
        T,
    )
    dataset = PretrainText.from_config(store, blocks, cfg, tokenizer)
    B = cfg.data.batch_size
    return PretrainData(
        dataset,
        partial(collate_pretrain_text, block_size=T, pad_id=tokenizer.pad_id),
        lambda start, rank=0, world=1: StreamBatchSampler(
            len(blocks), B, cfg.train.seed, start_batch=start, rank=rank, world_size=world
        ),
        len(blocks),
        tokenizer=tokenizer,
    )
