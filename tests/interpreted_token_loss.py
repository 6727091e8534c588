"""The regression loss read by index (``data2vec/nn/token_loss.py``) against the gather and
the torch ops, under Triton's CPU interpreter.

Collected only by ``test_token_kernels.py``, which runs this file in a fresh process with
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import pytest
import torch

from data2vec.models.registry import build_model
from data2vec.nn import token_loss
from data2vec.targets import _SquaredErrorSum, regression_loss
from tests.conftest import image_batch, tiny_config

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_token_kernels.py"


def _inputs(dtype: torch.dtype, rows: int = 37, width: int = 300, table_rows: int = 20):
    """37 rows span three programs of 16 (the last partial); 300 columns two steps of 256 (the
    last partial); 20 table rows, each named several times or not at all."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(rows, width, generator=g).to(dtype).requires_grad_()
    table = torch.randn(table_rows, width, generator=g)
    index = torch.randint(0, table_rows - 3, (rows,), generator=g)  # the last 3 rows unread
    return pred, table, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_squared_error_sum_matches_the_gathered_rows(dtype):
    """The value against float64 (only the summation order differs), the gradient with the
    bits of the gathered loss's backward (the same float32 subtraction and product). In bf16
    the interpreter rounds toward zero (numpy has no bf16; a GPU rounds to nearest, as
    PyTorch does: gpu_check.py's agreement run compares the bits there), so within one bf16
    step of the float32 gradient."""
    pred, table, index = _inputs(dtype)
    assert token_loss.supports(pred, table)
    got = token_loss.squared_error_sum(pred, table, index)
    (got_grad,) = torch.autograd.grad(got * 0.37, pred)
    y = table[index]
    want = (pred.detach().double() - y.double()).square().sum()
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    assert got_grad.dtype == dtype
    if dtype == torch.bfloat16:
        exact = 0.74 * (pred.detach().float() - y)
        assert ((got_grad.float() - exact).abs() <= exact.abs() * 2**-7).all()
        assert (got_grad.float() - exact).abs().max() > 0  # (it is rounded)
    else:
        (want_grad,) = torch.autograd.grad(_SquaredErrorSum.apply(pred, y) * 0.37, pred)
        assert torch.equal(got_grad, want_grad)


def test_regression_loss_reads_by_index_only_where_it_may(monkeypatch):
    """``regression_loss`` with an index takes the kernel for the squared error (scaled as the
    gathered form is), and gathers for smooth L1, a table that needs a gradient, or with the
    kernel switched off."""
    pred, table, index = _inputs(torch.float32)
    calls = []
    real = token_loss.squared_error_sum
    monkeypatch.setattr(token_loss, "squared_error_sum", lambda *a: calls.append(1) or real(*a))
    fused = regression_loss(pred, table, 0.0, None, index)
    assert calls == [1]
    gathered = regression_loss(pred, table[index], 0.0, None)
    torch.testing.assert_close(fused, gathered, rtol=1e-6, atol=0)
    regression_loss(pred, table, 2.0, None, index)  # smooth L1
    regression_loss(pred, table.clone().requires_grad_(), 0.0, None, index)
    monkeypatch.setattr(token_loss, "ENABLED", False)
    regression_loss(pred, table, 0.0, None, index)
    assert calls == [1]


def test_data2vec2_loss_and_gradients_with_the_kernel(monkeypatch):
    """A tiny image model, 4 clones: loss, logged statistics and every gradient with the loss
    read by index against the gather (the same model and batch)."""
    cfg = tiny_config("mask.clones=4")
    model = build_model(cfg)
    x, mask = image_batch(cfg, B=2)

    def run():
        torch.manual_seed(3)
        out = model(x, mask)
        params = [q for q in model.parameters() if q.requires_grad]
        return out, torch.autograd.grad(out.loss, params)

    calls = []
    real = token_loss.squared_error_sum
    monkeypatch.setattr(token_loss, "squared_error_sum", lambda *a: calls.append(1) or real(*a))
    fused, fused_grads = run()
    assert calls == [1]
    monkeypatch.setattr(token_loss, "ENABLED", False)
    gathered, grads = run()
    assert calls == [1]
    torch.testing.assert_close(fused.loss, gathered.loss, rtol=1e-6, atol=0)
    for key in ("target_std", "pred_std", "loss_regression"):
        torch.testing.assert_close(fused.logs[key], gathered.logs[key], rtol=1e-6, atol=0)
    for a, b in zip(fused_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bench_reports_the_loss_kernel(monkeypatch):
    """``data2vec bench`` says which loss a model's step runs: the kernel under the
    interpreter (on the CPU there), the gathered torch ops without it or for smooth L1, and
    nothing for a model without the data2vec 2.0 objective."""
    from data2vec.bench import loss_kernel
    from data2vec.config import load_config

    cpu = torch.device("cpu")
    assert loss_kernel(build_model(tiny_config()), cpu, "bf16") == "triton"
    assert loss_kernel(build_model(tiny_config("loss.beta=0.5")), cpu, "bf16") == "torch"
    assert loss_kernel(build_model(load_config("image-v1-tiny")), cpu, "bf16") is None
    monkeypatch.setattr(token_loss, "ENABLED", False)
    assert loss_kernel(build_model(tiny_config()), cpu, "bf16") == "torch"
