"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers", §4.1 "k-NN" and its ``eval_knn.py``, following Wu et al. 2018): features are
L2-normalised, each test point takes its ``k`` most cosine-similar training points, and each
neighbour votes for its label with weight ``exp(sim / T)``; the class with the largest summed
weight wins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from data2vec.evaluate.linear_probe import validate_features_labels


@dataclass
class KnnResult:
    """Outcome of :func:`knn_classify`.

    Attributes:
        accuracy: Test accuracy, a fraction in [0, 1].
        k: Neighbours per test point.
        temperature: Vote temperature T.
        n_train: Number of training (reference) points.
        n_test: Number of test points.
    """

    accuracy: float
    k: int
    temperature: float
    n_train: int
    n_test: int

    def to_dict(self) -> dict:
        """A JSON-serialisable copy."""
        return asdict(self)


def _check_options(k: int, temperature: float, chunk_size: int, n_train: int) -> None:
    if not 1 <= k <= n_train:
        raise ValueError(f"k must be in [1, n_train={n_train}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _predict_chunks(
    train_n: Tensor, train_y: Tensor, test_n: Tensor, k: int, temperature: float,
    n_classes: int, chunk_size: int,
) -> Tensor:  # fmt: skip
    """Predictions for L2-normalised ``test_n`` against normalised ``train_n``, chunk by chunk."""
    preds = []
    # only a (chunk_size, n_train) similarity block lives at a time: 1024 x 60k floats = 245 MB
    for start in range(0, test_n.shape[0], chunk_size):
        sims = test_n[start : start + chunk_size] @ train_n.T
        top_sims, top_idx = sims.topk(k, dim=1)
        # exp((s - s_max) / T) is exp(s / T) scaled by a per-row constant, so the argmax is the
        # same; the shift keeps small temperatures from overflowing (exp(1 / 0.001) = inf)
        weights = ((top_sims - top_sims[:, :1]) / temperature).exp()
        votes = torch.zeros(
            top_sims.shape[0], n_classes, dtype=weights.dtype, device=weights.device
        )
        votes.scatter_add_(1, train_y[top_idx], weights)
        preds.append(votes.argmax(dim=1))  # ties go to the lowest class id
    return torch.cat(preds)


def knn_predict(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Predict a label for each row of ``test_x`` by temperature-weighted cosine kNN.

    Args:
        train_x: ``(N, D)`` float reference features.
        train_y: ``(N,)`` integer labels.
        test_x: ``(M, D)`` float query features.
        k: Neighbours per query (DINO uses 20).
        temperature: T in the vote weight ``exp(sim / T)`` (DINO uses 0.07).
        chunk_size: Queries processed at once; bounds memory to ``chunk_size × N`` sims.

    Returns:
        ``(M,)`` int64 predicted labels, on ``train_x``'s device.

    Raises:
        ValueError: on malformed inputs (see
            :func:`~data2vec.evaluate.linear_probe.validate_features_labels`) or options.
    """
    n_classes = validate_features_labels(train_x, train_y, test_x, None)
    _check_options(k, temperature, chunk_size, train_x.shape[0])
    # float32 at least: half-precision similarities would make near-ties arbitrary
    dtype = torch.float64 if train_x.dtype == torch.float64 else torch.float32
    train_n = F.normalize(train_x.to(dtype), dim=1)
    test_n = F.normalize(test_x.to(train_x.device, dtype), dim=1)
    return _predict_chunks(
        train_n,
        train_y.to(train_x.device, torch.int64),
        test_n,
        k,
        temperature,
        n_classes,
        chunk_size,
    )


def knn_classify(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> KnnResult:
    """Test accuracy of temperature-weighted cosine kNN (see :func:`knn_predict`).

    Raises:
        ValueError: on malformed inputs or options, naming what is wrong.
    """
    validate_features_labels(train_x, train_y, test_x, test_y)
    preds = knn_predict(
        train_x, train_y, test_x, k=k, temperature=temperature, chunk_size=chunk_size
    )
    accuracy = (preds.cpu() == test_y.cpu()).double().mean().item()
    return KnnResult(
        accuracy=accuracy,
        k=k,
        temperature=temperature,
        n_train=int(train_x.shape[0]),
        n_test=int(test_x.shape[0]),
    )
