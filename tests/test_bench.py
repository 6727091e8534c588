import torch
from torch.utils.flop_counter import FlopCounterMode

from data2vec.bench import _conv_backward_flops


def _count(conv, x, mapping=None):
    with FlopCounterMode(display=False, custom_mapping=mapping or {}) as c:
        conv(x).sum().backward()
    return c.get_total_flops()


def test_grouped_conv_backward_counts_two_forwards():
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=8)
    x = torch.randn(2, 32, 5, 5, requires_grad=True)
    forward = 2 * 2 * (32 * 4 * 3 * 3) * 25  # 2 * N * prod(grouped weight) * out pixels
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    assert _count(conv, x, mapping) == 3 * forward  # forward + grad input + grad weight


def test_dense_conv_matches_torch_counter():
    conv = torch.nn.Conv1d(4, 6, 5, padding=2)
    x = torch.randn(3, 4, 10, requires_grad=True)
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    assert _count(conv, x, mapping) == _count(conv, x)
