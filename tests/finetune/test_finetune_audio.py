"""Speech fine-tuning end to end on tiny models: classification and CTC."""

import json

from data2vec.cli import main
from tests.conftest import TINY_AUDIO, make_audio_folder

FT = ["batch_size=8", "num_workers=0", "progress=false", "tensorboard=false", "warmup_steps=5",
      "layer_decay=1.0", "eval_every=20"]  # fmt: skip


def _pretrained(tmp_path):
    data = make_audio_folder(tmp_path / "train", n_per_class=8)
    valid = make_audio_folder(tmp_path / "valid", n_per_class=3, rates=(11025,))
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
                "0",
                *TINY_AUDIO,
            ]
        )
        == 0
    )
    return run, data, valid


def test_audio_classification_learns_tones(tmp_path, capsys):
    run, data, valid = _pretrained(tmp_path)
    capsys.readouterr()
    code = main(
        [
            "finetune",
            "--checkpoint",
            str(run),
            "--task",
            "audio-classification",
            "--train",
            str(data),
            "--valid",
            str(valid),
            "--out",
            str(tmp_path / "ft"),
            *FT,
            "max_steps=40",
            "lr=3e-3",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["best_metrics"]["accuracy"] >= 0.9
    assert (tmp_path / "ft" / "best" / "finetune.json").is_file()


def test_ctc_uses_class_names_as_transcripts_and_cer_falls(tmp_path, capsys):
    run, data, valid = _pretrained(tmp_path)
    capsys.readouterr()
    code = main(
        [
            "finetune",
            "--checkpoint",
            str(run),
            "--task",
            "ctc",
            "--train",
            str(data),
            "--valid",
            str(valid),
            "--out",
            str(tmp_path / "ft"),
            *FT,
            "max_steps=60",
            "lr=5e-3",
            "eval_every=10",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    history = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    cers = [r["valid_cer"] for r in history if "valid_cer" in r]
    assert cers[0] > 0.5 and summary["best_metrics"]["cer"] < cers[0]
    info = json.loads((tmp_path / "ft" / "best" / "finetune.json").read_text())
    assert "vocab" in info or "tokens" in json.dumps(info)
