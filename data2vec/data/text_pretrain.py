"""Pretraining batches of text: an on-disk token store, document-aware packing, masks.

The corpus is tokenized once into a :class:`TokenStore` (flat token ids plus document ends,
memory-mapped), so a corpus larger than memory trains from disk. :func:`pack_blocks` then cuts
the token stream into blocks the RoBERTa way ("full documents", Liu et al. 2019, §4.2, adapted):
``<s> doc </s> doc </s> ...``, whole documents only, a document too long for a block split into
block-sized chunks. Masks are drawn per block over the full padded length, in the loader worker,
from ``make_rng(seed, stream_position)``, as for images and audio.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data2vec.config import Config
from data2vec.data.batch import PretrainBatch
from data2vec.data.tokenizer import TextTokenizer
from data2vec.errors import ConfigError
from data2vec.masking import make_rng, random_mask, span_mask

log = logging.getLogger(__name__)

TOKENS_FILE = "tokens.bin"
DOCS_FILE = "docs.npy"
STORE_FILE = "store.json"
_FORMAT = 1  # bump when the on-disk layout changes, so old stores are rebuilt


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class TokenStore:
    """A tokenized corpus on disk: every document's ids, concatenated, without special tokens.

    Files in ``directory``: ``tokens.bin`` (raw ids, ``dtype``), ``docs.npy`` (int64 cumulative
    document ends: document ``i`` is ``tokens[doc_ends[i-1]:doc_ends[i]]``) and ``store.json``
    (counts, dtype, vocabulary size, signature). ``store.json`` is written last: a store without
    it is incomplete. Use :meth:`build` or :meth:`open`, not the constructor.

    Pickling keeps only the directory and metadata (the worker re-maps the files), so handing a
    store to ``DataLoader`` workers never copies the corpus.
    """

    def __init__(self, directory: Path, meta: dict) -> None:
        self.directory = Path(directory)
        self.meta = meta
        self._map()

    def _map(self) -> None:
        self.dtype = np.dtype(self.meta["dtype"])
        self.num_tokens = int(self.meta["num_tokens"])
        self.num_documents = int(self.meta["num_documents"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.signature = str(self.meta["signature"])
        # np.memmap refuses an empty file, and an empty corpus is legal (if useless).
        self.tokens: np.ndarray = (
            np.memmap(self.directory / TOKENS_FILE, self.dtype, "r", shape=(self.num_tokens,))
            if self.num_tokens
            else np.zeros(0, self.dtype)
        )
        self.doc_ends: np.ndarray = np.load(self.directory / DOCS_FILE, mmap_mode="r")

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "meta": self.meta}

    def __setstate__(self, state: dict) -> None:
        self.directory, self.meta = state["directory"], state["meta"]
        self._map()

    @property
    def doc_lengths(self) -> np.ndarray:
        """Tokens per document, int64 ``(num_documents,)``."""
        return np.diff(np.asarray(self.doc_ends), prepend=0)

    def document(self, i: int) -> np.ndarray:
        """The ids of document ``i`` (a read-only view)."""
        start = int(self.doc_ends[i - 1]) if i > 0 else 0
        return self.tokens[start : int(self.doc_ends[i])]

    @classmethod
    def build(
        cls,
        documents: Iterable[str],
        tokenizer: TextTokenizer,
        directory: str | Path,
        chunk_docs: int = 1000,
        signature: str = "",
    ) -> TokenStore:
        """Tokenize ``documents`` (streamed, ``chunk_docs`` at a time) into ``directory``.

        Documents that give no token at all are left out. Any store already in ``directory`` is
        invalidated first, and the new one becomes visible only once complete.

        Args:
            documents: the corpus, consumed once.
            tokenizer: ids are stored as uint16 if it has at most 65535 ids, else uint32.
            directory: created if needed.
            chunk_docs: documents per ``encode_batch`` call.
            signature: identifies corpus and tokenizer (:meth:`open` checks it).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / STORE_FILE).unlink(missing_ok=True)  # the old store stops being valid now
        dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
        tmp_tokens = directory / f"{TOKENS_FILE}.tmp"
        lengths: list[np.ndarray] = []
        with tmp_tokens.open("wb") as f:
            for chunk in _chunks(documents, chunk_docs):
                ids = tokenizer.encode_batch(chunk)
                n = np.fromiter(map(len, ids), np.int64, count=len(ids))
                flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, count=int(n.sum()))
                f.write(flat.tobytes())
                lengths.append(n[n > 0])
        doc_ends = np.cumsum(np.concatenate(lengths)) if lengths else np.zeros(0, np.int64)
        tmp_docs = directory / f"{DOCS_FILE}.tmp"
        with tmp_docs.open("wb") as f:
            np.save(f, doc_ends.astype(np.int64))
        meta = {
            "format": _FORMAT,
            "dtype": dtype.name,
            "num_tokens": int(doc_ends[-1]) if len(doc_ends) else 0,
            "num_documents": len(doc_ends),
            "vocab_size": tokenizer.vocab_size,
            "signature": signature,
        }
        os.replace(tmp_tokens, directory / TOKENS_FILE)
        os.replace(tmp_docs, directory / DOCS_FILE)
        tmp_meta = directory / f"{STORE_FILE}.tmp"
        tmp_meta.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.replace(tmp_meta, directory / STORE_FILE)  # the commit point
        log.info(
            "token store %s: %d documents, %d tokens", directory, len(doc_ends), meta["num_tokens"]
        )
        return cls(directory, meta)

    @classmethod
    def open(cls, directory: str | Path, signature: str | None = None) -> TokenStore | None:
        """The store in ``directory``, or ``None`` if it is missing, incomplete, inconsistent,
        of an older format, or (when ``signature`` is given) built for another corpus."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / STORE_FILE).read_text(encoding="utf-8"))
            ends = np.load(directory / DOCS_FILE, mmap_mode="r")
            size = (directory / TOKENS_FILE).stat().st_size
            expected = int(meta["num_tokens"]) * np.dtype(meta["dtype"]).itemsize
            consistent = (
                meta["format"] == _FORMAT
                and ends.shape == (int(meta["num_documents"]),)
                and size == expected
                and (int(ends[-1]) if len(ends) else 0) == int(meta["num_tokens"])
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.info("no usable token store in %s: %s", directory, e)
            return None
        if not consistent:
            log.info("token store in %s is incomplete or inconsistent", directory)
            return None
        if signature is not None and meta["signature"] != signature:
            log.info("token store in %s was built for another corpus or tokenizer", directory)
            return None
        return cls(directory, meta)

    def __repr__(self) -> str:
        return f"TokenStore({self.directory}, {self.num_documents} docs, {self.num_tokens} tokens)"


def pack_blocks(doc_lengths: np.ndarray, block_size: int) -> np.ndarray:
    """Pack documents into blocks of at most ``block_size`` tokens, specials included.

    A block is ``<s>`` then one or more whole documents, each followed by ``</s>``; documents
    are taken greedily in order, and one that does not fit starts the next block. A document of
    more than ``block_size - 2`` tokens is split into chunks of ``block_size - 2`` tokens (the
    last one shorter), each a block of its own (``<s> chunk </s>``). So no document straddles
    two blocks unless it is longer than one.

    A block is stored as the half-open range of store token offsets it covers; its ``</s>``
    go after every document end inside the range and at its end (see :func:`block_tokens`).
    Cost: one Python step per *block* (a bisection finds where a block of short documents ends).

    Args:
        doc_lengths: ``(D,)`` tokens per document, all ``>= 1``.
        block_size: tokens per block, ``<s>``/``</s>`` included, ``>= 3``.

    Returns:
        ``(num_blocks, 2)`` int64 rows ``(start, end)`` of token offsets into the store.
    """
    if block_size < 3:
        raise ConfigError(f"block_size={block_size} must be at least 3 (<s>, a token, </s>)")
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    if len(lengths) and lengths.min() < 1:
        raise ValueError("pack_blocks: every document needs at least one token")
    cap = block_size - 2  # content tokens of a block holding one document
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # token offset of each doc, (D+1,)
    # cost[k] of docs [0, k): a document costs its tokens plus its </s>; a block allows
    # block_size - 1 of cost after its <s>. A long document costs more than that, so the
    # bisection below never packs past one.
    cost = np.concatenate([[0], np.cumsum(lengths + 1)]).tolist()
    is_long = (lengths > cap).tolist()
    starts_list = offsets.tolist()
    block_starts: list[int] = []
    block_ends: list[int] = []
    i, n = 0, len(lengths)
    while i < n:
        if is_long[i]:
            i += 1  # chunked below, all at once
            continue
        j = bisect.bisect_right(cost, cost[i] + block_size - 1, lo=i + 1) - 1
        block_starts.append(starts_list[i])
        block_ends.append(starts_list[j])
        i = j
    chunk_starts, chunk_ends = _chunk_long_documents(lengths, offsets, cap)
    starts = np.concatenate([np.asarray(block_starts, np.int64), chunk_starts])
    ends = np.concatenate([np.asarray(block_ends, np.int64), chunk_ends])
    order = np.argsort(starts, kind="stable")  # blocks are disjoint: this is corpus order
    return np.stack([starts[order], ends[order]], axis=1)


def _chunk_long_documents(
    lengths: np.ndarray, offsets: np.ndarray, cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ranges ``(starts, ends)`` of the ``cap``-token chunks of documents longer than
    ``cap``, vectorized (a corpus of long documents has millions of chunks)."""
    long_docs = np.flatnonzero(lengths > cap)
    chunks = -(-lengths[long_docs] // cap)  # ceil
    k = np.arange(chunks.sum()) - np.repeat(np.cumsum(chunks) - chunks, chunks)  # chunk index
    starts = np.repeat(offsets[long_docs], chunks) + k * cap
    return starts, np.minimum(starts + cap, np.repeat(offsets[long_docs + 1], chunks))


def block_tokens(store: TokenStore, blocks: np.ndarray, i: int, bos: int, eos: int) -> np.ndarray:
    """The ids of block ``i``: ``<s>``, its documents each followed by ``</s>``; int64 ``(L,)``,
    ``L <= block_size``, unpadded."""
    start, end = (int(v) for v in blocks[i])
    content = np.asarray(store.tokens[start:end], dtype=np.int64)
    ends = np.asarray(store.doc_ends)
    lo = np.searchsorted(ends, start, side="right")
    hi = np.searchsorted(ends, end, side="left")
    inner = ends[lo:hi]  # document ends strictly inside the block: an </s> goes after each
    out = np.insert(content, inner - start, eos)
    return np.concatenate([[bos], out, [eos]])


class PretrainText(Dataset):
    """``dataset[(index, position)]`` -> ``("ok", tokens (L,) int64, masks (M, block_size) bool,
    position)``.

    Masks cover the full padded block, so every row of a batch keeps exactly
    ``int(block_size * (1 - mask_ratio))`` tokens visible; padded positions may be among them
    (the model keeps them out of attention and the loss through ``padding_mask``).

    Args:
        store: the tokenized corpus.
        blocks: from :func:`pack_blocks` with the same ``block_size``.
        block_size: padded length of every sample.
        mask_ratio: fraction of positions masked, in ``[0, 1)``.
        clones: masks per sample (``M``).
        seed: run seed; sample masks come from ``make_rng(seed, position)``.
        bos_id, eos_id, pad_id: special token ids.
        mask_kind: ``random`` (data2vec 2.0: exact count over the padded block) or ``span``
            (data2vec 1.0: spans of ``span`` tokens started with probability ``mask_ratio``,
            over the block's real tokens only).
        span: span length for ``span`` masking.
    """

    def __init__(
        self,
        store: TokenStore,
        blocks: np.ndarray,
        block_size: int,
        mask_ratio: float,
        clones: int,
        seed: int,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        mask_kind: str = "random",
        span: int = 4,
    ) -> None:
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio={mask_ratio} must be in [0, 1)")
        if clones < 1:
            raise ConfigError(f"clones={clones} must be at least 1")
        self.store, self.blocks, self.block_size = store, blocks, block_size
        self.mask_ratio, self.clones, self.seed = mask_ratio, clones, seed
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.mask_kind, self.span = mask_kind, span

    @classmethod
    def from_config(
        cls, store: TokenStore | None, blocks: np.ndarray, cfg: Config, tokenizer: TextTokenizer
    ) -> PretrainText:
        """The dataset a text preset describes: block size, masking and seed from ``cfg``,
        special ids from ``tokenizer`` (``store`` may be None where only masks are drawn)."""
        return cls(
            store,  # type: ignore[arg-type]
            blocks,
            cfg.data.block_size,
            cfg.mask.ratio,
            cfg.mask.clones,
            cfg.train.seed,
            tokenizer.bos_id,
            tokenizer.eos_id,
            tokenizer.pad_id,
            mask_kind=cfg.mask.kind,
            span=cfg.mask.block,
        )

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, position = key
        tokens = block_tokens(self.store, self.blocks, index, self.bos_id, self.eos_id)
        return ("ok", tokens, self.masks(len(tokens), position), position)

    def masks(self, length: int, position: int) -> np.ndarray:
        """The ``(M, block_size)`` masks of a block of ``length`` real tokens at ``position``."""
        rng = make_rng(self.seed, position)
        if self.mask_kind == "span":
            masks = np.zeros((self.clones, self.block_size), dtype=bool)
            masks[:, :length] = span_mask(length, self.clones, self.mask_ratio, rng, span=self.span)
            return masks
        return random_mask(self.block_size, self.clones, self.mask_ratio, rng)


def collate_pretrain_text(items: list[tuple], block_size: int, pad_id: int) -> PretrainBatch:
    """Pad blocks to ``block_size`` and stack masks sample-major (row ``b·M + c``).

    Use as ``functools.partial(collate_pretrain_text, block_size=..., pad_id=...)``.

    Returns:
        ``source (B, block_size)`` int64, ``padding_mask (B, block_size)`` True at padding,
        ``mask (B·M, block_size)`` True = masked, ``positions (B,)``, skipped ``(name, reason)``.
    """
    good = [it for it in items if it[0] == "ok"]
    skipped = [(it[1], it[2]) for it in items if it[0] == "skip"]
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return PretrainBatch(empty, empty.bool(), empty, skipped)
    source = np.full((len(good), block_size), pad_id, dtype=np.int64)
    padding = np.ones((len(good), block_size), dtype=bool)
    for b, (_, tokens, _, _) in enumerate(good):
        source[b, : len(tokens)] = tokens
        padding[b, : len(tokens)] = False
    mask = np.concatenate([it[2] for it in good])  # (B·M, block_size)
    return PretrainBatch(
        torch.from_numpy(source),
        torch.from_numpy(mask),
        torch.tensor([it[3] for it in good], dtype=torch.int64),
        skipped,
        padding_mask=torch.from_numpy(padding),
    )
