"""The blocks' MLP ``fc2(gelu(fc1(x)))`` with one fused backward pass over the hidden layer.

In backward, the memory-lean MLP (:func:`~data2vec.nn.lean.gelu_linear`) makes three passes over
its ``(tokens, 4C)`` hidden activations besides the matrix products: it recomputes
``gelu(h)`` for ``fc2``'s weight gradient, runs GELU's backward, and ``fc1``'s backward sums the
result over tokens for the bias gradient. On an H100 (image-v2-base, batch 128: 81920 x 3072
per block) each pass is memory-bound. Here one Triton kernel reads ``h`` and the hidden
gradient once and writes ``gelu(h)`` and ``h``'s gradient (over the hidden gradient, in place)
plus per-program partial column sums that one small reduction turns into ``fc1``'s bias
gradient. The matrix products are PyTorch's. Values are the plain ops' (the exact erf GELU,
float32 inside, results in the compute dtype) up to the bias gradient's summation order.
Triton's interpreter runs the kernel on the CPU for the tests (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.nn import token_conv
from data2vec.nn.lean import linear_grads
from data2vec.nn.triton_gate import tl, triton

# On CUDA by default: image-v2-base b128 bf16 on an H100, alternating with the memory-lean MLP
# in one process, 0.2011 / 0.2014 s against 0.2026 / 0.2036 s per step (-0.9 %), the same peak
# memory; b32 within its noise (benchmarks/README.md, "GPU, fifth pass"). False: the
# memory-lean MLP everywhere.
ENABLED = True

# Rows each program walks (so the partial bias sums stay small next to the hidden layer), in
# steps of ``BLOCK_R``, over ``BLOCK_N`` columns. Not tuned yet: gpu_check.py --mlp sweeps it.
LAUNCH = {"ROWS_PER_PROGRAM": 128, "BLOCK_R": 8, "BLOCK_N": 512, "num_warps": 4}

if triton is not None:

    @triton.jit
    def _gelu_grad_kernel(
        h_ptr,
        gg_ptr,
        g_ptr,
        part_ptr,
        M,
        N: tl.constexpr,
        ROWS_PER_PROGRAM: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """``g = gelu(h)``; ``gg <- gg * gelu'(h)`` in place; ``part[pid_m] = sum of gg's
        new rows`` over this program's rows, for ``BLOCK_N`` columns."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r in range(0, ROWS_PER_PROGRAM, BLOCK_R):
            rows = pid_m * ROWS_PER_PROGRAM + r + tl.arange(0, BLOCK_R)
            ok = (rows < M)[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            gg = tl.load(gg_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
            tl.store(g_ptr + offs, (h * cdf).to(g_ptr.dtype.element_ty), mask=ok)
            # d gelu(h) / dh = Phi(h) + h phi(h)
            dh = gg * (cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327)
            dh = dh.to(gg_ptr.dtype.element_ty)
            tl.store(gg_ptr + offs, dh, mask=ok)
            acc += tl.sum(tl.where(ok, dh.to(tl.float32), 0.0), axis=0)
        tl.store(part_ptr + pid_m.to(tl.int64) * N + cols, acc, mask=col_ok)


def gelu_grad(h: Tensor, gg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One pass over the hidden layer: ``(gelu(h), gelu'(h) * gg, its column sums)``.

    Args:
        h: ``(M, N)`` pre-activation, contiguous.
        gg: ``(M, N)`` gradient of ``gelu(h)``, contiguous, same dtype; overwritten with the
            gradient of ``h`` (the second result).

    Returns:
        ``(gelu(h), grad_h, sums)``: ``(M, N)`` in ``h``'s dtype, ``gg`` itself, and the
        ``(N,)`` float32 sums of ``grad_h``'s (rounded) rows.
    """
    M, N = h.shape
    g = torch.empty_like(h)
    programs = triton.cdiv(M, LAUNCH["ROWS_PER_PROGRAM"])
    part = torch.empty(programs, N, device=h.device, dtype=torch.float32)
    grid = (programs, triton.cdiv(N, LAUNCH["BLOCK_N"]))
    _gelu_grad_kernel[grid](h, gg, g, part, M, N=N, **LAUNCH)
    return g, gg, part.sum(0)


class _Mlp(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` keeping ``x`` and ``h = fc1(x)`` for backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):  # type: ignore[override]
        # Under autocast F.linear runs in the autocast dtype; backward uses the same one.
        h = F.linear(x, w1, b1)
        out = F.linear(F.gelu(h), w2, b2)
        x_c = x.to(h.dtype)  # what fc1 multiplied (autocast's cast; a no-op for a bf16 copy)
        ctx.save_for_backward(x_c, h, w1, w2)
        ctx.b1_dtype = None if b1 is None else b1.dtype
        ctx.b2_dtype = None if b2 is None else b2.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, h, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        go = grad_out.reshape(-1, grad_out.shape[-1]).to(h.dtype)  # (tokens, C)
        h2 = h.reshape(-1, h.shape[-1])
        gg = go.mm(w2.to(go.dtype))  # gradient of gelu(h): (tokens, 4C)
        g, dh, sums = gelu_grad(h2, gg)
        _, grad_w2, grad_b2 = linear_grads(go, g, w2, ctx.b2_dtype, (False, need_w2, need_b2))
        grad_x, grad_w1, _ = linear_grads(
            dh, x.reshape(-1, x.shape[-1]), w1, None, (need_x, need_w1, False)
        )
        grad_b1 = None
        if need_b1 and ctx.b1_dtype is not None:
            # rounded to the compute dtype first, as autograd's sum of the bf16 gradient is
            grad_b1 = sums.to(h.dtype).to(ctx.b1_dtype)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def supports(x: Tensor, mlp: nn.Module) -> bool:
    """Whether :func:`mlp_forward` runs ``mlp`` (a :class:`~data2vec.nn.block.Mlp`) on ``x``:
    :data:`ENABLED`, exact GELU without dropout (its memory-lean form), plain ``nn.Linear``
    layers, gradients wanted, and Triton on ``x``'s device."""
    return (
        ENABLED
        and getattr(mlp, "recompute_act", False)
        and type(mlp.fc1) is nn.Linear
        and type(mlp.fc2) is nn.Linear
        and torch.is_grad_enabled()
        and token_conv.available(x)
        and not token_conv.is_suspended("mlp")
        and not torch.compiler.is_compiling()
    )


def mlp_forward(x: Tensor, fc1: nn.Linear, fc2: nn.Linear) -> Tensor:
    """``fc2(gelu(fc1(x)))`` (exact GELU) with the fused backward. ``x: (..., C) -> (..., C)``."""
    if triton is None:
        raise RuntimeError(f"the fused MLP needs {token_conv.NEEDS_TRITON}")
    # (no device guard: the kernel runs in backward, on the thread of x's device)
    return _Mlp.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
