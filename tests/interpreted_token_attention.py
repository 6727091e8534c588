"""The short-sequence attention kernels (``data2vec/nn/token_attention.py``) against
``F.scaled_dot_product_attention``, under Triton's CPU interpreter.

Collected only by ``test_token_kernels.py``, which runs this file in a fresh process with
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from data2vec.nn import attention, token_attention
from data2vec.nn.attention import Attention, split_heads
from data2vec.nn.token_attention import attend
from tests.conftest import rel

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_token_kernels.py"


def reference(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """SDPA in float64 on the same (rounded) operands, heads side by side: ``(B, T, C)``."""
    B, T, C3 = qkv.shape
    q, k, v = split_heads(qkv.double(), heads)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C3 // 3)


def _qkv(B: int, T: int, C: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # scores of a few units, so that the softmax is neither flat nor one-hot
    return (1.5 * torch.randn(B, T, 3 * C, generator=g)).to(dtype).requires_grad_()


# (batch, tokens, width, heads): 40 tokens (the image student's) in a 64-token block, one token,
# a whole 16-token block, 100 tokens (a 128-token block, 8 warps); heads of 16 and 32
CASES = [(3, 40, 64, 2), (2, 1, 32, 2), (2, 16, 64, 4), (1, 100, 32, 1)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attend_matches_sdpa(case, dtype, monkeypatch):
    monkeypatch.setattr(token_attention, "MAX_TOKENS", 128)
    B, T, C, H = case
    qkv = _qkv(B, T, C, dtype)
    assert token_attention.supports(qkv, H)
    out = attend(qkv, H)
    assert out.shape == (B, T, C) and out.dtype == dtype
    g = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((out.float() * g).sum(), qkv)
    ref = reference(qkv, H)
    (ref_grad,) = torch.autograd.grad((ref * g.double()).sum(), qkv)
    # float32: full-precision products (measured 7e-7 at most). float16: the probabilities and
    # the gradient of the scores are rounded to float16 before their products, as in the fused
    # kernels, so the error is a few float16 steps (measured 3.8e-4, gradients 8e-4)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel(out, ref) < tol
    assert grad.dtype == dtype and rel(grad, ref_grad) < 2 * tol
    # no worse than PyTorch's own float16 attention on the CPU (measured: the same to 3
    # digits at 40 and 16 tokens, 10 % better at 100)
    if dtype == torch.float16:
        q, k, v = split_heads(qkv.detach(), H)
        own = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        assert rel(out, ref) <= 1.05 * rel(own, ref) + 1e-6


def test_no_grad_forward_matches_the_training_forward():
    qkv = _qkv(2, 40, 64, torch.float32)
    out = attend(qkv, 4)
    with torch.no_grad():
        assert torch.equal(attend(qkv, 4), out)


def test_supports():
    qkv = torch.zeros(2, 40, 3 * 64)
    assert token_attention.supports(qkv, 4)  # heads of 16
    assert not token_attention.supports(qkv, 3)  # heads of 21.3
    assert not token_attention.supports(torch.zeros(2, 40, 3 * 48), 1)  # heads of 48
    assert not token_attention.supports(torch.zeros(2, 65, 3 * 64), 4)  # past MAX_TOKENS
    assert not token_attention.supports(torch.zeros(2, 40, 64), 4)  # not a fused qkv


def test_attention_module_takes_the_kernel_only_without_mask_or_dropout(monkeypatch):
    """The module's output and gradients through the kernel match its SDPA path; a mask or
    attention dropout sends it to SDPA."""
    calls = []
    real = token_attention.attend
    monkeypatch.setattr(token_attention, "attend", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    attn = Attention(64, 4, attn_drop=0.1).train()
    x = torch.randn(3, 40, 64, requires_grad=True)

    def run():
        out = attn(x)
        return (out, *torch.autograd.grad(out.square().sum(), [x, *attn.parameters()]))

    attn.eval()  # no dropout: the kernel
    fast = run()
    assert len(calls) == 1
    monkeypatch.setattr(token_attention, "MAX_TOKENS", 0)
    plain = run()
    assert len(calls) == 1
    for a, b in zip(fast, plain):
        assert rel(a, b) < 1e-5
    monkeypatch.setattr(token_attention, "MAX_TOKENS", 64)
    attn.train()  # attention dropout: SDPA (or the lean CPU composite)
    run()
    padding = torch.zeros(3, 40, dtype=torch.bool)
    padding[:, 39] = True
    mask = attention.attention_mask(padding, None, torch.float32)
    attn.eval()
    attn(x, mask)
    assert len(calls) == 1
