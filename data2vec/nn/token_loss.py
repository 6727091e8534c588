"""The regression loss ``sum((pred - table[index])²)`` without gathering the targets.

data2vec 2.0's loss compares each masked token's prediction with its sample's teacher target.
The targets are computed once per sample; the predictions come from all ``M`` clones. As torch
ops that is a gather of one target row per prediction (a ``(rows, D)`` float32 tensor: 1 GB at
image-v2-base batch 128, where ``D = 768`` and there are 321536 masked rows), the difference
(another 1 GB, kept for backward), its square (a third) and a sum, each a memory-bound pass on
a GPU (benchmarks/README.md, "GPU, fifth pass": 0.88 ms for the gather, 1.07 ms for the
difference). Here one Triton kernel reads each prediction row and its target row by index and
adds up the squares per program; backward reads both again and writes ``2 g (pred - target)``
in the prediction's dtype. Nothing of ``(rows, D)`` is kept but the prediction itself.

Values: the backward has the bits of :class:`data2vec.targets._SquaredErrorSum`'s (the same
float32 subtraction and product, rounded once); the loss differs from the torch ops' sum by
its summation order only. Triton's interpreter runs the kernels on the CPU for the tests
(``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from data2vec.nn import token_conv
from data2vec.nn.triton_gate import NEEDS_TRITON, tl, triton

# On CUDA by default (prepared without a GPU, 2026-11-27: about 3.5 GB moved per step, forward
# and backward, where the torch ops moved about 10 GB at image-v2-base batch 128);
# gpu_session.sh steps with the gather as the variant "loss gathered". False: gather the
# targets, then the torch ops.
ENABLED = True

# Rows per program, and columns per step of a program's loop over D.
LAUNCH = {"BLOCK_R": 16, "BLOCK_D": 256, "num_warps": 4}

if triton is not None:

    @triton.jit
    def _program_rows(index_ptr, M, BLOCK_R: tl.constexpr):
        """This program's rows, their mask, and each one's row of the table (int64)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < M
        src = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        return rows, row_ok, src

    @triton.jit
    def _diff_tile(pred_ptr, table_ptr, rows, src, cols, ok, D: tl.constexpr):
        """``pred[rows] - table[src]`` at ``cols``, in float32 (0 outside ``ok``)."""
        p = tl.load(pred_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=ok, other=0.0)
        t = tl.load(table_ptr + src[:, None] * D + cols[None, :], mask=ok, other=0.0)
        return p.to(tl.float32) - t

    @triton.jit
    def _squared_error_forward(
        pred_ptr,
        table_ptr,
        index_ptr,
        part_ptr,
        M,
        D: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """``part[pid] = sum over this program's rows r of (pred[r] - table[index[r]])²``."""
        rows, row_ok, src = _program_rows(index_ptr, M, BLOCK_R)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            ok = row_ok[:, None] & (cols < D)[None, :]
            diff = _diff_tile(pred_ptr, table_ptr, rows, src, cols, ok, D)
            acc += diff * diff
        tl.store(part_ptr + tl.program_id(0), tl.sum(tl.sum(acc, axis=1), axis=0))

    @triton.jit
    def _squared_error_backward(
        pred_ptr,
        table_ptr,
        index_ptr,
        g_ptr,
        grad_ptr,
        M,
        D: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """``grad[r] = g * (pred[r] - table[index[r]])`` in ``grad``'s dtype; ``g`` is twice
        the loss's upstream gradient (one float32 value)."""
        rows, row_ok, src = _program_rows(index_ptr, M, BLOCK_R)
        g = tl.load(g_ptr)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            ok = row_ok[:, None] & (cols < D)[None, :]
            diff = _diff_tile(pred_ptr, table_ptr, rows, src, cols, ok, D)
            offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
            tl.store(grad_ptr + offs, (diff * g).to(grad_ptr.dtype.element_ty), mask=ok)


def _programs(pred: Tensor) -> int:
    """One program per ``BLOCK_R`` rows."""
    return triton.cdiv(pred.shape[0], LAUNCH["BLOCK_R"])


def _run(kernel, pred: Tensor, *args: Tensor) -> None:
    """Launch ``kernel(pred, *args, rows, D)`` over ``pred``'s rows."""
    with token_conv.device_guard(pred):
        kernel[(_programs(pred),)](pred, *args, pred.shape[0], D=pred.shape[1], **LAUNCH)


class _GatheredSquaredError(torch.autograd.Function):
    """``((pred - table[index])²).sum()`` in float32, for a float32 ``table`` that needs no
    gradient; keeps ``pred``, ``table`` and ``index`` for backward (no ``(rows, D)`` tensor of
    its own)."""

    @staticmethod
    def forward(ctx, pred: Tensor, table: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        pred, table, index = pred.contiguous(), table.contiguous(), index.contiguous()
        part = torch.empty(_programs(pred), device=pred.device, dtype=torch.float32)
        _run(_squared_error_forward, pred, table, index, part)
        ctx.save_for_backward(pred, table, index)
        return part.sum()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        pred, table, index = ctx.saved_tensors
        g2 = (2 * g).float().reshape(1)  # d/dpred of diff² is 2 diff; the torch ops' product
        grad = torch.empty_like(pred)
        _run(_squared_error_backward, pred, table, index, g2, grad)
        return grad, None, None


def supports(pred: Tensor, table: Tensor) -> bool:
    """Whether :func:`squared_error_sum` runs on these: :data:`ENABLED`, Triton on their
    device, a 2-D float32 ``table`` that needs no gradient with ``pred``'s width, and no
    compiled graph being traced."""
    return (
        ENABLED
        and token_conv.available(pred)
        and not token_conv.is_suspended("loss")
        and not torch.compiler.is_compiling()
        and pred.dim() == 2
        and table.dim() == 2
        and pred.shape[1] == table.shape[1]
        and pred.shape[0] > 0
        and pred.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and table.dtype == torch.float32
        and not table.requires_grad
    )


def squared_error_sum(pred: Tensor, table: Tensor, index: Tensor) -> Tensor:
    """``((pred.float() - table[index])²).sum()`` without gathering ``table``'s rows.

    Args:
        pred: ``(rows, D)`` predictions (float32, bf16 or float16).
        table: ``(R, D)`` float32 targets that need no gradient.
        index: ``(rows,)`` int64, each prediction's row of ``table``.

    Returns:
        A float32 scalar; its gradient with respect to ``pred`` comes in ``pred``'s dtype.
    """
    if triton is None:
        raise RuntimeError(f"the fused loss needs {NEEDS_TRITON}")
    return _GatheredSquaredError.apply(pred, table, index)
