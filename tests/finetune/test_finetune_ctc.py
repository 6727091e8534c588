"""Tests for CTC decoding, loss and vocabulary (data2vec.finetune.ctc)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data2vec.errors import DataError
from data2vec.finetune.ctc import (
    BLANK,
    UNK,
    WORD_SEP,
    CharVocab,
    ctc_greedy_decode,
    ctc_loss,
    frame_lengths,
)


def test_char_vocab__build_encode_decode() -> None:
    vocab = CharVocab.build(["Hello  world", "hi"])
    assert vocab.tokens == [BLANK, UNK, WORD_SEP, "d", "e", "h", "i", "l", "o", "r", "w"]
    ids = vocab.encode("  hi   World ")
    assert [vocab.tokens[i] for i in ids] == ["h", "i", "|", "w", "o", "r", "l", "d"]
    assert vocab.decode(ids) == "hi world"
    assert vocab.decode(vocab.encode("why")) == "wh\u2047"  # 'y' is unknown
    assert vocab.decode([0, 5, 0, 2, 2, 6]) == "h i"  # blanks dropped, separators merged


def test_char_vocab__save_load_round_trip(tmp_path) -> None:
    vocab = CharVocab.build(["Ab c"], lowercase=False)
    loaded = CharVocab.load(vocab.save(tmp_path / "vocab.json"))
    assert loaded.tokens == vocab.tokens
    assert loaded.lowercase is False
    assert loaded.encode("Ab c") == vocab.encode("Ab c")


def test_char_vocab__blank_must_be_first() -> None:
    with pytest.raises(DataError, match="<blank>"):
        CharVocab([UNK, BLANK, WORD_SEP, "a"])


def _one_hot_logits(frames: list[list[int]], vocab_size: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(frames), vocab_size).float() * 10.0  # (B, T, V)


def test_ctc_greedy_decode__collapses_repeats_and_drops_blanks() -> None:
    # blank = 0, a = 1, b = 2: frames [a a _ a b b _] -> "aab".
    logits = _one_hot_logits([[1, 1, 0, 1, 2, 2, 0], [2, 0, 2, 1, 1, 1, 1]], 3)
    assert ctc_greedy_decode(logits) == [[1, 1, 2], [2, 2, 1]]


def test_ctc_greedy_decode__ignores_frames_past_the_length() -> None:
    logits = _one_hot_logits([[1, 1, 0, 1, 2, 2, 0], [2, 0, 2, 1, 1, 1, 1]], 3)
    assert ctc_greedy_decode(logits, torch.tensor([4, 2])) == [[1, 1], [2]]


def test_ctc_loss__hand_computed_probability() -> None:
    # T = 2 frames, labels {blank, a}, target "a": the alignments are aa, a_, _a.
    logits = torch.tensor([[[0.3, -0.2], [1.0, 0.5]]])  # (1, 2, 2)
    p = logits.softmax(-1)[0]
    (b1, a1), (b2, a2) = p.tolist()
    expected = -math.log(a1 * a2 + a1 * b2 + b1 * a2)
    loss = ctc_loss(
        logits, torch.tensor([2]), torch.tensor([[1]]), torch.tensor([1]), reduction="sum"
    )
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_ctc_loss__padded_batch_matches_per_utterance_f_ctc_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4)
    logits[1, 4:] = 1e4  # padding frames hold garbage that must not matter
    lengths = torch.tensor([6, 4])
    targets = torch.tensor([[1, 2, 2], [3, 0, 0]])
    target_lengths = torch.tensor([3, 1])
    got = ctc_loss(logits, lengths, targets, target_lengths, reduction="none")
    for b in range(2):
        T, S = int(lengths[b]), int(target_lengths[b])
        log_probs = logits[b, :T].log_softmax(-1)[:, None]  # (T, 1, V)
        ref = F.ctc_loss(log_probs, targets[b : b + 1, :S], [T], [S], reduction="sum")
        assert float(got[b]) == pytest.approx(float(ref), rel=1e-5)
    mean = ctc_loss(logits, lengths, targets, target_lengths)  # per target label, batch mean
    assert float(mean) == pytest.approx(float((got / target_lengths).mean()), rel=1e-6)


def test_ctc_loss__impossible_alignment_is_finite() -> None:
    # "aa" needs 3 frames (a _ a); 2 frames cannot hold it: inf -> 0 (zero_infinity).
    logits = torch.randn(1, 2, 3, requires_grad=True)
    loss = ctc_loss(logits, torch.tensor([2]), torch.tensor([[1, 1]]), torch.tensor([2]))
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert torch.isfinite(logits.grad).all()


def test_ctc_loss__lengths_longer_than_the_logits_are_refused() -> None:
    with pytest.raises(ValueError, match="exceed"):
        ctc_loss(torch.randn(1, 2, 3), torch.tensor([3]), torch.tensor([[1]]), torch.tensor([1]))


def test_frame_lengths__from_padding_mask_or_all_frames() -> None:
    pad = torch.tensor([[False, False, True], [False, False, False]])
    assert frame_lengths(pad, 2, 3).tolist() == [2, 3]
    assert frame_lengths(None, 2, 3).tolist() == [3, 3]
