"""Opt-in memory/speed options of data2vec 2.0 and the precision contract of mixed precision."""

import pytest
import torch

from data2vec.engine.runtime import autocast
from data2vec.engine.trainer import new_state
from data2vec.errors import UserError
from data2vec.models.registry import build_model
from tests.conftest import image_batch, tiny_config


def _loss_and_grads(cfg, x, mask):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    torch.manual_seed(1)  # same dropout and decoder-noise draws in both runs
    out = model(x, mask)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing__same_loss_and_gradients(dropout):
    drops = [f"model.{k}={dropout}" for k in ("encoder_dropout", "post_mlp_dropout")]
    base = tiny_config(*drops)
    x, mask = image_batch(base)
    loss, grads = _loss_and_grads(base, x, mask)
    loss_ckpt, grads_ckpt = _loss_and_grads(
        tiny_config(*drops, "model.activation_checkpointing=true"), x, mask
    )
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_activation_checkpointing__keeps_fewer_tensors_for_backward():
    def saved_bytes(cfg):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        x, mask = image_batch(cfg)
        sizes: dict[int, int] = {}

        def pack(t):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t.detach()  # not t: a saved output would hold its grad_fn in a cycle

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, mask)
        return sum(sizes.values())

    plain = saved_bytes(tiny_config("model.depth=4"))
    ckpt = saved_bytes(tiny_config("model.depth=4", "model.activation_checkpointing=true"))
    assert ckpt < 0.8 * plain


def test_bf16_autocast__fp32_targets_loss_and_master_weights():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x, mask = image_batch(cfg)
    seen = {}
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.update(block=o[0].dtype))
    orig = model.forward_loss

    def spy(pred, targets, *rest):
        seen.update(pred=pred.dtype, targets=targets.dtype)
        return orig(pred, targets, *rest)

    model.forward_loss = spy
    with autocast(torch.device("cpu"), "bf16"):
        out = model(x, mask)
    out.loss.backward()
    assert seen == {"block": torch.bfloat16, "pred": torch.bfloat16, "targets": torch.float32}
    assert out.loss.dtype == torch.float32
    params = list(model.parameters()) + list(model.teacher.model.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_train_compile__compiles_the_blocks_in_place(monkeypatch):
    compiled = []

    def fake_compile(fn, **kwargs):  # the real one takes ~25 s on 2 cores: see data2vec/compile.py
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = tiny_config("train.compile=true")
    model = build_model(cfg)
    names = [n for n, _ in model.named_parameters()]
    new_state(model, cfg, torch.device("cpu"))
    blocks = cfg.model.depth + cfg.encoder.prenet_depth
    assert len(compiled) == 1 + blocks  # the compiler check, then every block
    assert [n for n, _ in model.named_parameters()] == names


def test_train_compile__clear_error_when_torch_compile_fails(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    cfg = tiny_config("train.compile=true")
    with pytest.raises(UserError, match=r"train.compile=true.*C\+\+ compiler.*train.compile=false"):
        new_state(build_model(cfg), cfg, torch.device("cpu"))
