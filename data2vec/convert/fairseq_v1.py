"""fairseq data2vec 1.0 checkpoints (``data2vec_audio``, ``data2vec_text``): config translation
and key maps.

Key names come from fairseq's ``examples/data2vec/models/data2vec_{audio,text}.py``,
``models/wav2vec/wav2vec2.py`` (``TransformerEncoder``, ``TransformerSentenceEncoderLayer``) and
``models/transformer`` (``TransformerEncoder``, ``TransformerEncoderLayer``); the
``v1_{audio,text}_tiny`` fixtures in ``tests/fixtures/fairseq`` pin them. fairseq keeps separate
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


def _layer_map(layer: str) -> KeyMap:
    """A fairseq post-LN encoder layer (q/k/v fused) onto our block."""
    pairs = [
        ("self_attn.qkv", "attn.qkv"), ("self_attn.out_proj", "attn.proj"),
        ("self_attn_layer_norm", "norm1"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"),
        ("final_layer_norm", "norm2"),
    ]  # fmt: skip
    return [
        (f"{layer}{src}.{kind}", f"blocks.{{}}.{dst}.{kind}")
        for src, dst in pairs
        for kind in ("weight", "bias")
    ]


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
        *_layer_map(layer),
    ]
    head: KeyMap = [
        ("mask_emb", "mask_emb"),
        ("final_proj.weight", "final_proj.weight"),
        ("final_proj.bias", "final_proj.bias"),
    ]
    return enc, head


def text_config(fs: dict[str, Any], state: dict[str, Any]) -> Config:
    m, t = fs["model"], fs["model"]["transformer"]
    enc = t["encoder"]
    for key, value in [("normalize_before", False), ("learned_pos", True)]:
        _flag(enc, key, value, "model.transformer.encoder")
    for key, value in [("no_scale_embedding", True), ("layernorm_embedding", True),
                       ("activation_fn", "gelu")]:  # fmt: skip
        _flag(t, key, value, "model.transformer")
    if m.get("head_layers", 2) != 2:
        raise UserError("only the 2-layer regression head of data2vec 1.0 text is supported")
    vocab = int(state["encoder.sentence_encoder.embed_tokens.weight"].shape[0])
    dim = enc["embed_dim"]
    target_norm = "layer" if m["layer_norm_target_layer"] else (
        "instance" if m["instance_norm_target_layer"] else "none")  # fmt: skip
    scale = m["loss_scale"]
    task = fs.get("task", {})
    raw = {
        "preset": "fairseq-text-v1",
        "model": {
            "modality": "text", "algorithm": "v1", "embed_dim": dim, "depth": enc["layers"],
            "num_heads": enc["attention_heads"], "mlp_ratio": enc["ffn_embed_dim"] / dim,
            "norm_eps": 1e-5, "encoder_dropout": t["dropout"], "post_mlp_dropout": t["dropout"],
            "attention_dropout": t["attention_dropout"],
            "activation_dropout": t["activation_dropout"], "layerdrop": enc["layerdrop"],
            "exact_padding": False,
        },
        "encoder": {
            "vocab_size": vocab, "max_positions": t["max_source_positions"], "pad_id": 1,
            # fairseq masked_lm adds <mask> after the dictionary's symbols: the last id
            "mask_id": vocab - 1, "dropout": t["dropout"], "layernorm_embedding": True,
            "zero_padding": True,
        },
        "mask": {"kind": "span", "ratio": task.get("mask_prob", 0.35),
                 "block": max(1, task.get("mask_multiple_length", 4)), "clones": 1,
                 "adjust": 0.0},
        "target": {"top_k": m["average_top_k_layers"], "layer_norm": target_norm,
                   "final_norm": "none"},
        # loss_scale <= 0 means 1/sqrt(D) in fairseq 1.0 text
        "loss": {"beta": float(m["loss_beta"]),
                 "scale": None if scale is None or scale <= 0 else float(scale),
                 "cls_weight": 0.0},
        "ema": {"decay": m["ema_decay"], "end_decay": m["ema_end_decay"],
                "anneal_steps": m["ema_anneal_end_step"], "scope": "all"},
        "data": {"block_size": min(int(task.get("tokens_per_sample", 512)),
                                   int(t["max_source_positions"]))},
    }  # fmt: skip
    return config_from_dict(raw)


def text_maps(cfg: Config) -> tuple[KeyMap, KeyMap]:
    """(encoder map, head map) from fairseq student keys (qkv fused) to ours."""
    se = "encoder.sentence_encoder."
    le = "modality.local_encoder."
    layer = se + "layers.{}."
    enc: KeyMap = [
        (se + "version", None),  # fairseq's format marker, not a weight
        (se + "embed_tokens.weight", le + "embed_tokens.weight"),
        (se + "embed_positions.weight", le + "embed_positions.weight"),
        (se + "layernorm_embedding.weight", le + "layernorm_embedding.weight"),
        (se + "layernorm_embedding.bias", le + "layernorm_embedding.bias"),
        *_layer_map(layer),
    ]
    head: KeyMap = [
        ("encoder.regression_head.{}.weight", "final_proj.{}.weight"),
        ("encoder.regression_head.{}.bias", "final_proj.{}.bias"),
    ]
    return enc, head
