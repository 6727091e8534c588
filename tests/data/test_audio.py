"""Audio sources: decoding, mono mix-down, resampling, skipped files, layouts, batching."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data2vec.data.audio import (
    AudioFolder,
    AudioManifest,
    audio_num_samples,
    length_buckets,
    load_audio_file,
    normalize,
    open_audio_source,
    random_crop,
)
from data2vec.data.skips import SkipError, SkipLog
from data2vec.errors import DataError, DataNotFoundError

POCKETSPHINX_DATA = Path("/usr/share/pocketsphinx/test/data")


def _sine(sr: int, seconds: float = 0.5, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    """``(S,)`` or ``(S, C)`` float32; channel ``c`` has amplitude ``0.5 / (c + 1)``."""
    t = np.arange(int(sr * seconds)) / sr
    wave = np.sin(2 * np.pi * freq * t)
    if channels == 1:
        return (0.5 * wave).astype(np.float32)
    return np.stack([0.5 / (c + 1) * wave for c in range(channels)], axis=1).astype(np.float32)


def _peak_hz(wave: np.ndarray, sr: int = 16000) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(wave))) * sr / len(wave))


@pytest.mark.parametrize(
    ("fmt", "subtype", "sr", "channels"),
    [
        ("wav", "PCM_16", 8000, 1),
        ("wav", "FLOAT", 44100, 1),
        ("wav", "PCM_16", 22050, 2),
        ("flac", "PCM_16", 22050, 1),
        ("flac", "PCM_24", 44100, 2),
        ("ogg", "VORBIS", 44100, 1),
        ("ogg", "VORBIS", 8000, 2),
    ],
)
def test_load__formats_rates_and_channels(
    tmp_path: Path, fmt: str, subtype: str, sr: int, channels: int
) -> None:
    path = tmp_path / f"clip.{fmt}"
    sf.write(path, _sine(sr, channels=channels), sr, subtype=subtype)
    wave = load_audio_file(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == audio_num_samples(path)  # the header estimate is exact
    assert abs(len(wave) - 8000) <= 1  # 0.5 s at 16 kHz
    assert abs(_peak_hz(wave) - 440.0) <= 2.0
    # Mono = mean of the channels: amplitude 0.5 (mono) or (0.5 + 0.25) / 2 (stereo).
    expected = 0.5 if channels == 1 else 0.375
    assert abs(np.abs(wave[1000:-1000]).max() - expected) < 0.02


def test_load__stereo_is_channel_mean_without_resampling(tmp_path: Path) -> None:
    stereo = np.random.default_rng(0).uniform(-0.5, 0.5, (1600, 2)).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo, 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio_file(tmp_path / "s.wav"), stereo.mean(axis=1), atol=1e-7)


def test_load__16_bit_scale_and_no_normalization(tmp_path: Path) -> None:
    pcm = np.array([0, 16384, -32768, 32767] * 200, dtype=np.int16)
    sf.write(tmp_path / "i.wav", pcm, 16000, subtype="PCM_16")
    wave = load_audio_file(tmp_path / "i.wav")
    np.testing.assert_allclose(wave[:4], [0.0, 0.5, -1.0, 32767 / 32768], atol=1e-6)


def _bad_files(tmp: Path) -> dict[str, Path]:
    good = _sine(16000, 1.0)
    (tmp / "empty.wav").write_bytes(b"")
    sf.write(tmp / "full.wav", good, 16000, subtype="PCM_16")
    data = (tmp / "full.wav").read_bytes()
    (tmp / "cut.wav").write_bytes(data[: len(data) // 2])
    sf.write(tmp / "full.flac", np.random.default_rng(0).uniform(-1, 1, 16000), 16000)
    data = (tmp / "full.flac").read_bytes()
    (tmp / "cut.flac").write_bytes(data[: len(data) // 2])
    (tmp / "text.wav").write_text("this is not a RIFF file, just text\n" * 10)
    nan = good.copy()
    nan[100:110] = np.nan
    sf.write(tmp / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(tmp / "short.wav", good[:300], 16000, subtype="PCM_16")
    return {
        "empty.wav": tmp / "empty.wav",
        "cut.wav": tmp / "cut.wav",
        "cut.flac": tmp / "cut.flac",
        "text.wav": tmp / "text.wav",
        "nan.wav": tmp / "nan.wav",
        "short.wav": tmp / "short.wav",
        "missing.wav": tmp / "missing.wav",
    }


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("empty.wav", r"^empty file \(0 bytes\)$"),
        ("cut.wav", r"^truncated file: WAV data chunk declares 32000 bytes, \d+ present$"),
        ("cut.flac", r"^(truncated file|not audio or corrupt): "),
        ("text.wav", r"^not audio or corrupt: "),
        ("nan.wav", r"^non-finite samples: 10 of 16000 are NaN or Inf$"),
        ("short.wav", r"^too short: 300 samples at 16 kHz \(0\.019 s\), min_samples is 400$"),
        ("missing.wav", r"^unreadable file: "),
    ],
)
def test_load__bad_files_raise_skip_error_with_reason(
    tmp_path: Path, name: str, reason: str
) -> None:
    path = _bad_files(tmp_path)[name]
    with pytest.raises(SkipError) as info:
        load_audio_file(path)
    assert re.search(reason, str(info.value)), str(info.value)


def test_load__min_samples_is_configurable_and_counted_at_16k(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", _sine(8000, 0.03), 8000)  # 240 samples at 8k = 480 at 16k
    assert len(load_audio_file(tmp_path / "a.wav")) == 480
    with pytest.raises(SkipError, match="too short: 480 samples"):
        load_audio_file(tmp_path / "a.wav", min_samples=481)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``root/{no,yes}/...`` with wav/flac/ogg clips, a sub-folder and some non-audio files."""
    root = tmp_path / "root"
    (root / "yes" / "sub").mkdir(parents=True)
    (root / "no").mkdir()
    sf.write(root / "yes" / "a.wav", _sine(16000), 16000)
    sf.write(root / "yes" / "sub" / "b.flac", _sine(22050), 22050)
    sf.write(root / "no" / "c.OGG", _sine(44100), 44100, format="OGG")
    (root / "no" / "empty.wav").write_bytes(b"")
    (root / "no" / "notes.txt").write_text("not audio")
    (root / "no" / ".hidden.wav").write_bytes(b"")
    (root / ".cache").mkdir()
    (root / "stray.wav").write_bytes(b"")
    return root


def test_audio_folder__class_layout(tree: Path) -> None:
    skips = SkipLog()
    src = AudioFolder(tree, skips)
    assert src.classes == ["no", "yes"]
    names = [Path(src.name(i)).relative_to(tree).as_posix() for i in range(len(src))]
    assert names == ["no/c.OGG", "no/empty.wav", "yes/a.wav", "yes/sub/b.flac"]
    assert src.labels().dtype == np.int64
    assert src.labels().tolist() == [0, 0, 1, 1]
    assert src.label(3) == 1 and src.transcript(0) is None
    assert dict(skips.items()) == {
        str(tree / "no" / "notes.txt"): "not an audio file extension",
        str(tree / "stray.wav"): "not inside a class folder",
    }
    assert len(src.load(3)) == 8000
    with pytest.raises(SkipError, match="empty file"):
        src.load(1)
    assert "4 clips, 2 classes" in repr(src)


def test_audio_folder__flat_is_unlabelled_and_lengths_record_bad_headers(tree: Path) -> None:
    skips = SkipLog()
    src = AudioFolder(tree / "no", skips)
    assert src.classes == [] and src.labels().tolist() == [-1, -1]
    assert src.lengths(skips).tolist() == [8000, 0]
    assert dict(skips.items())[str(tree / "no" / "empty.wav")] == "empty file (0 bytes)"


def test_audio_folder__missing_or_without_audio(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="not found"):
        AudioFolder(tmp_path / "nope")
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"no audio files found in .*\.flac \.ogg \.wav"):
        AudioFolder(tmp_path)


def test_audio_manifest__header_relative_paths_labels_transcripts(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "a.wav", _sine(16000), 16000)
    sf.write(tmp_path / "clips" / "b.flac", _sine(8000, 1.0), 8000)
    absolute = tmp_path / "clips" / "a.wav"
    manifest = tmp_path / "m.tsv"
    manifest.write_text(
        "path\ttranscript\tlabel\tvoice\n"
        "# a comment line\n"
        "clips/a.wav\tgo left\tleft\tkal\n"
        "\n"
        f"{absolute}\t\tright\tslt\n"
        "clips/b.flac\tgo right\tright\n"
    )
    src = AudioManifest(manifest)
    assert src.paths == [tmp_path / "clips" / "a.wav", absolute, tmp_path / "clips" / "b.flac"]
    assert src.classes == ["left", "right"] and src.labels().tolist() == [0, 1, 1]
    assert [src.transcript(i) for i in range(3)] == ["go left", None, "go right"]
    assert src.fields == {"voice": ["kal", "slt", ""]}
    assert [src.num_samples(i) for i in range(3)] == [8000, 8000, 16000]
    assert len(src.load(2)) == 16000


def test_audio_manifest__plain_lists_and_fairseq_layout(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", _sine(16000), 16000)
    (tmp_path / "list.txt").write_text("a.wav\na.wav\n")
    src = open_audio_source(tmp_path / "list.txt")
    assert isinstance(src, AudioManifest) and len(src) == 2 and src.classes == []
    assert src.transcript(0) is None and src.labels().tolist() == [-1, -1]
    (tmp_path / "labelled.txt").write_text("a.wav\t3\na.wav\t0\n")
    assert AudioManifest(tmp_path / "labelled.txt").classes == ["0", "1", "2", "3"]
    (tmp_path / "fairseq.tsv").write_text(f"{tmp_path}\na.wav\t8000\n")
    src = AudioManifest(tmp_path / "fairseq.tsv")
    assert src.paths == [tmp_path / "a.wav"] and src.fields == {"frames": ["8000"]}
    assert src.classes == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path\tlabel\na.wav\tx\ty\n", r"m\.tsv:2: expected up to 2 tab-separated fields"),
        ("path\tlabel\tlabel\n", "empty or repeated column names"),
        ("a.wav\tx\ty\n", "or a header line"),
        ("path\tlabel\na.wav\tyes\nb.wav\n", "1 of 2 lines have no label"),
        ("path\n", "lists no audio files"),
    ],
)
def test_audio_manifest__malformed_raises_data_error(
    tmp_path: Path, text: str, message: str
) -> None:
    (tmp_path / "m.tsv").write_text(text)
    with pytest.raises(DataError, match=message):
        AudioManifest(tmp_path / "m.tsv")


def test_open_audio_source__dispatch(tree: Path, tmp_path: Path) -> None:
    assert isinstance(open_audio_source(tree), AudioFolder)
    with pytest.raises(DataNotFoundError, match="audio source not found"):
        open_audio_source(tmp_path / "missing.tsv")
    (tmp_path / "x.wav").write_bytes(b"")
    with pytest.raises(DataError, match="cannot read"):
        open_audio_source(tmp_path / "x.wav")


def test_pocketsphinx_read_speech_with_transcript(tmp_path: Path) -> None:
    cards = POCKETSPHINX_DATA / "cards"
    if not (cards / "001.wav").is_file():
        pytest.skip(f"{cards} is missing (apt-get install pocketsphinx-testdata)")
    # "<s> ten of clubs  </s> (001)" -> "ten of clubs"
    lines = (cards / "cards.transcription").read_text().splitlines()
    texts = {
        m[2]: " ".join(m[1].split())
        for m in (re.fullmatch(r"<s>(.*)</s> \((\S+)\)", x.strip()) for x in lines)
        if m
    }
    manifest = tmp_path / "cards.tsv"
    manifest.write_text("path\ttranscript\n" + f"{cards / '001.wav'}\t{texts['001']}\n")
    src = open_audio_source(manifest)
    wave = src.load(0)
    assert src.transcript(0) == "ten of clubs"
    assert src.num_samples(0) == len(wave) == 17526  # 16 kHz already: no resampling
    np.testing.assert_array_equal(wave, sf.read(cards / "001.wav", dtype="float32")[0])
    assert np.sqrt(np.mean(wave**2)) > 0.005  # speech, not silence


def test_normalize__matches_fairseq_layer_norm() -> None:
    wave = np.random.default_rng(0).normal(0.3, 0.5, 5000).astype(np.float32)
    out = normalize(wave)
    assert out.dtype == np.float32
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-4  # eps is 4e-5 of var
    ref = torch.nn.functional.layer_norm(torch.from_numpy(wave), (len(wave),), eps=1e-5)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)
    assert np.isfinite(normalize(np.zeros(100, np.float32))).all()


def test_random_crop__length_determinism_and_uniform_starts() -> None:
    wave = np.arange(1000, dtype=np.float32)
    assert random_crop(wave, 2000, np.random.default_rng(0)) is wave
    a = random_crop(wave, 300, np.random.default_rng(7))
    b = random_crop(wave, 300, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert len(a) == 300 and np.all(np.diff(a) == 1)  # a contiguous window
    rng = np.random.default_rng(1)
    starts = [int(random_crop(wave, 990, rng)[0]) for _ in range(500)]
    assert set(starts) == set(range(11))  # every start 0..10 is drawn, none beyond


def test_length_buckets__each_index_once_and_little_padding() -> None:
    lengths = np.random.default_rng(0).integers(2000, 250_000, 2003)
    batches = length_buckets(lengths, 8, np.random.default_rng(1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(2003)) and all(isinstance(i, int) for i in flat)
    assert all(1 <= len(b) <= 8 for b in batches)
    assert sum(len(b) < 8 for b in batches) <= -(-2003 // 400)  # one short batch per chunk
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random = np.random.default_rng(2).permutation(2003)
    padded_random = sum(8 * lengths[random[i : i + 8]].max() for i in range(0, 2003, 8))
    assert padded / lengths.sum() < 1.05 < padded_random / lengths.sum()
    again = length_buckets(lengths, 8, np.random.default_rng(1))
    assert again == batches
    assert length_buckets(lengths, 8, np.random.default_rng(2)) != batches
    assert length_buckets([], 8, np.random.default_rng(0)) == []
