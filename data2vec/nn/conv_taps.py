"""The weight gradient of a 1-D convolution over channels-last tokens as matrix products.

A height-one ``conv2d`` over ``(N, C, 1, T)`` views of ``(N, T, C)`` rows (how the speech CNN
and the 1-D decoders run, :func:`~data2vec.nn.lean.conv1d_any`) has the weight gradient

    dW[o, c, j] = sum over n, t of  g[n, t, o] * x[n, s*t + j - p, c]

which, for each tap ``j`` and sample ``n``, is one matrix product ``g_n^T @ x_n[j - p :: s]``:
the rows of ``x`` it reads are every ``s``-th row from ``j - p``, a strided view a BLAS product
reads without a copy. oneDNN's weight gradient of a strided channels-last float32 convolution
is slow on CPU: the speech CNN's layers (kernel 3 or 2, stride 2, 512 channels) take it at
38-60 GFLOP/s against 130-185 for its input gradient and for matrix products, so the whole
backward of its widest layer (4 x 512 x 6399 -> 3199, 2-core Xeon, one process, alternating)
goes from 0.66-0.90 s to 0.29-0.38 s here. With stride 1 oneDNN is faster: both gradients at
once took 0.84-1.06 s for a text decoder layer (64 x 768 x 128, kernel 9), its input gradient
alone plus the taps 1.14-1.74 s, so stride-1 convolutions are left to it.

Only float32 on the CPU, ungrouped and undilated: bf16 is fast in oneDNN (270-470 GFLOP/s
here, accumulated in float32 once per element). The input gradient stays oneDNN's. The sums
run in another order than oneDNN's: the gradient differs by float rounding only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this many output positions per sample, the per-sample products (C_out x T' x C_in) get
# small: at 199 (the CNN's sixth layer, 2 s of audio) both ways already take the same time.
MIN_POSITIONS = 32


def weight_grad(grad: Tensor, x: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """``dW`` of ``conv2d(x, W, stride=(1, stride), padding=(0, padding))`` (no groups or
    dilation), one matrix product per tap and sample.

    Args:
        grad: ``(N, C_out, 1, T')``, the gradient of the convolution's output.
        x: ``(N, C_in, 1, T)``, its input; channels-last memory is read without a copy.
        kernel, stride, padding: the convolution's width, stride and zero padding along T.

    Returns:
        ``(C_out, C_in, 1, kernel)`` in ``x``'s dtype.
    """
    n, c_in, _, t_in = x.shape
    c_out, t_out = grad.shape[1], grad.shape[3]
    rows = x.permute(0, 2, 3, 1).reshape(n, t_in, c_in)  # (N, T, C_in), a view if channels-last
    g = grad.permute(0, 2, 3, 1).reshape(n, t_out, c_out)
    taps = torch.zeros(kernel, c_out, c_in, dtype=x.dtype, device=x.device)
    for j in range(kernel):
        # output t reads input s*t + j - p: keep the t whose input row is inside [0, T)
        first = max(0, -((j - padding) // stride))
        last = min(t_out, (t_in - 1 - j + padding) // stride + 1)  # exclusive
        if last <= first:
            continue  # a tap that only ever meets padding
        start = stride * first + j - padding
        stop = start + stride * (last - first - 1) + 1
        for i in range(n):
            taps[j].addmm_(g[i, first:last].t(), rows[i, start:stop:stride])
    return taps.permute(1, 2, 0).unsqueeze(2)  # (K, C_out, C_in) -> (C_out, C_in, 1, K)


def worth_it(x: Tensor, weight: Tensor, conv_args_2d: tuple) -> bool:
    """Whether :func:`weight_grad` should take the weight gradient of ``conv2d(x, weight)``
    with these height-one ``(stride, padding, dilation, groups)``: an ungrouped, undilated,
    strided float32 CPU convolution of a ``(N, C, 1, T)`` input, with long enough outputs for
    the per-sample products to pay (see the module's docstring). The caller rules out
    autocast, which would run the convolution in another dtype."""
    if not (x.dim() == 4 and x.shape[2] == 1 and x.device.type == "cpu"):
        return False
    (_, stride), (_, padding), dilation, groups = conv_args_2d
    t_out = (x.shape[3] + 2 * padding - weight.shape[3]) // stride + 1
    return (
        x.dtype == torch.float32
        and groups == 1
        and tuple(dilation) == (1, 1)
        and stride > 1
        and t_out >= MIN_POSITIONS
    )


class HeightOneConv(torch.autograd.Function):
    """``F.conv2d`` of a ``(N, C, 1, T)`` input whose weight gradient is :func:`weight_grad`'s;
    the output and the input and bias gradients are oneDNN's, as for the plain op."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv_args_2d):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conv_args, ctx.has_bias = conv_args_2d, bias is not None
        return F.conv2d(x, weight, bias, *conv_args_2d)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, _, grad_b = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding,
            dilation, False, [0, 0], groups, [need_x, False, need_b and ctx.has_bias],
        )  # fmt: skip
        grad_w = weight_grad(grad, x, weight.shape[3], stride[1], padding[1]) if need_w else None
        return grad_x, grad_w, grad_b, None
