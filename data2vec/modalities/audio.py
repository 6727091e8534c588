"""Speech: the wav2vec 2.0 CNN, convolutional positions, ALiBi, and a 1-D decoder.

Follows the data2vec 2.0 audio recipe (Baevski et al. 2022; fairseq ``AudioEncoder``):

    waveform (B, S) -> 7-layer CNN (B, C, T) -> LayerNorm + Linear (B, T, D)   [local encoder]
    -> + 5-layer grouped-conv positions, computed on the masked sequence of each clone
    -> keep visible frames -> LayerNorm -> prenet blocks, every block with an ALiBi bias
       (slopes per head x a learned per-head scale) gathered for the kept positions.

Frames are 20 ms (320 samples) with a 400-sample receptive field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data2vec._runtime import release_free_memory_hook
from data2vec.config import AudioEncoderConfig, DecoderConfig
from data2vec.masking import MaskInfo
from data2vec.modalities.base import ContextEncoder, ModalityEncoder
from data2vec.models.decoders import ChannelLayerNorm, ConvDecoder, build_conv_decoder
from data2vec.nn.lean import checkpoint_elementwise, conv1d_after, conv1d_any, conv1d_args

# wav2vec 2.0 feature encoder: (kernel, stride) per layer; 5*2^6 = 320 samples per frame.
CNN_LAYERS: tuple[tuple[int, int], ...] = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))


def frame_lengths(num_samples: Tensor) -> Tensor:
    """CNN output frames for inputs of ``num_samples``: ``floor((L - k) / s) + 1`` per layer."""
    lengths = num_samples.long()
    for kernel, stride in CNN_LAYERS:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths.clamp_min(0)


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes (Press et al. 2022): a geometric sequence starting at 2^(-8/n).

    For a head count that is not a power of two, the slopes of the closest smaller power of two
    are followed by every other slope of the next power of two (the paper's workaround, also
    used by fairseq).
    """

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


class ConvLayer(nn.Module):
    """``conv (no bias) -> LayerNorm over channels (affine) -> GELU``: one CNN layer."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_ch, out_ch, kernel, stride=stride, bias=False)
        nn.init.kaiming_normal_(self.conv.weight)  # wav2vec 2.0 feature encoder init
        self.norm = nn.LayerNorm(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, C_in, S)`` -> ``(B, C_out, S')``."""
        return _norm_gelu(self.conv(x), self.norm.weight, self.norm.bias, eps=self.norm.eps)


def _norm_gelu(y: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """GELU of the LayerNorm over channels of ``y: (B, C, T)`` or ``(B, C, 1, T)``, same shape.

    Channels move last for the LayerNorm and back: free views when ``y`` is channels-last in
    memory (as :class:`FeatureEncoder` keeps it), a copy each way otherwise.
    """
    n = F.layer_norm(y.movedim(1, -1), weight.shape, weight, bias, eps)
    return F.gelu(n).movedim(-1, 1)


def _first_conv(wave: Tensor, conv: nn.Conv1d) -> Tensor:
    """The CNN's first layer (one input channel, no bias) as a product of the waveform's
    windows with the filters, which comes out channels-last: ``(B, S)`` -> ``(B, C, 1, T)``
    over ``(B, T, C)`` memory. ``F.conv1d`` would give ``(B, C, T)`` rows."""
    (kernel,), (stride,) = conv.kernel_size, conv.stride
    windows = wave.unfold(1, kernel, stride)  # (B, T, K), a view
    out = F.linear(windows, conv.weight.view(conv.weight.shape[0], kernel))  # (B, T, C)
    return out.transpose(1, 2).unsqueeze(2)


class FeatureEncoder(nn.Module):
    """The local encoder: CNN, then LayerNorm and a projection to the model width.

    Each layer's LayerNorm + GELU is recomputed in the next convolution's backward
    (:func:`~data2vec.nn.lean.conv1d_after`): backward keeps one ``(B, C, T)`` tensor per layer,
    its convolution's output, instead of three; the values and gradients are unchanged.

    The activations are channels-last, ``(B, C, 1, T)`` views of ``(B, T, C)`` memory, the
    convolutions height-one 2-D ones (:func:`~data2vec.nn.lean.conv1d_any`): the LayerNorms
    over channels then read and write whole rows, where ``(B, C, T)`` activations were copied
    to ``(B, T, C)`` and back in every layer, forward and backward (audio-v2-base b4 fp32:
    the CNN's forward + backward 1.22-1.39 s -> 1.06-1.27 s; benchmarks/README.md, "Seventh
    pass"). The same convolutions as :class:`ConvLayer` run, up to float rounding (another
    summation order).
    """

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        layers, in_ch = [], 1
        for kernel, stride in CNN_LAYERS:
            layers.append(ConvLayer(in_ch, channels, kernel, stride))
            in_ch = channels
        self.conv_layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(channels)
        self.proj = nn.Linear(channels, dim)

    def forward(self, wave: Tensor) -> Tensor:
        """``wave: (B, S)`` -> ``(B, T, D)``."""
        layers = self.conv_layers
        y = _first_conv(wave, layers[0].conv)  # (B, S) -> (B, C, 1, S'), channels-last
        for prev, layer in pairwise(layers):
            norm = prev.norm
            y = conv1d_after(
                y, partial(_norm_gelu, eps=norm.eps), (norm.weight, norm.bias), layer.conv
            )
        x = _norm_gelu(y, layers[-1].norm.weight, layers[-1].norm.bias, eps=layers[-1].norm.eps)
        return self.proj(self.norm(x.squeeze(2).transpose(1, 2)))  # (B, C, 1, T) -> (B, T, D)


class PositionalConv(nn.Module):
    """``L`` layers of ``grouped conv (same padding) -> LayerNorm (no affine) -> GELU``.

    With ``exact_padding`` padded frames are zeroed before every layer, so a padded utterance
    sees exactly the zero padding it would see alone.
    """

    def __init__(
        self, dim: int, layers: int, kernel: int, groups: int, exact_padding: bool
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups) for _ in range(layers)
        )
        self.norm = ChannelLayerNorm()
        self.exact_padding = exact_padding

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        """``x: (N, T, D)`` -> positional features ``(N, T, D)``."""
        keep = None
        if self.exact_padding and padding_mask is not None:
            keep = (~padding_mask)[:, None, None, :].to(x.dtype)  # (N, 1, 1, T)
        # (N, D, 1, T), channels-last: a view of x's memory, and the layout the convolutions
        # keep (nn.lean.conv1d_any), so no LayerNorm over channels copies (audio-v2-base b4:
        # one layer's forward + backward 85 -> 59 ms).
        h = x.transpose(1, 2).unsqueeze(2)
        if keep is not None:
            h = h * keep
        first = self.layers[0]
        y = conv1d_any(h, first.weight, first.bias, conv1d_args(first))
        # Each layer's LayerNorm + GELU (+ padding mask) is recomputed in backward, where the
        # next convolution needs it: one saved (N, D, T) tensor per layer instead of three.
        for conv in self.layers[1:]:
            y = conv1d_after(y, partial(self._norm_gelu, keep=keep), (), conv)
        return checkpoint_elementwise(y, self.norm, F.gelu).squeeze(2).transpose(1, 2)

    def _norm_gelu(self, y: Tensor, keep: Tensor | None) -> Tensor:
        """``GELU(LayerNorm(y))`` of one layer, zeroed at padding when ``keep`` is given.

        Functional (``self.norm``'s ops, not the module): it is rerun inside backward, where
        module hooks (``FlopCounterMode``'s, for one) must not fire.
        """
        n = F.layer_norm(y.movedim(1, -1), y.shape[1:2], eps=self.norm.eps).movedim(-1, 1)
        h = F.gelu(n)
        return h if keep is None else h * keep


class AudioEncoder(ModalityEncoder):
    """Audio modality encoder.

    Args:
        cfg: audio encoder settings.
        embed_dim: model width ``D``.
        num_heads: attention heads (for the ALiBi slopes and scales).
        make_block: factory of one prenet block.
        make_norm: factory of the LayerNorm that starts the context encoder (post-LN models).
        exact_padding: see ``ModelConfig.exact_padding``.
    """

    def __init__(
        self,
        cfg: AudioEncoderConfig,
        embed_dim: int,
        num_heads: int,
        make_block: Callable[[], nn.Module],
        make_norm: Callable[[int], nn.Module],
        exact_padding: bool = True,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_extra_tokens = 0
        self.extra_tokens = None
        self.pos_embed = None
        self.local_encoder = FeatureEncoder(cfg.cnn_channels, embed_dim)
        self.pos_conv = PositionalConv(
            embed_dim, cfg.pos_conv_layers, cfg.pos_conv_kernel, cfg.pos_conv_groups, exact_padding
        )
        self.alibi = cfg.alibi
        self.zero_padding = cfg.zero_padding
        self.register_buffer("slopes", torch.tensor(alibi_slopes(num_heads)), persistent=False)
        self.alibi_scale = nn.Parameter(torch.full((num_heads,), cfg.alibi_scale))
        blocks = nn.ModuleList(make_block() for _ in range(cfg.prenet_depth))
        self.context_encoder = ContextEncoder(make_norm(embed_dim), blocks, cfg.prenet_dropout)

    def reset_parameters(self) -> None:
        """The feature projection keeps PyTorch's default init (data2vec 2.0, DESIGN §3)."""
        self.local_encoder.proj.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        return {"alibi_scale"}

    def embed(
        self, source: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``source: (B, S)`` waveform, ``padding_mask: (B, S)`` -> ``(B, T, D)``, ``(B, T)``."""
        local = self.local_encoder(source)
        if local.requires_grad:
            # When backward gets here the blocks' activations are free, as holes of glibc's heap
            # too small for the CNN's backward buffers (up to (B, 512, S/5) floats): give their
            # pages back first, or the CNN's buffers add to them (audio-v2-base b4: -400 MB).
            local.register_hook(release_free_memory_hook)
        if padding_mask is None or not bool(padding_mask.any()):
            return local, None
        lengths = frame_lengths((~padding_mask).sum(-1))
        frames = torch.arange(local.shape[1], device=local.device)
        return local, frames[None, :] >= lengths[:, None]

    def position_and_select(
        self, local: Tensor, padding_mask: Tensor | None, mask: MaskInfo | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Convolutional positions, computed on each clone's masked sequence, then gathered.

        As in fairseq, masked frames are zeroed before the positional convolution, so the
        positional features of visible frames depend only on visible content.
        """
        if self.zero_padding and padding_mask is not None:
            local = local.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        if mask is None:
            return local + self.pos_conv(local, padding_mask), padding_mask, None
        B, N = local.shape[0], mask.mask.shape[0]
        M = N // B
        masked = local.repeat_interleave(M, dim=0) * (~mask.mask).unsqueeze(-1).to(local.dtype)
        pad = None if padding_mask is None else padding_mask.repeat_interleave(M, dim=0)
        pos = self.pos_conv(masked, pad)  # (N, T, D)
        kept, kept_pad = self._keep_visible(local, padding_mask, mask)
        rows = torch.arange(N, device=local.device)[:, None]
        return kept + pos[rows, mask.ids_keep], kept_pad, mask.ids_keep

    def attention_bias(
        self, positions: Tensor | None, length: int, device: torch.device
    ) -> Tensor | None:
        """ALiBi: ``-slope_h * scale_h * |p_i - p_j|`` for the tokens' original positions.

        Returns:
            ``(N | 1, H, V, V)`` float32, or None when ALiBi is off.
        """
        if not self.alibi:
            return None
        if positions is None:
            positions = torch.arange(length, device=device)[None]  # (1, T)
        pos = positions.to(torch.float32)
        dist = (pos[:, :, None] - pos[:, None, :]).abs()  # (N, V, V)
        # The learned scale is clamped at 0 so no head can turn the bias into a reward for distance.
        per_head = self.slopes * self.alibi_scale.clamp_min(0)  # (H,)
        return -per_head[None, :, None, None] * dist[:, None]

    def num_tokens(self, num_samples: int = 16000) -> int:
        return int(frame_lengths(torch.tensor([num_samples]))[0])

    def make_decoder(self, cfg: DecoderConfig) -> ConvDecoder:
        return build_conv_decoder(self.embed_dim, cfg)
