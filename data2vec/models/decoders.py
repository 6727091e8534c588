"""The light convolutional decoder of data2vec 2.0 (Baevski et al. 2022, §3 "Decoder").

``L`` layers of ``conv(kernel k, groups g, same padding) -> LayerNorm over channels (no affine)
-> GELU``, with a residual around every layer whose input and output widths match, then a
linear projection back to the model width (text uses a 2-layer projection). Images run 2-D
convolutions over the patch grid, audio and text 1-D convolutions over time.

Module names (``blocks.{i}.0`` = the conv, ``proj``) match fairseq's ``Decoder1d/2d``.

With ``conv_impl`` "triton" (or "auto" on CUDA), the stack runs on the ``(N, T, C)`` tokens
as they are, each layer as Triton kernels (:mod:`data2vec.nn.token_layer`): the same function
of the same weights, without the layout changes cuDNN's grouped convolutions spend their
time on, and with one pass over the activations where the plain elementwise ops take five.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.config import DecoderConfig
from data2vec.masking import select_positions
from data2vec.nn import token_conv
from data2vec.nn.lean import checkpoint_elementwise, conv1d_any, conv1d_args
from data2vec.nn.token_layer import decoder_layer


class ChannelLayerNorm(nn.Module):
    """LayerNorm over dim 1 of ``(N, C, *spatial)`` without affine parameters (eps 1e-5)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = x.movedim(1, -1)
        return F.layer_norm(y, y.shape[-1:], eps=self.eps).movedim(-1, 1)

    def forward_last(self, x: Tensor) -> Tensor:
        """The same normalization over the last dim of channels-last ``(N, *, C)``."""
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)


def _projection(dim: int, out_dim: int, layers: int, ratio: float) -> nn.Module:
    """``layers`` Linear layers with GELU between; the first widens by ``ratio``."""
    if layers == 1:
        return nn.Linear(dim, out_dim)
    mods: list[nn.Module] = []
    cur = dim
    for i in range(layers - 1):
        nxt = int(cur * ratio) if i == 0 else cur
        mods += [nn.Linear(cur, nxt), nn.GELU()]
        cur = nxt
    mods.append(nn.Linear(cur, out_dim))
    return nn.Sequential(*mods)


class ConvDecoder(nn.Module):
    """1-D or 2-D convolutional decoder.

    Args:
        in_dim: model width ``D`` (decoder input and output).
        dim: decoder channels.
        layers, kernel, groups: conv stack shape.
        grid: ``(H, W)`` patch grid for a 2-D decoder, None for 1-D over the sequence.
        residual: add residuals where widths match.
        projection_layers, projection_ratio: output projection shape.
        conv_impl: "torch", "triton" or "auto" (Triton on CUDA when installed).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        layers: int,
        kernel: int,
        groups: int,
        grid: tuple[int, int] | None = None,
        residual: bool = True,
        projection_layers: int = 1,
        projection_ratio: float = 2.0,
        conv_impl: Literal["auto", "torch", "triton"] = "auto",
    ) -> None:
        super().__init__()
        self.grid = grid
        self.residual = residual
        self.conv_impl = conv_impl
        conv = nn.Conv2d if grid is not None else nn.Conv1d
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(
                    conv(
                        in_dim if i == 0 else dim, dim, kernel, padding=kernel // 2, groups=groups
                    ),
                    ChannelLayerNorm(),
                    nn.GELU(),
                )
                for i in range(layers)
            ]
        )
        self.proj = _projection(dim, in_dim, projection_layers, projection_ratio)

    def reset_parameters(self) -> None:
        """PyTorch's default init for the projection (data2vec 2.0 keeps it; DESIGN §3)."""
        for m in self.proj.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward_features(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Conv stack. ``x: (N, T, D)`` -> ``(N, T, dim)``.

        ``padding_mask: (N, T)`` (1-D only): padded positions are zeroed before every conv, so
        they cannot leak into valid positions.
        """
        return self._features(x, padding_mask)[0]

    def _features(self, x: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """:meth:`forward_features` and, where the fused Triton layers ran, their output's copy
        in the compute dtype (else None)."""
        if self.uses_triton(x):
            return self._forward_tokens(x, padding_mask)
        N, T, D = x.shape
        # The activations stay channels-last, (N, T, C) rows in memory, which oneDNN convolves
        # as they are: 2-D as (N, D, H, W) views, 1-D as height-one (N, D, 1, T) views run by
        # conv1d_any. (A Conv1d on the (N, D, T) view returned channels-first outputs that each
        # LayerNorm over channels copied back: text-v2-base's decoder took 17 % longer.)
        grid = self.grid if self.grid is not None else (1, T)
        h = x.transpose(1, 2).reshape(N, D, *grid)
        keep = None
        if padding_mask is not None:
            keep = (~padding_mask).reshape(N, 1, *grid).to(h.dtype)
        for layer in self.blocks:
            if keep is not None:
                h = h * keep
            conv, norm, act = layer
            if self.grid is None:
                out = conv1d_any(h, conv.weight, conv.bias, conv1d_args(conv))
            else:
                out = conv(h)
            # LayerNorm and GELU would each keep a full copy of their input for backward;
            # recomputing both from the conv output keeps one copy instead of three.
            out = checkpoint_elementwise(out, norm, act)
            h = out + h if self.residual and out.shape[1] == h.shape[1] else out
        return h.reshape(N, h.shape[1], T).transpose(1, 2), None

    def uses_triton(self, x: Tensor) -> bool:
        """Whether this forward runs the Triton kernels (see ``conv_impl``)."""
        if self.conv_impl == "torch" or token_conv.is_suspended("decoder"):
            return False
        convs = [layer[0] for layer in self.blocks]
        ok = token_conv.available(x) and all(token_conv.supports(c.weight, c.groups) for c in convs)
        if self.conv_impl == "triton" and not ok:
            raise RuntimeError(
                f"decoder.conv_impl=triton needs {token_conv.NEEDS_TRITON}, an NVIDIA GPU of "
                "compute capability >= 8.0 (or TRITON_INTERPRET=1 on the CPU) and at most 128 "
                "channels per group; use decoder.conv_impl=torch"
            )
        return ok if self.conv_impl == "triton" else ok and x.is_cuda

    def _forward_tokens(
        self, x: Tensor, padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`_features` on ``(N, T, C)`` tokens with the Triton kernels."""
        with token_conv.device_guard(x):
            return self._run_tokens(x, padding_mask)

    def _run_tokens(self, x: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """:meth:`_forward_tokens` with ``x``'s device current."""
        hw = self.grid if self.grid is not None else (1, x.shape[1])
        keep = None if padding_mask is None else (~padding_mask).unsqueeze(-1).to(x.dtype)
        h, h_low = x, None  # h_low: h in the compute dtype, from the previous fused layer
        for layer in self.blocks:
            if keep is not None:
                h, h_low = h * keep, None
            conv, norm, act = layer
            residual = self.residual and conv.out_channels == h.shape[-1]
            if isinstance(act, nn.GELU) and act.approximate == "none":
                h, h_low = decoder_layer(h, h_low, conv.weight, conv.bias, hw, norm.eps, residual)
            else:
                y = token_conv.conv_tokens(h, conv.weight, conv.bias, hw)  # (N, T, dim)
                out = checkpoint_elementwise(y, norm.forward_last, act)
                h, h_low = (out + h if residual else out), None
        return h, h_low

    def forward(
        self, x: Tensor, mask: Tensor | None = None, padding_mask: Tensor | None = None
    ) -> Tensor:
        """Decode.

        Args:
            x: ``(N, T, D)`` encoder output with masked slots filled.
            mask: ``(N, T)`` bool, or the same positions as flat row-major indices into the
                ``N * T`` rows (:meth:`MaskInfo.masked_rows`: no wait for the device to count
                them); when given, only these positions are projected.
            padding_mask: ``(N, T)`` bool, True = padding (see :meth:`forward_features`).

        Returns:
            ``(N, T, D)``; with ``mask``, ``(num_masked, D)`` rows in row-major mask order.
        """
        h, h_low = self._features(x, padding_mask)
        if h_low is not None:
            # The fused layers' copy in the compute dtype: what autocast would cast ``h`` to
            # for the projection, so the masked rows are gathered at half the width and the
            # gradient reaches the last layer unwidened (about 2 GB less traffic per step at
            # image-v2-base batch 128).
            h = h_low
        return self.proj(select_positions(h, mask))


def build_conv_decoder(
    in_dim: int, cfg: DecoderConfig, grid: tuple[int, int] | None = None
) -> ConvDecoder:
    """The decoder a :class:`DecoderConfig` describes, 2-D on ``grid`` or 1-D without it."""
    return ConvDecoder(
        in_dim,
        cfg.dim,
        cfg.layers,
        cfg.kernel,
        cfg.groups,
        grid=grid,
        residual=cfg.residual,
        projection_layers=cfg.projection_layers,
        projection_ratio=cfg.projection_ratio,
        conv_impl=cfg.conv_impl,
    )
