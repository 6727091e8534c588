"""The speed ablations compute what the model computes, only slower: the comparison is fair."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from data2vec.bench import _synthetic_batch
from data2vec.models.registry import build_model
from tests.conftest import tiny_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def ablations():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(
            "speed_ablations", BENCHMARKS / "speed_ablations.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def _loss_and_grads(model, batch):
    torch.manual_seed(5)  # the decoder's mask-token noise
    loss = model(batch.source, batch.mask).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss.detach(), grads


@pytest.mark.parametrize("variant", ["teacher_per_clone", "clone_loop", "no_sdpa", "plain_layers"])
def test_each_reverted_choice_gives_the_same_loss_and_gradients(ablations, variant):
    cfg = tiny_config("mask.clones=3")
    model = build_model(cfg).train()
    batch = _synthetic_batch(cfg, 4)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    patch = {
        "teacher_per_clone": lambda: ablations._teacher_per_clone(model),
        "clone_loop": lambda: ablations._clone_loop(model),
        "no_sdpa": lambda: ablations._patched(
            ablations.attention_mod.F, "scaled_dot_product_attention", ablations._explicit_attention
        ),
        "plain_layers": lambda: ablations.plain(model, set(ablations.CHANGES)),
    }[variant]
    with patch():
        loss, grads = _loss_and_grads(model, batch)
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
    with ablations._ema_loop():
        b.update_teacher(1)
    for x, y in zip(a.teacher.model.parameters(), b.teacher.model.parameters(), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(next(a.teacher.model.parameters()), next(a.encoder.parameters()))
