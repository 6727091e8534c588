"""Tests for the fine-tuning model, its batch, layer-wise lr decay and model directories."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from data2vec.errors import UserError
from data2vec.finetune.heads import ClassificationHead, CTCHead
from data2vec.finetune.model import (
    FINETUNE_FILE,
    FineTuneModel,
    SupervisedBatch,
    layer_decay_groups,
    layer_ids,
    load_finetuned,
    save_finetuned,
)
from data2vec.models.encoder import EncoderOutput
from data2vec.models.registry import build_encoder
from tests.conftest import tiny_config


def _image_model(n_classes: int = 3) -> FineTuneModel:
    cfg = tiny_config()  # 1 prenet block + 2 shared blocks, width 32
    encoder = build_encoder(cfg)
    return FineTuneModel(
        encoder, ClassificationHead(encoder.embed_dim, n_classes), "classification"
    )


def _lr_of(groups: list[dict]) -> dict[int, tuple[float, float]]:
    """``id(param) -> (lr, weight_decay)``; every parameter must be in exactly one group."""
    seen: dict[int, tuple[float, float]] = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in seen
            seen[id(p)] = (g["lr"], g["weight_decay"])
    return seen


def test_layer_decay_groups__lr_is_base_times_decay_to_the_depth_from_the_top() -> None:
    model = _image_model()
    base, decay, wd = 1e-3, 0.5, 0.05
    lrs = _lr_of(layer_decay_groups(model, base, wd, decay))
    params = dict(model.named_parameters())
    assert len(lrs) == len(params)
    # L = 3 blocks (prenet block, shared 0, shared 1): head base, shared 1 base·0.5,
    # shared 0 base·0.25, prenet base·0.125, embeddings base·0.0625.
    expected = {
        "head.linear.weight": base,
        "head.norm.weight": base,
        "encoder.blocks.1.attn.qkv.weight": base * 0.5,
        "encoder.blocks.0.mlp.fc1.weight": base * 0.25,
        "encoder.modality.context_encoder.blocks.0.attn.qkv.weight": base * 0.125,
        "encoder.modality.context_encoder.norm.weight": base * 0.0625,
        "encoder.modality.local_encoder.proj.weight": base * 0.0625,
        "encoder.modality.extra_tokens": base * 0.0625,
    }
    for name, lr in expected.items():
        assert name in params, name
        assert lrs[id(params[name])][0] == lr, name
    for name, p in params.items():  # every block parameter sits at its block's depth
        if name.startswith("encoder.blocks.1."):
            assert lrs[id(p)][0] == base * 0.5, name
        if name.startswith("encoder.blocks.0."):
            assert lrs[id(p)][0] == base * 0.25, name


def test_layer_decay_groups__no_weight_decay_on_biases_norms_and_extra_tokens() -> None:
    model = _image_model()
    lrs = _lr_of(layer_decay_groups(model, 1e-3, 0.05, 0.75))
    for name, p in model.named_parameters():
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name.endswith("extra_tokens")
        assert lrs[id(p)][1] == (0.0 if no_decay else 0.05), name


def test_layer_decay_groups__decay_one_is_a_flat_lr() -> None:
    model = _image_model()
    groups = layer_decay_groups(model, 2e-4, 0.0, 1.0)
    assert {g["lr"] for g in groups} == {2e-4}
    assert {g["lr_scale"] for g in groups} == {1.0}


def test_layer_decay_groups__refuses_decay_outside_zero_one() -> None:
    with pytest.raises(ValueError, match="layer decay"):
        layer_decay_groups(_image_model(), 1e-3, 0.0, 0.0)


def test_layer_ids__depth_order_is_prenet_then_shared_blocks() -> None:
    ids, L = layer_ids(_image_model())
    assert L == 3
    assert ids["encoder.modality.local_encoder.proj.bias"] == 0
    assert ids["encoder.modality.context_encoder.blocks.0.attn.qkv.bias"] == 1
    assert ids["encoder.blocks.0.attn.qkv.bias"] == 2
    assert ids["encoder.blocks.1.attn.qkv.bias"] == 3
    assert ids["head.linear.bias"] == 4


class FrameEncoder(nn.Module):
    """Token ids ``(B, T)`` -> embeddings, with one extra token; the padding mask passes through."""

    embed_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, self.embed_dim)

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None):
        x = self.embed(source)
        x = torch.cat([torch.zeros_like(x[:, :1]), x], 1)  # (B, 1 + T, D)
        if padding_mask is not None:
            padding_mask = nn.functional.pad(padding_mask, (1, 0))
        return EncoderOutput(x=x, padding_mask=padding_mask, num_extra_tokens=1)


def test_forward__ctc_returns_frame_logits_and_lengths_from_the_padding_mask() -> None:
    model = FineTuneModel(FrameEncoder(), CTCHead(4, 6), "ctc")
    source = torch.tensor([[1, 2, 3], [4, 1, 0]])
    logits, lengths = model(source, torch.tensor([[False, False, False], [False, False, True]]))
    assert logits.shape == (2, 3, 6)
    assert lengths.tolist() == [3, 2]
    _, lengths = model(source)
    assert lengths.tolist() == [3, 3]


def test_forward__classification_returns_class_logits() -> None:
    model = FineTuneModel(FrameEncoder(), ClassificationHead(4, 2), "classification")
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 2)


def test_frozen_encoder__only_the_head_gets_gradients() -> None:
    model = FineTuneModel(FrameEncoder(), ClassificationHead(4, 2), "classification")
    model.set_encoder_frozen(True)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.encoder.embed.weight.grad is None
    assert model.head.linear.weight.grad is not None
    model.set_encoder_frozen(False)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.encoder.embed.weight.grad is not None


def test_supervised_batch__len_and_to() -> None:
    batch = SupervisedBatch(
        torch.zeros(3, 2), None, torch.tensor([[1, 0], [2, 2], [1, 0]]), torch.tensor([1, 2, 1])
    )
    assert len(batch) == 3
    moved = batch.to(torch.device("cpu"))
    assert moved.padding_mask is None
    assert moved.target_lengths.tolist() == [1, 2, 1]


def test_save_and_load_finetuned__round_trip(tmp_path) -> None:
    model = _image_model(n_classes=2).eval()
    torch.nn.init.normal_(model.head.linear.weight)
    out = save_finetuned(tmp_path / "best", model, tiny_config(), {"classes": ["a", "b"]})
    save_finetuned(tmp_path / "best", model, tiny_config(), {"classes": ["a", "b"]})  # replace
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary leftovers
    info = json.loads((out / FINETUNE_FILE).read_text())
    assert info["task"] == "classification"
    assert info["head"]["n_classes"] == 2
    loaded = load_finetuned(tmp_path)  # a run directory resolves to its best/ model
    assert loaded.classes == ["a", "b"]
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), model(images))


def test_load_finetuned__refuses_a_pretraining_model_dir(tmp_path) -> None:
    with pytest.raises(UserError, match="not a fine-tuned model"):
        load_finetuned(tmp_path)
