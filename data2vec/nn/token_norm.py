"""The post-LN block's ``LayerNorm(x + a)``, fused for CUDA: one pass each way.

A data2vec 2.0 block ends both of its branches with ``x = LayerNorm(x + branch)``, with the
residual stream ``x`` in float32 and the branch output ``a`` in the autocast dtype. Run as
PyTorch ops under autocast that is an add (float32 result), a float32 LayerNorm and, before the
next linear layer, a cast to bf16; backward adds the float32 and bf16 gradients of the two uses
of the output, runs the LayerNorm backward and casts the branch's gradient back to bf16. On an
H100 these passes over ``(tokens, 768)`` tensors took more GPU time than the attention
(``benchmarks/README.md``, GPU section). Here:

* **forward**: one row-wise kernel adds, normalizes a token's channels in registers, applies
  the affine parameters and writes the float32 output, its copy in the autocast dtype (the next
  linear layer's input) and, when gradients are wanted, ``z = x + a`` (what the LayerNorm keeps
  for backward on the plain path too);
* **backward**: one kernel sums the two output gradients, recomputes the row statistics from
  ``z``, writes ``z``'s gradient (float32 for ``x``, and in ``a``'s dtype for ``a``) and adds
  up per-program partial sums of the weight and bias gradients, which one reduction finishes.

The values are the plain ops' up to float32 summation order (the row statistics are summed in
registers, not by PyTorch's Welford kernel). Triton's interpreter runs the kernels on the CPU
for the tests (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from data2vec.nn import token_conv
from data2vec.nn.token_layer import rows_launch
from data2vec.nn.triton_gate import tl, triton

if triton is not None:

    @triton.jit
    def _add_norm_forward(
        x_ptr,
        a_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        low_ptr,
        z_ptr,
        M,
        eps,
        C: tl.constexpr,
        SAVE_Z: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """``z = x + a``; ``y = layer_norm(z) * w + b`` and its low-precision copy ``low``."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        ok = (rows < M)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        z = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        z += tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(z, axis=1) / C
        d = tl.where(ok, z - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(low_ptr + offs, y.to(low_ptr.dtype.element_ty), mask=ok)
        if SAVE_Z:
            tl.store(z_ptr + offs, z, mask=ok)

    @triton.jit
    def _add_norm_backward(
        z_ptr,
        w_ptr,
        gy_ptr,
        glow_ptr,
        gz_ptr,
        ga_ptr,
        gw_ptr,
        gb_ptr,
        M,
        eps,
        C: tl.constexpr,
        HAS_GY: tl.constexpr,
        HAS_GLOW: tl.constexpr,
        HAS_GA: tl.constexpr,
        ROWS_PER_PROGRAM: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """``z``'s gradient from the two output gradients (``gy`` of ``y``, ``glow`` of its
        copy), and this program's partial sums of the weight and bias gradients."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        gw = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        gb = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for start in range(0, ROWS_PER_PROGRAM, BLOCK_R):
            rows = pid * ROWS_PER_PROGRAM + start + tl.arange(0, BLOCK_R)
            ok = (rows < M)[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
            z = tl.load(z_ptr + offs, mask=ok, other=0.0)
            mean = tl.sum(z, axis=1) / C
            d = tl.where(ok, z - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
            n = d * rstd[:, None]
            g = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            if HAS_GY:
                g += tl.load(gy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if HAS_GLOW:
                g += tl.load(glow_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            gw += g * n
            gb += g
            # LayerNorm: dz = rstd * (gn - mean(gn) - n * mean(gn * n)), gn = g * w
            gn = g * w[None, :]
            m1 = tl.sum(gn, axis=1) / C
            m2 = tl.sum(gn * n, axis=1) / C
            gz = tl.where(ok, rstd[:, None] * (gn - m1[:, None] - n * m2[:, None]), 0.0)
            tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=ok)
            if HAS_GA:
                tl.store(ga_ptr + offs, gz.to(ga_ptr.dtype.element_ty), mask=ok)
        out = pid.to(tl.int64) * C + cols
        tl.store(gw_ptr + out, tl.sum(gw, axis=0), mask=col_ok)
        tl.store(gb_ptr + out, tl.sum(gb, axis=0), mask=col_ok)


# "auto" fuses the norms of a block only from this many tokens (rows) on. Measured on an H100
# (gpu_check.py --norms, 768 channels, forward + backward alone): fused 0.66 / 1.06 / 2.07 ms
# against torch 0.55 / 0.94 / 3.39 ms at 2k / 32k / 131k rows; small calls are bound by launch
# costs on the CPU, where a Triton launch costs more than the saved passes. The crossover lies
# near 41k rows (linear fit). "triton" fuses at any size.
MIN_ROWS = 40960

# Rows each backward program walks: enough that the weight/bias partial sums (one row of C
# floats per program) stay a small fraction of the gradient traffic (1.5 % at 32 rows of 768),
# few enough that the programs come in many waves. At image-v2-base's batch 128 (81920 rows)
# 128 rows made 640 programs, 2.4 waves of the 264 that fit on an H100 at once (2 per
# multiprocessor: 197 registers), so the last wave ran 42 % full: the kernel took 0.44 ms for
# 1.2 GB, 80 % of the memory bandwidth. 32 rows: 2560 programs, 9.7 waves. Eighth pass, not
# yet run on a GPU (benchmarks/README.md); variant "norm rows 128" in benchmarks/gpu_variants.py.
ROWS_PER_PROGRAM = 32

# The backward kernel's register cap (0: none). Uncapped it takes 197 registers (sm_90), so two
# of its 128-thread programs share a multiprocessor; at 128 four do, without spills. Eighth
# pass, not yet run on a GPU (benchmarks/README.md).
BACKWARD_MAXNREG = 0


def _forward(
    x: Tensor, a: Tensor, weight: Tensor, bias: Tensor, eps: float, low_dtype, save_z: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    M, C = x.shape
    y = torch.empty(M, C, device=x.device, dtype=torch.float32)
    low = torch.empty(M, C, device=x.device, dtype=low_dtype)
    z = torch.empty(M, C, device=x.device, dtype=torch.float32) if save_z else None
    grid, blocks = rows_launch(M, C)
    _add_norm_forward[grid](
        x, a, weight, bias, y, low, y if z is None else z, M, eps, C=C, SAVE_Z=save_z, **blocks
    )  # fmt: skip
    return y, low, z


class _AddLayerNorm(torch.autograd.Function):
    """``(x, a, weight, bias) -> (y, y_low)``; ``y_low`` is ``y`` in the compute dtype and
    carries its own gradient (the next linear layer's), which joins ``y``'s in backward."""

    @staticmethod
    def forward(ctx, x, a, weight, bias, eps, low_dtype):  # type: ignore[override]
        y, low, z = _forward(x, a, weight, bias, eps, low_dtype, save_z=True)
        ctx.save_for_backward(z, weight)
        ctx.eps, ctx.a_dtype = eps, a.dtype
        return y, low

    @staticmethod
    def backward(ctx, gy: Tensor | None, glow: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z, weight = ctx.saved_tensors
        M, C = z.shape
        blocks = rows_launch(M, C)[1]
        rows = max(ROWS_PER_PROGRAM, blocks["BLOCK_R"])
        programs = triton.cdiv(M, rows)
        gz = torch.empty_like(z)
        split_a = ctx.a_dtype != z.dtype
        ga = torch.empty(M, C, device=z.device, dtype=ctx.a_dtype) if split_a else gz
        # The weight and bias partial sums side by side, so one reduction finishes both (each
        # took about 20 us of GPU time on an H100, 48 per step at image-v2-base batch 128).
        parts = torch.empty(2, programs, C, device=z.device, dtype=torch.float32)
        gw, gb = parts[0], parts[1]
        gy = None if gy is None else gy.contiguous()
        glow = None if glow is None else glow.contiguous()
        _add_norm_backward[(programs,)](
            z, weight, z if gy is None else gy, z if glow is None else glow, gz, ga, gw, gb,
            M, ctx.eps, C=C, HAS_GY=gy is not None, HAS_GLOW=glow is not None,
            HAS_GA=split_a, ROWS_PER_PROGRAM=rows, **blocks,
            **token_conv.register_cap(BACKWARD_MAXNREG),
        )  # fmt: skip
        gw, gb = parts.sum(1).to(weight.dtype)
        return gz, ga, gw, gb, None, None


def add_layer_norm(x: Tensor, a: Tensor, norm: nn.LayerNorm, low_dtype) -> tuple[Tensor, Tensor]:
    """``norm(x + a)`` as the plain ops under autocast, and its copy in ``low_dtype``.

    Args:
        x: ``(..., C)`` float32 residual stream.
        a: ``(..., C)`` branch output, any float dtype.
        norm: an affine ``LayerNorm`` over ``C`` with float32 parameters.
        low_dtype: dtype of the copy (the autocast dtype: the next linear layer's input).

    Returns:
        ``(y, y_low)``: ``(..., C)`` float32 and ``low_dtype``; gradients through both add up.
    """
    if triton is None:
        raise RuntimeError(f"add_layer_norm needs {token_conv.NEEDS_TRITON}")
    shape = x.shape
    C = shape[-1]
    x2, a2 = x.reshape(-1, C).contiguous(), a.reshape(-1, C).contiguous()
    params = (norm.weight, norm.bias)
    with token_conv.device_guard(x):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, a, *params)):
            y, low = _AddLayerNorm.apply(x2, a2, *params, norm.eps, low_dtype)
        else:  # nothing to keep for backward (the teacher, evaluation)
            y, low, _ = _forward(x2, a2, *params, norm.eps, low_dtype, save_z=False)
    return y.view(shape), low.view(shape)


def supports(x: Tensor, norm: nn.Module) -> bool:
    """Whether :func:`add_layer_norm` computes ``norm(x + a)`` as autocast's plain ops would,
    for a branch ``a`` shaped as ``x``: a float32 ``x``, an affine float32 ``nn.LayerNorm``
    over the last dimension, and autocast on (it makes the low-precision copy useful)."""
    return (
        type(norm) is nn.LayerNorm
        and norm.elementwise_affine
        and norm.bias is not None
        and len(norm.normalized_shape) == 1
        and norm.weight.dtype == torch.float32
        and norm.bias.dtype == torch.float32
        and x.dtype == torch.float32
        and x.shape[-1] == norm.normalized_shape[0]
        and torch.is_autocast_enabled(x.device.type)
    )
