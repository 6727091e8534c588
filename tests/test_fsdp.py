"""torchrun with sharded (FSDP2) and replicated (DDP) models, both accumulating gradients: two
CPU workers (gloo) with 2 micro-batches of B/4 each train what one process does with a batch of
B; an FSDP checkpoint resumes under FSDP and in a plain single-process run."""

import importlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from data2vec.config import load_config
from data2vec.engine.trainer import pretrain
from tests.conftest import TINY, make_image_folder
from tests.test_distributed import NO_NOISE

FSDP2 = hasattr(importlib.import_module("torch.distributed.fsdp"), "fully_shard")  # torch >= 2.6
PRESET = "image-v2-tiny"
# 3 steps, no randomness outside the data stream; a fast EMA so the teacher visibly moves
COMMON = [*TINY, *NO_NOISE, "ema.decay=0.9", "ema.end_decay=0.9"]


def _torchrun(data, out, *overrides, resume=False):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node=2", "-m", "data2vec.cli", "pretrain", "--preset", PRESET,
        "--data", str(data), "--out", str(out), *(["--resume"] if resume else []),
        *COMMON, "data.batch_size=2", "train.accum_steps=2", *overrides,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _weights(run, step):
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "teacher.safetensors"))


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for name in a:
        # same data and normalization: only the order of floating-point sums differs
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def _reference(tmp_path, data):
    """One process, batch 8, 3 steps; and the initial weights."""
    pretrain(load_config(PRESET, [*COMMON, "data.batch_size=8"]), data, tmp_path / "one")
    pretrain(load_config(PRESET, [*COMMON, "train.max_steps=0"]), data, tmp_path / "init")
    (s1, t1), (s0, t0) = _weights(tmp_path / "one", 3), _weights(tmp_path / "init", 0)
    # training moved the student and the teacher far more than the tolerance
    assert max(float((s1[n] - s0[n]).abs().max()) for n in s0) > 1e-3
    assert max(float((t1[n] - t0[n]).abs().max()) for n in t0) > 1e-4
    return s1, t1


@pytest.mark.slow
def test_ddp_two_accumulating_workers_match_one_process(tmp_path):
    data = make_image_folder(tmp_path / "images", n_per_class=12)
    s1, t1 = _reference(tmp_path, data)
    log = _torchrun(data, tmp_path / "two", "train.distributed=ddp")
    assert "rank 1 of 2 (ddp)" in log
    s2, t2 = _weights(tmp_path / "two", 3)
    _assert_close(s2, s1)
    _assert_close(t2, t1)


@pytest.mark.slow
@pytest.mark.skipif(not FSDP2, reason="FSDP2 (fully_shard) needs torch >= 2.6")
def test_fsdp_two_accumulating_workers_match_one_process_and_checkpoints_resume_anywhere(
    tmp_path,
):
    data = make_image_folder(tmp_path / "images", n_per_class=12)
    s1, t1 = _reference(tmp_path, data)
    fsdp_run, plain_run = tmp_path / "fsdp", tmp_path / "plain_from_fsdp"
    log = _torchrun(data, fsdp_run, "train.distributed=fsdp", "train.max_steps=2")
    assert "rank 1 of 2 (fsdp)" in log
    shutil.copytree(fsdp_run, plain_run)
    # resumed under FSDP: the sharded optimizer state round-trips through full tensors
    assert "resumed from" in _torchrun(data, fsdp_run, "train.distributed=fsdp", resume=True)
    # resumed in one plain process (batch 8): the checkpoint is an ordinary one
    cfg = load_config(PRESET, [*COMMON, "data.batch_size=8"])
    pretrain(cfg, data, plain_run, resume=True)
    for run in (fsdp_run, plain_run):
        s2, t2 = _weights(run, 3)
        _assert_close(s2, s1)
        _assert_close(t2, t1)


def test_fsdp_refuses_layerdrop(tmp_path):
    from data2vec.engine import fsdp
    from data2vec.errors import ConfigError

    cfg = load_config(PRESET, [*TINY, "model.layerdrop=0.1", "train.distributed=fsdp"])
    with pytest.raises(ConfigError, match=r"model\.layerdrop"):
        fsdp.check_supported(cfg, torch.device("cpu"))


def test_fsdp_without_fully_shard_is_refused_naming_ddp(monkeypatch):
    """Before torch 2.6 there is no FSDP2: refused before any work, with the way out."""
    from data2vec.engine import fsdp
    from data2vec.errors import ConfigError

    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)  # the import fails
    cfg = load_config(PRESET, [*TINY, "train.distributed=fsdp"])
    with pytest.raises(ConfigError, match=r"torch >= 2\.6.*train\.distributed=ddp"):
        fsdp.check_supported(cfg, torch.device("cpu"))


@pytest.mark.skipif(not FSDP2, reason="FSDP2 (fully_shard) needs torch >= 2.6")
def test_fsdp_on_the_cpu_before_torch_2_7_is_refused_naming_ddp(monkeypatch):
    """torch 2.6 has FSDP2, but its first forward fails on CPU streams: refused up front there,
    and only there."""
    from data2vec.engine import fsdp
    from data2vec.errors import ConfigError

    cfg = load_config(PRESET, [*TINY, "train.distributed=fsdp"])
    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    with pytest.raises(ConfigError, match=r"on the CPU needs torch >= 2\.7.*distributed=ddp"):
        fsdp.check_supported(cfg, torch.device("cpu"))
    fsdp.check_supported(cfg, torch.device("cuda"))  # a GPU run goes on
    monkeypatch.setattr(torch, "__version__", "2.7.1")
    fsdp.check_supported(cfg, torch.device("cpu"))
