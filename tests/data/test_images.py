"""Image sources: folder layouts, manifests, IDX files, RGB conversion and skipped files."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data2vec.data import images as images_mod
from data2vec.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, write_idx
from data2vec.data.images import (
    IdxImages,
    ImageFolder,
    ImageManifest,
    check_size,
    load_image_file,
    open_image_source,
    to_rgb,
)
from data2vec.data.skips import SkipError, SkipLog


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``root/{cat,dog}/...`` with images of many modes and some bad files."""
    root = tmp_path / "root"
    cat, dog = root / "cat", root / "dog"
    (cat / "sub").mkdir(parents=True)
    dog.mkdir()
    Image.new("L", (10, 8), 77).save(cat / "gray.png")
    rgba = Image.new("RGBA", (10, 8), (200, 10, 10, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    rgba.save(cat / "rgba.png")
    pal = Image.new("P", (6, 6), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(cat / "pal.png")
    Image.new("RGB", (12, 9), (0, 0, 255)).save(cat / "sub" / "rgb.jpg", quality=95)
    (cat / "notes.txt").write_text("not an image")
    (cat / ".DS_Store").write_bytes(b"\0\1")
    (cat / ".thumbs").mkdir()  # hidden folders are neither classes nor scanned
    Image.new("L", (4, 4)).save(cat / ".thumbs" / "t.png")
    (root / ".cache").mkdir()
    Image.new("L", (4, 4)).save(root / ".cache" / "c.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(dog / "cmyk.jpg", quality=95)
    deep = Image.fromarray(np.array([[0, 30000], [65535, 65535]], dtype=np.uint16))
    deep.save(dog / "deep.png")
    (dog / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    _noise((64, 64)).save(buf, format="JPEG", quality=90)
    (dog / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (dog / "fake.jpg").write_text("hello, I am text")
    return root


def test_class_folder_layout(tree: Path) -> None:
    skips = SkipLog()
    src = ImageFolder(tree, skips)
    assert src.classes == ["cat", "dog"]
    names = [Path(src.name(i)).relative_to(tree).as_posix() for i in range(len(src))]
    assert names == [
        "cat/gray.png",
        "cat/pal.png",
        "cat/rgba.png",
        "cat/sub/rgb.jpg",
        "dog/cmyk.jpg",
        "dog/cut.jpg",
        "dog/deep.png",
        "dog/empty.png",
        "dog/fake.jpg",
    ]
    assert src.labels().dtype == np.int64
    assert src.labels().tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert src.label(5) == 1
    assert skips.items() == [(str(tree / "cat" / "notes.txt"), "not an image file extension")]


def test_loads_convert_every_mode_to_rgb(tree: Path) -> None:
    src = ImageFolder(tree)
    by_name = {Path(src.name(i)).name: i for i in range(len(src))}

    def px(name: str, xy: tuple[int, int] = (1, 1)) -> tuple[int, ...]:
        img = src.load(by_name[name])
        assert img.mode == "RGB"
        return img.getpixel(xy)

    assert px("gray.png") == (77, 77, 77)
    assert px("rgba.png", (0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert px("rgba.png") == (200, 10, 10)
    assert px("pal.png") == (10, 200, 30)
    assert px("deep.png", (1, 0)) == (117, 117, 117)  # 30000 / 257: scaled, not clipped
    assert px("deep.png", (0, 0)) == (0, 0, 0)
    assert all(abs(c - 255) <= 2 for c in px("cmyk.jpg"))
    r, g, b = px("rgb.jpg")
    assert r < 10 and g < 10 and b > 245
    assert src.load(by_name["rgb.jpg"]).size == (12, 9)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("empty.png", "empty file"), ("cut.jpg", "truncated"), ("fake.jpg", "not an image")],
)
def test_bad_files_raise_skip_error(tree: Path, name: str, reason: str) -> None:
    src = ImageFolder(tree)
    i = next(i for i in range(len(src)) if src.name(i).endswith(name))
    with pytest.raises(SkipError, match=reason):
        src.load(i)


def test_zero_side_is_skipped() -> None:
    with pytest.raises(SkipError, match="zero side: 0x5 px"):
        check_size(0, 5)
    check_size(1, 1, min_size=1, max_pixels=1)  # exactly at the limits is fine


def test_missing_file_is_skipped(tmp_path: Path) -> None:
    with pytest.raises(SkipError, match="unreadable"):
        load_image_file(tmp_path / "gone.png")


def test_transparency_modes_composite_on_white() -> None:
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (40, 255))
    assert np.asarray(to_rgb(la)).tolist() == [[[255, 255, 255], [40, 40, 40]]]
    half = to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert all(126 <= c <= 128 for c in half.getpixel((0, 0)))  # black at 50% over white
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert np.asarray(to_rgb(pal)).tolist() == [[[255, 255, 255], [9, 9, 9]]]
    gray = Image.new("L", (2, 1), 0)
    gray.putpixel((1, 0), 5)
    gray.info["transparency"] = 0  # a PNG tRNS chunk on a non-palette image
    assert np.asarray(to_rgb(gray)).tolist() == [[[255, 255, 255], [5, 5, 5]]]


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    _noise((5, 5)).save(tmp_path / "b.png")
    _noise((5, 5), 1).save(tmp_path / "a.JPG")
    src = ImageFolder(tmp_path)
    assert len(src) == 2 and src.classes == []
    assert [Path(src.name(i)).name for i in range(2)] == ["a.JPG", "b.png"]
    assert src.labels().tolist() == [-1, -1] and src.label(0) == -1
    assert src.load(1).size == (5, 5)


def test_files_beside_class_folders_are_logged(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    _noise((4, 4)).save(tmp_path / "x" / "1.png")
    _noise((4, 4)).save(tmp_path / "stray.png")
    skips = SkipLog()
    src = ImageFolder(tmp_path, skips)
    assert len(src) == 1 and src.classes == ["x"]
    assert skips.items() == [(str(tmp_path / "stray.png"), "not inside a class folder")]


def test_empty_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no images found in .*expected files with extensions"):
        ImageFolder(tmp_path)
    (tmp_path / "readme.md").write_text("hi")
    skips = SkipLog()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        ImageFolder(tmp_path, skips)
    assert len(skips) == 1
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere")


def test_size_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _noise((20, 20)).save(tmp_path / "big.png")
    _noise((8, 30)).save(tmp_path / "thin.png")
    src = ImageFolder(tmp_path, max_pixels=300)
    with pytest.raises(SkipError, match=r"decompression bomb: 20x20 = 400 px exceeds .* 300"):
        src.load(0)
    assert src.load(1).size == (8, 30)
    with pytest.raises(SkipError, match="too small: 8x30 px, min_size is 10"):
        ImageFolder(tmp_path, min_size=10).load(1)
    # PIL's own global limit (error at twice the limit) is turned into a skip too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(SkipError, match="decompression bomb"):
        ImageFolder(tmp_path, max_pixels=None).load(0)


def test_manifest(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    _noise((6, 4)).save(tmp_path / "imgs" / "a.png")
    _noise((4, 6)).save(tmp_path / "elsewhere.png")
    manifest = tmp_path / "lists" / "train.tsv"
    manifest.parent.mkdir()
    manifest.write_text(
        "# images for the test\n"
        "\n"
        "../imgs/a.png\tzebra\n"
        f"{tmp_path / 'elsewhere.png'}\tant\r\n"
        "../missing.png\tzebra\n"
    )
    src = ImageManifest(manifest)
    assert len(src) == 3 and src.classes == ["ant", "zebra"]
    assert src.labels().tolist() == [1, 0, 1]
    assert src.load(0).size == (6, 4) and src.load(1).size == (4, 6)
    with pytest.raises(SkipError, match="unreadable"):
        src.load(2)


def test_manifest_int_labels_and_unlabelled(tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("a.png\t3\nb.png\t0\n")
    src = ImageManifest(tmp_path / "l.txt")
    assert src.labels().tolist() == [3, 0] and src.classes == ["0", "1", "2", "3"]
    assert src.name(0) == str(tmp_path / "a.png")
    (tmp_path / "u.txt").write_text("a.png\nb.png\n")
    src = ImageManifest(tmp_path / "u.txt")
    assert src.labels().tolist() == [-1, -1] and src.classes == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.png\t1\nb.png\n", "1 of 2 lines have no label"),
        ("a.png\t1\textra\n", r"l.txt:1: expected 'path' or 'path<TAB>label'"),
        ("# only a comment\n", "lists no images"),
        ("a.png\t-2\n", "negative label"),
    ],
)
def test_manifest_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "l.txt").write_text(text)
    with pytest.raises(ValueError, match=message):
        ImageManifest(tmp_path / "l.txt")


def _write_idx_pair(folder: Path, n: int = 6) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(n, 5, 4), dtype=np.uint8)
    labels = (np.arange(n) % 3).astype(np.uint8)
    path = write_idx(folder / "train-images-idx3-ubyte.gz", images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    return path, images, labels


def test_idx_images(tmp_path: Path) -> None:
    path, images, labels = _write_idx_pair(tmp_path)
    src = IdxImages(path, tmp_path / "train-labels-idx1-ubyte.gz")
    assert len(src) == 6 and src.classes == ["0", "1", "2"]
    np.testing.assert_array_equal(src.array, images)
    np.testing.assert_array_equal(src.labels(), labels)
    assert src.labels().dtype == np.int64
    assert src.name(4) == f"{path}#4"
    img = src.load(4)
    assert img.mode == "RGB" and img.size == (4, 5)
    np.testing.assert_array_equal(np.asarray(img)[..., 1], images[4])
    with pytest.raises(SkipError, match="too small"):
        IdxImages(path, min_size=6).load(0)


@pytest.mark.parametrize(("folder", "fashion"), [("fashion", True), ("digits", False)])
def test_idx_class_names_guess(tmp_path: Path, folder: str, fashion: bool) -> None:
    (tmp_path / folder).mkdir()
    images = np.zeros((20, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / folder / "t10k-images-idx3-ubyte", images)
    labels = write_idx(tmp_path / folder / "labels", (np.arange(20) % 10).astype(np.uint8))
    classes = IdxImages(path, labels).classes
    assert classes == (FASHION_MNIST_CLASSES if fashion else [str(i) for i in range(10)])
    assert IdxImages(path, labels, classes=list("abcdefghij")).classes[2] == "c"


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    path, _, _ = _write_idx_pair(tmp_path)
    write_idx(tmp_path / "few.idx", np.zeros(2, dtype=np.uint8))
    with pytest.raises(ValueError, match="expected 6 labels"):
        IdxImages(path, tmp_path / "few.idx")


def test_open_image_source_dispatch(tree: Path, tmp_path: Path) -> None:
    skips = SkipLog()
    assert isinstance(open_image_source(tree, skips), ImageFolder)
    assert len(skips) == 1
    (tmp_path / "m.txt").write_text("x.png\n")
    assert isinstance(open_image_source(str(tmp_path / "m.txt")), ImageManifest)
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    path, _, labels = _write_idx_pair(idx_dir)
    src = open_image_source(path)
    assert isinstance(src, IdxImages)
    np.testing.assert_array_equal(src.labels(), labels)
    (idx_dir / "train-labels-idx1-ubyte.gz").unlink()
    assert open_image_source(path).labels().tolist() == [-1] * 6
    renamed = path.rename(idx_dir / "digits.bin")  # no IDX name: recognised by its header
    assert isinstance(open_image_source(renamed), IdxImages)


def test_open_image_source_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(
        FileNotFoundError, match=re.escape(str(missing)) + ".*accepted: fashion-mnist:train"
    ):
        open_image_source(missing)
    _noise((4, 4)).save(tmp_path / "one.jpg")
    with pytest.raises(ValueError, match=r"cannot read .*one\.jpg as an image source"):
        open_image_source(tmp_path / "one.jpg")
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'val'"):
        open_image_source("fashion-mnist:val")
    monkeypatch.setattr(images_mod, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        open_image_source("fashion-mnist:test")


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_open_fashion_mnist() -> None:
    src = open_image_source("fashion-mnist:test")
    assert isinstance(src, IdxImages)
    assert len(src) == 10000 and src.array.shape == (10000, 28, 28)
    assert src.classes[0] == "T-shirt/top" and len(src.classes) == 10
    assert src.load(0).mode == "RGB" and src.load(0).size == (28, 28)
    assert str(FASHION_MNIST_DIR) in src.name(0)
