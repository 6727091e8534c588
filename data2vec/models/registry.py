"""Build encoders and objectives from a :class:`~data2vec.config.Config`.

The only place that maps config names (``model.modality``, ``model.algorithm``) to classes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from data2vec.config import Config
from data2vec.modalities.audio import AudioEncoder
from data2vec.modalities.base import ModalityEncoder
from data2vec.modalities.image import ImageEncoder
from data2vec.modalities.signal import SignalEncoder
from data2vec.modalities.text import TextEncoder
from data2vec.models.data2vec1 import Data2Vec1
from data2vec.models.data2vec2 import EXCLUDED_BY_SCOPE, Data2Vec2
from data2vec.models.encoder import Encoder
from data2vec.models.multimodal import MultiData2Vec, build_multi_encoder, build_multi_model
from data2vec.nn.beit import LayerScaleBlock, init_beit_
from data2vec.nn.block import PostLNBlock
from data2vec.nn.init import init_bert_params
from data2vec.teacher import EMATeacher

V1_COPIED = ("modality.pos_conv", "modality.local_encoder")


def _block_factory(cfg: Config) -> Callable[[float], nn.Module]:
    m = cfg.model
    norm = partial(nn.LayerNorm, eps=m.norm_eps)

    def make(drop_path: float) -> nn.Module:
        if m.block == "layer_scale":
            return LayerScaleBlock(
                m.embed_dim,
                m.num_heads,
                m.mlp_ratio,
                norm_layer=norm,
                drop_path=drop_path,
                layer_scale=m.layer_scale,
                attn_drop=m.attention_dropout,
                proj_drop=m.encoder_dropout,
            )
        return PostLNBlock(
            m.embed_dim,
            m.num_heads,
            m.mlp_ratio,
            norm_layer=norm,
            drop_path=drop_path,
            attn_drop=m.attention_dropout,
            proj_drop=m.encoder_dropout,
            mlp_drop=m.activation_dropout,
            post_mlp_drop=m.post_mlp_dropout,
            norm_impl=m.norm_impl,
        )

    return make


def build_modality(cfg: Config, make_block: Callable[[], nn.Module]) -> ModalityEncoder:
    """The modality encoder named by ``cfg.model.modality``."""
    m = cfg.model
    norm: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=m.norm_eps)
    if m.block == "layer_scale":
        norm = _no_norm  # pre-LN blocks normalize their own inputs
    if m.modality == "image":
        return ImageEncoder(
            cfg.encoder,  # type: ignore[arg-type]
            m.embed_dim,
            m.num_heads,
            make_block,
            norm,
        )
    if m.modality == "audio":
        return AudioEncoder(
            cfg.encoder,  # type: ignore[arg-type]
            m.embed_dim,
            m.num_heads,
            make_block,
            norm,
            exact_padding=m.exact_padding,
        )
    if m.modality == "text":
        return TextEncoder(cfg.encoder, m.embed_dim, make_block, norm)  # type: ignore[arg-type]
    if m.modality == "signal":
        return SignalEncoder(cfg.encoder, m.embed_dim, make_block, norm)  # type: ignore[arg-type]
    raise NotImplementedError(f"model.modality={m.modality!r}")


def _no_norm(dim: int) -> nn.Module:
    return nn.Identity()


def build_encoder(cfg: Config) -> Encoder:
    """The student encoder, initialized as data2vec 2.0 (DESIGN §3) or, with pre-LN
    layer-scale blocks, as BEiT / data2vec 1.0 vision (a joint model: its MultiEncoder)."""
    if cfg.model.modality == "multi":
        return build_multi_encoder(cfg)  # type: ignore[return-value]
    make_block = _block_factory(cfg)
    modality = build_modality(cfg, lambda: make_block(0.0))
    rates = np.linspace(0.0, cfg.model.drop_path, cfg.model.depth)
    blocks = nn.ModuleList(make_block(float(r)) for r in rates)
    if cfg.model.block == "layer_scale":
        # pre-LN blocks leave their output un-normalized: a final LayerNorm closes the encoder
        final_norm: nn.Module = nn.Identity()
        if cfg.model.final_norm:
            final_norm = nn.LayerNorm(cfg.model.embed_dim, eps=cfg.model.norm_eps)
        encoder = Encoder(modality, blocks, final_norm, layerdrop=cfg.model.layerdrop)
        init_beit_(encoder, blocks)
        if modality.extra_tokens is not None:
            with torch.no_grad():
                nn.init.trunc_normal_(modality.extra_tokens, std=0.02)  # BEiT cls_token
        return encoder
    encoder = Encoder(modality, blocks, nn.Identity(), layerdrop=cfg.model.layerdrop)
    encoder.apply(init_bert_params)
    reset = getattr(modality, "reset_parameters", None)
    if callable(reset):
        reset()  # modality-specific parts that keep a different init
    return encoder


def build_teacher(cfg: Config, encoder: Encoder, copied: tuple[str, ...] = ()) -> EMATeacher:
    """The EMA teacher of ``encoder`` with the decay schedule and scope of ``cfg.ema``."""
    return EMATeacher(
        encoder,
        cfg.ema.decay,
        cfg.ema.end_decay,
        cfg.ema.anneal_steps,
        exclude=EXCLUDED_BY_SCOPE[cfg.ema.scope],
        copied=copied,
    )


def build_decoder(cfg: Config, modality: ModalityEncoder) -> nn.Module:
    """The data2vec 2.0 decoder of ``modality``, initialized as fairseq does."""
    decoder = modality.make_decoder(cfg.decoder)
    decoder.apply(init_bert_params)
    decoder.reset_parameters()  # the projection keeps PyTorch's default init (fairseq)
    return decoder


def build_model(cfg: Config) -> Data2Vec2 | Data2Vec1 | MultiData2Vec:
    """The pretraining model (student encoder + decoder/head + EMA teacher) for ``cfg``."""
    if cfg.model.modality == "multi":
        return build_multi_model(cfg)
    encoder = build_encoder(cfg)
    if cfg.model.algorithm == "v1":
        # fairseq copies these instead of averaging them: speech ema_layers_only (the
        # positional convolution), text ema_transformer_layers_only (the embeddings); the
        # vision teacher averages everything (data2vec-vision: one EMA of the whole model)
        copied = () if cfg.model.modality == "image" else V1_COPIED
        return Data2Vec1(encoder, build_teacher(cfg, encoder, copied), cfg)
    decoder = build_decoder(cfg, encoder.modality)
    return Data2Vec2(encoder, decoder, build_teacher(cfg, encoder), cfg)
