"""Code switches for ``gpu_check.py --variants``: earlier versions of changed code, and
settings, each applied around the steps of one variant so that variants alternate in one
process (a GPU's speed drifts between lends and over minutes).

Each entry of :data:`VARIANTS` is ``(name, config overrides, memory-lean layers switched to the
plain ops, code switch)``; a code switch is a context manager factory.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from gpu_kernels import conv_settings, patched, settings  # sibling script module

from data2vec import targets
from data2vec.engine import trainer
from data2vec.masking import MaskInfo, select_positions
from data2vec.models import data2vec2, decoders
from data2vec.nn import (
    attention,
    token_attention,
    token_conv,
    token_layer,
    token_mlp,
    token_norm,
)

# the functions the sixth pass's switches wrap, as they are without a switch
_FORWARD_LOSS, _FORWARD = data2vec2.Data2Vec2.forward_loss, data2vec2.Data2Vec2.forward
_WEIGHT_BIAS_GRAD = token_conv.weight_bias_grad


def _heads_permuted() -> contextlib.AbstractContextManager:
    """The attention's heads split as before ``split_heads`` (move, then unbind), whose
    backward copies the q/k/v gradient once more."""

    def permuted(qkv: torch.Tensor, num_heads: int):
        B, T, C3 = qkv.shape
        parts = qkv.view(B, T, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
        return parts.unbind(0)

    return patched((attention, "split_heads", permuted))


def _sdpa(backend: str):
    """A code switch: attention through one SDPA backend only (``torch.nn.attention``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return functools.partial(sdpa_kernel, [getattr(SDPBackend, backend)])


def _decoder_input_before(self, student, mask, noise=None):
    """``Data2Vec2.decoder_input`` before the fifth pass: noise drawn for the masked slots and
    both parts placed by boolean-mask assignments."""
    visible = data2vec2.lean_dropout(student.tokens, self.decoder_input_dropout, self.training)
    N, V, D = visible.shape
    T = mask.mask.shape[1]
    if noise is None:
        noise = visible.new_empty(N * (T - V), D).normal_(0.0, self.noise_std)
    full = visible.new_empty(N, T, D)
    full[mask.mask] = noise.to(visible.dtype)
    full[~mask.mask] = visible.reshape(N * V, D)
    return full


def _decoder_forward_before(self, x, mask=None, padding_mask=None):
    """``ConvDecoder.forward`` before the fifth pass: the projection reads the float32 output
    (autocast casts the gathered rows)."""
    h = self.forward_features(x, padding_mask)
    return self.proj(select_positions(h, mask))


@torch.no_grad()
def _per_dim_std_before(x):
    x = x.float().reshape(-1, x.shape[-1])
    return torch.sqrt(x.var(dim=0) + 1e-6).mean()


def _loss_gathered() -> contextlib.AbstractContextManager:
    """The loss as before the ninth pass: the targets gathered into one ``(rows, D)`` float32
    tensor, from which the loss and the logged target std are computed."""
    gathered = {}

    def loss(pred, table, beta=0.0, scale=None, index=None):
        if index is not None:
            table = gathered["y"] = table[index]
        return targets.regression_loss(pred, table, beta, scale)

    def target_std(table, counts):
        return data2vec2.per_dim_std(gathered.pop("y"))

    return patched(
        (data2vec2, "regression_loss", loss), (data2vec2, "per_dim_std_of_rows", target_std)
    )


@contextlib.contextmanager
def _glue_before() -> Iterator[None]:
    """The fifth pass's changes around the decoder and the loss undone (the attention kept;
    the loss's targets gathered, as they were then)."""

    class Composition:
        @staticmethod
        def apply(pred, target):
            return (pred - target).square().sum()

    with (
        _loss_gathered(),
        patched(
            (data2vec2.Data2Vec2, "decoder_input", _decoder_input_before),
            (decoders.ConvDecoder, "forward", _decoder_forward_before),
            (data2vec2, "per_dim_std", _per_dim_std_before),
            (targets, "_SquaredErrorSum", Composition),
        ),
    ):
        yield


def _attention_sdpa() -> contextlib.AbstractContextManager:
    """Every attention through SDPA (the short-sequence Triton kernels off)."""
    return patched((token_attention, "MAX_TOKENS", 0))


@contextlib.contextmanager
def _before_fifth_pass() -> Iterator[None]:
    with _glue_before(), _attention_sdpa(), patched((token_mlp, "ENABLED", False)):
        yield


def _forward_loss_from_mask(self, pred, targets, student, loss_mask, loss_rows=None):
    """``Data2Vec2.forward_loss`` before the sixth pass: the masked rows found on the device
    (``nonzero``: the host waits for the GPU)."""
    return _FORWARD_LOSS(self, pred, targets, student, loss_mask)


def _forward_reading_loss(self, *args, **kwargs):
    """``Data2Vec2.forward`` reading its loss before backward, as the step did before the
    sixth pass (a wait for the GPU between the forward and the backward pass)."""
    out = _FORWARD(self, *args, **kwargs)
    float(out.loss.detach())
    return out


@contextlib.contextmanager
def _host_reads() -> Iterator[None]:
    """The sixth pass's removal of the step's waits for the GPU undone: the decoder and the
    loss find the masked rows on the device, the loss is read before backward, the optimizer
    step is prepared after the read (the mask is still checked on the host). The masked rows
    are gathered by boolean indexing again, as before."""
    with patched(
        (MaskInfo, "masked_rows", lambda self: self.mask),
        (data2vec2.Data2Vec2, "forward_loss", _forward_loss_from_mask),
        (data2vec2.Data2Vec2, "forward", _forward_reading_loss),
        (trainer, "_fused", lambda opt: False),
    ):
        yield


def _conv_bias_pass() -> contextlib.AbstractContextManager:
    """The decoder convolutions' bias gradient as a separate column sum (before the sixth pass)."""

    def weight_bias_grad(x, gy, hw, weight, groups, bias=False):
        gw, _ = _WEIGHT_BIAS_GRAD(x, gy, hw, weight, groups, bias=False)
        return gw, gy.sum(0, dtype=torch.float32) if bias else None

    return patched((token_conv, "weight_bias_grad", weight_bias_grad))


@contextlib.contextmanager
def _before_sixth_pass() -> Iterator[None]:
    with _host_reads(), _conv_bias_pass():
        yield


# (name, config overrides, memory-lean layers switched to the plain ops, code switch)
VARIANTS = [
    ("default", (), False, contextlib.nullcontext),
    ("model.norm_impl=torch", ("model.norm_impl=torch",), False, contextlib.nullcontext),
    ("plain layers", (), True, contextlib.nullcontext),
    ("plain layers, model.norm_impl=torch", ("model.norm_impl=torch",), True,
     contextlib.nullcontext),
    ("train.compile=true", ("train.compile=true",), False, contextlib.nullcontext),
    ("train.compile=true model.norm_impl=torch", ("train.compile=true", "model.norm_impl=torch"),
     False, contextlib.nullcontext),
    ("conv taps", (), False, functools.partial(conv_settings, PACK_K=0)),
    ("conv packed", (), False, functools.partial(conv_settings, PACK_K=1)),
    # the forward kernel's settings only (it also computes the input gradient)
    ("conv swapped", (), False, functools.partial(settings, token_conv.FORWARD, SWAP_AB=1)),
    ("conv swapped 256", (), False,
     functools.partial(settings, token_conv.FORWARD, SWAP_AB=1, BLOCK_M=256)),
    # the forward kernel's packed steps as a pipelined loop (seventh pass)
    ("conv pipelined", (), False, functools.partial(settings, token_conv.FORWARD, PIPELINE=1)),
    ("conv pipelined swapped", (), False,
     functools.partial(settings, token_conv.FORWARD, PIPELINE=1, SWAP_AB=1)),
    # the fastest forward of the H200's sweep, 10.6 % under the default alone (tenth pass)
    ("conv pipelined k32", (), False,
     functools.partial(settings, token_conv.FORWARD, PIPELINE=1, BLOCK_K=32, num_stages=4)),
    # register caps, so that more programs share a multiprocessor (eighth pass)
    ("conv 128 registers", (), False,
     functools.partial(settings, token_conv.FORWARD, maxnreg=128)),
    ("blocks 128 registers", (), False,
     lambda: patched((token_norm, "BACKWARD_MAXNREG", 128),
                      (token_attention, "BACKWARD_MAXNREG", 128))),
    ("heads permuted", (), False, _heads_permuted),
    ("sdpa flash", (), False, _sdpa("FLASH_ATTENTION")),
    ("sdpa efficient", (), False, _sdpa("EFFICIENT_ATTENTION")),
    ("sdpa cudnn", (), False, _sdpa("CUDNN_ATTENTION")),
    ("attention sdpa", (), False, _attention_sdpa),
    ("glue before", (), False, _glue_before),
    ("before fifth pass", (), False, _before_fifth_pass),
    ("lean mlp", (), False, lambda: patched((token_mlp, "ENABLED", False))),
    # the MLP kernel's best launch of the H200's sweep (0.78 against 0.85 ms, one run)
    ("mlp rows 64", (), False, functools.partial(settings, token_mlp.LAUNCH, ROWS_PER_PROGRAM=64)),
    ("norms from 16384 rows", (), False, lambda: patched((token_norm, "MIN_ROWS", 16384))),
    ("norms at any size", (), False, lambda: patched((token_norm, "MIN_ROWS", 0))),
    # the fused projection inside the attention's autograd function (eighth pass)
    ("attention projection inside", (), False,
     lambda: patched((token_attention, "PROJECT", True))),
    ("decoder rows padded", (), False, lambda: patched((token_layer, "SPLIT_ROWS", False))),
    ("norm rows 128", (), False, lambda: patched((token_norm, "ROWS_PER_PROGRAM", 128))),
    # the loss's targets gathered, then the torch ops (the ninth pass undone)
    ("loss gathered", (), False, _loss_gathered),
    ("host reads", (), False, _host_reads),
    ("conv bias pass", (), False, _conv_bias_pass),
    ("before sixth pass", (), False, _before_sixth_pass),
]  # fmt: skip
