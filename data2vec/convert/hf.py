"""Hugging Face ``transformers`` interop: ours <-> ``Data2VecTextModel`` / ``Data2VecAudioModel``
/ ``Data2VecVisionModel``.

A text encoder (post-LN blocks, token + learned positions with the fairseq/RoBERTa offset,
embedding LayerNorm) is exactly a ``Data2VecTextModel`` (a RoBERTa) with one token type. A speech
encoder without ALiBi (data2vec 1.0: wav2vec 2.0 CNN, multi-layer positional convolution, post-LN
blocks, padded frames zeroed once) is exactly a ``Data2VecAudioModel``; a data2vec 1.0 image
encoder (BEiT) is a ``Data2VecVisionModel`` (``convert/hf_vision.py``). Key names on the Hugging
Face side are those of ``transformers``' ``models/data2vec/modeling_data2vec_*.py``. Fused
``qkv`` weights are split into query/key/value on export and joined on import.

Not expressible, and refused with the reason: speech v2 encoders with ALiBi (an attention bias
``Data2VecAudioModel`` does not have) and image v2 encoders (post-LN ViT with fixed sin-cos
positions; ``Data2VecVisionModel`` is a pre-LN BEiT with relative position bias).
``transformers`` is an optional dependency (``pip install data2vec[hf]``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data2vec.config import Config, TextEncoderConfig, load_config
from data2vec.convert.keymap import check_complete, rename
from data2vec.errors import UserError
from data2vec.models.encoder import Encoder
from data2vec.models.registry import build_encoder

log = logging.getLogger(__name__)

_NOT_EXPRESSIBLE = {
    "audio": "this speech encoder uses an ALiBi attention bias (data2vec 2.0), which "
    "transformers' Data2VecAudioModel does not have, so the export would compute something else",
    "image": "data2vec 2.0 image encoders are post-LN ViTs with fixed sin-cos positions and a CLS "
    "token; transformers' Data2VecVisionModel is a pre-LN BEiT with relative position bias",
}

_LAYER = "encoder.layer.{}."
# (hugging face, ours) for the tensors that are renamed one to one; {} = block index
_BLOCK_MAP = [
    (_LAYER + "attention.output.dense.weight", "blocks.{}.attn.proj.weight"),
    (_LAYER + "attention.output.dense.bias", "blocks.{}.attn.proj.bias"),
    (_LAYER + "attention.output.LayerNorm.weight", "blocks.{}.norm1.weight"),
    (_LAYER + "attention.output.LayerNorm.bias", "blocks.{}.norm1.bias"),
    (_LAYER + "intermediate.dense.weight", "blocks.{}.mlp.fc1.weight"),
    (_LAYER + "intermediate.dense.bias", "blocks.{}.mlp.fc1.bias"),
    (_LAYER + "output.dense.weight", "blocks.{}.mlp.fc2.weight"),
    (_LAYER + "output.dense.bias", "blocks.{}.mlp.fc2.bias"),
    (_LAYER + "output.LayerNorm.weight", "blocks.{}.norm2.weight"),
    (_LAYER + "output.LayerNorm.bias", "blocks.{}.norm2.bias"),
]
_EMB = "modality.local_encoder."
_EMBED_MAP = [
    ("embeddings.word_embeddings.weight", _EMB + "embed_tokens.weight"),
    ("embeddings.position_embeddings.weight", _EMB + "embed_positions.weight"),
    ("embeddings.LayerNorm.weight", _EMB + "layernorm_embedding.weight"),
    ("embeddings.LayerNorm.bias", _EMB + "layernorm_embedding.bias"),
]
_QKV = ("query", "key", "value")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(
            "Hugging Face conversion needs transformers: pip install 'data2vec[hf]'"
        ) from None
    if not transformers.utils.is_torch_available():
        # transformers 5 switches its models off under PyTorch < 2.6 (the error would come
        # later, from the first model class, and not say why)
        raise UserError(
            f"transformers {transformers.__version__} does not use this PyTorch "
            f"({torch.__version__}; transformers 5 needs PyTorch 2.6 or newer): with an older "
            "PyTorch, pip install 'transformers>=4.40,<5'"
        )
    return transformers


def _check_text(cfg: Config) -> TextEncoderConfig:
    if cfg.model.modality != "text":
        reason = _NOT_EXPRESSIBLE.get(cfg.model.modality, "no Hugging Face class matches it")
        raise UserError(f"cannot export a {cfg.model.modality} encoder to Hugging Face: {reason}")
    enc = cfg.encoder
    assert isinstance(enc, TextEncoderConfig)
    if enc.prenet_depth > 0 or not enc.layernorm_embedding:
        raise UserError("only text encoders without prenet blocks and with an embedding LayerNorm "
                        "match Data2VecTextModel")  # fmt: skip
    if cfg.model.norm_eps != 1e-5:
        raise UserError(
            f"model.norm_eps={cfg.model.norm_eps}: Data2VecTextModel uses one LayerNorm eps for "
            "the embeddings (ours: 1e-5) and the blocks, so both must be 1e-5"
        )
    return enc


def hf_config(cfg: Config) -> dict[str, Any]:
    """The ``Data2VecTextConfig`` fields of our text config."""
    enc = _check_text(cfg)
    m = cfg.model
    return {
        "vocab_size": enc.vocab_size,
        "hidden_size": m.embed_dim,
        "num_hidden_layers": m.depth,
        "num_attention_heads": m.num_heads,
        "intermediate_size": int(m.embed_dim * m.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": m.encoder_dropout,
        "attention_probs_dropout_prob": m.attention_dropout,
        "max_position_embeddings": enc.max_positions + enc.pad_id + 1,
        "type_vocab_size": 1,
        "layer_norm_eps": m.norm_eps,
        "pad_token_id": enc.pad_id,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }


def to_hf_state(encoder: Encoder, depth: int) -> dict[str, Tensor]:
    """Our encoder's weights under ``Data2VecTextModel`` names (fused qkv split)."""
    ours = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    inverse = [(dst, src) for src, dst in [*_EMBED_MAP, *_BLOCK_MAP]]
    out: dict[str, Tensor] = {}
    for i in range(depth):
        for kind in ("weight", "bias"):
            parts = ours.pop(f"blocks.{i}.attn.qkv.{kind}").chunk(3, dim=0)
            for name, part in zip(_QKV, parts):
                out[f"encoder.layer.{i}.attention.self.{name}.{kind}"] = part.clone()
    out |= rename(ours, inverse)
    dim = out["embeddings.word_embeddings.weight"].shape[1]
    out["embeddings.token_type_embeddings.weight"] = torch.zeros(1, dim)
    return {k: v.contiguous() for k, v in out.items()}


def export_hf(model_dir: str | Path, out: str | Path) -> Path:
    """Write our model at ``model_dir`` as a Hugging Face ``Data2VecTextModel`` or
    ``Data2VecAudioModel`` folder."""
    from data2vec.evaluate.features import load_encoder

    transformers = _transformers()
    cfg, encoder = load_encoder(model_dir)
    if cfg.model.modality == "audio" and not getattr(cfg.encoder, "alibi", True):
        return _export_audio(transformers, model_dir, cfg, encoder, Path(out))
    if cfg.model.modality == "image" and cfg.model.block == "layer_scale":
        return _export_vision(transformers, model_dir, cfg, encoder, Path(out))
    config = transformers.Data2VecTextConfig(**hf_config(cfg))
    model = transformers.Data2VecTextModel(config, add_pooling_layer=False)
    state = to_hf_state(encoder, cfg.model.depth)
    check_complete(state, model.state_dict(), "Hugging Face Data2VecTextModel")
    model.load_state_dict(state, strict=True)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is not None:  # a fast tokenizer AutoTokenizer can load
        tokenizer.save(out)
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "pad_token": "<pad>", "mask_token": "<mask>"}  # fmt: skip
        (out / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **special}, indent=1)
        )
    return out


def _export_audio(transformers, model_dir, cfg: Config, encoder: Encoder, out: Path) -> Path:
    from data2vec.convert import hf_audio

    config = transformers.Data2VecAudioConfig(**hf_audio.audio_hf_config(cfg))
    model = transformers.Data2VecAudioModel(config)
    weights = _saved_weights(model_dir)
    # data2vec 1.0's learned mask vector is Hugging Face's masked_spec_embed
    mask_emb = weights.get("decoder.mask_emb", model.masked_spec_embed.detach().clone())
    ours = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    state = hf_audio.audio_to_hf(ours, cfg.model.depth, mask_emb)
    check_complete(state, model.state_dict(), "Hugging Face Data2VecAudioModel")
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out)
    return out


def _export_vision(transformers, model_dir, cfg: Config, encoder: Encoder, out: Path) -> Path:
    from data2vec.convert import hf_vision

    config = transformers.Data2VecVisionConfig(**hf_vision.vision_hf_config(cfg))
    model = transformers.Data2VecVisionModel(config)
    # data2vec 1.0's learned mask vector is Hugging Face's embeddings.mask_token
    default = model.embeddings.mask_token.detach().reshape(-1).clone()
    mask_emb = _saved_weights(model_dir).get("decoder.mask_emb", default)
    ours = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    state = hf_vision.vision_to_hf(ours, cfg.model.depth, mask_emb)
    check_complete(state, model.state_dict(), "Hugging Face Data2VecVisionModel")
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out)
    return out


def _saved_weights(model_dir: str | Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    from data2vec.engine import checkpoint as ckpt

    return load_file(str(ckpt.resolve_model_dir(model_dir) / ckpt.MODEL_FILE))


def import_hf(path: str | Path) -> tuple[Config, Encoder]:
    """A Hugging Face ``Data2VecTextModel``/``Data2VecAudioModel``/``Data2VecVisionModel``
    folder as our encoder."""
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read a Hugging Face model from {path}: {exc}") from exc
    if config.model_type in ("data2vec-audio", "data2vec-vision"):
        from data2vec.convert import hf_audio, hf_vision

        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if config.model_type == "data2vec-audio":
            cfg, ours = hf_audio.audio_from_hf(config, state)
        else:
            cfg, ours = hf_vision.vision_from_hf(config, state)
        encoder = build_encoder(cfg)
        check_complete(ours, encoder.state_dict(), f"data2vec {cfg.model.modality} encoder")
        encoder.load_state_dict(ours, strict=True)
        return cfg, encoder.eval()
    if config.model_type != "data2vec-text":
        raise UserError(
            f"{path} is a {config.model_type!r} model; importing supports data2vec-text, "
            "data2vec-audio and data2vec-vision"
        )
    if config.hidden_act != "gelu" or config.type_vocab_size != 1:
        raise UserError("only data2vec-text models with GELU and one token type are supported")
    pad = config.pad_token_id
    cfg = load_config(
        "text-v2-base",
        [
            f"model.embed_dim={config.hidden_size}", f"model.depth={config.num_hidden_layers}",
            f"model.num_heads={config.num_attention_heads}",
            f"model.mlp_ratio={config.intermediate_size / config.hidden_size}",
            f"model.norm_eps={config.layer_norm_eps}",
            f"model.encoder_dropout={config.hidden_dropout_prob}",
            f"model.post_mlp_dropout={config.hidden_dropout_prob}",
            f"model.attention_dropout={config.attention_probs_dropout_prob}",
            f"encoder.dropout={config.hidden_dropout_prob}",
            f"encoder.vocab_size={config.vocab_size}", f"encoder.pad_id={pad}",
            f"encoder.max_positions={config.max_position_embeddings - pad - 1}",
            f"data.block_size={config.max_position_embeddings - pad - 1}",
            f"target.top_k={min(12, config.num_hidden_layers)}",
            "decoder.dim=" + str(config.hidden_size),
        ],
    )  # fmt: skip
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state.pop("embeddings.position_ids", None)
    state.pop("embeddings.token_type_ids", None)
    # The pooler (dense + tanh on the first token) is a task head, not part of the encoder.
    for key in [k for k in state if k.startswith("pooler.")]:
        del state[key]
    token_type = state.pop("embeddings.token_type_embeddings.weight")[0]
    ours: dict[str, Tensor] = {}
    for i in range(config.num_hidden_layers):
        for kind in ("weight", "bias"):
            parts = [state.pop(f"encoder.layer.{i}.attention.self.{n}.{kind}") for n in _QKV]
            ours[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    ours |= rename(state, [*_EMBED_MAP, *_BLOCK_MAP])
    # Our embedding has no token type: add type 0 to every position of a real token (padding
    # keeps its row; its output is masked everywhere).
    positions = ours[_EMB + "embed_positions.weight"].clone()
    positions[pad + 1 :] += token_type
    ours[_EMB + "embed_positions.weight"] = positions
    encoder = build_encoder(cfg)
    check_complete(ours, encoder.state_dict(), "data2vec text encoder")
    encoder.load_state_dict(ours, strict=True)
    tokenizer_file = Path(path) / "tokenizer.json"
    if tokenizer_file.is_file():
        from data2vec.data.tokenizer import TextTokenizer

        try:
            encoder.tokenizer = TextTokenizer.load(tokenizer_file)
        except UserError as exc:  # a tokenizer with other special ids: weights still usable
            log.warning("not keeping %s: %s", tokenizer_file, exc)
    return cfg, encoder.eval()
