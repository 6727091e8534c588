"""Self-attention over short sequences, one Triton program per (sequence, head), for CUDA.

A data2vec 2.0 image student attends over 40 tokens (196 patches, 80 % masked, plus CLS) in
16 clones of every image: at batch 128 that is 2048 x 12 tiny attention problems per block.
PyTorch's fused kernels tile queries and keys in blocks of 64 or 128 and walk the keys with an
online softmax, which at 40 tokens mostly moves padding, and they want ``(B, H, T, d)``
operands, so the output is transposed back to ``(B, T, C)`` with a copy, and so is its gradient.
Here, for sequences of at most :data:`MAX_TOKENS` tokens:

* **forward**: a program loads one head's queries, keys and values straight from the fused
  projection's ``(B, T, 3C)`` output, forms the whole ``T x T`` score matrix in registers
  (float32), takes an exact softmax, multiplies by the values and writes ``(B, T, C)``, the
  output projection's input, plus each row's log-sum-exp for backward;
* **backward**: a program recomputes the probabilities from the log-sum-exp and writes the
  query, key and value gradients into one ``(B, T, 3C)`` tensor, the fused projection's
  output gradient (FlashAttention-2's formulas: ``dS = P * (dP - rowsum(dO * O))``).

:func:`project_and_attend` also runs the fused projection ``qkv = x W^T + b`` (PyTorch's
matrix product, as ``nn.Linear`` would) and its backward, so that the bias gradient comes from
the backward kernel, which has the ``qkv`` gradient in registers: each program adds up its
rows, and one small reduction finishes. Autograd's ``Linear`` backward reads the whole
``(B*T, 3C)`` gradient once more for it (0.15 ms per block on an H100 at image-v2-base's batch
128; benchmarks/README.md, "GPU, eighth pass"). Opt-in (:data:`PROJECT`) until measured.

Products take the operands' dtype (bf16 under autocast), sums are float32, and the
(unnormalized) probabilities are rounded to the operands' dtype before they meet the values,
as the fused kernels do. No mask and no dropout: other calls go to
``F.scaled_dot_product_attention``.
Triton's interpreter runs the kernels on the CPU for the tests (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.nn import token_conv
from data2vec.nn.lean import linear_grads
from data2vec.nn.triton_gate import tl, triton

# Sequences up to this many tokens take these kernels (0: never). One program holds a
# ``T x T`` float32 score matrix in registers; 64 covers the image students (40 tokens).
MAX_TOKENS = 64

# Whether a training forward runs the fused projection inside the attention's autograd
# function (:func:`project_and_attend`), whose backward kernel also sums the bias gradient.
# Eighth pass, not yet run on a GPU, so off: the sums take the backward kernel from 1184 to
# 1408 instructions (sm_90), against a separate pass of about 0.15 ms per block, and only a
# GPU can say which costs more.
PROJECT = False

# The backward kernel's register cap (0: none): 141 registers uncapped (sm_90), 3 programs per
# multiprocessor; 128 fits 4, without spills. Eighth pass, not yet run on a GPU.
BACKWARD_MAXNREG = 0

if triton is not None:

    @triton.jit
    def _program_head(qkv_ptr, T, H, C: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
        """This program's (sequence, head): ``(q, k, v, rows, ok, cols)``, the ``(BLOCK_T, D)``
        queries, keys and values, the sequence's token rows, which of them exist (``T`` of
        ``BLOCK_T``), and the head's columns in a ``(rows, C)`` tensor."""
        pid = tl.program_id(0)
        t = tl.arange(0, BLOCK_T)
        ok = t < T
        rows = ((pid // H) * T + t).to(tl.int64)
        cols = (pid % H) * D + tl.arange(0, D)
        offs = rows[:, None] * (3 * C) + cols[None, :]
        q = tl.load(qkv_ptr + offs, mask=ok[:, None], other=0.0)
        k = tl.load(qkv_ptr + offs + C, mask=ok[:, None], other=0.0)
        v = tl.load(qkv_ptr + offs + 2 * C, mask=ok[:, None], other=0.0)
        return q, k, v, rows, ok, cols

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _attention_forward(
        qkv_ptr,
        o_ptr,
        lse_ptr,
        T,
        H,
        scale,
        C: tl.constexpr,
        D: tl.constexpr,
        BLOCK_T: tl.constexpr,
        SAVE_LSE: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """``o = softmax(q k^T * scale) v`` for one (sequence, head) per program."""
        q, k, v, rows, ok, cols = _program_head(qkv_ptr, T, H, C, D, BLOCK_T)
        s = tl.where(ok[None, :], _mm(q, tl.trans(k), IEEE) * scale, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])  # at most 1, and exactly 1 at each row's maximum
        denom = tl.sum(p, axis=1)
        # normalized after the product, in float32, as the fused kernels do: the rounding of
        # p to the operands' dtype then spares each row's largest weight
        o = _mm(p.to(v.dtype), v, IEEE) / denom[:, None]
        tl.store(o_ptr + rows[:, None] * C + cols[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=ok[:, None])  # fmt: skip
        if SAVE_LSE:
            t = tl.program_id(0) * T + tl.arange(0, BLOCK_T)
            tl.store(lse_ptr + t, m + tl.log(denom), mask=ok)

    @triton.jit
    def _attention_backward(
        qkv_ptr,
        o_ptr,
        do_ptr,
        lse_ptr,
        dqkv_ptr,
        part_ptr,
        T,
        H,
        scale,
        C: tl.constexpr,
        D: tl.constexpr,
        BLOCK_T: tl.constexpr,
        IEEE: tl.constexpr,
        SUM_ROWS: tl.constexpr,
    ):
        """Query, key and value gradients of one (sequence, head) per program; with
        ``SUM_ROWS`` also their sums over the sequence's tokens, into ``part: (B, 3C)``."""
        q, k, v, rows, ok, cols = _program_head(qkv_ptr, T, H, C, D, BLOCK_T)
        offs = rows[:, None] * C + cols[None, :]
        o = tl.load(o_ptr + offs, mask=ok[:, None], other=0.0)
        do = tl.load(do_ptr + offs, mask=ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + tl.program_id(0) * T + tl.arange(0, BLOCK_T), mask=ok, other=0.0)
        s = _mm(q, tl.trans(k), IEEE) * scale
        p = tl.where(ok[:, None] & ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv = _mm(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _mm(do, tl.trans(v), IEEE)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq = _mm(ds, k, IEEE) * scale
        dk = _mm(tl.trans(ds), q, IEEE) * scale
        out = rows[:, None] * (3 * C) + cols[None, :]
        dt = dqkv_ptr.dtype.element_ty
        dq, dk, dv = dq.to(dt), dk.to(dt), dv.to(dt)
        tl.store(dqkv_ptr + out, dq, mask=ok[:, None])
        tl.store(dqkv_ptr + out + C, dk, mask=ok[:, None])
        tl.store(dqkv_ptr + out + 2 * C, dv, mask=ok[:, None])
        if SUM_ROWS:
            # this sequence's part of the projection's bias gradient: the column sums of the
            # (rounded) gradients just stored, as products with a row of ones (beside 15 rows
            # of zeros) on the tensor cores; rows past T hold zeros (p is 0 there)
            first = tl.arange(0, 16)[:, None] == 0
            ones = tl.where(first, 1.0, tl.zeros((16, BLOCK_T), tl.float32)).to(dt)
            part = (tl.program_id(0) // H).to(tl.int64) * (3 * C) + cols
            dst = part_ptr + part[None, :] + tl.zeros((16, 1), tl.int32)
            tl.store(dst, _mm(ones, dq, IEEE), mask=first)
            tl.store(dst + C, _mm(ones, dk, IEEE), mask=first)
            tl.store(dst + 2 * C, _mm(ones, dv, IEEE), mask=first)


def _launch(T: int) -> dict[str, int]:
    block_t = max(16, triton.next_power_of_2(T))
    return {"BLOCK_T": block_t, "num_warps": 4 if block_t <= 64 else 8, "num_stages": 1}


def _ieee(qkv: Tensor) -> bool:
    """float32 operands multiply in full precision unless the user allowed TF32 matmuls."""
    return qkv.dtype == torch.float32 and not (
        qkv.is_cuda and torch.backends.cuda.matmul.allow_tf32
    )


def _forward(qkv: Tensor, num_heads: int, save_lse: bool) -> tuple[Tensor, Tensor, float]:
    """``(out, lse, scale)``: one launch of the forward kernel (``lse`` unwritten unless
    ``save_lse``)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    out = torch.empty(B, T, C, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B * num_heads, T, device=qkv.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(C // num_heads)
    _attention_forward[(B * num_heads,)](
        qkv, out, lse, T, num_heads, scale, C=C, D=C // num_heads, SAVE_LSE=save_lse,
        IEEE=_ieee(qkv), **_launch(T),
    )  # fmt: skip
    return out, lse, scale


def _backward(
    qkv: Tensor, out: Tensor, g: Tensor, lse: Tensor, num_heads: int, scale: float, sums: bool
) -> tuple[Tensor, Tensor | None]:
    """``(dqkv, parts)``: one launch of the backward kernel; ``parts: (B, 3C)`` float32, the
    per-sequence column sums of ``dqkv`` (with ``sums``; else None)."""
    B, T, C3 = qkv.shape
    dqkv = torch.empty_like(qkv)
    parts = torch.empty(B, C3, device=qkv.device, dtype=torch.float32) if sums else None
    _attention_backward[(B * num_heads,)](
        qkv, out, g.contiguous(), lse, dqkv, dqkv if parts is None else parts, T, num_heads,
        scale, C=C3 // 3, D=C3 // (3 * num_heads), IEEE=_ieee(qkv), SUM_ROWS=sums,
        **_launch(T), **token_conv.register_cap(BACKWARD_MAXNREG),
    )  # fmt: skip
    return dqkv, parts


class _ShortAttention(torch.autograd.Function):
    """``qkv: (B, T, 3C) -> (B, T, C)``, heads of width ``C / num_heads``."""

    @staticmethod
    def forward(ctx, qkv: Tensor, num_heads: int) -> Tensor:  # type: ignore[override]
        out, lse, scale = _forward(qkv, num_heads, save_lse=True)
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads, ctx.scale = num_heads, scale
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        qkv, out, lse = ctx.saved_tensors
        return _backward(qkv, out, g, lse, ctx.num_heads, ctx.scale, sums=False)[0], None


class _ProjectAttention(torch.autograd.Function):
    """``x: (B, T, C) -> (B, T, C)``: ``F.linear(x, weight, bias)`` (under autocast, in its
    dtype), then the attention of the result; keeps ``x`` as the projection multiplied it,
    ``qkv``, the output and the log-sum-exp rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_heads):  # type: ignore[override]
        qkv = F.linear(x, weight, bias)
        out, lse, scale = _forward(qkv, num_heads, save_lse=True)
        x_c = x.to(qkv.dtype)  # what the projection multiplied (autocast's cast)
        ctx.save_for_backward(x_c, weight, qkv, out, lse)
        ctx.num_heads, ctx.scale = num_heads, scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, qkv, out, lse = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        need_b = need_b and ctx.bias_dtype is not None
        dqkv, parts = _backward(qkv, out, g, lse, ctx.num_heads, ctx.scale, sums=need_b)
        grad_x, grad_w, _ = linear_grads(
            dqkv.view(-1, qkv.shape[-1]), x.reshape(-1, x.shape[-1]), weight, None,
            (need_x, need_w, False),
        )  # fmt: skip
        grad_b = None
        if parts is not None:
            # rounded to the compute dtype first, as autograd's sum of the 16-bit gradient is
            grad_b = parts.sum(0).to(qkv.dtype).to(ctx.bias_dtype)
        return None if grad_x is None else grad_x.view(x.shape), grad_w, grad_b, None


def _supports(t: Tensor, T: int, C3: int, dtype: torch.dtype, num_heads: int) -> bool:
    """:func:`supports` for a ``(B, T, C3)`` fused projection in ``dtype`` on ``t``'s device."""
    if not token_conv.available(t) or token_conv.is_suspended("attention"):
        return False
    d = C3 // (3 * num_heads)
    width_ok = 3 * num_heads * d == C3 and d in (16, 32, 64, 128)
    dtype_ok = dtype in (torch.bfloat16, torch.float16) or not t.is_cuda
    return 0 < T <= MAX_TOKENS and width_ok and dtype_ok and not torch.compiler.is_compiling()


def supports(qkv: Tensor, num_heads: int) -> bool:
    """Whether :func:`attend` runs on ``qkv: (B, T, 3C)``: Triton on its device (see
    ``token_conv.available``), at most :data:`MAX_TOKENS` tokens, heads of a power-of-two
    width from 16 to 128, and (on a GPU) 16-bit operands, where it was measured."""
    return qkv.dim() == 3 and _supports(qkv, qkv.shape[1], qkv.shape[2], qkv.dtype, num_heads)


def projects(x: Tensor, qkv: nn.Module, num_heads: int) -> bool:
    """Whether :func:`project_and_attend` runs ``qkv`` (the fused projection) and the
    attention on ``x: (B, T, C)``: :data:`PROJECT`, a plain ``nn.Linear``, gradients
    recorded, and :func:`supports` for its output (in autocast's dtype where autocast is on)."""
    if not (PROJECT and type(qkv) is nn.Linear and torch.is_grad_enabled() and x.dim() == 3):
        return False
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return _supports(x, x.shape[1], qkv.out_features, dtype, num_heads)


def attend(qkv: Tensor, num_heads: int) -> Tensor:
    """Softmax attention of the fused projection's output, without mask or dropout.

    Args:
        qkv: ``(B, T, 3C)``, ``[q; k; v]`` along the last axis, heads inside each (as
            ``attention.split_heads`` reads it).
        num_heads: ``H``.

    Returns:
        ``(B, T, C)``: the heads' outputs side by side, as ``F.scaled_dot_product_attention``
        on ``split_heads(qkv)`` followed by ``transpose(1, 2).reshape(B, T, C)``.
    """
    if triton is None:
        raise RuntimeError(f"short-sequence attention needs {token_conv.NEEDS_TRITON}")
    qkv = qkv.contiguous()
    with token_conv.device_guard(qkv):
        if torch.is_grad_enabled() and qkv.requires_grad:
            return _ShortAttention.apply(qkv, num_heads)
        return _forward(qkv, num_heads, save_lse=False)[0]  # nothing kept (the teacher)


def project_and_attend(x: Tensor, qkv: nn.Linear, num_heads: int) -> Tensor:
    """``attend(qkv(x), num_heads)`` with the projection's backward folded in (see the
    module's docstring); the same values and gradients up to the bias gradient's summation
    order. ``x: (B, T, C) -> (B, T, C)``."""
    if triton is None:
        raise RuntimeError(f"short-sequence attention needs {token_conv.NEEDS_TRITON}")
    with token_conv.device_guard(x):
        return _ProjectAttention.apply(x, qkv.weight, qkv.bias, num_heads)
