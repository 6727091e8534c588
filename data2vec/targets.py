"""Teacher targets and the regression loss of data2vec (Baevski et al. 2022, §3 / §3.3).

Targets: take the teacher's top-K block outputs (the FFN output before the last residual),
normalize each layer, average them, and normalize the average. All in fp32, eps 1e-5, no affine
(fairseq ``make_targets``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from data2vec.nn import token_loss

Norm = Literal["instance", "layer", "none"]
EPS = 1e-5


def instance_norm_over_time(x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Normalize each (sample, channel) over the time axis.

    ``x: (B, T, D)`` -> ``(x - mean_T) / sqrt(var_T + 1e-5)`` with the biased variance, as
    ``F.instance_norm`` on ``(B, D, T)``. With ``padding_mask: (B, T)`` (True = padding) the
    statistics use the valid positions only (fairseq includes padding: pass None for that).
    """
    x = x.float()
    if padding_mask is None:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
    else:
        w = (~padding_mask).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        n = w.sum(dim=1, keepdim=True).clamp_min(1.0)
        mean = (x * w).sum(dim=1, keepdim=True) / n
        var = (((x - mean) * w) ** 2).sum(dim=1, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + EPS)


def normalize(x: Tensor, kind: Norm, padding_mask: Tensor | None = None) -> Tensor:
    """Apply one target normalization to ``x: (B, T, D)`` (fp32 out)."""
    if kind == "instance":
        return instance_norm_over_time(x, padding_mask)
    if kind == "layer":
        return F.layer_norm(x.float(), x.shape[-1:], eps=EPS)
    return x.float()


class TopKTargets:
    """Streaming top-K target average: layers go in one at a time, lowest first.

    Only the running sum is kept, never the K layers, so the teacher can drop each block's
    output as soon as it has been added. ``build_targets`` on a list gives the same values.

    Args:
        num_layers: how many layers will be added in total.
        top_k: how many of the last layers to average.
        layer_norm: per-layer normalization.
        final_norm: normalization of the average.
        padding_mask: ``(B, T)``, True = padding: excluded from instance-norm statistics.
    """

    def __init__(
        self,
        num_layers: int,
        top_k: int,
        layer_norm: Norm,
        final_norm: Norm,
        padding_mask: Tensor | None = None,
    ) -> None:
        if not 0 < top_k <= num_layers:
            raise ValueError(f"top_k={top_k} but only {num_layers} layers")
        self.num_layers = num_layers
        self.top_k = top_k
        self.layer_norm = layer_norm
        self.final_norm = final_norm
        self.padding_mask = padding_mask
        self.seen = 0
        self.total: Tensor | None = None

    @torch.no_grad()
    def add(self, layer: Tensor) -> None:
        """Add the next layer result ``(B, T, D)`` (ignored below the top K)."""
        self.seen += 1
        if self.seen > self.num_layers:
            raise ValueError(f"more than the announced {self.num_layers} layers were added")
        if self.seen <= self.num_layers - self.top_k:
            return
        y = normalize(layer, self.layer_norm, self.padding_mask)
        self.total = y if self.total is None else self.total.add_(y)

    @torch.no_grad()
    def result(self) -> Tensor:
        """``(B, T, D)`` float32 targets: the normalized average of the top K."""
        if self.seen != self.num_layers or self.total is None:
            raise ValueError(f"{self.seen} of {self.num_layers} layers were added")
        return normalize(self.total.div_(self.top_k), self.final_norm, self.padding_mask)


@torch.no_grad()
def build_targets(
    layer_results: list[Tensor],
    top_k: int,
    layer_norm: Norm,
    final_norm: Norm,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """Average of the normalized top-K layer results, then the final normalization.

    Args:
        layer_results: one ``(B, T, D)`` per shared block, lowest first, without extra tokens.
        top_k: how many of the last layers to average.
        layer_norm: per-layer normalization.
        final_norm: normalization of the average.
        padding_mask: ``(B, T)``, True = padding: excluded from instance-norm statistics.

    Returns:
        ``(B, T, D)`` float32 targets.
    """
    acc = TopKTargets(len(layer_results), top_k, layer_norm, final_norm, padding_mask)
    for layer in layer_results:
        acc.add(layer)
    return acc.result()


class _SquaredErrorSum(torch.autograd.Function):
    """``((pred - target)²).sum()`` in float32, for a float32 ``target`` that needs no gradient:
    the composition's value, bit for bit, with a backward that writes ``2 g (pred - target)``
    straight in ``pred``'s dtype. The composition's backward wrote it in float32, then cast it
    (on a GPU, where these passes are memory-bound, 2 GB less traffic per step at
    image-v2-base batch 128)."""

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        diff = pred - target  # bf16 promoted exactly, as .float() would
        ctx.save_for_backward(diff)
        ctx.dtype = pred.dtype
        return diff.square().sum()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (diff,) = ctx.saved_tensors
        grad = torch.empty(diff.shape, device=diff.device, dtype=ctx.dtype)
        return torch.mul(diff, 2 * g, out=grad), None


def regression_loss(
    pred: Tensor,
    target: Tensor,
    beta: float = 0.0,
    scale: float | None = None,
    index: Tensor | None = None,
) -> Tensor:
    """Element-wise regression loss, summed.

    ``mse`` for ``beta == 0`` else smooth-L1 with ``beta``, times ``scale`` (default ``1/sqrt(D)``),
    summed over all elements (the caller divides by the number of masked tokens).

    Args:
        pred: ``(N, D)``.
        target: ``(N, D)``; with ``index``, an ``(R, D)`` table of which row ``index[n]`` is
            ``pred[n]``'s target.
        index: ``(N,)`` int64 rows of ``target``, or None.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(pred.shape[-1])
    if index is not None:
        if beta == 0 and token_loss.supports(pred, target):
            # the rows read by index on a GPU: no (N, D) gather, difference or square
            return token_loss.squared_error_sum(pred, target, index) * scale
        target = target[index]
    target = target.float()
    if beta == 0 and pred.is_cuda and not target.requires_grad:
        # one pass fewer in backward on a GPU (see _SquaredErrorSum); the same bits
        loss = _SquaredErrorSum.apply(pred, target)
    elif beta == 0:
        # (pred - target)² summed: the same kernels and bits as F.mse_loss(reduction="sum"),
        # but backward keeps the difference only, where mse_loss keeps both inputs. A bf16
        # prediction is promoted by the subtraction itself (exactly, as .float() would), which
        # spares a float32 copy of it (1 GB at image-v2-base batch 128).
        loss = (pred - target).square().sum()
    else:
        loss = F.smooth_l1_loss(pred.float(), target, reduction="sum", beta=beta)
    return loss * scale


@torch.no_grad()
def per_dim_std(x: Tensor) -> Tensor:
    """Mean over dimensions of the per-dimension std over rows: ``x: (N, D)`` -> scalar.

    This is the collapse statistic of fairseq's ``compute_var`` (``sqrt(var + 1e-6)``).
    """
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] < 2:
        return x.new_tensor(float("nan"), dtype=torch.float32)
    if x.is_cuda:
        # One pass over memory on a GPU, where the four of the CPU path below took 3-4 ms per
        # step for image-v2-base at batch 128 (H100). A bf16 input is read as it is (the sums
        # are float32 inside; the variances come back rounded to bf16, 3 significant digits,
        # enough for a logged statistic) instead of through a float32 copy of it.
        var = x.var(dim=0).float()
    else:
        x = x.float()
        # Two passes (mean, then squared deviations) instead of x.var(dim=0): the same unbiased
        # variance, 3x faster on CPU for (tokens, D) inputs (7 vs 23 ms at 40k x 192).
        dev = x - x.mean(dim=0)
        var = dev.square_().sum(dim=0) / (x.shape[0] - 1)
    return torch.sqrt(var + 1e-6).mean()


@torch.no_grad()
def per_dim_std_of_rows(table: Tensor, counts: Tensor) -> Tensor:
    """:func:`per_dim_std` of the rows of ``table``, each repeated ``counts`` times, without
    repeating them: a weighted mean and variance over the table (data2vec 2.0's per-sample
    targets: about 13x fewer rows than the masked rows of 16 clones at 80 % masking).

    Args:
        table: ``(R, D)``.
        counts: ``(R,)`` non-negative integer counts (any dtype).
    """
    w = counts.reshape(-1, 1).to(torch.float32)
    n = w.sum()  # stays on the device: nothing here waits for it
    x = table.reshape(-1, table.shape[-1]).float()
    mean = (w * x).sum(dim=0) / n
    var = (w * (x - mean).square()).sum(dim=0) / (n - 1)
    std = torch.sqrt(var + 1e-6).mean()
    return torch.where(n < 2, torch.full_like(std, float("nan")), std)
