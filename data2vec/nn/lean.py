"""Memory-lean versions of standard layers: the same values, fewer bytes kept for backward.

Autograd keeps every tensor a backward formula needs until the backward pass reaches it. For
the shapes of data2vec 2.0 (thousands of tokens x 3072 hidden units per block, 16 clones) the
activations saved for backward are most of the peak memory of a training step, so each op here
trades a cheap recomputation or a narrower dtype for a full-size saved tensor:

* :func:`gelu_linear` - ``fc2(gelu(h))`` saves ``h`` only; GELU is recomputed in backward
  (the default MLP otherwise keeps both ``h`` and ``gelu(h)``: 2 x 4 x width per token).
* :class:`LeanDropout` - the CPU dropout of PyTorch keeps a float32 noise tensor; this one
  keeps a bool mask (4x smaller).
* :func:`dropout_attention` - the composite attention PyTorch runs on CPU when attention
  dropout is on, with a bool dropout mask and the dropped probabilities recomputed in backward.
* :func:`checkpoint_elementwise` - runs a chain of cheap elementwise modules (norm ->
  activation) without saving their intermediates (the decoder's LayerNorm + GELU).
* :func:`conv1d_after` - ``conv(pre(x))`` for a cheap elementwise ``pre`` (norm -> GELU of the
  previous conv layer) saving ``x`` only: ``pre`` is recomputed once in backward and serves
  both the convolution's weight gradient and its own backward (the speech CNN and positional
  convolution keep one tensor per layer instead of three).

The dropout layers draw their masks with :func:`keep_mask` (32 random bits per element against
a threshold, from NumPy's SFC64 generator seeded by torch's), not with PyTorch's CPU
``bernoulli_``, which takes 64 bits and ~5.8 ns per element from its generator, one thread: in
a text-v2-base step that was 0.8 s for the attention masks.

Given the same dropout mask, every function returns bit-identical values and gradients to the
plain composition (``tests/test_nn_lean.py``); under bf16 autocast the attention's plain
composition is the reference implementation's (see :func:`attention_probs`), not SDPA's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from data2vec.nn import conv_taps


def linear_grads(
    go: Tensor, x2d: Tensor | None, weight: Tensor, bias_dtype: torch.dtype | None, need: tuple
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``F.linear(x, weight, bias)`` on the flattened input, as autograd forms them.

    Args:
        go: ``(tokens, out)`` output gradient in the compute dtype.
        x2d: ``(tokens, in)`` input, already in the compute dtype (None when the weight
            gradient is not wanted).
        weight: ``(out, in)`` master weight (cast to ``go``'s dtype here, as autocast did).
        bias_dtype: dtype of the bias, or None without one.
        need: whether the input, weight and bias gradients are wanted.

    Returns:
        ``(grad_x2d, grad_weight, grad_bias)``, each None where not wanted.
    """
    need_x, need_w, need_b = need
    grad_x = go.mm(weight.to(go.dtype)) if need_x else None
    grad_w = go.t().mm(x2d).to(weight.dtype) if need_w and x2d is not None else None
    grad_b = go.sum(0).to(bias_dtype) if need_b and bias_dtype is not None else None
    return grad_x, grad_w, grad_b


class _GeluLinear(torch.autograd.Function):
    """``F.linear(F.gelu(h), weight, bias)`` saving ``h`` instead of ``gelu(h)``."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        # Under autocast F.linear runs in the autocast dtype; backward must use the same one.
        out = F.linear(F.gelu(h), weight, bias)
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.compute_dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        h, weight = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad
        go = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        # gelu(h) recomputed: one elementwise pass instead of a saved copy
        g2d = F.gelu(h).to(ctx.compute_dtype).reshape(-1, h.shape[-1]) if need_w else None
        bias_dtype = ctx.bias_dtype if ctx.has_bias else None
        grad_g, grad_w, grad_b = linear_grads(go, g2d, weight, bias_dtype, (need_h, need_w, need_b))
        grad_h = None
        if grad_g is not None:
            # Written over grad_g (made here; each element is read before it is written): the
            # same kernel and values, one (tokens, hidden) tensor fewer to allocate. Where freed
            # heap pages go back to the OS (data2vec/_runtime.py, memory mode) a fresh one is
            # faulted in page by page: audio-v2-base b4, 11 calls, 157 -> 29 ms per step.
            gg = grad_g.view(h.shape).to(h.dtype)
            grad_h = torch.ops.aten.gelu_backward.grad_input(gg, h, grad_input=gg)
        return grad_h, grad_w, grad_b


def gelu_linear(h: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(F.gelu(h), weight, bias)`` that keeps only ``h`` for backward.

    Args:
        h: ``(..., hidden)`` pre-activation (the first MLP layer's output).
        weight: ``(out, hidden)``; bias: ``(out,)`` or None.

    Returns:
        ``(..., out)``.
    """
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        return F.linear(F.gelu(h), weight, bias)  # nothing to save: the plain ops are enough
    return _GeluLinear.apply(h, weight, bias)


def _keep_threshold(p: float) -> int:
    """Signed 32-bit threshold ``t``: a uniform int32 is below it with probability
    ``round((1 - p) * 2**32) / 2**32``, i.e. ``1 - p`` to within ``2**-33``."""
    kept = min(round((1.0 - p) * 2**32), 2**32 - 1)  # 2**32 itself does not fit in int32
    return kept - 2**31


def random_words(n: int, device: torch.device) -> Tensor:
    """``n`` int64 words of 64 uniform random bits, seeded from ``device``'s default generator
    (``torch.manual_seed`` reproduces them; every call draws anew).

    On the CPU they come from NumPy's SFC64 generator, seeded with one 64-bit draw of torch's:
    2.2-2.7 ms per 614k words here against 5.7-9.1 ms for ``random_`` on an int64 tensor
    (PyTorch's CPU generator, a Mersenne Twister on one thread). All dropout masks of one step,
    drawn and compared, alternating in one process: text-v2-base b8 0.56-0.69 -> 0.38-0.40 s,
    audio-v2-base b4 0.19-0.25 -> 0.14-0.15 s.
    """
    if device.type != "cpu":
        return torch.empty(n, dtype=torch.int64, device=device).random_(-(2**63), None)
    seed = int(torch.empty((), dtype=torch.int64).random_())  # [0, 2**63), from torch's state
    words = np.random.SFC64(seed).random_raw(n)  # uint64
    return torch.from_numpy(words.view(np.int64))


def keep_mask(like: Tensor, p: float) -> Tensor:
    """A dropout mask for ``like``: bool, contiguous, True (kept) with probability ``1 - p``.

    One 64-bit word of :func:`random_words` gives two elements their 32 random bits, compared
    with a threshold. PyTorch's CPU dropout draws a double per element instead (``bernoulli_``:
    13.6 ns per element here, against 3.3 ns for this mask, drawn and compared); CUDA's
    compares 24-bit floats. The masks are not the ones ``torch.nn.Dropout`` would draw.
    """
    n = like.numel()
    words = random_words((n + 1) // 2, like.device)
    return words.view(torch.int32)[:n].view(like.shape) < _keep_threshold(p)


def dropout_noise(keep: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """``keep / (1 - p)`` in ``dtype``: the factor inverted dropout multiplies by."""
    return keep.to(dtype).div_(1.0 - p)


def apply_keep(x: Tensor, keep: Tensor, p: float) -> Tensor:
    """``x * dropout_noise(keep, p, x.dtype)`` with the same bits, in two passes and one new
    tensor instead of three and two: ``x * keep`` (exact: ``x`` or a signed zero), then scaled
    in place by the factor :func:`dropout_noise` gives a kept element."""
    return x.mul(keep).mul_(dropout_noise(keep.new_ones(()), p, x.dtype))


class _BoolMaskDropout(torch.autograd.Function):
    """Inverted dropout (``x * keep / (1 - p)``, mask from :func:`keep_mask`), bool saved."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        keep = keep_mask(x, p)
        ctx.save_for_backward(keep)
        ctx.p = p
        return apply_keep(x, keep, p)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return apply_keep(grad, keep, ctx.p), None


def lean_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)`` saving a bool mask on CPU (CUDA's fused kernel does too)."""
    if not training or p == 0.0 or x.device.type != "cpu" or not torch.is_grad_enabled():
        return F.dropout(x, p, training)
    if p == 1.0:
        return x * 0.0
    return _BoolMaskDropout.apply(x, p)


class LeanDropout(nn.Dropout):
    """``nn.Dropout`` with a 1-byte saved mask and faster draws on CPU (see module docs)."""

    def forward(self, x: Tensor) -> Tensor:
        return lean_dropout(x, self.p, self.training)


def dropout_or_identity(p: float) -> nn.Module:
    """A :class:`LeanDropout` for ``p > 0``, else ``nn.Identity`` (a disabled feature)."""
    return LeanDropout(p) if p > 0 else nn.Identity()


def dropped_probs(
    probs: Tensor, keep: Tensor, p: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The inverted-dropout factor ``(B, H, T, S)`` and ``dropout(probs)`` in the product's
    ``dtype``, shaped ``(B*H, T, S)`` for ``bmm``."""
    B, H, T, S = probs.shape
    noise = dropout_noise(keep, p, probs.dtype)
    return noise, (probs * noise).to(dtype).reshape(B * H, T, S)


def dropped_product_grads(
    g3: Tensor, probs: Tensor, noise: Tensor, dropped: Tensor, v3: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of ``bmm(dropped, v3)`` for ``g3: (B*H, T, d)``, through the dropout to
    ``probs``: ``(grad_probs (B, H, T, S), grad_v (B, H, S, d))``. bmm's own backward formulas,
    so the gradients are bit-identical to autograd's."""
    B, H, T, S = probs.shape
    grad_probs = g3.bmm(v3.transpose(1, 2)).view(B, H, T, S).to(probs.dtype) * noise
    grad_v = dropped.transpose(1, 2).bmm(g3).view(B, H, S, -1)
    return grad_probs, grad_v


class _DropoutMatmul(torch.autograd.Function):
    """``dropout(probs) @ v`` keeping ``probs`` (softmax keeps it anyway), a bool mask and ``v``.

    Plain autograd would also keep the float noise and the dropped probabilities: two more
    ``(B, H, T, T)`` tensors per block.
    """

    @staticmethod
    def forward(ctx, probs: Tensor, v: Tensor, p: float) -> Tensor:  # type: ignore[override]
        keep = keep_mask(probs, p)
        B, H, T, S = probs.shape
        v3 = v.reshape(B * H, S, v.shape[-1])  # the copy aten::matmul makes and keeps
        out = torch.bmm(dropped_probs(probs, keep, p, v.dtype)[1], v3)  # in v's dtype
        ctx.save_for_backward(probs, keep, v3)
        ctx.p = p
        return out.view(B, H, T, v.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        probs, keep, v3 = ctx.saved_tensors
        B, H, T = probs.shape[:3]
        noise, dropped = dropped_probs(probs, keep, ctx.p, v3.dtype)
        grad_probs, grad_v = dropped_product_grads(
            grad.reshape(B * H, T, -1), probs, noise, dropped, v3
        )
        return grad_probs, grad_v, None


def _softmax(x: Tensor) -> Tensor:
    # aten::_safe_softmax is what the composite attention uses (0, not NaN, for a fully masked
    # row); plain softmax is the fallback should a PyTorch version drop the private op.
    safe = getattr(torch.ops.aten, "_safe_softmax", None)
    return safe(x, -1) if safe is not None else x.softmax(-1)


def dropout_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, p: float
) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=p)`` for CPU training.

    With dropout PyTorch's CPU attention falls back to a composite of matmul, softmax and
    dropout. For float32 inputs this runs the same ops, so with the same dropout mask the values
    and gradients are bit-identical, but keeps ~1.75 fewer ``(B, H, T, T)`` tensors for backward
    and draws the mask with :func:`keep_mask`. For bf16/fp16 inputs (autocast) the two products
    stay in that dtype, see :func:`attention_probs`.

    Args:
        q, k, v: ``(B, H, T, d)``.
        attn_mask: additive mask broadcastable to ``(B, H, T, T)``, or None.
        p: attention dropout probability, ``0 < p < 1``.

    Returns:
        ``(B, H, T, d)`` in the dtype of ``q``.
    """
    probs, v = attention_probs(q, k, v, attn_mask)
    with torch.autocast(q.device.type, enabled=False):
        out = _DropoutMatmul.apply(probs, v, p)
    return out.to(q.dtype)


def attention_probs(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Float32 attention probabilities ``(B, H, T, T)`` and the ``v`` to apply them to.

    Float32 inputs: PyTorch's CPU composite attention, op for op. bf16/fp16 inputs (autocast):
    the logits' product (and, in the callers, the product with ``v``) stays in that dtype and the
    mask and softmax run in float32, as the reference implementation's attention computes under
    autocast (fairseq data2vec 2.0 ``AltAttention``: ``q @ k^T`` and ``attn @ v`` in the input
    dtype, ``softmax(dtype=float32)``). PyTorch's composite would instead upcast q, k and v to
    float32 and run both products there, at under half the bf16 matmul rate on a CPU with
    AVX512-BF16.
    """
    # Below autocast: the dtypes are chosen here, not by autocast's per-op policy.
    with torch.autocast(q.device.type, enabled=False):
        # q and k are each scaled by sqrt(1/sqrt(d)) before the product, as the composite does.
        s = math.sqrt(1.0 / math.sqrt(q.shape[-1]))
        logits = torch.matmul(q * s, k.transpose(-2, -1) * s).float()  # (B, H, T, T)
        if attn_mask is not None:
            logits.add_(attn_mask.float())
        return _softmax(logits), v


def _run_chain(x: Tensor, modules: tuple[nn.Module, ...]) -> Tensor:
    for m in modules:
        x = m(x)
    return x


def checkpoint_elementwise(x: Tensor, *modules: Callable[[Tensor], Tensor]) -> Tensor:
    """``modules[-1](...modules[0](x))`` keeping only ``x`` for backward.

    Meant for cheap elementwise chains (LayerNorm -> GELU) whose saved inputs cost more memory
    than recomputing them costs time. The modules must be deterministic (no dropout): the RNG
    state is not saved for the recomputation.
    """
    mods = tuple(modules)  # type: ignore[arg-type]
    if not torch.is_grad_enabled() or not x.requires_grad:
        return _run_chain(x, mods)
    return checkpoint(_run_chain, x, mods, use_reentrant=False, preserve_rng_state=False)


def height_one(weight: Tensor) -> Tensor:
    """A ``Conv1d`` weight ``(C_out, C_in/G, K)`` as the 2-D weight ``(C_out, C_in/G, 1, K)``
    of the same convolution: a view. oneDNN follows a channels-last input with it as it is
    (same output layout, bits and speed as a channels-last copy of the weight, which autograd
    would also keep for backward)."""
    return weight.unsqueeze(2)


def conv1d_args(conv: nn.Conv1d) -> tuple:
    """A ``Conv1d``'s ``(stride, padding, dilation, groups)``, as :func:`conv1d_any` takes them."""
    return conv.stride, conv.padding, conv.dilation, conv.groups


def _as_2d(conv_args: tuple) -> tuple:
    """``Conv1d`` (stride, padding, dilation, groups) as those of a height-one ``conv2d``."""
    stride, padding, dilation, groups = conv_args
    return (1, stride[0]), (0, padding[0]), (1, dilation[0]), groups


def conv1d_any(x: Tensor, weight: Tensor, bias: Tensor | None, conv_args: tuple) -> Tensor:
    """``F.conv1d`` of ``x: (N, C, T)``, or of ``x: (N, C, 1, T)`` in channels-last memory
    (``(N, T, C)`` rows), then as a height-one ``conv2d`` whose output keeps that layout.

    oneDNN convolves channels-last tensors as they are; a (N, C, T) tensor that is a view of
    (N, T, C) memory, as a LayerNorm over channels gives, would be copied first. The audio
    CNN keeps its activations channels-last this way (``modalities/audio.py``).

    Args:
        conv_args: a ``Conv1d``'s ``(stride, padding, dilation, groups)``.
    """
    if x.dim() == 3:
        return F.conv1d(x, weight, bias, *conv_args)
    weight, conv_args = height_one(weight), _as_2d(conv_args)
    if (
        torch.is_grad_enabled()
        and weight.requires_grad
        and not torch.is_autocast_enabled(x.device.type)  # else the convolution runs in bf16
        and conv_taps.worth_it(x, weight, conv_args)
    ):
        # strided, float32, CPU: oneDNN's weight gradient runs at a third of the matmul rate
        return conv_taps.HeightOneConv.apply(x, weight, bias, conv_args)
    return F.conv2d(x, weight, bias, *conv_args)


class _Conv1dAfter(torch.autograd.Function):
    """``F.conv1d(pre(x, *params), weight, bias, ...)`` saving ``x``, the weights and ``params``
    (``x`` may be a channels-last ``(N, C, 1, T)``, see :func:`conv1d_any`)."""

    @staticmethod
    def forward(ctx, x, pre, conv_args, weight, bias, *params):  # type: ignore[override]
        # The recomputation in backward must run under the autocast state of this forward
        # (on whatever device): record it rather than fixing a device type.
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        z = pre(x, *params)
        out = conv1d_any(z, weight, bias, conv_args)  # autocast casts z and the weights here
        ctx.save_for_backward(x, weight, *params)
        ctx.pre, ctx.conv_args = pre, conv_args
        ctx.bias_shape = None if bias is None else list(bias.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.compute_dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, *params = ctx.saved_tensors
        need = ctx.needs_input_grad
        device, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            inputs = [
                t.detach().requires_grad_(n) for t, n in zip((x, *params), need[:1] + need[5:])
            ]
            z = ctx.pre(*inputs)  # the one recomputation: cheap elementwise ops
        conv_args, w = ctx.conv_args, weight
        if x.dim() == 4:
            conv_args, w = _as_2d(conv_args), height_one(weight)
        stride, padding, dilation, groups = conv_args
        dtype = ctx.compute_dtype
        z_conv = z.detach().to(dtype)
        # The weight gradient as conv1d_any's backward takes it (the same function), so the
        # gradients are bit-identical to those of the plain composition.
        taps = need[3] and conv_taps.worth_it(z_conv, w, conv_args)  # False unless (N, C, 1, T)
        # aten::convolution's own backward, on the operands autocast gave the convolution
        grad_z, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, z_conv, w.to(dtype), ctx.bias_shape, stride, padding,
            dilation, False, [0] * (x.dim() - 2), groups,
            [any(need[:1] + need[5:]), need[3] and not taps, need[4]],
        )  # fmt: skip
        if taps:
            grad_w = conv_taps.weight_grad(grad, z_conv, w.shape[3], stride[1], padding[1])
        wanted = [t for t in inputs if t.requires_grad]
        found = iter(torch.autograd.grad(z, wanted, grad_z.to(z.dtype)) if wanted else ())
        grads = [next(found) if t.requires_grad else None for t in inputs]
        grad_w = None if grad_w is None else grad_w.reshape(weight.shape).to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(ctx.bias_dtype)
        return grads[0], None, None, grad_w, grad_b, *grads[1:]


def conv1d_after(
    x: Tensor,
    pre: Callable[..., Tensor],
    params: Sequence[Tensor],
    conv: nn.Conv1d,
) -> Tensor:
    """``conv(pre(x, *params))`` that keeps only ``x`` (and the weights) for backward.

    Plain autograd keeps ``x`` (for ``pre``'s backward), every intermediate of ``pre`` and the
    convolution's input ``pre(x)``. Here ``pre`` is recomputed once in backward, where it gives
    both the convolution's input (for the weight gradient) and its own backward. Values and
    gradients are bit-identical to the plain composition (``tests/test_nn_lean.py``).

    Args:
        x: ``(N, C, T)``, typically the previous convolution's output, or a channels-last
            ``(N, C, 1, T)`` (see :func:`conv1d_any`; the output is then one as well).
        pre: deterministic, cheap elementwise function ``pre(x, *params)`` of ``x``'s shape
            (norm -> activation -> padding mask); it must not draw random numbers.
        params: tensors ``pre`` needs gradients for (a LayerNorm's weight and bias).
        conv: a ``Conv1d`` with numeric padding and ``padding_mode="zeros"``.

    Returns:
        ``(N, C_out, T')``.
    """
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("conv1d_after needs numeric zero padding")
    tensors = (x, conv.weight, *params) + (() if conv.bias is None else (conv.bias,))
    conv_args = conv1d_args(conv)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        # nothing to save: the plain ops are enough
        return conv1d_any(pre(x, *params), conv.weight, conv.bias, conv_args)
    return _Conv1dAfter.apply(x, pre, conv_args, conv.weight, conv.bias, *params)
