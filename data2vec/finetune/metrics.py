"""Supervised evaluation metrics: edit distance, CER/WER, accuracy and binary F1.

CER and WER are corpus-level, as in wav2vec 2.0 / fairseq: the sum of edit distances over the
sum of reference lengths (not a mean of per-utterance rates, which over-weights short ones).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch


def edit_distance(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning a into b.

    Dynamic programming over one row at a time (``O(len(a)·len(b))`` time, ``O(len(b))``
    memory): ``row[j]`` is the distance between the prefix ``a[:i]`` and ``b[:j]``.
    """
    if len(a) < len(b):  # keep the row short; the distance is symmetric
        a, b = b, a
    row = list(range(len(b) + 1))  # distance from the empty prefix of a
    for i, x in enumerate(a, start=1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            substitute = diagonal + (x != y)
            diagonal = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, substitute)  # delete, insert, substitute
    return row[-1]


def _error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> float:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    edits = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    total = sum(len(r) for r in refs)
    # All-empty references: every hypothesis token is an error, counted against a length of 1.
    return edits / max(total, 1)


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Character error rate: total character edits / total reference characters (spaces count)."""
    return _error_rate(list(refs), list(hyps))


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate: total word edits / total reference words (words split on whitespace)."""
    return _error_rate([r.split() for r in refs], [h.split() for h in hyps])


def _as_array(x: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1)


def accuracy(
    preds: Sequence[int] | np.ndarray | torch.Tensor,
    targets: Sequence[int] | np.ndarray | torch.Tensor,
) -> float:
    """Fraction of predictions equal to their target (0.0 for an empty set)."""
    p, t = _as_array(preds), _as_array(targets)
    if p.shape != t.shape:
        raise ValueError(f"{p.shape[0]} predictions but {t.shape[0]} targets")
    return float((p == t).mean()) if len(t) else 0.0


def binary_f1(
    preds: Sequence[int] | np.ndarray | torch.Tensor,
    targets: Sequence[int] | np.ndarray | torch.Tensor,
    positive: int = 1,
) -> float:
    """F1 of the ``positive`` class: ``2·TP / (2·TP + FP + FN)``.

    0.0 when there is no positive prediction and no positive target (scikit-learn's
    ``zero_division=0``).
    """
    p, t = _as_array(preds) == positive, _as_array(targets) == positive
    if p.shape != t.shape:
        raise ValueError(f"{p.shape[0]} predictions but {t.shape[0]} targets")
    tp = int((p & t).sum())
    wrong = int((p ^ t).sum())  # FP + FN
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0
