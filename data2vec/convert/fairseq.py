"""Import fairseq data2vec checkpoints.

So far: data2vec 2.0 (``data2vec_multi``) image models, student and EMA teacher. The file is
read with ``torch.load(weights_only=True)`` (no code runs: fairseq checkpoints hold only dicts,
lists, tensors and primitives).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data2vec.config import Config, config_from_dict
from data2vec.convert.keymap import KeyMap, check_complete, rename
from data2vec.errors import UserError
from data2vec.models.data2vec2 import Data2Vec2
from data2vec.models.registry import build_model

_BLOCK = [
    ("{}.norm1.weight", "{}.norm1.weight"),
    ("{}.norm1.bias", "{}.norm1.bias"),
    ("{}.attn.qkv.weight", "{}.attn.qkv.weight"),
    ("{}.attn.qkv.bias", "{}.attn.qkv.bias"),
    ("{}.attn.proj.weight", "{}.attn.proj.weight"),
    ("{}.attn.proj.bias", "{}.attn.proj.bias"),
    ("{}.norm2.weight", "{}.norm2.weight"),
    ("{}.norm2.bias", "{}.norm2.bias"),
    ("{}.mlp.fc1.weight", "{}.mlp.fc1.weight"),
    ("{}.mlp.fc1.bias", "{}.mlp.fc1.bias"),
    ("{}.mlp.fc2.weight", "{}.mlp.fc2.weight"),
    ("{}.mlp.fc2.bias", "{}.mlp.fc2.bias"),
]


def _blocks(src_prefix: str, dst_prefix: str) -> KeyMap:
    return [
        (src.replace("{}", src_prefix + "{}", 1), dst.replace("{}", dst_prefix + "{}", 1))
        for src, dst in _BLOCK
    ]


def _image_v2_encoder_map() -> KeyMap:
    m = "modality_encoders.IMAGE."
    return [
        (m + "extra_tokens", "modality.extra_tokens"),
        (m + "local_encoder.proj.weight", "modality.local_encoder.proj.weight"),
        (m + "local_encoder.proj.bias", "modality.local_encoder.proj.bias"),
        (m + "fixed_positional_encoder.positions", "modality.pos_embed"),
        (m + "context_encoder.norm.weight", "modality.context_encoder.norm.weight"),
        (m + "context_encoder.norm.bias", "modality.context_encoder.norm.bias"),
        *_blocks(m + "context_encoder.blocks.", "modality.context_encoder.blocks."),
        *_blocks("blocks.", "blocks."),
    ]


def _image_v2_decoder_map() -> KeyMap:
    m = "modality_encoders.IMAGE.decoder."
    return [
        (m + "blocks.{}.0.weight", "blocks.{}.0.weight"),
        (m + "blocks.{}.0.bias", "blocks.{}.0.bias"),
        (m + "proj.weight", "proj.weight"),
        (m + "proj.bias", "proj.bias"),
    ]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a fairseq checkpoint without executing code."""
    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # pickle errors name a class outside the allow-list
        raise UserError(f"cannot read {path} as a fairseq checkpoint safely: {exc}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "cfg" not in ckpt:
        raise UserError(f"{path} is not a fairseq checkpoint (no 'model'/'cfg' entries)")
    return ckpt


def _flag(cfg: dict[str, Any], key: str, expected: Any) -> None:
    if cfg.get(key, expected) != expected:
        raise UserError(
            f"fairseq model.{key}={cfg[key]!r} is not supported (expected {expected!r})"
        )


def image_v2_config(fs: dict[str, Any]) -> Config:
    """Translate a fairseq ``data2vec_multi`` image model config into ours."""
    m = fs["model"]
    img = m["modalities"]["image"]
    dec = img["decoder"]
    for key, value in [
        ("layer_norm_first", False),
        ("end_of_block_targets", False),
        ("batch_norm_target_layer", False),
        ("shared_decoder", None),
        ("recon_loss", 0.0),
    ]:
        _flag(m, key, value)
    for key, value in [
        ("transformer_decoder", False),
        ("add_positions_masked", False),
        ("add_positions_all", False),
        ("use_alibi_encoder", False),
    ]:
        _flag(img if key in img else dec, key, value)
    layer_norm = (
        "instance"
        if m["instance_norm_target_layer"]
        else ("layer" if m["layer_norm_target_layer"] else "none")
    )
    final_norm = (
        "layer"
        if m["layer_norm_targets"]
        else ("instance" if m["instance_norm_targets"] else "none")
    )
    raw = {
        "preset": "fairseq-import",
        "model": {
            "modality": "image",
            "algorithm": "v2",
            "embed_dim": m["embed_dim"],
            "depth": m["depth"],
            "num_heads": m["num_heads"],
            "mlp_ratio": float(m["mlp_ratio"]),
            "norm_eps": m["norm_eps"],
            "encoder_dropout": m["encoder_dropout"],
            "attention_dropout": m["attention_dropout"],
            "activation_dropout": m["activation_dropout"],
            "post_mlp_dropout": m["post_mlp_drop"],
            "drop_path": m["end_drop_path_rate"],
        },
        "encoder": {
            "image_size": img["input_size"],
            "patch_size": img["patch_size"],
            "in_chans": img["in_chans"],
            "prenet_depth": img["prenet_depth"],
            "num_extra_tokens": img["num_extra_tokens"],
        },
        "mask": {
            "kind": "inverse_block" if img["inverse_mask"] else "random",
            "ratio": img["mask_prob"],
            "adjust": img["mask_prob_adjust"],
            "block": img["mask_length"],
            "clones": m["clone_batch"],
            "noise_std": img["mask_noise_std"],
        },
        "decoder": {
            "dim": dec["decoder_dim"],
            "groups": dec["decoder_groups"],
            "kernel": dec["decoder_kernel"],
            "layers": dec["decoder_layers"],
            "residual": dec["decoder_residual"],
            "projection_layers": dec["projection_layers"],
            "projection_ratio": float(dec["projection_ratio"]),
            "input_dropout": dec["input_dropout"],
        },
        "target": {
            "top_k": m["average_top_k_layers"],
            "layer_norm": layer_norm,
            "final_norm": final_norm,
        },
        "loss": {
            "beta": float(m["loss_beta"]),
            "scale": m["loss_scale"],
            "cls_weight": float(m["cls_loss"]),
        },
        "ema": {
            "decay": m["ema_decay"],
            "end_decay": m["ema_end_decay"],
            "anneal_steps": m["ema_anneal_end_step"],
            "scope": "blocks"
            if m["ema_encoder_only"]
            else ("all" if img["ema_local_encoder"] else "context"),
        },
    }
    return config_from_dict(raw)


def _float32(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # fp16 training runs store the student in half precision; compute in fp32 here.
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def import_image_v2(path: str | Path) -> tuple[Config, Data2Vec2]:
    """Load a fairseq data2vec 2.0 image checkpoint: student, decoder and EMA teacher."""
    ckpt = load_checkpoint(path)
    cfg = image_v2_config(ckpt["cfg"])
    model = build_model(cfg)
    state = dict(ckpt["model"])
    ema = state.pop("_ema", None)
    decoder_keys = {k for k in state if k.startswith("modality_encoders.IMAGE.decoder.")}
    enc = rename({k: v for k, v in state.items() if k not in decoder_keys}, _image_v2_encoder_map())
    dec = rename({k: state[k] for k in decoder_keys}, _image_v2_decoder_map())
    check_complete(enc, model.encoder.state_dict(), "student encoder")
    check_complete(dec, model.decoder.state_dict(), "decoder")
    model.encoder.load_state_dict(_float32(enc), strict=True)
    model.decoder.load_state_dict(_float32(dec), strict=True)
    if ema is not None:
        teacher = rename(ema, _image_v2_encoder_map())
        check_complete(teacher, model.teacher.model.state_dict(), "EMA teacher")
        model.teacher.load_state_dict(_float32(teacher))
    return cfg, model


def verify_against_fixture(model: Data2Vec2, fixture: str | Path, tolerance: float = 1e-4) -> dict:
    """Compare our encoder with the reference outputs of a fairseq fixture (``.npz``).

    Checks the student's final features and per-block FFN outputs on the stored input and, when
    the fixture holds a mask and the decoder's noise, the pretraining loss (relative).
    """
    import numpy as np

    try:
        z = np.load(fixture)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read fixture {fixture}: {exc}") from exc
    model.eval()
    x = torch.from_numpy(z["input"])
    diffs: dict[str, float] = {}
    with torch.no_grad():
        out = model.encoder(x, keep_layers=True)
        diffs["features"] = float((out.x - torch.from_numpy(z["features"])).abs().max())
        if "layer_results" in z.files:
            ref = torch.from_numpy(z["layer_results"])
            diffs["layer_results"] = max(
                float((a - b).abs().max()) for a, b in zip(out.layer_results, ref)
            )
        if "mask" in z.files and "decoder_input" in z.files:
            mask = torch.from_numpy(z["mask"])
            noise = torch.from_numpy(z["decoder_input"])[mask]
            loss = float(model(x, mask, noise=noise).loss)
            ref_loss = float(z["total_loss"]) / float(z["sample_size"])
            diffs["loss_relative"] = abs(loss - ref_loss) / abs(ref_loss)
    worst = max(v for k, v in diffs.items() if k != "loss_relative")
    ok = worst <= tolerance and diffs.get("loss_relative", 0.0) <= 1e-5  # losses are sums: relative
    return {"max_abs_diff": worst, "ok": bool(ok), "diffs": diffs}
