"""Corpora of broken files, one per modality, through a short real pretraining run.

The run must complete; every bad file must be in ``skipped.tsv`` with a reason and counted in
the logs and in ``summary.json``; and every good file must be trained on (the run covers more
than one epoch and counts the distinct samples that reached the model).
"""

import io
import json
import logging

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from data2vec.config import load_config
from data2vec.data.text_pretrain import TokenStore, pack_blocks
from data2vec.engine.trainer import pretrain
from data2vec.errors import DataError
from tests.conftest import TINY, TINY_AUDIO
from tests.test_text_pipeline import TINY_TEXT

RNG = np.random.default_rng(0)


def _png(size=(20, 20), seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_corpus(root):
    """10 good PNGs, a good JPEG, a PNG named .jpg (good); 8 broken files. -> (good, bad)."""
    root.mkdir(parents=True)
    good = []
    for i in range(10):
        (root / f"good{i}.png").write_bytes(_png(seed=i))
        good.append(f"good{i}.png")
    (root / "photo.jpg").write_bytes(_jpeg())
    (root / "png_named.jpg").write_bytes(_png(seed=99))  # wrongly named, but an image
    good += ["photo.jpg", "png_named.jpg"]
    png, jpg = _png(seed=5), _jpeg(seed=5)
    bad = {
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "corrupt.png": png[:16] + bytes(RNG.integers(0, 255, 400, dtype=np.uint8)),
        "random.bmp": bytes(RNG.integers(0, 255, 500, dtype=np.uint8)),
        "zero.png": b"",
        "text.jpg": b"this is a text file, not a JPEG\n" * 20,
        "notes.txt": b"not an image extension\n",
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
    # A decompression bomb: a small file whose header claims 9500 x 9500 = 90 M pixels, over
    # PIL's default limit of 89.5 M (Image.MAX_IMAGE_PIXELS).
    Image.new("1", (9500, 9500)).save(root / "bomb.png", optimize=False)
    return good, [*bad, "bomb.png"]


def audio_corpus(root):
    """Good clips at 16/8/22.05/44.1 kHz, mono and multi-channel; broken clips. -> (good, bad)."""
    root.mkdir(parents=True)

    def tone(sr, seconds, channels=1):
        t = np.arange(int(sr * seconds)) / sr
        w = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * RNG.standard_normal(t.shape)
        return np.stack([w] * channels, axis=1).astype(np.float32) if channels > 1 else w

    good = {
        "mono16k.wav": (16000, 1),
        "mono8k.wav": (8000, 1),
        "mono22k.wav": (22050, 1),
        "mono44k.flac": (44100, 1),
        "stereo16k.wav": (16000, 2),
        "three48k.wav": (48000, 3),
    }
    for name, (sr, ch) in good.items():
        sf.write(root / name, tone(sr, 0.6, ch), sr)
    sf.write(root / "flac_named.wav", tone(16000, 0.6), 16000, format="FLAC")  # wrongly named
    nan = tone(16000, 0.6)
    nan[100:120] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    inf = tone(16000, 0.6)
    inf[5] = np.inf
    sf.write(root / "inf.wav", inf, 16000, subtype="FLOAT")
    sf.write(root / "full.wav", tone(16000, 0.6), 16000, subtype="PCM_16")
    data = (root / "full.wav").read_bytes()
    (root / "full.wav").unlink()
    (root / "truncated.wav").write_bytes(data[: len(data) // 2])
    (root / "zero.wav").write_bytes(b"")
    (root / "text.wav").write_text("not a RIFF file\n" * 20)
    sf.write(root / "short.wav", tone(16000, 0.05), 16000)  # under data.min_samples
    bad = ["nan.wav", "inf.wav", "truncated.wav", "zero.wav", "text.wav", "short.wav"]
    return [*good, "flac_named.wav"], bad


def text_corpus(root):
    """Good .txt/.jsonl documents, one with a few invalid UTF-8 bytes (kept, repaired); broken
    files. -> (good files, bad files, number of good documents)."""
    root.mkdir(parents=True)
    words = ["cat", "dog", "red", "blue", "runs", "sleeps", "the", "a"]
    docs = [" ".join(RNG.choice(words, int(RNG.integers(5, 25)))) for _ in range(30)]
    (root / "good.txt").write_text("\n\n".join(docs[:20]) + "\n", encoding="utf-8")
    lines = [json.dumps({"text": d}) for d in docs[20:28]]
    (root / "good.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "latin1.txt").write_bytes(docs[28].encode() + b" caf\xe9\n\n" + docs[29].encode())
    (root / "zero.txt").write_bytes(b"")
    (root / "blank.txt").write_text("\n   \n\t\n\n", encoding="utf-8")  # only empty documents
    (root / "binary.txt").write_bytes(bytes(RNG.integers(0, 255, 3000, dtype=np.uint8)))
    (root / "empty_docs.jsonl").write_text('{"text": ""}\n{"text": "   "}\n', encoding="utf-8")
    good = ["good.txt", "good.jsonl", "latin1.txt"]
    return good, ["zero.txt", "blank.txt", "binary.txt", "empty_docs.jsonl"], 30


def _check_run(run, result, bad, caplog):
    assert result.stopped == "max_steps"
    report = dict(
        line.split("\t") for line in (run / "skipped.tsv").read_text("utf-8").splitlines()
    )
    names = {p.rsplit("/", 1)[1]: reason for p, reason in report.items()}
    assert sorted(names) == sorted(bad)
    assert all(reason.strip() for reason in names.values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_inputs"] == len(bad) == result.skipped_inputs
    assert sum(summary["skipped_by_reason"].values()) == len(bad)
    assert f"{len(bad)} inputs were skipped" in caplog.text
    assert "run summary:" in caplog.text
    return summary, names


def test_broken_images__skipped_reported_and_every_good_image_trained(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    good, bad = image_corpus(tmp_path / "images")
    run = tmp_path / "run"
    cfg = load_config("image-v2-tiny", [*TINY, "data.batch_size=4", "train.max_steps=7"])
    result = pretrain(cfg, tmp_path / "images", run)
    summary, reasons = _check_run(run, result, bad, caplog)
    assert summary["distinct_samples_trained"] == len(good)
    assert reasons["bomb.png"].startswith("decompression bomb")
    assert reasons["zero.png"] == "empty file (0 bytes)"
    assert reasons["notes.txt"] == "not an image file extension"


def test_broken_audio__skipped_reported_and_every_good_clip_trained(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    good, bad = audio_corpus(tmp_path / "audio")
    run = tmp_path / "run"
    overrides = [*TINY_AUDIO, "data.batch_size=2", "train.max_steps=6"]
    result = pretrain(load_config("audio-v2-tiny", overrides), tmp_path / "audio", run)
    summary, reasons = _check_run(run, result, bad, caplog)
    assert summary["distinct_samples_trained"] == len(good)
    assert reasons["nan.wav"].startswith("non-finite samples")
    assert reasons["inf.wav"].startswith("non-finite samples")
    assert reasons["short.wav"].startswith("too short")
    assert reasons["zero.wav"] == "empty file (0 bytes)"


def test_broken_text__skipped_reported_and_every_good_document_trained(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _, bad, n_docs = text_corpus(tmp_path / "text")
    run = tmp_path / "run"
    overrides = [*TINY_TEXT, "data.batch_size=4", "train.max_steps=12"]
    result = pretrain(load_config("text-v2-tiny", overrides), tmp_path / "text", run)
    summary, reasons = _check_run(run, result, bad, caplog)
    assert reasons["zero.txt"] == "empty file (0 bytes)"
    assert reasons["binary.txt"].startswith("not UTF-8 text")
    store = TokenStore.open(run / "tokens")
    assert store is not None and store.num_documents == n_docs  # no good document lost
    assert "'bad_utf8_lines': 1" in caplog.text  # the repaired line is counted in the log
    # every packed block (so every document in it) reached the model
    assert summary["distinct_samples_trained"] == len(pack_blocks(store.doc_lengths, 32))


def test_a_corpus_without_one_usable_file_stops_with_a_data_error(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(5):
        (root / f"broken{i}.png").write_bytes(b"\x89PNG broken")
    cfg = load_config("image-v2-tiny", [*TINY, "data.batch_size=2", "train.max_steps=3"])
    with pytest.raises(DataError, match="no usable input in 16 batches"):
        pretrain(cfg, root, tmp_path / "run")
    report = (tmp_path / "run" / "skipped.tsv").read_text().splitlines()
    assert len(report) == 5


def test_load_usable__keeps_order_and_indices_and_records_each_skip():
    from data2vec.data.skips import SkipError, SkipLog, load_usable

    class Source:
        def __len__(self):
            return 5

        def load(self, i):
            if i == 1:
                raise SkipError("unreadable")
            return i

        def name(self, i):
            return f"item{i}"

    def double(x):
        if x == 3:
            raise SkipError("too short")
        return 2 * x

    skips = SkipLog()
    assert load_usable(Source(), double, skips) == ([0, 4, 8], [0, 2, 4])
    assert sorted(skips.items()) == [("item1", "unreadable"), ("item3", "too short")]
    assert load_usable(Source(), double, None, [4, 2, 1]) == ([8, 4], [4, 2])
