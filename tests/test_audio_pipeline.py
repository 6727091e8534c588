"""Speech end to end: pretraining batches with padding, a short run, embedding, probing."""

import json

import numpy as np
import soundfile as sf

from data2vec.cli import main
from data2vec.data.audio import open_audio_source
from data2vec.data.audio_pretrain import PretrainAudio, collate_pretrain_audio
from data2vec.data.sampling import BucketedBatchSampler
from data2vec.data.skips import SkipLog
from data2vec.engine.metrics import read_metrics
from data2vec.engine.trainer import pretrain
from data2vec.masking import MaskInfo
from data2vec.modalities.audio import frame_lengths
from tests.conftest import TINY_AUDIO, make_audio_folder, tiny_audio_config


def test_pretrain_batches__padding_and_equal_visible_counts(tmp_path):
    data = make_audio_folder(tmp_path / "a")
    cfg = tiny_audio_config()
    skips = SkipLog()
    ds = PretrainAudio(open_audio_source(data, skips), cfg, skips)
    keys = [(int(i), p) for p, i in enumerate(ds.indices[:4])]
    batch = collate_pretrain_audio([ds[k] for k in keys])
    B, S = batch.source.shape
    assert batch.padding_mask.shape == (B, S) and batch.mask.shape[0] == B * cfg.mask.clones
    info = MaskInfo.from_mask(batch.mask)  # raises unless every row keeps the same count
    lengths = (~batch.padding_mask).sum(1)
    frames = frame_lengths(lengths).repeat_interleave(cfg.mask.clones)
    for r in range(batch.mask.shape[0]):
        valid = int(frames[r])
        # masked share of the valid frames is the configured ratio, exactly
        assert int(batch.mask[r, :valid].sum()) == int(valid * cfg.mask.ratio)
    assert info.num_visible > 0
    for b in range(B):  # waveforms are normalized per utterance, padding stays zero
        w = batch.source[b, : int(lengths[b])]
        assert abs(float(w.mean())) < 1e-3 and abs(float(w.std()) - 1) < 1e-2
        assert float(batch.source[b, int(lengths[b]) :].abs().sum()) == 0


def test_bucketed_sampler__every_usable_index_once_per_epoch_and_resumable():
    lengths = np.array([5, 100, 7, 300, 0, 90, 8, 310, 6, 95])
    usable = np.flatnonzero(lengths > 0)
    s = BucketedBatchSampler(lengths, usable, batch_size=3, seed=1)
    per_epoch = len(s._epoch_batches(0))
    seen = [i for k in range(per_epoch) for i, _ in s.batch(k)]
    assert sorted(seen) == sorted(usable.tolist())
    resumed = BucketedBatchSampler(lengths, usable, batch_size=3, seed=1, start_batch=5)
    assert next(iter(resumed)) == s.batch(5)
    spread = [np.ptp(lengths[[i for i, _ in s.batch(k)]]) for k in range(per_epoch)]
    assert np.median(spread) < np.ptp(lengths[usable])


def test_short_audio_run__loss_falls_and_files_are_reported(tmp_path):
    data = make_audio_folder(tmp_path / "a", n_per_class=8)
    (data / "tone0" / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    sf.write(data / "tone1" / "tiny.wav", np.zeros(800, dtype=np.float32), 16000)
    cfg = tiny_audio_config("train.max_steps=30", "optim.lr=3e-3")
    result = pretrain(cfg, data, tmp_path / "run")
    assert result.steps == 30
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    report = (tmp_path / "run" / "skipped.tsv").read_text()
    assert "broken.wav" in report and "tiny.wav" in report


def test_audio_cli__pretrain_embed_evaluate_at_other_sample_rates(tmp_path, capsys):
    data = make_audio_folder(tmp_path / "a", n_per_class=6, rates=(44100, 22050, 8000))
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--preset",
                "audio-v2-tiny",
                "--data",
                str(data),
                "--out",
                str(run),
                "--max-steps",
                "2",
                *TINY_AUDIO,
            ]
        )
        == 0
    )
    out = tmp_path / "f.npz"
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(run),
                "--data",
                str(data),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    z = np.load(out)
    assert z["features"].shape == (12, 32) and sorted(set(z["labels"].tolist())) == [0, 1]
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run),
                "--train",
                str(data),
                "--test",
                str(data),
                "--probe",
                "knn",
                "--k",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["n_train"] == 12 and 0 <= result["accuracy"] <= 1


def test_embedding_is_padding_invariant(tmp_path):
    from data2vec.evaluate.features import embed_audio
    from data2vec.models.registry import build_encoder

    data = make_audio_folder(tmp_path / "a", n_per_class=3)
    cfg = tiny_audio_config()
    enc = build_encoder(cfg).eval()
    source = open_audio_source(data)
    together = embed_audio(enc, cfg, source, batch_size=6, progress=False).features
    alone = embed_audio(enc, cfg, source, batch_size=1, progress=False).features
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_audio_demo_end_to_end_on_a_folder(tmp_path, capsys):
    data = tmp_path / "words"
    make_audio_folder(data / "train", n_per_class=8)
    make_audio_folder(data / "test", n_per_class=3, rates=(11025,))
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--modality",
            "audio",
            "--data",
            str(data),
            "--out",
            str(out),
            "--minutes",
            "0.05",
            *TINY_AUDIO,
            "train.max_steps=3",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "MFCC" in printed and "CTC fine-tune" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {
        "data2vec 2.0 (pretrained)",
        "random init (same model)",
        "MFCC + deltas (78-d)",
    }
    assert 0 <= results["ctc"]["best_metrics"]["cer"] <= 1.5
