"""Two adjacent ops run as one, so that autograd keeps one tensor fewer between them.

A post-LN block keeps ~12 ``(tokens, width)`` tensors per layer for backward (see
``benchmarks/saved_activations.py``). Two of them are inputs of a linear layer that can be
recomputed in backward from what the op before it keeps anyway:

* :func:`layer_norm_linear` - ``y = LayerNorm(z)`` and ``fc1(y)``: the LayerNorm keeps ``z``
  (and its per-token mean and 1/std), the linear layer would keep ``y`` as well. Here ``y`` is
  recomputed from ``z`` in backward.
* :func:`dropout_attention_proj` - the attention output ``dropout(probs) @ v`` and the output
  projection: the attention keeps ``probs``, its dropout mask and ``v``, the projection would
  keep the product as well. Here the product is recomputed in backward (one batched matrix
  product of ``T x T x d`` per head, a few per cent of the block's arithmetic at T <= 128).

Both compute bit-identical values and gradients to the plain composition (given the same
dropout mask), in float32 and under bf16 autocast (``tests/test_nn_lean_fused.py``): the
recomputations are the same kernels on the same inputs, and the backward formulas are the ones
autograd runs for ``aten::linear`` and ``aten::native_layer_norm``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.nn import lean
from data2vec.nn.lean import (
    attention_probs,
    dropped_probs,
    dropped_product_grads,
    linear_grads,
)


def _autocast_off(backward: Callable[..., tuple]) -> Callable[..., tuple]:
    """Run a backward with autocast off: it casts explicitly, and a backward called inside an
    autocast region (CPU autograd runs on the caller's thread) must not cast again."""

    @functools.wraps(backward)
    def run(ctx: Any, *grads: Tensor | None) -> tuple:
        with torch.autocast(ctx.device_type, enabled=False):
            return backward(ctx, *grads)

    return run


class _LayerNormLinear(torch.autograd.Function):
    """``y = layer_norm(z)``, ``h = linear(y)`` saving ``z``, mean and 1/std, not ``y``."""

    @staticmethod
    def forward(ctx, z, norm_w, norm_b, weight, bias, shape, eps):  # type: ignore[override]
        with torch.autocast(z.device.type, enabled=False):  # float32 LayerNorm, as autocast
            y, mean, rstd = torch.native_layer_norm(z, shape, norm_w, norm_b, eps)
        h = F.linear(y, weight, bias)  # under the caller's autocast, as the plain layer
        ctx.save_for_backward(z, mean, rstd, norm_w, norm_b, weight)
        ctx.shape, ctx.eps, ctx.device_type = shape, eps, z.device.type
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.compute_dtype = h.dtype
        return y, h

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_y: Tensor | None, grad_h: Tensor | None):  # type: ignore[override]
        z, mean, rstd, norm_w, norm_b, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if grad_h is not None:
            # y again: the same kernel on the same input gives the same bits
            y = torch.native_layer_norm(z, ctx.shape, norm_w, norm_b, ctx.eps)[0]
            go = grad_h.reshape(-1, grad_h.shape[-1])
            y2d = y.reshape(-1, y.shape[-1]).to(ctx.compute_dtype)
            grad_x, grad_w, grad_b = linear_grads(
                go, y2d, weight, ctx.bias_dtype, (any(need[:3]), need[3], need[4])
            )
        if grad_x is not None:  # the two uses of y add up, as in autograd's input buffer
            grad_x = grad_x.view(z.shape).to(z.dtype)
            grad_y = grad_x if grad_y is None else grad_y + grad_x
        grad_z = grad_nw = grad_nb = None
        if grad_y is not None and any(need[:3]):
            grad_z, grad_nw, grad_nb = torch.ops.aten.native_layer_norm_backward(
                grad_y, z, ctx.shape, mean, rstd, norm_w, norm_b, list(need[:3])
            )
        return grad_z, grad_nw, grad_nb, grad_w, grad_b, None, None


def layer_norm_linear(z: Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> tuple[Tensor, Tensor]:
    """``y = norm(z)`` and ``linear(y)``, keeping ``z`` but not ``y`` for backward.

    Args:
        z: ``(..., C)`` LayerNorm input.
        norm: a ``LayerNorm`` over the last dimension.
        linear: a ``Linear`` with ``C`` inputs.

    Returns:
        ``(y, linear(y))``: ``(..., C)`` and ``(..., C_out)``; ``y`` may be used further (the
        post-LN block's residual), its gradient joins the one through ``linear``.
    """
    params = (norm.weight, norm.bias, linear.weight, linear.bias)
    lean = (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (z, *params))
        # float32 (what autocast runs a LayerNorm in) or no autocast: the plain layer's dtypes
        and all(t is None or t.dtype == z.dtype for t in params[:2])
        and (z.dtype == torch.float32 or not torch.is_autocast_enabled(z.device.type))
    )
    if not lean:
        y = norm(z)
        return y, linear(y)
    shape = list(norm.normalized_shape)
    return _LayerNormLinear.apply(z, *params[:2], *params[2:], shape, norm.eps)


class _DropoutAttentionProj(torch.autograd.Function):
    """``linear(merge_heads(dropout(probs) @ v))`` saving ``probs``, a bool mask and ``v``."""

    @staticmethod
    def forward(ctx, probs, v, p, out_dtype, weight, bias):  # type: ignore[override]
        keep = lean.keep_mask(probs, p)
        B, H, _, S = probs.shape
        v3 = v.reshape(B * H, S, v.shape[-1])  # the copy aten::matmul makes
        dropped = dropped_probs(probs, keep, p, v.dtype)[1]
        with torch.autocast(probs.device.type, enabled=False):  # the product in v's dtype
            out = torch.bmm(dropped, v3)
        merged = _merge_heads(out, B, H, out_dtype)
        y = F.linear(merged, weight, bias)  # under the caller's autocast, as the plain layer
        ctx.save_for_backward(probs, keep, v3, weight)
        ctx.p, ctx.out_dtype, ctx.device_type = p, out_dtype, probs.device.type
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.compute_dtype = y.dtype
        return y

    @staticmethod
    @_autocast_off
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        probs, keep, v3, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        B, H, T = probs.shape[:3]
        noise, dropped = dropped_probs(probs, keep, ctx.p, v3.dtype)
        merged = _merge_heads(torch.bmm(dropped, v3), B, H, ctx.out_dtype)  # recomputed
        go = grad.reshape(-1, grad.shape[-1])
        x2d = merged.reshape(-1, merged.shape[-1]).to(ctx.compute_dtype)
        grad_m, grad_w, grad_b = linear_grads(
            go, x2d, weight, ctx.bias_dtype, (need[0] or need[1], need[4], need[5])
        )
        grad_probs = grad_v = None
        if grad_m is not None:
            d = v3.shape[-1]
            # merge_heads backward, then the cast back to the product's dtype, then the
            # product's backward, shared with lean._DropoutMatmul
            g3 = grad_m.view(B, T, H, d).transpose(1, 2).to(v3.dtype).reshape(B * H, T, d)
            grad_probs, grad_v = dropped_product_grads(g3, probs, noise, dropped, v3)
        return grad_probs, grad_v, None, None, grad_w, grad_b


def _merge_heads(out: Tensor, B: int, H: int, dtype: torch.dtype) -> Tensor:
    """``(B*H, T, d)`` -> ``(B, T, H*d)`` in ``dtype`` (the attention module's reshape)."""
    _, T, d = out.shape
    return out.view(B, H, T, d).to(dtype).transpose(1, 2).reshape(B, T, H * d)


def dropout_attention_proj(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, p: float, proj: nn.Linear
) -> Tensor:
    """``proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=p)))``.

    The CPU composite attention with dropout (as :func:`~data2vec.nn.lean.dropout_attention`,
    mask from :func:`~data2vec.nn.lean.keep_mask`) followed by the output projection, with the
    attention output recomputed in backward instead of kept.

    Args:
        q, k, v: ``(B, H, T, d)``.
        attn_mask: additive mask broadcastable to ``(B, H, T, T)``, or None.
        p: attention dropout probability, ``0 < p < 1``.
        proj: the output projection, ``H * d`` inputs.

    Returns:
        ``(B, T, C_out)``.
    """
    probs, v = attention_probs(q, k, v, attn_mask)
    return _DropoutAttentionProj.apply(probs, v, p, q.dtype, proj.weight, proj.bias)
