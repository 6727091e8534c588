"""The synthetic spoken-word corpus: layout, format, voice-disjoint split, manifests, errors."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from data2vec.data import synth_speech
from data2vec.data.audio import AudioManifest
from data2vec.data.synth_speech import Voice, split_voices, synthesize_corpus, trim_silence
from data2vec.errors import DataError

needs_engines = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("flite") is None,
    reason="espeak-ng or flite not installed (apt-get install espeak-ng flite)",
)
WORDS = ("yes", "no")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """2 words x (4 espeak-ng + all flite voices) x 2 variants: ~40 clips in a few seconds."""
    if shutil.which("espeak-ng") is None or shutil.which("flite") is None:
        pytest.skip("espeak-ng or flite not installed (apt-get install espeak-ng flite)")
    out = tmp_path_factory.mktemp("synth") / "corpus"
    stats = synthesize_corpus(
        out, WORDS, seed=3, jobs=2, progress=False, espeak_voices=4, variants=2
    )
    return out, stats


def _voice_of(path: str) -> str:
    return Path(path).stem.rsplit("_", 1)[0]


def _rows(manifest: Path) -> list[list[str]]:
    lines = manifest.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path\tlabel\ttranscript\tvoice"
    return [line.split("\t") for line in lines[1:]]


@needs_engines
def test_corpus__layout_counts_and_audio_format(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, stats = corpus
    assert {p.name for p in out.iterdir()} == {
        "train",
        "test",
        "train.tsv",
        "test.tsv",
        "README.txt",
    }
    n_voices = stats["train_voices"] + stats["test_voices"]
    assert stats["failed_clips"] == 0
    assert stats["train_clips"] + stats["test_clips"] == n_voices * len(WORDS) * 2
    assert n_voices >= 4 + 2  # 4 espeak-ng voices and flite's (kal, kal16, awb, rms, slt)
    assert stats["seconds"] > 0
    for split in ("train", "test"):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(WORDS)
        for path in (out / split).rglob("*.wav"):
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert path.stem.rsplit("_", 1)[1] in {"0", "1"}
            assert 0.1 < info.duration < 2.0  # one trimmed word
    wave, _ = sf.read(next((out / "train").rglob("*.wav")))
    # Leading silence is trimmed: sound above -40 dB of the peak within the first 50 ms.
    assert np.abs(wave[:800]).max() >= 0.01 * np.abs(wave).max()
    readme = (out / "README.txt").read_text()
    assert "espeak-ng" in readme.lower() and "Test voices" in readme


@needs_engines
def test_corpus__split_is_voice_and_speaker_disjoint(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, stats = corpus
    voices = {s: {_voice_of(str(p)) for p in (out / s).rglob("*.wav")} for s in ("train", "test")}
    assert voices["train"] and voices["test"] and not voices["train"] & voices["test"]
    assert (len(voices["train"]), len(voices["test"])) == (
        stats["train_voices"],
        stats["test_voices"],
    )
    for side in voices.values():  # both engines on both sides
        assert {v.split("-")[0] for v in side} == {"espeak", "flite"}
    # flite's kal and kal16 are one speaker: never split apart.
    kal = [s for s, names in voices.items() for v in names if v in {"flite-kal", "flite-kal16"}]
    assert len(set(kal)) == 1
    # espeak-ng variants (the timbre after "+") are unique to one voice.
    variants = [v.split("+")[1] for side in voices.values() for v in side if "+" in v]
    assert len(variants) == len(set(variants)) == 4


@needs_engines
def test_corpus__manifests_match_files_and_read_back(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, stats = corpus
    for split in ("train", "test"):
        rows = _rows(out / f"{split}.tsv")
        assert len(rows) == stats[f"{split}_clips"]
        files = {p.relative_to(out).as_posix() for p in (out / split).rglob("*.wav")}
        assert {r[0] for r in rows} == files
        for path, label, transcript, voice in rows:
            assert path.split("/")[:2] == [split, label] and transcript == label
            assert voice == _voice_of(path)
        src = AudioManifest(out / f"{split}.tsv")
        assert src.classes == sorted(WORDS)
        assert src.transcript(0) in WORDS and src.fields["voice"][0] == rows[0][3]
        wave = src.load(0)
        assert wave.dtype == np.float32 and len(wave) == src.num_samples(0)


@needs_engines
def test_corpus__refuses_to_mix_with_an_existing_corpus(
    corpus: tuple[Path, dict[str, Any]],
) -> None:
    with pytest.raises(DataError, match="already holds a corpus"):
        synthesize_corpus(corpus[0], WORDS, progress=False)


def _fake_voices() -> list[Voice]:
    espeak = [Voice("espeak-ng", f"en-us+v{i}", f"v{i}") for i in range(20)]
    flite = [Voice("flite", v, v.removesuffix("16")) for v in ("kal", "kal16", "awb", "rms", "slt")]
    return espeak + flite


def test_split_voices__deterministic_per_seed_and_per_engine() -> None:
    voices = _fake_voices()
    a = split_voices(voices, 0.2, seed=0)
    assert a == split_voices(list(reversed(voices)), 0.2, seed=0)  # input order is irrelevant
    assert any(split_voices(voices, 0.2, seed=s) != a for s in range(1, 4))
    per_engine: dict[tuple[str, str], int] = defaultdict(int)
    for v in voices:
        per_engine[v.engine, a[v.name]] += 1
    assert per_engine["espeak-ng", "test"] == 4  # 20 % of 20 speakers
    assert per_engine["flite", "test"] >= 1 and per_engine["flite", "train"] >= 1
    for seed in range(10):
        split = split_voices(voices, 0.2, seed)
        assert split["flite-kal"] == split["flite-kal16"]
    assert set(split_voices(voices[:1], 0.5, 0).values()) == {"train"}  # one speaker: train


def test_voice_names_are_file_name_safe() -> None:
    assert Voice("espeak-ng", "en-gb-x-rp+f2", "f2").name == "espeak-en-gb-x-rp+f2"
    assert Voice("flite", "awb_time", "awb").name == "flite-awb-time"


def test_trim_silence__keeps_the_loud_part_with_margins() -> None:
    tone = 0.5 * np.sin(2 * np.pi * 300 * np.arange(8000) / 16000)
    wave = np.concatenate([np.zeros(4000), 1e-4 * np.ones(800), tone, np.zeros(4800)])
    out = trim_silence(wave.astype(np.float32))
    assert 8000 <= len(out) <= 8000 + 2 * 480 + 2 * 160  # 30 ms margins, 10 ms frame rounding
    assert np.abs(out).max() == pytest.approx(0.5, abs=1e-3)
    assert len(trim_silence(np.zeros(16000, np.float32))) == 0
    assert len(trim_silence(np.ones(50, np.float32))) == 0  # shorter than one frame


def test_synthesize_corpus__missing_engine_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synth_speech.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get install espeak-ng flite"):
        synthesize_corpus(tmp_path / "c", WORDS, progress=False)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("words", [(), ("yes", "yes"), ("-v",), ("a/b",)])
def test_synthesize_corpus__rejects_bad_words(tmp_path: Path, words: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="words must be distinct"):
        synthesize_corpus(tmp_path / "c", words, progress=False)
