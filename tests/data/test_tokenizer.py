"""Byte-level BPE tokenizer: special ids, exact round trips, save/load, truncation, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from data2vec.data.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, TextTokenizer
from data2vec.errors import ConfigError, DataError, DataNotFoundError

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a café in São Paulo serves crème brûlée",
    "東京は日本の首都です",
    "emoji 😀 and 🚀 travel well",
    "the dog and the fox are friends",
] * 30


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(iter(CORPUS), vocab_size=400)


def test_special_token_ids__fairseq_order(tok: TextTokenizer) -> None:
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert [tok.decode([i]) for i in range(5)] == [""] * 5  # specials are dropped on decode


def test_train__vocab_at_most_requested_and_holds_all_bytes(tok: TextTokenizer) -> None:
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 400  # some merges were learned
    assert tok.unk_id not in tok.encode("\x00\x7f ÿ unseen ☃ 𝄞")


@pytest.mark.parametrize(
    "text",
    [
        "hello",
        " leading space",
        "two  spaces\tand a tab\nand a newline\n",
        "naïve façade, Ångström, ﬁ ligature",
        "中文字符 and 日本語 mixed",
        "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
        "a literal </s> and <mask> stay text",
        "",
    ],
)
def test_round_trip__exact_for_unicode(tok: TextTokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_encode__literal_special_tokens_never_become_special_ids(tok: TextTokenizer) -> None:
    ids = tok.encode("<s> x </s> <pad> <unk> <mask>")
    assert min(ids) >= len(SPECIAL_TOKENS)


def test_pickle__keeps_ids_and_literal_specials_as_text(tok: TextTokenizer) -> None:
    again = pickle.loads(pickle.dumps(tok))
    text = "the fox </s> <mask> 😀"
    assert again.encode(text) == tok.encode(text) and min(again.encode(text)) >= 5


def test_encode_batch__same_as_encode(tok: TextTokenizer) -> None:
    texts = ["the fox", "", "東京 😀", " x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_encode_for_model__truncates_and_adds_bos_eos(tok: TextTokenizer) -> None:
    text = " ".join(CORPUS[:5])
    ids = tok.encode(text)
    out = tok.encode_for_model(text, max_len=10)
    assert out == [tok.bos_id, *ids[:8], tok.eos_id]
    short = tok.encode_for_model("dog", max_len=10)
    assert short == [tok.bos_id, *tok.encode("dog"), tok.eos_id]  # no padding
    with pytest.raises(ConfigError, match="max_len"):
        tok.encode_for_model("dog", max_len=2)


def test_train__vocab_size_too_small__config_error_names_field() -> None:
    with pytest.raises(ConfigError, match="vocab_size=100"):
        TextTokenizer.train(iter(CORPUS), vocab_size=100)


def test_train__consumes_a_generator_once() -> None:
    seen = []

    def gen():
        for t in CORPUS:
            seen.append(t)
            yield t

    tok = TextTokenizer.train(gen(), vocab_size=300)
    assert len(seen) == len(CORPUS) and tok.vocab_size <= 300


@pytest.mark.parametrize("target", ["dir", "file.json"])
def test_save_load__identical_ids(tok: TextTokenizer, tmp_path: Path, target: str) -> None:
    written = tok.save(tmp_path / target)
    expected = tmp_path / "dir" / TOKENIZER_FILE if target == "dir" else tmp_path / target
    assert written == expected and written.is_file()
    again = TextTokenizer.load(tmp_path / target)
    texts = [*CORPUS[:5], "a literal </s> stays text"]
    assert again.encode_batch(texts) == tok.encode_batch(texts)
    assert again.vocab_size == tok.vocab_size and again.mask_id == 4
    assert not list(tmp_path.rglob("*.tmp"))


def test_load__missing__not_found_with_path(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "nope")):
        TextTokenizer.load(tmp_path / "nope")


def test_load__corrupt__data_error_with_path(tmp_path: Path) -> None:
    bad = tmp_path / TOKENIZER_FILE
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=str(bad)):
        TextTokenizer.load(tmp_path)


def test_load__special_tokens_at_other_ids__data_error(tmp_path: Path) -> None:
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<mask>"]
    )
    raw.train_from_iterator(CORPUS, trainer)
    raw.save(str(tmp_path / "other.json"))
    with pytest.raises(DataError, match=r"ids 0\.\.4"):
        TextTokenizer.load(tmp_path / "other.json")
