import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data2vec.targets import (
    build_targets,
    instance_norm_over_time,
    per_dim_std,
    per_dim_std_of_rows,
    regression_loss,
)


def test_instance_norm_over_time__hand_example():
    x = torch.tensor([[[1.0, 10.0], [3.0, 10.0], [5.0, 40.0]]])  # (B=1, T=3, D=2)
    y = instance_norm_over_time(x)
    # channel 0: mean 3, biased var 8/3; channel 1: mean 20, var 200
    expected0 = (np.array([1, 3, 5]) - 3) / math.sqrt(8 / 3 + 1e-5)
    expected1 = (np.array([10, 10, 40]) - 20) / math.sqrt(200 + 1e-5)
    np.testing.assert_allclose(y[0, :, 0].numpy(), expected0, rtol=1e-6)
    np.testing.assert_allclose(y[0, :, 1].numpy(), expected1, rtol=1e-6)
    ref = F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(y, ref)


def test_build_targets__hand_computed_average_of_top_k():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(2, 5, 4, generator=g) * (i + 1) + i for i in range(3)]
    y = build_targets(layers, top_k=2, layer_norm="instance", final_norm="layer")

    # by hand in numpy: instance-norm each of the last two layers, average, layer-norm
    def inorm(a):
        return (a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + 1e-5)

    avg = (inorm(layers[1].numpy()) + inorm(layers[2].numpy())) / 2
    ref = (avg - avg.mean(-1, keepdims=True)) / np.sqrt(avg.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-5)


def test_build_targets__ignores_layers_below_top_k():
    layers = [torch.randn(1, 4, 3) for _ in range(4)]
    a = build_targets(layers, 2, "layer", "none")
    layers[0] = layers[0] * 100 + 5
    layers[1] = -layers[1]
    b = build_targets(layers, 2, "layer", "none")
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        build_targets(layers, 5, "layer", "none")


def test_regression_loss__l2_scaled_and_smooth_l1():
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0, 5.0, 4.0]])
    # squared errors 1 + 0 + 4 + 0 = 5, times 1/sqrt(4)
    assert float(regression_loss(pred, target)) == pytest.approx(2.5)
    assert float(regression_loss(pred, target, scale=1.0)) == pytest.approx(5.0)
    # smooth L1 with beta 4: |d| < 4 -> 0.5 d²/4: 0.125 + 0.5 = 0.625
    assert float(regression_loss(pred, target, beta=4.0, scale=1.0)) == pytest.approx(0.625)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_error_sum__bits_of_the_composition(dtype):
    """The GPU's loss function (here run on the CPU): the value of ``(pred - y)².sum()`` bit
    for bit, and the gradient written in the prediction's dtype with the composition's bits."""
    from data2vec.targets import _SquaredErrorSum

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(300, 48, generator=g).to(dtype).requires_grad_()
    y = torch.randn(300, 48, generator=g)
    got = _SquaredErrorSum.apply(pred, y)
    (got_grad,) = torch.autograd.grad(got * 0.7, pred)
    want = (pred - y).square().sum()
    (want_grad,) = torch.autograd.grad(want * 0.7, pred)
    assert torch.equal(got, want)
    assert got_grad.dtype == dtype and torch.equal(got_grad, want_grad)


def test_regression_loss__bf16_prediction_as_if_cast_first():
    """A bf16 prediction is promoted by the subtraction: the loss and its gradient have the
    bits of casting it to float32 first."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(50, 8, generator=g).bfloat16().requires_grad_()
    target = torch.randn(50, 8, generator=g)
    loss = regression_loss(pred, target)
    (grad,) = torch.autograd.grad(loss, pred)
    ref_pred = pred.detach().clone().requires_grad_()
    ref = (ref_pred.float() - target).square().sum() * (1.0 / math.sqrt(8))
    (ref_grad,) = torch.autograd.grad(ref, ref_pred)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)


def test_per_dim_std__matches_formula():
    x = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    expected = (math.sqrt(4.0 + 1e-6) + math.sqrt(0.0 + 1e-6)) / 2
    assert float(per_dim_std(x)) == pytest.approx(expected)
    # the unbiased variance torch computes, on large-mean data where one-pass formulas lose digits
    y = torch.randn(3000, 7, generator=torch.Generator().manual_seed(0)) * 0.1 + 100.0
    torch.testing.assert_close(per_dim_std(y), torch.sqrt(y.var(dim=0) + 1e-6).mean())


def test_per_dim_std_of_rows__is_the_std_of_the_repeated_rows():
    """Each table row counted as often as it is repeated (0 = left out), against the std of the
    repeated rows themselves; fewer than two rows give NaN, as per_dim_std does."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(40, 12, generator=g) * 0.3 + 5.0
    counts = torch.randint(0, 5, (40,), generator=g)
    counts[:3] = 0
    want = per_dim_std(table.repeat_interleave(counts, dim=0))
    torch.testing.assert_close(per_dim_std_of_rows(table, counts), want, rtol=1e-6, atol=0)
    one = torch.zeros(40, dtype=torch.long)
    one[7] = 1
    assert per_dim_std_of_rows(table, one).isnan()


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_regression_loss__rows_by_index_are_the_gathered_rows(beta):
    """With an index into a table of targets, the loss and gradient of the gathered rows (on
    the CPU, where the rows are gathered: the same bits)."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(30, 8, generator=g).requires_grad_()
    table = torch.randn(10, 8, generator=g)
    index = torch.randint(0, 10, (30,), generator=g)
    got = regression_loss(pred, table, beta, 0.5, index)
    want = regression_loss(pred, table[index], beta, 0.5)
    assert torch.equal(got, want)
    assert torch.equal(*(torch.autograd.grad(loss, pred)[0] for loss in (got, want)))
