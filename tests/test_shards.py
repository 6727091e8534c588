"""Tar shards: `data2vec data shard` round trip, split across ranks and workers, and streaming
pretraining for every modality (with resume)."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from data2vec.cli import main
from data2vec.config import load_config
from data2vec.data.shard_stream import ShardStream
from data2vec.data.shards import Sample, find_shards, read_samples, write_shards
from data2vec.engine.trainer import pretrain
from tests.conftest import TINY, TINY_AUDIO, make_audio_folder, make_image_folder
from tests.test_text_pipeline import TINY_TEXT, text_corpus


def _all_samples(out: Path) -> list[Sample]:
    samples = []
    for shard in find_shards(out):
        samples += [s for s in read_samples(shard) if isinstance(s, Sample)]
    return samples


def test_shard_cli_round_trip__every_file_once_with_its_label(tmp_path, capsys):
    src = make_image_folder(tmp_path / "images", n_per_class=6)
    (src / "class1" / "notes.md").write_text("not an image")
    out = tmp_path / "shards"
    assert main(["data", "shard", str(src), str(out), "--shard-size", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["modality"] == "image" and result["classes"] == ["class0", "class1"]
    assert [s["samples"] for s in result["shards"]] == [5, 5, 2] and result["skipped"] == 1
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    samples = _all_samples(out)
    assert len({s.key for s in samples}) == len(samples) == 12
    originals = {
        (f.read_bytes(), c) for c, d in enumerate(["class0", "class1"]) for f in (src / d).glob("*")
    } - {((src / "class1" / "notes.md").read_bytes(), 1)}
    assert {(s.files["png"], s.label) for s in samples} == originals
    assert json.loads((out / "shards.json").read_text())["samples"] == 12


def test_text_shards__one_document_per_sample(tmp_path):
    corpus = text_corpus(tmp_path, n_docs=40)
    out = tmp_path / "shards"
    index = write_shards(corpus, out, shard_size=16)
    docs = [s.files["txt"].decode() for s in _all_samples(out)]
    assert index["modality"] == "text" and len(docs) == 40 == index["samples"]
    assert docs == [d.strip() for d in corpus.read_text().split("\n\n")]


def _key_stream(shards, rank, world, start_batch=0, batch=3):
    stream = ShardStream(
        shards,
        lambda samples: samples,
        lambda sample, position: (sample.key, position),
        seed=7,
        batch_size=batch,
        start_batch=start_batch,
        rank=rank,
        world_size=world,
        buffer=4,
    )
    return iter(stream)


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("shard_size", [3, 10])  # 10 shards (split by shard) or 3 (by sample)
def test_ranks_read_disjoint_shares_deterministically_and_resume_by_skipping(tmp_path, shard_size):
    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(f"document {i}" for i in range(30)))
    write_shards(src, tmp_path / "s", shard_size=shard_size)
    shards = find_shards(tmp_path / "s")
    first = [_take(_key_stream(shards, r, 2), 15) for r in range(2)]  # one epoch each
    keys = [{k for k, _ in items} for items in first]
    assert keys[0].isdisjoint(keys[1]) and len(keys[0] | keys[1]) == 30
    positions = [p for items in first for _, p in items]
    assert len(set(positions)) == 30  # every item has its own stream position
    assert _take(_key_stream(shards, 0, 2), 15) == first[0]  # deterministic given the seed
    assert [k for k, _ in first[0]] != sorted(k for k, _ in first[0])  # and shuffled
    resumed = _take(_key_stream(shards, 0, 2, start_batch=2), 9)
    assert resumed == first[0][6:15]  # after 2 batches of 3: the same items, skipped


def _tiny_image_shards(tmp_path):
    src = make_image_folder(tmp_path / "images", n_per_class=8)
    (src / "class0" / "broken.png").write_bytes(b"\x89PNG not really")
    write_shards(src, tmp_path / "shards", shard_size=6)
    return tmp_path / "shards"


def test_stream_pretraining__images_from_a_glob_with_bad_sample_reported(tmp_path):
    shards = _tiny_image_shards(tmp_path)
    cfg = load_config("image-v2-tiny", [*TINY, "data.batch_size=4", "train.max_steps=6"])
    result = pretrain(cfg, str(shards / "shard-*.tar"), tmp_path / "run")
    assert result.steps == 6 and result.stopped == "max_steps"
    (line,) = (tmp_path / "run" / "skipped.tsv").read_text().splitlines()
    name, reason = line.split("\t")
    assert name.endswith("shard-000000.tar/00000000_broken.png") and reason
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples_trained"] >= 6 * 4 - 2 and summary["skipped_inputs"] == 1


def test_stream_pretraining__resume_is_bit_identical(tmp_path):
    shards = _tiny_image_shards(tmp_path)
    common = [*TINY, "data.batch_size=4", "train.threads=1", "data.shuffle_buffer=5"]
    straight = load_config("image-v2-tiny", [*common, "train.max_steps=4"])
    pretrain(straight, shards, tmp_path / "straight")
    pretrain(load_config("image-v2-tiny", [*common, "train.max_steps=2"]), shards, tmp_path / "r")
    pretrain(straight, shards, tmp_path / "r", resume=True)
    ckpt = "checkpoints/step_00000004/model.safetensors"
    a, b = load_file(str(tmp_path / "straight" / ckpt)), load_file(str(tmp_path / "r" / ckpt))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_stream_pretraining__audio(tmp_path):
    src = make_audio_folder(tmp_path / "audio")
    write_shards(src, tmp_path / "shards", shard_size=4)
    cfg = load_config("audio-v2-tiny", [*TINY_AUDIO, "train.max_steps=3", "data.batch_size=2"])
    result = pretrain(cfg, tmp_path / "shards", tmp_path / "run")
    assert result.steps == 3 and np.isfinite(result.history[-1]["loss"])


def test_stream_pretraining__text(tmp_path):
    write_shards(text_corpus(tmp_path), tmp_path / "shards", shard_size=50)
    cfg = load_config("text-v2-tiny", [*TINY_TEXT, "train.max_steps=3"])
    result = pretrain(cfg, tmp_path / "shards", tmp_path / "run")
    assert result.steps == 3 and np.isfinite(result.history[-1]["loss"])
    assert (tmp_path / "run" / "tokenizer.json").is_file()  # trained on the shards


def test_a_damaged_shard_is_reported_and_its_good_samples_kept(tmp_path):
    out = tmp_path / "s"
    write_shards(make_image_folder(tmp_path / "images", n_per_class=3), out, shard_size=6)
    data = (out / "shard-000000.tar").read_bytes()
    (out / "shard-000000.tar").write_bytes(data[: len(data) * 2 // 3])
    items = list(read_samples(out / "shard-000000.tar"))
    good = [s for s in items if isinstance(s, Sample)]
    assert 1 <= len(good) < 6 and isinstance(items[-1], tuple)
    assert items[-1][1].startswith("damaged shard")
    originals = {p.read_bytes() for p in (tmp_path / "images").rglob("*.png")}
    assert all(s.files["png"] in originals for s in good)  # read whole, never cut


def test_wav_bytes_round_trip(tmp_path):
    src = tmp_path / "a"
    src.mkdir()
    sf.write(src / "x.wav", np.zeros(800, np.float32), 16000)
    write_shards(src, tmp_path / "s", shard_size=2)
    (sample,) = _all_samples(tmp_path / "s")
    assert sample.files == {"wav": (src / "x.wav").read_bytes()} and sample.label == -1
