"""Build encoders and objectives from a :class:`~data2vec.config.Config`.

The only place that maps config names (``model.modality``, ``model.algorithm``) to classes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
from torch import nn

from data2vec.config import Config
from data2vec.modalities.base import ModalityEncoder
from data2vec.modalities.image import ImageEncoder
from data2vec.models.data2vec2 import EXCLUDED_BY_SCOPE, Data2Vec2
from data2vec.models.encoder import Encoder
from data2vec.nn.block import PostLNBlock
from data2vec.nn.init import init_bert_params
from data2vec.teacher import EMATeacher

MODALITIES: dict[str, type[ModalityEncoder]] = {"image": ImageEncoder}


def _block_factory(cfg: Config) -> Callable[[float], nn.Module]:
    m = cfg.model
    norm = partial(nn.LayerNorm, eps=m.norm_eps)

    def make(drop_path: float) -> nn.Module:
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
        )

    return make


def build_encoder(cfg: Config) -> Encoder:
    """The student encoder, initialized as data2vec 2.0 (DESIGN §3)."""
    make_block = _block_factory(cfg)
    norm = partial(nn.LayerNorm, eps=cfg.model.norm_eps)
    modality_cls = MODALITIES[cfg.model.modality]
    modality = modality_cls(cfg.encoder, cfg.model.embed_dim, lambda: make_block(0.0), norm)
    rates = np.linspace(0.0, cfg.model.drop_path, cfg.model.depth)
    blocks = nn.ModuleList(make_block(float(r)) for r in rates)
    encoder = Encoder(modality, blocks, nn.Identity())
    encoder.apply(init_bert_params)
    return encoder


def build_model(cfg: Config) -> Data2Vec2:
    """The pretraining model (student encoder + decoder + EMA teacher) for ``cfg``."""
    if cfg.model.algorithm != "v2":
        raise NotImplementedError(f"model.algorithm={cfg.model.algorithm!r} is not available yet")
    encoder = build_encoder(cfg)
    decoder = encoder.modality.make_decoder(cfg.decoder)
    decoder.apply(init_bert_params)
    decoder.reset_parameters()  # the projection keeps PyTorch's default init (fairseq)
    teacher = EMATeacher(
        encoder,
        cfg.ema.decay,
        cfg.ema.end_decay,
        cfg.ema.anneal_steps,
        exclude=EXCLUDED_BY_SCOPE[cfg.ema.scope],
    )
    return Data2Vec2(encoder, decoder, cfg.mask, cfg.target, cfg.loss, teacher, scope=cfg.ema.scope)
