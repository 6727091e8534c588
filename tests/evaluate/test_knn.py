"""Tests for DINO-style weighted kNN (data2vec.evaluate.knn)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from data2vec.evaluate.knn import knn_classify, knn_predict


def _reference_knn(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int, temperature: float
) -> np.ndarray:
    """Brute force: cosine sims, full argsort, exp(sim / T) votes, argmax per test point."""
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    te = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    n_classes = int(train_y.max()) + 1
    preds = []
    for sims in te @ tr.T:
        nearest = np.argsort(-sims)[:k]
        votes = np.zeros(n_classes)
        for j in nearest:
            votes[train_y[j]] += np.exp(sims[j] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_matches_numpy_brute_force(temperature: float) -> None:
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(300, 8)), rng.normal(size=(120, 8))
    train_y = rng.integers(0, 4, size=300)
    expected = _reference_knn(train_x, train_y, test_x, k=5, temperature=temperature)
    got = knn_predict(
        torch.tensor(train_x), torch.tensor(train_y), torch.tensor(test_x),
        k=5, temperature=temperature,
    )  # fmt: skip
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expected)
    # float32 features (the usual case) agree too
    got32 = knn_predict(
        torch.tensor(train_x).float(), torch.tensor(train_y), torch.tensor(test_x).float(),
        k=5, temperature=temperature,
    )  # fmt: skip
    np.testing.assert_array_equal(got32.numpy(), expected)


def test_hand_computed_example() -> None:
    # Unit vectors on the axes: a=(1,0) class 0, b=(0,1) class 1, c=(0,-1) class 1,
    # d=(-1,0) class 2. Query q1=(1, 0.2): cos to a, b, c, d = .98, .20, -.20, -.98, so its
    # 3 neighbours are a (class 0) and b, c (class 1). With T=0.07 a's weight e^14.0 outweighs
    # e^2.8 + e^-2.8, so q1 -> 0; with T=100 all weights are ~1 and the majority wins: q1 -> 1.
    # Query q2=(-0.2, 1): neighbours b (.98, class 1), d (.20, class 2), a (-.20, class 0):
    # b has the largest weight at either temperature, so q2 -> 1.
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 1, 2])
    test_x = torch.tensor([[1.0, 0.2], [-0.2, 1.0]])
    sharp = knn_predict(train_x, train_y, test_x, k=3, temperature=0.07)
    flat = knn_predict(train_x, train_y, test_x, k=3, temperature=100.0)
    assert sharp.tolist() == [0, 1]
    assert flat.tolist() == [1, 1]
    # k=1 is plain nearest neighbour; feature scale must not matter (cosine similarity)
    assert knn_predict(train_x * 5, train_y, test_x * 0.1, k=1).tolist() == [0, 1]


def test_chunk_size_does_not_change_predictions() -> None:
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(200, 6, generator=g), torch.randn(53, 6, generator=g)
    train_y = torch.randint(0, 5, (200,), generator=g)
    preds = [knn_predict(train_x, train_y, test_x, k=7, chunk_size=c) for c in (1, 10, 53, 4096)]
    for p in preds[1:]:
        assert torch.equal(p, preds[0])


def test_tiny_temperature_does_not_overflow() -> None:
    train_x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    train_y = torch.tensor([0, 1, 1])
    # exp(1 / 1e-4) overflows; the max-shifted weights must still pick the nearest point
    assert knn_predict(train_x, train_y, torch.tensor([[1.0, 0.1]]), k=3, temperature=1e-4) == 0


def test_digits_accuracy() -> None:
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:1347], perm[1347:]
    result = knn_classify(
        torch.tensor(x[tr]).float(), torch.tensor(y[tr]),
        torch.tensor(x[te]).float(), torch.tensor(y[te]), k=5,
    )  # fmt: skip
    assert result.accuracy >= 0.95
    assert (result.k, result.temperature, result.n_train, result.n_test) == (5, 0.07, 1347, 450)
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "k must be in"),
        ({"k": 21}, "k must be in"),
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_options_raise(kwargs: dict, message: str) -> None:
    x, y = torch.randn(20, 4), torch.arange(20) % 2
    with pytest.raises(ValueError, match=message):
        knn_classify(x, y, x, y, **kwargs)


def test_bad_inputs_raise() -> None:
    x, y = torch.randn(20, 4), torch.arange(20) % 2
    with pytest.raises(ValueError, match="feature dimensions differ"):
        knn_classify(x, y, x[:, :2], y)
    with pytest.raises(ValueError, match="test_y has 3 labels for 20"):
        knn_classify(x, y, x, y[:3])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="test_x has 1 non-finite"):
        knn_classify(x, y, bad, y)
