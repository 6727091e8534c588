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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_project_and_attend_matches_the_linear_layer_then_attend(dtype, bias):
    """The projection inside the attention's autograd function: the same output, and the
    same input, weight and bias gradients as ``nn.Linear`` followed by :func:`attend`; the
    bias gradient comes from the backward kernel's per-sequence sums."""
    torch.manual_seed(0)
    B, T, C, H = 3, 40, 64, 4
    qkv = torch.nn.Linear(C, 3 * C, bias=bias).to(dtype)
    with torch.no_grad():
        qkv.weight.mul_(4.0)  # scores of a few units, as in _qkv
    x = torch.randn(B, T, C).to(dtype).requires_grad_()
    g = torch.randn(B, T, C).to(dtype)
    params = [x, *qkv.parameters()]
    out = token_attention.project_and_attend(x, qkv, H)
    grads = torch.autograd.grad(out, params, g)
    ref = attend(qkv(x), H)
    ref_grads = torch.autograd.grad(ref, params, g)
    assert out.dtype == dtype and torch.equal(out, ref)  # the same projection, the same kernel
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for name, a, b in zip(["x", "weight", "bias"], grads, ref_grads):
        assert a.dtype == b.dtype == dtype and rel(a, b) < tol, name


def test_project_and_attend_sums_each_of_q_k_and_v_into_the_bias_gradient():
    """The bias gradient's three thirds (q, k, v) each equal their column sums of the
    ``qkv`` gradient, which is what ``nn.Linear``'s backward adds up."""
    torch.manual_seed(1)
    B, T, C, H = 2, 16, 32, 2
    qkv = torch.nn.Linear(C, 3 * C)
    x = torch.randn(B, T, C)
    g = torch.randn(B, T, C)
    out = token_attention.project_and_attend(x, qkv, H)
    (grad_b,) = torch.autograd.grad(out, [qkv.bias], g)
    h = qkv(x).detach().requires_grad_()
    (grad_h,) = torch.autograd.grad(attend(h, H), [h], g)
    for part in range(3):
        cols = slice(part * C, (part + 1) * C)
        assert rel(grad_b[cols], grad_h[..., cols].sum((0, 1))) < 1e-5, part


def test_attention_module_takes_the_kernel_only_without_mask_or_dropout(monkeypatch):
    """The module's output and gradients through the kernel (with the projection inside it
    while gradients are recorded, or beside it) match its SDPA path; a mask or attention
    dropout sends it to SDPA."""
    calls = []
    for name in ("attend", "project_and_attend"):
        real = getattr(token_attention, name)
        monkeypatch.setattr(token_attention, name,
                            lambda *a, n=name, f=real: calls.append(n) or f(*a))  # fmt: skip
    monkeypatch.setattr(token_attention, "PROJECT", True)
    torch.manual_seed(0)
    attn = Attention(64, 4, attn_drop=0.1).train()
    x = torch.randn(3, 40, 64, requires_grad=True)

    def run():
        out = attn(x)
        return (out, *torch.autograd.grad(out.square().sum(), [x, *attn.parameters()]))

    attn.eval()  # no dropout: the kernel
    fast = run()
    assert calls == ["project_and_attend"]
    monkeypatch.setattr(token_attention, "PROJECT", False)
    beside = run()
    assert calls == ["project_and_attend", "attend"]
    monkeypatch.setattr(token_attention, "MAX_TOKENS", 0)
    plain = run()
    assert len(calls) == 2
    for a, b, c in zip(fast, beside, plain):
        assert rel(a, c) < 1e-5 and rel(b, c) < 1e-5
    monkeypatch.setattr(token_attention, "MAX_TOKENS", 64)
    monkeypatch.setattr(token_attention, "PROJECT", True)
    with torch.no_grad():  # nothing to record: the projection beside the kernel
        assert rel(attn(x), fast[0]) < 1e-6
    assert calls[-1] == "attend"
    calls.clear()
    attn.train()  # attention dropout: SDPA (or the lean CPU composite)
    run()
    padding = torch.zeros(3, 40, dtype=torch.bool)
    padding[:, 39] = True
    mask = attention.attention_mask(padding, None, torch.float32)
    attn.eval()
    attn(x, mask)
    assert calls == []
