"""Exact resume after SIGKILL: a run killed mid-training and resumed from its last checkpoint
ends bit-identical to a run that was never interrupted (CPU, one thread)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY, make_image_folder

STEPS = 12


def _command(data: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "data2vec.cli", "pretrain", "--preset", "image-v2-tiny",
        "--data", str(data), "--out", str(out), *TINY, f"train.max_steps={STEPS}",
        "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.threads=1",
    ]  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (code {proc.returncode}) before {path.name}")
        if time.monotonic() > end:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


def _final(run: Path) -> tuple[dict, dict]:
    ckpt = run / "checkpoints" / f"step_{STEPS:08d}"
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "teacher.safetensors"))


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    data = make_image_folder(tmp_path / "images", n_per_class=12)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(data, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Kill somewhere after the checkpoint of step 4: between checkpoints or while writing one.
    _wait_for(killed / "checkpoints" / "step_00000004", proc)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "checkpoints" / f"step_{STEPS:08d}").exists()

    resumed = subprocess.run(
        [*_command(data, killed), "--resume"], capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    straight = subprocess.run(
        _command(data, tmp_path / "straight"), capture_output=True, text=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    (a_student, a_teacher), (b_student, b_teacher) = _final(killed), _final(tmp_path / "straight")
    assert a_student.keys() == b_student.keys() and a_teacher.keys() == b_teacher.keys()
    for name in a_student:
        assert torch.equal(a_student[name], b_student[name]), name
    for name in a_teacher:
        assert torch.equal(a_teacher[name], b_teacher[name]), name
