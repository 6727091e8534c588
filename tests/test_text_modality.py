"""The text modality: positions, padding invariance, the blocks-only teacher, fairseq parity."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data2vec.config import load_config
from data2vec.convert.fairseq import import_v2, verify_against_fixture
from data2vec.errors import ConfigError
from data2vec.masking import make_rng, random_mask
from data2vec.modalities.text import token_positions
from data2vec.models.registry import build_encoder, build_model
from tests.conftest import FIXTURES

FIXTURE = FIXTURES / "fairseq" / "v2_text_tiny"

TINY_TEXT = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=4", "encoder.vocab_size=50",
    "encoder.max_positions=16", "data.block_size=16", "decoder.dim=32", "decoder.layers=2",
    "decoder.kernel=5", "target.top_k=2", "mask.clones=2",
]  # fmt: skip


def text_config(*extra):
    return load_config("text-v2-base", [*TINY_TEXT, *extra])


def test_token_positions__fairseq_layout_hand_worked():
    pad = 1
    tokens = torch.tensor([[0, 7, 8, 2], [0, 9, 2, pad]])
    # real tokens count from pad + 1; padding points at the (zero) padding row
    assert token_positions(tokens, pad).tolist() == [[2, 3, 4, 5], [2, 3, 4, 1]]


def test_padding__a_padded_sequence_gives_the_features_it_gives_alone():
    enc = build_encoder(text_config()).eval()
    alone = torch.tensor([[0, 11, 12, 13, 14, 2]])
    padded = torch.tensor([[0, 11, 12, 13, 14, 2, 1, 1, 1, 1], [0, *range(20, 28), 2]])
    with torch.no_grad():
        a = enc(alone, keep_layers=True)
        b = enc(padded, keep_layers=True)
    assert b.padding_mask is not None and b.padding_mask[0, 6:].all()
    assert torch.allclose(a.x[0], b.x[0, :6], atol=1e-5)
    for la, lb in zip(a.layer_results, b.layer_results):
        assert torch.allclose(la[0], lb[0, :6], atol=1e-5)


def test_padding__loss_ignores_padded_tokens():
    """With exact padding, changing what sits in padded slots cannot change the loss."""
    model = build_model(text_config()).eval()
    tokens = torch.tensor([[0, *range(5, 12), 2, 1, 1, 1, 1, 1, 1, 1]] * 2)
    tokens[1, :9] = torch.tensor([0, *range(20, 27), 2])
    mask = torch.from_numpy(random_mask(16, 4, 0.48, make_rng(3)))
    torch.manual_seed(0)
    base = model(tokens, mask).loss
    # a different, still-masked-out padding value: the padding mask says these are padding
    pad = tokens.eq(1)
    other = tokens.masked_fill(pad, 30)
    torch.manual_seed(0)
    moved = model(other, mask, padding_mask=pad).loss
    assert torch.allclose(base, moved, rtol=1e-5)


def test_teacher__owns_only_the_blocks_and_reads_student_embeddings():
    model = build_model(text_config()).eval()
    keys = model.teacher.state_dict().keys()
    assert keys and all(k.startswith("blocks.") for k in keys)
    tokens = torch.randint(5, 50, (2, 16))
    local, pad = model.encoder.modality.embed(tokens)
    t1 = model.forward_targets(tokens, None, local, pad)
    # the teacher's input is the student's embedding: changing the student's token table
    # changes the targets, though the teacher itself is untouched
    with torch.no_grad():
        model.encoder.modality.local_encoder.embed_tokens.weight.mul_(2.0)
    local2, _ = model.encoder.modality.embed(tokens)
    t2 = model.forward_targets(tokens, None, local2, pad)
    assert not torch.allclose(t1, t2)
    # and the targets are the teacher blocks run on the unmasked embeddings
    ctx = model.encoder.modality.contextualize(local2, pad)
    out = model.teacher.model.forward_blocks(ctx, keep_layers=True)
    normed = [F.instance_norm(r.transpose(1, 2)).transpose(1, 2) for r in out.layer_results]
    ref = torch.stack(normed).mean(0)
    assert torch.allclose(t2, ref, atol=1e-5)


def test_student__drops_masked_tokens_keeping_the_exact_count():
    model = build_model(text_config()).eval()
    tokens = torch.randint(5, 50, (3, 16))
    mask = torch.from_numpy(
        np.concatenate([random_mask(16, 2, 0.48, make_rng(7, i)) for i in range(3)])
    )
    local, pad = model.encoder.modality.embed(tokens)
    from data2vec.masking import MaskInfo

    out = model.forward_student(local, pad, MaskInfo.from_mask(mask))
    assert out.x.shape == (6, int(16 * (1 - 0.48)), 32)


def test_bad_tokens_and_lengths_are_refused():
    enc = build_encoder(text_config())
    with pytest.raises(ValueError, match="vocab_size"):
        enc(torch.tensor([[0, 50, 2]]))
    with pytest.raises(ValueError, match="max_positions"):
        enc(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ConfigError, match="block_size"):
        text_config("data.block_size=32")


def test_parity__fairseq_v2_text_fixture():
    cfg, model = import_v2(f"{FIXTURE}.pt")
    assert cfg.model.modality == "text" and cfg.ema.scope == "blocks"
    assert cfg.encoder.vocab_size == 100 and cfg.encoder.max_positions == 32
    report = verify_against_fixture(model, f"{FIXTURE}.npz")
    assert report["ok"], report
    assert report["diffs"]["loss_relative"] < 1e-5
    # the teacher's targets, from the stored teacher layer results, at the stored mask
    z = np.load(f"{FIXTURE}.npz")
    tokens = torch.from_numpy(z["input"])
    with torch.no_grad():
        local, pad = model.encoder.modality.embed(tokens)
        targets = model.forward_targets(tokens, None, local, pad)
    mask = torch.from_numpy(z["mask"])
    rows, cols = mask.nonzero(as_tuple=True)
    ours = targets[rows // cfg.mask.clones, cols]
    assert torch.allclose(ours, torch.from_numpy(z["targets"]), atol=1e-4)
