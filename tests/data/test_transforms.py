"""Augmentation: crop sampling, determinism, normalization, flips and the eval centre crop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from data2vec.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    random_resized_crop_params,
    to_array,
)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _expected(rgb: tuple[int, int, int]) -> np.ndarray:
    """Hand-computed normalization of one pixel, in float64."""
    return np.array([(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize(("width", "height"), [(640, 480), (1000, 10), (7, 300), (1, 1), (28, 28)])
def test_crop_params_inside_image(width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        left, top, w, h = random_resized_crop_params(width, height, rng)
        assert left >= 0 and top >= 0 and w >= 1 and h >= 1
        assert left + w <= width and top + h <= height


def test_crop_params_follow_scale_and_ratio() -> None:
    # On a square image these bounds always fit, so no draw can fall back to the centre crop.
    side, scale, ratio = 1000, (0.08, 0.5), (3 / 4, 4 / 3)
    rng = np.random.default_rng(1)
    areas, ratios = [], []
    for _ in range(2000):
        _, _, w, h = random_resized_crop_params(side, side, rng, scale, ratio)
        areas.append(w * h / side**2)
        ratios.append(w / h)
    # Tolerances cover rounding w and h to whole pixels.
    assert scale[0] * 0.99 <= min(areas) and max(areas) <= scale[1] * 1.01
    assert ratio[0] * 0.99 <= min(ratios) and max(ratios) <= ratio[1] * 1.01
    # Uniform in area: both ends of the range are reached, the mean is mid-range.
    assert min(areas) < 0.1 and max(areas) > 0.48
    assert abs(np.mean(areas) - 0.29) < 0.02
    # Log-uniform in ratio: log-ratios are centred on 0.
    assert abs(np.mean(np.log(ratios))) < 0.02


def test_crop_params_fallback_is_centre_crop() -> None:
    rng = np.random.default_rng(0)
    # Full area at a ratio of at least 2 never fits a square: fall back to the lowest ratio.
    assert random_resized_crop_params(100, 100, rng, (1.0, 1.0), (2.0, 3.0)) == (0, 25, 100, 50)
    # An area fraction of 5 never fits; the image's own ratio (1.5) is in range: whole image.
    assert random_resized_crop_params(30, 20, rng, (5.0, 5.0), (1.0, 2.0)) == (0, 0, 30, 20)
    # Too wide for the range: full height, width cut to the highest ratio, centred.
    assert random_resized_crop_params(400, 100, rng, (5.0, 5.0), (0.5, 2.0)) == (100, 0, 200, 100)


def test_crop_params_reject_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop_params(10, 10, rng, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="at least 1x1"):
        random_resized_crop_params(0, 10, rng)


def test_train_transform_shape_and_determinism() -> None:
    img = _noise(96, 64)
    t = TrainTransform(32)
    a = t(img, np.random.default_rng(7))
    assert a.shape == (3, 32, 32) and a.dtype == np.float32 and a.flags.c_contiguous
    np.testing.assert_array_equal(a, t(img, np.random.default_rng(7)))
    assert not np.array_equal(a, t(img, np.random.default_rng(8)))


def test_normalization_matches_hand_computation() -> None:
    colour = (255, 0, 128)
    img = Image.new("RGB", (50, 40), colour)
    want = _expected(colour)
    np.testing.assert_allclose(want[0], (1 - 0.485) / 0.229)
    out = TrainTransform(16)(img, np.random.default_rng(0))
    for c in range(3):
        np.testing.assert_allclose(out[c], want[c], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_array(img)[:, 0, 0], want, rtol=1e-6, atol=1e-6)
    custom = to_array(img, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    np.testing.assert_allclose(custom[:, 3, 3], [1.0, 0.0, 128 / 255], rtol=1e-6)


def test_hflip_flips_left_and_right() -> None:
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, 16:] = 255  # black left half, white right half
    img = Image.fromarray(arr)
    kwargs = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "interpolation": "nearest"}
    plain = TrainTransform(32, hflip=0.0, **kwargs)(img, np.random.default_rng(3))
    flipped = TrainTransform(32, hflip=1.0, **kwargs)(img, np.random.default_rng(3))
    assert plain[0, 0, 0] < 0 < plain[0, 0, -1]  # left dark, right bright
    assert flipped[0, 0, 0] > 0 > flipped[0, 0, -1]
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


def test_hflip_probability_is_roughly_respected() -> None:
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:, 4:] = 255
    img = Image.fromarray(arr)
    t = TrainTransform(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5, interpolation="nearest")
    rng = np.random.default_rng(0)
    flips = sum(t(img, rng)[0, 0, 0] > 0 for _ in range(400))
    assert 150 < flips < 250


def test_eval_transform_centre_crops_non_square() -> None:
    # Three vertical bands; the centre crop of the resized image only sees the green one.
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:200] = (0, 255, 0)
    arr[:, 200:] = (0, 0, 255)
    t = EvalTransform(64)
    out = t(Image.fromarray(arr))
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    want = _expected((0, 255, 0))
    for c in range(3):
        np.testing.assert_allclose(out[c], want[c], atol=1e-5)
    # Shorter side 100 -> round(64 / 0.875) = 73, longer 219; crop 64 from (77, 4).
    box = t.crop_box(300, 100)
    np.testing.assert_allclose(box, (77 * 300 / 219, 4 * 100 / 73, 141 * 300 / 219, 68 * 100 / 73))


def test_eval_transform_small_image_resized_directly() -> None:
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:, 10:] = 255  # black left half, white right half, 2:1 aspect
    t = EvalTransform(32, interpolation="nearest")
    assert t.crop_box(20, 10) == (0.0, 0.0, 20.0, 10.0)
    out = t(Image.fromarray(arr))
    assert out.shape == (3, 32, 32)
    # Squashed, not cropped: the left 16 columns are black, the right 16 white.
    black, white = _expected((0, 0, 0)), _expected((255, 255, 255))
    np.testing.assert_allclose(
        out[:, :, :16], np.tile(black[:, None, None], (1, 32, 16)), atol=1e-5
    )
    np.testing.assert_allclose(
        out[:, :, 16:], np.tile(white[:, None, None], (1, 32, 16)), atol=1e-5
    )


def test_eval_transform_is_deterministic_and_converts_modes() -> None:
    t = EvalTransform(24)
    img = _noise(50, 40)
    np.testing.assert_array_equal(t(img), t(img, np.random.default_rng(1)))
    gray = Image.new("L", (30, 30), 200)
    np.testing.assert_allclose(t(gray)[:, 5, 5], _expected((200, 200, 200)), atol=1e-5)


def test_transform_argument_errors() -> None:
    with pytest.raises(ValueError, match="interpolation 'cubic'"):
        TrainTransform(8, interpolation="cubic")
    with pytest.raises(ValueError, match="hflip"):
        TrainTransform(8, hflip=1.5)
    with pytest.raises(ValueError, match="resize_ratio"):
        EvalTransform(8, resize_ratio=1.2)
    assert math.isclose(IMAGENET_STD[2], 0.225)
