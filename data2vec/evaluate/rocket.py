"""A classical time-series baseline: random dilated convolution kernels and a ridge classifier.

Written from the description in Dempster, Schmidt & Webb 2021, "MiniRocket: A Very Fast (Almost)
Deterministic Transform for Time Series Classification" (KDD), §3 (ROCKET: Dempster, Petitjean &
Webb 2020, same journal line of work):

* 84 kernels of length 9 whose weights are -1 except three positions of 2 (all C(9, 3)
  choices), so every kernel sums to zero (§3.2);
* dilations ``floor(2^e)`` for ``e`` evenly spaced in ``[0, log2((L - 1) / 8)]``, at most 32,
  duplicates merged (§3.3);
* per kernel and dilation several biases, drawn as quantiles of that kernel's output on a random
  training series, the quantile levels a low-discrepancy sequence ``(i * φ) mod 1`` (§3.4);
* half of the kernel/dilation pairs zero-pad the input to its full length, the others use only
  the positions where the kernel fits (§3.5);
* one feature per kernel, dilation and bias: PPV, the proportion of positive values of
  ``conv - bias`` (§3.1);
* multivariate input: each kernel/dilation sums its convolution over a random subset of the
  channels (the authors' multivariate variant);
* a ridge classifier with the penalty chosen by leave-one-out cross-validation (§4.1); the paper
  suggests logistic regression for large training sets, which is what
  :func:`~data2vec.evaluate.linear_probe.linear_probe` on the same features is.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

KERNEL_LENGTH = 9
MAX_DILATIONS = 32
GOLDEN = (1 + math.sqrt(5)) / 2
# Ridge penalties tried by leave-one-out CV: 10^-3 .. 10^3, the range of the paper's §4.1.
RIDGE_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-3, 3, 10))


def kernel_weights() -> Tensor:
    """The 84 length-9 kernels: -1 everywhere, 2 at three positions. ``(84, 1, 9)`` float32."""
    rows = []
    for twos in itertools.combinations(range(KERNEL_LENGTH), 3):
        w = -torch.ones(KERNEL_LENGTH)
        w[list(twos)] = 2.0
        rows.append(w)
    return torch.stack(rows).unsqueeze(1)


def dilations_for(length: int, max_dilations: int = MAX_DILATIONS) -> list[int]:
    """Exponentially spaced dilations so the widest kernel spans about the whole series."""
    top = math.log2(max((length - 1) / (KERNEL_LENGTH - 1), 1.0))
    exps = np.linspace(0.0, top, max_dilations)
    return sorted({int(2**e) for e in exps})


@dataclass
class RandomKernels:
    """A fitted transform (see the module docstring).

    Attributes:
        dilations: ``(n_d,)`` dilation of each group.
        channels: per dilation, ``(84, C)`` float 0/1 mask of the channels each kernel sums.
        biases: per dilation, ``(84, n_b)`` biases of each kernel.
        padded: per dilation, ``(84,)`` bool, True = zero-padded to the full length.
    """

    dilations: list[int]
    channels: list[Tensor]
    biases: list[Tensor]
    padded: list[Tensor]

    @property
    def num_features(self) -> int:
        return sum(b.numel() for b in self.biases)

    def transform(self, x: np.ndarray, chunk: int = 64) -> np.ndarray:
        """``x: (N, C, L)`` -> PPV features ``(N, num_features)`` float32."""
        out = []
        for start in range(0, len(x), chunk):
            xb = torch.from_numpy(np.ascontiguousarray(x[start : start + chunk], np.float32))
            parts = [
                _ppv(_convolve(xb, d, self.channels[i], self.padded[i]), self.biases[i])
                for i, d in enumerate(self.dilations)
            ]
            out.append(torch.cat(parts, dim=1).numpy())
        return np.concatenate(out)


def _convolve(x: Tensor, dilation: int, channels: Tensor, padded: Tensor) -> Tensor:
    """All 84 kernels at one dilation, summed over each kernel's channels.

    ``x: (N, C, L)`` -> ``(N, 84, L)``; positions where an unpadded kernel does not fit are NaN.
    """
    N, C, L = x.shape
    half = dilation * (KERNEL_LENGTH // 2)
    y = F.conv1d(x.reshape(N * C, 1, L), kernel_weights(), padding=half, dilation=dilation)
    y = torch.einsum("nckl,kc->nkl", y.reshape(N, C, -1, L), channels)  # (N, 84, L)
    if half > 0 and 2 * half < L:  # an unpadded kernel sees only positions it fully covers
        edge = torch.zeros(L, dtype=torch.bool)
        edge[:half], edge[L - half :] = True, True
        y = y.masked_fill(edge[None, None, :] & ~padded[None, :, None], float("nan"))
    return y


def _ppv(y: Tensor, biases: Tensor) -> Tensor:
    """Proportion of positive values of ``y - bias``: ``(N, K, L)``, ``(K, B)`` -> ``(N, K·B)``."""
    valid = ~torch.isnan(y)
    pos = (y.unsqueeze(-1) > biases[None, :, None, :]) & valid.unsqueeze(-1)  # (N, K, L, B)
    ppv = pos.sum(2).float() / valid.sum(2, keepdim=True).clamp_min(1).float()
    return ppv.reshape(y.shape[0], -1)


def fit_random_kernels(x: np.ndarray, num_features: int = 10_000, seed: int = 0) -> RandomKernels:
    """Draw dilations, channel subsets, padding and biases from training series ``x: (N, C, L)``.

    About ``num_features`` features (a multiple of 84): ``num_features // 84`` biases per
    kernel, spread over the dilations, the first dilations taking the remainder.
    """
    rng = np.random.default_rng(seed)
    N, C, L = x.shape
    per_kernel = max(1, num_features // 84)
    dilations = dilations_for(L, min(MAX_DILATIONS, per_kernel))
    counts = [per_kernel // len(dilations)] * len(dilations)
    for i in range(per_kernel % len(dilations)):
        counts[i] += 1
    kernels = RandomKernels([], [], [], [])
    level = 0
    for i, (d, nb) in enumerate(zip(dilations, counts)):
        if nb == 0:
            continue
        # channel subsets: size 2^U(0, log2(min(C, 9) + 1)) - 1, at least 1 (multivariate ROCKET)
        sizes = np.floor(2 ** rng.uniform(0, math.log2(min(C, 9) + 1), 84)).astype(int) - 1
        mask = np.zeros((84, C), np.float32)
        for k, size in enumerate(np.clip(sizes, 1, C)):
            mask[k, rng.choice(C, size, replace=False)] = 1.0
        padded = torch.from_numpy((np.arange(84) + i) % 2 == 0)
        channels = torch.from_numpy(mask)
        example = torch.from_numpy(np.ascontiguousarray(x[rng.integers(N)][None], np.float32))
        y = _convolve(example, d, channels, padded)[0]  # (84, L)
        q = torch.tensor([((level + j + 1) * GOLDEN) % 1.0 for j in range(nb)])
        level += nb
        biases = torch.stack([torch.nanquantile(row, q) for row in y])  # (84, nb)
        kernels.dilations.append(d)
        kernels.channels.append(channels)
        kernels.biases.append(biases)
        kernels.padded.append(padded)
    return kernels


@dataclass
class RidgeResult:
    """Ridge classifier outcome: test ``accuracy``, the chosen ``alpha`` and its LOO accuracy."""

    accuracy: float
    alpha: float
    loo_accuracy: float


def ridge_classify(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    alphas: tuple[float, ...] = RIDGE_ALPHAS,
) -> RidgeResult:
    """Ridge regression on ±1 one-hot targets, the penalty chosen by leave-one-out error.

    Features are standardized with the training statistics; the intercept is unpenalized.
    With the thin SVD ``X = U Σ Vᵀ`` of the centred features the hat matrix is
    ``H = 11ᵀ/N + U diag(σ² / (σ² + α)) Uᵀ`` and the leave-one-out residual of row ``i`` is
    ``e_i / (1 - H_ii)`` (Hastie, Tibshirani & Friedman, *Elements of Statistical Learning*,
    eq. 7.52, which holds for any penalized least squares fit), so every α costs one matrix
    product. As scikit-learn's ``RidgeClassifierCV`` (the classifier of the MiniRocket paper),
    α minimizes the mean squared leave-one-out residual (ties: the smaller α).
    ``train_x: (N, P)``, ``train_y: (N,)`` in ``[0, n_classes)``.
    """
    X = torch.from_numpy(train_x).double()
    mean, std = X.mean(0), X.std(0, unbiased=False).clamp_min(1e-6)
    X, T = (X - mean) / std, (torch.from_numpy(test_x).double() - mean) / std
    y = torch.from_numpy(train_y).long()
    Y = -torch.ones(len(y), int(max(y.max(), test_y.max())) + 1, dtype=torch.float64)
    Y[torch.arange(len(y)), y] = 1.0
    y_mean = Y.mean(0)
    Yc = Y - y_mean  # centred targets and features: the intercept is y_mean
    U, sigma, Vt = torch.linalg.svd(X, full_matrices=False)  # (N, r), (r,), (r, P)
    UtY = U.T @ Yc
    best: tuple[float, float, float] | None = None  # (LOO squared error, alpha, LOO accuracy)
    for alpha in alphas:
        shrink = sigma**2 / (sigma**2 + alpha)
        residual = Yc - U @ (shrink[:, None] * UtY)  # (N, n_classes)
        h = (U**2 * shrink).sum(1) + 1.0 / len(y)  # diag of the hat matrix, intercept included
        loo = residual / (1 - h).clamp_min(1e-12)[:, None]
        error = float((loo**2).mean())
        acc = float(((Y - loo).argmax(1) == y).double().mean())
        if best is None or error < best[0] - 1e-12:
            best = (error, alpha, acc)
    assert best is not None
    _, alpha, loo_acc = best
    coef = Vt.T @ ((sigma / (sigma**2 + alpha))[:, None] * UtY)  # (P, n_classes)
    pred = (T @ coef + y_mean).argmax(1).numpy()
    return RidgeResult(float((pred == test_y).mean()), float(alpha), loo_acc)
