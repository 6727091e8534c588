"""The Triton decoder kernels against the plain PyTorch ops, run by Triton's CPU interpreter.

Collected only by ``test_token_kernels.py``, which runs this file in a fresh process with
``TRITON_INTERPRET=1`` (Triton picks interpreter or GPU compiler when the kernels are defined,
at import). float32 throughout: the interpreter multiplies in full precision, so the kernels
must agree with ``F.conv2d`` to rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data2vec.models.decoders import ConvDecoder
from data2vec.nn import token_conv, token_layer
from data2vec.nn.token_layer import decoder_layer
from tests.conftest import rel

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_token_kernels.py"


def plain_conv(x: torch.Tensor, w: torch.Tensor, b, hw: tuple[int, int]) -> torch.Tensor:
    """The reference: ``F.conv2d`` on the ``(N, C, H, W)`` view, back to tokens."""
    N, T, C = x.shape
    w4 = w if w.dim() == 4 else w.unsqueeze(2)
    img = x.reshape(N, *hw, C).permute(0, 3, 1, 2)
    pad = (w4.shape[2] // 2, w4.shape[3] // 2)
    y = F.conv2d(img, w4, b, padding=pad, groups=C // w4.shape[1])
    return y.permute(0, 2, 3, 1).reshape(N, T, -1)


# (N, H, W, C_in, C_out, groups, kernel, bias): channels per group 12 (not a power of two),
# 8 in / 12 out, and a 1-D kernel of 5 (H = 1, as audio and text decoders)
SHAPES = [
    (2, 5, 7, 24, 24, 2, (3, 3), True),
    (3, 6, 4, 32, 48, 4, (3, 3), False),
    (2, 1, 19, 24, 24, 4, (5,), True),
]


@pytest.fixture(
    params=["taps", "packed", "packed16", "swapped", "swapped16", "packed pipelined",
            "packed16 pipelined", "swapped16 pipelined"]
)  # fmt: skip
def packing(request, monkeypatch):
    """Both ways the kernels walk the (tap, channel) sum: one tap at a time, or (tap, channel)
    pairs packed into steps of 64 (16: several steps, each spanning taps); packed, the
    forward's products may also run transposed (``SWAP_AB``), and its steps as a loop rather
    than unrolled (``PIPELINE``)."""
    name = request.param
    for settings in (token_conv.FORWARD, token_conv.WEIGHT_GRAD):
        monkeypatch.setitem(settings, "PACK_K", int(name != "taps"))
        monkeypatch.setitem(settings, "BLOCK_K", 16 if "16" in name else 0)
    monkeypatch.setitem(token_conv.FORWARD, "SWAP_AB", int(name.startswith("swapped")))
    monkeypatch.setitem(token_conv.FORWARD, "PIPELINE", int(name.endswith("pipelined")))
    return name


@pytest.mark.parametrize("shape", SHAPES)
def test_conv_tokens_matches_conv2d(shape, packing):
    N, H, W, cin, cout, G, k, has_bias = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H * W, cin, generator=g, requires_grad=True)
    w = (0.2 * torch.randn(cout, cin // G, *k, generator=g)).requires_grad_()
    b = torch.randn(cout, generator=g, requires_grad=True) if has_bias else None
    params = [x, w] + ([b] if has_bias else [])
    gy = torch.randn(N, H * W, cout, generator=g)
    got = token_conv.conv_tokens(x, w, b, (H, W))
    ref = plain_conv(x, w, b, (H, W))
    assert got.shape == ref.shape == (N, H * W, cout)
    assert rel(got, ref) < 1e-5
    for a, r in zip(torch.autograd.grad(got, params, gy), torch.autograd.grad(ref, params, gy)):
        assert a.shape == r.shape and rel(a, r) < 1e-5


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_weight_gradient_slices_sum_to_the_same(splits, packing):
    """Rows split into slices summed separately (the GPU's load balance) change nothing; 150
    rows are not a multiple of the kernel's 64-row blocks."""
    g = torch.Generator().manual_seed(1)
    N, H, W, C, G = 3, 5, 10, 16, 2
    x = torch.randn(N * H * W, C, generator=g)
    gy = torch.randn(N * H * W, C, generator=g)
    w = torch.randn(C, C // G, 3, 3, requires_grad=True)
    ref = plain_conv(x.view(N, H * W, C), w, None, (H, W))
    (ref_gw,) = torch.autograd.grad(ref, [w], gy.view(N, H * W, C))
    shape = (G, 3, 3, C // G, C // G)
    ws = token_conv.conv_tokens_weight_grad(x, gy, (H, W), shape, splits)
    gw = ws.reshape(G, 3, 3, C // G, C // G).permute(0, 3, 4, 1, 2).reshape(C, C // G, 3, 3)
    assert rel(gw, ref_gw) < 1e-5
    # the bias gradient's partial sums come from the same tiles of gy
    ws_b, gb = token_conv.conv_tokens_grads(x, gy, (H, W), shape, splits, bias=True)
    assert torch.equal(ws_b, ws) and gb.shape == (C,)
    assert rel(gb, gy.double().sum(0)) < 1e-6


def plain_layer(h, w, b, hw, residual):
    y = plain_conv(h, w, b, hw)
    out = F.gelu(F.layer_norm(y, y.shape[-1:], eps=1e-5))
    return out + h if residual else out


@pytest.mark.parametrize(
    ("residual", "C", "split"), [(True, 32, True), (False, 32, True), (True, 48, True),
                                 (True, 48, False), (False, 40, True)]
)  # fmt: skip
def test_decoder_layer_matches_plain_ops(residual, C, split, monkeypatch):
    """Two stacked fused layers (the second reads the first's low-precision copy, through
    which no gradient flows) against the plain composition: values and every gradient. Rows
    of 32 channels are one tile; of 48, two (32 + 16) or, not split, one of 64; of 40, 32 + 8."""
    monkeypatch.setattr(token_layer, "SPLIT_ROWS", split)
    blocks = token_layer.split_launch(1, C)[1]
    assert (blocks["BLOCK_A"], blocks["BLOCK_B"]) == {
        (32, True): (32, 0),
        (48, True): (32, 16),
        (48, False): (64, 0),
        (40, True): (32, 8),
    }[C, split]
    g = torch.Generator().manual_seed(2)
    N, H, W, G = 2, 4, 6, 4
    h = (2 * torch.randn(N, H * W, C, generator=g)).requires_grad_()
    ws = [(0.3 * torch.randn(C, C // G, 3, 3, generator=g)).requires_grad_() for _ in range(2)]
    bs = [torch.randn(C, generator=g, requires_grad=True) for _ in range(2)]
    gout = torch.randn(N, H * W, C, generator=g)
    out, low = decoder_layer(h, None, ws[0], bs[0], (H, W), residual=residual)
    assert torch.equal(low, out)  # float32 compute: the "low" copy is exact
    out, _ = decoder_layer(out, low, ws[1], bs[1], (H, W), residual=residual)
    ref = plain_layer(
        plain_layer(h, ws[0], bs[0], (H, W), residual), ws[1], bs[1], (H, W), residual
    )
    assert rel(out, ref) < 1e-5
    params = [h, *ws, *bs]
    got_g = torch.autograd.grad(out, params, gout)
    ref_g = torch.autograd.grad(ref, params, gout)
    for name, a, r in zip(["h", "w0", "w1", "b0", "b1"], got_g, ref_g):
        assert rel(a, r) < 1e-5, name


def test_decoder_layer_gradient_through_its_low_precision_copy():
    """A gradient that reaches the layer's copy (the decoder's projection reads the last
    layer's) counts as the output's own: through the copy alone, and through both at once."""
    g = torch.Generator().manual_seed(4)
    N, H, W, C, G = 2, 4, 6, 32, 4
    h = torch.randn(N, H * W, C, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(C, C // G, 3, 3, generator=g)).requires_grad_()
    b = torch.randn(C, generator=g, requires_grad=True)
    g1, g2 = torch.randn(N, H * W, C, generator=g), torch.randn(N, H * W, C, generator=g)
    ref = plain_layer(h, w, b, (H, W), True)
    for used in ("low", "both"):
        out, low = decoder_layer(h, None, w, b, (H, W))
        loss = (low * g1).sum() + ((out * g2).sum() if used == "both" else 0)
        got = torch.autograd.grad(loss, [h, w, b])
        want = torch.autograd.grad(ref, [h, w, b], g1 + g2 if used == "both" else g1,
                                   retain_graph=True)  # fmt: skip
        for name, a, r in zip(["h", "w", "b"], got, want):
            assert rel(a, r) < 1e-5, (used, name)


def test_decoder_layer_under_reduced_precision_autocast():
    """Under autocast the products run in half precision: the layer reads float32 input (the
    kernel rounds it), hands the next layer a half-precision copy, keeps the float32 residual
    stream, and returns float32 gradients; all within half-precision rounding of the plain
    ops under the same autocast. float16 stands in for bfloat16 here: Triton 3.6's
    interpreter gets ``tl.dot`` of bf16 operands wrong (a plain 16 x 16 product comes out off
    by ~1e10), while the kernels have no dtype-specific code; ``gpu_check.py`` checks bf16
    on a GPU."""
    g = torch.Generator().manual_seed(3)
    N, H, W, C, G = 2, 4, 6, 32, 4
    h = torch.randn(N, H * W, C, generator=g, requires_grad=True)
    ws = [(0.3 * torch.randn(C, C // G, 3, 3, generator=g)).requires_grad_() for _ in range(2)]
    bs = [torch.randn(C, generator=g, requires_grad=True) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.float16):
        out, low = decoder_layer(h, None, ws[0], bs[0], (H, W))
        assert out.dtype == torch.float32 and low.dtype == torch.float16
        out, _ = decoder_layer(out, low, ws[1], bs[1], (H, W))
        ref = plain_layer(plain_layer(h, ws[0], bs[0], (H, W), True), ws[1], bs[1], (H, W), True)
    assert out.dtype == ref.dtype == torch.float32
    assert rel(out, ref) < 5e-3
    gout = torch.randn(out.shape, generator=g)
    params = [h, *ws, *bs]
    got_g = torch.autograd.grad(out, params, gout)
    ref_g = torch.autograd.grad(ref, params, gout)
    for name, a, r in zip(["h", "w0", "w1", "b0", "b1"], got_g, ref_g):
        assert a.dtype == torch.float32 and rel(a, r) < 5e-3, name


def _run(dec: ConvDecoder, x, mask, pad):
    dec.zero_grad()
    xs = x.detach().clone().requires_grad_()
    out = dec(xs, mask, pad)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return [out.detach(), xs.grad] + [p.grad.clone() for p in dec.parameters()]


@pytest.mark.parametrize("grid", [(4, 5), None])
@pytest.mark.parametrize("act", ["erf", "tanh"])
def test_decoder_triton_matches_torch(grid, act):
    """The whole decoder, Triton path against the torch path with the same weights: 2-D with
    a first layer that widens (no residual there), 1-D with padding; the exact GELU runs
    the fused layer, another activation the convolution alone (LayerNorm/GELU as torch ops)."""
    torch.manual_seed(0)
    T = 20 if grid else 11
    dec = ConvDecoder(24, 32, 3, 3 if grid else 5, 4, grid=grid, conv_impl="torch")
    if act == "tanh":
        for layer in dec.blocks:
            layer[2] = nn.GELU(approximate="tanh")
    x = torch.randn(2, T, 24)
    mask = torch.rand(2, T) < 0.5
    pad = None if grid else torch.arange(T).expand(2, T) >= torch.tensor([[T], [T - 3]])
    ref = _run(dec, x, mask, pad)
    dec.conv_impl = "triton"
    assert dec.uses_triton(x)
    got = _run(dec, x, mask, pad)
    for i, (a, r) in enumerate(zip(got, ref)):
        assert a.shape == r.shape and rel(a, r) < 1e-5, i


def test_decoder_triton_matches_torch_under_autocast():
    """Under (float16) autocast the Triton path projects the last layer's float16 copy (and
    sends the projection's float16 gradient back through it): within float16 rounding of the
    torch path, whose autocast casts the float32 output (measured: output 7e-4, gradients
    8e-4 of the largest at most)."""
    torch.manual_seed(0)
    dec = ConvDecoder(32, 32, 3, 3, 4, grid=(4, 5), conv_impl="torch")
    x = torch.randn(2, 20, 32)
    mask = torch.rand(2, 20) < 0.5

    def run():
        with torch.autocast("cpu", dtype=torch.float16):
            return _run(dec, x, mask, None)

    ref = run()
    dec.conv_impl = "triton"
    got = run()
    assert got[0].dtype == ref[0].dtype == torch.float16
    for i, (a, r) in enumerate(zip(got, ref)):
        assert a.dtype == r.dtype and rel(a.float(), r.float()) < 5e-3, i


def test_suspended_runs_the_torch_convolution():
    """``data2vec bench`` counts FLOPs inside ``suspended()``: the torch path runs there."""
    dec = ConvDecoder(8, 8, 1, 3, 2, grid=(2, 2), conv_impl="triton")
    x = torch.randn(1, 4, 8)
    assert dec.uses_triton(x)
    with token_conv.suspended():
        assert not dec.uses_triton(x)
    assert dec.uses_triton(x)
