"""Speech encoders <-> Hugging Face ``Data2VecAudioModel`` (see :mod:`data2vec.convert.hf`).

Our speech encoder without ALiBi is the architecture of ``Data2VecAudioModel``: the wav2vec 2.0
CNN (LayerNorm per layer), LayerNorm + projection, padded frames zeroed, a stack of grouped
positional convolutions (conv -> LayerNorm without affine -> GELU), a LayerNorm and post-LN
blocks. Names on the Hugging Face side come from ``modeling_data2vec_audio.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from data2vec.config import AudioEncoderConfig, Config, load_config
from data2vec.convert.keymap import KeyMap, rename
from data2vec.errors import UserError
from data2vec.modalities.audio import CNN_LAYERS

_LE = "modality.local_encoder."
_QKV = ("q", "k", "v")
# (hugging face, ours); {} = a layer index
AUDIO_MAP: KeyMap = [
    ("feature_extractor.conv_layers.{}.conv.weight", _LE + "conv_layers.{}.conv.weight"),
    ("feature_extractor.conv_layers.{}.layer_norm.weight", _LE + "conv_layers.{}.norm.weight"),
    ("feature_extractor.conv_layers.{}.layer_norm.bias", _LE + "conv_layers.{}.norm.bias"),
    ("feature_projection.layer_norm.weight", _LE + "norm.weight"),
    ("feature_projection.layer_norm.bias", _LE + "norm.bias"),
    ("feature_projection.projection.weight", _LE + "proj.weight"),
    ("feature_projection.projection.bias", _LE + "proj.bias"),
    ("encoder.pos_conv_embed.layers.{}.conv.weight", "modality.pos_conv.layers.{}.weight"),
    ("encoder.pos_conv_embed.layers.{}.conv.bias", "modality.pos_conv.layers.{}.bias"),
    ("encoder.layer_norm.weight", "modality.context_encoder.norm.weight"),
    ("encoder.layer_norm.bias", "modality.context_encoder.norm.bias"),
    *[
        (f"encoder.layers.{{}}.{src}.{kind}", f"blocks.{{}}.{dst}.{kind}")
        for src, dst in [
            ("attention.out_proj", "attn.proj"),
            ("layer_norm", "norm1"),
            ("feed_forward.intermediate_dense", "mlp.fc1"),
            ("feed_forward.output_dense", "mlp.fc2"),
            ("final_layer_norm", "norm2"),
        ]
        for kind in ("weight", "bias")
    ],
]


def check_audio(cfg: Config) -> AudioEncoderConfig:
    enc = cfg.encoder
    assert isinstance(enc, AudioEncoderConfig)
    if enc.prenet_depth > 0:
        raise UserError("only speech encoders without prenet blocks match Data2VecAudioModel")
    if cfg.model.norm_eps != 1e-5:
        raise UserError(
            f"model.norm_eps={cfg.model.norm_eps}: Data2VecAudioModel uses one LayerNorm eps "
            "(ours: 1e-5 in the CNN and features), so it must be 1e-5"
        )
    return enc


def audio_hf_config(cfg: Config) -> dict[str, Any]:
    """The ``Data2VecAudioConfig`` fields of our (ALiBi-free) speech config."""
    enc = check_audio(cfg)
    m = cfg.model
    return {
        "hidden_size": m.embed_dim,
        "num_hidden_layers": m.depth,
        "num_attention_heads": m.num_heads,
        "intermediate_size": int(m.embed_dim * m.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout": m.encoder_dropout,
        "attention_dropout": m.attention_dropout,
        "activation_dropout": m.activation_dropout,
        "layerdrop": m.layerdrop,
        "feat_proj_dropout": 0.0,
        "conv_dim": [enc.cnn_channels] * len(CNN_LAYERS),
        "conv_kernel": [k for k, _ in CNN_LAYERS],
        "conv_stride": [s for _, s in CNN_LAYERS],
        "conv_bias": False,
        "num_conv_pos_embeddings": enc.pos_conv_layers,  # the number of conv layers
        "conv_pos_kernel_size": enc.pos_conv_kernel,
        "num_conv_pos_embedding_groups": enc.pos_conv_groups,
        "layer_norm_eps": m.norm_eps,
    }


def audio_to_hf(ours: dict[str, Tensor], depth: int, mask_emb: Tensor) -> dict[str, Tensor]:
    """Our speech encoder's weights under ``Data2VecAudioModel`` names."""
    ours = dict(ours)
    ours.pop("modality.alibi_scale", None)  # unused without ALiBi
    out: dict[str, Tensor] = {"masked_spec_embed": mask_emb}
    for i in range(depth):
        for kind in ("weight", "bias"):
            parts = ours.pop(f"blocks.{i}.attn.qkv.{kind}").chunk(3, dim=0)
            for name, part in zip(_QKV, parts):
                out[f"encoder.layers.{i}.attention.{name}_proj.{kind}"] = part.clone()
    out |= rename(ours, [(dst, src) for src, dst in AUDIO_MAP])
    return {k: v.contiguous() for k, v in out.items()}


def audio_from_hf(config: Any, state: dict[str, Tensor]) -> tuple[Config, dict[str, Tensor]]:
    """Our config and encoder weights for a ``Data2VecAudioModel`` config and state dict."""
    dims = set(config.conv_dim)
    shape = tuple(zip(config.conv_kernel, config.conv_stride))
    if shape != CNN_LAYERS or len(dims) != 1 or config.conv_bias:
        raise UserError("only the wav2vec 2.0 CNN shape (equal widths, no bias) is supported")
    if config.hidden_act != "gelu" or config.num_conv_pos_embeddings < 1:
        raise UserError("only GELU models with a positional convolution are supported")
    layers, kernel = config.num_conv_pos_embeddings, config.conv_pos_kernel_size
    cfg = load_config(
        "audio-v1-base",
        [
            f"model.embed_dim={config.hidden_size}", f"model.depth={config.num_hidden_layers}",
            f"model.num_heads={config.num_attention_heads}",
            f"model.mlp_ratio={config.intermediate_size / config.hidden_size}",
            f"model.norm_eps={config.layer_norm_eps}",
            f"model.encoder_dropout={config.hidden_dropout}",
            f"model.post_mlp_dropout={config.hidden_dropout}",
            f"model.attention_dropout={config.attention_dropout}",
            f"model.activation_dropout={config.activation_dropout}",
            f"model.layerdrop={config.layerdrop}", "model.exact_padding=false",
            f"encoder.cnn_channels={dims.pop()}", f"encoder.pos_conv_layers={layers}",
            # our kernel is max(3, width // layers): a width of layers * kernel gives it back
            f"encoder.pos_conv_width={layers * kernel}",
            f"encoder.pos_conv_groups={config.num_conv_pos_embedding_groups}",
            f"target.top_k={min(8, config.num_hidden_layers)}",
        ],
    )  # fmt: skip
    if cfg.encoder.pos_conv_kernel != kernel:  # type: ignore[union-attr]
        raise UserError(f"positional convolution kernel {kernel} is not supported (min 3)")
    state = dict(state)
    state.pop("masked_spec_embed", None)  # a training-time mask vector, not the encoder
    ours: dict[str, Tensor] = {}
    for i in range(config.num_hidden_layers):
        for kind in ("weight", "bias"):
            parts = [state.pop(f"encoder.layers.{i}.attention.{n}_proj.{kind}") for n in _QKV]
            ours[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    ours |= rename(state, AUDIO_MAP)
    ours["modality.alibi_scale"] = torch.ones(config.num_attention_heads)  # unused (no ALiBi)
    return cfg, ours
