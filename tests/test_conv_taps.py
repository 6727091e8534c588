"""The per-tap weight gradient of channels-last 1-D convolutions (``data2vec/nn/conv_taps.py``)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data2vec.nn import conv_taps
from data2vec.nn.lean import conv1d_after, conv1d_any, conv1d_args


def _channels_last(n: int, c: int, t: int, dtype=torch.float32) -> torch.Tensor:
    """``(N, C, 1, T)`` over ``(N, T, C)`` memory, as the speech CNN and decoders hold tokens."""
    return torch.randn(n, t, c, dtype=dtype).transpose(1, 2).unsqueeze(2)


@pytest.mark.parametrize(
    "kernel,stride,padding,t",
    [
        (3, 2, 0, 41),  # the speech CNN's layers
        (2, 2, 0, 40),
        (10, 5, 0, 63),
        (9, 1, 4, 37),  # the text decoder's (same padding)
        (5, 3, 2, 38),
        (7, 1, 9, 5),  # padding wider than the input: some taps only ever meet zeros
    ],
)
def test_weight_grad__equals_the_convolution_weight_gradient_in_float64(kernel, stride, padding, t):
    torch.manual_seed(0)
    x = _channels_last(3, 6, t)
    w = torch.randn(5, 6, 1, kernel)
    out_t = (t + 2 * padding - kernel) // stride + 1
    grad = torch.randn(3, out_t, 5).transpose(1, 2).unsqueeze(2)
    got = conv_taps.weight_grad(grad, x, kernel, stride, padding)
    ref = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), w.double(), None, (1, stride), (0, padding), (1, 1),
        False, (0, 0), 1, (False, True, False),
    )[1]  # fmt: skip
    assert got.shape == w.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # and from channels-first operands (copied to rows) alike
    again = conv_taps.weight_grad(grad.contiguous(), x.contiguous(), kernel, stride, padding)
    torch.testing.assert_close(again.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_conv1d_any__float32_channels_last_takes_the_tap_gradient_and_matches_conv1d(bias):
    torch.manual_seed(1)
    conv = nn.Conv1d(8, 6, 3, stride=2, bias=bias)
    x = _channels_last(2, 8, 81).requires_grad_()
    y = conv1d_any(x, conv.weight, conv.bias, conv1d_args(conv))
    assert "HeightOneConv" in type(y.grad_fn).__name__
    assert y.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, *conv.parameters()), grad)
    x64 = x.detach().double().squeeze(2).requires_grad_()
    params = [p.detach().double().requires_grad_() for p in conv.parameters()]
    ref_y = F.conv1d(x64, params[0], params[1] if bias else None, stride=2)
    ref = torch.autograd.grad(ref_y, (x64, *params), grad.double().squeeze(2))
    torch.testing.assert_close(y.double().squeeze(2), ref_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double().reshape(b.shape), b, rtol=1e-5, atol=1e-5)


def test_conv1d_any__leaves_unstrided_grouped_bf16_short_and_no_grad_convolutions_to_onednn():
    conv = nn.Conv1d(8, 8, 3, stride=2)
    grouped = nn.Conv1d(8, 8, 3, stride=2, groups=2)
    unstrided = nn.Conv1d(8, 8, 9, padding=4)
    x = _channels_last(2, 8, 81).requires_grad_()

    def kind(conv, x):
        return type(conv1d_any(x, conv.weight, conv.bias, conv1d_args(conv)).grad_fn).__name__

    assert "HeightOneConv" in kind(conv, x)
    assert "HeightOneConv" not in kind(grouped, x)
    assert "HeightOneConv" not in kind(unstrided, x)
    assert "HeightOneConv" not in kind(conv, _channels_last(2, 8, 40).requires_grad_())  # 19 < 32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "HeightOneConv" not in kind(conv, x)
    with torch.no_grad():
        assert conv1d_any(x, conv.weight, conv.bias, conv1d_args(conv)).grad_fn is None


def test_conv1d_after__channels_last_float32_same_gradients_as_conv1d_any():
    """The recomputing layer takes the same tap gradient as the plain one: bit-identical."""
    torch.manual_seed(2)
    conv, norm = nn.Conv1d(8, 8, 3, stride=2, bias=False), nn.LayerNorm(8)
    nn.init.normal_(norm.weight)
    x = _channels_last(2, 8, 97).requires_grad_()

    def pre(y, weight, bias):
        return F.gelu(F.layer_norm(y.movedim(1, -1), (8,), weight, bias)).movedim(-1, 1)

    params = (norm.weight, norm.bias)
    plain = conv1d_any(pre(x, *params), conv.weight, None, conv1d_args(conv))
    lean = conv1d_after(x, pre, params, conv)
    assert torch.equal(plain, lean)
    wrt = (x, *params, conv.weight)
    grad = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad(plain, wrt, grad), torch.autograd.grad(lean, wrt, grad)):
        assert torch.equal(a, b)
