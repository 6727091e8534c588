"""GPU check: image-v2-base bf16 throughput and MFU on CUDA, and CUDA-vs-CPU agreement.

Prints one JSON object. Without a CUDA device it says so in that object and exits 0, so the
script can sit in any checklist.

1. **Agreement** (tiny image model, fp32, TF32 off): the same weights, input, masks and decoder
   noise on the CPU and on the GPU; loss, targets and every gradient are compared. Passes
   when the loss agrees to 1e-4 (relative) and the worst gradient to 1e-3 (relative to the
   gradient's own scale). The same for the image and audio base decoders alone (audio: 1-D,
   with padding), and in bf16 autocast on the GPU: the Triton path's error against fp32 must
   stay within twice that of the torch path.
   With Triton installed the GPU side runs the decoder's Triton convolution (``auto``).
   Likewise three post-LN blocks in bf16 with the fused Triton norms (``model.norm_impl``)
   and with the torch ops, each against fp32. Then the check every pretraining run makes
   before its first step (``data2vec/engine/kernel_check.py``) on image-v2-base (bf16, fp32)
   and audio-v2-base (bf16), 2 samples: it must pass the kernels as they are.
2. **Decoder convolution** (``--conv``): one 3x3 16-group convolution of image-v2-base's decoder
   at ``batch x 16`` clones, bf16, Triton against cuDNN: agreement of output and gradients, and
   milliseconds of forward and forward + backward; with ``--sweep``, each Triton kernel timed
   under several tile settings.
   ``--norms``: the blocks' fused ``LayerNorm(x + a)`` alone against the torch ops, at several
   token counts; ``--attention``: a block's attention alone, the Triton kernels against each
   SDPA backend; ``--mlp``: the MLP's fused hidden-layer backward alone, with a sweep of its
   launch settings; ``--loss``: the regression loss read by index alone against the gather,
   its gradient's bits and a sweep of its launch settings (all in ``gpu_kernels.py``);
   ``--gemm``: an experiment, ``fc1`` with its bias and GELU in the epilogue of a Triton
   matrix product against cuBLAS then ``F.gelu`` (``gpu_gemm.py``).
3. **Throughput**: ``data2vec bench`` of image-v2-base in bf16 autocast for each ``--batch`` and
   ``--conv-impl`` (FLOPs from ``torch.utils.flop_counter``, MFU against the measured bf16
   matmul peak of the same GPU), plus the peak GPU memory.
4. **Variants** (``--variants``): step time, first loss and peak memory with the torch norms,
   the memory-lean layers switched to the plain ops, ``train.compile=true``, the decoder
   convolution's two ways of walking its sum (``conv taps`` / ``conv packed``), the
   attention's earlier head split (``heads permuted``), each SDPA backend alone (``sdpa
   flash`` / ``efficient`` / ``cudnn``), the short-sequence Triton attention off (``attention
   sdpa``), the fifth pass's decoder-input, projection and loss changes undone (``glue
   before``) and both (``before fifth pass``), the memory-lean MLP instead of the fused
   backward (``lean mlp``), the fused block norms from 16384 tokens or at any size instead of
   ``token_norm.MIN_ROWS``, at each ``--on`` setting (default image-v2-base at batch 128).
5. **Profile** (``--profile``): the top CUDA kernels of a few steps at each ``--on`` setting,
   and the GPU's idle gaps with what the host was doing in them (``gpu_gaps.py``).

python benchmarks/gpu_check.py [--batch 32 128] [--conv-impl torch triton] [--steps 10]
    [--no-agreement] [--conv] [--sweep] [--norms] [--attention] [--mlp] [--loss] [--gemm]
    [--norm-min-rows N] [--variants [NAME ...]] [--repeat N] [--audio BATCH] [--profile]
    [--on PRESET:BATCH ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from data2vec.bench import _synthetic_batch, bench, matmul_peak_flops, prepare_steps
from data2vec.config import load_config
from data2vec.engine import kernel_check
from data2vec.masking import inverse_block_mask, make_rng
from data2vec.models.registry import build_model
from data2vec.nn import token_norm, triton_gate

sys.path.insert(0, str(Path(__file__).parent))
import gpu_gaps  # sibling script modules
from gpu_gemm import gemm_check
from gpu_kernels import (  # sibling script modules
    attention_check,
    conv_check,
    loss_check,
    mlp_check,
    norm_check,
)
from gpu_variants import VARIANTS
from saved_activations import CHANGES, plain

# where the pretraining run's own start-up check runs (data2vec/engine/kernel_check.py)
STARTUP_CHECKS = [("image-v2-base", "bf16"), ("image-v2-base", "fp32"), ("audio-v2-base", "bf16")]

TINY = [
    "model.embed_dim=192",
    "model.depth=4",
    "model.num_heads=3",
    "encoder.prenet_depth=2",
    "decoder.dim=192",
    "mask.clones=4",
    "target.top_k=4",
]


def _forward_backward(model, x, mask, noise) -> dict[str, Any]:
    model.zero_grad(set_to_none=True)
    out = model(x, mask, None, noise)
    out.loss.backward()
    return {
        "loss": out.loss.detach().double().cpu(),
        "grads": {
            n: p.grad.detach().double().cpu()
            for n, p in model.named_parameters()
            if p.grad is not None
        },
    }


def agreement(device: torch.device, batch: int = 4, seed: int = 0) -> dict[str, Any]:
    """Loss and gradient differences of one fp32 step of a tiny model, CPU vs ``device``."""
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    torch.backends.cudnn.allow_tf32 = False
    cfg = load_config("image-v2-base", TINY)
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    size, grid = cfg.encoder.image_size, cfg.encoder.image_size // cfg.encoder.patch_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    rows = batch * cfg.mask.clones
    mask = torch.from_numpy(inverse_block_mask(grid, grid, rows, cfg.mask.ratio, make_rng(seed)))
    noise = 0.01 * torch.randn(int(mask.sum()), cfg.model.embed_dim)
    cpu = _forward_backward(model, x, mask, noise)
    model.to(device)
    gpu = _forward_backward(model, x.to(device), mask.to(device), noise.to(device))
    loss_rel = float(abs(gpu["loss"] - cpu["loss"]) / abs(cpu["loss"]))
    worst_name, worst = "", 0.0
    for name, g in cpu["grads"].items():
        rel = float((gpu["grads"][name] - g).abs().max() / g.abs().max().clamp_min(1e-12))
        if rel > worst:
            worst_name, worst = name, rel
    return {
        "loss_cpu": float(cpu["loss"]),
        "loss_cuda": float(gpu["loss"]),
        "loss_rel_diff": loss_rel,
        "grad_max_rel_diff": worst,
        "grad_worst_param": worst_name,
        "pass": loss_rel < 1e-4 and worst < 1e-3,
    }


def _decoder_pass(dec, x, mask, pad, dev: torch.device, impl: str, bf16: bool) -> list:
    """Output and every gradient (float64 on the CPU) of one forward + backward of ``dec``."""
    dec.to(dev).zero_grad()
    dec.conv_impl = impl
    xs = x.to(dev, copy=True).requires_grad_()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        out = dec(xs, mask.to(dev), None if pad is None else pad.to(dev))
    out.float().square().sum().backward()
    grads = [xs.grad] + [p.grad for p in dec.parameters()]
    return [t.detach().double().cpu() for t in (out, *grads)]


def _worst(a: list, b: list) -> tuple[float, float]:
    """(output, worst gradient) differences of ``b`` from ``a``, relative to ``a``'s scale."""
    diffs = [float((y - x).abs().max() / x.abs().max()) for x, y in zip(a, b)]
    return diffs[0], max(diffs[1:])


def decoder_agreement(preset: str, device: torch.device) -> dict[str, Any]:
    """A preset's decoder alone, with padding on some rows (1-D decoders).

    fp32 (TF32 off): the CPU (torch ops) against ``device`` (the Triton kernels where the
    decoder takes them); passes at 1e-3. bf16 autocast on ``device``: the torch and Triton
    paths each against ``device``'s fp32 result; passes when Triton's error is at most twice
    torch's (plus 1e-3).
    """
    from data2vec.models.decoders import build_conv_decoder

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = load_config(preset)
    grid = None
    if cfg.model.modality == "image":
        grid = (cfg.encoder.image_size // cfg.encoder.patch_size,) * 2
    torch.manual_seed(0)
    dec = build_conv_decoder(cfg.model.embed_dim, cfg.decoder, grid)
    T = grid[0] * grid[1] if grid else 100
    x = torch.randn(8, T, cfg.model.embed_dim)
    mask = torch.rand(8, T) < 0.5
    pad = None if grid else torch.arange(T).expand(8, T) >= torch.tensor([T, T - 10] * 4)[:, None]
    args = (dec, x, mask, pad)
    cpu = _decoder_pass(*args, torch.device("cpu"), "torch", False)
    fp32 = _decoder_pass(*args, device, "auto", False)
    uses = "triton" if dec.uses_triton(x.to(device)) else "torch"
    out_diff, grad_diff = _worst(cpu, fp32)
    result = {"preset": preset, "decoder_conv": uses, "out_rel_diff": out_diff,
              "grad_max_rel_diff": grad_diff, "pass": max(out_diff, grad_diff) < 1e-3}  # fmt: skip
    if device.type == "cuda" and uses == "triton":
        ref = _decoder_pass(*args, device, "torch", False)
        torch_bf16 = max(_worst(ref, _decoder_pass(*args, device, "torch", True)))
        triton_bf16 = max(_worst(ref, _decoder_pass(*args, device, "triton", True)))
        result |= {"bf16_torch_rel_diff": torch_bf16, "bf16_triton_rel_diff": triton_bf16}
        result["pass"] = result["pass"] and triton_bf16 <= 2 * torch_bf16 + 1e-3
    return result


def startup_check(preset: str, precision: str, device: torch.device) -> dict[str, Any]:
    """The start-up kernel check of a pretraining run (``data2vec/engine/kernel_check.py``) on
    ``preset``'s model and a synthetic first batch, in ``precision``: whether it passes the
    kernels, and how close to its allowance the closest gradient came (TF32 as users run)."""
    cfg = load_config(preset, DRY_RUN)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    batch = _synthetic_batch(cfg, kernel_check.SAMPLES)  # the samples the check takes
    found = kernel_check.check_pretraining(model, batch, device, precision)
    if found is None:
        return {"preset": preset, "precision": precision, "ran": False, "pass": False}
    allowance = 2 * found.torch_error + kernel_check.TOLERANCE
    return {"preset": preset, "precision": precision, **found.summary(),
            "allowance": allowance, "pass": found.passed}  # fmt: skip


DRY_RUN: list[str] = []  # overrides for a dry run of this script's logic on the CPU


def _overrides(conv_impl: str) -> list[str]:
    return ["train.device=cuda", f"decoder.conv_impl={conv_impl}"]


def throughput(
    batch: int, steps: int, conv_impl: str = "auto", preset: str = "image-v2-base"
) -> dict[str, Any]:
    """``data2vec bench`` of ``preset`` in bf16 on CUDA, with the peak GPU memory."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    r = bench(preset, batch=batch, steps=steps, warmup=2, precision="bf16",
              overrides=_overrides(conv_impl))  # fmt: skip
    r["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return r


def _runner(batch: int, conv_impl: str, extra: tuple[str, ...] = (), preset: str = "image-v2-base"):
    """(model, one bf16 training step of ``preset`` on CUDA) on a fixed synthetic batch."""
    cfg = load_config(preset, [*_overrides(conv_impl), *extra, "train.precision=bf16",
                                        f"data.batch_size={batch}", *DRY_RUN])  # fmt: skip
    model, step, _, _ = prepare_steps(cfg)
    return model, step


def _median_step(step, steps: int, warmup: int = 2) -> tuple[float, float, float]:
    """(median seconds of ``steps`` timed steps, the first warm-up step's loss, the last
    step's loss). The last loss depends on every gradient of the steps before it, so
    variants that compute the same step agree on it too, up to bf16 rounding's drift."""
    first_loss = float(step().loss)
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first_loss, float(result.loss)


def variants(
    batch: int,
    steps: int,
    conv_impl: str,
    names: list[str] | None = None,
    preset: str = "image-v2-base",
    repeat: int = 1,
) -> list[dict[str, Any]]:
    """Step time of each of ``VARIANTS`` (those in ``names``, or all), and its first and last
    steps' losses (the same initial weights and batches in every variant: the losses agree to
    bf16 rounding); the list ``repeat`` times over, alternating, for noisy (small) settings."""
    chosen = [v for v in VARIANTS if names is None or v[0] in names]
    out = []
    for name, extra, plain_layers, switch in chosen * repeat:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model, step = _runner(batch, conv_impl, extra, preset)
        with plain(model, set(CHANGES) if plain_layers else set()), switch():
            step_s, loss, loss_last = _median_step(step, steps)
        out.append({"variant": name, "preset": preset, "batch": batch, "step_time_s": step_s,
                    "loss_first": loss, "loss_last": loss_last,
                    "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
                    "seconds": time.perf_counter() - t0})  # fmt: skip
        _print(out[-1])
        del model, step
    return out


def norm_agreement(device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Three image-v2-base blocks (768 wide, 12 heads) on 64 x 50 tokens: outputs, FFN outputs
    and every gradient in bf16 autocast, with the torch and the fused Triton norms, each
    against the fp32 result (TF32 off). Passes when Triton's error is at most twice torch's
    (plus 1e-3) and the fused path ran."""
    from functools import partial

    from torch import nn

    from data2vec.nn.block import PostLNBlock, run_blocks

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(seed)
    norm = partial(nn.LayerNorm, eps=1e-6)
    blocks = nn.ModuleList(PostLNBlock(768, 12, norm_layer=norm) for _ in range(3)).to(device)
    with torch.no_grad():  # norms that are not the identity
        for m in blocks.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    x = torch.randn(64, 50, 768, device=device)
    g = [torch.randn(64, 50, 768, device=device) for _ in range(6)]

    def run(impl: str, bf16: bool) -> list[torch.Tensor]:
        for b in blocks:
            b.norm_impl = impl
        blocks.zero_grad()
        xs = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outs = [t for pair in run_blocks(blocks, xs, None) for t in pair]
        sum((t.float() * gt).sum() for t, gt in zip(outs, g)).backward()
        grads = [xs.grad] + [p.grad for p in blocks.parameters()]
        return [t.detach().double().cpu() for t in (*outs, *grads)]

    ref = run("torch", False)
    # "triton": fused at any size ("auto" leaves these 3200 tokens to torch, token_norm.MIN_ROWS)
    blocks[0].norm_impl = "triton"
    with torch.autocast(device.type, dtype=torch.bfloat16):
        fused = blocks[0].uses_fused_norms(x)
    torch_bf16 = max(_worst(ref, run("torch", True)))
    triton_bf16 = max(_worst(ref, run("triton", True)))
    return {"fused_norms": fused, "bf16_torch_rel_diff": torch_bf16,
            "bf16_triton_rel_diff": triton_bf16,
            "pass": fused and triton_bf16 <= 2 * torch_bf16 + 1e-3}  # fmt: skip


def profile(
    batch: int, conv_impl: str, steps: int = 3, top: int = 20, preset: str = "image-v2-base"
) -> dict[str, Any]:
    """Where a step's time goes: GPU busy time against wall time, the top CUDA kernels, the
    aten ops that launched the most GPU time, and the top CPU ops (ms per step)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, step = _runner(batch, conv_impl, preset=preset)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with torch_profile(activities=acts, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    events = list(prof.key_averages())
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    cpu = [e for e in events if e.device_type == DeviceType.CPU]

    def rows(evs, attr: str) -> list[dict[str, Any]]:
        evs = sorted(evs, key=lambda e: getattr(e, attr), reverse=True)[:top]
        return [{"name": e.key[:80], "ms": getattr(e, attr) / 1e3 / steps,
                 "calls": e.count / steps} for e in evs]  # fmt: skip

    shaped = [e for e in prof.key_averages(group_by_input_shape=True)
              if e.device_type == DeviceType.CPU and e.self_device_time_total > 0]  # fmt: skip
    shaped = sorted(shaped, key=lambda e: e.self_device_time_total, reverse=True)[: 2 * top]
    return {
        "wall_ms_profiled": 1e3 * wall,
        # which tensors the elementwise ops and copies work on (shapes say where they come from)
        "ops_by_shape": [
            {
                "name": e.key[:60],
                "shapes": str(e.input_shapes)[:200],
                "ms": e.self_device_time_total / 1e3 / steps,
                "calls": e.count / steps,
            }
            for e in shaped
        ],
        "gpu_busy_ms": sum(e.self_device_time_total for e in gpu) / 1e3 / steps,
        # where the GPU waited for the host, by step stage and the host's first operation
        "idle_gaps": _guarded(gpu_gaps.from_profiler, prof.events(), steps),
        "kernels": rows(gpu, "self_device_time_total"),
        "ops_by_gpu_time": rows(cpu, "self_device_time_total"),
        "ops_by_cpu_time": rows(cpu, "self_cpu_time_total"),
    }


_SHOW = ("batch", "step_time_s", "mfu", "peak_gpu_memory_gb", "loss_last", "skipped_steps", "error")


def _guarded(fn, *args, **kwargs) -> Any:
    """``fn(...)``, or ``{"error": ...}`` when it fails: the optional parts must not cost the
    measurements already made (a GPU session is short)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # report it in the JSON and go on
        torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def _print(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="*", default=[32, 128],
                   help="image-v2-base throughput batches (none: skip)")  # fmt: skip
    p.add_argument("--conv-impl", nargs="+", default=["torch", "triton"],
                   choices=["torch", "triton", "auto"], help="decoder convs to time")  # fmt: skip
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-agreement", action="store_true", help="timings only")
    p.add_argument("--conv", action="store_true", help="time the decoder convolution alone")
    p.add_argument("--sweep", action="store_true", help="with --conv: Triton tile settings")
    p.add_argument("--norms", action="store_true", help="time the fused block norms alone")
    p.add_argument("--mlp", action="store_true",
                   help="time the MLP's fused backward pass alone, with a sweep")  # fmt: skip
    p.add_argument("--attention", action="store_true",
                   help="time the short-sequence attention alone")  # fmt: skip
    p.add_argument("--loss", action="store_true",
                   help="the loss read by index alone, with a sweep")  # fmt: skip
    p.add_argument("--gemm", action="store_true",
                   help="fc1 with GELU in a Triton product's epilogue (gpu_gemm.py)")  # fmt: skip
    p.add_argument("--norm-min-rows", type=int, default=None,
                   help="set data2vec.nn.token_norm.MIN_ROWS for this run")  # fmt: skip
    p.add_argument("--variants", nargs="*", metavar="NAME", default=None,
                   help="these of VARIANTS (all without names)")  # fmt: skip
    p.add_argument("--on", nargs="+", metavar="PRESET:BATCH", default=["image-v2-base:128"],
                   help="where --variants and --profile run")  # fmt: skip
    p.add_argument("--repeat", type=int, default=1, help="run the variants this many times")
    p.add_argument("--audio", type=int, default=0, metavar="BATCH",
                   help="also audio-v2-base (2 s clips) at this batch")  # fmt: skip
    p.add_argument("--profile", action="store_true", help="top kernels (each --on setting)")
    args = p.parse_args()
    result: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        result["message"] = "no CUDA device: nothing to measure (run this on a GPU machine)"
        print(json.dumps(result))
        return
    device = torch.device("cuda")
    result["device"] = torch.cuda.get_device_name(device)
    start = time.perf_counter()
    result["triton"] = triton_gate.triton.__version__ if triton_gate.triton else None
    passed = []
    if not args.no_agreement:
        result["agreement"] = agreement(device)
        _print({"agreement": result["agreement"]})
        result["decoder_agreement"] = [
            _guarded(decoder_agreement, p, device) for p in ("image-v2-base", "audio-v2-base")
        ]
        _print({"decoder_agreement": result["decoder_agreement"]})
        result["norm_agreement"] = _guarded(norm_agreement, device)
        _print({"norm_agreement": result["norm_agreement"]})
        passed += [result["agreement"]["pass"], result["norm_agreement"].get("pass", False)]
        passed += [r.get("pass", False) for r in result["decoder_agreement"]]
    torch.backends.cuda.matmul.allow_tf32 = True  # throughput runs as users would
    torch.backends.cudnn.allow_tf32 = True
    if not args.no_agreement:
        result["startup_check"] = [
            _guarded(startup_check, preset, precision, device)
            for preset, precision in STARTUP_CHECKS
        ]
        _print({"startup_check": result["startup_check"]})
        passed += [r.get("pass", False) for r in result["startup_check"]]
    result["bf16_matmul_peak_flops"] = matmul_peak_flops(torch.bfloat16, device, n=8192)
    if args.norm_min_rows is not None:
        token_norm.MIN_ROWS = result["norm_min_rows"] = args.norm_min_rows
    kernel_batch = args.batch[-1] if args.batch else 128  # for the kernels alone
    if args.norms:
        result["norms"] = _guarded(norm_check)
        _print({"norms": result["norms"]})
    if args.mlp:
        result["mlp"] = _guarded(mlp_check)
        _print({"mlp": result["mlp"]})
        passed.append(result["mlp"].get("pass", False))
    if args.attention:
        result["attention"] = _guarded(attention_check, kernel_batch)
        _print({"attention": result["attention"]})
        passed.append(result["attention"].get("pass", False))
    if args.loss:
        result["loss"] = _guarded(loss_check)
        _print({"loss": result["loss"]})
        passed.append(result["loss"].get("pass", False))
    if args.gemm:
        result["gemm"] = _guarded(gemm_check)
        _print({"gemm": result["gemm"]})
    # the convolution last of the kernels alone: its sweep is the longest (a run cut short by
    # its time limit keeps what was printed before)
    if args.conv:
        result["conv"] = _guarded(conv_check, kernel_batch, args.sweep)
        _print({"conv": result["conv"]})
    result["throughput"] = []
    for batch in args.batch:
        for impl in args.conv_impl:
            try:
                r = throughput(batch, args.steps, impl)
            except torch.OutOfMemoryError as exc:  # report and keep the other sizes
                r = {"batch": batch, "error": str(exc).splitlines()[0]}
                torch.cuda.empty_cache()
            r["conv_impl"] = impl
            result["throughput"].append(r)
            _print({k: r.get(k) for k in ("conv_impl", *_SHOW)})
    for impl in args.conv_impl if args.audio else ():
        r = _guarded(throughput, args.audio, args.steps, impl, preset="audio-v2-base")
        r["conv_impl"] = impl
        result["throughput"].append(r)
        _print({k: r.get(k) for k in ("preset", "conv_impl", *_SHOW)})
    settings = [(preset, int(batch)) for preset, batch in (on.split(":") for on in args.on)]
    impl = args.conv_impl[-1]
    if args.variants is not None:
        result["variants"] = [
            _guarded(variants, batch, args.steps, impl, args.variants or None, preset, args.repeat)
            for preset, batch in settings
        ]
    if args.profile:
        result["profile"] = [_guarded(profile, b, impl, preset=p) for p, b in settings]
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result))
    sys.exit(0 if all(passed) else 1)


if __name__ == "__main__":
    main()
