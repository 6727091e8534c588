"""Tests for the one-pass linear-probe grid (data2vec.evaluate.linear_probe)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from data2vec.evaluate.linear_probe import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LRS,
    DEFAULT_WEIGHT_DECAYS,
    ProbeResult,
    head_accuracies,
    linear_probe,
    standardize,
    stratified_split,
    train_linear_heads,
)

LRS = (0.03, 0.3, 3.0)
WDS = (0.0, 1e-4, 1e-3)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """load_digits split 75/25 with a fixed permutation."""
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    n_train = int(0.75 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


@pytest.fixture(scope="module")
def digits_probe(digits) -> ProbeResult:
    """The probe with its default grid and schedule."""
    x_tr, y_tr, x_te, y_te = digits
    return linear_probe(
        torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr),
        torch.tensor(x_te, dtype=torch.float32), torch.tensor(y_te),
        seed=0,
    )  # fmt: skip


def test_digits_accuracy_matches_sklearn(digits, digits_probe: ProbeResult) -> None:
    x_tr, y_tr, x_te, y_te = digits
    scaler = StandardScaler().fit(x_tr)
    reference = LogisticRegression(max_iter=5000).fit(scaler.transform(x_tr), y_tr)
    ref_acc = reference.score(scaler.transform(x_te), y_te)
    assert digits_probe.accuracy >= 0.93
    assert abs(digits_probe.accuracy - ref_acc) <= 0.03, (digits_probe.accuracy, ref_acc)
    assert (digits_probe.n_train, digits_probe.n_test, digits_probe.n_classes) == (
        len(y_tr), len(y_te), 10,
    )  # fmt: skip


def test_grid_reports_every_setting_and_picks_the_best(digits_probe: ProbeResult) -> None:
    grid = digits_probe.grid
    expected = [(lr, wd) for lr in DEFAULT_LRS for wd in DEFAULT_WEIGHT_DECAYS]
    assert [(g["lr"], g["weight_decay"]) for g in grid] == expected
    best = max(g["val_accuracy"] for g in grid)
    assert digits_probe.val_accuracy == best
    chosen = [
        g
        for g in grid
        if (g["lr"], g["weight_decay"]) == (digits_probe.lr, digits_probe.weight_decay)
    ]
    assert chosen[0]["val_accuracy"] == best
    assert json.loads(json.dumps(digits_probe.to_dict())) == digits_probe.to_dict()


def test_reported_accuracy_is_the_chosen_setting_retrained_on_all_training_data(
    digits, digits_probe: ProbeResult
) -> None:
    x_tr, y_tr, x_te, y_te = (torch.tensor(a) for a in digits)
    full_x, test_x = standardize(x_tr.float(), x_te.float())
    head = train_linear_heads(
        full_x, y_tr, 10, [digits_probe.lr], [digits_probe.weight_decay],
        epochs=digits_probe.epochs, batch_size=DEFAULT_BATCH_SIZE, seed=0,
    )  # fmt: skip
    assert head_accuracies(head, test_x, y_te)[0] == digits_probe.accuracy


def test_noise_features_give_chance_accuracy() -> None:
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(2000, 32, generator=g), torch.randn(500, 32, generator=g)
    train_y = torch.randint(0, 10, (2000,), generator=g)
    test_y = torch.randint(0, 10, (500,), generator=g)
    result = linear_probe(train_x, train_y, test_x, test_y, lrs=LRS, weight_decays=WDS, epochs=10)
    assert result.accuracy < 0.25


def test_same_seed_gives_identical_result() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(300, 8, generator=g), torch.randint(0, 3, (300,), generator=g)

    def run(seed: int) -> dict:
        return linear_probe(
            x[:200], y[:200], x[200:], y[200:], lrs=LRS, weight_decays=WDS, epochs=3, seed=seed
        ).to_dict()

    assert run(0) == run(0)
    heads = [
        train_linear_heads(x, y, 3, [0.1], [0.0], epochs=1, batch_size=32, seed=s)
        for s in (0, 0, 1)
    ]
    assert torch.equal(heads[0].weight, heads[1].weight)
    assert not torch.equal(heads[0].weight, heads[2].weight)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_one_pass_grid_equals_heads_trained_alone(dtype: torch.dtype, atol: float) -> None:
    # float64 shows the heads are independent up to rounding; float32 that the rounding of the
    # stacked matmul (one GEMM over K*C columns instead of C) stays small.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 16, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (500,), generator=g)
    lrs, wds = [0.01, 0.3, 3.0], [0.0, 1e-3, 1e-2]
    kw = {"epochs": 3, "batch_size": 64, "seed": 7}
    grid = train_linear_heads(x, y, 5, lrs, wds, **kw).logits(x)
    for i in range(3):
        alone = train_linear_heads(x, y, 5, [lrs[i]], [wds[i]], **kw).logits(x)[0]
        torch.testing.assert_close(grid[i], alone, atol=atol, rtol=0)
    # the heads really differ, so the comparison above is not trivially true
    assert (grid[0] - grid[2]).abs().max() > 0.1


def test_converges_to_sklearn_l2_logistic_regression() -> None:
    # Each head minimises mean CE + (wd / 2) ||W||² with an unpenalised bias, which is
    # scikit-learn's objective with C = 1 / (wd * n). Full-batch steps make SGD exact enough to
    # compare the fitted probabilities, which are unique (the logits are not: any per-row shift).
    g = torch.Generator().manual_seed(4)
    n, d, c, wd = 200, 5, 3, 1e-2
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 1.5 * F.one_hot(y, d).double()
    head = train_linear_heads(x, y, c, [0.5], [wd], epochs=500, batch_size=n, seed=0)
    ref = LogisticRegression(C=1 / (wd * n), tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(
        head.logits(x)[0].softmax(-1).numpy(), ref.predict_proba(x.numpy()), atol=1e-5
    )


def test_probe_is_invariant_to_per_feature_affine_rescaling() -> None:
    # standardization removes feature scale and offset, so a badly scaled copy of the features
    # must give the same grid, choice and accuracy
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (200,), generator=g)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64) + F.one_hot(y, 5).double()
    scaled = x * torch.logspace(-3, 3, 5, dtype=torch.float64) + 7.0
    kw = {"lrs": LRS, "weight_decays": WDS, "epochs": 5}
    a = linear_probe(x[:150], y[:150], x[150:], y[150:], **kw).to_dict()
    b = linear_probe(scaled[:150], y[:150], scaled[150:], y[150:], **kw).to_dict()
    assert a == b


def test_stratified_split_holds_out_each_class_proportionally() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 1)
    fit, val = stratified_split(y, 0.2, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(81))
    assert torch.bincount(y[val], minlength=3).tolist() == [10, 6, 0]


def test_constant_feature_is_standardized_to_zero() -> None:
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    (z,) = standardize(x)
    assert torch.equal(z, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))


def _bad_inputs() -> list[tuple[tuple[torch.Tensor, ...], str]]:
    x, y = torch.randn(20, 4), torch.arange(20) % 2
    nan_x = x.clone()
    nan_x[3, 1] = float("nan")
    return [
        ((x[:, :3], y, x, y), "feature dimensions differ"),
        ((x, y[:10], x, y), "train_y has 10 labels for 20"),
        ((x, y, x, y[:5]), "test_y has 5 labels for 20"),
        ((x[0], y, x, y), "train_x must be 2-D"),
        ((x, y[:, None], x, y), "train_y must be 1-D"),
        ((x, torch.zeros(20, dtype=torch.int64), x, y), "need at least 2"),
        ((nan_x, y, x, y), "train_x has 1 non-finite"),
        ((x, y, x.clone().fill_(float("inf")), y), "test_x has 80 non-finite"),
        ((x, y.float(), x, y), "train_y must hold integer"),
        ((x, y - 1, x, y), "train_y has negative"),
    ]


@pytest.mark.parametrize("args, message", _bad_inputs())
def test_bad_inputs_raise_value_error(args: tuple[torch.Tensor, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        linear_probe(*args, epochs=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lrs": ()}, "at least one"),
        ({"lrs": (-0.1,)}, "learning rates"),
        ({"weight_decays": (-1.0,)}, "weight decays"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_options_raise_value_error(kwargs: dict, message: str) -> None:
    x, y = torch.randn(20, 4), torch.arange(20) % 2
    with pytest.raises(ValueError, match=message):
        linear_probe(x, y, x, y, **kwargs)


def test_too_small_for_a_validation_split_raises() -> None:
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 2])  # singletons only: nothing to hold out
    with pytest.raises(ValueError, match="holds out no example"):
        linear_probe(x, y, x, y, val_fraction=0.1)


def test_few_examples_per_class_hold_out_one_of_each() -> None:
    # 10 % of 4 rounds to none: one example of each class is held out instead of refusing.
    x = torch.tensor([[-2.0], [-1.5], [1.5], [2.0]])
    y = torch.tensor([0, 0, 1, 1])
    result = linear_probe(x, y, x, y, val_fraction=0.1)
    assert result.accuracy == 1.0  # separable by the sign
    fit, val = stratified_split(y, 0.1, torch.Generator().manual_seed(0), min_per_class=1)
    assert sorted(y[val].tolist()) == [0, 1] and len(fit) == 2


def test_small_sets_get_enough_sgd_steps() -> None:
    # 300 rows at batch 1024 is one batch per epoch: 30 epochs would be 30 steps.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 16, generator=g)
    y = (x[:, 0] > 0).long()
    r = linear_probe(x[:300], y[:300], x[300:], y[300:], lrs=(0.1,), weight_decays=(0.0,))
    assert r.epochs >= 1000  # ceil(270 / 1024) = 1 batch per epoch -> 1000 epochs
    assert r.accuracy > 0.95
    quick = linear_probe(
        x[:300], y[:300], x[300:], y[300:], lrs=(0.1,), weight_decays=(0.0,), min_steps=0
    )
    assert quick.epochs == 30


def _subnormal(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


def test_a_confident_heads_gradient_has_no_subnormal_values_and_stays_exact(monkeypatch) -> None:
    """A class 100 logits below the best has probability e^-100 = 3.7e-44, below float32's
    normal range: products reading such values run several times slower on x86 CPUs (the text
    demo's probe took 12 minutes). The probe sets probabilities under 2^-100 to zero, and its
    gradient still equals the float64 cross-entropy gradient. (The probe's accuracy is
    unchanged: the digits tests above; the demos' probes in benchmarks/README.md.)"""
    import data2vec.evaluate.linear_probe as lp

    x = torch.tensor([[1.0, 0.5], [1.0, -0.5]])
    y = torch.tensor([0, 1])
    weight = torch.tensor([[[50.0, 49.0, -50.0], [0.0, 0.0, 0.0]]])  # (K=1, D=2, C=3)
    bias = torch.zeros(1, 3)
    logits = torch.einsum("kdc,bd->kcb", weight, x)
    assert _subnormal(logits.softmax(dim=1)) > 0  # what the products used to read
    grad_w, grad_b = lp._cross_entropy_grads(x, y, weight, bias)
    assert _subnormal(grad_w) == 0 and _subnormal(grad_b) == 0

    w64 = weight[0].double().requires_grad_(True)
    b64 = bias[0].double().requires_grad_(True)
    F.cross_entropy(x.double() @ w64 + b64, y).backward()
    torch.testing.assert_close(grad_w[0].double(), w64.grad, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(grad_b[0].double(), b64.grad, atol=1e-7, rtol=1e-6)

    monkeypatch.setattr(lp, "MIN_PROBABILITY", 0.0)  # nothing set to zero: the code before
    assert _subnormal(lp._cross_entropy_grads(x, y, weight, bias)[0]) > 0
