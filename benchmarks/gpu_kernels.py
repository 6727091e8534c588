"""Kernels alone on CUDA, for ``gpu_check.py``: the decoder convolution, the block norms and
the short-sequence attention.

* :func:`conv_check` - image-v2-base's decoder convolution, bf16, Triton against cuDNN:
  agreement of output and gradients, milliseconds forward and forward + backward, and with
  ``sweep`` each Triton kernel under several tile settings;
* :func:`norm_check` - a block's ``LayerNorm(x + a)``, forward + backward, fused Triton kernels
  against the torch ops at several token counts;
* :func:`mlp_check` - the MLP's fused hidden-layer backward pass alone (image-v2-base b128:
  81920 x 3072, bf16) against the torch ops it replaces, and under several launch settings;
* :func:`attention_check` - one block's attention (image-v2-base student: 40 tokens, 12 heads
  of 64), bf16: the Triton kernels against each SDPA backend, errors against float32 and
  milliseconds forward and forward + backward;
* :func:`loss_check` - the regression loss read by index (image-v2-base b128: 321536 masked
  rows of 768 against a 25088-row table), bf16 predictions: against the gather and the torch
  ops, the gradient's bits, and under several launch settings.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from data2vec.nn import token_conv


@contextlib.contextmanager
def patched(*patches: tuple[Any, str, Any]) -> Iterator[None]:
    """Set ``(owner, attribute, value)`` for the block, then restore them."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


@contextlib.contextmanager
def settings(*tables: dict[str, int], **values: int) -> Iterator[None]:
    """Launch-setting tables (``token_conv.FORWARD``, ``token_mlp.LAUNCH``, ...) updated with
    ``values`` for the block, then restored as they were."""
    saved = [dict(table) for table in tables]
    for table in tables:
        table.update(values)
    try:
        yield
    finally:
        for table, before in zip(tables, saved):
            table.clear()
            table.update(before)


def conv_settings(**values: int) -> contextlib.AbstractContextManager:
    """The decoder convolution's kernels (forward and weight gradient) under ``values``."""
    return settings(token_conv.FORWARD, token_conv.WEIGHT_GRAD, **values)


def gpu_ms(fn, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` on the GPU (CUDA events), after 3 warm-up calls."""
    if not torch.cuda.is_available():  # a dry run of the logic (TRITON_INTERPRET=1 on the CPU)
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def conv_check(
    batch: int, sweep: bool, clones: int = 16, dev: torch.device | None = None
) -> dict[str, Any]:
    """image-v2-base's decoder convolution alone, bf16: Triton vs cuDNN (see module doc)."""
    import torch.nn.functional as F

    dev = dev or torch.device("cuda")
    N, C, G, H = batch * clones, 768, 16, 14
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, H * H, C, device=dev, dtype=dtype, generator=gen)
    w = 0.05 * torch.randn(C, C // G, 3, 3, device=dev, generator=gen)
    b = 0.1 * torch.randn(C, device=dev, generator=gen)
    gy = torch.randn(N, H * H, C, device=dev, dtype=dtype, generator=gen)
    flops = 2 * N * H * H * C * (C // G) * 9  # one product (forward, input or weight grad)

    def cudnn(xx, ww, bb):  # the decoder's torch path: channels-last view of the tokens
        img = xx.view(N, H, H, C).permute(0, 3, 1, 2)
        y = F.conv2d(img, ww.to(xx.dtype), bb.to(xx.dtype), padding=1, groups=G)
        return y.permute(0, 2, 3, 1).reshape(N, H * H, C)

    def triton_conv(xx, ww, bb):
        return token_conv.conv_tokens(xx, ww.to(xx.dtype), bb, (H, H))

    out: dict[str, Any] = {"shape": f"{N} x {H}x{H} x {C}, {G} groups, 3x3", "gflop": flops / 1e9}
    grads = {}
    runs = (("cudnn", cudnn, {}), ("triton_taps", triton_conv, {"PACK_K": 0}),
            ("triton_packed", triton_conv, {"PACK_K": 1}))  # fmt: skip
    for name, fn, values in runs:
        with conv_settings(**values):
            xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
            y = fn(xs, ws, bs)
            y.backward(gy)
            grads[name] = (y.detach().float(), xs.grad.float(), ws.grad.float(), bs.grad.float())
            xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
            out[f"{name}_forward_ms"] = gpu_ms(lambda: fn(x, w, b))  # noqa: B023
            out[f"{name}_forward_backward_ms"] = gpu_ms(lambda: fn(xs, ws, bs).backward(gy))  # noqa: B023
        out[f"{name}_forward_backward_tflops"] = (
            3 * flops / out[f"{name}_forward_backward_ms"] / 1e9
        )
    for name in ("triton_taps", "triton_packed"):
        for i, part in enumerate(("out", "grad_x", "grad_w", "grad_b")):
            ref, got = grads["cudnn"][i], grads[name][i]
            out[f"{name}_rel_diff_{part}"] = float((got - ref).abs().max() / ref.abs().max())
    if sweep:
        out["sweep"] = _sweep(x, w, gy, (H, H))
    return out


def norm_check(rows: tuple[int, ...] = (2048, 8192, 32768, 131072)) -> list[dict[str, Any]]:
    """``LayerNorm(x + a)`` of a 768-wide block alone, forward + backward, bf16 autocast: the
    fused Triton kernels against the torch ops, at several token counts. Small counts time
    the launch costs (the GPU waits for the CPU), large ones the passes over memory."""
    from torch import nn

    from data2vec.nn.token_norm import add_layer_norm

    dev = torch.device("cuda")
    norm = nn.LayerNorm(768, eps=1e-6).to(dev)
    out = []
    for m in rows:
        x = torch.randn(m, 768, device=dev, requires_grad=True)
        a = torch.randn(m, 768, device=dev, dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(m, 768, device=dev)
        glow = torch.randn(m, 768, device=dev, dtype=torch.bfloat16)

        def fused():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y, low = add_layer_norm(x, a, norm, torch.bfloat16)  # noqa: B023
            torch.autograd.backward([y, low], [gy, glow])  # noqa: B023

        def plain():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = norm(x + a)  # noqa: B023
                low = y.to(torch.bfloat16)
            torch.autograd.backward([y, low], [gy, glow])  # noqa: B023

        out.append({"rows": m, "fused_ms": gpu_ms(fused), "torch_ms": gpu_ms(plain)})
    return out


def mlp_check(tokens: int = 81920, hidden: int = 3072) -> dict[str, Any]:
    """``token_mlp.gelu_grad`` alone against GELU recomputed, GELU's backward and the column
    sum (the memory-lean MLP's three passes), and a sweep of its launch settings; with the
    bytes each must move (read ``h`` and the hidden gradient, write ``gelu(h)`` and ``h``'s
    gradient), as an effective bandwidth."""
    import torch.nn.functional as F

    from data2vec.nn import token_mlp

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(device=dev).manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    h = torch.randn(tokens, hidden, device=dev, generator=gen).to(dtype)
    gg = torch.randn(tokens, hidden, device=dev, generator=gen).to(dtype)
    moved = 4 * h.numel() * h.element_size()

    def plain():
        g = F.gelu(h)
        dh = torch.ops.aten.gelu_backward(gg, h)
        return g, dh, dh.sum(0, dtype=torch.float32)

    out: dict[str, Any] = {"shape": f"{tokens} x {hidden}", "torch_ms": gpu_ms(plain)}
    want = plain()
    got = token_mlp.gelu_grad(h, gg.clone())
    for i, part in enumerate(("gelu", "grad", "bias_grad")):
        err = (got[i].float() - want[i].float()).abs().max() / want[i].float().abs().max()
        out[f"rel_diff_{part}"] = float(err)
    # bf16 rounding differs by at most an ulp here and there (1/128 of the scale); a kernel
    # that reads or writes the wrong elements is off by its scale
    out["pass"] = max(out[f"rel_diff_{p}"] for p in ("gelu", "grad", "bias_grad")) < 1e-2
    scratch = gg.clone()  # overwritten call after call (its values do not change the timing)
    sweep = []
    tried = [{}, {"ROWS_PER_PROGRAM": 64}, {"ROWS_PER_PROGRAM": 256},
             {"BLOCK_N": 256}, {"BLOCK_N": 1024}, {"BLOCK_R": 4}, {"BLOCK_R": 16},
             {"num_warps": 8}, {"BLOCK_R": 16, "num_warps": 8}]  # fmt: skip
    for setting in tried:
        with settings(token_mlp.LAUNCH, **setting):
            ms = gpu_ms(lambda: token_mlp.gelu_grad(h, scratch))
            sweep.append({**token_mlp.LAUNCH, "ms": ms, "tb_per_s": moved / ms / 1e9})
    out["torch_tb_per_s"] = 1.5 * moved / out["torch_ms"] / 1e9  # six passes, not four
    out["sweep"] = sweep
    return out


def loss_check(rows: int = 321536, table_rows: int = 25088, width: int = 768) -> dict[str, Any]:
    """``token_loss.squared_error_sum`` forward + backward against the gathered rows through
    the torch ops (``regression_loss`` without an index), bf16 predictions; the loss's relative
    difference, how many gradient elements differ in their bits (none expected), and the
    bytes each pass must move as an effective bandwidth; then a sweep of launch settings."""
    from data2vec.nn import token_loss
    from data2vec.targets import regression_loss

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(device=dev).manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16  # (the interpreter's bf16)
    pred = torch.randn(rows, width, device=dev, generator=gen).to(dtype).requires_grad_()
    table = torch.randn(table_rows, width, device=dev, generator=gen)
    index = torch.randint(0, table_rows, (rows,), device=dev, generator=gen)
    # read pred and the targets' rows forward and backward, write the gradient once
    moved = rows * width * (2 * (pred.element_size() + 4) + pred.element_size())

    def step(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with patched((token_loss, "ENABLED", fused)):
            loss = regression_loss(pred, table, 0.0, None, index)
        return loss.detach(), torch.autograd.grad(loss, pred)[0]

    out: dict[str, Any] = {"shape": f"{rows} x {width} from {table_rows}",
                           "torch_ms": gpu_ms(lambda: step(False)),
                           "triton_ms": gpu_ms(lambda: step(True))}  # fmt: skip
    (want, want_grad), (got, got_grad) = step(False), step(True)
    out["loss_rel_diff"] = float((got - want).abs() / want.abs())
    out["grad_elements_differing"] = int((got_grad != want_grad).sum())
    out["pass"] = out["loss_rel_diff"] < 1e-5 and out["grad_elements_differing"] == 0
    sweep = []
    tried = [{}, {"BLOCK_R": 8}, {"BLOCK_R": 32}, {"BLOCK_D": 128}, {"BLOCK_D": 512},
             {"num_warps": 8}, {"BLOCK_R": 32, "num_warps": 8}]  # fmt: skip
    for setting in tried:
        with settings(token_loss.LAUNCH, **setting):
            ms = gpu_ms(lambda: step(True))
            sweep.append({**token_loss.LAUNCH, "ms": ms, "tb_per_s": moved / ms / 1e9})
    out["triton_tb_per_s"] = moved / out["triton_ms"] / 1e9
    out["sweep"] = sweep
    return out


def attention_check(
    batch: int, tokens: int = 40, clones: int = 16, dev: torch.device | None = None
) -> dict[str, Any]:
    """Attention alone on the fused projection's ``(B, T, 3C)`` output, output ``(B, T, C)``
    as the block's projection reads it (see module doc)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from data2vec.nn import token_attention
    from data2vec.nn.attention import split_heads

    dev = dev or torch.device("cuda")
    B, H, C = batch * clones, 12, 768
    gen = torch.Generator(device=dev).manual_seed(0)
    qkv32 = 1.5 * torch.randn(B, tokens, 3 * C, device=dev, generator=gen)
    g32 = torch.randn(B, tokens, C, device=dev, generator=gen)
    qkv, g = qkv32.bfloat16(), g32.bfloat16()

    def sdpa(x):
        q, k, v = split_heads(x, H)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, tokens, C)

    def grads(fn, x):
        x = x.detach().clone().requires_grad_()
        out = fn(x)
        out.backward(g.to(out.dtype))
        return out.detach().float(), x.grad.float()

    with sdpa_kernel([SDPBackend.MATH]):
        ref = grads(sdpa, qkv.float())  # float32 on the bf16-rounded operands
    runs = {"triton": (lambda x: token_attention.attend(x, H), None)}
    for backend in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "FLASH_ATTENTION"):
        runs[backend.split("_")[0].lower()] = (sdpa, getattr(SDPBackend, backend))
    out: dict[str, Any] = {"shape": f"{B} x {tokens} tokens x {H} heads of {C // H}"}
    for name, (fn, backend) in runs.items():
        ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        try:
            with ctx:
                got = grads(fn, qkv)
                x = qkv.detach().clone().requires_grad_()
                out[f"{name}_forward_ms"] = gpu_ms(lambda: fn(qkv))  # noqa: B023
                out[f"{name}_forward_backward_ms"] = gpu_ms(lambda: fn(x).backward(g))  # noqa: B023
        except RuntimeError as exc:  # a backend that does not take these shapes here
            out[f"{name}_error"] = str(exc).splitlines()[0][:200]
            continue
        for i, part in enumerate(("out", "grad")):
            err = (got[i] - ref[i]).abs().max() / ref[i].abs().max()
            out[f"{name}_rel_diff_{part}"] = float(err)
    # passes when the Triton kernel's error is at most twice the efficient kernel's (+ 1e-3),
    # as the decoder's agreement is judged
    ours = [out.get(f"triton_rel_diff_{p}", math.inf) for p in ("out", "grad")]
    theirs = [out.get(f"efficient_rel_diff_{p}", 0.0) for p in ("out", "grad")]
    out["pass"] = all(a <= 2 * b + 1e-3 for a, b in zip(ours, theirs))
    launch = token_attention._launch
    x = qkv.detach().clone().requires_grad_()
    for warps in (2, 4, 8):  # the kernels' one tile setting
        token_attention._launch = lambda T: {**launch(T), "num_warps": warps}  # noqa: B023
        try:
            out[f"triton_{warps}_warps_forward_backward_ms"] = gpu_ms(
                lambda: token_attention.attend(x, H).backward(g)
            )
        finally:
            token_attention._launch = launch
    return out


def _sweep(x, w, gy, hw) -> list[dict[str, Any]]:
    """Each Triton kernel (forward, weight gradient) timed under several launch settings."""
    G = x.shape[-1] // w.shape[1]
    rows, cout = x.reshape(-1, x.shape[-1]), w.shape[0]
    w_t = token_conv.forward_weight(w.to(x.dtype), G)
    flops = 2 * rows.shape[0] * cout * w.shape[1] * 9

    def timed(kernel: str, table: dict[str, int], run, **values: int) -> dict[str, Any]:
        """One sweep entry: ``run()`` timed with ``table`` under ``values``, or the error of a
        setting the compiler rejects (reported, and the sweep goes on). Each entry also goes
        to stderr as it is measured, so a run cut short by its time limit keeps it in its log."""
        with settings(table, **values):
            try:
                ms = gpu_ms(run)
                entry = {"kernel": kernel, **table, "ms": ms, "tflops": flops / ms / 1e9}
            except Exception as exc:
                entry = {"kernel": kernel, **table, "error": str(exc)[:200]}
        print(json.dumps(entry), file=sys.stderr, flush=True)
        return entry

    results = []
    # Forward settings over BLOCK_M 128, BLOCK_K 64, PACK_K 1, 4 warps, 3 stages and the opt-in
    # forms off. On an H200 (2026-11-28, "GPU, tenth pass") the whole sweep of the eighth pass
    # ran but for its L1 settings (since removed): the pipelined loop 1.385 ms against 1.488
    # unrolled, and 1.330 ms with BLOCK_K 32 and 4 stages; these are repeated here, beside the
    # transposed products' best. Unrolled, num_stages has no effect.
    base = {"BLOCK_M": 128, "BLOCK_K": 64, "PACK_K": 1, "num_warps": 4, "num_stages": 3,
            "SWAP_AB": 0, "PIPELINE": 0, "maxnreg": 0}  # fmt: skip
    pipe, swap = {"PIPELINE": 1}, {"SWAP_AB": 1}
    for change in [
        {}, pipe, {**pipe, "BLOCK_K": 32, "num_stages": 4}, {**pipe, "BLOCK_K": 32},
        {**pipe, "BLOCK_K": 32, "num_stages": 4, "maxnreg": 128}, {**swap, "BLOCK_M": 256},
        {**pipe, **swap}, {"maxnreg": 128},
    ]:  # fmt: skip
        results.append(timed(
            "forward", token_conv.FORWARD,
            lambda: token_conv.conv_tokens_forward(rows, w_t, None, hw, cout),
            **{**base, **change},
        ))  # fmt: skip
    shape = (G, 3, 3, w.shape[1], cout // G)
    grow = gy.reshape(-1, cout)

    def with_bias() -> Any:
        """The weight gradient as a step takes it, with the bias sums (their product in every
        program since the tenth pass)."""
        return token_conv.conv_tokens_grads(rows, grow, hw, shape, bias=True)

    def separate() -> Any:
        """The fifth pass's form: the bias gradient as a separate column sum."""
        return token_conv.conv_tokens_grads(rows, grow, hw, shape), grow.sum(0, dtype=torch.float32)

    for bm, bk, pack, warps, stages, per_sm in [
        (64, 64, 1, 4, 3, 64), (64, 32, 1, 4, 3, 64), (64, 64, 1, 4, 3, 32),
        (64, 64, 1, 4, 3, 128), (64, 64, 1, 8, 3, 64), (128, 64, 1, 8, 3, 64),
        (64, 64, 1, 4, 4, 64), (64, 64, 1, 4, 2, 64),
    ]:  # fmt: skip
        runs = [("weight_bias_grad", with_bias)]
        if (bk, stages, per_sm) == (64, 3, 64):  # the base setting and its warps/rows changes
            runs.append(("weight_grad_then_bias_sum", separate))
        for name, run in runs:
            results.append(timed(
                name, token_conv.WEIGHT_GRAD, run,
                BLOCK_M=bm, BLOCK_K=bk, PACK_K=pack, num_warps=warps, num_stages=stages,
                programs_per_sm=per_sm,
            ))  # fmt: skip
    return results
