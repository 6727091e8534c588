"""Hugging Face interop: tiny random models built locally (no downloads), converted both ways,
with outputs compared on padded batches; architectures HF cannot express are refused."""

import json

import pytest
import torch

from data2vec.cli import main
from data2vec.config import load_config
from data2vec.convert.export import export_encoder
from data2vec.evaluate.features import load_encoder
from data2vec.models.registry import build_encoder
from tests.test_text_modality import TINY_TEXT

transformers = pytest.importorskip("transformers")  # the [hf] extra; installed by the test setup


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.tensor([[0, 11, 12, 13, 14, 15, 2, 1, 1], [0, 7, 30, 9, 44, 8, 21, 3, 2]])
    return tokens, tokens.ne(1)


def _hf_model(tmp_path):
    torch.manual_seed(0)
    config = transformers.Data2VecTextConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=18, pad_token_id=1, type_vocab_size=1,
        layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = transformers.Data2VecTextModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # a trained-looking token-type row, folded into positions on import
        model.embeddings.token_type_embeddings.weight.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "hf")
    return model


def test_import_from_hf__same_outputs(tmp_path):
    hf = _hf_model(tmp_path)
    code = main(["convert", "--from", "hf", "--to", "ours", str(tmp_path / "hf"),
                 str(tmp_path / "ours")])  # fmt: skip
    assert code == 0
    _, encoder = load_encoder(tmp_path / "ours")
    tokens, keep = _tokens()
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=keep.long()).last_hidden_state
        ours = encoder(tokens).x
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=1e-5)


def test_export_to_hf__automodel_gives_our_outputs(tmp_path):
    cfg = load_config("text-v2-base", TINY_TEXT)
    torch.manual_seed(1)
    encoder = build_encoder(cfg).eval()
    export_encoder(tmp_path / "ours", cfg, encoder)
    code = main(["convert", "--from", "ours", "--to", "hf", str(tmp_path / "ours"),
                 str(tmp_path / "hf")])  # fmt: skip
    assert code == 0
    hf = transformers.AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf).__name__ == "Data2VecTextModel"
    tokens, keep = _tokens()
    with torch.no_grad():
        ref = encoder(tokens).x
        out = hf(input_ids=tokens, attention_mask=keep.long()).last_hidden_state
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["max_position_embeddings"] == cfg.encoder.max_positions + 2


@pytest.mark.parametrize(("preset", "why"), [("audio-v2-tiny", "ALiBi"), ("image-v2-tiny", "BEiT")])
def test_export_to_hf__refuses_what_hf_cannot_express(tmp_path, capsys, preset, why):
    cfg = load_config(preset)
    export_encoder(tmp_path / "ours", cfg, build_encoder(cfg))
    code = main(["convert", "--from", "ours", "--to", "hf", str(tmp_path / "ours"),
                 str(tmp_path / "hf")])  # fmt: skip
    assert code == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_save_model_then_load_model_round_trip(tmp_path):
    import data2vec

    cfg = load_config("text-v2-base", TINY_TEXT)
    encoder = build_encoder(cfg).eval()
    data2vec.save_model(tmp_path / "m", cfg, encoder)
    cfg2, loaded = data2vec.load_model(tmp_path / "m")
    assert cfg2.to_dict() == cfg.to_dict()
    tokens, _ = _tokens()
    with torch.no_grad():
        assert torch.equal(loaded(tokens).x, encoder(tokens).x)


def _waves() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    wave = torch.randn(2, 6000)
    keep = torch.ones(2, 6000, dtype=torch.long)
    keep[1, 4500:] = 0
    return wave * keep, keep


def test_audio_import_from_hf__same_outputs_on_a_padded_batch(tmp_path):
    torch.manual_seed(0)
    config = transformers.Data2VecAudioConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=3, conv_pos_kernel_size=5,
        num_conv_pos_embedding_groups=4, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
    )  # fmt: skip
    hf = transformers.Data2VecAudioModel(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from", "hf", "--to", "ours", str(tmp_path / "hf"),
                 str(tmp_path / "ours")]) == 0  # fmt: skip
    cfg, encoder = load_encoder(tmp_path / "ours")
    assert cfg.model.algorithm == "v1" and not cfg.encoder.alibi
    wave, keep = _waves()
    with torch.no_grad():
        ref = hf(wave, attention_mask=keep).last_hidden_state
        out = encoder(wave, keep == 0)
    valid = ~out.padding_mask
    torch.testing.assert_close(out.x[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_audio_export_to_hf__automodel_gives_our_outputs(tmp_path):
    overrides = [
        "model.embed_dim=32", "model.depth=2", "model.num_heads=4", "encoder.cnn_channels=16",
        "encoder.pos_conv_groups=4", "model.exact_padding=false", "target.top_k=2",
    ]  # fmt: skip
    cfg = load_config("audio-v1-tiny", overrides)
    torch.manual_seed(1)
    encoder = build_encoder(cfg).eval()
    export_encoder(tmp_path / "ours", cfg, encoder)
    assert main(["convert", "--from", "ours", "--to", "hf", str(tmp_path / "ours"),
                 str(tmp_path / "hf")]) == 0  # fmt: skip
    hf = transformers.AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf).__name__ == "Data2VecAudioModel"
    wave, keep = _waves()
    with torch.no_grad():
        ref = encoder(wave, keep == 0)
        out = hf(wave, attention_mask=keep).last_hidden_state
    valid = ~ref.padding_mask
    torch.testing.assert_close(out[valid], ref.x[valid], atol=1e-4, rtol=1e-4)


TINY_VISION = ["model.embed_dim=32", "model.depth=2", "model.num_heads=4",
               "encoder.image_size=16", "encoder.patch_size=4", "target.top_k=2"]  # fmt: skip


def _randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Give every zero/one-initialized tensor (biases, gammas, bias table) random values."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def test_vision_export_to_hf__automodel_gives_our_outputs(tmp_path):
    cfg = load_config("image-v1-tiny", TINY_VISION)
    torch.manual_seed(4)
    encoder = _randomized(build_encoder(cfg)).eval()
    export_encoder(tmp_path / "ours", cfg, encoder)
    code = main(["convert", "--from", "ours", "--to", "hf", str(tmp_path / "ours"),
                 str(tmp_path / "hf")])  # fmt: skip
    assert code == 0
    hf = transformers.AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf).__name__ == "Data2VecVisionModel"
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = encoder(images).x
        out = hf(pixel_values=images).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["use_shared_relative_position_bias"] and not saved["use_mean_pooling"]


@pytest.mark.parametrize("mean_pooling", [False, True])
def test_vision_import_from_hf__same_outputs(tmp_path, mean_pooling):
    torch.manual_seed(5)
    config = transformers.Data2VecVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=4, use_shared_relative_position_bias=True,
        use_mean_pooling=mean_pooling, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
    )  # fmt: skip
    hf = _randomized(transformers.Data2VecVisionModel(config)).eval()
    hf.save_pretrained(tmp_path / "hf")
    code = main(["convert", "--from", "hf", "--to", "ours", str(tmp_path / "hf"),
                 str(tmp_path / "ours")])  # fmt: skip
    assert code == 0
    cfg, encoder = load_encoder(tmp_path / "ours")
    assert cfg.model.final_norm is not mean_pooling
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = hf(pixel_values=images).last_hidden_state
        ours = encoder(images).x
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_vision_import__refuses_per_layer_position_tables(tmp_path, capsys):
    config = transformers.Data2VecVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=4, use_relative_position_bias=True,
    )  # fmt: skip
    transformers.Data2VecVisionModel(config).save_pretrained(tmp_path / "hf")
    code = main(["convert", "--from", "hf", "--to", "ours", str(tmp_path / "hf"),
                 str(tmp_path / "ours")])  # fmt: skip
    assert code == 2
    assert "per layer" in capsys.readouterr().err


def test_model_directory__versioned_config_json(tmp_path):
    import data2vec

    cfg = load_config("image-v1-tiny", TINY_VISION)
    encoder = build_encoder(cfg).eval()
    data2vec.save_pretrained(tmp_path / "m", cfg, encoder)
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["format"] == "data2vec-model" and doc["format_version"] == 1
    assert (doc["modality"], doc["algorithm"]) == ("image", "v1")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "model.safetensors"]
    cfg2, loaded = data2vec.from_pretrained(tmp_path / "m")
    assert cfg2.to_dict() == cfg.to_dict()
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images).x, encoder(images).x)
    # a newer format, and a Hugging Face config.json, are refused by name
    doc["format_version"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(data2vec.errors.UserError, match="format_version 2"):
        data2vec.load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "data2vec-vision"}))
    with pytest.raises(data2vec.errors.UserError, match="convert --from hf"):
        data2vec.load_model(tmp_path / "m")


def test_a_transformers_that_cannot_use_this_torch_is_named(tmp_path, monkeypatch):
    """transformers 5 under PyTorch < 2.6 keeps its models off: said before any work."""
    from data2vec.convert.hf import import_hf
    from data2vec.errors import UserError

    monkeypatch.setattr(transformers.utils, "is_torch_available", lambda: False)
    with pytest.raises(UserError, match=r"PyTorch 2\.6 or newer.*'transformers>=4\.40,<5'"):
        import_hf(tmp_path)
