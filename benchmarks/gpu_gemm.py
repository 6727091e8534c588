"""An experiment for ``gpu_check.py --gemm``: the MLP's ``fc1`` with its bias and exact GELU in
the epilogue of one Triton matrix product, against cuBLAS and a separate GELU.

The question it answers on a GPU: can a Triton matrix product at the MLP's shapes carry work in
its epilogue and still beat cuBLAS plus the separate pass? The fifth pass's profile
(benchmarks/README.md, "GPU, fifth pass") put the blocks' GELU forward, recomputation and
backward at 16.2 ms of a 0.205 s step at image-v2-base batch 128, and the bias-gradient sums
at 6.4 ms: passes over memory that cuBLAS cannot fold into its products for this case. Here
``fc1`` (81920 x 768 by 768 x 3072, bf16) writes ``h = x W^T + b`` (what the MLP's backward
reads) and ``gelu(h)`` (what ``fc2`` reads) from its accumulator, 1 GB of stores; the current
path writes ``h``, then reads it again and writes ``gelu(h)``, 1.5 GB. If the fused product
comes out faster than ``F.linear`` then ``F.gelu``, the same epilogue idea applies to the
backward's hidden-layer gradient and the bias sums; if not, cuBLAS keeps these products.

Nothing in the package uses this kernel. Values: ``h`` as cuBLAS computes it up to float32
summation order (the bias added to the float32 accumulator, then one rounding to bf16), and
GELU of the rounded ``h`` in float32, rounded once, as ``F.gelu`` computes it.
"""

from __future__ import annotations

from typing import Any

import torch

from data2vec.nn import token_conv
from data2vec.nn.triton_gate import tl, triton

# Tile settings the experiment times (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages). 128 x
# 256 x 64 in 3-4 stages keeps 48 KB of tiles per stage in shared memory (228 KB on an H100).
CONFIGS = [
    (128, 256, 64, 8, 8, 3),
    (128, 256, 64, 8, 8, 4),
    (256, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4),
    (128, 128, 64, 8, 8, 4),
    (64, 256, 64, 8, 4, 4),
]

if triton is not None:

    @triton.jit
    def _linear_gelu_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        h_ptr,
        g_ptr,
        M,
        N: tl.constexpr,
        K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """``h = x @ w.T + b`` and ``g = gelu(h)`` for one ``(BLOCK_M, BLOCK_N)`` tile; ``x:
        (M, K)``, ``w: (N, K)`` (``nn.Linear``'s layout), ``N`` and ``K`` multiples of the
        tile. Programs walk ``GROUP_M`` row tiles per column tile, so that neighbours share
        their operands in L2."""
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        per_group = GROUP_M * (N // BLOCK_N)
        first_m = (pid // per_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok = (rows < M)[:, None]
        a_ptrs = x_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :]
        b_ptrs = w_ptr + cols[None, :] * K + ks[:, None]  # (BLOCK_K, BLOCK_N) of w.T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=row_ok, other=0.0)
            acc = tl.dot(a, tl.load(b_ptrs), acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
        h = acc.to(h_ptr.dtype.element_ty)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(h_ptr + offs, h, mask=row_ok)
        hf = h.to(tl.float32)  # GELU of the rounded h, as F.gelu(h) computes it
        g = 0.5 * hf * (1.0 + tl.math.erf(hf * 0.7071067811865476))
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=row_ok)


def linear_gelu(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, config: tuple[int, ...] = CONFIGS[0]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, gelu(h))`` with ``h = F.linear(x, w, b)``, in ``x``'s dtype.

    Args:
        x: ``(M, K)``; w: ``(N, K)``; b: ``(N,)``; all contiguous, ``N`` and ``K`` multiples
            of the config's tile.
        config: ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)``.
    """
    bm, bn, bk, group, warps, stages = config
    (M, K), N = x.shape, w.shape[0]
    if N % bn or K % bk:
        raise ValueError(f"N={N} and K={K} must be multiples of the tile {bn} x {bk}")
    h = torch.empty(M, N, device=x.device, dtype=x.dtype)
    g = torch.empty_like(h)
    launch = {} if token_conv.interpreting() else {"num_warps": warps, "num_stages": stages}
    grid = (triton.cdiv(M, bm) * (N // bn),)
    _linear_gelu_kernel[grid](x, w, b, h, g, M, N=N, K=K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                              GROUP_M=group, **launch)  # fmt: skip
    return h, g


def gemm_check(tokens: int = 81920, dim: int = 768, hidden: int = 3072) -> dict[str, Any]:
    """``fc1`` then GELU at image-v2-base's batch-128 shapes, bf16: cuBLAS alone, cuBLAS then
    ``F.gelu`` (the MLP's forward now), and the fused Triton product under each of
    :data:`CONFIGS`, in milliseconds and TFLOP/s of the product, with the fused results'
    largest differences from the torch ones (relative to their largest value)."""
    import torch.nn.functional as F
    from gpu_kernels import gpu_ms  # sibling script module

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16  # (the interpreter's bf16)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, dim, device=dev, generator=gen).to(dtype)
    w = (torch.randn(hidden, dim, device=dev, generator=gen) / dim**0.5).to(dtype)
    b = (0.1 * torch.randn(hidden, device=dev, generator=gen)).to(dtype)
    flops = 2 * tokens * dim * hidden

    def plain() -> tuple[torch.Tensor, torch.Tensor]:
        h = F.linear(x, w, b)
        return h, F.gelu(h)

    out: dict[str, Any] = {"shape": f"{tokens} x {dim} by {dim} x {hidden}",
                           "cublas_ms": gpu_ms(lambda: F.linear(x, w, b)),
                           "cublas_gelu_ms": gpu_ms(plain)}  # fmt: skip
    want = [t.float() for t in plain()]
    fused = []
    for config in CONFIGS:
        entry: dict[str, Any] = {"config": list(config)}
        try:
            got = [t.float() for t in linear_gelu(x, w, b, config)]
            for name, a, ref in zip(("h", "gelu"), got, want):
                entry[f"rel_diff_{name}"] = float((a - ref).abs().max() / ref.abs().max())
            entry["ms"] = gpu_ms(lambda: linear_gelu(x, w, b, config))  # noqa: B023
            entry["tflops"] = flops / entry["ms"] / 1e9
        except Exception as exc:  # a setting the compiler rejects: reported, the rest go on
            entry["error"] = str(exc)[:200]
        fused.append(entry)
    out["fused"] = fused
    timed = [e["ms"] for e in fused if "ms" in e]
    out["best_fused_ms"] = min(timed) if timed else None
    return out
