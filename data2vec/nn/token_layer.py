"""One data2vec 2.0 decoder layer on tokens: ``h + GELU(LayerNorm(conv(h)))``, fused for CUDA.

In the image decoder every layer's activations are ``N x 196 x 768`` (``N`` = batch x clones,
2048 at batch 128): five times the student encoder's tokens. Run as separate ops (a float32
LayerNorm under autocast, GELU, the residual add, a bf16 copy for the next convolution, and in
backward a recomputation, three backward ops and the residual gradient's sum), each pass over
these tensors costs about a millisecond on an H100, and together they took more GPU time than
the convolutions (``benchmarks/README.md``, GPU section). Here a layer is:

* **forward**: the Triton convolution (:mod:`data2vec.nn.token_conv`) reads the layer input's
  bf16 copy and writes ``y`` (bf16); one row-wise kernel normalizes whole rows (a token's
  channels) in registers, applies GELU, adds the float32 residual and writes the float32
  output and its bf16 copy for the next layer;
* **backward**: one row-wise kernel recomputes the row statistics and GELU from ``y`` and
  writes ``y``'s gradient; the convolution's input gradient adds the residual's gradient as
  it stores; the weight gradient reads the saved bf16 input.

A row of ``C`` channels is read as two column tiles whose widths are powers of two (768 =
512 + 256), so that no thread works on padding columns (:data:`SPLIT_ROWS`).

Only ``y`` and the bf16 input are kept for backward (``checkpoint_elementwise`` keeps the
same two on the plain path). The float32 residual stream and the autocast rounding of the
convolution's operands are those of the plain ops; the LayerNorm has no affine parameters
(``ChannelLayerNorm``) and the GELU is the exact (erf) one, as ``nn.GELU()``. Triton's
interpreter runs the kernels on the CPU for the tests (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from data2vec.nn import token_conv
from data2vec.nn.triton_gate import tl, triton

# Decoder rows as two column tiles, so that no lane works on padding: 768 channels as 512 + 256
# rather than one tile of 1024. The backward kernel is bound by issuing instructions on an H100
# (2128 per 4-row program, sm_90: about 0.92 of its measured 1.05 ms), a quarter of them for
# padding; benchmarks/README.md, "GPU, eighth pass". False: one tile, as measured before.
SPLIT_ROWS = True

if triton is not None:

    @triton.jit
    def _row_tile(rows, M, C: tl.constexpr, START: tl.constexpr, BLOCK: tl.constexpr):
        """Offsets into ``(M, C)`` rows and the mask of their columns ``[START, START +
        BLOCK)``, each ``(BLOCK_R, BLOCK)``."""
        cols = START + tl.arange(0, BLOCK)
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        return offs, (rows < M)[:, None] & (cols < C)[None, :]

    @triton.jit
    def _normalized_rows(y_ptr, M, eps, C: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
        """This program's rows of ``y`` normalized over their ``C`` channels (no affine):
        ``(offs_a, ok_a, n_a, offs_b, ok_b, n_b, rstd)``, each tile's offsets, mask and values
        (float32), and each row's ``1 / std``. With ``BLOCK_B`` 0 tile b repeats tile a."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_a, ok_a = _row_tile(rows, M, C, 0, BLOCK_A)
        ya = tl.load(y_ptr + offs_a, mask=ok_a, other=0.0).to(tl.float32)
        total = tl.sum(ya, axis=1)
        offs_b, ok_b, yb = offs_a, ok_a, ya
        if BLOCK_B > 0:
            offs_b, ok_b = _row_tile(rows, M, C, BLOCK_A, BLOCK_B)
            yb = tl.load(y_ptr + offs_b, mask=ok_b, other=0.0).to(tl.float32)
            total += tl.sum(yb, axis=1)
        mean = total / C
        da = tl.where(ok_a, ya - mean[:, None], 0.0)
        squares = tl.sum(da * da, axis=1)
        db = da
        if BLOCK_B > 0:
            db = tl.where(ok_b, yb - mean[:, None], 0.0)
            squares += tl.sum(db * db, axis=1)
        rstd = 1.0 / tl.sqrt(squares / C + eps)
        return offs_a, ok_a, da * rstd[:, None], offs_b, ok_b, db * rstd[:, None], rstd

    @triton.jit
    def _gelu_grad(n, g, ok):
        """``g * gelu'(n)`` (exact GELU), zero outside ``ok``: d gelu(n) / dn = Phi(n) +
        n phi(n), with phi the standard normal density."""
        cdf = 0.5 * (1.0 + tl.math.erf(n * 0.7071067811865476))
        return tl.where(ok, g * (cdf + n * tl.exp(-0.5 * n * n) * 0.3989422804014327), 0.0)

    @triton.jit
    def _store_layer_out(n, r_ptr, out_ptr, low_ptr, offs, ok, HAS_RES: tl.constexpr,
                         HAS_LOW: tl.constexpr):  # fmt: skip
        """``gelu(n) (+ r)`` of one tile, stored in ``out``'s dtype and in ``low``'s."""
        out = 0.5 * n * (1.0 + tl.math.erf(n * 0.7071067811865476))
        if HAS_RES:
            out += tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)
        if HAS_LOW:
            tl.store(low_ptr + offs, out.to(low_ptr.dtype.element_ty), mask=ok)

    # Both kernels take a row's columns as tile a, [0, BLOCK_A), and, unless BLOCK_B is 0,
    # tile b, [BLOCK_A, BLOCK_A + BLOCK_B) (see split_launch); each row sum adds both tiles'.
    @triton.jit
    def _forward_kernel(
        y_ptr,
        r_ptr,
        out_ptr,
        low_ptr,
        M,
        eps,
        C: tl.constexpr,
        HAS_RES: tl.constexpr,
        HAS_LOW: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        """``out = gelu(layer_norm(y)) (+ r)`` over rows of ``C`` channels, and ``low``, its
        copy in ``low``'s (lower) precision."""
        offs_a, ok_a, na, offs_b, ok_b, nb, _ = _normalized_rows(
            y_ptr, M, eps, C, BLOCK_R, BLOCK_A, BLOCK_B
        )
        _store_layer_out(na, r_ptr, out_ptr, low_ptr, offs_a, ok_a, HAS_RES, HAS_LOW)
        if BLOCK_B > 0:
            _store_layer_out(nb, r_ptr, out_ptr, low_ptr, offs_b, ok_b, HAS_RES, HAS_LOW)

    @triton.jit
    def _backward_kernel(
        y_ptr,
        g_ptr,
        gy_ptr,
        M,
        eps,
        C: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        """Gradient of ``gelu(layer_norm(y))`` w.r.t. ``y`` from the output gradient ``g``."""
        offs_a, ok_a, na, offs_b, ok_b, nb, rstd = _normalized_rows(
            y_ptr, M, eps, C, BLOCK_R, BLOCK_A, BLOCK_B
        )
        gna = _gelu_grad(na, tl.load(g_ptr + offs_a, mask=ok_a, other=0.0).to(tl.float32), ok_a)
        # LayerNorm without affine: dy = rstd * (gn - mean(gn) - n * mean(gn * n))
        m1 = tl.sum(gna, axis=1)
        m2 = tl.sum(gna * na, axis=1)
        if BLOCK_B > 0:
            gb = tl.load(g_ptr + offs_b, mask=ok_b, other=0.0).to(tl.float32)
            gnb = _gelu_grad(nb, gb, ok_b)
            m1 += tl.sum(gnb, axis=1)
            m2 += tl.sum(gnb * nb, axis=1)
        m1, m2 = m1 / C, m2 / C
        gya = rstd[:, None] * (gna - m1[:, None] - na * m2[:, None])
        tl.store(gy_ptr + offs_a, gya.to(gy_ptr.dtype.element_ty), mask=ok_a)
        if BLOCK_B > 0:
            gyb = rstd[:, None] * (gnb - m1[:, None] - nb * m2[:, None])
            tl.store(gy_ptr + offs_b, gyb.to(gy_ptr.dtype.element_ty), mask=ok_b)


def _pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (plain Python: launch sizes are worked out without
    Triton installed too)."""
    return 1 << max(0, n - 1).bit_length()


def rows_launch(M: int, C: int) -> tuple[tuple[int], dict[str, int]]:
    """Grid and block sizes of the row-wise kernels (this module's and ``token_norm``'s): a few
    whole rows per program."""
    block_c = _pow2(C)
    block_r = max(1, min(8, 4096 // block_c))
    return (-(-M // block_r),), {"BLOCK_R": block_r, "BLOCK_C": block_c}


def split_launch(M: int, C: int) -> tuple[tuple[int], dict[str, int]]:
    """:func:`rows_launch` for this module's kernels, a row's columns as two tiles (see
    :data:`SPLIT_ROWS`): ``BLOCK_A``, the largest power of two below ``C``, and ``BLOCK_B``, a
    power of two covering the rest; one tile of ``C`` rounded up (``BLOCK_B`` 0) where ``C`` is
    a power of two or the split is off."""
    grid, blocks = rows_launch(M, C)
    block_c = blocks.pop("BLOCK_C")
    if SPLIT_ROWS and block_c != C:
        block_a = block_c // 2
        return grid, {**blocks, "BLOCK_A": block_a, "BLOCK_B": _pow2(C - block_a)}
    return grid, {**blocks, "BLOCK_A": block_c, "BLOCK_B": 0}


class _DecoderLayer(torch.autograd.Function):
    """``(h, h_low) -> (out, out_low)``; ``h_low`` (``h`` in the compute dtype, or None to
    read ``h`` itself) gets no gradient: it stands for ``h`` (autocast's cast, whose
    gradient passes straight through). ``out_low`` stands for ``out`` likewise: a gradient
    that reaches it (the decoder's projection reads the last layer's copy) joins ``out``'s,
    so the projection's gradient need not be widened to float32 first."""

    @staticmethod
    def forward(ctx, h, h_low, weight, bias, hw, eps, residual, out_dtype):  # type: ignore[override]
        groups = h.shape[1] // weight.shape[1]
        x = h if h_low is None else h_low
        y = token_conv.conv_tokens_forward(
            x, token_conv.forward_weight(weight, groups), bias, hw, weight.shape[0]
        )
        M, C = y.shape
        out = torch.empty(M, C, device=y.device, dtype=out_dtype)
        low = torch.empty(M, C, device=y.device, dtype=weight.dtype)
        grid, blocks = split_launch(M, C)
        _forward_kernel[grid](
            y, h, out, low, M, eps, C=C, HAS_RES=residual, HAS_LOW=True, **blocks
        )  # fmt: skip
        ctx.save_for_backward(x, y, weight)
        ctx.hw, ctx.eps, ctx.residual = hw, eps, residual
        ctx.has_bias, ctx.h_dtype = bias is not None, h.dtype
        ctx.set_materialize_grads(False)  # an unused output gets None, not a tensor of zeros
        return out, low

    @staticmethod
    def backward(ctx, g: Tensor | None, g_low: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, y, weight = ctx.saved_tensors
        if g is None and g_low is None:
            return (None,) * 8
        # the kernels read either dtype and sum in float32
        g = (g_low if g is None else g if g_low is None else g + g_low).contiguous()
        M, C = y.shape
        gy = torch.empty_like(y)
        grid, blocks = split_launch(M, C)
        _backward_kernel[grid](y, g, gy, M, ctx.eps, C=C, **blocks)
        groups = x.shape[1] // weight.shape[1]
        gh = gw = gb = None
        if ctx.needs_input_grad[0]:
            # conv^T(gy), plus the residual branch's gradient g added as the result is stored
            gh = token_conv.conv_tokens_forward(
                gy, token_conv.input_grad_weight(weight, groups), None, ctx.hw, x.shape[1],
                out_dtype=ctx.h_dtype, add=g if ctx.residual else None,
            )  # fmt: skip
        want_gb = ctx.has_bias and ctx.needs_input_grad[3]
        if ctx.needs_input_grad[2]:
            gw, gb = token_conv.weight_bias_grad(x, gy, ctx.hw, weight, groups, bias=want_gb)
        elif want_gb:
            gb = gy.sum(0, dtype=torch.float32)
        return gh, None, gw, gb, None, None, None, None


def decoder_layer(
    h: Tensor,
    h_low: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    hw: tuple[int, int],
    eps: float = 1e-5,
    residual: bool = True,
) -> tuple[Tensor, Tensor]:
    """``gelu(layer_norm(conv(h))) (+ h)`` on ``(N, T, C)`` tokens, as the plain decoder layer.

    The same function as ``ConvDecoder``'s plain layer (conv with ``k // 2`` zero padding and
    ``G = C_in / weight.shape[1]`` groups, LayerNorm over channels without affine parameters,
    exact GELU, the residual when ``residual``), with its dtypes: the products in the autocast
    dtype when autocast is on (else in ``h``'s); the output float32 under autocast (autocast
    runs LayerNorm in float32), else ``h``'s dtype.

    Args:
        h: ``(N, T, C_in)`` with ``T = H * W``, contiguous.
        h_low: ``h`` already in the compute dtype (the previous layer's second output), or
            None (the first layer: the kernel rounds ``h`` as it reads it).
        weight: ``(C_out, C_in / G, KH, KW)`` or ``(C_out, C_in / G, K)`` (``H = 1``).
        bias: ``(C_out,)`` or None.
        hw: ``(H, W)``.
        eps: the LayerNorm's epsilon.
        residual: add ``h`` (needs ``C_out == C_in``).

    Returns:
        ``(out, out_low)``: ``(N, T, C_out)``, and its copy in the compute
        dtype for the next layer (no gradient flows through the copy; see ``_DecoderLayer``).
    """
    if triton is None:
        raise RuntimeError(f"decoder_layer needs {token_conv.NEEDS_TRITON}")
    if weight.dim() == 3:
        weight = weight.unsqueeze(2)
    N, T, cin = h.shape
    odd = all(k % 2 for k in weight.shape[2:])
    if (
        hw[0] * hw[1] != T
        or cin % weight.shape[1]
        or not odd
        or (residual and weight.shape[0] != cin)
    ):
        raise ValueError(f"decoder_layer: bad shapes h={tuple(h.shape)} w={tuple(weight.shape)}")
    device = h.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else h.dtype
    out_dtype = torch.promote_types(h.dtype, torch.float32) if autocast else h.dtype
    rows = h.reshape(N * T, cin).contiguous()
    low = None if h_low is None else h_low.reshape(N * T, cin).to(dtype).contiguous()
    out, out_low = _DecoderLayer.apply(
        rows, low, weight.to(dtype), bias, hw, eps, residual, out_dtype
    )
    return out.view(N, T, -1), out_low.view(N, T, -1)
