"""Image encoders of data2vec 1.0 <-> Hugging Face ``Data2VecVisionModel``.

Our 1.0 vision encoder (``model.block: layer_scale``, ``encoder.positions: relative``) is the
architecture of ``Data2VecVisionModel`` with ``use_shared_relative_position_bias``: patch
embedding, CLS token, no absolute positions, pre-LN blocks with layer scale (``lambda_1/2``
there, ``gamma_1/2`` here), query and value biases without a key bias, one relative position
bias table for all blocks and a final LayerNorm (``use_mean_pooling=False``; with
``use_mean_pooling=True`` Hugging Face returns the last block's output un-normalized, which is
``model.final_norm=false`` here). Names on the Hugging Face side come from
``modeling_data2vec_vision.py``.

Refused, with the reason: data2vec 2.0 image encoders (post-LN, sin-cos positions), and Hugging
Face models with absolute position embeddings or one relative position table per layer (the
fine-tuned checkpoints), which our encoder does not express.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from data2vec.config import Config, ImageEncoderConfig, load_config
from data2vec.convert.keymap import KeyMap, rename
from data2vec.errors import UserError

_QKV = ("query", "key", "value")
_ATTN = "encoder.layer.{}.attention.attention."
# (hugging face, ours); {} = a block index
VISION_MAP: KeyMap = [
    ("embeddings.cls_token", "modality.extra_tokens"),
    ("embeddings.patch_embeddings.projection.weight", "modality.local_encoder.proj.weight"),
    ("embeddings.patch_embeddings.projection.bias", "modality.local_encoder.proj.bias"),
    (
        "encoder.relative_position_bias.relative_position_bias_table",
        "modality.rel_pos_bias.relative_position_bias_table",
    ),
    (_ATTN + "query.bias", "blocks.{}.attn.q_bias"),
    (_ATTN + "value.bias", "blocks.{}.attn.v_bias"),
    ("encoder.layer.{}.lambda_1", "blocks.{}.gamma_1"),
    ("encoder.layer.{}.lambda_2", "blocks.{}.gamma_2"),
    *[
        (f"encoder.layer.{{}}.{src}.{kind}", f"blocks.{{}}.{dst}.{kind}")
        for src, dst in [
            ("attention.output.dense", "attn.proj"),
            ("layernorm_before", "norm1"),
            ("layernorm_after", "norm2"),
            ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"),
        ]
        for kind in ("weight", "bias")
    ],
    ("layernorm.weight", "norm.weight"),
    ("layernorm.bias", "norm.bias"),
]


def check_vision(cfg: Config) -> ImageEncoderConfig:
    """Raise unless ``cfg`` is an image encoder that ``Data2VecVisionModel`` expresses."""
    enc = cfg.encoder
    assert isinstance(enc, ImageEncoderConfig)
    if cfg.model.block != "layer_scale" or enc.positions != "relative":
        raise UserError(
            "cannot export this image encoder to Hugging Face: data2vec 2.0 image encoders are "
            "post-LN ViTs with fixed sin-cos positions; transformers' Data2VecVisionModel is the "
            "pre-LN BEiT of data2vec 1.0 (model.block=layer_scale, encoder.positions=relative)"
        )
    if enc.prenet_depth > 0 or enc.num_extra_tokens != 1:
        raise UserError("only image encoders with one CLS token and no prenet blocks match "
                        "Data2VecVisionModel")  # fmt: skip
    return enc


def vision_hf_config(cfg: Config) -> dict[str, Any]:
    """The ``Data2VecVisionConfig`` fields of our 1.0 image config."""
    enc = check_vision(cfg)
    m = cfg.model
    return {
        "hidden_size": m.embed_dim,
        "num_hidden_layers": m.depth,
        "num_attention_heads": m.num_heads,
        "intermediate_size": int(m.embed_dim * m.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": m.encoder_dropout,
        "attention_probs_dropout_prob": m.attention_dropout,
        "layer_norm_eps": m.norm_eps,
        "image_size": enc.image_size,
        "patch_size": enc.patch_size,
        "num_channels": enc.in_chans,
        "use_mask_token": True,
        "use_absolute_position_embeddings": False,
        "use_relative_position_bias": False,
        "use_shared_relative_position_bias": True,
        "layer_scale_init_value": m.layer_scale,
        "drop_path_rate": m.drop_path,
        "use_mean_pooling": not m.final_norm,
    }


def vision_to_hf(ours: dict[str, Tensor], depth: int, mask_emb: Tensor) -> dict[str, Tensor]:
    """Our 1.0 image encoder's weights under ``Data2VecVisionModel`` names.

    ``mask_emb``: the pretraining mask vector ``(D,)`` (Hugging Face ``embeddings.mask_token``).
    """
    ours = dict(ours)
    ours.pop("modality.rel_pos_bias.relative_position_index", None)  # derived, not a weight
    out: dict[str, Tensor] = {"embeddings.mask_token": mask_emb.reshape(1, 1, -1)}
    for i in range(depth):
        parts = ours.pop(f"blocks.{i}.attn.qkv.weight").chunk(3, dim=0)
        for name, part in zip(_QKV, parts):
            out[_ATTN.format(i) + f"{name}.weight"] = part.clone()
    out |= rename(ours, [(dst, src) for src, dst in VISION_MAP])
    return {k: v.contiguous() for k, v in out.items()}


def vision_from_hf(config: Any, state: dict[str, Tensor]) -> tuple[Config, dict[str, Tensor]]:
    """Our config and encoder weights for a ``Data2VecVisionModel`` config and state dict."""
    if config.use_absolute_position_embeddings or config.use_relative_position_bias:
        raise UserError(
            "only Data2VecVisionModel with one shared relative position bias and no absolute "
            "positions (the pretrained data2vec 1.0 layout) is supported; this one has "
            + ("absolute position embeddings" if config.use_absolute_position_embeddings
               else "a relative position table per layer (a fine-tuned checkpoint)")
        )  # fmt: skip
    if not config.use_shared_relative_position_bias or config.hidden_act != "gelu":
        raise UserError("only GELU Data2VecVisionModel with a shared relative position bias "
                        "is supported")  # fmt: skip
    cfg = load_config(
        "image-v1-base",
        [
            f"model.embed_dim={config.hidden_size}", f"model.depth={config.num_hidden_layers}",
            f"model.num_heads={config.num_attention_heads}",
            f"model.mlp_ratio={config.intermediate_size / config.hidden_size}",
            f"model.norm_eps={config.layer_norm_eps}",
            f"model.encoder_dropout={config.hidden_dropout_prob}",
            f"model.attention_dropout={config.attention_probs_dropout_prob}",
            f"model.layer_scale={config.layer_scale_init_value}",
            f"model.drop_path={config.drop_path_rate}",
            f"model.final_norm={not config.use_mean_pooling}",
            f"encoder.image_size={config.image_size}", f"encoder.patch_size={config.patch_size}",
            f"encoder.in_chans={config.num_channels}",
            f"target.top_k={min(6, config.num_hidden_layers)}",
        ],
    )  # fmt: skip
    state = dict(state)
    state.pop("embeddings.mask_token", None)  # a training-time mask vector, not the encoder
    for key in [k for k in state if k.startswith("pooler.") or "relative_position_index" in k]:
        del state[key]  # the mean-pooling head's LayerNorm is a task head; the index is derived
    ours: dict[str, Tensor] = {}
    for i in range(config.num_hidden_layers):
        parts = [state.pop(_ATTN.format(i) + f"{n}.weight") for n in _QKV]
        ours[f"blocks.{i}.attn.qkv.weight"] = torch.cat(parts, dim=0)
    if config.use_mean_pooling:
        state.pop("layernorm.weight", None)
        state.pop("layernorm.bias", None)
    ours |= rename(state, VISION_MAP)
    return cfg, ours
