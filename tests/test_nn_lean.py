"""The memory-lean layers compute exactly what the plain compositions compute, and save less."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data2vec.models.decoders import ConvDecoder
from data2vec.nn.block import Mlp
from data2vec.nn.lean import (
    LeanDropout,
    _keep_threshold,
    apply_keep,
    checkpoint_elementwise,
    conv1d_after,
    conv1d_any,
    conv1d_args,
    dropout_attention,
    dropout_noise,
    gelu_linear,
    keep_mask,
    random_words,
)
from data2vec.targets import TopKTargets, regression_loss
from tests.conftest import reference_attention_bf16


def _saved_bytes(fn, *args):
    """Bytes of the distinct storages autograd saves while running ``fn(*args)``."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t.detach()  # not t: a saved output would hold its own grad_fn in a cycle

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(storages.values())


def _grads(out, *tensors):
    return torch.autograd.grad(out, tensors, torch.randn(out.shape, generator=_gen(7)))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_gelu_linear__bit_identical_to_linear_of_gelu_and_saves_less():
    fc2 = nn.Linear(32, 8)
    h = torch.randn(3, 5, 32, requires_grad=True)
    plain, plain_bytes = _saved_bytes(lambda: fc2(F.gelu(h)))
    lean, lean_bytes = _saved_bytes(lambda: gelu_linear(h, fc2.weight, fc2.bias))
    assert torch.equal(plain, lean)
    for a, b in zip(_grads(plain, h, fc2.weight, fc2.bias), _grads(lean, h, fc2.weight, fc2.bias)):
        assert torch.equal(a, b)
    assert lean_bytes <= plain_bytes - h.numel() * 4  # gelu(h) is no longer kept


def test_gelu_linear__same_as_plain_under_bf16_autocast():
    fc2 = nn.Linear(32, 8)
    h = torch.randn(4, 32).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = fc2(F.gelu(h))
        lean = gelu_linear(h, fc2.weight, fc2.bias)
    assert lean.dtype == plain.dtype == torch.bfloat16
    assert torch.equal(plain, lean)
    grads_plain = _grads(plain, h, fc2.weight, fc2.bias)
    grads_lean = _grads(lean, h, fc2.weight, fc2.bias)
    for a, b in zip(grads_plain, grads_lean):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    assert grads_lean[1].dtype == torch.float32  # master-weight gradients stay fp32


def test_mlp__recomputing_path_matches_plain_path():
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    assert mlp.recompute_act
    x = torch.randn(2, 7, 16, requires_grad=True)
    lean = mlp(x)
    mlp.recompute_act = False
    plain = mlp(x)
    assert torch.equal(lean, plain)
    params = list(mlp.parameters())
    for a, b in zip(_grads(lean, x, *params), _grads(plain, x, *params)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_lean_dropout__with_pytorchs_draws_equals_nn_dropout(p, torch_dropout_draws):
    x = torch.randn(4, 9, 16, requires_grad=True)
    torch.manual_seed(3)
    plain, plain_bytes = _saved_bytes(nn.Dropout(p).train(), x)
    torch.manual_seed(3)
    lean, lean_bytes = _saved_bytes(LeanDropout(p).train(), x)
    assert torch.equal(plain, lean)
    assert torch.equal(_grads(plain, x)[0], _grads(lean, x)[0])
    assert lean_bytes == x.numel()  # one bool per element instead of a float32 noise tensor
    assert plain_bytes == 4 * x.numel()
    assert torch.equal(LeanDropout(p).eval()(x), x)


def test_keep_threshold__hand_computed():
    # kept when a uniform int32 is below the threshold: 2**32 * (1 - p) of the 2**32 values
    assert _keep_threshold(0.5) == 0
    assert _keep_threshold(0.75) == 2**30 - 2**31
    assert _keep_threshold(0.1) == 3865470566 - 2**31  # round(0.9 * 2**32)
    assert _keep_threshold(1e-12) == 2**31 - 1  # 2**32 does not fit: one value in 2**32 drops


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask__rate_and_independent_neighbours(p):
    torch.manual_seed(0)
    n = 1_000_001  # odd: the last 64-bit draw gives one element
    keep = keep_mask(torch.empty(n), p).double()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    # the two halves of one 64-bit draw are independent: P(both kept) = (1 - p)**2
    both = (keep[0:-1:2] * keep[1::2]).mean().item()
    q = (1 - p) ** 2
    assert abs(both - q) < 5 * (q * (1 - q) / (n // 2)) ** 0.5


def test_random_words__every_bit_uniform_and_reproducible_from_torchs_seed():
    torch.manual_seed(3)
    words = random_words(200_000, torch.device("cpu"))
    assert words.dtype == torch.int64 and words.shape == (200_000,)
    bits = (words.unsqueeze(1) >> torch.arange(64)) & 1  # (n, 64): bit k of every word
    ones = bits.double().mean(0)
    assert (ones - 0.5).abs().max().item() < 5 * (0.25 / 200_000) ** 0.5
    torch.manual_seed(3)
    assert torch.equal(random_words(200_000, torch.device("cpu")), words)
    assert not torch.equal(random_words(200_000, torch.device("cpu")), words)


def test_keep_mask__shape_seed_and_fresh_draws():
    like = torch.empty(6, 5, 7).transpose(0, 2)  # non-contiguous input: a contiguous mask
    torch.manual_seed(4)
    a, b = keep_mask(like, 0.3), keep_mask(like, 0.3)
    torch.manual_seed(4)
    assert torch.equal(keep_mask(like, 0.3), a)  # reproducible from the seed
    assert a.shape == like.shape and a.dtype == torch.bool and a.is_contiguous()
    assert not torch.equal(a, b)  # each call draws anew


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_lean_dropout__inverted_dropout_with_its_own_mask(p):
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(9)
    out = LeanDropout(p).train()(x)
    torch.manual_seed(9)
    keep = keep_mask(x, p)
    assert torch.equal(out, torch.where(keep, x * (1 / (1 - p)), 0.0))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, keep.float() / (1 - p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_keep__bits_of_multiplying_by_the_noise_tensor(dtype):
    """Signed zeros, infinities and NaNs included (inf * 0 is NaN either way)."""
    x = torch.randn(50, 40).to(dtype)
    x[0, :4] = torch.tensor([-1.0, float("inf"), float("nan"), -0.0])
    keep = keep_mask(x, 0.3)
    keep[0, :4] = torch.tensor([False, False, True, False])
    ints = torch.int16 if dtype == torch.bfloat16 else torch.int32
    ref = x * dropout_noise(keep, 0.3, dtype)
    assert torch.equal(apply_keep(x, keep, 0.3).view(ints), ref.view(ints))


def test_checkpoint_elementwise__same_gradients_fewer_saved_tensors():
    norm, act = nn.LayerNorm(12), nn.GELU()
    x = torch.randn(3, 10, 12, requires_grad=True)
    plain, plain_bytes = _saved_bytes(lambda: act(norm(x)))
    lean, lean_bytes = _saved_bytes(lambda: checkpoint_elementwise(x, norm, act))
    assert torch.equal(plain, lean)
    params = [x, norm.weight, norm.bias]
    for a, b in zip(_grads(plain, *params), _grads(lean, *params)):
        assert torch.equal(a, b)
    assert lean_bytes < plain_bytes


def test_conv_decoder__gradients_equal_the_plain_layer_stack():
    torch.manual_seed(0)
    dec = ConvDecoder(16, 16, layers=3, kernel=3, groups=4, grid=(4, 4))
    x = torch.randn(2, 16, 16, requires_grad=True)
    out = dec(x)

    def plain(x):  # the same stack without recomputation
        h = x.transpose(1, 2).reshape(2, 16, 4, 4)
        for layer in dec.blocks:
            h = layer(h) + h
        return dec.proj(h.reshape(2, 16, 16).transpose(1, 2))

    ref = plain(x)
    assert torch.equal(out, ref)
    params = [x, *dec.parameters()]
    for a, b in zip(_grads(out, *params), _grads(ref, *params)):
        assert torch.equal(a, b)


def test_regression_loss__l2_bit_identical_to_mse_loss_sum():
    pred = torch.randn(50, 24, requires_grad=True)
    target = torch.randn(50, 24)
    ours = regression_loss(pred, target, scale=1.0)
    ref = F.mse_loss(pred, target, reduction="sum")
    assert torch.equal(ours, ref)
    assert torch.equal(*(torch.autograd.grad(v, pred)[0] for v in (ours, ref)))


def test_top_k_targets__checks_the_layer_count():
    acc = TopKTargets(3, 2, "instance", "none")
    acc.add(torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match="1 of 3"):
        acc.result()
    acc.add(torch.randn(1, 4, 2))
    acc.add(torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match="more than"):
        acc.add(torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match="top_k=4"):
        TopKTargets(3, 4, "instance", "none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_attention__bit_identical_to_the_plain_composite(dtype, torch_dropout_draws):
    """float32: SDPA's own CPU composite. bf16 autocast: the reference implementation's
    attention (bf16 products, float32 softmax), close to SDPA's float32 composite."""
    q, k, v = (torch.randn(2, 3, 6, 4, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 3, 6, 6, requires_grad=True)  # e.g. ALiBi with a learned scale
    bf16 = dtype == torch.bfloat16
    outs = []
    for fn in ("sdpa", "reference", "lean"):
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            args = [t.to(dtype) for t in (q, k, v, bias)]
            if fn == "lean":
                outs.append(dropout_attention(*args, 0.3))
            elif fn == "sdpa":
                outs.append(F.scaled_dot_product_attention(*args[:3], args[3], dropout_p=0.3))
            else:
                outs.append(reference_attention_bf16(*args, 0.3) if bf16 else outs[0])
    sdpa, ref, lean = outs
    assert lean.dtype == ref.dtype == sdpa.dtype == dtype
    assert torch.equal(ref, lean)
    for a, b in zip(_grads(ref, q, k, v, bias), _grads(lean, q, k, v, bias)):
        assert torch.equal(a, b)
    if bf16:  # the same attention, rounded differently
        assert not torch.equal(sdpa, lean)
        torch.testing.assert_close(lean, sdpa, rtol=2e-2, atol=2e-2)


def _plain_norm_gelu(y, weight, bias):
    return F.gelu(F.layer_norm(y.transpose(1, 2), weight.shape, weight, bias, 1e-5)).transpose(1, 2)


@pytest.mark.parametrize("groups,bias,stride", [(1, False, 2), (4, True, 1)])
def test_conv1d_after__bit_identical_to_conv_of_norm_gelu_and_saves_one_tensor(
    groups, bias, stride
):
    torch.manual_seed(0)
    conv = nn.Conv1d(8, 8, 3, stride=stride, padding=1, groups=groups, bias=bias)
    norm = nn.LayerNorm(8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 33, requires_grad=True)
    params = (norm.weight, norm.bias)
    plain, plain_bytes = _saved_bytes(lambda: conv(_plain_norm_gelu(x, *params)))
    lean, lean_bytes = _saved_bytes(lambda: conv1d_after(x, _plain_norm_gelu, params, conv))
    assert torch.equal(plain, lean)
    wrt = (x, *params, *conv.parameters())
    for a, b in zip(_grads(plain, *wrt), _grads(lean, *wrt)):
        assert torch.equal(a, b)
    # plain keeps x, the LayerNorm output and the GELU output; lean keeps x only
    assert lean_bytes <= plain_bytes - 2 * x.numel() * 4


def test_conv1d_after__same_as_plain_under_bf16_autocast():
    torch.manual_seed(0)
    conv, norm = nn.Conv1d(8, 4, 3), nn.LayerNorm(8)
    x = torch.randn(2, 8, 17, requires_grad=True)
    params = (norm.weight, norm.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = conv(_plain_norm_gelu(x, *params))
        lean = conv1d_after(x, _plain_norm_gelu, params, conv)
    assert lean.dtype == plain.dtype == torch.bfloat16
    assert torch.equal(plain, lean)
    wrt = (x, *params, *conv.parameters())
    for a, b in zip(_grads(plain, *wrt), _grads(lean, *wrt)):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


def test_audio_cnn_and_positional_conv__gradients_equal_the_plain_layer_stack():
    from data2vec.modalities.audio import FeatureEncoder, PositionalConv, _first_conv, _norm_gelu

    torch.manual_seed(0)
    cnn = FeatureEncoder(16, 24)
    for layer in cnn.conv_layers:  # non-trivial LayerNorm affines
        nn.init.normal_(layer.norm.weight)
        nn.init.normal_(layer.norm.bias)
    wave = torch.randn(2, 3200, requires_grad=True)

    def plain_cnn(w):  # the same channels-last ops one after the other, nothing recomputed
        first, *rest = cnn.conv_layers
        y = _first_conv(w, first.conv)
        x = _norm_gelu(y, first.norm.weight, first.norm.bias, first.norm.eps)
        for layer in rest:
            conv = layer.conv
            y = conv1d_any(x, conv.weight, None, conv1d_args(conv))
            x = _norm_gelu(y, layer.norm.weight, layer.norm.bias, layer.norm.eps)
        return cnn.proj(cnn.norm(x.squeeze(2).transpose(1, 2)))

    def conv_layers(w):  # as ConvLayer.forward runs them: (B, C, T), F.conv1d
        x = w.unsqueeze(1)
        for layer in cnn.conv_layers:
            x = layer(x)
        return cnn.proj(cnn.norm(x.transpose(1, 2)))

    plain, plain_bytes = _saved_bytes(plain_cnn, wave)
    lean, lean_bytes = _saved_bytes(cnn, wave)
    assert torch.equal(plain, lean)
    wrt = (wave, *cnn.parameters())
    for a, b in zip(_grads(plain, *wrt), _grads(lean, *wrt)):
        assert torch.equal(a, b)
    assert lean_bytes < plain_bytes / 2
    # the channels-last layout computes the same convolutions, summed in another order
    lean, ncl = cnn(wave), conv_layers(wave)
    torch.testing.assert_close(lean, ncl, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(lean, *wrt), _grads(ncl, *wrt)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))

    pos = PositionalConv(24, 3, 5, 4, exact_padding=True)
    x = lean.detach().requires_grad_()
    pad = torch.zeros(x.shape[:2], dtype=torch.bool)
    pad[1, -3:] = True
    keep = (~pad).unsqueeze(1).float()

    def plain_pos(x, channels_last=True):
        h = x.transpose(1, 2).unsqueeze(2) if channels_last else x.transpose(1, 2)
        mask = keep.unsqueeze(2) if channels_last else keep
        for conv in pos.layers:
            h = F.gelu(pos.norm(conv1d_any(h * mask, conv.weight, conv.bias, conv1d_args(conv))))
        return (h.squeeze(2) if channels_last else h).transpose(1, 2)

    plain, plain_bytes = _saved_bytes(plain_pos, x)
    lean, lean_bytes = _saved_bytes(pos, x, pad)
    assert torch.equal(plain, lean)
    wrt = (x, *pos.parameters())
    for a, b in zip(_grads(plain, *wrt), _grads(lean, *wrt)):
        assert torch.equal(a, b)
    # per layer: the conv output only, not also the masked input and the LayerNorm output
    assert lean_bytes <= plain_bytes - 5 * x.numel() * 4
    # and the same as (N, D, T) convolutions, to rounding
    lean, ncl = pos(x, pad), plain_pos(x, channels_last=False)
    torch.testing.assert_close(lean, ncl, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(lean, *wrt), _grads(ncl, *wrt)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_audio_cnn_and_positional_conv__backward_under_flop_counter():
    """The recomputation inside backward runs no module, so module hooks (``FlopCounterMode``'s
    tracker, as ``data2vec bench`` uses it) neither fire there nor break it."""
    from torch.utils.flop_counter import FlopCounterMode

    from data2vec.modalities.audio import FeatureEncoder, PositionalConv

    cnn, pos = FeatureEncoder(8, 16), PositionalConv(16, 2, 3, 4, exact_padding=True)
    for _ in range(2):  # counted, then plain again
        with FlopCounterMode(display=False) as counter:
            local = cnn(torch.randn(2, 1600))
            pos(local, torch.zeros(local.shape[:2], dtype=torch.bool)).sum().backward()
        assert counter.get_total_flops() > 0
    local = cnn(torch.randn(2, 1600))
    pos(local, torch.zeros(local.shape[:2], dtype=torch.bool)).sum().backward()
