"""Gradient accumulation (train.accum_steps): k micro-batches of B train exactly what one batch
of k·B does, the loss normalized by the masked-token count of all micro-batches; a resumed
accumulating run is bit-identical to an uninterrupted one."""

import pytest
import torch
from safetensors.torch import load_file

from data2vec.config import load_config
from data2vec.engine.trainer import pretrain
from data2vec.errors import ConfigError
from tests.conftest import TINY, make_image_folder
from tests.test_distributed import NO_NOISE, TEXT_NO_DROPOUT
from tests.test_text_pipeline import TINY_TEXT, text_corpus

STEPS = 3
FAST_EMA = ["ema.decay=0.9", "ema.end_decay=0.9"]  # the teacher moves: one update per step shows
CASES = {
    # every image row has the same number of masked patches; the CLS loss (a sum over rows,
    # weight 0.01) is on
    "image": ("image-v2-tiny", [*TINY, *NO_NOISE, *FAST_EMA]),
    # padded text blocks: the micro-batches count different numbers of masked tokens, so only
    # the total count reproduces the one-batch normalization
    "text": ("text-v2-tiny", [*TINY_TEXT, *TEXT_NO_DROPOUT, *NO_NOISE, *FAST_EMA]),
}


def _weights(run, step):
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "teacher.safetensors"))


def _data(tmp_path, modality):
    if modality == "image":
        return make_image_folder(tmp_path / "images", n_per_class=12)
    return text_corpus(tmp_path)


@pytest.mark.parametrize("modality", sorted(CASES))
def test_two_micro_batches_of_b_match_one_batch_of_2b(tmp_path, modality):
    preset, common = CASES[modality]
    data = _data(tmp_path, modality)
    one = pretrain(load_config(preset, [*common, "data.batch_size=8"]), data, tmp_path / "one")
    acc = load_config(preset, [*common, "data.batch_size=4", "train.accum_steps=2"])
    two = pretrain(acc, data, tmp_path / "acc")
    assert one.steps == two.steps == STEPS
    (s1, t1), (s2, t2) = _weights(tmp_path / "one", STEPS), _weights(tmp_path / "acc", STEPS)
    init = load_config(preset, [*common, "train.max_steps=0"])
    s0, t0 = _weights(pretrain(init, data, tmp_path / "init").run_dir, 0)
    # training moved student and teacher far more than the tolerance below
    assert max(float((s1[n] - s0[n]).abs().max()) for n in s0) > 1e-3
    assert max(float((t1[n] - t0[n]).abs().max()) for n in t0) > 1e-4
    for name in s1:
        torch.testing.assert_close(s2[name], s1[name], rtol=1e-4, atol=1e-5)
    for name in t1:
        torch.testing.assert_close(t2[name], t1[name], rtol=1e-4, atol=1e-5)
    # the logged loss is the loss of the whole step
    assert one.history[-1]["loss"] == pytest.approx(two.history[-1]["loss"], rel=1e-4)


def test_accumulating_run_resumes_bit_identically(tmp_path):
    data = make_image_folder(tmp_path / "images", n_per_class=12)
    common = [*TINY, "data.batch_size=4", "train.accum_steps=2", "train.threads=1"]
    straight = load_config("image-v2-tiny", [*common, "train.max_steps=4"])
    pretrain(straight, data, tmp_path / "straight")
    first = load_config("image-v2-tiny", [*common, "train.max_steps=2"])
    pretrain(first, data, tmp_path / "resumed")
    pretrain(straight, data, tmp_path / "resumed", resume=True)
    (a, at), (b, bt) = _weights(tmp_path / "straight", 4), _weights(tmp_path / "resumed", 4)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for name in at:
        assert torch.equal(at[name], bt[name]), name


@pytest.mark.parametrize("value", ["0", "-2", "1.5"])
def test_accum_steps_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match=r"train\.accum_steps"):
        load_config("image-v2-tiny", [f"train.accum_steps={value}"])
