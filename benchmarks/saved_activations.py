"""Where the memory of a training step goes: bytes autograd keeps for backward, per change.

Runs one forward pass of a preset on synthetic input and sums the distinct storages saved for
backward (parameters excluded), first with every memory-lean layer of ``data2vec/nn/lean.py``
switched back to the plain PyTorch composition, then turning them on one at a time. Unlike
peak RSS this is exact and does not depend on the allocator or on other processes, so it says
what each change buys. One JSON object per preset.

python benchmarks/saved_activations.py image-v2-base:8 text-v2-base:8 audio-v2-base:4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import data2vec.modalities.audio as audio
import data2vec.models.data2vec2 as d2v2
import data2vec.models.decoders as decoders
import data2vec.nn.attention as attention
import data2vec.nn.block as block
import data2vec.nn.lean as lean
from data2vec.bench import _synthetic_batch
from data2vec.config import load_config
from data2vec.models.registry import build_model
from data2vec.nn.block import Mlp
from data2vec.nn.lean import LeanDropout

CHANGES = ("mlp_gelu_recompute", "decoder_norm_act_recompute", "bool_dropout_masks",
           "dropout_attention", "l2_loss_saves_difference",
           "audio_conv_norm_act_recompute", "norm1_fc1_fused",
           "attention_proj_fused")  # fmt: skip


def _plain_chain(x, *modules):
    for m in modules:
        x = m(x)
    return x


def _plain_conv_after(x, pre, params, conv):
    return lean.conv1d_any(pre(x, *params), conv.weight, conv.bias, lean.conv1d_args(conv))


def _plain_attention(q, k, v, attn_mask, p):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)


# what the unfused attention runs: the lean dropout attention, or plain SDPA
_ATTENTION = {"fn": lean.dropout_attention}


def _plain_norm_linear(z, norm, linear):
    y = norm(z)
    return y, linear(y)


def _unfused_attention_proj(q, k, v, attn_mask, p, proj):
    """The lean attention, then the projection on its kept output."""
    B, H, T, d = q.shape
    out = _ATTENTION["fn"](q, k, v, attn_mask, p)
    return proj(out.transpose(1, 2).reshape(B, T, H * d))


def _plain_loss(pred, target, beta=0.0, scale=None, index=None):
    """The regression loss as it was: ``F.mse_loss`` keeps both of its inputs (and the
    targets gathered first, where they come as a table and an index)."""
    target = target if index is None else target[index]
    pred, target = pred.float(), target.float()
    if beta == 0:
        loss = F.mse_loss(pred, target, reduction="sum")
    else:
        loss = F.smooth_l1_loss(pred, target, reduction="sum", beta=beta)
    return loss * (scale if scale is not None else 1.0 / math.sqrt(pred.shape[-1]))


@contextlib.contextmanager
def plain(model: nn.Module, off: set[str]) -> Iterator[None]:
    """Switch the named lean changes back to the plain ops for the duration."""
    saved = {
        "chain": decoders.checkpoint_elementwise,
        "loss": d2v2.regression_loss,
        "conv_after": audio.conv1d_after,
        "audio_chain": audio.checkpoint_elementwise,
        "norm_linear": block.layer_norm_linear,
        "attn_proj": attention.dropout_attention_proj,
    }
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    lean_flags = [m.recompute_act for m in mlps]
    drop_forward = LeanDropout.forward
    try:
        if "mlp_gelu_recompute" in off:
            for m in mlps:
                m.recompute_act = False
        if "decoder_norm_act_recompute" in off:
            decoders.checkpoint_elementwise = _plain_chain
        if "bool_dropout_masks" in off:
            LeanDropout.forward = nn.Dropout.forward  # type: ignore[method-assign]
        if "attention_proj_fused" in off:
            attention.dropout_attention_proj = _unfused_attention_proj
        if "dropout_attention" in off:
            _ATTENTION["fn"] = _plain_attention
        if "l2_loss_saves_difference" in off:
            d2v2.regression_loss = _plain_loss
        if "audio_conv_norm_act_recompute" in off:
            audio.conv1d_after = _plain_conv_after
            audio.checkpoint_elementwise = _plain_chain
        if "norm1_fc1_fused" in off:
            block.layer_norm_linear = _plain_norm_linear
        yield
    finally:
        for m, flag in zip(mlps, lean_flags):
            m.recompute_act = flag
        decoders.checkpoint_elementwise = saved["chain"]
        LeanDropout.forward = drop_forward  # type: ignore[method-assign]
        _ATTENTION["fn"] = lean.dropout_attention
        d2v2.regression_loss = saved["loss"]
        audio.conv1d_after = saved["conv_after"]
        audio.checkpoint_elementwise = saved["audio_chain"]
        block.layer_norm_linear = saved["norm_linear"]
        attention.dropout_attention_proj = saved["attn_proj"]


def saved_bytes(model: nn.Module, batch, seed: int = 0) -> int:
    """Bytes of the distinct non-parameter storages one forward pass keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            sizes[s.data_ptr()] = s.nbytes()
        # A detached alias: returning ``t`` itself would tie saved outputs to their own
        # grad_fn in a cycle no garbage collector frees (backward never runs here).
        return t.detach()

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch.source, batch.mask, batch.padding_mask)
    del out
    return sum(sizes.values())


def breakdown(preset: str, batch: int | None) -> dict[str, Any]:
    extra = [] if batch is None else [f"data.batch_size={batch}"]
    cfg = load_config(preset, extra)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).train()
    data = _synthetic_batch(cfg, cfg.data.batch_size)
    steps = []
    for i in range(len(CHANGES) + 1):
        with plain(model, set(CHANGES[i:])):
            steps.append(saved_bytes(model, data) / 2**20)
    return {
        "preset": preset,
        "batch": cfg.data.batch_size,
        "saved_mib_plain": steps[0],
        "saved_mib_lean": steps[-1],
        "saved_mib_by_change": {c: steps[i] - steps[i + 1] for i, c in enumerate(CHANGES)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="PRESET[:BATCH]")
    args = p.parse_args()
    for run in args.runs:
        preset, _, batch = run.partition(":")
        print(json.dumps(breakdown(preset, int(batch) if batch else None)), flush=True)


if __name__ == "__main__":
    main()
