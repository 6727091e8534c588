"""The fused ``LayerNorm(x + a)`` of post-LN blocks against the plain ops, under Triton's CPU
interpreter.

Collected only by ``test_token_kernels.py``, which runs this file in a fresh process with
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from data2vec.bench import _synthetic_batch
from data2vec.config import load_config
from data2vec.models.registry import build_model
from data2vec.nn import token_norm
from data2vec.nn.block import PostLNBlock, run_blocks
from data2vec.nn.token_norm import add_layer_norm
from tests.conftest import rel

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_token_kernels.py"


def _norm(C: int, g: torch.Generator) -> nn.LayerNorm:
    norm = nn.LayerNorm(C, eps=1e-6)
    with torch.no_grad():  # not the identity init, so that weight and bias matter
        norm.weight.copy_(1 + 0.5 * torch.randn(C, generator=g))
        norm.bias.copy_(0.5 * torch.randn(C, generator=g))
    return norm


# (rows, channels, a's dtype, which output gradients): 300 rows span three backward programs
# (128 rows each, the last one partial); 24 channels are not a power of two
CASES = [
    (300, 24, torch.float32, "both"),
    (300, 24, torch.float16, "both"),
    (37, 40, torch.bfloat16, "both"),
    (37, 40, torch.float16, "y"),
    (37, 40, torch.float16, "low"),
]


@pytest.mark.parametrize("case", CASES)
def test_add_layer_norm_matches_plain_ops(case):
    M, C, a_dtype, used = case
    g = torch.Generator().manual_seed(0)
    norm = _norm(C, g)
    x = (2 + 3 * torch.randn(M, C, generator=g)).requires_grad_()
    a = torch.randn(M, C, generator=g).to(a_dtype).requires_grad_()
    gy, glow = torch.randn(M, C, generator=g), torch.randn(M, C, generator=g)
    params = [x, a, norm.weight, norm.bias]

    def loss(y, low):
        total = 0
        if used in ("both", "y"):
            total = total + (y * gy).sum()
        if used in ("both", "low"):
            total = total + (low.float() * glow).sum()
        return total

    y, low = add_layer_norm(x, a, norm, torch.float16)
    assert y.dtype == torch.float32 and low.dtype == torch.float16
    got = torch.autograd.grad(loss(y, low), params)
    ref_y = norm(x + a)  # float32: a float32 residual plus any branch dtype
    ref = torch.autograd.grad(loss(ref_y, ref_y.half()), params)
    assert rel(y, ref_y) < 1e-6
    assert torch.equal(low, y.half())
    # float16: round to nearest, as torch. bfloat16: Triton 3.6's interpreter truncates
    # float32 to bfloat16 (1.0 + 2**-8 + 2**-12 -> 1.0; a GPU rounds to nearest), so a
    # gradient may be one bf16 step (2**-8 relative) off
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2**-7}
    for name, a_, b_ in zip(("x", "a", "weight", "bias"), got, ref):
        assert a_.dtype == b_.dtype, name
        assert rel(a_, b_) < tol[b_.dtype], name
    with torch.no_grad():  # the no-grad path (teacher): the same values, nothing kept
        y2, low2 = add_layer_norm(x, a, norm, torch.float16)
    assert torch.equal(y2, y) and torch.equal(low2, low)


def _blocks(impl: str, seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    blocks = nn.ModuleList(
        PostLNBlock(32, 4, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), norm_impl=impl)
        for _ in range(2)
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in blocks:
            for norm in (blk.norm1, blk.norm2):
                norm.weight.copy_(1 + 0.3 * torch.randn(32, generator=g))
                norm.bias.copy_(0.3 * torch.randn(32, generator=g))
    return blocks


def _run(blocks: nn.ModuleList, x: torch.Tensor):
    """Two stacked blocks under float16 autocast: outputs, FFN outputs, input and parameter
    gradients of a loss on both."""
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        outs = list(run_blocks(blocks, x, None))
    g = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o, _ in outs)
    loss = loss + sum((f.float() * torch.randn(f.shape, generator=g)).sum() for _, f in outs)
    grads = torch.autograd.grad(loss, [x, *blocks.parameters()])
    return outs, grads


def test_blocks_with_fused_norms_match_the_torch_blocks():
    """Two stacked blocks (the second reads the first's low-precision copy). float16 stands in
    for bfloat16 (the interpreter's bf16 matrix products are wrong); the same roundings happen
    on both paths, so they agree to float16 rounding flips (measured: outputs 2e-5, gradients
    6e-4 of the largest). The FFN outputs are float16 themselves: one rounding flip near their
    largest value is up to 2**-10 of it (2.8e-4 measured on a CPU with AVX512-FP16 and AMX,
    under 1e-4 on the machines before it)."""
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(3))
    fused, torch_blocks = _blocks("triton"), _blocks("torch")
    with torch.autocast("cpu", dtype=torch.float16):
        assert fused[0].uses_fused_norms(x) and not torch_blocks[0].uses_fused_norms(x)
    assert not fused[0].uses_fused_norms(x)  # no autocast: nothing to gain, plain ops
    (outs, grads), (ref_outs, ref_grads) = _run(fused, x), _run(torch_blocks, x)
    for (o, f), (ro, rf) in zip(outs, ref_outs):
        assert o.dtype == ro.dtype == torch.float32 and f.dtype == rf.dtype
        assert rel(o, ro) < 1e-4 and rel(f, rf) < 1e-3
    names = ["x"] + [n for n, _ in fused.named_parameters()]
    for name, a_, b_ in zip(names, grads, ref_grads):
        assert a_.dtype == b_.dtype, name
        assert rel(a_, b_) < 5e-3, name


def _float32_output(embed):
    def run(source, padding_mask=None):
        local, pad = embed(source, padding_mask)
        return local.float(), pad

    return run


def _model_step(impl: str):
    """Loss and gradients of one image-v2-tiny step (prenet, shared blocks, EMA teacher)
    under float16 autocast, with ``model.norm_impl=impl``."""
    cfg = load_config(
        "image-v2-tiny", [f"model.norm_impl={impl}", "data.batch_size=2", "mask.clones=2"]
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _synthetic_batch(cfg, 2)
    # CUDA autocast runs LayerNorm in float32, so there the residual stream is float32 from the
    # first norm on; CPU autocast runs it in its input's dtype, and the float16 patch embedding
    # would make the whole stream float16 (not a case the fused norms take). A float32
    # embedding (the student's and the teacher's own) gives the CPU run CUDA's float32 stream.
    for modality in (model.encoder.modality, model.teacher.model.modality):
        modality.embed = _float32_output(modality.embed)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(batch.source, batch.mask).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


def test_model_with_fused_norms_matches_the_torch_model(monkeypatch):
    """Every post-LN block of the student and the teacher takes the fused path (the teacher's
    targets are part of the loss), and the loss and every gradient agree with the plain ops."""
    calls = []
    fused = token_norm.add_layer_norm
    monkeypatch.setattr(token_norm, "add_layer_norm", lambda *a: calls.append(1) or fused(*a))
    loss, grads = _model_step("triton")
    # student and teacher: 1 prenet + 4 shared blocks each, two norms per block
    assert len(calls) == 2 * 5 * 2
    ref_loss, ref_grads = _model_step("torch")
    assert len(calls) == 20
    loss, ref_loss = float(loss.detach()), float(ref_loss.detach())
    assert abs(loss - ref_loss) < 1e-4 * abs(ref_loss), (loss, ref_loss)  # measured 4e-6
    worst = max(rel(a, b) for a, b in zip(grads, ref_grads))
    assert worst < 5e-3, worst  # measured 1.3e-3


def test_compiled_blocks_run_the_torch_norms(monkeypatch):
    """Inside ``torch.compile`` the blocks leave the norms to Inductor (plain ops)."""
    block = _blocks("triton")[0]
    x = torch.randn(2, 3, 32)
    with torch.autocast("cpu", dtype=torch.float16):
        assert block.uses_fused_norms(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not block.uses_fused_norms(x)


def test_bench_reports_the_fused_norms():
    from data2vec.bench import block_norms

    for impl, label in (("triton", "triton"), ("torch", "torch")):
        cfg = load_config("image-v2-tiny", [f"model.norm_impl={impl}"])
        model = build_model(cfg)
        assert block_norms(model, torch.device("cpu"), "bf16") == label
        assert block_norms(model, torch.device("cpu"), "fp32") == "torch"  # no autocast


def test_bench_reports_the_attention_and_mlp_kernels(monkeypatch):
    """Under the interpreter the CPU takes the Triton attention and MLP backward (any dtype
    there); without them, SDPA and the memory-lean MLP."""
    from data2vec.bench import block_kernels
    from data2vec.nn import token_attention, token_mlp

    model = build_model(load_config("image-v2-tiny"))
    cpu = torch.device("cpu")
    assert block_kernels(model, cpu, "bf16") == {
        "attention": f"triton up to {token_attention.MAX_TOKENS} tokens",
        "mlp_backward": "triton",
    }
    monkeypatch.setattr(token_attention, "MAX_TOKENS", 0)
    monkeypatch.setattr(token_mlp, "ENABLED", False)
    assert block_kernels(model, cpu, "bf16") == {"attention": "sdpa", "mlp_backward": "torch"}
    assert block_kernels(torch.nn.Linear(2, 2), cpu, "bf16") == {
        "attention": None,
        "mlp_backward": None,
    }
