"""No loading path runs code from a file: a pickle with a payload is refused by ``--resume``,
``convert`` and ``--checkpoint``, and the payload never runs."""

import os
import pickle
from pathlib import Path

import torch

from data2vec.cli import main
from data2vec.engine import checkpoint as ckpt
from data2vec.engine.trainer import pretrain
from tests.conftest import tiny_config


class Payload:
    """Unpickling this calls ``os.system`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison(path: Path, marker: Path) -> None:
    with open(path, "wb") as fh:
        pickle.dump({"model": {"w": torch.zeros(1)}, "cfg": {}, "x": Payload(marker)}, fh)


def test_resume_refuses_a_poisoned_trainer_state_and_falls_back(image_folder, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config("train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=3")
    pretrain(cfg, image_folder, run)
    newest = ckpt.list_checkpoints(run)[-1]
    marker = tmp_path / "pwned"
    _poison(newest / ckpt.STATE_FILE, marker)
    found = ckpt.latest_loadable(run)
    assert found is not None and found[0].name == "step_00000001"  # the previous, clean one
    assert not marker.exists()


def test_convert_refuses_a_poisoned_fairseq_checkpoint(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _poison(tmp_path / "evil.pt", marker)
    code = main(["convert", "--from", "fairseq", "--to", "ours", str(tmp_path / "evil.pt"),
                 str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    assert "safely" in capsys.readouterr().err
    assert not marker.exists()


def test_checkpoint_option_never_unpickles(image_folder, tmp_path, capsys):
    """``--checkpoint`` reads safetensors and YAML only: a poisoned trainer state is not read."""
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=1"), image_folder, run)
    model_dir = ckpt.list_checkpoints(run)[-1]
    marker = tmp_path / "pwned"
    _poison(model_dir / ckpt.STATE_FILE, marker)
    code = main(["embed", "--checkpoint", str(model_dir), "--data", str(image_folder),
                 "--out", str(tmp_path / "f.npz"), "--no-progress"])  # fmt: skip
    assert code == 0
    assert not marker.exists()
