"""Tests for the fine-tuning metrics (data2vec.finetune.metrics)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from data2vec.finetune.metrics import accuracy, binary_f1, cer, edit_distance, wer


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("kitten", "sitting", 3),  # 2 substitutions + 1 insertion
        ("flaw", "lawn", 2),  # 1 deletion + 1 insertion
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("ab", "ba", 2),  # no transpositions in Levenshtein
        (["the", "cat"], ["a", "cat", "sat"], 2),
    ],
)
def test_edit_distance__hand_examples(a, b, expected) -> None:
    assert edit_distance(a, b) == expected
    assert edit_distance(b, a) == expected


def test_edit_distance__matches_a_recursive_definition() -> None:
    def reference(a: str, b: str) -> int:
        @functools.cache
        def d(i: int, j: int) -> int:
            if i == 0 or j == 0:
                return i + j
            return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

        return d(len(a), len(b))

    rng = np.random.default_rng(0)
    for _ in range(50):
        a = "".join(rng.choice(list("abc"), rng.integers(0, 9)))
        b = "".join(rng.choice(list("abc"), rng.integers(0, 9)))
        assert edit_distance(a, b) == reference(a, b)


def test_cer__corpus_level_sum_of_edits_over_reference_characters() -> None:
    # "abc" -> "abd": 1 edit; "de" -> "d": 1 edit; 5 reference characters.
    assert cer(["abc", "de"], ["abd", "d"]) == pytest.approx(2 / 5)
    assert cer(["a b"], ["ab"]) == pytest.approx(1 / 3)  # the space is a character


def test_wer__corpus_level_sum_of_edits_over_reference_words() -> None:
    # 1 substitution + 1 insertion over 3 + 1 reference words.
    assert wer(["the cat sat", "hi"], ["the bat sat down", "hi"]) == pytest.approx(2 / 4)
    assert wer(["a  b"], ["a b"]) == 0.0  # words split on any whitespace


def test_error_rates__need_as_many_hypotheses_as_references() -> None:
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        cer(["a", "b"], ["a"])


def test_accuracy__fraction_correct() -> None:
    assert accuracy([1, 0, 2, 2], torch.tensor([1, 1, 2, 0])) == 0.5
    assert accuracy([], []) == 0.0


def test_binary_f1__hand_example_and_sklearn() -> None:
    # TP = 2, FP = 1, FN = 1 -> F1 = 4 / 6.
    assert binary_f1([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(4 / 6)
    rng = np.random.default_rng(1)
    p, t = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
    assert binary_f1(p, t) == pytest.approx(f1_score(t, p))


def test_binary_f1__zero_without_any_positive() -> None:
    assert binary_f1([0, 0], [0, 0]) == 0.0
