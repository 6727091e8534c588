"""``data2vec bench``: time real training steps on synthetic input and report MFU.

The timed step is the engine's own :func:`~data2vec.engine.trainer.train_step` (forward,
backward, clipping, AdamW, EMA update), so the number is what training costs. FLOPs are counted
with ``torch.utils.flop_counter`` on one step; the peak is a matmul of the same dtype measured
in the same process, so MFU compares like with like on the machine at hand.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from data2vec._runtime import heap_mode, peak_resident_bytes
from data2vec.config import Config, load_config
from data2vec.data.batch import PretrainBatch
from data2vec.data.image_pretrain import ImageMaskGenerator
from data2vec.engine.runtime import autocast, check_precision, configure_threads, resolve_device
from data2vec.engine.trainer import StepResult, new_state, train_step
from data2vec.masking import make_rng, random_mask
from data2vec.models.data2vec2 import Data2Vec2
from data2vec.models.decoders import ConvDecoder
from data2vec.models.registry import build_model
from data2vec.nn import token_attention, token_conv, token_loss, token_mlp, token_norm
from data2vec.nn.attention import Attention
from data2vec.nn.block import Mlp, PostLNBlock

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """FLOPs of a (grouped) convolution's backward: each requested gradient costs one forward.

    ``torch.utils.flop_counter`` counts grouped convolutions' backward as if they were dense
    (17x too much for the 16-group decoder of the base recipe); the forward count, which uses
    the grouped weight shape, is right, so reuse it: ``2 * N * prod(w) * prod(out spatial)``.
    """
    spatial = x_shape[2:] if transposed else grad_out_shape[2:]
    forward = 2 * grad_out_shape[0] * prod(w_shape) * prod(spatial)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def matmul_peak_flops(
    dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 1.0
) -> float:
    """Achieved FLOP/s of square ``n x n`` matmuls (the practical peak for MFU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    _sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start)


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter of this process (Linux ``clear_refs``).

    Returns:
        False where it cannot be reset (not Linux, or ``/proc`` read-only): the peak is then
        the lifetime peak, which includes model building and FLOP counting.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak resident memory in MiB since the last :func:`reset_peak_rss` (or process start)."""
    peak = peak_resident_bytes()
    if peak:
        return peak / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synthetic_batch(
    cfg: Config, batch: int, seconds: float = 2.0, seq_len: int = 128
) -> PretrainBatch:
    """Random input of the configured modality with masks drawn as the data loader would."""
    rng = make_rng(cfg.train.seed, 0)
    if cfg.model.modality == "text":
        vocab = cfg.encoder.vocab_size  # type: ignore[union-attr]
        # ids 0-4 are the special tokens: <s> ... </s> around random ordinary tokens, no padding
        tokens = rng.integers(5, vocab, (batch, seq_len))
        tokens[:, 0], tokens[:, -1] = 0, 2
        rows = [
            random_mask(seq_len, cfg.mask.clones, cfg.mask.ratio, make_rng(cfg.train.seed, i))
            for i in range(batch)
        ]
        return PretrainBatch(
            torch.from_numpy(tokens), torch.from_numpy(np.concatenate(rows)), torch.arange(batch)
        )
    if cfg.model.modality == "audio":
        from data2vec.data.audio_pretrain import _frames, audio_masks

        samples = int(seconds * 16000)
        wave = torch.from_numpy(rng.standard_normal((batch, samples), dtype=np.float32))
        frames = _frames(samples)
        rows = [audio_masks(cfg.mask, frames, make_rng(cfg.train.seed, i)) for i in range(batch)]
        mask = np.concatenate(rows)
        return PretrainBatch(wave, torch.from_numpy(mask), torch.arange(batch))
    if cfg.model.modality == "signal":
        return _synthetic_signals(cfg, batch, rng)
    size = cfg.encoder.image_size
    grid = (size // cfg.encoder.patch_size,) * 2
    masks = ImageMaskGenerator(cfg, grid)
    images = torch.from_numpy(
        rng.standard_normal((batch, cfg.encoder.in_chans, size, size), dtype=np.float32)
    )
    mask = np.concatenate([masks(make_rng(cfg.train.seed, i)) for i in range(batch)])
    return PretrainBatch(images, torch.from_numpy(mask), torch.arange(batch))


# The channel count of synthetic signals when the preset takes it from the data (in_chans 0).
SIGNAL_CHANNELS = 1


def _synthetic_signals(cfg: Config, batch: int, rng: np.random.Generator) -> PretrainBatch:
    """Gaussian noise ``(B, C, *encoder.size)`` with N-d masks drawn as the signal loader would."""
    from data2vec.data.signal_pretrain import signal_masks

    enc = cfg.encoder
    x = rng.standard_normal((batch, enc.in_chans, *enc.size), dtype=np.float32)  # type: ignore[union-attr]
    rows = [signal_masks(cfg.mask, enc.grid, make_rng(cfg.train.seed, i)) for i in range(batch)]  # type: ignore[union-attr]
    return PretrainBatch(
        torch.from_numpy(x), torch.from_numpy(np.concatenate(rows)), torch.arange(batch)
    )


def prepare_steps(
    cfg: Config, seconds: float = 2.0, seq_len: int = 128
) -> tuple[torch.nn.Module, Callable[[], StepResult], torch.device, int]:
    """``(model, step, device, threads)``: ``step()`` runs one training step of ``cfg`` on a
    fixed synthetic batch (pinned for CUDA, as the pretraining loader delivers it)."""
    device = resolve_device(cfg.train.device)
    check_precision(device, cfg.train.precision)
    threads = configure_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(device)
    state = new_state(model, cfg, device)
    data = _synthetic_batch(cfg, cfg.data.batch_size, seconds, seq_len)
    if device.type == "cuda":
        data = data.pin_memory()
    return model, lambda: train_step(state, data, cfg, device), device, threads


def decoder_conv(model: torch.nn.Module, device: torch.device) -> str | None:
    """Which convolution the model's data2vec 2.0 decoders run on ``device``, as they decide
    it themselves: "triton" or "torch" (None without such a decoder)."""
    decoders = [m for m in model.modules() if isinstance(m, ConvDecoder)]
    if not decoders:
        return None
    probe = torch.empty(0, device=device)
    return "triton" if any(d.uses_triton(probe) for d in decoders) else "torch"


def block_norms(model: torch.nn.Module, device: torch.device, precision: str) -> str | None:
    """Which ``LayerNorm(x + branch)`` the model's post-LN blocks run on ``device`` at
    ``precision``, as they decide it themselves: "triton" (fused at any size), "triton from N
    tokens" (``auto``: fused where a block's input has at least ``N`` tokens, see
    ``token_norm.MIN_ROWS``) or "torch" (None without such blocks)."""
    blocks = [m for m in model.modules() if isinstance(m, PostLNBlock)]
    if not blocks:
        return None
    width = blocks[0].attn.qkv.in_features

    def fused(rows: int) -> bool:
        probe = torch.empty(1, 1, width, device=device).expand(rows, 1, width)  # no memory
        with autocast(device, precision):
            return any(b.uses_fused_norms(probe) for b in blocks)

    if fused(1):
        return "triton"
    many = max(token_norm.MIN_ROWS, 1)
    return f"triton from {many} tokens" if fused(many) else "torch"


def block_kernels(model: torch.nn.Module, device: torch.device, precision: str) -> dict:
    """Which attention and MLP backward the model's blocks run in training on ``device`` at
    ``precision``, as they decide it themselves: ``{"attention": "triton up to N tokens" |
    "sdpa" | None, "mlp_backward": "triton" | "torch" | None}`` (None: no such layers).
    The Triton attention takes unmasked attention without dropout of at most ``N`` tokens
    (``token_attention.MAX_TOKENS``); everything else goes to SDPA."""
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    dtype = _DTYPES[precision] if device.type == "cuda" else torch.float32
    out: dict[str, str | None] = {"attention": None, "mlp_backward": None}
    if attns:
        short = any(
            a.attn_drop == 0
            and token_attention.supports(
                torch.empty(1, 1, a.qkv.out_features, device=device, dtype=dtype), a.num_heads
            )
            for a in attns
        )
        out["attention"] = f"triton up to {token_attention.MAX_TOKENS} tokens" if short else "sdpa"
    if mlps:
        with torch.enable_grad():
            fused = any(
                token_mlp.supports(torch.empty(1, 1, m.fc1.in_features, device=device), m)
                for m in mlps
            )
        out["mlp_backward"] = "triton" if fused else "torch"
    return out


def loss_kernel(model: torch.nn.Module, device: torch.device, precision: str) -> str | None:
    """Which regression loss a data2vec 2.0 model's training step runs on ``device`` at
    ``precision``: ``"triton"`` (the targets read by index, ``token_loss``), ``"torch"`` (the
    targets gathered, then the torch ops), or None (no data2vec 2.0 objective)."""
    models = [m for m in model.modules() if isinstance(m, Data2Vec2)]
    if not models:
        return None
    dtype = _DTYPES[precision] if device.type == "cuda" else torch.float32
    fused = any(
        m.loss_cfg.beta == 0
        and token_loss.supports(
            torch.empty(1, m.encoder.embed_dim, device=device, dtype=dtype),
            torch.empty(1, m.encoder.embed_dim, device=device),
        )
        for m in models
    )
    return "triton" if fused else "torch"


def time_steps(
    cfg: Config,
    steps: int,
    warmup: int = 2,
    count_flops: bool = True,
    seconds: float = 2.0,
    seq_len: int = 128,
) -> dict[str, Any]:
    """Time ``steps`` training steps of ``cfg`` on synthetic data after ``warmup`` untimed ones.

    The peak memory is that of the timed steps alone (the counter is reset after warm-up and
    FLOP counting), so it is what a training run holds in steady state.

    Returns:
        ``{"times": [s, ...], "losses": [loss, ...], "skipped_steps", "flops": FLOPs of one
        step or None, "threads", "device", "decoder_conv", "block_norms", "attention",
        "mlp_backward", "loss", "peak_rss_mb",
        "peak_rss_is_steps_only", "peak_rss_setup_mb"}``.
    """
    model, step, device, threads = prepare_steps(cfg, seconds, seq_len)
    for _ in range(warmup):
        step()
    flops = None
    if count_flops:
        mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
        # The counter cannot see into Triton kernels: the decoder counts with the torch
        # convolution (the same products) for this step.
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with token_conv.suspended(), counter:
            step()
        flops = counter.get_total_flops()
    times, losses, skipped = [], [], 0
    setup_peak = peak_rss_mb()  # building, warm-up and FLOP counting
    steps_only = reset_peak_rss()
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        result = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(result.loss)
        skipped += not result.updated
    return {
        "times": times,
        # A step whose loss or gradients were not finite skips its update and would be timed
        # as if it had trained: the record says so.
        "losses": losses,
        "skipped_steps": skipped,
        "flops": flops,
        "threads": threads,
        "device": device,
        "decoder_conv": decoder_conv(model, device),
        "block_norms": block_norms(model, device, cfg.train.precision),
        **block_kernels(model, device, cfg.train.precision),
        "loss": loss_kernel(model, device, cfg.train.precision),
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_is_steps_only": steps_only,
        "peak_rss_setup_mb": setup_peak,
    }


def bench(
    preset: str,
    batch: int | None = None,
    steps: int = 3,
    warmup: int = 2,
    precision: str = "fp32",
    image_size: int | None = None,
    overrides: list[str] | None = None,
    seconds: float = 2.0,
    seq_len: int = 128,
) -> dict[str, Any]:
    """Time ``steps`` training steps after ``warmup`` untimed ones; return the JSON record.

    ``image_size`` applies to image presets, ``seconds`` (clip length) to audio presets and
    ``seq_len`` (tokens per sequence) to text presets.
    """
    extra = [*(overrides or []), f"train.precision={precision}"]
    if batch is not None:
        extra.append(f"data.batch_size={batch}")
    if image_size is not None:
        extra.append(f"encoder.image_size={image_size}")
    cfg = load_config(preset, extra)
    if cfg.model.modality == "signal" and cfg.encoder.in_chans == 0:  # type: ignore[union-attr]
        cfg.encoder.in_chans = SIGNAL_CHANNELS  # type: ignore[union-attr]
    run = time_steps(cfg, steps, warmup, seconds=seconds, seq_len=seq_len)
    times, flops, device = run["times"], run["flops"], run["device"]
    step_time = statistics.median(times)
    # 2048 saturates a CPU; a GPU needs larger products to reach its peak.
    peak = matmul_peak_flops(_DTYPES[precision], device, n=8192 if device.type == "cuda" else 2048)
    achieved = flops / step_time
    return {
        "preset": cfg.preset,
        "batch": cfg.data.batch_size,
        "clones": cfg.mask.clones,
        "input": _describe_input(cfg, seconds, seq_len),
        "precision": precision,
        "steps": steps,
        "step_time_s": step_time,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "samples_per_s": cfg.data.batch_size / step_time,
        "flops_per_step": flops,
        "achieved_flops": achieved,
        "peak_matmul_flops": peak,
        "mfu": achieved / peak,
        "loss_first": run["losses"][0] if run["losses"] else None,
        "loss_last": run["losses"][-1] if run["losses"] else None,
        "skipped_steps": run["skipped_steps"],
        # Peak RSS of the timed training steps (model building and the FLOP-counting pass
        # excluded where Linux lets us reset the counter); the lifetime peak beside it.
        "peak_rss_mb": run["peak_rss_mb"],
        "peak_rss_steps_only": run["peak_rss_is_steps_only"],
        "peak_rss_process_mb": max(run["peak_rss_mb"], run["peak_rss_setup_mb"]),
        "env": {
            "torch": torch.__version__,
            "threads": run["threads"],
            "device": str(device),
            "cpu": platform.processor() or platform.machine(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            # glibc heap mode of the timed steps (CPU only; data2vec/_runtime.py)
            "heap": heap_mode() if device.type == "cpu" else None,
            "decoder_conv": run["decoder_conv"],
            "block_norms": run["block_norms"],
            "attention": run["attention"],
            "mlp_backward": run["mlp_backward"],
            "loss": run["loss"],
        },
    }


def _describe_input(cfg: Config, seconds: float, seq_len: int) -> str:
    if cfg.model.modality == "audio":
        return f"{seconds:g} s at 16 kHz"
    if cfg.model.modality == "text":
        return f"{seq_len} tokens"
    if cfg.model.modality == "signal":
        enc = cfg.encoder
        return f"{enc.in_chans} x {' x '.join(map(str, enc.size))} signal"  # type: ignore[union-attr]
    return f"{cfg.encoder.image_size} px"  # type: ignore[union-attr]


def format_bench(r: dict[str, Any]) -> str:
    skipped = r.get("skipped_steps") or 0
    warning = f"; {skipped} timed step(s) SKIPPED (loss or gradients not finite)"
    return (
        f"{r['preset']} batch {r['batch']} x{r['clones']} clones, {r['input']}, "
        f"{r['precision']}: "
        f"{r['step_time_s']:.3f} s/step ({r['samples_per_s']:.2f} samples/s), "
        f"{r['flops_per_step'] / 1e12:.3f} TFLOP/step, {r['achieved_flops'] / 1e9:.1f} GFLOP/s, "
        f"MFU {100 * r['mfu']:.1f}% of {r['peak_matmul_flops'] / 1e9:.0f} GFLOP/s matmul peak, "
        f"peak RSS {r['peak_rss_mb']:.0f} MB" + (warning if skipped else "")
    )
