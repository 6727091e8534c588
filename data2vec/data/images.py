"""Random-access image sources: class folders, flat folders, manifests and IDX files.

Every source gives ``len``, ``name(i)``, ``label(i)``, ``labels()``, ``classes`` and
``load(i) -> PIL.Image`` in mode ``"RGB"``. An unusable file makes ``load`` raise
:class:`~data2vec.data.skips.SkipError` with the reason, so the caller can record it and go on.
"""

from __future__ import annotations

import gzip
import logging
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from data2vec.data.files import class_folder_files
from data2vec.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx
from data2vec.data.skips import SkipError, SkipLog
from data2vec.errors import DataError, DataNotFoundError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
"""File extensions (lower case) that :class:`ImageFolder` takes as images."""

DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
"""Pixel limit above which a file is taken for a decompression bomb (PIL's default, ~89.5M)."""

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ACCEPTED_LAYOUTS = (
    "fashion-mnist:train | fashion-mnist:test, a directory of images (flat, or one sub-folder "
    "per class), a .txt/.tsv manifest (one path[<TAB>label] per line), or an IDX images file "
    "(*-images-idx3-ubyte[.gz])"
)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to ``"RGB"``.

    Transparent pixels are composited onto white (a plain ``convert`` would make them black,
    which is not what the image shows in a viewer). 16/32-bit integer images are scaled from the
    16-bit range, float images by their own min/max, since a plain ``convert`` clips them at 255.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")  # palette / tRNS transparency becomes a real alpha channel
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I"):  # "I", "I;16", "I;16B", ... : assume the 16-bit range
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr, 0, 65535) / 257.0
        return Image.fromarray(np.round(arr).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (np.nan_to_num(arr, nan=lo) - lo) * (255.0 / max(hi - lo, 1e-12))
        return Image.fromarray(np.round(arr).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def check_size(
    width: int, height: int, min_size: int | None = None, max_pixels: int | None = None
) -> None:
    """Raise :class:`SkipError` for a zero side, a side under ``min_size`` or too many pixels."""
    if width <= 0 or height <= 0:
        raise SkipError(f"image has a zero side: {width}x{height} px")
    if min_size is not None and min(width, height) < min_size:
        raise SkipError(f"image too small: {width}x{height} px, min_size is {min_size} px")
    if max_pixels is not None and width * height > max_pixels:
        raise SkipError(
            f"decompression bomb: {width}x{height} = {width * height} px exceeds the limit of "
            f"{max_pixels} px"
        )


def load_image_file(
    path: str | Path, min_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open, fully decode and convert one image file to RGB.

    Args:
        path: The image file.
        min_size: Skip images whose shorter side is below this many px (``None``: no minimum).
        max_pixels: Skip images with more pixels than this before decoding them (``None``: only
            PIL's global ``Image.MAX_IMAGE_PIXELS`` check applies, which raises at twice its
            value).

    Returns:
        A decoded ``"RGB"`` image.

    Raises:
        SkipError: Missing, unreadable, empty, not an image, truncated/corrupt, too large or too
            small; the message is the reason.
    """
    path = Path(path)
    try:
        nbytes = path.stat().st_size
    except OSError as e:
        raise SkipError(f"unreadable file: {e.strerror or e}") from None
    if nbytes == 0:
        raise SkipError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces PIL's warning (which only prints).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                check_size(img.width, img.height, min_size, max_pixels)
                img.load()  # decode now, so a truncated file fails here and not in a transform
                # Leaving the block closes only the file; the decoded pixels stay usable.
                return to_rgb(img)
    except SkipError:
        raise
    except Image.DecompressionBombError as e:
        raise SkipError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise SkipError("not an image: PIL cannot identify the file format") from None
    except PermissionError as e:
        raise SkipError(f"unreadable file: {e.strerror or e}") from None
    except Exception as e:
        # PIL's decoders raise many types for malformed files (OSError "image file is truncated",
        # SyntaxError, ValueError, struct.error, EOFError, ...): one bad file must not stop a run.
        raise SkipError(f"truncated or corrupt image: {type(e).__name__}: {e}") from None


class ImageSource:
    """Random access to a labelled or unlabelled set of images.

    Subclasses set ``classes`` (empty when unlabelled) and implement ``__len__``, ``name``,
    ``labels`` and ``load``.
    """

    classes: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, i: int) -> str:
        """A human-readable identity of image ``i`` (its file path, or ``"<idx file>#i"``)."""
        raise NotImplementedError

    def labels(self) -> np.ndarray:
        """All labels at once, int64 ``(N,)``; ``-1`` for unlabelled images."""
        raise NotImplementedError

    def label(self, i: int) -> int:
        """The class index of image ``i``, ``-1`` when unlabelled."""
        return int(self.labels()[i])

    def load(self, i: int) -> Image.Image:
        """Image ``i`` decoded, in mode ``"RGB"``; raises :class:`SkipError` if unusable."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {len(self.classes)} classes)"


class _FileListSource(ImageSource):
    """An image source backed by a list of files with labels."""

    def __init__(
        self,
        paths: list[Path],
        labels: np.ndarray,
        classes: list[str],
        min_size: int | None,
        max_pixels: int | None,
    ) -> None:
        self.paths = paths
        self._labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self.min_size = min_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return str(self.paths[i])

    def labels(self) -> np.ndarray:
        return self._labels

    def load(self, i: int) -> Image.Image:
        return load_image_file(self.paths[i], self.min_size, self.max_pixels)


class ImageFolder(_FileListSource):
    """``root/<class>/**/<image>`` (labels = sorted class-folder names) or a flat folder.

    A folder with sub-folders is read as one class per sub-folder (files directly in ``root``
    are then skipped); a folder with only files is unlabelled. Files whose extension is not in
    :data:`IMAGE_EXTENSIONS` are recorded in ``skips``; hidden files and folders are ignored.
    Order: class by class, files sorted by relative path, so it is deterministic.
    """

    def __init__(
        self,
        root: str | Path,
        skips: SkipLog | None = None,
        *,
        min_size: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"image folder not found or not a directory: {self.root}")
        paths, labels, classes = class_folder_files(
            self.root, IMAGE_EXTENSIONS, "image", "images", skips
        )
        super().__init__(paths, np.array(labels), classes, min_size, max_pixels)


def _parse_manifest(path: Path) -> tuple[list[Path], list[str | None]]:
    """The ``(paths, raw labels)`` of a manifest file, relative paths resolved."""
    paths: list[Path] = []
    raw: list[str | None] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) > 2 or not fields[0].strip():
                raise DataError(
                    f"{path}:{lineno}: expected 'path' or 'path<TAB>label', got {line!r}"
                )
            image = Path(fields[0].strip()).expanduser()
            paths.append(image if image.is_absolute() else path.parent / image)
            raw.append(fields[1].strip() if len(fields) == 2 else None)
    return paths, raw


def _manifest_labels(path: Path, raw: list[str | None]) -> tuple[np.ndarray, list[str]]:
    """Labels from a manifest's label column: all integers -> used as is, else class names."""
    given = [r for r in raw if r is not None]
    if not given:
        return np.full(len(raw), -1, dtype=np.int64), []
    if len(given) != len(raw):
        raise DataError(
            f"{path}: {len(raw) - len(given)} of {len(raw)} lines have no label; "
            "label every line or none"
        )
    if all(re.fullmatch(r"-?\d+", r) for r in given):
        ints = np.array([int(r) for r in given], dtype=np.int64)
        if ints.min() < 0:
            raise DataError(f"{path}: negative label {ints.min()}; labels must be >= 0")
        return ints, [str(i) for i in range(int(ints.max()) + 1)]
    classes = sorted(set(given))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[r] for r in given], dtype=np.int64), classes


class ImageManifest(_FileListSource):
    """A text file listing one image per line: ``path`` or ``path<TAB>label``.

    Relative paths are relative to the manifest's folder; blank lines and ``#`` comments are
    ignored. Labels are integers (used as is; classes ``"0".."max"``) or class names (indexed in
    sorted order). Listed files are not filtered by extension or checked for existence here: a
    missing or bad file raises :class:`SkipError` on ``load``.
    """

    def __init__(
        self,
        path: str | Path,
        skips: SkipLog | None = None,
        *,
        min_size: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataNotFoundError(f"image manifest not found: {self.path}")
        self.skips = skips  # kept for symmetry with ImageFolder: nothing is skipped at parse time
        paths, raw = _parse_manifest(self.path)
        if not paths:
            raise DataError(f"image manifest {self.path} lists no images")
        labels, classes = _manifest_labels(self.path, raw)
        super().__init__(paths, labels, classes, min_size, max_pixels)


class IdxImages(ImageSource):
    """Images held in memory from an IDX file (MNIST-style uint8 ``(N, H, W)``).

    Attributes:
        array: The raw uint8 ``(N, H, W)`` images, for fast paths that avoid PIL.
    """

    def __init__(
        self,
        images_path: str | Path,
        labels_path: str | Path | None = None,
        *,
        classes: list[str] | None = None,
        min_size: int | None = None,
    ) -> None:
        self.images_path = Path(images_path)
        self.array = read_idx(self.images_path)
        if self.array.ndim != 3 or self.array.dtype != np.uint8:
            raise DataError(
                f"{self.images_path}: expected uint8 images of shape (N, H, W), got "
                f"{self.array.dtype} {self.array.shape}"
            )
        n = len(self.array)
        if labels_path is None:
            self._labels = np.full(n, -1, dtype=np.int64)
            self.classes = []
        else:
            self._labels = read_idx(labels_path).astype(np.int64)
            if self._labels.shape != (n,):
                raise DataError(
                    f"{labels_path}: expected {n} labels for {self.images_path}, got shape "
                    f"{self._labels.shape}"
                )
            self.classes = classes if classes is not None else self._guess_classes()
        self.min_size = min_size

    def _guess_classes(self) -> list[str]:
        # MNIST digits share Fashion-MNIST's shapes and file names, so only a folder named
        # like Fashion-MNIST gives the clothing class names; anything else gets "0".."max".
        fashion = (
            self.array.shape[1:] == (28, 28)
            and set(np.unique(self._labels).tolist()) == set(range(10))
            and "fashion" in str(self.images_path.resolve()).lower()
        )
        if fashion:
            return list(FASHION_MNIST_CLASSES)
        return [str(i) for i in range(int(self._labels.max(initial=-1)) + 1)]

    def __len__(self) -> int:
        return len(self.array)

    def name(self, i: int) -> str:
        return f"{self.images_path}#{i}"

    def labels(self) -> np.ndarray:
        return self._labels

    def load(self, i: int) -> Image.Image:
        height, width = self.array.shape[1:]
        check_size(width, height, self.min_size)
        return Image.fromarray(self.array[i]).convert("RGB")


def _looks_like_idx_images(path: Path) -> bool:
    """Whether ``path`` is named like an IDX file or starts with a 3-dim IDX header."""
    if re.search(r"idx\d-ubyte", path.name):
        return True
    try:
        with path.open("rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            magic = f.read(4)
    except (OSError, EOFError):
        return False
    return len(magic) == 4 and magic[:2] == b"\0\0" and magic[3] == 3


def _open_fashion_mnist(split: str) -> IdxImages:
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise DataError(f"unknown Fashion-MNIST split {split!r}: use fashion-mnist:train or :test")
    images = FASHION_MNIST_DIR / f"{prefixes[split]}-images-idx3-ubyte.gz"
    labels = FASHION_MNIST_DIR / f"{prefixes[split]}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise DataNotFoundError(
            f"Fashion-MNIST not found at {FASHION_MNIST_DIR} (looked for {images.name} and "
            f"{labels.name}); install it with: apt-get install dataset-fashion-mnist"
        )
    return IdxImages(images, labels, classes=list(FASHION_MNIST_CLASSES))


def open_image_source(
    spec: str | Path,
    skips: SkipLog | None = None,
    *,
    min_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> ImageSource:
    """Open an image source from a command-line style spec.

    Args:
        spec: ``"fashion-mnist:train"`` / ``"fashion-mnist:test"``; a directory (see
            :class:`ImageFolder`); a ``.txt``/``.tsv`` manifest (see :class:`ImageManifest`); or
            an IDX images file, whose labels are read from the file of the same name with
            ``images-idx3`` replaced by ``labels-idx1`` when that exists.
        skips: Receives the files that are not taken (folder sources).
        min_size: Minimum shorter side in px; smaller images raise ``SkipError`` on load.
        max_pixels: Decompression-bomb limit for file sources.

    Raises:
        FileNotFoundError: ``spec`` does not exist (or Fashion-MNIST is not installed).
        ValueError: ``spec`` exists but is none of the accepted layouts, or is empty/malformed.
    """
    text = str(spec)
    if text.startswith("fashion-mnist:"):
        source = _open_fashion_mnist(text.split(":", 1)[1])
        source.min_size = min_size
        return source
    path = Path(text).expanduser()
    if not path.exists():
        raise DataNotFoundError(f"image source not found: {path} (accepted: {_ACCEPTED_LAYOUTS})")
    if path.is_dir():
        return ImageFolder(path, skips, min_size=min_size, max_pixels=max_pixels)
    if path.suffix.lower() in {".txt", ".tsv"}:
        return ImageManifest(path, skips, min_size=min_size, max_pixels=max_pixels)
    if _looks_like_idx_images(path):
        labels: Path | None = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
        if labels == path or not labels.is_file():
            log.info("no labels file next to %s: images are unlabelled", path)
            labels = None
        return IdxImages(path, labels, min_size=min_size)
    raise DataError(f"cannot read {path} as an image source (accepted: {_ACCEPTED_LAYOUTS})")
