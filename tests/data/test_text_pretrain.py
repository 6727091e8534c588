"""Token store, document-aware packing, text pretraining samples and batches."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from data2vec.data.text_pretrain import (
    STORE_FILE,
    TOKENS_FILE,
    PretrainText,
    TokenStore,
    block_tokens,
    collate_pretrain_text,
    pack_blocks,
)
from data2vec.data.tokenizer import TextTokenizer
from data2vec.errors import ConfigError

BOS, PAD, EOS = 0, 1, 2


class CharTokenizer:
    """One id per character (``ord + 5``): predictable ids, any vocabulary size."""

    def __init__(self, vocab_size: int = 1000) -> None:
        self.vocab_size = vocab_size

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[ord(c) + 5 for c in t] for t in texts]


def _docs(lengths: list[int]) -> list[str]:
    """Document ``i`` repeats the letter ``chr(65 + i % 26)``, so ids tell documents apart."""
    return [chr(65 + i % 26) * n for i, n in enumerate(lengths)]


def _store(tmp_path: Path, lengths: list[int], **kw) -> TokenStore:
    return TokenStore.build(_docs(lengths), CharTokenizer(), tmp_path / "store", chunk_docs=3, **kw)


def test_store__build_open_round_trip(tmp_path: Path) -> None:
    lengths = [5, 1, 12, 7, 3, 9, 2]
    built = _store(tmp_path, lengths, signature="abc")
    opened = TokenStore.open(tmp_path / "store", signature="abc")
    assert opened is not None
    for store in (built, opened):
        assert store.num_documents == len(lengths) and store.num_tokens == sum(lengths)
        assert store.doc_lengths.tolist() == lengths
        assert isinstance(store.tokens, np.memmap) and not store.tokens.flags.writeable
        for i, text in enumerate(_docs(lengths)):
            assert store.document(i).tolist() == [ord(c) + 5 for c in text]


def test_store__real_tokenizer_documents_decode_back(tmp_path: Path) -> None:
    docs = ["the cat sat", "on the mat 😀", "東京 café"] * 5
    tok = TextTokenizer.train(docs, vocab_size=300)
    store = TokenStore.build(docs, tok, tmp_path, chunk_docs=4)
    assert [tok.decode(store.document(i).tolist()) for i in range(len(docs))] == docs


def test_store__empty_documents_left_out(tmp_path: Path) -> None:
    store = TokenStore.build(["ab", "", "c"], CharTokenizer(), tmp_path)
    assert store.doc_lengths.tolist() == [2, 1]


def test_store__signature_mismatch_gives_none(tmp_path: Path) -> None:
    _store(tmp_path, [3, 4], signature="corpus-v1")
    assert TokenStore.open(tmp_path / "store", signature="corpus-v2") is None
    assert TokenStore.open(tmp_path / "store") is not None  # no signature asked: any store
    assert TokenStore.open(tmp_path / "missing") is None


def test_store__interrupted_rebuild_is_not_taken_as_complete(tmp_path: Path) -> None:
    _store(tmp_path, [3, 4], signature="old")

    def failing():
        yield "abc"
        raise KeyboardInterrupt  # the user stops the build half-way

    with pytest.raises(KeyboardInterrupt):
        TokenStore.build(failing(), CharTokenizer(), tmp_path / "store", chunk_docs=1)
    assert TokenStore.open(tmp_path / "store") is None
    assert TokenStore.open(tmp_path / "store", signature="old") is None


def test_store__truncated_tokens_file_is_rejected(tmp_path: Path) -> None:
    _store(tmp_path, [30, 40])
    path = tmp_path / "store" / TOKENS_FILE
    path.write_bytes(path.read_bytes()[:-2])
    assert TokenStore.open(tmp_path / "store") is None
    (tmp_path / "store" / STORE_FILE).write_text("{", encoding="utf-8")
    assert TokenStore.open(tmp_path / "store") is None


@pytest.mark.parametrize(
    ("vocab", "text", "dtype"), [(65535, "a", np.uint16), (65536, "\U0001f600", np.uint32)]
)
def test_store__dtype_fits_vocabulary(tmp_path: Path, vocab: int, text: str, dtype: type) -> None:
    store = TokenStore.build([text], CharTokenizer(vocab), tmp_path)
    assert store.tokens.dtype == dtype
    assert (tmp_path / TOKENS_FILE).stat().st_size == np.dtype(dtype).itemsize
    assert store.document(0).tolist() == [ord(text) + 5]  # 0x1F600 + 5 > 65535


def test_store__pickles_without_the_tokens(tmp_path: Path) -> None:
    store = _store(tmp_path, [5000, 5000])
    blob = pickle.dumps(store)
    again = pickle.loads(blob)
    assert len(blob) < 2000 and np.array_equal(again.tokens, store.tokens)


def test_pack__exact_fit_and_overflow() -> None:
    # block 10: <s> + (3 + </s>) + (3 + </s>) = 9 fits; <s> + 5 + 5 = 11 does not
    assert pack_blocks(np.array([3, 3]), 10).tolist() == [[0, 6]]
    assert pack_blocks(np.array([4, 4]), 10).tolist() == [[0, 4], [4, 8]]
    assert pack_blocks(np.array([4, 3]), 10).tolist() == [[0, 7]]  # 1 + 5 + 4 = 10


def test_pack__long_document_split_into_own_blocks() -> None:
    # cap = 8 - 2 = 6 content tokens: 20 -> 6, 6, 6, 2; neighbours never share its blocks
    blocks = pack_blocks(np.array([2, 20, 1, 1]), 8)
    assert blocks.tolist() == [[0, 2], [2, 8], [8, 14], [14, 20], [20, 22], [22, 24]]
    assert pack_blocks(np.array([6]), 8).tolist() == [[0, 6]]  # exactly cap: one block


def test_pack__invalid_arguments() -> None:
    with pytest.raises(ConfigError, match="block_size=2"):
        pack_blocks(np.array([1]), 2)
    with pytest.raises(ValueError, match="at least one token"):
        pack_blocks(np.array([3, 0]), 8)
    assert pack_blocks(np.zeros(0, np.int64), 8).shape == (0, 2)


@pytest.mark.parametrize("seed", range(4))
def test_pack__every_token_once_in_order_no_straddling(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    block_size, cap = 16, 14
    lengths = rng.integers(1, 40, size=60)
    store = _store(tmp_path, lengths.tolist())
    blocks = pack_blocks(store.doc_lengths, block_size)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    # Blocks tile the token stream in order: every token exactly once.
    assert blocks[0, 0] == 0 and blocks[-1, 1] == store.num_tokens
    assert (blocks[1:, 0] == blocks[:-1, 1]).all() and (blocks[:, 1] > blocks[:, 0]).all()
    for k, (start, end) in enumerate(blocks.tolist()):
        toks = block_tokens(store, blocks, k, BOS, EOS)
        assert len(toks) <= block_size and toks[0] == BOS and toks[-1] == EOS
        content = toks[1:-1][toks[1:-1] != EOS]
        assert content.tolist() == store.tokens[start:end].tolist()
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        last = int(np.searchsorted(offsets, end, side="left")) - 1
        assert (toks == EOS).sum() == last - first + 1  # one </s> per document piece
        if start not in offsets or end not in offsets:  # a chunk of one long document
            assert first == last and lengths[first] > cap
            assert end - start == cap or end == offsets[first + 1]
        whole_docs = start in offsets and end in offsets
        if whole_docs and last + 1 < len(lengths) and lengths[last + 1] <= cap:
            # Greedy: the next short document did not fit in what this block left free.
            assert len(toks) + lengths[last + 1] + 1 > block_size


def _dataset(tmp_path: Path, **kw) -> PretrainText:
    store = _store(tmp_path, [3, 9, 4, 20, 2])
    args = dict(block_size=12, mask_ratio=0.6, clones=3, seed=7, bos_id=BOS, eos_id=EOS)
    args.update(kw)
    return PretrainText(
        store, pack_blocks(store.doc_lengths, args["block_size"]), pad_id=PAD, **args
    )


def test_dataset__sample_and_mask_counts(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    assert len(ds) == len(ds.blocks)
    status, tokens, masks, position = ds[(1, 42)]
    assert status == "ok" and position == 42 and tokens.dtype == np.int64
    assert masks.shape == (3, 12) and masks.dtype == bool
    assert (masks.sum(1) == 12 - int(12 * (1 - 0.6))).all()  # exactly 8 masked per row


def test_dataset__masks_depend_on_seed_and_position_only(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    assert np.array_equal(ds[(0, 5)][2], ds[(3, 5)][2])
    assert not np.array_equal(ds[(0, 5)][2], ds[(0, 6)][2])
    other = _dataset(tmp_path / "b", seed=8)
    assert not np.array_equal(ds[(0, 5)][2], other[(0, 5)][2])


def test_dataset__invalid_mask_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mask_ratio"):
        _dataset(tmp_path, mask_ratio=1.0)
    with pytest.raises(ConfigError, match="clones"):
        _dataset(tmp_path, clones=0)


def test_collate__shapes_padding_and_sample_major_masks(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    items = [ds[(0, 10)], ("skip", "doc.txt", "why"), ds[(2, 11)]]
    collate = functools.partial(collate_pretrain_text, block_size=12, pad_id=PAD)
    batch = collate(items)
    assert batch.source.shape == (2, 12) and batch.source.dtype == torch.int64
    assert batch.mask.shape == (6, 12) and batch.padding_mask.shape == (2, 12)
    assert batch.positions.tolist() == [10, 11] and batch.skipped == [("doc.txt", "why")]
    for b, item in enumerate((items[0], items[2])):
        n = len(item[1])
        assert batch.source[b, :n].tolist() == item[1].tolist()
        assert (batch.source[b, n:] == PAD).all()
        assert batch.padding_mask[b].tolist() == [False] * n + [True] * (12 - n)
        for c in range(3):
            assert np.array_equal(batch.mask[b * 3 + c].numpy(), item[2][c])


def test_collate__only_skips_gives_empty_batch() -> None:
    batch = collate_pretrain_text([("skip", "a", "r")], block_size=8, pad_id=PAD)
    assert len(batch) == 0 and batch.skipped == [("a", "r")]
