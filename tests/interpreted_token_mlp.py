"""The MLP with the fused hidden-layer backward (``data2vec/nn/token_mlp.py``) against the
plain ops, under Triton's CPU interpreter.

Collected only by ``test_token_kernels.py``, which runs this file in a fresh process with
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from data2vec.nn import token_mlp
from data2vec.nn.block import Mlp
from data2vec.nn.token_mlp import gelu_grad
from tests.conftest import rel

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_token_kernels.py"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gelu_grad_matches_gelu_and_its_backward(dtype):
    """300 rows span three programs (128 rows each, the last partial); 600 columns span two
    column blocks (512 each, the last partial)."""
    g = torch.Generator().manual_seed(0)
    h = (2 * torch.randn(300, 600, generator=g)).to(dtype)
    gg = torch.randn(300, 600, generator=g).to(dtype)
    want_dh = torch.ops.aten.gelu_backward(gg, h)
    gelu, dh, sums = gelu_grad(h, gg.clone())
    # float16: rounding flips against PyTorch's CPU kernels (measured: GELU 3e-6, its gradient
    # 2e-4 of the largest value; both are float16 roundings of the float32 result)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    assert gelu.dtype == dtype and rel(gelu, F.gelu(h)) < tol
    assert dh.dtype == dtype and rel(dh, want_dh) < tol
    assert sums.dtype == torch.float32
    assert rel(sums, dh.double().sum(0)) < 1e-6  # the sums of the rounded rows


@pytest.mark.parametrize("autocast", [False, True])
def test_mlp_matches_the_memory_lean_mlp(autocast, monkeypatch):
    """Output and every gradient (input, both weights, both biases) against the plain MLP,
    in float32 and under float16 autocast (float16 stands in for bf16: the interpreter's bf16
    products are wrong)."""
    torch.manual_seed(0)
    mlp = Mlp(32, 128)
    x = torch.randn(3, 70, 32, requires_grad=True)
    gout = torch.randn(3, 70, 32)

    def run():
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            out = mlp(x)
        return (out, *torch.autograd.grad(out, [x, *mlp.parameters()], gout))

    monkeypatch.setattr(token_mlp, "ENABLED", False)
    assert not token_mlp.supports(x, mlp)
    ref = run()
    monkeypatch.setattr(token_mlp, "ENABLED", True)
    assert token_mlp.supports(x, mlp)
    calls = []
    real = token_mlp.gelu_grad
    monkeypatch.setattr(token_mlp, "gelu_grad", lambda *a: calls.append(1) or real(*a))
    got = run()
    assert calls == [1]
    tol = 1e-3 if autocast else 1e-5  # measured 1.7e-4 and 3e-7 at most
    for name, a, b in zip(["out", "x", "w1", "b1", "w2", "b2"], got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel(a, b) < tol, (name, rel(a, b))
    with torch.no_grad():  # nothing to keep: the plain ops
        assert not token_mlp.supports(x, mlp)
