"""data2vec 1.0 (speech): fairseq parity, span masking, the loss's support, the teacher's
copied positional convolution, and a short training run through the engine."""

import numpy as np
import pytest
import torch

from data2vec.config import load_config
from data2vec.convert.fairseq import import_fairseq, verify_against_fixture
from data2vec.engine.trainer import pretrain
from data2vec.masking import make_rng, span_mask
from data2vec.models.data2vec1 import Data2Vec1
from data2vec.models.registry import build_model
from data2vec.targets import build_targets, regression_loss
from tests.conftest import TINY_AUDIO, make_audio_folder

FIXTURE = "tests/fixtures/fairseq/v1_audio_tiny"
TINY_V1 = [o for o in TINY_AUDIO if not o.startswith("mask.")] + ["mask.clones=1"]


def test_parity__fairseq_v1_audio_fixture():
    cfg, model = import_fairseq(f"{FIXTURE}.pt")
    assert isinstance(model, Data2Vec1) and cfg.model.algorithm == "v1"
    report = verify_against_fixture(model, f"{FIXTURE}.npz")
    assert report["ok"], report
    assert report["diffs"]["loss_relative"] < 1e-5
    z = np.load(f"{FIXTURE}.npz")
    x, pad = torch.from_numpy(z["input"]), torch.from_numpy(z["padding_mask"])
    mask = torch.from_numpy(z["mask"])
    with torch.no_grad():
        local, fpad = model.encoder.modality.embed(x, pad)
        assert torch.equal(fpad, torch.from_numpy(z["features_padding_mask"]))
        torch.testing.assert_close(local, torch.from_numpy(z["local_features"]), atol=1e-5, rtol=0)
        targets = model.forward_targets(x, pad, local, fpad)
        pred = model.decoder.final_proj(model.forward_student(x, local, fpad, mask)[mask])
    torch.testing.assert_close(targets[mask], torch.from_numpy(z["targets"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(pred, torch.from_numpy(z["pred"]), atol=1e-4, rtol=0)


def test_span_mask__statistics_and_determinism():
    a = span_mask(2000, 50, 0.65, make_rng(1), span=10)
    assert abs(a.mean() - (1 - np.exp(-0.65))) < 0.02  # overlapping spans of 10
    assert np.array_equal(a, span_mask(2000, 50, 0.65, make_rng(1), span=10))
    assert not np.array_equal(a, span_mask(2000, 50, 0.65, make_rng(2), span=10))
    for row in a[:10]:  # masked runs are whole spans (>= 10) except where cut at the end
        edges = np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0]))
        runs = edges[1::2] - edges[0::2]
        ends = edges[1::2]
        assert all(r >= 10 or e == len(row) for r, e in zip(runs, ends))
    short = span_mask(12, 4, 0.65, make_rng(3), span=10)
    assert short.any(axis=1).all()  # at least one span per row, even on short inputs


def test_loss__only_masked_valid_frames_count():
    cfg = load_config("audio-v1-tiny", [*TINY_V1, "model.exact_padding=true"])
    model = build_model(cfg).eval()
    wave = torch.randn(2, 8000)
    pad = torch.zeros(2, 8000, dtype=torch.bool)
    pad[1, 5000:] = True
    with torch.no_grad():
        local, fpad = model.encoder.modality.embed(wave, pad)
        T = local.shape[1]
        mask = torch.from_numpy(span_mask(T, 2, 0.65, make_rng(0), span=5))
        mask[1, -3:] = True  # masked padding must not count
        out = model(wave, mask, pad)
        targets = model.forward_targets(wave, pad, local, fpad)
        x = model.forward_student(wave, local, fpad, mask)
    keep = mask & ~fpad
    pred = model.decoder.final_proj(x[keep])
    expected = regression_loss(pred, targets[keep], 0.0, None) / keep.sum()
    torch.testing.assert_close(out.loss, expected)
    assert out.sample_size == int(keep.sum()) < int(mask.sum())


def test_teacher__copies_the_positional_convolution_and_averages_the_rest():
    model = build_model(load_config("audio-v1-tiny", TINY_V1))
    keys = model.teacher.state_dict().keys()
    assert not any(k.startswith("modality.local_encoder") for k in keys)  # CNN stays shared
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.update_teacher(1)
    t = dict(model.teacher.model.named_parameters())
    s = dict(model.encoder.named_parameters())
    conv = "modality.pos_conv.layers.0.weight"
    assert torch.equal(t[conv], s[conv])
    assert not torch.allclose(t["blocks.0.attn.qkv.weight"], s["blocks.0.attn.qkv.weight"])


def test_short_v1_run__loss_falls(tmp_path):
    data = make_audio_folder(tmp_path / "audio", n_per_class=6)
    cfg = load_config("audio-v1-tiny", [*TINY_V1, "train.max_steps=25", "optim.lr=3e-3"])
    result = pretrain(cfg, data, tmp_path / "run")
    assert result.steps == 25
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


TEXT_FIXTURE = "tests/fixtures/fairseq/v1_text_tiny"


def test_parity__fairseq_v1_text_fixture():
    cfg, model = import_fairseq(f"{TEXT_FIXTURE}.pt")
    assert cfg.model.modality == "text" and cfg.model.algorithm == "v1"
    assert cfg.loss.beta == 4.0 and cfg.target.layer_norm == "layer"
    report = verify_against_fixture(model, f"{TEXT_FIXTURE}.npz")
    assert report["ok"], report
    assert report["diffs"]["loss_relative"] < 1e-5
    z = np.load(f"{TEXT_FIXTURE}.npz")
    tokens, mask = torch.from_numpy(z["input"]), torch.from_numpy(z["mask"])
    # the student's input is the fixture's masked input: <mask> (the last id) where masked
    assert torch.equal(
        tokens.masked_fill(mask, cfg.encoder.mask_id), torch.from_numpy(z["masked_input"])
    )
    with torch.no_grad():
        local, pad = model.encoder.modality.embed(tokens)
        emb = torch.from_numpy(z["embedding_output"])
        torch.testing.assert_close(local, emb, atol=1e-5, rtol=0)
        targets = model.forward_targets(tokens, None, local, pad)
        corrupted = tokens.masked_fill(mask, cfg.encoder.mask_id)
        pred = model.decoder.final_proj(model.forward_student(corrupted, local, pad, mask)[mask])
    torch.testing.assert_close(targets[mask], torch.from_numpy(z["targets"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(pred, torch.from_numpy(z["pred"]), atol=1e-4, rtol=0)


def test_text_teacher__copies_the_embeddings_and_averages_the_blocks():
    from tests.test_text_modality import TINY_TEXT

    cfg = load_config("text-v1-base", [*TINY_TEXT, "mask.clones=1"])
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.update_teacher(1)
    t = dict(model.teacher.model.named_parameters())
    s = dict(model.encoder.named_parameters())
    emb = "modality.local_encoder.embed_tokens.weight"
    assert torch.equal(t[emb], s[emb])
    assert not torch.allclose(t["blocks.0.attn.qkv.weight"], s["blocks.0.attn.qkv.weight"])


def test_short_v1_text_run__loss_falls_and_masks_are_spans(tmp_path):
    from tests.test_text_pipeline import TINY_TEXT, text_corpus

    corpus = text_corpus(tmp_path)
    cfg = load_config("text-v1-tiny", [*TINY_TEXT, "mask.clones=1", "train.max_steps=30",
                                        "optim.lr=3e-3"])  # fmt: skip
    result = pretrain(cfg, corpus, tmp_path / "run")
    assert result.steps == 30
    import json

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # span starts with probability 0.35 over spans of 4: ~1 - exp(-0.35) = 30 % of real tokens
    fractions = [r["masked_fraction"] for r in records]
    assert 0.15 < np.mean(fractions) < 0.4


def test_bert_corruption__80_10_10_and_the_loss_counts_only_mask_tokens():
    from tests.test_text_modality import TINY_TEXT

    bert = ["mask.kind=span", "mask.block=1", "mask.ratio=0.15", "mask.random_token=0.1",
            "mask.leave_unmasked=0.1", "mask.clones=1"]  # fmt: skip
    model = build_model(load_config("text-v1-base", [*TINY_TEXT, *bert])).eval()
    torch.manual_seed(0)
    tokens = torch.randint(5, 50, (64, 16))
    selected = torch.rand(64, 16) < 0.5
    out, loss_at = model.text_corruption(tokens, selected)
    n = int(selected.sum())
    is_mask = out.eq(model.mask_id)
    assert torch.equal(loss_at, selected & is_mask)  # the loss positions are the <mask> ones
    assert abs(int(is_mask.sum()) / n - 0.8) < 0.05
    changed = selected & ~is_mask & out.ne(tokens)
    assert 0.05 < int(changed.sum()) / n < 0.15  # ~10 % random (a few coincide with the original)
    assert bool((out[changed] >= 5).all()) and bool((out[changed] < 50).all())
    assert torch.equal(out[~selected], tokens[~selected])  # unselected tokens untouched
    with torch.no_grad():
        result = model(tokens, selected)
    assert 0.7 * n < result.sample_size < 0.9 * n


def test_bert_settings_are_validated():
    import pytest

    from data2vec.errors import ConfigError

    with pytest.raises(ConfigError, match="random_token"):
        load_config("text-v1-base", ["mask.random_token=0.6", "mask.leave_unmasked=0.5"])


def _targets_from_all_layers(model, source, source_pad, local, pad):
    """The targets as computed before streaming: every layer kept, then ``build_targets``."""
    teacher, tcfg = model.teacher.model, model.target_cfg
    if model.scope == "all":
        ctx = teacher.modality.contextualize(*teacher.modality.embed(source, source_pad))
    else:
        ctx = teacher.modality.contextualize(local, pad)
    out = teacher.forward_blocks(ctx, keep_layers=True)
    layers = out.layer_outputs if tcfg.source == "block" else out.layer_results
    E = out.num_extra_tokens
    return build_targets(
        [layer[:, E:] for layer in layers], tcfg.top_k, tcfg.layer_norm, tcfg.final_norm,
        padding_mask=pad if model.exact_padding else None,
    )  # fmt: skip


@pytest.mark.parametrize("modality", ["audio", "text", "image"])
def test_forward_targets__streamed_top_k_equals_all_layers_kept(modality):
    from tests.test_data2vec1_vision import TINY_V1 as TINY_IMAGE_V1
    from tests.test_text_modality import TINY_TEXT

    torch.manual_seed(0)
    DEEPER = ["model.depth=3", "target.top_k=2"]
    if modality == "audio":
        cfg = load_config("audio-v1-tiny", [*TINY_V1, *DEEPER, "model.exact_padding=true"])
        source = torch.randn(2, 8000)
        source_pad = torch.zeros(2, 8000, dtype=torch.bool)
        source_pad[1, 5000:] = True
    elif modality == "text":
        cfg = load_config("text-v1-base", [*TINY_TEXT, *DEEPER, "mask.clones=1"])
        source, source_pad = torch.randint(5, 50, (2, 12)), None
    else:
        cfg = load_config("image-v1-tiny", TINY_IMAGE_V1)
        source, source_pad = torch.randn(2, 3, 16, 16), None
    model = build_model(cfg).eval()
    assert model.target_cfg.top_k < len(model.teacher.model.blocks)  # a real top-K selection
    with torch.no_grad():
        local, pad = model.encoder.modality.embed(source, source_pad)
        streamed = model.forward_targets(source, source_pad, local, pad)
        reference = _targets_from_all_layers(model, source, source_pad, local, pad)
    assert torch.equal(streamed, reference)
