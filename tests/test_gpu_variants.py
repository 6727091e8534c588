"""``gpu_check.py --variants``' switches for the sixth pass undo how a step waits for the device,
not what it computes: the same step with and without them gives the same loss and update."""

import copy

import pytest
import torch

from data2vec.bench import _synthetic_batch
from data2vec.engine import trainer
from data2vec.models.registry import build_model
from tests.conftest import benchmark_module, image_batch, tiny_config


@pytest.fixture(scope="module")
def variants():
    with benchmark_module("gpu_variants") as module:
        yield module


def _step(model, switch):
    cfg = tiny_config("mask.clones=2")
    device = torch.device("cpu")
    state = trainer.new_state(model, cfg, device)
    torch.manual_seed(3)  # the decoder's mask-token noise
    with switch():
        result = trainer.train_step(state, _synthetic_batch(cfg, 2), cfg, device)
    return result, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["host reads", "before sixth pass"])
def test_sixth_pass_switches_compute_the_same_step(variants, monkeypatch, name):
    switch = {v[0]: v[3] for v in variants.VARIANTS}[name]
    nonzero = []
    original = torch.Tensor.nonzero
    monkeypatch.setattr(
        torch.Tensor, "nonzero", lambda self, *a, **k: nonzero.append(1) or original(self, *a, **k)
    )
    model = build_model(tiny_config("mask.clones=2"))
    ref, ref_weights = _step(copy.deepcopy(model), variants.contextlib.nullcontext)
    assert not nonzero  # the default step finds no rows on the device
    got, weights = _step(model, switch)
    assert nonzero  # the switch brings back the loss's search for the masked rows
    assert got.updated and ref.updated
    assert got.loss == ref.loss and got.grad_norm == ref.grad_norm
    assert all(torch.equal(weights[n], ref_weights[n]) for n in ref_weights)


def test_swapped_conv_switches_set_the_forward_kernel_only_and_restore_it(variants):
    from data2vec.nn import token_conv

    switch = {v[0]: v[3] for v in variants.VARIANTS}["conv swapped 256"]
    forward_settings, weight_grad_settings = token_conv.FORWARD, token_conv.WEIGHT_GRAD
    forward, weight_grad = dict(forward_settings), dict(weight_grad_settings)
    with switch():
        assert forward_settings == {**forward, "SWAP_AB": 1, "BLOCK_M": 256}
        assert weight_grad_settings == weight_grad
    assert forward_settings == forward


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("conv pipelined", {"PIPELINE": 1}),
        ("conv pipelined swapped", {"PIPELINE": 1, "SWAP_AB": 1}),
        ("conv pipelined k32", {"PIPELINE": 1, "BLOCK_K": 32, "num_stages": 4}),
        ("conv 128 registers", {"maxnreg": 128}),
    ],
)
def test_pipelined_conv_switches_set_the_forward_kernel_only_and_restore_it(variants, name, values):
    from data2vec.nn import token_conv

    switch = {v[0]: v[3] for v in variants.VARIANTS}[name]
    forward_settings, weight_grad_settings = token_conv.FORWARD, token_conv.WEIGHT_GRAD
    forward, weight_grad = dict(forward_settings), dict(weight_grad_settings)
    assert forward["PIPELINE"] == 0  # off until measured
    with switch():
        assert forward_settings == {**forward, **values}
        assert weight_grad_settings == weight_grad
    assert (forward_settings, weight_grad_settings) == (forward, weight_grad)


def test_the_mlp_rows_switch_sets_the_mlp_kernels_launch_only_and_restores_it(variants):
    from data2vec.nn import token_mlp

    switch = {v[0]: v[3] for v in variants.VARIANTS}["mlp rows 64"]
    table = token_mlp.LAUNCH
    launch = dict(table)
    assert launch["ROWS_PER_PROGRAM"] != 64
    with switch():
        assert table == {**launch, "ROWS_PER_PROGRAM": 64}
    assert table == launch


def test_the_attention_projection_switch_puts_the_projection_inside_the_kernels_function(
    variants,
):
    from data2vec.nn import token_attention

    switch = {v[0]: v[3] for v in variants.VARIANTS}["attention projection inside"]
    assert not token_attention.PROJECT  # off until measured
    with switch():
        assert token_attention.PROJECT
    assert not token_attention.PROJECT


def test_the_blocks_register_cap_switch_caps_the_norm_and_attention_backward(variants):
    from data2vec.nn import token_attention, token_norm

    switch = {v[0]: v[3] for v in variants.VARIANTS}["blocks 128 registers"]
    assert token_norm.BACKWARD_MAXNREG == token_attention.BACKWARD_MAXNREG == 0  # no caps yet
    with switch():
        assert token_norm.BACKWARD_MAXNREG == token_attention.BACKWARD_MAXNREG == 128
    assert token_norm.BACKWARD_MAXNREG == token_attention.BACKWARD_MAXNREG == 0


def test_the_padded_rows_switch_turns_the_split_off(variants):
    from data2vec.nn import token_layer

    switch = {v[0]: v[3] for v in variants.VARIANTS}["decoder rows padded"]
    assert token_layer.SPLIT_ROWS
    with switch():
        assert not token_layer.SPLIT_ROWS
        assert token_layer.split_launch(8, 768)[1]["BLOCK_B"] == 0
    assert token_layer.split_launch(8, 768)[1]["BLOCK_B"] == 256


def test_the_norm_rows_switch_restores_the_longer_backward_programs(variants):
    from data2vec.nn import token_norm

    switch = {v[0]: v[3] for v in variants.VARIANTS}["norm rows 128"]
    assert token_norm.ROWS_PER_PROGRAM == 32
    with switch():
        assert token_norm.ROWS_PER_PROGRAM == 128
    assert token_norm.ROWS_PER_PROGRAM == 32


def test_the_loss_gathered_switch_gathers_the_targets_as_before(variants, monkeypatch):
    """Under ``"loss gathered"`` the loss is computed on the gathered ``(rows, D)`` targets
    (not a table and an index), the logged target std from them too (the same values up to
    summation order); afterwards the model's functions are restored."""
    from data2vec import targets
    from data2vec.models import data2vec2

    switch = {v[0]: v[3] for v in variants.VARIANTS}["loss gathered"]
    cfg = tiny_config("mask.clones=2")
    model = build_model(cfg)
    x, mask = image_batch(cfg, B=2)
    torch.manual_seed(0)
    now = model(x, mask)
    calls, stds = [], []
    real_loss, real_std = targets.regression_loss, data2vec2.per_dim_std
    monkeypatch.setattr(
        targets,
        "regression_loss",
        lambda pred, y, *a: calls.append(y.shape) or real_loss(pred, y, *a),
    )
    monkeypatch.setattr(data2vec2, "per_dim_std", lambda y: stds.append(y) or real_std(y))
    restored = (data2vec2.regression_loss, data2vec2.per_dim_std_of_rows)
    with switch():
        torch.manual_seed(0)
        before = model(x, mask)
    assert (data2vec2.regression_loss, data2vec2.per_dim_std_of_rows) == restored
    rows = (int(mask.sum()), cfg.model.embed_dim)
    assert calls[0] == rows  # the regression term on the gathered rows (then the CLS term)
    assert len(stds) == 2 and stds[0].shape == rows and stds[0].requires_grad is False
    torch.testing.assert_close(real_std(stds[0]), now.logs["target_std"], rtol=1e-6, atol=0)
    torch.testing.assert_close(before.loss, now.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(before.logs["target_std"], now.logs["target_std"], rtol=1e-6, atol=0)
    assert not torch.equal(stds[0], stds[1])  # the targets' std, then the predictions'


def test_the_gpu_session_script_names_only_variants_that_exist(variants):
    """A misspelt variant in ``gpu_session.sh`` would cost a GPU session's run: every name
    after ``--variants`` is one of ``VARIANTS``."""
    import shlex
    from pathlib import Path

    script = Path(variants.__file__).with_name("gpu_session.sh").read_text()
    words = shlex.split(script.replace("\\\n", " "), comments=True)
    names = []
    for i, word in enumerate(words):
        if word == "--variants":
            for name in words[i + 1 :]:
                if name.startswith("--") or name == "run":
                    break
                names.append(name)
    assert len(names) >= 5, names
    known = {v[0] for v in variants.VARIANTS}
    assert [n for n in names if n not in known] == []
