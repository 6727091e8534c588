"""The encoder: a modality encoder followed by the shared transformer blocks.

This is the network that pretraining produces and that embedding, probing and fine-tuning use.
It is the same code for every modality; only ``self.modality`` differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from data2vec._runtime import release_free_memory, release_free_memory_hook
from data2vec.masking import MaskInfo
from data2vec.modalities.base import Context, ModalityEncoder
from data2vec.nn.block import forward_low, run_blocks


def _release_midway(x: Tensor) -> None:
    """Give glibc's free heap pages back to the system now and when backward reaches ``x``.

    Halfway through the blocks the first half's temporaries are free, as heap holes the second
    half's saved activations do not all fit; halfway back, the second half's saved
    activations are free, as holes the backward pass's own buffers do not all fit either. Both
    stay resident until trimmed (``data2vec/_runtime.py``). audio-v2-base b4 fp32, alternating
    with the code without (benchmarks/README.md, eighth pass): peak RSS 2946-2973 MB against
    3092-3153, step time +1.8 % on the mean (60-80k more page faults, about 0.1 s of system
    time); image- and text-v2-base 400-530 MB less, time within noise. Does nothing where
    :func:`release_free_memory` does nothing (small processes, the heap's speed mode, other
    allocators).
    """
    release_free_memory()
    x.register_hook(release_free_memory_hook)


def _release_a_quarter_back(x: Tensor) -> None:
    """Give glibc's free heap pages back when backward reaches ``x``, the input of the block
    three quarters of the way up: the last quarter's saved activations are free by then, and
    the growing gradients have not yet taken the step's peak (it was in that first quarter
    of the way back, and the next trim came only halfway). audio-v2-base b4 fp32, alternating
    with the code without (benchmarks/README.md, tenth pass): peak RSS 2866-2896 MB against
    2933-2969, step time within noise.
    """
    x.register_hook(release_free_memory_hook)


@dataclass
class EncoderOutput:
    """Result of :meth:`Encoder.forward`.

    Attributes:
        x: ``(N, E + T, D)`` final output, extra tokens first.
        padding_mask: ``(N, E + T)`` bool, True = padding, or None.
        num_extra_tokens: ``E``.
        layer_results: per shared block, its FFN output ``(N, E + T, D)`` (target material).
        layer_outputs: per shared block, its output ``(N, E + T, D)``.
    """

    x: Tensor
    padding_mask: Tensor | None
    num_extra_tokens: int
    layer_results: list[Tensor] = field(default_factory=list)
    layer_outputs: list[Tensor] = field(default_factory=list)

    @property
    def tokens(self) -> Tensor:
        """``(N, T, D)``: the final output without extra tokens."""
        return self.x[:, self.num_extra_tokens :]


class Encoder(nn.Module):
    """``modality -> blocks -> norm``.

    A text encoder also carries the tokenizer it was trained with in ``tokenizer`` (a plain
    attribute, not a module: it is saved beside the weights as ``tokenizer.json``).

    Args:
        modality: the modality encoder (local encoder, positions, extra tokens, prenet).
        blocks: the shared blocks; each maps ``(x, attn_mask)`` to ``(x, ffn_out)``.
        norm: final norm (``nn.Identity`` for post-LN blocks, whose output is already normed).
    """

    tokenizer: Any = None
    # Recompute every shared block in backward instead of keeping its activations (only
    # where gradients flow: a teacher or an eval pass runs the blocks plainly).
    activation_checkpointing: bool = False

    def __init__(
        self,
        modality: ModalityEncoder,
        blocks: nn.ModuleList,
        norm: nn.Module,
        layerdrop: float = 0.0,
    ) -> None:
        super().__init__()
        self.modality = modality
        self.blocks = blocks
        self.norm = norm
        self.layerdrop = layerdrop
        # Plain attributes, so a teacher that owns only the blocks (modality=None) keeps them.
        self.embed_dim: int = modality.embed_dim
        self.num_extra_tokens: int = modality.num_extra_tokens

    def iter_blocks(self, ctx: Context) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, ffn_out)`` of every shared block in turn, both ``(N, T, D)`` (no LayerDrop).

        For consumers that reduce the layers as they come (teacher targets), so no list of
        all layers is ever held.
        """
        yield from run_blocks(self.blocks, ctx.x, ctx.attn_mask)

    def forward_blocks(self, ctx: Context, keep_layers: bool = False) -> EncoderOutput:
        """Run the shared blocks on a prepared context ``ctx.x: (N, T, D)``."""
        x = ctx.x
        out = EncoderOutput(
            x=x, padding_mask=ctx.padding_mask, num_extra_tokens=self.num_extra_tokens
        )
        drop = self.training and self.layerdrop > 0 and not keep_layers
        low = None  # x in the autocast dtype, where the blocks pass it on (nn/block.py)
        recording = torch.is_grad_enabled() and x.requires_grad and x.device.type == "cpu"
        midway = len(self.blocks) // 2 if recording else -1
        three_quarters = 3 * len(self.blocks) // 4 if recording else -1
        if three_quarters == midway:  # two blocks or fewer: one trim each way is enough
            three_quarters = -1
        for i, block in enumerate(self.blocks):
            if i == midway:
                _release_midway(x)
            if i == three_quarters:
                _release_a_quarter_back(x)
            # LayerDrop (Fan et al. 2019): skip a whole block for the batch during training.
            if drop and float(torch.rand(())) < self.layerdrop:
                continue
            x, ffn, low = self._run_block(block, x, low, ctx.attn_mask)
            if keep_layers:
                out.layer_results.append(ffn)
                out.layer_outputs.append(x)
        out.x = self.norm(x)
        return out

    def _run_block(
        self, block: nn.Module, x: Tensor, low: Tensor | None, attn_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """:func:`~data2vec.nn.block.forward_low`, checkpointed when enabled and gradients
        are recorded."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            # Non-reentrant checkpointing restores the RNG state, so dropout draws the same
            # masks in the recomputation and the gradients equal the plain ones.
            return checkpoint(forward_low, block, x, low, attn_mask, use_reentrant=False)
        return forward_low(block, x, low, attn_mask)

    def forward(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        mask: MaskInfo | None = None,
        keep_layers: bool = False,
    ) -> EncoderOutput:
        """Encode a batch.

        Args:
            source: modality input (images ``(B, C, H, W)``).
            padding_mask: ``(B, S)`` bool, True = padding, or None.
            mask: optional masks (masked tokens are dropped), ``B·M`` rows.
            keep_layers: also return every block's FFN output and output.

        Returns:
            :class:`EncoderOutput` with ``x: (N, E + T', D)``.
        """
        local, pad = self.modality.embed(source, padding_mask)
        ctx = self.modality.contextualize(local, pad, mask)
        return self.forward_blocks(ctx, keep_layers=keep_layers)
