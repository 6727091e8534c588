"""fairseq ``data2vec_audio`` (data2vec 1.0 speech) checkpoints: config translation, key maps.

Key names come from fairseq's ``examples/data2vec/models/data2vec_audio.py`` and
``models/wav2vec/wav2vec2.py`` (``TransformerEncoder``, ``TransformerSentenceEncoderLayer``);
the ``v1_audio_tiny`` fixture in ``tests/fixtures/fairseq`` pins them. fairseq keeps separate
q/k/v projections; ours are fused (``qkv`` = [q; k; v]).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from data2vec.config import Config, config_from_dict
from data2vec.convert.fairseq_v2 import _cnn_channels, _flag
from data2vec.convert.keymap import KeyMap
from data2vec.errors import UserError

_QKV = re.compile(r"^(.*layers\.\d+\.self_attn\.)(q|k|v)_proj\.(weight|bias)$")


def audio_config(fs: dict[str, Any], state: dict[str, Any]) -> Config:
    m = fs["model"]
    for key, value in [
        ("extractor_mode", "layer_norm"),
        ("layer_norm_first", False),
        ("conv_bias", False),
        ("activation_fn", "gelu"),
        ("layer_norm_target_layer", False),
        ("batch_norm_target_layer", False),
        ("instance_norm_targets", False),
        ("layer_norm_targets", False),
    ]:
        _flag(m, key, value, "model")
    dim = m["encoder_embed_dim"]
    raw = {
        "preset": "fairseq-audio-v1",
        "model": {
            "modality": "audio", "algorithm": "v1", "embed_dim": dim,
            "depth": m["encoder_layers"], "num_heads": m["encoder_attention_heads"],
            "mlp_ratio": m["encoder_ffn_embed_dim"] / dim, "norm_eps": 1e-5,
            "encoder_dropout": m["dropout"], "post_mlp_dropout": m["dropout"],
            "attention_dropout": m["attention_dropout"],
            "activation_dropout": m["activation_dropout"], "layerdrop": m["encoder_layerdrop"],
            "exact_padding": False,  # reproduce fairseq's handling of padded frames
        },
        "encoder": {
            "cnn_channels": _cnn_channels(m["conv_feature_layers"]),
            "pos_conv_layers": m.get("pos_conv_depth", 1), "pos_conv_width": m["conv_pos"],
            "pos_conv_groups": m["conv_pos_groups"], "prenet_depth": 0,
            "prenet_dropout": m["dropout"], "alibi": False, "zero_padding": True,
        },
        "mask": {"kind": "span", "ratio": m["mask_prob"], "block": m["mask_length"], "clones": 1,
                 "adjust": 0.0},
        "target": {"top_k": m["average_top_k_layers"],
                   "layer_norm": "instance" if m["instance_norm_target_layer"] else "none",
                   "final_norm": "none"},
        "loss": {"beta": float(m["loss_beta"]), "scale": m["loss_scale"], "cls_weight": 0.0},
        "ema": {"decay": m["ema_decay"], "end_decay": m["ema_end_decay"],
                "anneal_steps": m["ema_anneal_end_step"], "scope": "context"},
    }  # fmt: skip
    if m.get("pos_conv_depth", 1) > 1 and m["conv_pos"] // m["pos_conv_depth"] < 3:
        raise UserError("fairseq pos_conv kernel below 3 is not supported")
    return config_from_dict(raw)


def fuse_qkv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace ``...self_attn.{q,k,v}_proj.*`` by one ``...self_attn.qkv.*`` ([q; k; v])."""
    out: dict[str, Tensor] = {}
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        match = _QKV.match(key)
        if match is None:
            out[key] = value
        else:
            prefix, which, kind = match.groups()
            parts.setdefault((prefix, kind), {})[which] = value
    for (prefix, kind), qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise UserError(f"{prefix}: incomplete q/k/v projections {sorted(qkv)}")
        out[f"{prefix}qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def audio_maps(cfg: Config) -> tuple[KeyMap, KeyMap]:
    """(encoder map, head map) from fairseq student keys (qkv fused) to ours."""
    le = "modality.local_encoder."
    layer = "encoder.layers.{}."
    enc: KeyMap = [
        ("feature_extractor.conv_layers.{}.0.weight", le + "conv_layers.{}.conv.weight"),
        ("feature_extractor.conv_layers.{}.2.1.weight", le + "conv_layers.{}.norm.weight"),
        ("feature_extractor.conv_layers.{}.2.1.bias", le + "conv_layers.{}.norm.bias"),
        ("layer_norm.weight", le + "norm.weight"),
        ("layer_norm.bias", le + "norm.bias"),
        ("post_extract_proj.weight", le + "proj.weight"),
        ("post_extract_proj.bias", le + "proj.bias"),
        ("encoder.pos_conv.{}.0.weight", "modality.pos_conv.layers.{}.weight"),
        ("encoder.pos_conv.{}.0.bias", "modality.pos_conv.layers.{}.bias"),
        ("encoder.layer_norm.weight", "modality.context_encoder.norm.weight"),
        ("encoder.layer_norm.bias", "modality.context_encoder.norm.bias"),
        (layer + "self_attn.qkv.weight", "blocks.{}.attn.qkv.weight"),
        (layer + "self_attn.qkv.bias", "blocks.{}.attn.qkv.bias"),
        (layer + "self_attn.out_proj.weight", "blocks.{}.attn.proj.weight"),
        (layer + "self_attn.out_proj.bias", "blocks.{}.attn.proj.bias"),
        (layer + "self_attn_layer_norm.weight", "blocks.{}.norm1.weight"),
        (layer + "self_attn_layer_norm.bias", "blocks.{}.norm1.bias"),
        (layer + "fc1.weight", "blocks.{}.mlp.fc1.weight"),
        (layer + "fc1.bias", "blocks.{}.mlp.fc1.bias"),
        (layer + "fc2.weight", "blocks.{}.mlp.fc2.weight"),
        (layer + "fc2.bias", "blocks.{}.mlp.fc2.bias"),
        (layer + "final_layer_norm.weight", "blocks.{}.norm2.weight"),
        (layer + "final_layer_norm.bias", "blocks.{}.norm2.bias"),
    ]
    head: KeyMap = [
        ("mask_emb", "mask_emb"),
        ("final_proj.weight", "final_proj.weight"),
        ("final_proj.bias", "final_proj.bias"),
    ]
    return enc, head
