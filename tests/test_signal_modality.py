"""The N-d signal modality: positions, masks, padding, decoder, config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data2vec.config import load_config
from data2vec.data.signal_pretrain import collate_pretrain_signals, equalize_visible
from data2vec.errors import ConfigError
from data2vec.masking import inverse_block_mask_nd, make_rng
from data2vec.modalities.signal import SignalEncoder, sincos_nd
from data2vec.models.registry import build_encoder, build_model
from data2vec.nn.positions import sincos_1d, sincos_2d

SMALL = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "encoder.prenet_depth=1",
    "mask.clones=2",
    "decoder.dim=16",
    "decoder.groups=4",
    "decoder.layers=2",
    "target.top_k=2",
]


def small(*overrides: str, preset: str = "signal-v2-tiny"):
    return load_config(preset, [*SMALL, *overrides])


def test_sincos_nd__1d_is_the_transformer_table_and_nd_splits_axes() -> None:
    torch.testing.assert_close(sincos_nd(16, (7,)), sincos_1d(16, torch.arange(7)))
    table = sincos_nd(24, (2, 3, 4))
    assert table.shape == (24, 24)
    assert len({tuple(r.tolist()) for r in table}) == 24  # every patch has its own code
    # Row-major, first axis slowest: a shorter first axis is a prefix of the table.
    torch.testing.assert_close(sincos_nd(24, (1, 3, 4)), table[:12])
    assert sincos_2d(16, 3, 5).shape == sincos_nd(16, (3, 5)).shape


@pytest.mark.parametrize("grid", [(40,), (7, 5), (4, 6, 6)])
def test_inverse_block_mask_nd__exact_count_and_deterministic(grid: tuple[int, ...]) -> None:
    L = int(np.prod(grid))
    a = inverse_block_mask_nd(grid, 6, 0.7, make_rng(3, 1), block=2)
    b = inverse_block_mask_nd(grid, 6, 0.7, make_rng(3, 1), block=2)
    c = inverse_block_mask_nd(grid, 6, 0.7, make_rng(3, 2), block=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (6, L)
    assert ((~a).sum(1) == int(L * 0.3)).all()


def test_inverse_block_mask_nd__keeps_blocks_not_scattered_tokens() -> None:
    # With no adjustment noise, kept tokens come in runs of the block size far more often
    # than uniformly random masks would give.
    m = inverse_block_mask_nd((64,), 200, 0.75, make_rng(0), block=4, adjust=0.0)
    visible = ~m
    runs = (visible[:, 1:] & visible[:, :-1]).sum() / visible.sum()
    assert runs > 0.5  # uniform random keeps: ~0.25


def _encoder(*overrides: str) -> SignalEncoder:
    torch.manual_seed(0)
    return build_encoder(small(*overrides)).eval()  # type: ignore[return-value]


def test_padding_invariance__short_series_alone_equals_padded_in_batch() -> None:
    enc = _encoder("encoder.in_chans=3", "encoder.size=[32]", "encoder.fit=crop")
    short, long = torch.randn(1, 3, 10), torch.randn(1, 3, 32)
    x = torch.zeros(2, 3, 32)
    x[0, :, :10], x[1] = short[0], long[0]
    pad = torch.zeros(2, 32, dtype=torch.bool)
    pad[0, 10:] = True
    with torch.no_grad():
        alone = enc(short)  # 10 steps -> 3 patches of 4 (the last zero-filled)
        batch = enc(x, pad)
    assert alone.x.shape[1] == 3 and batch.padding_mask is not None
    assert batch.padding_mask[0].tolist() == [False] * 3 + [True] * 5
    torch.testing.assert_close(batch.x[0, :3], alone.x[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(enc(long).x[0], batch.x[1], atol=1e-5, rtol=1e-5)


def test_decoder__padding_never_reaches_valid_tokens() -> None:
    cfg = small("encoder.in_chans=1", "encoder.size=[8, 8]", "encoder.patch_size=[2, 2]")
    model = build_model(cfg)
    dec = model.decoder.eval()
    x = torch.randn(1, 16, 32)  # grid (4, 4)
    pad = torch.zeros(1, 16, dtype=torch.bool)
    pad[0, 8:] = True  # the last two rows of the grid are padding
    y = x.clone()
    y[0, 8:] = 100.0
    with torch.no_grad():
        a, b = dec(x, padding_mask=pad), dec(y, padding_mask=pad)
    torch.testing.assert_close(a[0, :8], b[0, :8])


def test_collate__pads_first_axis_and_equalizes_visible_counts() -> None:
    rng = make_rng(0)
    short = ("ok", np.ones((2, 6), np.float32), inverse_block_mask_nd((3,), 2, 0.5, rng, 1), 0)
    long = ("ok", np.ones((2, 16), np.float32), inverse_block_mask_nd((8,), 2, 0.5, rng, 1), 1)
    bad = ("skip", "x.npy", "broken")
    batch = collate_pretrain_signals([short, long, bad], patch=2, tokens_per_step=1)
    assert batch.source.shape == (2, 2, 16) and batch.skipped == [("x.npy", "broken")]
    assert batch.padding_mask is not None and batch.padding_mask[0, 6:].all()
    visible = (~batch.mask).sum(1)
    assert (visible == visible[0]).all() and batch.mask.shape == (4, 8)


def test_equalize_visible__hides_when_padding_cannot_make_up() -> None:
    mask = np.array([[False, False, False, True], [False, True, True, True]])
    out = equalize_visible(mask.copy(), np.array([4, 2]))  # row 1: 2 padded tokens
    assert (~out).sum(1).tolist() == [3, 3]
    mask = np.array([[False, False, False, False, True], [False, True, True, True, True]])
    out = equalize_visible(mask.copy(), np.array([5, 4]))  # row 1 can reveal only 1
    assert (~out).sum(1).tolist() == [2, 2]


def test_learned_positions__trainable_and_not_decayed() -> None:
    enc = _encoder("encoder.in_chans=2", "encoder.positions=learned")
    assert isinstance(enc.modality.pos_embed, torch.nn.Parameter)
    assert "pos_embed" in enc.modality.no_weight_decay()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("encoder.patch_size=[4, 4]", "encoder.patch_size"),
        ("encoder.size=[30]", "encoder.size[0]"),
        ("encoder.size=[4, 4, 4, 4]", "encoder.size"),
        ("encoder.in_chans=-1", "encoder.in_chans"),
        ("encoder.fit=stretch", "encoder.fit"),
        ("loss.cls_weight=0.01", "loss.cls_weight"),
        ("encoder.image_size=28", "encoder.image_size"),
    ],
)
def test_config_errors__name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        small(override)


def test_unsupported_mask_kind__names_the_field(tmp_path) -> None:
    from data2vec.data.signal import TsSource
    from data2vec.data.signal_pretrain import PretrainSignals
    from data2vec.data.ts_format import write_ts

    src = TsSource(write_ts(tmp_path / "a.ts", [np.zeros((1, 8))], ["a"]))
    with pytest.raises(ConfigError, match=r"mask\.kind=.beit."):
        PretrainSignals(src, small("mask.kind=beit"))


def test_unresolved_in_chans__is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"encoder\.in_chans=0"):
        build_encoder(small())
