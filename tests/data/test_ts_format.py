"""UCR/UEA ``.ts`` reading and writing, and the signal sources built on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data2vec.data.signal import (
    ArrayFolder,
    TsSource,
    normalize_channels,
    open_signal_source,
    resolve_ucr,
)
from data2vec.data.skips import SkipError, SkipLog
from data2vec.data.ts_format import read_ts, write_ts
from data2vec.errors import DataError

FIXTURES = Path(__file__).parent.parent / "fixtures" / "ts"


def test_ts_round_trip__variable_length_multivariate_missing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    series = [rng.standard_normal((3, n)).astype(np.float32) for n in (5, 9, 2)]
    series[1][2, 4] = np.nan  # one missing value
    labels = ["b", "a", "b"]
    path = write_ts(tmp_path / "x.ts", series, labels, name="Toy", classes=["b", "a"])
    ts = read_ts(path)
    assert ts.name == "Toy"
    assert ts.labels == labels and ts.classes == ["b", "a"]
    assert [s.shape for s in ts.series] == [(3, 5), (3, 9), (3, 2)]
    for got, want in zip(ts.series, series):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), rtol=1e-6)
    assert ts.header["equallength"] == "false" and ts.header["missing"] == "true"


def test_ts_reader__question_marks_and_short_dimensions(tmp_path: Path) -> None:
    text = (
        "# comment\n@problemName P\n@univariate false\n@dimensions 2\n"
        "@classLabel true x y\n@data\n1,?,3:4,5:y\n"
    )
    (tmp_path / "p.ts").write_text(text)
    ts = read_ts(tmp_path / "p.ts")
    case = ts.series[0]
    assert case.shape == (2, 3)
    assert np.isnan(case[0, 1]) and np.isnan(case[1, 2])  # '?' and the shorter dimension's end
    assert case[1, 1] == 5.0 and ts.labels == ["y"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("@timeStamps true\n@data\n(0,1)\n", "timeStamps"),
        ("@univariate false\n@dimensions 2\n@classLabel true a\n@data\n1,2:a\n", ":6: 1 dim"),
        ("@classLabel true a\n@data\n1,2:zz\n", "not declared"),
        ("@data\n1,abc\n", "not a number"),
        ("@problemName X\n", "no @data"),
    ],
)
def test_ts_reader__errors_name_file_and_line(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.ts"
    path.write_text("@problemName X\n" + body if not body.startswith("@problemName") else body)
    with pytest.raises(DataError, match=message) as info:
        read_ts(path)
    assert "bad.ts" in str(info.value)


def test_ts_fixture__real_uea_subset() -> None:
    src = open_signal_source(FIXTURES / "JapaneseVowels_TRAIN.ts")
    assert isinstance(src, TsSource)
    assert len(src) == 27 and src.classes == [str(i) for i in range(1, 10)]
    lengths = {src.length(i) for i in range(len(src))}
    assert len(lengths) > 1  # variable length
    assert all(src.load(i).shape[0] == 12 for i in range(len(src)))
    assert set(src.labels().tolist()) == set(range(9))


def test_ucr_spec__resolves_inside_the_aeon_wheel() -> None:
    path = resolve_ucr("ucr:GunPoint:test")
    assert path.name == "GunPoint_TEST.ts" and path.is_file()
    with pytest.raises(DataError, match="ucr:<Name>:train"):
        resolve_ucr("ucr:GunPoint")


def test_array_folder__npy_npz_and_bad_files(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
    np.save(tmp_path / "a" / "one.npy", np.ones((2, 8), np.float32))
    np.savez(tmp_path / "b" / "two.npz", x=np.zeros((2, 8)), other=np.zeros(3))
    np.savez(tmp_path / "b" / "three.npz", p=np.zeros(1), q=np.zeros(2))  # ambiguous
    (tmp_path / "a" / "broken.npy").write_bytes(b"not numpy")
    (tmp_path / "a" / "notes.txt").write_text("x")
    skips = SkipLog()
    src = ArrayFolder(tmp_path, skips)
    assert src.classes == ["a", "b"] and len(src) == 4
    assert "notes.txt" in " ".join(p for p, _ in skips.items())
    loaded, reasons = {}, {}
    for i in range(len(src)):
        try:
            loaded[Path(src.name(i)).name] = src.load(i)
        except SkipError as exc:
            reasons[Path(src.name(i)).name] = str(exc)
    assert set(loaded) == {"one.npy", "two.npz"}
    assert loaded["two.npz"].shape == (2, 8)
    assert "not a readable numpy array" in reasons["broken.npy"]
    assert "expected one, or one named x" in reasons["three.npz"]


def test_normalize_channels__per_channel_and_missing() -> None:
    x = np.array([[1.0, 2.0, 3.0, np.nan], [10.0, 10.0, 10.0, 10.0]], np.float32)
    y = normalize_channels(x)
    np.testing.assert_allclose(y[0, :3], [-1.2247449, 0.0, 1.2247449], rtol=1e-5)
    assert y[0, 3] == 0.0  # missing -> the channel mean
    np.testing.assert_array_equal(y[1], 0.0)  # constant channel: centred only


def test_dataset_statistics__resolved_once_and_used_by_the_transform(tmp_path: Path) -> None:
    from data2vec.config import load_config
    from data2vec.data.signal import SignalTransform, resolve_from_data

    series = [
        np.array([[1.0, 3.0], [10.0, 30.0]], np.float32),
        np.array([[5.0, 7.0], [50.0, 70.0]]),
    ]
    src = TsSource(write_ts(tmp_path / "s.ts", series, ["a", "b"]))
    cfg = load_config("signal-v2-tiny", ["encoder.size=[2]", "encoder.patch_size=[1]"])
    resolve_from_data(cfg, src)
    assert cfg.encoder.in_chans == 2
    np.testing.assert_allclose(cfg.encoder.channel_mean, [4.0, 40.0])
    np.testing.assert_allclose(cfg.encoder.channel_std, [np.sqrt(5.0), np.sqrt(500.0)], rtol=1e-6)
    y = SignalTransform(cfg)(src.load(0))
    np.testing.assert_allclose(y[:, 0], [-3 / np.sqrt(5.0)] * 2, rtol=1e-5)  # levels kept
    sample = load_config(
        "signal-v2-tiny",
        [
            "encoder.in_chans=2",
            "encoder.size=[2]",
            "encoder.patch_size=[1]",
            "encoder.normalize=sample",
        ],
    )
    np.testing.assert_allclose(SignalTransform(sample)(src.load(0)), [[-1, 1], [-1, 1]], rtol=1e-5)
