"""TF-IDF features: the classical text baseline of the text demo.

Word counts over a vocabulary of the training texts' most widespread words, weighted by the
smoothed inverse document frequency ``idf(w) = ln((1 + N) / (1 + df(w))) + 1`` (the default of
scikit-learn's ``TfidfVectorizer``), each row L2-normalized. With a linear probe on top this is
TF-IDF + logistic regression; the vocabulary is capped so the dense matrix stays small.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"(?u)\b\w\w+\b")  # words of 2+ characters, as scikit-learn's default


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class TfIdf:
    """Fit on training texts, then transform any texts to ``(N, V)`` float32 rows.

    Args:
        max_features: keep the words of highest document frequency (ties: alphabetical).
        min_df: drop words in fewer training documents than this.
    """

    def __init__(self, max_features: int = 4000, min_df: int = 2) -> None:
        self.max_features = max_features
        self.min_df = min_df
        self.vocab: dict[str, int] = {}
        self.idf = np.zeros(0, dtype=np.float32)

    def fit(self, texts: Sequence[str]) -> TfIdf:
        df = Counter(w for t in texts for w in set(words(t)))
        kept = sorted((w for w, c in df.items() if c >= self.min_df), key=lambda w: (-df[w], w))
        kept = sorted(kept[: self.max_features])
        self.vocab = {w: i for i, w in enumerate(kept)}
        n = len(texts)
        counts = np.array([df[w] for w in kept], dtype=np.float64)
        self.idf = (np.log((1 + n) / (1 + counts)) + 1).astype(np.float32)
        return self

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.vocab)), dtype=np.float32)
        for r, t in enumerate(texts):
            for w, c in Counter(words(t)).items():
                j = self.vocab.get(w)
                if j is not None:
                    out[r, j] = c
        out *= self.idf
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)
