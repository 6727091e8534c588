"""torchrun: two CPU worker processes (gloo) train exactly what one process does with the same
global batch; the loss is normalized by the masked-token count summed over both workers."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from data2vec.config import load_config
from data2vec.engine.trainer import pretrain
from tests.conftest import TINY, make_image_folder
from tests.test_text_pipeline import TINY_TEXT, text_corpus

STEPS = 3
# No randomness outside the data stream: per-sample masks and crops are seeded by stream
# position (identical however the batch is split); dropout and mask-token noise are not.
NO_NOISE = [f"train.max_steps={STEPS}", "mask.noise_std=0", "train.threads=1"]
TEXT_NO_DROPOUT = [
    "model.encoder_dropout=0", "model.attention_dropout=0", "model.post_mlp_dropout=0",
    "encoder.dropout=0", "decoder.input_dropout=0",
]  # fmt: skip
CASES = {
    # images: every row has the same number of masked patches
    "image": ("image-v2-tiny", [*TINY, *NO_NOISE], 8),
    # text: padded blocks, so the two workers count different numbers of masked tokens and
    # only normalizing by the global count reproduces the one-process loss
    "text": ("text-v2-tiny", [*TINY_TEXT, *TEXT_NO_DROPOUT, *NO_NOISE], 8),
}


def _final_weights(run, steps=STEPS):
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    assert ckpt.name == f"step_{steps:08d}"
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "teacher.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("modality", sorted(CASES))
def test_torchrun_two_workers_match_one_process_with_the_same_global_batch(tmp_path, modality):
    preset, common, batch = CASES[modality]
    if modality == "image":
        data = make_image_folder(tmp_path / "images", n_per_class=12)
    else:
        data = text_corpus(tmp_path)
    pretrain(load_config(preset, [*common, f"data.batch_size={batch}"]), data, tmp_path / "one")
    init = [*common, "train.max_steps=0", f"data.batch_size={batch}"]
    pretrain(load_config(preset, init), data, tmp_path / "init")

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "data2vec.cli", "pretrain", "--preset", preset, "--data", str(data),
        "--out", str(tmp_path / "two"), *common, f"data.batch_size={batch // 2}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 of 2" in proc.stderr  # both workers really ran

    one_student, one_teacher = _final_weights(tmp_path / "one")
    two_student, two_teacher = _final_weights(tmp_path / "two")
    assert one_student.keys() == two_student.keys()
    for name in one_student:
        # Same data, same loss normalization: only the order of floating-point sums differs.
        torch.testing.assert_close(two_student[name], one_student[name], rtol=1e-4, atol=2e-5)
    for name in one_teacher:
        torch.testing.assert_close(two_teacher[name], one_teacher[name], rtol=1e-4, atol=2e-5)
    # and training did move the weights, far more than the tolerance
    init, _ = _final_weights(tmp_path / "init", steps=0)
    moved = max(float((one_student[n] - init[n]).abs().max()) for n in init)
    assert moved > 1e-3
