"""Tests for the image classification data path (data2vec.finetune.image)."""

from __future__ import annotations

import numpy as np
import pytest

from data2vec.data.images import ImageFolder
from data2vec.data.transforms import TrainTransform
from data2vec.errors import DataError
from data2vec.finetune.image import LabelledImages, collate_labelled, label_space
from tests.conftest import make_image_folder


def test_label_space__validation_classes_are_matched_by_name(tmp_path) -> None:
    train = ImageFolder(make_image_folder(tmp_path / "train", n_per_class=1, classes=3))
    valid_root = make_image_folder(tmp_path / "valid", n_per_class=2, classes=3)
    for f in (valid_root / "class0").iterdir():  # validation holds class1 and class2 only
        f.unlink()
    (valid_root / "class0").rmdir()
    valid = ImageFolder(valid_root)
    assert valid.classes == ["class1", "class2"]
    classes, valid_map = label_space(train, valid)
    assert classes == ["class0", "class1", "class2"]
    dataset = LabelledImages(valid, lambda img, rng: np.zeros(1), seed=0, label_map=valid_map)
    assert [dataset[(i, i)][2] for i in range(len(valid))] == [1, 1, 2, 2]


def test_label_space__refuses_unlabelled_images(tmp_path) -> None:
    labelled = ImageFolder(make_image_folder(tmp_path / "train", n_per_class=1))
    flat = ImageFolder(tmp_path / "train" / "class0")  # files only: unlabelled
    with pytest.raises(DataError, match=r"validation images .* unlabelled"):
        label_space(labelled, flat)


def test_labelled_images__augmentation_is_a_function_of_the_stream_position(tmp_path) -> None:
    source = ImageFolder(make_image_folder(tmp_path / "images", n_per_class=1))
    dataset = LabelledImages(source, TrainTransform(16), seed=3)
    a, b, c = dataset[(0, 5)], dataset[(0, 5)], dataset[(0, 6)]
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert a[1].shape == (3, 16, 16)


def test_collate_labelled__skips_unreadable_images(tmp_path) -> None:
    root = make_image_folder(tmp_path / "images", n_per_class=1)
    (root / "class1" / "broken.png").write_bytes(b"garbage")
    source = ImageFolder(root)
    dataset = LabelledImages(source, TrainTransform(16), seed=0)
    batch = collate_labelled([dataset[(i, i)] for i in range(len(source))])
    assert len(batch) == 2
    assert batch.targets.tolist() == [0, 1]
    assert batch.source.shape == (2, 3, 16, 16)
    assert [p.endswith("broken.png") for p, _ in batch.skipped] == [True]
    empty = collate_labelled([dataset[(1, 0)]])
    assert len(empty) == 0
