"""``benchmarks/gpu_gemm.py``'s experiment, ``fc1`` with its bias and GELU in the epilogue of
one Triton matrix product, against ``F.linear`` then ``F.gelu``, under Triton's CPU interpreter.

Collected only by ``test_token_kernels.py``, which runs this file in a fresh process with
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import benchmark_module, rel

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_token_kernels.py"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_gelu_matches_linear_then_gelu(dtype):
    """100 rows span four 32-row tiles (the last partial), 128 columns two 64-column tiles,
    64 inputs two 32-deep steps; tiles grouped two rows at a time. ``h`` against float64,
    ``gelu(h)`` against GELU of the rounded ``h`` (float16 stands in for bf16: the
    interpreter's bf16 products are wrong)."""
    with benchmark_module("gpu_gemm") as gpu_gemm:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(100, 64, generator=g).to(dtype)
        w = (torch.randn(128, 64, generator=g) / 8).to(dtype)
        b = (0.1 * torch.randn(128, generator=g)).to(dtype)
        h, gelu = gpu_gemm.linear_gelu(x, w, b, (32, 64, 32, 2, 4, 2))
        tol = 1e-6 if dtype == torch.float32 else 1e-3  # measured 1.4e-7 and 4.0e-4
        assert h.dtype == gelu.dtype == dtype
        assert rel(h, F.linear(x.double(), w.double(), b.double())) < tol
        assert rel(gelu, F.gelu(h.double())) < tol
        with pytest.raises(ValueError, match="multiples of the tile"):
            gpu_gemm.linear_gelu(x, w[:100], b[:100], (32, 64, 32, 2, 4, 2))
