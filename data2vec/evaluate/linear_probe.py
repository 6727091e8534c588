"""Linear probing of frozen features with a one-pass grid of logistic-regression heads.

The protocol follows the linear evaluation of DINOv2 (Oquab et al. 2023, "DINOv2: Learning
Robust Visual Features without Supervision", linear probing, and its ``dinov2/eval/linear.py``):
many linear heads, one per hyper-parameter setting, are trained together on the same
mini-batches, and the best one on a held-out validation split is kept. Each head is a
multinomial logistic regression (softmax cross-entropy) on standardized features with an L2
penalty ``(wd / 2) * ||W||²`` on the weights (not the bias).

Optimiser: SGD with momentum 0.9 and a cosine learning-rate decay to zero (Loshchilov & Hutter
2017, "SGDR"), as in DINOv2's linear evaluation. We prefer it to AdamW here because

* with the penalty added to the gradient (coupled L2) each head minimises a fixed, convex
  objective — regularised multinomial logistic regression — so ``weight_decay`` means the same as
  scikit-learn's ``C = 1 / (weight_decay * n_samples)``; AdamW's decoupled decay has no such
  objective;
* standardized features make the problem well conditioned, where plain SGD converges well;
* it keeps one state tensor per head instead of two, which matters when K heads share memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

# Measured on standardized 60k x 192 synthetic 10-class features (scikit-learn's lbfgs optimum:
# 0.951 test accuracy) and on load_digits, 2 CPU cores:
# * batch 1024 matched batch 256 in accuracy (0.949 after 30 epochs) at half the wall time
#   (7-8 s vs 16 s with OMP_WAIT_POLICY=PASSIVE): per-step overhead dominates small matmuls;
# * 30 epochs were within 0.002 of the optimum; 60 epochs gained 0.001 for twice the time;
# * at batch 1024 the best peak lr was 1-10 on the 60k set and 0.3 on digits, so the grid spans
#   0.03-10 (lr grows with batch size, Goyal et al. 2017). With fewer than ~10 batches per epoch
#   (a few thousand rows) lower ``batch_size`` or raise ``epochs``: 30 full-batch steps are few.
DEFAULT_LRS: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
# L2 coefficients: 0 plus the range around scikit-learn's default C=1, i.e. wd = 1 / n_samples for
# n between 1e3 and 1e5; 1e-2 always lost in our measurements.
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3)
DEFAULT_EPOCHS = 30
DEFAULT_BATCH_SIZE = 1024
# Small training sets get more epochs so every head takes at least this many SGD steps: 30
# epochs of a 2,500-row set at batch 1024 are only 90 steps, and on ill-conditioned features
# the probe then scored 12 % where scikit-learn's converged solver scored 40 % (speech demo).
DEFAULT_MIN_STEPS = 1000
MOMENTUM = 0.9
INIT_STD = 0.01  # DINOv2 initialises its linear heads with N(0, 0.01²) and a zero bias
STD_EPS = 1e-6  # floor for the per-feature std, so constant features map to 0 instead of inf
# Softmax probabilities below 2^-100 are set to zero before they enter a product. Heads with
# large learning rates grow confident, and their smallest probabilities fall below float32's
# normal range (1.2e-38); x86 CPUs handle such subnormal operands in microcode, and the products
# reading them ran 2.5x slower after two epochs, up to 10x later: the text demo's probe of
# 4000-d TF-IDF features took 12 minutes. torch.set_flush_denormal only reaches the calling
# thread, not the other OpenMP workers. A probability under 2^-100 changes a gradient by less
# than float32 resolves, so the heads learn the same.
MIN_PROBABILITY = 2.0**-100


@dataclass
class ProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        accuracy: Test accuracy of the chosen setting retrained on the full training split.
        val_accuracy: Accuracy of the chosen setting on the held-out validation split.
        lr: Chosen peak learning rate.
        weight_decay: Chosen L2 coefficient.
        n_train: Size of the full training split (train + validation).
        n_test: Size of the test split.
        n_classes: Number of classes (max label + 1 over train and test).
        grid: One ``{"lr", "weight_decay", "val_accuracy"}`` dict per setting tried.
        epochs: Passes over the data used for the grid and the retrain.
    """

    accuracy: float
    val_accuracy: float
    lr: float
    weight_decay: float
    n_train: int
    n_test: int
    n_classes: int
    grid: list[dict]
    epochs: int = DEFAULT_EPOCHS

    def to_dict(self) -> dict:
        """A JSON-serialisable copy."""
        return asdict(self)


@dataclass
class LinearHeads:
    """K linear classifiers stacked into one tensor, as trained by :func:`train_linear_heads`.

    Attributes:
        weight: ``(K, D, C)``.
        bias: ``(K, C)``.
    """

    weight: Tensor
    bias: Tensor

    def logits(self, x: Tensor) -> Tensor:
        """``x: (M, D)`` -> ``(K, M, C)``, every head applied to every row."""
        return torch.einsum("md,kdc->kmc", x, self.weight) + self.bias[:, None, :]

    def predict(self, x: Tensor) -> Tensor:
        """``x: (M, D)`` -> ``(K, M)`` predicted class per head and row."""
        return self.logits(x).argmax(dim=-1)


def validate_features_labels(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor | None
) -> int:
    """Check a frozen-feature evaluation split and return the number of classes.

    Shared by the linear probe and :mod:`data2vec.evaluate.knn`.

    Returns:
        ``C = max label + 1`` over train (and test, when given).

    Raises:
        ValueError: naming the offending tensor for wrong ranks, mismatched sizes or feature
            dimensions, non-integer or negative labels, non-finite features, empty splits or
            fewer than two classes in the training labels.
    """
    named_x = {"train_x": train_x, "test_x": test_x}
    named_y = {"train_y": train_y} | ({} if test_y is None else {"test_y": test_y})
    for name, x in named_x.items():
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        n_bad = int((~torch.isfinite(x)).sum())
        if n_bad:
            raise ValueError(f"{name} has {n_bad} non-finite (nan/inf) values")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"feature dimensions differ: train_x has {train_x.shape[1]}, test_x {test_x.shape[1]}"
        )
    for name, y in named_y.items():
        x = named_x[name.replace("_y", "_x")]
        if y.ndim != 1:
            raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(y.shape)}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{name} has {y.shape[0]} labels for {x.shape[0]} feature rows")
        if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
            raise ValueError(f"{name} must hold integer class ids, got {y.dtype}")
        if int(y.min()) < 0:
            raise ValueError(f"{name} has negative labels (min {int(y.min())})")
    n_train_classes = int(train_y.unique().numel())
    if n_train_classes < 2:
        raise ValueError(f"train_y has {n_train_classes} distinct class(es); need at least 2")
    return max(int(y.max()) for y in named_y.values()) + 1


def standardize(fit_x: Tensor, *xs: Tensor, eps: float = STD_EPS) -> tuple[Tensor, ...]:
    """Z-score ``fit_x`` and each of ``xs`` with the mean and std of ``fit_x`` (per feature)."""
    mean = fit_x.mean(dim=0)
    std = fit_x.std(dim=0, unbiased=False).clamp_min(eps)
    return tuple((x - mean) / std for x in (fit_x, *xs))


def stratified_split(
    y: Tensor, val_fraction: float, generator: torch.Generator, min_per_class: int = 0
) -> tuple[Tensor, Tensor]:
    """Split indices of ``y`` into (fit, val), holding out ``round(val_fraction * n_c)`` per class.

    A class keeps at least one example in the fit part, so singleton classes are never held out;
    ``min_per_class`` raises the held-out count of every other class to at least that many.
    Both index tensors are sorted, so the split is independent of the order classes are visited.
    """
    fit, val = [], []
    y_cpu = y.cpu()
    for c in y_cpu.unique().tolist():
        idx = (y_cpu == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n_val = max(round(val_fraction * idx.numel()), min_per_class)
        n_val = min(n_val, idx.numel() - 1)
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


def cosine_factor(step: int, total_steps: int) -> float:
    """Cosine decay from 1 at step 0 towards 0 at ``total_steps`` (Loshchilov & Hutter 2017)."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def _cross_entropy_grads(
    xb: Tensor, yb: Tensor, weight: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of the mean softmax cross-entropy of every head on one batch.

    ``d(mean CE)/d(logits) = (softmax - onehot) / B`` (Bishop 2006, eq. 4.109), so
    ``grad_W = X^T (softmax - onehot) / B``. Logits are laid out ``(K, C, B)`` rather than
    ``(K, B, C)`` because a softmax over a short innermost dimension of C ≈ 10 does not vectorise
    on CPU: this layout made it 8x faster and halved the cost of a step (measured, 24 heads,
    B=256, D=192).

    Returns:
        ``grad_w: (K, D, C)`` and ``grad_b: (K, C)``.
    """
    logits = torch.einsum("kdc,bd->kcb", weight, xb) + bias[:, :, None]
    g = logits.softmax(dim=1)
    g.masked_fill_(g < MIN_PROBABILITY, 0.0)  # no subnormal operands (see MIN_PROBABILITY)
    g[:, yb, torch.arange(len(yb), device=yb.device)] -= 1.0
    g /= len(yb)
    return torch.einsum("bd,kcb->kdc", xb, g), g.sum(dim=2)


def train_linear_heads(
    x: Tensor,
    y: Tensor,
    n_classes: int,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
) -> LinearHeads:
    """Train K = ``len(lrs)`` softmax regression heads together in one pass over mini-batches.

    Head ``k`` uses peak learning rate ``lrs[k]`` and L2 coefficient ``weight_decays[k]``. All
    heads start from the same initial weights and see the same batches in the same order, and
    the update of one head never reads another's state, so head ``k`` of a grid equals a K=1 run
    with the same seed (up to float rounding of the stacked matmul).

    The gradient is written out (:func:`_cross_entropy_grads`) rather than taken by autograd:
    it is the whole cost of the probe and the closed form builds no graph per step.

    Args:
        x: ``(N, D)`` features, already standardized.
        y: ``(N,)`` int64 labels in ``[0, n_classes)``.
        n_classes: C.
        lrs: Peak learning rate per head.
        weight_decays: L2 coefficient per head, same length as ``lrs``.
        epochs: Passes over ``x``.
        batch_size: Rows per SGD step; the last batch of an epoch may be smaller.
        seed: Seeds the initial weights and the per-epoch shuffles.

    Returns:
        The trained heads, on ``x``'s device and dtype.
    """
    if len(lrs) != len(weight_decays):
        raise ValueError(f"{len(lrs)} learning rates but {len(weight_decays)} weight decays")
    n, d = x.shape
    k = len(lrs)
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d, n_classes, generator=gen, dtype=torch.float64) * INIT_STD
    weight = w0.to(x).expand(k, d, n_classes).clone()
    bias = torch.zeros(k, n_classes, dtype=x.dtype, device=x.device)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    lr = torch.tensor(lrs, dtype=x.dtype, device=x.device)
    wd = torch.tensor(weight_decays, dtype=x.dtype, device=x.device)[:, None, None]

    steps_per_epoch = math.ceil(n / batch_size)
    total_steps, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(x.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            grad_w, grad_b = _cross_entropy_grads(x[idx], y[idx], weight, bias)
            buf_w.mul_(MOMENTUM).add_(grad_w + wd * weight)  # coupled L2: the penalty's gradient
            buf_b.mul_(MOMENTUM).add_(grad_b)  # the bias is not penalised, as in scikit-learn
            step_lr = lr * cosine_factor(step, total_steps)
            weight -= step_lr[:, None, None] * buf_w
            bias -= step_lr[:, None] * buf_b
            step += 1
    return LinearHeads(weight=weight, bias=bias)


def head_accuracies(heads: LinearHeads, x: Tensor, y: Tensor) -> list[float]:
    """Accuracy of each head on ``(x, y)``; a head with non-finite weights scores 0."""
    correct = (heads.predict(x) == y[None, :]).double().mean(dim=1)
    finite = torch.isfinite(heads.weight).flatten(1).all(1) & torch.isfinite(heads.bias).all(1)
    return torch.where(finite, correct, torch.zeros_like(correct)).tolist()


def _check_options(
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    val_fraction: float,
    epochs: int,
    batch_size: int,
) -> None:
    if not lrs or not weight_decays:
        raise ValueError("lrs and weight_decays must each hold at least one value")
    if any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise ValueError(f"learning rates must be positive and finite, got {tuple(lrs)}")
    if any(not (wd >= 0 and math.isfinite(wd)) for wd in weight_decays):
        raise ValueError(f"weight decays must be >= 0 and finite, got {tuple(weight_decays)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.1,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    device: str | torch.device | None = None,
    min_steps: int = DEFAULT_MIN_STEPS,
) -> ProbeResult:
    """Linear-probe accuracy of frozen features, with lr and weight decay chosen on validation.

    1. Hold out a stratified, seeded ``val_fraction`` of the training split.
    2. Standardize with the mean/std of the remaining fit part and train the full
       ``lrs × weight_decays`` grid in one pass (:func:`train_linear_heads`).
    3. Pick the setting with the best validation accuracy (ties: first in grid order, lrs outer).
    4. Retrain that single setting on the full training split (train + val, standardized with
       its own statistics) for the same number of epochs and report its test accuracy, so the
       reported model has seen all labelled data and the test split was never used for choices.

    Args:
        train_x: ``(N, D)`` float training features.
        train_y: ``(N,)`` integer labels in ``[0, C)``.
        test_x: ``(M, D)`` float test features.
        test_y: ``(M,)`` integer labels.
        lrs: Peak learning rates to try.
        weight_decays: L2 coefficients to try (0 = unregularised).
        val_fraction: Share of each training class held out for model selection.
        epochs: Passes over the data, for the grid and for the retrain; raised for small sets
            so that there are at least ``min_steps`` SGD steps.
        batch_size: SGD mini-batch size.
        seed: Seeds the split, the head initialisation and the shuffles.
        device: Where to train; defaults to ``train_x.device``.
        min_steps: Fewest SGD steps per head (0 = exactly ``epochs`` epochs).

    Returns:
        A :class:`ProbeResult`.

    Raises:
        ValueError: on malformed inputs (see :func:`validate_features_labels`) or options, or if
            the training split is too small to hold out a validation example.
    """
    n_classes = validate_features_labels(train_x, train_y, test_x, test_y)
    _check_options(lrs, weight_decays, val_fraction, epochs, batch_size)
    device = train_x.device if device is None else torch.device(device)
    dtype = torch.float64 if train_x.dtype == torch.float64 else torch.float32
    train_x, test_x = train_x.to(device, dtype), test_x.to(device, dtype)
    train_y, test_y = train_y.to(device, torch.int64), test_y.to(device, torch.int64)

    fit_idx, val_idx = stratified_split(train_y, val_fraction, torch.Generator().manual_seed(seed))
    if val_idx.numel() == 0:
        # A few examples per class (UCR sets with 5 per class): hold out one of each class that
        # has two or more, rather than refusing to choose the hyperparameters at all.
        fit_idx, val_idx = stratified_split(
            train_y, val_fraction, torch.Generator().manual_seed(seed), min_per_class=1
        )
    if val_idx.numel() == 0:
        raise ValueError(
            f"val_fraction={val_fraction} holds out no example of {train_x.shape[0]} training rows"
        )
    fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
    batches_per_epoch = math.ceil(fit_idx.numel() / batch_size)
    epochs = max(epochs, math.ceil(min_steps / batches_per_epoch))
    fit_x, val_x = standardize(train_x[fit_idx], train_x[val_idx])
    grid_lrs = [lr for lr in lrs for _ in weight_decays]
    grid_wds = [wd for _ in lrs for wd in weight_decays]
    heads = train_linear_heads(
        fit_x, train_y[fit_idx], n_classes, grid_lrs, grid_wds,
        epochs=epochs, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    val_acc = head_accuracies(heads, val_x, train_y[val_idx])
    best = max(range(len(val_acc)), key=lambda i: (val_acc[i], -i))

    full_x, test_std = standardize(train_x, test_x)
    final = train_linear_heads(
        full_x, train_y, n_classes, [grid_lrs[best]], [grid_wds[best]],
        epochs=epochs, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    grid = [
        {"lr": lr, "weight_decay": wd, "val_accuracy": acc}
        for lr, wd, acc in zip(grid_lrs, grid_wds, val_acc)
    ]
    return ProbeResult(
        accuracy=head_accuracies(final, test_std, test_y)[0],
        val_accuracy=val_acc[best],
        lr=grid_lrs[best],
        weight_decay=grid_wds[best],
        n_train=int(train_x.shape[0]),
        n_test=int(test_x.shape[0]),
        n_classes=n_classes,
        grid=grid,
        epochs=epochs,
    )
