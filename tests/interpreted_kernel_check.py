"""The start-up kernel check (``data2vec/engine/kernel_check.py``) under Triton's CPU
interpreter: it passes the kernels as they are, finds each kind of wrong kernel, and a run
whose check fails takes the torch ops.

Collected only by ``test_token_kernels.py``, which runs this file in a fresh process with
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data2vec.bench import _synthetic_batch
from data2vec.engine import kernel_check, trainer
from data2vec.models.registry import build_model
from data2vec.nn import token_attention, token_conv, token_loss
from tests.conftest import TINY, make_image_folder, tiny_config

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_token_kernels.py"

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _kernels_back_on():
    yield
    token_conv.enable()


def _model_and_batch(*overrides: str):
    cfg = tiny_config("decoder.conv_impl=triton", *overrides)
    torch.manual_seed(0)
    return build_model(cfg), _synthetic_batch(cfg, 4)


def _count(monkeypatch, module, name: str, change=None) -> list[int]:
    """Count calls of ``module.name`` (passing its result through ``change``)."""
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return out if change is None else change(out)

    monkeypatch.setattr(module, name, counted)
    return calls


def _biases_25_percent_off(grads):
    """``weight_bias_grad``'s ``(weight, bias)`` gradients with the bias's 25 % too large: the
    H200's wrong kernel in small."""
    gw, gb = grads
    return gw, None if gb is None else 1.25 * gb


def test_the_kernels_as_they_are_pass_and_the_model_is_left_as_it_was(monkeypatch):
    """The check runs the decoder's convolution, the attention and the loss kernels (once, in
    its third pass), finds them within their allowance, and leaves the parameters, their
    gradients, the random number generator and the TF32 settings as they were."""
    model, batch = _model_and_batch()
    conv = _count(monkeypatch, token_conv, "weight_bias_grad")
    attention = _count(monkeypatch, token_attention, "_backward")
    loss = _count(monkeypatch, token_loss, "squared_error_sum")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    first = next(model.parameters())
    first.grad = torch.full_like(first, 7.0)  # a gradient already there stays
    rng = torch.get_rng_state()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = not tf32

    found = kernel_check.check_pretraining(model, batch, CPU, "fp32")

    assert found is not None and found.passed, found
    assert found.failed == [] and found.triton_error < 1e-4  # float32 throughout here
    # backward through the student's 2 decoder layers and 3 blocks (1 prenet + 2 shared)
    assert (len(conv), len(attention), len(loss)) == (2, 3, 1)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert torch.equal(first.grad, torch.full_like(first, 7.0))
    assert all(p.grad is None for p in model.parameters() if p is not first)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.backends.cudnn.allow_tf32 is not tf32
    torch.backends.cudnn.allow_tf32 = tf32
    assert token_conv.disabled() == {} and found.culprits == []


def test_a_bias_gradient_25_percent_off_fails_by_name(monkeypatch):
    """The H200's wrong kernel in small: the decoder's bias gradients 25 % too large, the loss
    exact. The check names a decoder bias, fails nothing outside the decoder, and finds the
    decoder's kernels wrong on their own, the other kinds right."""
    model, batch = _model_and_batch()
    _count(monkeypatch, token_conv, "weight_bias_grad", _biases_25_percent_off)
    found = kernel_check.check_pretraining(model, batch, CPU, "fp32")
    assert found is not None and not found.passed
    assert found.worst.startswith("decoder.") and found.worst.endswith(".0.bias"), found
    assert 0.2 < found.triton_error < 0.3 and found.torch_error < 1e-4
    assert found.failed and all(n.startswith("decoder.") for n in found.failed), found.failed
    assert "loss" not in found.failed
    assert found.culprits == ["decoder"]


@pytest.mark.parametrize("kind", ["attention gradient", "loss", "not finite"])
def test_each_kind_of_wrong_kernel_fails(monkeypatch, kind):
    """A wrong attention backward (the loss exact), a wrong loss, and a NaN in one gradient
    each fail the check, which finds the kind of layer at fault."""
    model, batch = _model_and_batch()
    if kind == "attention gradient":
        _count(monkeypatch, token_attention, "_backward", lambda out: (1.3 * out[0], out[1]))
    elif kind == "loss":
        _count(monkeypatch, token_loss, "squared_error_sum", lambda out: 1.1 * out)
    else:
        _count(monkeypatch, token_conv, "weight_bias_grad", lambda out: (out[0] * math.nan, out[1]))
    found = kernel_check.check_pretraining(model, batch, CPU, "fp32")
    assert found is not None and not found.passed, found
    if kind == "attention gradient":
        assert "loss" not in found.failed and found.worst.startswith("encoder."), found
        assert found.culprits == ["attention"]
    elif kind == "loss":
        assert "loss" in found.failed and found.culprits == ["loss"]
    else:
        assert found.worst.startswith("decoder.") and found.worst.endswith(".0.weight")
        assert math.isnan(found.triton_error) and found.culprits == ["decoder"]


def test_a_kernel_that_cannot_run_fails_the_check_not_the_run(monkeypatch, caplog):
    """A kernel that raises (say, asks a small GPU for more shared memory than it has) makes
    the check fail with the error's first line, and the run go on with the torch ops for that
    kind of layer (the others keep their kernels)."""
    model, batch = _model_and_batch()

    def no_room(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory, required 81920, limit 65536\nmore")

    monkeypatch.setattr(token_attention, "_forward", no_room)
    found = kernel_check.check_pretraining(model, batch, CPU, "fp32")
    assert found is not None and not found.passed and math.isnan(found.triton_error)
    assert (
        found.error == "RuntimeError: out of resources: shared memory, required 81920, limit 65536"
    )
    assert all(p.grad is None for p in model.parameters()) and found.culprits == ["attention"]
    with caplog.at_level(logging.WARNING):
        record = kernel_check.act_on(found, kernel_check.kinds_to_disable(found))
    assert record["kernels_off"] == ["attention"] and record["error"] == found.error
    assert "a kernel failed: RuntimeError: out of resources" in caplog.text
    assert list(token_conv.disabled()) == ["attention"]
    forward = _count(monkeypatch, token_conv, "conv_tokens_forward")
    model(batch.source, batch.mask).loss.backward()  # the torch attention runs
    assert len(forward) == 4  # the decoder keeps its kernels


def test_a_run_whose_check_fails_takes_the_torch_ops(monkeypatch, tmp_path, caplog):
    """``pretrain``: the check runs before the first step; when the decoder's kernels fail, a
    warning says so, every later step runs the decoder on the torch ops (even with
    ``decoder.conv_impl=triton``) and the attention still on its kernel, and
    ``summary.json`` records what it found. With ``train.kernel_check=false`` nothing is
    checked and the kernels stay on."""
    data = make_image_folder(tmp_path / "data", n_per_class=4)
    _count(monkeypatch, token_conv, "weight_bias_grad", _biases_25_percent_off)
    forward = _count(monkeypatch, token_conv, "conv_tokens_forward")
    attention = _count(monkeypatch, token_attention, "_backward")
    cfg = tiny_config("decoder.conv_impl=triton", "train.max_steps=2")
    with caplog.at_level(logging.WARNING):
        trainer.pretrain(cfg, data, tmp_path / "run")
    assert "disagree with the PyTorch ops" in caplog.text and "decoder." in caplog.text
    assert list(token_conv.disabled()) == ["decoder"] and token_conv.is_suspended("decoder")
    # in the check only, its pass with every kernel and its pass with the decoder's alone: 2
    # decoder layers forward + input gradient each (the teacher has no decoder)
    assert len(forward) == 2 * 4
    # 3 student blocks: the check's passes with every kernel and with the attention's alone,
    # then both steps
    assert len(attention) == 2 * 3 + 2 * 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["kernel_check"]["kernels_off"] == ["decoder"]
    assert summary["kernel_check"]["worst"].startswith("decoder.")

    token_conv.enable()
    forward.clear()
    off = tiny_config("decoder.conv_impl=triton", "train.max_steps=2", "train.kernel_check=false")
    trainer.pretrain(off, data, tmp_path / "unchecked")
    assert token_conv.disabled() == {} and len(forward) == 2 * 4  # two steps, checked none
    summary = json.loads((tmp_path / "unchecked" / "summary.json").read_text())
    assert summary["kernel_check"] is None


def test_a_compiled_run_is_checked_eagerly(monkeypatch, tmp_path):
    """``train.compile=true``: the check runs the compiled blocks eagerly, on their kernels
    (no graph is compiled for its few samples); the steps then run the compiled blocks, which
    call no kernel, and the decoder, found wrong, on the torch ops."""
    data = make_image_folder(tmp_path / "data", n_per_class=4)
    _count(monkeypatch, token_conv, "weight_bias_grad", _biases_25_percent_off)
    forward = _count(monkeypatch, token_conv, "conv_tokens_forward")
    attention = _count(monkeypatch, token_attention, "_backward")
    cfg = tiny_config("decoder.conv_impl=triton", "train.max_steps=2", "train.compile=true")
    trainer.pretrain(cfg, data, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    if not kernel_check.checks_compiled_models():  # before PyTorch 2.6: no check, kernels on
        assert summary["kernel_check"] is None and token_conv.disabled() == {}
        return
    assert summary["steps"] == 2 and summary["kernel_check"]["kernels_off"] == ["decoder"]
    # the check's passes with every kernel and with the attention's alone, 3 blocks each; none
    # in the compiled steps
    assert len(attention) == 2 * 3
    assert len(forward) == 2 * 4  # the check's two passes with the decoder's kernels; no step


def test_fine_tuning_checks_the_encoders_kernels_too(monkeypatch, tmp_path, caplog):
    """``finetune``: the check runs the encoder's attention backward even while the encoder is
    to stay frozen at first; a wrong one is found, the run takes the torch attention and its
    result says so. ``kernel_check=false`` skips the check."""
    from data2vec.finetune.heads import ClassificationHead
    from data2vec.finetune.model import FineTuneModel, SupervisedBatch
    from data2vec.finetune.trainer import FineTuneConfig, finetune
    from data2vec.models.registry import build_encoder

    cfg = tiny_config()
    g = torch.Generator().manual_seed(0)
    batches = [
        SupervisedBatch(torch.randn(4, 3, 16, 16, generator=g), None, torch.tensor([0, 1, 0, 1]))
        for _ in range(2)
    ]

    def run(out, *overrides):
        torch.manual_seed(0)
        encoder = build_encoder(cfg)
        model = FineTuneModel(encoder, ClassificationHead(encoder.embed_dim, 2), "classification")
        quiet = ["device=cpu", "num_workers=0", "progress=false", "tensorboard=false"]
        ft = FineTuneConfig.from_overrides([*quiet, "max_steps=2", "eval_every=2", *overrides])
        return finetune(model, batches, batches, ft, out, "classification", encoder_config=cfg)

    backward = _count(monkeypatch, token_attention, "_backward")
    passed = run(tmp_path / "passed", "freeze_encoder_steps=1")
    assert passed.kernel_check["passed"] and passed.kernel_check["kernels_off"] == []
    # 3 blocks in the check's third pass, none in the first step (frozen), 3 in the second
    assert len(backward) == 3 + 3 and token_conv.disabled() == {}

    _count(monkeypatch, token_attention, "_backward", lambda out: (1.3 * out[0], out[1]))
    with caplog.at_level(logging.WARNING):
        failed = run(tmp_path / "failed")
    assert not failed.kernel_check["passed"] and failed.kernel_check["kernels_off"] == ["attention"]
    assert failed.kernel_check["worst"].startswith("encoder.")
    assert "disagree with the PyTorch ops" in caplog.text
    assert token_conv.is_suspended("attention") and not token_conv.is_suspended("decoder")

    token_conv.enable()
    assert run(tmp_path / "unchecked", "kernel_check=false").kernel_check is None


def test_one_ranks_failure_turns_the_kernels_off_on_every_rank(tmp_path):
    """``torchrun``, 2 CPU workers: only rank 1's decoder kernel is wrong. Rank 0's own check
    passes, yet it takes the torch decoder too and says why; its ``summary.json`` records
    both."""
    data = make_image_folder(tmp_path / "data", n_per_class=4)
    overrides = [*TINY, "decoder.conv_impl=triton", "train.max_steps=1", "data.batch_size=4"]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(Path(__file__).parent / "sabotaged_rank.py"), "pretrain", "--preset",
        "image-v2-tiny", "--data", str(data), "--out", str(tmp_path / "run"), *overrides,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 of 2" in proc.stderr
    assert "disagree with the PyTorch ops on this device (on another rank)" in proc.stderr
    assert "disagree with the PyTorch ops on this device (gradient of decoder." in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["kernel_check"]["passed"] and summary["kernel_check"]["kernels_off"] == [
        "decoder"
    ]
