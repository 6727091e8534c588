"""The fused LayerNorm->Linear and attention->projection ops: the plain values, bit for bit,
with one saved tensor fewer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import data2vec.nn.attention as attention
from data2vec.nn.block import PostLNBlock
from data2vec.nn.lean import dropout_attention
from data2vec.nn.lean_fused import (
    _DropoutAttentionProj,
    dropout_attention_proj,
    layer_norm_linear,
)
from tests.conftest import reference_attention_bf16


def _saved(fn, inputs):
    """``fn()`` and the distinct storages autograd saves while it runs, except those of
    ``inputs`` (parameters and leaf inputs: they are kept anyway)."""
    storages: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in inputs}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, storages


def _grads(outs, tensors, seed=7):
    """Gradients of ``sum(<out, random>)`` over ``outs``: every output gets its own gradient."""
    g = torch.Generator().manual_seed(seed)
    total = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return torch.autograd.grad(total, tensors)


def _params(*modules):
    return [p for m in modules for p in m.parameters()]


@pytest.mark.parametrize("bf16", [False, True])
def test_layer_norm_linear__bit_identical_and_y_not_saved(bf16):
    torch.manual_seed(0)
    norm, fc = nn.LayerNorm(16, eps=1e-6), nn.Linear(16, 40)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    z = torch.randn(3, 5, 16, requires_grad=True)
    results = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):

            def run(fused=fused):
                if fused:
                    return layer_norm_linear(z, norm, fc)
                y = norm(z)
                return y, fc(y)

            (y, h), saved = _saved(run, [z, *_params(norm, fc)])
        results.append((y, h, saved, _grads([y, h], [z, *_params(norm, fc)])))
    (y0, h0, saved0, g0), (y1, h1, saved1, g1) = results
    assert h1.dtype == h0.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert torch.equal(y0, y1) and torch.equal(h0, h1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    # the LayerNorm output is no longer kept (under autocast: its bf16 copy, and autocast's
    # bf16 copy of the weight, which backward casts again)
    fewer = y0.numel() * 4 if not bf16 else (y0.numel() + fc.weight.numel()) * 2
    assert sum(saved0.values()) - sum(saved1.values()) == fewer


def test_layer_norm_linear__only_through_the_linear_layer():
    """Without a gradient for ``y`` itself (a pre-LN block): the linear path alone."""
    torch.manual_seed(1)
    norm, fc = nn.LayerNorm(8), nn.Linear(8, 8)
    z = torch.randn(4, 8, requires_grad=True)
    ref = _grads([fc(norm(z))], [z, *_params(norm, fc)])
    lean = _grads([layer_norm_linear(z, norm, fc)[1]], [z, *_params(norm, fc)])
    for a, b in zip(ref, lean):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bf16", [False, True])
def test_dropout_attention_proj__bit_identical_and_output_not_saved(bf16, torch_dropout_draws):
    torch.manual_seed(0)
    B, H, T, d = 2, 3, 6, 4
    proj = nn.Linear(H * d, 10)
    q, k, v = (torch.randn(B, H, T, d, requires_grad=True) for _ in range(3))
    bias = torch.randn(B, H, T, T, requires_grad=True)  # e.g. ALiBi with a learned scale
    results = []
    for fused in (False, True):
        torch.manual_seed(11)  # the same dropout draws
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            dtype = torch.bfloat16 if bf16 else torch.float32
            args = [t.to(dtype) for t in (q, k, v, bias)]

            def run(fused=fused, args=args):
                if fused:
                    return dropout_attention_proj(*args, 0.3, proj)
                if bf16:  # the reference implementation's attention under autocast
                    out = reference_attention_bf16(*args, 0.3)
                else:  # SDPA's CPU composite
                    out = F.scaled_dot_product_attention(*args[:3], args[3], dropout_p=0.3)
                return proj(out.transpose(1, 2).reshape(B, T, H * d))

            out, saved = _saved(run, [q, k, v, bias, *_params(proj)])
        results.append((out, saved, _grads([out], [q, k, v, bias, *_params(proj)])))
    (o0, _, g0), (o1, saved1, g1) = results
    assert o1.dtype == o0.dtype
    assert torch.equal(o0, o1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    # against the lean attention alone, the fused op no longer keeps the merged output
    torch.manual_seed(11)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        _, saved_lean = _saved(
            lambda: proj(dropout_attention(*args, 0.3).transpose(1, 2).reshape(B, T, H * d)),
            [q, k, v, bias, *_params(proj)],
        )
    # (under autocast also autocast's bf16 copy of the weight, which backward casts again)
    fewer = B * T * H * d * 4 if not bf16 else (B * T * H * d + proj.weight.numel()) * 2
    assert sum(saved_lean.values()) - sum(saved1.values()) == fewer


class _NotALayerNorm(nn.Module):
    """Wraps a LayerNorm in another class: the block then takes its plain (unfused) path."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.inner = norm

    def forward(self, x):
        return self.inner(x)


def _sdpa_then_proj(q, k, v, attn_mask, p, proj):
    B, H, T, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
    return proj(out.transpose(1, 2).reshape(B, T, H * d))


@pytest.mark.parametrize("drop", [0.0, 0.2])
def test_post_ln_block__fused_path_equals_the_plain_one(drop, monkeypatch, torch_dropout_draws):
    torch.manual_seed(0)
    block = PostLNBlock(16, 4, mlp_ratio=2.0, attn_drop=drop, proj_drop=drop).train()
    x = torch.randn(2, 7, 16, requires_grad=True)
    params = list(block.parameters())
    runs = []
    for plain in (False, True):
        if plain:
            block.norm1 = _NotALayerNorm(block.norm1)
            monkeypatch.setattr(attention, "dropout_attention_proj", _sdpa_then_proj)
        torch.manual_seed(5)  # the same dropout draws
        out, f = block(x)
        runs.append((out, f, _grads([out, f], [x, *params])))
    (o0, f0, g0), (o1, f1, g1) = runs
    assert torch.equal(o0, o1) and torch.equal(f0, f1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


def test_fused_backward__unchanged_when_called_inside_an_autocast_region():
    """CPU backward runs on the caller's thread; an enclosing autocast must not change the
    fused ops' backward (PyTorch's own backward formulas do change there)."""
    torch.manual_seed(2)
    norm, fc, proj = nn.LayerNorm(12), nn.Linear(12, 12), nn.Linear(12, 12)
    z = torch.randn(2, 5, 12, requires_grad=True)
    probs = torch.rand(2, 3, 5, 5, requires_grad=True)
    v = torch.randn(2, 3, 5, 4, requires_grad=True)
    tensors = [z, probs, v, *_params(norm, fc, proj)]
    grads = []
    for inside in (False, True):
        torch.manual_seed(3)
        y, h = layer_norm_linear(z, norm, fc)
        out = _DropoutAttentionProj.apply(probs, v, 0.25, torch.float32, proj.weight, proj.bias)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            grads.append(_grads([out, y, h], tensors))
    for a, b in zip(*grads):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)
