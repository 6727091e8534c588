"""Multi-head self-attention through ``F.scaled_dot_product_attention``, or, for short
unmasked sequences on CUDA, through :mod:`data2vec.nn.token_attention`'s Triton kernels.

Module and parameter names (``qkv``, ``proj``) follow the fairseq/timm layout so that weight
conversion is a rename, not a reshuffle.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from data2vec.nn import token_attention
from data2vec.nn.lean import dropout_attention, dropout_or_identity
from data2vec.nn.lean_fused import dropout_attention_proj


def attention_mask(
    padding_mask: Tensor | None, attn_bias: Tensor | None, dtype: torch.dtype
) -> Tensor | None:
    """Combine a key padding mask and an additive bias into one SDPA ``attn_mask``.

    Args:
        padding_mask: ``(B, T)`` bool, True = padding (this key is ignored), or None.
        attn_bias: additive logits bias broadcastable to ``(B, H, T, T)`` (e.g. ALiBi), or None.
        dtype: dtype of the attention logits.

    Returns:
        None, or a float mask broadcastable to ``(B, H, T, T)`` with ``-inf`` at padded keys.
    """
    if padding_mask is None or not bool(padding_mask.any()):
        return None if attn_bias is None else attn_bias.to(dtype)
    # (B, 1, 1, T): padded keys get -inf in every head and for every query.
    key_mask = torch.zeros(padding_mask.shape, dtype=dtype, device=padding_mask.device)
    key_mask = key_mask.masked_fill(padding_mask, float("-inf"))[:, None, None, :]
    return key_mask if attn_bias is None else attn_bias.to(dtype) + key_mask


# On CUDA, sequences up to this many tokens attend through PyTorch's memory-efficient kernel
# rather than the backend PyTorch ranks first (cuDNN's on an H100). bf16 training steps on an
# H100 (benchmarks/README.md, "GPU, fourth pass"): image-v2-base b128 (40 and 197 tokens)
# -1.5 to -2 %, b32 -4 %, audio-v2-base b32 (2 s clips, 99 frames) -13 %; flash attention was
# 9 % slower at b128. Longer sequences were not measured and keep PyTorch's choice.
SHORT_SEQUENCE = 256
# With ``set_priority`` (torch >= 2.6) the other enabled kernels stay as fallbacks in
# PyTorch's order; before it, only the math kernel backs the efficient one up.
_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters
_SHORT_KWARGS = {"set_priority": True} if _PRIORITY else {}


def prefers_efficient(q: Tensor) -> bool:
    """Whether :func:`sdpa` ranks the memory-efficient kernel first for queries ``q``.

    Only on CUDA, for at most :data:`SHORT_SEQUENCE` tokens, outside ``torch.compile``
    (Inductor picks its own), and only while the efficient, flash and math kernels are all
    enabled, as PyTorch ships them: a caller's own ``sdpa_kernel`` choice turns some off and
    is left alone. (cuDNN's kernel is enabled by default only in some releases, off in 2.4.)
    """
    if not q.is_cuda or q.shape[-2] > SHORT_SEQUENCE or torch.compiler.is_compiling():
        return False
    b = torch.backends.cuda
    return b.mem_efficient_sdp_enabled() and b.flash_sdp_enabled() and b.math_sdp_enabled()


def short_backends() -> list[SDPBackend]:
    """The kernels :func:`sdpa` enables for short sequences, the efficient one first.

    cuDNN's joins the fallbacks only where it is enabled now, so it is never switched on here.
    """
    if not _PRIORITY:
        return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    cudnn = [SDPBackend.CUDNN_ATTENTION] if torch.backends.cuda.cudnn_sdp_enabled() else []
    return [SDPBackend.EFFICIENT_ATTENTION, *cudnn, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float) -> Tensor:
    """``F.scaled_dot_product_attention``, through the memory-efficient kernel where
    :func:`prefers_efficient` says so. ``q, k, v: (B, H, T, d)`` -> ``(B, H, T, d)``."""
    if prefers_efficient(q):
        with sdpa_kernel(short_backends(), **_SHORT_KWARGS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """The fused projection's output as per-head queries, keys and values (views, no copy).

    The ``(q|k|v)`` axis is unbound before the heads move forward. Autograd's backward then
    stacks the three gradients straight into the ``(B, T, 3, H, d)`` layout that the
    projection's backward reads as ``(B*T, 3C)``. Moving the axis first (``(3, B, H, T, d)``,
    then unbind) made it stack into that order and copy once more to get back: on an H100
    (image-v2-base, batch 128) that second copy was about 0.6 ms per block.

    Args:
        qkv: ``(B, T, 3C)``, ``[q; k; v]`` along the last axis, heads inside each.
        num_heads: ``H``.

    Returns:
        ``q, k, v``, each ``(B, H, T, C/H)``.
    """
    B, T, C3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, num_heads, C3 // (3 * num_heads)).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class Attention(nn.Module):
    """Fused-qkv self-attention.

    Args:
        dim: model width ``C``.
        num_heads: number of heads ``H`` (``C`` must be divisible by ``H``).
        qkv_bias: bias on the fused qkv projection (all released data2vec 2.0 models use one).
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = dropout_or_identity(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Attend.

        Args:
            x: ``(B, T, C)``.
            attn_mask: additive float mask broadcastable to ``(B, H, T, T)`` (see
                :func:`attention_mask`), or None.

        Returns:
            ``(B, T, C)``.
        """
        B, T, C = x.shape
        drop = self.attn_drop if self.training else 0.0
        # short sequences, on CUDA (or the CPU under Triton's interpreter, for the tests);
        # in training, the projection's backward goes with the attention's
        short = attn_mask is None and drop == 0
        if short and token_attention.projects(x, self.qkv, self.num_heads):
            out = token_attention.project_and_attend(x, self.qkv, self.num_heads)
            return self.proj_drop(self.proj(out))
        qkv = self.qkv(x)
        if short and token_attention.supports(qkv, self.num_heads):
            return self.proj_drop(self.proj(token_attention.attend(qkv, self.num_heads)))
        q, k, v = split_heads(qkv, self.num_heads)
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        if 0 < drop < 1 and x.device.type == "cpu" and torch.is_grad_enabled():
            # What SDPA (and the projection) compute on CPU with dropout, keeping less for
            # backward (nn/lean.py, nn/lean_fused.py; the fused op for a plain Linear only).
            if type(self.proj) is nn.Linear:
                return self.proj_drop(dropout_attention_proj(q, k, v, attn_mask, drop, self.proj))
            out = dropout_attention(q, k, v, attn_mask, drop)
        else:
            out = sdpa(q, k, v, attn_mask, drop)
        out = out.transpose(1, 2).reshape(B, T, C)  # (B, H, T, C/H) -> (B, T, C)
        return self.proj_drop(self.proj(out))
