import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from data2vec.models.decoders import ConvDecoder


def manual(decoder: ConvDecoder, x: torch.Tensor) -> torch.Tensor:
    N, T, D = x.shape
    h = x.transpose(1, 2)
    if decoder.grid is not None:
        h = h.reshape(N, D, *decoder.grid)
    for block in decoder.blocks:
        conv = block[0]
        out = conv(h)
        out = F.layer_norm(out.movedim(1, -1), out.shape[1:2], eps=1e-5).movedim(-1, 1)
        out = F.gelu(out)
        h = out + h if out.shape[1] == h.shape[1] else out  # residual only when widths match
    return decoder.proj(h.reshape(N, h.shape[1], T).transpose(1, 2))


def test_conv_decoder_2d__shapes_and_reference():
    dec = ConvDecoder(in_dim=12, dim=8, layers=3, kernel=3, groups=4, grid=(3, 5))
    x = torch.randn(2, 15, 12)
    y = dec(x)
    assert y.shape == (2, 15, 12)
    torch.testing.assert_close(y, manual(dec, x))
    assert isinstance(dec.blocks[0][0], torch.nn.Conv2d)


def test_conv_decoder_1d__shapes_and_reference():
    dec = ConvDecoder(in_dim=8, dim=8, layers=2, kernel=5, groups=2)
    x = torch.randn(3, 11, 8)
    torch.testing.assert_close(dec(x), manual(dec, x))
    assert isinstance(dec.blocks[0][0], torch.nn.Conv1d)


class _ConvLayouts(TorchDispatchMode):
    """Whether each convolution's output (forward) and input gradient (backward) is stored
    as ``(N, T, C)`` rows, i.e. is channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.token_rows: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in ("convolution", "convolution_backward"):
            y = out[0] if isinstance(out, tuple) else out
            self.token_rows.append((name, y.movedim(1, -1).is_contiguous()))
        return out


def test_conv_decoder_1d__convolutions_keep_the_tokens_channels_last():
    # oneDNN convolves channels-last activations as they are; the stack feeds it (N, C, 1, T)
    # views of the (N, T, C) tokens, so outputs and gradients stay token rows (a Conv1d on
    # the (N, C, T) view returned channels-first tensors that the LayerNorms copied back).
    torch.manual_seed(0)
    dec = ConvDecoder(in_dim=8, dim=8, layers=2, kernel=5, groups=2)
    x = torch.randn(3, 11, 8, requires_grad=True)
    with _ConvLayouts() as layouts:
        out = dec(x)
        out.sum().backward()
    assert [n for n, _ in layouts.token_rows] == ["convolution"] * 2 + ["convolution_backward"] * 2
    assert all(rows for _, rows in layouts.token_rows), layouts.token_rows
    got = [x.grad, *(p.grad for p in dec.parameters())]
    x.grad = None
    dec.zero_grad()
    ref = manual(dec, x)  # Conv1d on (N, C, T)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, [x.grad, *(p.grad for p in dec.parameters())]):
        torch.testing.assert_close(a, b)


def test_conv_decoder__no_residual_when_disabled():
    dec = ConvDecoder(in_dim=8, dim=8, layers=1, kernel=3, groups=1, residual=False)
    x = torch.randn(1, 6, 8)
    h = F.gelu(F.layer_norm(dec.blocks[0][0](x.transpose(1, 2)).transpose(1, 2), (8,)))
    torch.testing.assert_close(dec(x), dec.proj(h))


def test_conv_decoder__mask_projects_only_masked_rows():
    dec = ConvDecoder(in_dim=6, dim=4, layers=2, kernel=3, groups=2, grid=(2, 2))
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    torch.testing.assert_close(dec(x, mask), dec(x)[mask])


def test_conv_decoder__two_layer_projection():
    dec = ConvDecoder(
        in_dim=6, dim=4, layers=1, kernel=3, groups=1, projection_layers=2, projection_ratio=2.0
    )
    assert [m.out_features for m in dec.proj if isinstance(m, torch.nn.Linear)] == [8, 6]
