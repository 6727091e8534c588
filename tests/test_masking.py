import numpy as np
import pytest
import torch

from data2vec.masking import (
    MaskInfo,
    inverse_block_mask,
    make_rng,
    num_visible,
    random_mask,
    select_positions,
)


def _kept_neighbour_rate(mask: np.ndarray, h: int, w: int) -> float:
    """Average number of kept 4-neighbours of kept patches (high for block-shaped keeps)."""
    keep = ~mask.reshape(-1, h, w)
    pad = np.pad(keep, ((0, 0), (1, 1), (1, 1)))
    nbs = pad[:, :-2, 1:-1].astype(int) + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    return float((nbs * keep).sum() / keep.sum())


def test_inverse_block_mask__exact_count_shape_and_semantics():
    m = inverse_block_mask(14, 14, 16, 0.8, make_rng(1), block=3, adjust=0.07)
    assert m.shape == (16, 196) and m.dtype == bool
    # int(196 * 0.2) = 39 visible patches per row, the rest (True) masked: ViT-B's 157.
    assert (m.sum(1) == 196 - 39).all()
    assert num_visible(196, 0.8) == 39


@pytest.mark.parametrize("h,w,ratio", [(7, 7, 0.6), (8, 8, 0.8), (4, 6, 0.5), (14, 14, 0.75)])
def test_inverse_block_mask__exact_count_any_grid(h, w, ratio):
    m = inverse_block_mask(h, w, 32, ratio, make_rng(3))
    assert (m.sum(1) == h * w - int(h * w * (1 - ratio))).all()


def test_inverse_block_mask__deterministic_under_seed():
    a = inverse_block_mask(14, 14, 4, 0.8, make_rng(5, 7, 9))
    b = inverse_block_mask(14, 14, 4, 0.8, make_rng(5, 7, 9))
    c = inverse_block_mask(14, 14, 4, 0.8, make_rng(5, 7, 10))
    assert (a == b).all()
    assert (a != c).any()
    assert (a[0] != a[1]).any()  # each clone row gets its own mask


def test_inverse_block_mask__keeps_blocks_not_scattered_patches():
    blocks = inverse_block_mask(14, 14, 64, 0.8, make_rng(0))
    scattered = random_mask(196, 64, 0.8, make_rng(0))
    # Kept 3x3 squares give kept patches ~2+ kept neighbours; random keeps ~0.8.
    assert _kept_neighbour_rate(blocks, 14, 14) > 1.8
    assert _kept_neighbour_rate(scattered, 14, 14) < 1.2


def test_random_mask__exact_count_and_uniform():
    m = random_mask(49, 2000, 0.48, make_rng(2))
    assert (m.sum(1) == 49 - int(49 * 0.52)).all()
    freq = m.mean(0)  # every position masked about equally often
    assert np.abs(freq - freq.mean()).max() < 0.06


def test_mask_ratio_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="mask ratio"):
        random_mask(10, 1, 1.0, make_rng(0))


def test_mask_info__visible_ids_ascending_and_complementary():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    info = MaskInfo.from_mask(mask)
    assert info.ids_keep.tolist() == [[1, 3], [0, 1]]
    assert info.num_visible == 2


def test_mask_info__masked_positions_ascending_as_boolean_indexing_gives_them():
    mask = torch.from_numpy(random_mask(20, 6, 0.6, make_rng(4)))
    info = MaskInfo.from_mask(mask)
    N, T = mask.shape
    expected = [[t for t in range(T) if mask[n, t]] for n in range(N)]
    assert info.ids_masked.tolist() == expected
    assert info.masked_rows().tolist() == mask.reshape(-1).nonzero().squeeze(1).tolist()
    x = torch.randn(N, T, 3)
    assert torch.equal(select_positions(x, info.masked_rows()), x[mask])
    assert torch.equal(select_positions(x, mask), x[mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_positions__row_indices_give_boolean_indexings_gradient(dtype):
    mask = torch.from_numpy(random_mask(12, 5, 0.5, make_rng(5)))
    rows = MaskInfo.from_mask(mask).masked_rows()
    x = torch.randn(5, 12, 4, dtype=dtype, requires_grad=True)
    g = torch.randn(int(mask.sum()), 4, dtype=dtype)
    (by_mask,) = torch.autograd.grad(select_positions(x, mask), x, g)
    (by_rows,) = torch.autograd.grad(select_positions(x, rows), x, g)
    assert by_rows.dtype == dtype and torch.equal(by_rows, by_mask)
    assert torch.equal(by_rows[~mask], torch.zeros(int((~mask).sum()), 4, dtype=dtype))


def test_mask_info__checks_and_counts_the_mask_before_moving_it():
    # A "meta" tensor has no values: had the rows been counted after the move, reading the
    # count would raise. The positions are listed on the target device.
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    info = MaskInfo.from_mask(mask, "meta")
    assert info.mask.device.type == info.ids_keep.device.type == "meta"
    assert info.ids_keep.shape == info.ids_masked.shape == (2, 2)
    with pytest.raises(ValueError, match="same number"):
        MaskInfo.from_mask(torch.tensor([[True, False], [True, True]]), "meta")


def test_mask_info__rejects_unequal_rows():
    with pytest.raises(ValueError, match="same number"):
        MaskInfo.from_mask(torch.tensor([[True, False, False], [True, True, False]]))
