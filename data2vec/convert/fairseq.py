"""Import fairseq data2vec checkpoints.

data2vec 2.0 (``data2vec_multi``) image, audio and text models and data2vec 1.0 speech models
(``data2vec_audio``): student, decoder or head, and EMA teacher. Files are read with
``torch.load(weights_only=True)``: no code from the file runs (fairseq checkpoints hold only
dicts, lists, tensors and primitives).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data2vec.config import Config
from data2vec.convert import fairseq_v1, fairseq_v2
from data2vec.convert.keymap import check_complete, rename
from data2vec.errors import UserError
from data2vec.models.data2vec1 import Data2Vec1
from data2vec.models.data2vec2 import Data2Vec2
from data2vec.models.registry import build_model


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


def _float32(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # fp16 training runs store the student in half precision; compute in fp32 here.
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _fix_shapes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """fairseq keeps the ALiBi scale as ``(layers|1, 1, heads, 1, 1)``; ours is ``(heads,)``."""
    key = "modality.alibi_scale"
    if key in state:
        scale = state[key]
        if scale.shape[0] != 1:
            raise UserError("per-layer ALiBi scales are not supported")
        state[key] = scale.reshape(-1)
    return state


def import_fairseq(path: str | Path) -> tuple[Config, Data2Vec2 | Data2Vec1]:
    """Load a fairseq data2vec checkpoint (2.0 any modality, 1.0 speech and text) with its
    teacher."""
    ckpt = load_checkpoint(path)
    name = ckpt["cfg"].get("model", {}).get("_name")
    if name == "data2vec_multi":
        return import_v2(path, ckpt)
    if name == "data2vec_audio":
        return import_v1_audio(ckpt)
    if name == "data2vec_text":
        return import_v1_text(ckpt)
    raise UserError(
        f"{path}: model {name!r} is not supported (data2vec_multi, data2vec_audio and "
        "data2vec_text are)"
    )


def import_v1_text(ckpt: dict[str, Any]) -> tuple[Config, Data2Vec1]:
    """A fairseq data2vec 1.0 text checkpoint as a :class:`Data2Vec1`."""
    state = dict(ckpt["model"])
    ema = state.pop("encoder._ema", None)
    cfg = fairseq_v1.text_config(ckpt["cfg"], state)
    model = build_model(cfg)
    assert isinstance(model, Data2Vec1)
    enc_map, head_map = fairseq_v1.text_maps(cfg)
    state = fairseq_v1.fuse_qkv(state)
    head_keys = {k for k in state if k.startswith("encoder.regression_head.")}
    enc = rename({k: v for k, v in state.items() if k not in head_keys}, enc_map)
    head = rename({k: state[k] for k in head_keys}, head_map)
    teacher = None
    if ema is not None:
        # The teacher is the whole sentence encoder: the student's keys without the prefix.
        prefixed = {f"encoder.sentence_encoder.{k}": v for k, v in ema.items()}
        teacher = rename(fairseq_v1.fuse_qkv(prefixed), enc_map)
    _load_v1(model, enc, head, teacher)
    return cfg, model


def _load_v1(
    model: Data2Vec1,
    enc: dict[str, Tensor],
    head: dict[str, Tensor],
    teacher: dict[str, Tensor] | None,
) -> None:
    """Load converted 1.0 weights, refusing missing or unused keys."""
    check_complete(enc, model.encoder.state_dict(), "student encoder")
    check_complete(head, model.decoder.state_dict(), "mask embedding and regression head")
    model.encoder.load_state_dict(_float32(enc), strict=True)
    model.decoder.load_state_dict(_float32(head), strict=True)
    if teacher is not None:
        check_complete(teacher, model.teacher.model.state_dict(), "EMA teacher")
        model.teacher.load_state_dict(_float32(teacher))


def import_v1_audio(ckpt: dict[str, Any]) -> tuple[Config, Data2Vec1]:
    """A fairseq data2vec 1.0 speech checkpoint as a :class:`Data2Vec1`."""
    state = dict(ckpt["model"])
    ema = state.pop("_ema", None)
    cfg = fairseq_v1.audio_config(ckpt["cfg"], state)
    model = build_model(cfg)
    assert isinstance(model, Data2Vec1)
    enc_map, head_map = fairseq_v1.audio_maps(cfg)
    state = fairseq_v1.fuse_qkv(state)
    head_keys = {"mask_emb", "final_proj.weight", "final_proj.bias"}
    # Our speech encoder has an ALiBi scale even with ALiBi off; fairseq 1.0 has none.
    alibi = {"modality.alibi_scale": model.encoder.state_dict()["modality.alibi_scale"]}
    enc = rename({k: v for k, v in state.items() if k not in head_keys}, enc_map) | alibi
    head = rename({k: state[k] for k in head_keys if k in state}, head_map)
    teacher = None
    if ema is not None:
        # The teacher is fairseq's TransformerEncoder: the student's keys without "encoder.".
        teacher = rename(fairseq_v1.fuse_qkv({f"encoder.{k}": v for k, v in ema.items()}), enc_map)
        teacher |= alibi
    _load_v1(model, enc, head, teacher)
    return cfg, model


def import_v2(path: str | Path, ckpt: dict[str, Any] | None = None) -> tuple[Config, Data2Vec2]:
    """Load a fairseq data2vec 2.0 checkpoint into a :class:`Data2Vec2` (student + teacher)."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(path)
    model_cfg = ckpt["cfg"].get("model", {})
    if model_cfg.get("_name") != "data2vec_multi":
        raise UserError(f"{path}: not a data2vec 2.0 (data2vec_multi) checkpoint")
    modality = str(model_cfg.get("supported_modality"))
    if modality not in fairseq_v2.MODALITIES:
        raise UserError(f"{path}: modality {modality!r} is not supported yet")
    make_config, make_maps = fairseq_v2.MODALITIES[modality]
    state = dict(ckpt["model"])
    cfg = make_config(ckpt["cfg"], state)
    enc_map, dec_map = make_maps(cfg)
    model = build_model(cfg)
    ema = state.pop("_ema", None)
    prefix = f"modality_encoders.{modality}.decoder."
    dec_keys = {k for k in state if k.startswith(prefix)}
    enc = _fix_shapes(rename({k: v for k, v in state.items() if k not in dec_keys}, enc_map))
    dec = rename({k: state[k] for k in dec_keys}, dec_map)
    check_complete(enc, model.encoder.state_dict(), "student encoder")
    check_complete(dec, model.decoder.state_dict(), "decoder")
    model.encoder.load_state_dict(_float32(enc), strict=True)
    model.decoder.load_state_dict(_float32(dec), strict=True)
    if ema is not None:
        teacher = _fix_shapes(rename(ema, fairseq_v2.teacher_map(modality, enc_map)))
        check_complete(teacher, model.teacher.model.state_dict(), "EMA teacher")
        model.teacher.load_state_dict(_float32(teacher))
    return cfg, model


def verify_against_fixture(
    model: Data2Vec2 | Data2Vec1, fixture: str | Path, tolerance: float = 1e-4
) -> dict:
    """Compare our model with the reference outputs of a fairseq fixture (``.npz``).

    Checks the student's final features and per-block FFN outputs on the stored input and, when
    the fixture holds a mask and the decoder's noise, the pretraining loss (relative).
    """
    try:
        z = np.load(fixture)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read fixture {fixture}: {exc}") from exc
    model.eval()
    x = torch.from_numpy(z["input"])
    pad = torch.from_numpy(z["padding_mask"]) if "padding_mask" in z.files else None
    diffs: dict[str, float] = {}
    with torch.no_grad():
        out = model.encoder(x, pad, keep_layers=True)
        diffs["features"] = float((out.x - torch.from_numpy(z["features"])).abs().max())
        if "layer_results" in z.files:
            ref = torch.from_numpy(z["layer_results"])
            diffs["layer_results"] = max(
                float((a - b).abs().max()) for a, b in zip(out.layer_results, ref)
            )
        if "mask" in z.files and "decoder_input" in z.files:
            mask = torch.from_numpy(z["mask"])
            noise = torch.from_numpy(z["decoder_input"])[mask]
            loss = float(model(x, mask, pad, noise=noise).loss)
            ref_loss = float(z["total_loss"]) / float(z["sample_size"])
            diffs["loss_relative"] = abs(loss - ref_loss) / abs(ref_loss)
        elif "mask" in z.files and isinstance(model, Data2Vec1):  # 1.0: no noise to inject
            mask = torch.from_numpy(z["mask"])
            loss = float(model(x, mask, pad).loss)
            ref_loss = float(z["loss"]) / float(z["sample_size"])
            diffs["loss_relative"] = abs(loss - ref_loss) / abs(ref_loss)
    worst = max(v for k, v in diffs.items() if k != "loss_relative")
    ok = worst <= tolerance and diffs.get("loss_relative", 0.0) <= 1e-5  # losses are sums: relative
    return {"max_abs_diff": worst, "ok": bool(ok), "diffs": diffs}
