"""Image augmentation on PIL images, seeded by a ``numpy.random.Generator``.

Every random draw comes from the ``rng`` passed to ``__call__``, in a fixed order (crop area,
crop aspect ratio, crop position, flip), so the same image and an rng in the same state always
give the same output, whatever the process, worker or thread.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _resample(name: str) -> Image.Resampling:
    if name not in _RESAMPLE:
        raise ValueError(f"unknown interpolation {name!r}; expected one of {sorted(_RESAMPLE)}")
    return _RESAMPLE[name]


def _check_range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(value[0]), float(value[1])
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {value}")
    return lo, hi


def random_resized_crop_params(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Sample a RandomResizedCrop box.

    The area fraction is uniform in ``scale`` and the aspect ratio (w/h) log-uniform in
    ``ratio``; up to 10 draws are tried for a box that fits in the image. If none does, the
    fallback is a centre crop: the whole image when its aspect ratio is within ``ratio``,
    otherwise the largest centred box at the nearest bound of ``ratio``.

    Args:
        width: Image width in px (>= 1).
        height: Image height in px (>= 1).
        rng: Source of all random draws.
        scale: ``(min, max)`` fraction of the image area.
        ratio: ``(min, max)`` aspect ratio w/h.

    Returns:
        ``(left, top, crop_w, crop_h)`` in px, always inside the image.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1 px, got {width}x{height}")
    s_lo, s_hi = _check_range("scale", scale)
    r_lo, r_hi = _check_range("ratio", ratio)
    area = width * height
    log_lo, log_hi = math.log(r_lo), math.log(r_hi)
    for _ in range(10):
        target_area = area * rng.uniform(s_lo, s_hi)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, crop_w, crop_h
    image_ratio = width / height
    if image_ratio < r_lo:  # too tall: full width, height cut to the lowest allowed ratio
        crop_w, crop_h = width, max(1, min(height, round(width / r_lo)))
    elif image_ratio > r_hi:  # too wide: full height, width cut to the highest allowed ratio
        crop_w, crop_h = max(1, min(width, round(height * r_hi))), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def to_array(
    img: Image.Image,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> np.ndarray:
    """An RGB image as a normalized float32 ``(3, H, W)`` array: ``(pixel / 255 - mean) / std``."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    return _normalize_hwc(arr, mean, std)


def _normalize_hwc(
    arr: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> np.ndarray:
    """float32 ``(H, W, 3)`` in 0..255 -> normalized contiguous float32 ``(3, H, W)``."""
    m = np.asarray(mean, dtype=np.float64)
    s = np.asarray(std, dtype=np.float64)
    # One multiply-add per pixel: x/255/s - m/s, constants computed in float64 for accuracy.
    gain = (1.0 / (255.0 * s)).astype(np.float32)
    bias = (-m / s).astype(np.float32)
    out = arr * gain + bias
    return np.ascontiguousarray(out.transpose(2, 0, 1))


class TrainTransform:
    """RandomResizedCrop + horizontal flip + normalization (the data2vec 2.0 image recipe).

    Args:
        size: Output side in px.
        scale: Crop area fraction range.
        ratio: Crop aspect-ratio range (w/h).
        hflip: Probability of a horizontal flip.
        mean: Per-channel mean of pixels scaled to 0..1.
        std: Per-channel standard deviation of pixels scaled to 0..1.
        interpolation: ``"bicubic"`` (default), ``"bilinear"``, ``"nearest"``, ``"lanczos"``,
            ``"box"`` or ``"hamming"``.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        interpolation: str = "bicubic",
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        self.size = int(size)
        self.scale = _check_range("scale", scale)
        self.ratio = _check_range("ratio", ratio)
        self.hflip = float(hflip)
        self.mean = mean
        self.std = std
        self.resample = _resample(interpolation)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """Augment one image.

        Args:
            img: Any PIL image (converted to RGB if needed).
            rng: Source of all random draws; the same state gives the same output.

        Returns:
            float32 ``(3, size, size)``.
        """
        if img.mode != "RGB":
            img = img.convert("RGB")
        left, top, w, h = random_resized_crop_params(
            img.width, img.height, rng, self.scale, self.ratio
        )
        # Crop and resize in one resampling pass: cheaper than crop() then resize().
        out = img.resize((self.size, self.size), self.resample, box=(left, top, left + w, top + h))
        arr = np.asarray(out, dtype=np.float32)  # (size, size, 3)
        # Draw even when hflip is 0 or 1 so the rng stream does not depend on the setting.
        if rng.random() < self.hflip:
            arr = arr[:, ::-1]
        return _normalize_hwc(arr, self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip})"
        )


class EvalTransform:
    """Deterministic resize + centre crop + normalization.

    An image whose shorter side is larger than ``size`` has its shorter side resized to
    ``round(size / resize_ratio)`` (aspect kept) and the centre ``size x size`` cropped; a
    smaller one (e.g. 28x28 Fashion-MNIST) is resized straight to ``(size, size)``.

    Args:
        size: Output side in px.
        mean: Per-channel mean of pixels scaled to 0..1.
        std: Per-channel standard deviation of pixels scaled to 0..1.
        resize_ratio: Crop fraction of the resized shorter side, in (0, 1].
        interpolation: As in :class:`TrainTransform`.
    """

    def __init__(
        self,
        size: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        resize_ratio: float = 0.875,
        interpolation: str = "bicubic",
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 0.0 < resize_ratio <= 1.0:
            raise ValueError(f"resize_ratio must be in (0, 1], got {resize_ratio}")
        self.size = int(size)
        self.mean = mean
        self.std = std
        self.resize_ratio = float(resize_ratio)
        self.resample = _resample(interpolation)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The source box ``(x0, y0, x1, y1)`` that becomes the ``size x size`` output."""
        if min(width, height) <= self.size:
            return 0.0, 0.0, float(width), float(height)
        short = round(self.size / self.resize_ratio)
        if width <= height:
            new_w, new_h = short, round(height * short / width)
        else:
            new_w, new_h = round(width * short / height), short
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        # Cropping the resized image at (left, top) samples exactly the same source points as
        # resizing this box of the original, so resize + crop is done in one pass.
        sx, sy = new_w / width, new_h / height
        return left / sx, top / sy, (left + self.size) / sx, (top + self.size) / sy

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        """Transform one image; ``rng`` is accepted for a uniform interface and not used.

        Returns:
            float32 ``(3, size, size)``.
        """
        if img.mode != "RGB":
            img = img.convert("RGB")
        box = self.crop_box(img.width, img.height)
        out = img.resize((self.size, self.size), self.resample, box=box)
        return _normalize_hwc(np.asarray(out, dtype=np.float32), self.mean, self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, resize_ratio={self.resize_ratio})"
