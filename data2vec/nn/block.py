"""Transformer blocks shared by every modality.

data2vec 2.0 uses **post-LN** blocks (all released v2 configs, fairseq ``AltBlock`` with
``layer_norm_first=False``)::

    x = LN1(x + DropPath(Attn(x)))
    f = MLP(x)
    x = LN2(x + DropPath(Dropout(f)))

and returns ``(x, f)``: the FFN output ``f`` *before* the last residual is the layer's
target material (data2vec 2.0 paper §3, fairseq ``ffn_targets``).

On CUDA under autocast (blocks of at least ``token_norm.MIN_ROWS`` tokens) both
``LN(x + branch)`` run as one Triton kernel each way (:mod:`data2vec.nn.token_norm`), which
also writes the output's copy in the autocast dtype;
a block hands that copy to the next block's first linear layer, so the residual stream is
not cast again there (:func:`run_blocks` threads it through a stack).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from data2vec.nn import token_conv, token_mlp, token_norm
from data2vec.nn.attention import Attention
from data2vec.nn.drop_path import drop_path_or_identity
from data2vec.nn.lean import dropout_or_identity, gelu_linear
from data2vec.nn.lean_fused import layer_norm_linear

NormFactory = Callable[[int], nn.Module]


class Mlp(nn.Module):
    """``fc1 -> act -> dropout -> fc2``. ``x: (..., C) -> (..., C)``.

    With the default exact GELU and no dropout between the layers (every released data2vec
    2.0 model), ``act -> fc2`` runs as :func:`~data2vec.nn.lean.gelu_linear`: the hidden
    activation is recomputed in backward instead of saved, 4 x C fewer floats per token for
    bit-identical results (``recompute_act = False`` restores the plain path).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.drop = dropout_or_identity(drop)
        self.fc2 = nn.Linear(hidden, dim)
        exact_gelu = type(self.act) is nn.GELU and self.act.approximate == "none"
        self.recompute_act = exact_gelu and drop == 0

    def forward(self, x: Tensor) -> Tensor:
        if token_mlp.supports(x, self):
            return token_mlp.mlp_forward(x, self.fc1, self.fc2)
        return self.from_hidden(self.fc1(x))

    def from_hidden(self, h: Tensor) -> Tensor:
        """The layers after ``fc1``: ``h`` is ``fc1``'s output ``(..., hidden)``."""
        if self.recompute_act:
            return gelu_linear(h, self.fc2.weight, self.fc2.bias)
        return self.fc2(self.drop(self.act(h)))


class PostLNBlock(nn.Module):
    """Post-LN transformer block returning ``(output, ffn_output)``.

    Args:
        dim: width ``C``.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP as a multiple of ``C``.
        norm_layer: factory for the two norms (e.g. ``partial(nn.LayerNorm, eps=1e-6)``).
        drop_path: stochastic-depth probability of both residual branches.
        attn_drop: dropout on attention probabilities.
        proj_drop: dropout after the attention output projection (fairseq ``encoder_dropout``).
        mlp_drop: dropout inside the MLP (fairseq ``activation_dropout``).
        post_mlp_drop: dropout on the MLP output before the residual (fairseq ``post_mlp_drop``).
        norm_impl: "torch", "triton" or "auto" (the fused Triton ``LN(x + branch)`` on CUDA
            under autocast when Triton is installed, from ``token_norm.MIN_ROWS`` tokens on;
            "triton" takes it at any size, also on the CPU under Triton's interpreter).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_layer: NormFactory = nn.LayerNorm,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        mlp_drop: float = 0.0,
        post_mlp_drop: float = 0.0,
        norm_impl: Literal["auto", "torch", "triton"] = "auto",
    ) -> None:
        super().__init__()
        self.norm_impl = norm_impl
        self.attn = Attention(
            dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.norm1 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=mlp_drop)
        self.post_mlp_dropout = dropout_or_identity(post_mlp_drop)
        self.norm2 = norm_layer(dim)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        x_low: Tensor | None = None,
        with_low: bool = False,
    ) -> tuple[Tensor, ...]:
        """``x: (B, T, C)`` -> ``(x, ffn_out)``, both ``(B, T, C)``.

        Args:
            x: ``(B, T, C)``.
            attn_mask: see :class:`~data2vec.nn.attention.Attention`.
            x_low: ``x`` in the autocast dtype (the previous block's third output), or None.
            with_low: also return the output's copy in the autocast dtype, ``(x, ffn_out,
                x_low)`` (None unless the fused norms ran); see :func:`run_blocks`.
        """
        if self.uses_fused_norms(x):
            out = self._forward_fused(x, x_low, attn_mask)
        else:
            out = (*self._forward_plain(x, attn_mask), None)
        return out if with_low else out[:2]

    def _forward_fused(
        self, x: Tensor, x_low: Tensor | None, attn_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        low_dtype = torch.get_autocast_dtype(x.device.type)
        a = self.drop_path(self.attn(x if x_low is None else x_low, attn_mask))
        x, y_low = token_norm.add_layer_norm(x, a, self.norm1, low_dtype)
        f = self.mlp(y_low)
        x, x_low = token_norm.add_layer_norm(
            x, self.drop_path(self.post_mlp_dropout(f)), self.norm2, low_dtype
        )
        return x, f, x_low

    def _forward_plain(self, x: Tensor, attn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        z = x + self.drop_path(self.attn(x, attn_mask))
        if type(self.norm1) is nn.LayerNorm and type(self.mlp.fc1) is nn.Linear:
            # norm1 and fc1 as one op: fc1's input is recomputed in backward, not kept (plain
            # layer classes only: a wrapped or replaced layer runs as itself)
            x, h = layer_norm_linear(z, self.norm1, self.mlp.fc1)
            f = self.mlp.from_hidden(h)
        else:
            x = self.norm1(z)
            f = self.mlp(x)
        x = self.norm2(x + self.drop_path(self.post_mlp_dropout(f)))
        return x, f

    def uses_fused_norms(self, x: Tensor) -> bool:
        """Whether a forward on ``x`` runs the fused Triton norms (see ``norm_impl``)."""
        if self.norm_impl == "torch" or token_conv.is_suspended("norms"):
            return False
        if torch.compiler.is_compiling():
            # Inductor fuses these ops itself (and, torch 2.11, failed to compile the backward
            # kernel inside a compiled graph): a compiled block runs the torch ops
            return False
        norms = (self.norm1, self.norm2)
        ok = (
            token_conv.available(x)
            and all(token_norm.supports(x, n) for n in norms)
            and type(self.mlp.fc1) is nn.Linear
        )
        if self.norm_impl == "triton" or not ok:
            return ok
        return x.is_cuda and x.numel() >= token_norm.MIN_ROWS * x.shape[-1]


def forward_low(
    block: nn.Module, x: Tensor, x_low: Tensor | None, attn_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(x, ffn_out, x_low)`` of any block: a :class:`PostLNBlock` takes and returns the
    residual stream's copy in the autocast dtype; other blocks run as ``block(x, attn_mask)``
    (no copy). Blocks are called as modules, so hooks (FSDP's) run."""
    if isinstance(block, PostLNBlock):
        return block(x, attn_mask, x_low=x_low, with_low=True)
    x, f = block(x, attn_mask)
    return x, f, None


def run_blocks(
    blocks: Iterable[nn.Module], x: Tensor, attn_mask: Tensor | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Run ``blocks`` in turn on ``x``, yielding each one's ``(x, ffn_out)``; the blocks
    hand each other the residual stream's low-precision copy (:func:`forward_low`)."""
    low = None
    for block in blocks:
        x, f, low = forward_low(block, x, low, attn_mask)
        yield x, f
