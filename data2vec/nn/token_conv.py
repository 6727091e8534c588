"""Grouped "same" convolution over channels-last tokens, as Triton kernels (for CUDA).

The data2vec 2.0 decoder's convolutions have few channels per group (768 / 16 = 48 in the base
presets). On an H100, cuDNN ran them at about 35 TFLOP/s in bf16 (forward + backward), much
of it in layout transforms; these kernels run them at about 150 TFLOP/s (``benchmarks/README.md``,
"GPU, second pass" and "GPU, fourth pass"). Each one is an implicit GEMM that reads the
decoder's own ``(N, H*W, C)`` token layout directly:

* **forward**: every program computes ``BLOCK_M`` output positions x ``BLOCK_N`` output
  channels of one group, summing ``KH*KW`` taps x ``C_in/G`` input channels with ``tl.dot``;
  positions whose tap falls outside the image read zeros (the zero padding). The sum runs
  over (tap, channel) pairs packed ``BLOCK_K`` at a time, so a step may span two taps: 48
  channels x 9 taps take 7 steps of 64 instead of 9 steps a quarter empty (``PACK_K``; one
  tap per step is kept for comparison);
* **input gradient**: the same kernel on the output gradient, with the weight's taps flipped
  and its in/out channels swapped;
* **weight gradient**: one program per (group, block of packed (tap, channel) columns, slice
  of positions) computes ``grad_out^T @ shifted_input``; the slices' partial sums (float32)
  are added afterwards by one reduction, so the result does not depend on the order programs
  finish in. The bias gradient's partial sums (``grad_out``'s column sums) come from the same
  tiles of ``grad_out``, instead of another pass over it.

The 1-D convolutions of audio and text are the case ``H = 1``, ``KH = 1``. The products run in
the weight's dtype (a float32 input is rounded to it as the kernel reads it, which is what
autocast's cast would do), sums in float32; the output has the weight's dtype unless asked
otherwise (the input gradient comes back in the input's dtype).
Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernels on the CPU, which is how
the tests check them against ``F.conv2d`` on machines without a GPU. The kernels themselves are
in :mod:`data2vec.nn.token_conv_kernels`; here are their launch settings, launchers and
autograd, and what the other Triton layers share (:func:`available`, :func:`device_guard`,
:func:`suspended`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from data2vec.nn import token_conv_kernels as kernels
from data2vec.nn.triton_gate import NEEDS_TRITON, triton

# The kinds of layer that take Triton kernels, each switched as a whole: the decoders'
# convolution layers, the post-LN blocks' fused norms, the MLP's backward, the short-sequence
# attention and the regression loss.
KINDS = ("decoder", "norms", "mlp", "attention", "loss")

_suspended = False
_only: str | None = None  # inside only(): the one kind that may take its kernels
_disabled: dict[str, str] = {}  # kind -> why its kernels are off for the rest of the process


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Run every layer on the torch ops inside this block, whatever its setting.

    ``torch.utils.flop_counter`` cannot see into Triton kernels; ``data2vec bench`` counts a
    step's FLOPs in this block (the same products, so the same count).
    """
    global _suspended
    before, _suspended = _suspended, True
    try:
        yield
    finally:
        _suspended = before


@contextlib.contextmanager
def only(kind: str) -> Iterator[None]:
    """Inside this block only layers of ``kind`` (one of :data:`KINDS`) take their kernels:
    how the start-up check finds which kind is wrong."""
    global _only
    _check_kinds([kind])
    before, _only = _only, kind
    try:
        yield
    finally:
        _only = before


def is_suspended(kind: str) -> bool:
    """Whether layers of ``kind`` (one of :data:`KINDS`) take the torch ops now: inside a
    :func:`suspended` block, inside an :func:`only` block of another kind, or for good after
    :func:`disable`."""
    return _suspended or (_only is not None and _only != kind) or kind in _disabled


def disable(reason: str, kinds: Iterable[str] = KINDS) -> None:
    """Take the torch ops in layers of ``kinds`` for the rest of the process, whatever their
    settings (``decoder.conv_impl=triton`` included): the start-up check found their kernels
    wrong on this GPU (:mod:`data2vec.engine.kernel_check`). ``reason`` is kept for
    :func:`disabled`."""
    kinds = list(kinds)
    _check_kinds(kinds)
    _disabled.update(dict.fromkeys(kinds, reason))


def enable() -> None:
    """Undo :func:`disable` (tests; a process that knows better)."""
    _disabled.clear()


def disabled() -> dict[str, str]:
    """The kinds :func:`disable` turned off, each with why (empty: none)."""
    return dict(_disabled)


def _check_kinds(kinds: list[str]) -> None:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kinds of layer {unknown}; the kinds are {list(KINDS)}")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_guard(x: Tensor) -> contextlib.AbstractContextManager:
    """Make ``x``'s GPU the current one for a block of kernel launches, if it is not already.

    Triton launches on the current CUDA device, so a model on another GPU (``cuda:1`` in a
    single process) must make its own current for the forward; autograd's backward threads
    already run on the tensors' device.
    """
    if x.is_cuda and x.device.index is not None and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def supports(weight: Tensor, groups: int) -> bool:
    """Whether the kernels handle a Conv1d/Conv2d ``weight`` of ``groups`` groups: odd kernel
    sizes and at most 128 channels per group (the weight-gradient kernel holds a group's
    whole block)."""
    odd = all(k % 2 for k in weight.shape[2:])
    return odd and weight.shape[1] <= 128 and weight.shape[0] // groups <= 128


def available(x: Tensor) -> bool:
    """Whether the Triton kernels can run on ``x``'s device: an NVIDIA GPU of compute
    capability 8.0 or newer (bf16 and TF32 matrix products; the kernels were measured on an
    H100), or the CPU under Triton's interpreter."""
    if triton is None:
        return False
    if x.device.type == "cpu":
        return interpreting()
    return x.is_cuda and torch.version.hip is None and _capability(x.device.index) >= (8, 0)


@functools.cache
def _capability(device_index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


# Launch settings, module-level so that benchmarks can sweep them (``gpu_check.py``).
# Defaults: the fastest of gpu_check.py's sweep on an H100 (bf16, image-v2-base's decoder at
# batch 128 x 16 clones; benchmarks/README.md, "GPU, fourth pass"). PACK_K 1: (tap, channel)
# pairs packed into the products' K (forward 1.45 ms, weight gradient 1.56 ms, against 1.84
# and 1.97 ms one tap at a time). BLOCK_K 0 = the packed pairs' count (or, unpacked, the
# channels per group) rounded up to a power of two, at most 64.
# PIPELINE (seventh pass): the forward's packed steps as a pipelined loop (num_stages deep)
# rather than unrolled, in which num_stages does nothing. Off: on an H200 the kernel alone ran
# 7 % faster with it, the whole step no faster ("GPU, tenth pass").
# maxnreg (eighth pass): a register cap (0: none). At 128 the forward compiles to 128
# registers instead of 136 and the input gradient instead of 184, no spills (sm_90), so 4
# programs share a multiprocessor instead of 3 and 2; the whole step was no faster with it on
# an H200.
FORWARD = {
    "BLOCK_M": 128, "BLOCK_K": 0, "PACK_K": 1, "SWAP_AB": 0, "PIPELINE": 0,
    "num_warps": 4, "num_stages": 3, "maxnreg": 0,
}  # fmt: skip
WEIGHT_GRAD = {
    "BLOCK_M": 64, "BLOCK_K": 0, "PACK_K": 1, "num_warps": 4, "num_stages": 3,
    "programs_per_sm": 64,
}  # fmt: skip


def register_cap(n: int) -> dict[str, int]:
    """``maxnreg`` for a GPU launch: at most ``n`` registers per thread (0: the compiler's
    choice, and no argument passed at all). Fewer registers let more programs share a
    multiprocessor (65536 registers: 4 programs of 128 threads at 128 each, 2 at 184)."""
    return {"maxnreg": n} if n and not interpreting() else {}


def _launch(settings: dict[str, int]) -> dict[str, int]:
    """Warps, pipeline stages and the register cap for a GPU launch; the interpreter takes
    none of them."""
    if interpreting():
        return {}
    return {**{k: settings[k] for k in ("num_warps", "num_stages")},
            **register_cap(settings.get("maxnreg", 0))}  # fmt: skip


def _block(n: int, cap: int) -> int:
    """The smallest power of two >= ``n`` (and >= 16, ``tl.dot``'s least size), at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _vec(channels: int) -> int:
    """The largest power of two dividing ``channels``, at most 16: how many packed (tap,
    channel) pairs in a row are sure to share a tap and be consecutive in memory, and so load
    as one vector."""
    return min(16, channels & -channels)


def _ieee(w: Tensor) -> bool:
    """float32 operands multiply in full precision unless the user allowed TF32 for cuDNN."""
    return w.dtype == torch.float32 and not (w.is_cuda and torch.backends.cudnn.allow_tf32)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def conv_tokens_forward(
    x: Tensor,
    w_t: Tensor,
    bias: Tensor | None,
    hw: tuple[int, int],
    cout: int,
    out_dtype: torch.dtype | None = None,
    add: Tensor | None = None,
) -> Tensor:
    """One launch of the conv kernel.

    Args:
        x: ``(M, C_in)`` contiguous rows of ``H x W`` images (rounded to ``w_t``'s dtype
            as they are read).
        w_t: ``(G, KH, KW, C_in/G, C_out/G)`` contiguous.
        bias: ``(C_out,)`` or None.
        hw: ``(H, W)``.
        cout: ``C_out``.
        out_dtype: the output's dtype (default ``w_t``'s); sums are float32 either way.
        add: ``(M, C_out)`` contiguous, added to the result in float32 before it is stored.

    Returns:
        ``(M, C_out)``.
    """
    G, KH, KW, cin_g, cout_g = w_t.shape
    M, cin = x.shape
    out = torch.empty(M, cout, device=x.device, dtype=out_dtype or w_t.dtype)
    # Tiles of all a group's output channels (48 fill 3/4 of 64 columns, but every input
    # row is read once per group).
    block_m, block_n = FORWARD["BLOCK_M"], _block(cout_g, 64)
    pack = bool(FORWARD["PACK_K"])
    block_k = FORWARD["BLOCK_K"] or _block(KH * KW * cin_g if pack else cin_g, 64)
    grid = (triton.cdiv(M, block_m) * G * triton.cdiv(cout_g, block_n),)
    kernels.conv_kernel[grid](
        x, w_t, bias if bias is not None else x, add if add is not None else x, out, M,
        hw[0], hw[1], C_IN=cin, C_OUT=cout, CIN_G=cin_g, COUT_G=cout_g, KH=KH, KW=KW,
        HAS_BIAS=bias is not None, HAS_ADD=add is not None, IEEE=_ieee(w_t),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PACK=pack,
        VEC=_vec(cin_g), SWAP=pack and bool(FORWARD.get("SWAP_AB", 0)),
        PIPE=pack and bool(FORWARD.get("PIPELINE", 0)), **_launch(FORWARD),
    )  # fmt: skip
    return out


def conv_tokens_weight_grad(
    x: Tensor,
    gy: Tensor,
    hw: tuple[int, int],
    shape: tuple[int, int, int, int, int],
    splits: int | None = None,
) -> Tensor:
    """Weight gradient ``(G, KH*KW, C_out/G, C_in/G)`` float32 of :func:`conv_tokens_forward`.

    ``x: (M, C_in)`` the forward's input (rounded to ``gy``'s dtype as it is read),
    ``gy: (M, C_out)`` the output gradient in the convolution's compute dtype,
    ``shape = (G, KH, KW, C_in/G, C_out/G)``; ``splits``: slices of rows summed separately
    (default: ``WEIGHT_GRAD["programs_per_sm"]`` programs per multiprocessor).
    """
    return conv_tokens_grads(x, gy, hw, shape, splits)[0]


def conv_tokens_grads(
    x: Tensor,
    gy: Tensor,
    hw: tuple[int, int],
    shape: tuple[int, int, int, int, int],
    splits: int | None = None,
    bias: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`conv_tokens_weight_grad`, and with ``bias`` the bias gradient ``(C_out,)``
    float32 (``gy``'s column sums) from the same pass over ``gy`` (else None)."""
    G, KH, KW, cin_g, cout_g = shape
    M = x.shape[0]
    block_m = WEIGHT_GRAD["BLOCK_M"]
    pack = bool(WEIGHT_GRAD["PACK_K"])
    if pack:
        block_i = WEIGHT_GRAD["BLOCK_K"] or _block(KH * KW * cin_g, 64)
        n_cols = triton.cdiv(KH * KW * cin_g, block_i)
    else:
        block_i, n_cols = _block(cin_g, 128), KH * KW
    programs = G * n_cols
    if splits is None:
        # Many programs per multiprocessor balance the load; the slices' partial sums cost
        # S x G x KH*KW x C_out/G x C_in/G floats (65 MB for the base decoder at batch 128).
        sms = _sm_count(x.device.index or 0) if x.is_cuda else 2
        per_sm = WEIGHT_GRAD["programs_per_sm"]
        splits = min(triton.cdiv(per_sm * sms, programs), triton.cdiv(M, 8 * block_m))
    splits = max(1, splits)
    iters = triton.next_power_of_2(triton.cdiv(M, splits * block_m))
    splits = triton.cdiv(M, iters * block_m)
    if pack:
        shape_s = (splits, G, cout_g, KH * KW * cin_g)
    else:
        shape_s = (splits, G, KH * KW, cout_g, cin_g)
    ws = torch.empty(shape_s, device=x.device, dtype=torch.float32)
    # The bias gradient's partial sums, one row per slice (a separate pass over ``gy`` cost
    # 0.24 ms per layer at image-v2-base batch 128 on an H100).
    bs = torch.empty(splits, G * cout_g, device=x.device, dtype=torch.float32) if bias else ws
    kernels.wgrad_kernel[(splits * programs,)](
        x, gy, ws, bs, M, hw[0], hw[1],
        C_IN=x.shape[1], C_OUT=gy.shape[1], CIN_G=cin_g, COUT_G=cout_g, KH=KH, KW=KW,
        IEEE=_ieee(gy), ITERS=iters, BLOCK_M=block_m, BLOCK_O=_block(cout_g, 128),
        BLOCK_I=block_i, PACK=pack, VEC=_vec(cin_g), N_COLS=n_cols, HAS_BIAS=bias,
        HC=hw[0] if hw[0] > 1 else 0, WC=hw[1] if hw[0] > 1 else 0,
        **_launch(WEIGHT_GRAD),
    )  # fmt: skip
    gb = bs.sum(0) if bias else None
    if pack:  # (G, C_out/G, KH*KW, C_in/G) -> (G, KH*KW, C_out/G, C_in/G)
        return ws.sum(0).view(G, cout_g, KH * KW, cin_g).transpose(1, 2), gb
    return ws.sum(0), gb


def forward_weight(weight: Tensor, groups: int) -> Tensor:
    """``(C_out, C_in/G, KH, KW)`` -> ``(G, KH, KW, C_in/G, C_out/G)``: each tap's block is a
    ready ``(K, N)`` operand of the kernel's matrix products."""
    cout, cin_g, KH, KW = weight.shape
    w5 = weight.reshape(groups, cout // groups, cin_g, KH, KW)
    return w5.permute(0, 3, 4, 2, 1).contiguous()


def input_grad_weight(weight: Tensor, groups: int) -> Tensor:
    """The weight that turns the forward kernel into the input gradient (the convolution's
    transpose): taps mirrored, channel roles swapped, ``(G, KH, KW, C_out/G, C_in/G)``."""
    cout, cin_g, KH, KW = weight.shape
    w5 = weight.reshape(groups, cout // groups, cin_g, KH, KW)
    return w5.flip(3, 4).permute(0, 3, 4, 1, 2).contiguous()


def weight_bias_grad(
    x: Tensor, gy: Tensor, hw: tuple[int, int], weight: Tensor, groups: int, bias: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The gradient of ``weight`` (its shape and dtype) from the input and output gradient,
    and with ``bias`` the bias gradient (float32, ``gy``'s column sums) from the same pass."""
    cout, cin_g, KH, KW = weight.shape
    ws, gb = conv_tokens_grads(x, gy, hw, (groups, KH, KW, cin_g, cout // groups), bias=bias)
    gw = ws.reshape(groups, KH, KW, cout // groups, cin_g).permute(0, 3, 4, 1, 2)
    return gw.reshape(cout, cin_g, KH, KW).to(weight.dtype), gb


class _TokenConv(torch.autograd.Function):
    """Autograd for the kernels above; saves the input and the weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, hw):  # type: ignore[override]
        groups = x.shape[1] // weight.shape[1]
        ctx.save_for_backward(x, weight)
        ctx.hw, ctx.has_bias = hw, bias is not None
        return conv_tokens_forward(x, forward_weight(weight, groups), bias, hw, weight.shape[0])

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gy = gy.to(weight.dtype).contiguous()
        groups = x.shape[1] // weight.shape[1]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            w_back = input_grad_weight(weight, groups)
            gx = conv_tokens_forward(gy, w_back, None, ctx.hw, x.shape[1], out_dtype=x.dtype)
        want_gb = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:
            gw, gb = weight_bias_grad(x, gy, ctx.hw, weight, groups, bias=want_gb)
        elif want_gb:
            gb = gy.sum(0, dtype=torch.float32)
        return gx, gw, gb, None


def conv_tokens(x: Tensor, weight: Tensor, bias: Tensor | None, hw: tuple[int, int]) -> Tensor:
    """Grouped "same" convolution of ``(N, H*W, C_in)`` tokens with a Conv1d/Conv2d weight.

    Equal to ``conv2d`` over the ``(N, C_in, H, W)`` view with padding ``k // 2`` (``conv1d``
    when ``H = 1`` and the weight is 3-D), returned as ``(N, H*W, C_out)`` tokens. Under
    autocast the products run in the autocast dtype, as autocast does for convolutions (the
    input is rounded as the kernel reads it), the output has that dtype and the bias is added
    in float32; the input's gradient comes back in the input's dtype.

    Args:
        x: ``(N, T, C_in)`` with ``T = H * W``.
        weight: ``(C_out, C_in / G, KH, KW)`` or ``(C_out, C_in / G, K)`` (then ``H`` must be
            1); odd kernel sizes.
        bias: ``(C_out,)`` or None.
        hw: ``(H, W)``.
    """
    if triton is None:
        raise RuntimeError(f"conv_tokens needs {NEEDS_TRITON}")
    if weight.dim() == 3:
        weight = weight.unsqueeze(2)
    N, T, cin = x.shape
    if hw[0] * hw[1] != T or cin % weight.shape[1] or any(k % 2 == 0 for k in weight.shape[2:]):
        raise ValueError(f"conv_tokens: bad shapes x={tuple(x.shape)} w={tuple(weight.shape)}")
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    weight = weight.to(dtype)
    rows = x.reshape(N * T, cin).contiguous()
    out = _TokenConv.apply(rows, weight, bias, hw)
    return out.view(N, T, -1)
