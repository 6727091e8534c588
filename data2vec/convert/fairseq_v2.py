"""fairseq ``data2vec_multi`` (data2vec 2.0) checkpoints: config translation and key maps.

Key names on the fairseq side come from ``examples/data2vec/models/data2vec2.py`` and
``models/modalities/{base,images,audio,text}.py`` at fairseq 3d262bb; the fixtures in
``tests/fixtures/fairseq`` pin them.
"""

from __future__ import annotations

from typing import Any

from data2vec.config import Config, config_from_dict
from data2vec.convert.keymap import KeyMap
from data2vec.errors import UserError
from data2vec.modalities.audio import CNN_LAYERS

_BLOCK = [
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
    "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
]  # fmt: skip


def blocks_map(src_prefix: str, dst_prefix: str) -> KeyMap:
    """Transformer blocks: the names inside a block are the same on both sides."""
    return [(f"{src_prefix}{{}}.{k}", f"{dst_prefix}{{}}.{k}") for k in _BLOCK]


def _flag(section: dict[str, Any], key: str, expected: Any, where: str) -> None:
    if section.get(key, expected) != expected:
        raise UserError(
            f"fairseq {where}.{key}={section[key]!r} is not supported (expected {expected!r})"
        )


def _norm(instance: bool, layer: bool) -> str:
    return "instance" if instance else ("layer" if layer else "none")


def _common(m: dict[str, Any], mod: dict[str, Any], modality: str) -> dict[str, Any]:
    """Sections shared by every modality: model, mask, decoder, target, loss, EMA."""
    for key, value in [
        ("layer_norm_first", False),
        ("end_of_block_targets", False),
        ("batch_norm_target_layer", False),
        ("shared_decoder", None),
        ("recon_loss", 0.0),
    ]:
        _flag(m, key, value, "model")
    dec = mod["decoder"]
    for key in ("add_positions_masked", "add_positions_all"):
        _flag(dec, key, False, f"model.modalities.{modality}.decoder")
    if mod.get("mask_length", 1) <= 1:
        kind = "random"
    else:
        kind = "inverse_block" if mod["inverse_mask"] else "block"
    ema_scope = (
        "blocks" if m["ema_encoder_only"] else ("all" if mod["ema_local_encoder"] else "context")
    )
    return {
        "preset": f"fairseq-{modality}-v2",
        "model": {
            "modality": modality, "algorithm": "v2", "embed_dim": m["embed_dim"],
            "depth": m["depth"], "num_heads": m["num_heads"], "mlp_ratio": float(m["mlp_ratio"]),
            "norm_eps": m["norm_eps"], "encoder_dropout": m["encoder_dropout"],
            "attention_dropout": m["attention_dropout"],
            "activation_dropout": m["activation_dropout"], "post_mlp_dropout": m["post_mlp_drop"],
            "drop_path": m["end_drop_path_rate"], "layerdrop": m["layerdrop"],
            "exact_padding": False,  # reproduce fairseq's handling of padded frames
        },
        "mask": {
            "kind": kind, "ratio": mod["mask_prob"], "adjust": mod["mask_prob_adjust"],
            "block": max(mod["mask_length"], 1), "clones": m["clone_batch"],
            "noise_std": mod["mask_noise_std"],
        },
        "decoder": {
            "dim": dec["decoder_dim"], "groups": dec["decoder_groups"],
            "kernel": dec["decoder_kernel"], "layers": dec["decoder_layers"],
            "residual": dec["decoder_residual"], "projection_layers": dec["projection_layers"],
            "projection_ratio": float(dec["projection_ratio"]),
            "input_dropout": dec["input_dropout"],
        },
        "target": {
            "top_k": m["average_top_k_layers"],
            "layer_norm": _norm(m["instance_norm_target_layer"], m["layer_norm_target_layer"]),
            "final_norm": _norm(m["instance_norm_targets"], m["layer_norm_targets"]),
        },
        "loss": {"beta": float(m["loss_beta"]), "scale": m["loss_scale"],
                 "cls_weight": float(m["cls_loss"])},
        "ema": {"decay": m["ema_decay"], "end_decay": m["ema_end_decay"],
                "anneal_steps": m["ema_anneal_end_step"], "scope": ema_scope},
    }  # fmt: skip


def image_config(fs: dict[str, Any], state: dict[str, Any]) -> Config:
    m = fs["model"]
    img = m["modalities"]["image"]
    for key in ("transformer_decoder", "use_alibi_encoder"):
        _flag(img, key, False, "model.modalities.image")
    raw = _common(m, img, "image")
    raw["encoder"] = {
        "image_size": img["input_size"], "patch_size": img["patch_size"],
        "in_chans": img["in_chans"], "prenet_depth": img["prenet_depth"],
        "num_extra_tokens": img["num_extra_tokens"],
    }  # fmt: skip
    return config_from_dict(raw)


def _cnn_channels(spec: str) -> int:
    """Channels of a wav2vec 2.0 CNN spec string, checking its kernels and strides are standard."""
    import ast

    # The spec is a Python expression like "[(512, 10, 5)] + [(512, 3, 2)] * 4 + ...": evaluate
    # it without eval() by expanding its only operators, "+" of lists and "* n" repeats.
    layers = []
    for term in spec.replace(" ", "").split("+"):
        body, _, times = term.partition("*")
        items = ast.literal_eval(body)
        layers += list(items) * (int(times) if times else 1)
    dims = {d for d, _, _ in layers}
    if tuple((k, s) for _, k, s in layers) != CNN_LAYERS or len(dims) != 1:
        raise UserError(f"fairseq feature_encoder_spec {spec!r} is not the wav2vec 2.0 CNN shape")
    return dims.pop()


def audio_config(fs: dict[str, Any], state: dict[str, Any]) -> Config:
    m = fs["model"]
    aud = m["modalities"]["audio"]
    _flag(aud, "learned_alibi_scale_per_layer", False, "model.modalities.audio")
    _flag(aud, "learned_alibi", False, "model.modalities.audio")
    _flag(aud, "extractor_mode", "layer_norm", "model.modalities.audio")
    _flag(aud, "conv_pos_pre_ln", False, "model.modalities.audio")
    raw = _common(m, aud, "audio")
    raw["encoder"] = {
        "cnn_channels": _cnn_channels(aud["feature_encoder_spec"]),
        "pos_conv_layers": aud["conv_pos_depth"], "pos_conv_width": aud["conv_pos_width"],
        "pos_conv_groups": aud["conv_pos_groups"], "prenet_depth": aud["prenet_depth"],
        "prenet_dropout": aud["prenet_dropout"], "alibi": aud["use_alibi_encoder"],
        "alibi_scale": float(aud["alibi_scale"]),
    }  # fmt: skip
    return config_from_dict(raw)


def text_config(fs: dict[str, Any], state: dict[str, Any]) -> Config:
    """The vocabulary size is read off the checkpoint's token embedding (the dictionary's)."""
    embed = state.get("modality_encoders.TEXT.local_encoder.embed_tokens.weight")
    if embed is None:
        raise UserError("no token embedding (local_encoder.embed_tokens) in the text checkpoint")
    vocab_size = int(embed.shape[0])
    m = fs["model"]
    txt = m["modalities"]["text"]
    for key, value in [
        ("learned_pos", True),
        ("no_scale_embedding", True),
        ("no_token_positional_embeddings", False),
        ("use_alibi_encoder", False),
    ]:
        _flag(txt, key, value, "model.modalities.text")
    raw = _common(m, txt, "text")
    raw["encoder"] = {
        "vocab_size": vocab_size, "max_positions": txt["max_source_positions"],
        "pad_id": 1,  # fairseq Dictionary: <s>=0 <pad>=1 </s>=2 <unk>=3
        "dropout": txt["dropout"], "layernorm_embedding": txt["layernorm_embedding"],
        "prenet_depth": txt["prenet_depth"], "prenet_dropout": txt["prenet_dropout"],
    }  # fmt: skip
    block = fs.get("task", {}).get("tokens_per_sample", txt["max_source_positions"])
    raw["data"] = {"block_size": min(int(block), int(txt["max_source_positions"]))}
    return config_from_dict(raw)


def image_maps(cfg: Config) -> tuple[KeyMap, KeyMap]:
    """(encoder map, decoder map) from fairseq keys to ours."""
    m = "modality_encoders.IMAGE."
    enc = [
        (m + "extra_tokens", "modality.extra_tokens"),
        (m + "local_encoder.proj.weight", "modality.local_encoder.proj.weight"),
        (m + "local_encoder.proj.bias", "modality.local_encoder.proj.bias"),
        (m + "fixed_positional_encoder.positions", "modality.pos_embed"),
        (m + "context_encoder.norm.weight", "modality.context_encoder.norm.weight"),
        (m + "context_encoder.norm.bias", "modality.context_encoder.norm.bias"),
        *blocks_map(m + "context_encoder.blocks.", "modality.context_encoder.blocks."),
        *blocks_map("blocks.", "blocks."),
    ]
    return enc, _decoder_map(m)


def audio_maps(cfg: Config) -> tuple[KeyMap, KeyMap]:
    m = "modality_encoders.AUDIO."
    le = "modality.local_encoder."
    enc: KeyMap = [
        (m + "alibi_scale", "modality.alibi_scale"),
        (m + "local_encoder.conv_layers.{}.0.weight", le + "conv_layers.{}.conv.weight"),
        (m + "local_encoder.conv_layers.{}.2.1.weight", le + "conv_layers.{}.norm.weight"),
        (m + "local_encoder.conv_layers.{}.2.1.bias", le + "conv_layers.{}.norm.bias"),
        (m + "project_features.1.weight", le + "norm.weight"),
        (m + "project_features.1.bias", le + "norm.bias"),
        (m + "project_features.2.weight", le + "proj.weight"),
        (m + "project_features.2.bias", le + "proj.bias"),
        (m + "context_encoder.norm.weight", "modality.context_encoder.norm.weight"),
        (m + "context_encoder.norm.bias", "modality.context_encoder.norm.bias"),
        *blocks_map(m + "context_encoder.blocks.", "modality.context_encoder.blocks."),
        *blocks_map("blocks.", "blocks."),
    ]
    # fairseq's positional Sequential starts with a TransposeLast, so conv i is module i + 1.
    for i in range(cfg.encoder.pos_conv_layers):  # type: ignore[union-attr]
        for p in ("weight", "bias"):
            enc.append(
                (
                    f"{m}relative_positional_encoder.{i + 1}.0.{p}",
                    f"modality.pos_conv.layers.{i}.{p}",
                )
            )
    return enc, _decoder_map(m)


def text_maps(cfg: Config) -> tuple[KeyMap, KeyMap]:
    m = "modality_encoders.TEXT."
    le = "modality.local_encoder."
    enc: KeyMap = [
        (m + "local_encoder.embed_tokens.weight", le + "embed_tokens.weight"),
        (m + "local_encoder.embed_positions.weight", le + "embed_positions.weight"),
        (m + "local_encoder.layernorm_embedding.weight", le + "layernorm_embedding.weight"),
        (m + "local_encoder.layernorm_embedding.bias", le + "layernorm_embedding.bias"),
        (m + "context_encoder.norm.weight", "modality.context_encoder.norm.weight"),
        (m + "context_encoder.norm.bias", "modality.context_encoder.norm.bias"),
        *blocks_map(m + "context_encoder.blocks.", "modality.context_encoder.blocks."),
        *blocks_map("blocks.", "blocks."),
    ]
    return enc, _decoder_map(m)


def teacher_map(modality: str, enc: KeyMap) -> KeyMap:
    """fairseq's EMA keys: the student's names, except for a text teacher of the blocks only
    (``ema_encoder_only``), whose keys are the block list's own (``0.attn.qkv.weight``)."""
    return blocks_map("", "blocks.") if modality == "TEXT" else enc


def _decoder_map(m: str) -> KeyMap:
    d = m + "decoder."
    return [
        (d + "blocks.{}.0.weight", "blocks.{}.0.weight"),
        (d + "blocks.{}.0.bias", "blocks.{}.0.bias"),
        (d + "proj.weight", "proj.weight"),
        (d + "proj.bias", "proj.bias"),
        (d + "proj.{}.weight", "proj.{}.weight"),  # a multi-layer projection (text)
        (d + "proj.{}.bias", "proj.{}.bias"),
    ]


MODALITIES = {
    "IMAGE": (image_config, image_maps),
    "AUDIO": (audio_config, audio_maps),
    "TEXT": (text_config, text_maps),
}
