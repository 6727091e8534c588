"""The speed ablations compute what the model computes, only slower: the comparison is fair."""

import pytest
import torch

from data2vec.bench import _synthetic_batch
from data2vec.models.registry import build_model
from tests.conftest import benchmark_module, tiny_config


@pytest.fixture(scope="module")
def ablations():
    with benchmark_module("speed_ablations") as module:
        yield module


def _loss_and_grads(model, batch):
    torch.manual_seed(5)  # the decoder's mask-token noise
    loss = model(batch.source, batch.mask).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss.detach(), grads


def _trace(model, monkeypatch):
    """Rows each first block sees (student, teacher) and calls of SDPA and the fused
    LayerNorm->Linear op, recorded while the model runs."""
    import data2vec.nn.block as block_mod

    seen = {"student": [], "teacher": [], "sdpa": 0, "norm_linear": 0}

    def rows(key):
        return lambda module, args: seen[key].append(args[0].shape[0])

    model.encoder.blocks[0].register_forward_pre_hook(rows("student"))
    model.teacher.model.blocks[0].register_forward_pre_hook(rows("teacher"))

    def counted(key, fn):
        def run(*args, **kwargs):
            seen[key] += 1
            return fn(*args, **kwargs)

        return run

    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted("sdpa", sdpa))
    lnl = block_mod.layer_norm_linear
    monkeypatch.setattr(block_mod, "layer_norm_linear", counted("norm_linear", lnl))
    return seen


@pytest.mark.parametrize("variant", ["teacher_per_clone", "clone_loop", "no_sdpa", "plain_layers"])
def test_each_reverted_choice_gives_the_same_loss_and_gradients(ablations, variant, monkeypatch):
    B, M = 4, 3
    cfg = tiny_config(f"mask.clones={M}")
    model = build_model(cfg).train()
    batch = _synthetic_batch(cfg, B)
    seen = _trace(model, monkeypatch)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    assert seen["student"] == [B * M] and seen["teacher"] == [B]
    assert seen["sdpa"] > 0 and seen["norm_linear"] > 0

    def no_sdpa():
        F = ablations.attention_mod.F
        return ablations._patched(F, "scaled_dot_product_attention", ablations._explicit_attention)

    patch, reverted = {
        "teacher_per_clone": (lambda: ablations._teacher_per_clone(model), {"teacher": [B * M]}),
        "clone_loop": (lambda: ablations._clone_loop(model), {"student": [B] * M}),
        "no_sdpa": (no_sdpa, {"sdpa": 0}),
        "plain_layers": (
            lambda: ablations.plain(model, set(ablations.CHANGES)),
            {"norm_linear": 0},
        ),
    }[variant]
    seen.update(student=[], teacher=[], sdpa=0, norm_linear=0)
    with patch():
        loss, grads = _loss_and_grads(model, batch)
    for key, value in reverted.items():  # the variant really runs the other way
        assert seen[key] == value, (key, seen)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ema_loop_equals_the_foreach_update(ablations):
    cfg = tiny_config()
    torch.manual_seed(1)
    a = build_model(cfg)
    torch.manual_seed(1)
    b = build_model(cfg)  # the same student and teacher
    with torch.no_grad():
        for p in [*a.encoder.parameters(), *b.encoder.parameters()]:
            p.add_(1.0)  # the students move away from their teachers alike
    a.update_teacher(1)
    foreach = torch._foreach_lerp_
    with ablations._ema_loop():
        assert torch._foreach_lerp_ is not foreach  # the loop really runs
        b.update_teacher(1)
    assert torch._foreach_lerp_ is foreach
    for x, y in zip(a.teacher.model.parameters(), b.teacher.model.parameters(), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(next(a.teacher.model.parameters()), next(a.encoder.parameters()))
